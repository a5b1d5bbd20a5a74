"""Worst relative difference to schedulefree 1.4.1 over 200 steps, per backend.

Reuses the parity test's twin-model runner (tests/test_parity.py) for AdamW,
SGD and RAdam with warmup and weight decay, in float64 and float32, with the
default backend (the fused kernel on CPU) and with foreach.

    python benchmarks/parity_report.py
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
import torch, schedulefree, sfoptim
from test_parity import run_pair
torch.set_num_threads(1)
for dtype in (torch.float64, torch.float32):
    for fused in (None, False):
        w = max(
            run_pair(lambda p: sfoptim.AdamWScheduleFree(p, lr=0.02, warmup_steps=10, weight_decay=0.05, fused=fused),
                     lambda p: schedulefree.AdamWScheduleFree(p, lr=0.02, warmup_steps=10, weight_decay=0.05), dtype),
            run_pair(lambda p: sfoptim.SGDScheduleFree(p, lr=0.2, warmup_steps=20, weight_decay=0.01, fused=fused),
                     lambda p: schedulefree.SGDScheduleFree(p, lr=0.2, warmup_steps=20, weight_decay=0.01), dtype),
            run_pair(lambda p: sfoptim.RAdamScheduleFree(p, lr=0.01, weight_decay=0.05, fused=fused),
                     lambda p: schedulefree.RAdamScheduleFree(p, lr=0.01, weight_decay=0.05), dtype))
        print(dtype, "fused default" if fused is None else "foreach", w)
