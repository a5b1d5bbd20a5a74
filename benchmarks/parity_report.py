"""Worst relative difference to schedulefree 1.4.1 over 200 steps, per backend.

Uses the parity tests' twin-model runner (``sfoptim.experiments.problems.run_pair``)
for AdamW, SGD and RAdam with warmup and weight decay, in float64 and float32,
with the default backend (the fused kernel on CPU) and with foreach.

    python benchmarks/parity_report.py
"""

import argparse

import schedulefree
import torch

import sfoptim
from sfoptim.experiments.problems import run_pair


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    for dtype in (torch.float64, torch.float32):
        for fused in (None, False):
            w = max(
                run_pair(lambda p, fused=fused: sfoptim.AdamWScheduleFree(p, lr=0.02, warmup_steps=10, weight_decay=0.05, fused=fused),
                         lambda p: schedulefree.AdamWScheduleFree(p, lr=0.02, warmup_steps=10, weight_decay=0.05), dtype),
                run_pair(lambda p, fused=fused: sfoptim.SGDScheduleFree(p, lr=0.2, warmup_steps=20, weight_decay=0.01, fused=fused),
                         lambda p: schedulefree.SGDScheduleFree(p, lr=0.2, warmup_steps=20, weight_decay=0.01), dtype),
                run_pair(lambda p, fused=fused: sfoptim.RAdamScheduleFree(p, lr=0.01, weight_decay=0.05, fused=fused),
                         lambda p: schedulefree.RAdamScheduleFree(p, lr=0.01, weight_decay=0.05), dtype))
            print(dtype, "fused default" if fused is None else "foreach", w)


if __name__ == "__main__":
    main()
