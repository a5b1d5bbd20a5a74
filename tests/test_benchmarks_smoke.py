"""Tiny-size smoke runs of the benchmark scripts: they start, finish and write
their tables.  The measured runs live in docs/results.md, not here."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convex_smoke(tmp_path):
    pytest.importorskip("sklearn")
    _load("convex").main(["--datasets", "iris", "--epochs", "2", "--seeds", "1", "--grid", "0.1", "1",
                          "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(res) == {f"iris/{m}" for m in ("schedulefree", "linear", "polyak", "primal")}
    assert all(0.0 <= r["acc"][0] <= 1.0 for r in res.values())


def test_batchnorm_smoke(tmp_path):
    pytest.importorskip("sklearn")
    _load("batchnorm").main(["--epochs", "1", "--seeds", "1", "--betas", "0.9", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(0.0 <= r["x_recomputed_bn"][0] <= 1.0 for r in rows)


def test_lm_smoke(tmp_path):
    _load("lm_stdlib").main(["--steps", "16", "--seeds", "1", "--batch", "2", "--ctx", "16", "--d", "16",
                             "--layers", "1", "--heads", "2", "--warmup", "2", "--grid", "0.003",
                             "--sf-betas", "0.9", "--sf-lr", "0.01", "--heldout", "8", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [2, 4, 8, 16]


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
