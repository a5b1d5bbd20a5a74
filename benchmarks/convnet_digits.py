"""A ConvNet with BatchNorm on scikit-learn's 8x8 digits: untuned schedule-free optimizers against tuned schedules.

Every method is evaluated on held-out images at T/8, T/4, T/2 and T.
Schedule-free AdamW and AdamW + warmup + cosine share a grid of learning rates
and weight decays; schedule-free AdamW keeps one configuration for all stopping
times, cosine is tuned for each.  ScheduleFree+, schedule-free Muon,
schedule-free Prodigy and prodigy-plus-schedule-free run once with their
defaults.  Schedule-free runs are evaluated at ``x`` with BatchNorm statistics
recomputed there.  The data ships with scikit-learn (the ``demo`` extra).  The
task, model and method table are ``sfoptim.experiments.digits_convnet``.

Methods (--methods; default: every one whose optimizer is installed):
  sf-adamw      schedule-free AdamW, tuned over --lrs x --weight-decays, one configuration
  adamw-cosine  AdamW + warmup + cosine, tuned over the same grid for each stopping time
  sf-plus       sfoptim.AdamCScheduleFreePlus (ScheduleFree+), defaults
  muon-sf       sfoptim.MuonScheduleFree (Muon on the hidden linear layer), defaults
  prodigy-sf    sfoptim.ProdigyScheduleFree, defaults
  prodigyplus   prodigy-plus-schedule-free's ProdigyPlusScheduleFree, defaults

Example:
  python benchmarks/convnet_digits.py --out out/digits              # the documented run
  python benchmarks/convnet_digits.py --steps 64 --seeds 1 --out /tmp/d  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from sfoptim.demo import format_table
from sfoptim.experiments import digits_convnet


def build_parser() -> argparse.ArgumentParser:
    d = digits_convnet.DEFAULT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps T (default {d.steps})")
    p.add_argument("--seeds", type=int, default=len(d.seeds), help=f"seeds 0..N-1 (default {len(d.seeds)})")
    p.add_argument("--lrs", type=float, nargs="+", default=list(d.lrs), help="learning-rate grid of the tuned methods")
    p.add_argument("--weight-decays", type=float, nargs="+", default=list(d.weight_decays),
                   help="weight-decay grid of the tuned methods")
    p.add_argument("--methods", nargs="+", metavar="NAME", default=None,
                   help=f"methods to run (default: {' '.join(digits_convnet.DEFAULT_METHODS)}, those installed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="out/digits", help="folder for results.json and results.md")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = dataclasses.replace(digits_convnet.DEFAULT, steps=a.steps, seeds=tuple(range(a.seeds)),
                              lrs=tuple(a.lrs), weight_decays=tuple(a.weight_decays))
    table = digits_convnet.methods(cfg)
    for name in a.methods or ():
        if name not in table:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(table)}")
        why = table[name].available()
        if why is not None:
            raise SystemExit(f"method {name!r} cannot run here: {why}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    result = digits_convnet.run_comparison(cfg, names=a.methods)
    text = format_table(result)
    print(f"{result['task']}; {cfg.steps} steps, batch {cfg.batch_size}, {len(cfg.seeds)} seed(s); "
          f"{result['seconds']:.0f} s wall")
    print(text)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(f"# {result['task']}\n\n{cfg.steps} steps, batch {cfg.batch_size}, "
                                    f"seeds {list(cfg.seeds)}, torch {result['torch']}, {result['threads']} "
                                    f"thread(s), {result['seconds']:.0f} s wall.\n\n"
                                    + format_table(result, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
