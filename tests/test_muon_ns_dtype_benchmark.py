"""Tiny-size smoke run of benchmarks/muon_ns_dtype.py: it starts, times every contender and prints its table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_muon_ns_dtype_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_muon_ns_dtype", ROOT / "benchmarks" / "muon_ns_dtype.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--width", "8", "--matrices", "2", "--vocab", "8", "--rounds", "1", "--warmup", "0"])
    assert [name for name, _, _ in rows] == list(bench.contenders(1e-3))
    assert rows[0][2] == 1.0 and all(median > 0 for _, median, _ in rows)
    out = capsys.readouterr().out
    assert '"auto" resolves to torch.' in out and "| MuonScheduleFree ns_dtype=bfloat16 |" in out
