"""End-to-end check of ``sfoptim demo --quick`` and the demo's determinism."""

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("mnist1d", reason="the demo extra (pip install 'sfoptim[demo]') is not installed")


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)


def test_demo_quick_writes_finite_results(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "sfoptim.cli", "demo", "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=900,  # a hang guard: minutes on a loaded machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SF/cosine" in proc.stdout
    # stderr is a pipe here, not a terminal: no progress bar in it.
    assert "training" not in proc.stderr and "\r" not in proc.stderr, proc.stderr[-500:]
    wide = [line for line in proc.stdout.splitlines() if len(line) > 100]
    assert not wide, wide

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["steps"] for r in rows] == [50, 100, 200, 400]
    for r in rows:
        for method in ("schedulefree", "cosine", "linear"):
            loss_mean, loss_sd = r[method]["loss"]
            acc_mean, _ = r[method]["acc"]
            assert math.isfinite(loss_mean) and loss_mean > 0 and loss_sd >= 0
            assert 0.0 <= acc_mean <= 1.0
        assert r["cosine"]["ratio"] > 0
    assert all(math.isfinite(x) for x in _numbers(result))

    md = (out / "results.md").read_text()
    assert "| steps |" in md and "SF/cosine" in md
    png = out / "frontier.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "sfoptim.cli"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "demo" in proc.stdout


def test_training_is_deterministic_given_seed():
    import torch

    from sfoptim import demo

    torch.set_num_threads(1)
    cfg = demo.DemoConfig(steps=30, num_samples=600, hidden=32, sf_warmup=5)
    task = demo.load_task(cfg.num_samples)
    for method in ("schedulefree", "cosine"):
        a = demo.train_run(task, cfg, 3, method, 0.01, 30, [10, 30])
        b = demo.train_run(task, cfg, 3, method, 0.01, 30, [10, 30])
        assert a == b


def test_schedules_warm_up_and_end_at_zero():
    from sfoptim.demo import schedule_factor

    for kind in ("cosine", "linear"):
        assert schedule_factor(kind, 0, 100, 10) == pytest.approx(0.1)
        assert schedule_factor(kind, 9, 100, 10) == pytest.approx(1.0)
        assert schedule_factor(kind, 99, 100, 10) == pytest.approx(0.0)
        vals = [schedule_factor(kind, s, 100, 10) for s in range(9, 100)]
        assert all(x >= y for x, y in zip(vals, vals[1:]))
