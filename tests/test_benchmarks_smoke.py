"""Tiny-size smoke runs of the benchmark scripts: they start, finish and write
their tables.  The measured runs live in docs/results.md, not here."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convex_smoke(tmp_path):
    pytest.importorskip("sklearn")
    methods = ("schedulefree", "linear", "polyak", "primal", "prodigyplus")
    _load("convex").main(["--datasets", "iris", "--epochs", "2", "--seeds", "1", "--grid", "0.1", "1",
                          "--methods", *methods, "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(res) == {f"iris/{m}" for m in methods}
    assert res["iris/prodigyplus"]["lr"] is None  # run once with its defaults, not tuned
    assert all(0.0 <= r["acc"][0] <= 1.0 for r in res.values())


def test_batchnorm_smoke(tmp_path):
    pytest.importorskip("sklearn")
    _load("batchnorm").main(["--epochs", "1", "--seeds", "1", "--betas", "0.9", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(0.0 <= r["x_recomputed_bn"][0] <= 1.0 for r in rows)


def test_lm_short_horizon_has_no_step_zero(tmp_path):
    """With T < 12 the curve's first point rounds to step 0, which the training loop never reaches."""
    _load("lm_stdlib").main(["--steps", "8", "--seeds", "1", "--batch", "2", "--ctx", "16", "--d", "16",
                             "--layers", "1", "--heads", "2", "--warmup", "2", "--sf-betas", "0.9", "--sf-lr", "0.01",
                             "--heldout", "8", "--methods", "sf-adamw", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2, 4, 8]


def test_lm_smoke(tmp_path):
    methods = ["sf-adamw", "adamw-cosine", "adamw-wsd", "muon-wsd", "prodigyplus"]
    _load("lm_stdlib").main(["--steps", "16", "--seeds", "1", "--batch", "2", "--ctx", "16", "--d", "16",
                             "--layers", "1", "--heads", "2", "--warmup", "2", "--grid", "0.003",
                             "--sf-betas", "0.9", "--sf-lr", "0.01", "--heldout", "8", "--methods", *methods,
                             "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [r["steps"] for r in rows] == [2, 4, 8, 16]
    assert list(result["methods"]) == methods
    assert all(r["adamw-cosine"]["ratio"] == 1.0 and r[m]["loss"][0] > 0 for r in rows for m in methods)
    assert result["methods"]["prodigyplus"]["tuning"] == "defaults, not tuned"
    assert "Tuning budget" in (tmp_path / "results.md").read_text()


def test_lm_muon_sf_tuned_is_chosen_per_stopping_time(tmp_path):
    bench = _load("lm_stdlib")
    bench.main(["--steps", "16", "--seeds", "1", "--batch", "2", "--ctx", "16", "--d", "16", "--layers", "1",
                "--heads", "2", "--grid", "0.003", "0.01", "--muon-sf-horizons", "none", "2", "--heldout", "8",
                "--muon-sf-betas", "0.6", "0.9", "--methods", "muon-sf-tuned", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["methods"]["muon-sf-tuned"]["tuning"] == (
        "8 configs (lr {0.003, 0.01}, beta {0.6, 0.9}, beta_horizon {none, 2}, beta_power {1}, weight_decay {0.1}), "
        "for each stopping time")
    for r in result["rows"]:
        grid = r["muon-sf-tuned"]["grid"]
        assert r["muon-sf-tuned"]["loss"][0] == min(grid)
    assert "beta_horizon none" in (tmp_path / "results.md").read_text() or "beta_horizon 2" in (
        tmp_path / "results.md").read_text()

    # The choice itself: per stopping time for a tuned run, one for all otherwise.
    from sfoptim.experiments.char_lm import lm_methods

    table = lm_methods(bench.config(bench.build_parser().parse_args([])), lrs=(0.01, 0.02),
                       muon_sf_horizons=(None,))
    losses = {0: {1: 1.0, 2: 3.0}, 1: {1: 2.0, 2: 1.0}}  # config 0 best at 1, config 1 at 2 and overall
    mean_loss = lambda i, steps: sum(losses[i][h] for h in steps) / len(steps)  # noqa: E731
    assert bench.choose(table["muon-sf-tuned"], mean_loss, [1, 2]) == {1: 0, 2: 1}
    assert bench.choose(table["adamw-cosine"], mean_loss, [1, 2]) == {1: 0, 2: 1}
    assert bench.choose(table["sf-adamw"], lambda i, steps: mean_loss(i % 2, steps), [1, 2]) == {1: 1, 2: 1}


def test_lm_refuses_a_method_it_cannot_run(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyplus", None)  # as if the package were not installed
    with pytest.raises(SystemExit, match="prodigy-plus-schedule-free"):
        _load("lm_stdlib").main(["--methods", "prodigyplus", "--out", str(tmp_path)])


def test_lm_wsd_branches_equal_separate_runs():
    # run_wsd trains every horizon from one shared stable phase; each branch
    # must equal a WSD run of its own (for Muon + AdamW too, whose state is
    # split over two optimizers).
    import torch

    from sfoptim.experiments import char_lm

    torch.set_num_threads(1)
    cfg = char_lm.LMConfig(steps=12, batch=2, ctx=16, d=16, layers=1, heads=2, warmup=2, decay_frac=0.5)
    train, held = char_lm.load_text()
    data = char_lm.chunks(train[:20], cfg.ctx, 0)[: cfg.steps * cfg.batch]
    held = char_lm.chunks(held[:5], cfg.ctx, 1)[:8]
    method = char_lm.lm_methods(cfg)["muon-wsd"]
    branched = char_lm.run_wsd(cfg, data, held, 0, method, [6, 12], lambda: None, config={"lr": 0.01})
    for h in (6, 12):
        alone = char_lm.run_decay(cfg, data, held, 0, method, {"lr": 0.01}, h, lambda: None)
        assert branched[h] == alone


def test_precision_smoke(tmp_path):
    # Reuses sfoptim.demo's task, so it needs the demo extra's data generator.
    pytest.importorskip("mnist1d")
    res = _load("precision").main(["--steps", "20", "--demo-samples", "600", "--demo-seeds", "1",
                                   "--lm-heldout", "16", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows == res["rows"]
    configs = ["float32", "bf16", "bf16+state32", "bf16+state32+sr"]
    for task in ("demo", "lm"):
        got = [r for r in rows if r["task"] == task]
        assert [r["config"] for r in got] == configs
        assert got[0]["ratio"] == 1.0
        assert all(r["loss"] > 0 and r["ratio"] > 0 for r in got)
    assert "vs float32" in (tmp_path / "results.md").read_text()


def test_digits_convnet_smoke(tmp_path):
    pytest.importorskip("sklearn")
    methods = ["sf-adamw", "adamw-cosine", "muon-sf"]
    _load("convnet_digits").main(["--steps", "16", "--seeds", "1", "--lrs", "0.004", "--weight-decays", "0.1",
                                  "--methods", *methods, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["steps"] for r in result["rows"]] == [2, 4, 8, 16]
    assert list(result["methods"]) == methods
    assert all(0.0 <= r[m]["acc"][0] <= 1.0 for r in result["rows"] for m in methods)
    assert "Tuning budget" in (tmp_path / "results.md").read_text()


def test_digits_convnet_evaluates_schedule_free_runs_with_batchnorm_statistics_at_x():
    pytest.importorskip("sklearn")
    import torch

    from sfoptim.experiments import compare, digits_convnet

    cfg = digits_convnet.DigitsConfig(steps=12, seeds=(0,), width=4)
    data = digits_convnet.TASK.load(800)
    method = digits_convnet.methods(cfg)["sf-adamw"]
    seen = {}

    def build(model, config):
        seen["model"], seen["opt"] = model, method.build(model, config)
        return seen["opt"]

    recording = dataclasses.replace(method, build=build)
    compare.train_method(digits_convnet.TASK, data, cfg, 0, recording, {"lr": 0.01, "weight_decay": 0.0}, 12, [12])
    model, opt = seen["model"], seen["opt"]
    # The run left the model at y; the statistics it was evaluated with are those of x on training batches.
    opt.eval()
    bn = model.bn3
    saved = bn.running_mean.clone()
    xtr = data[0]
    order = compare.batch_order(len(xtr), 12, cfg.batch_size, 0)
    from sfoptim import recalibrate_batchnorm

    recalibrate_batchnorm(model, (xtr[i] for i in order.flip(0)), num_batches=20)
    torch.testing.assert_close(bn.running_mean, saved)


def test_step_time_smoke(capsys):
    # --warm-cache: the kernel already loaded in this process is reused (no private rebuild).
    ratios = _load("step_time").main(["--layouts", "tiny", "--rounds", "2", "--warmup", "0", "--no-heavyball",
                                      "--warm-cache", "--dtype", "float32", "bfloat16", "--only", "sfoptim"])
    names = {"sfoptim AdamW", "sfoptim RAdam", "sfoptim SGD", "sfoptim ScheduleFree+", "sfoptim Prodigy"}
    for dtype in ("float32", "bfloat16"):
        assert ratios[("tiny", "torch AdamW fused", dtype)] == 1.0
        assert all(ratios[("tiny", n, dtype)] > 0 for n in names)
    out = capsys.readouterr().out
    assert "tiny float32" in out and "tiny bfloat16" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
@pytest.mark.parametrize("script", ["step_time", "memory"])
def test_cuda_request_without_cuda_is_a_usage_error(script, capsys):
    with pytest.raises(SystemExit) as info:
        _load(script).main(["--device", "cuda"])
    assert info.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_memory_smoke(capsys):
    results = _load("memory").main(["--layout", "tiny", "--dtype", "float32", "bfloat16"])
    # State bytes per parameter: z and v in the parameter's dtype for schedule-free AdamW, as torch AdamW's two moments.
    assert results[("sfoptim AdamW", "float32")][0] == 8.0 and results[("sfoptim AdamW", "bfloat16")][0] == 4.0
    assert results[("sfoptim SGD", "float32")][0] == 4.0
    # A float32 master, z and v for bfloat16 weights.
    assert results[("sfoptim AdamW state_dtype=float32", "bfloat16")][0] == 12.0
    assert abs(results[("torch AdamW", "float32")][0] - 8.0) < 0.1  # plus its step counters
    assert all(peak >= 0 for _, peak in results.values())
    assert "optimizer state" in capsys.readouterr().out
