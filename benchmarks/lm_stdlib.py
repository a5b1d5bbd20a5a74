"""Character-level transformer, one pass over Python's standard-library source.

One schedule-free AdamW run per momentum (beta1 = 0.9 and 0.98), never told its
stopping time, is evaluated at T/8, T/4, T/2 and T and compared with AdamW +
warmup + cosine decay and AdamW + warmup-stable-decay (WSD), each with its
learning rate tuned on a grid separately for every stopping time.  The metric is
held-out loss (nats per byte) on standard-library files kept out of training.

The text is read from the running interpreter's standard library (the directory
of ``os.__file__``); nothing is downloaded or shipped.  Every batch is new data
(a single pass), so training and held-out loss measure the same thing up to the
file split.  The task, model and runs are ``sfoptim.experiments.char_lm``.

Example:
  python benchmarks/lm_stdlib.py --out out/lm           # the documented run
  python benchmarks/lm_stdlib.py --steps 200 --seeds 1  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sfoptim.experiments.char_lm import (
    LMConfig,
    chunks,
    load_text,
    run_cosine,
    run_schedulefree,
    run_wsd,
)

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


# --------------------------------------------------------------------------- report

def ms(v):
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def build_parser():
    """The command-line options; ``build_parser().parse_args([])`` gives the defaults."""
    d = LMConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help="horizon T (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="(default: %(default)s)")
    p.add_argument("--ctx", type=int, default=d.ctx, help="context in bytes (default: %(default)s)")
    p.add_argument("--d", type=int, default=d.d, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=d.layers, help="(default: %(default)s)")
    p.add_argument("--heads", type=int, default=d.heads, help="(default: %(default)s)")
    p.add_argument("--beta2", type=float, default=d.beta2, help="(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="warmup steps, the same for every method (default: %(default)s)")
    p.add_argument("--decay-frac", type=float, default=d.decay_frac,
                   help="WSD: fraction of the run spent decaying (default: %(default)s)")
    p.add_argument("--sf-lr", type=float, nargs="+", default=[0.008, 0.016],
                   help="one schedule-free run per value (each is never told its stopping time) "
                        "(default: %(default)s)")
    p.add_argument("--sf-betas", type=float, nargs="+", default=[0.9, 0.98], help="(default: %(default)s)")
    p.add_argument("--grid", type=float, nargs="+", default=[0.004, 0.008, 0.016, 0.032],
                   help="baseline learning rates, tuned per stopping time (default: %(default)s)")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out windows (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--out", default="out/lm", help="(default: %(default)s)")
    return p


def config(a) -> LMConfig:
    """The run sizes among the parsed options ``a``."""
    return LMConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(LMConfig)})


def main(argv=None):
    """Run the benchmark and write results.json, results.md and lm.png to --out."""
    a = build_parser().parse_args(argv)
    cfg = config(a)
    torch.set_num_threads(a.threads)

    train_files, held_files = load_text()
    held = chunks(held_files, a.ctx, 12345)[: a.heldout]
    horizons = [round(a.steps * f) for f in FRACTIONS]
    curve = sorted({round(a.steps * i / 24) for i in range(1, 25)} | set(horizons))
    total = a.seeds * (
        len(a.sf_betas) * len(a.sf_lr) * a.steps + len(a.grid) * (sum(horizons) + a.steps + sum(round(a.decay_frac * h) for h in horizons) - round(a.decay_frac * a.steps)))
    need = a.steps * a.batch
    print(f"stdlib: {sum(map(len, train_files)) / 1e6:.1f} MB train, {sum(map(len, held_files)) / 1e6:.1f} MB "
          f"held-out; one pass uses {need * (a.ctx + 1) / 1e6:.1f} MB", file=sys.stderr)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="step", file=sys.stderr)
        tick = lambda: bar.update(1)  # noqa: E731
    except ImportError:
        bar, tick = None, (lambda: None)

    t0 = time.perf_counter()
    sfk = [(b, lr) for b in a.sf_betas for lr in a.sf_lr]
    name = lambda k: f"sf{k[0]}@{k[1]:g}"  # noqa: E731
    res = {"sf": {k: {} for k in sfk}, "cosine": {}, "wsd": {}}
    for seed in range(a.seeds):
        data = chunks(train_files, a.ctx, seed)
        if len(data) < need:
            raise SystemExit(f"only {len(data)} windows of text for {need} needed: lower --steps/--batch")
        data = data[:need]
        for k in sfk:
            res["sf"][k][seed] = run_schedulefree(cfg, data, held, seed, k[0], k[1], curve, tick)
        for lr in a.grid:
            for h in horizons:
                res["cosine"].setdefault(lr, {}).setdefault(h, {})[seed] = run_cosine(cfg, data, held, seed, lr, h, tick)
            for h, v in run_wsd(cfg, data, held, seed, lr, horizons, tick).items():
                res["wsd"].setdefault(lr, {}).setdefault(h, {})[seed] = v
    if bar:
        bar.close()
    seeds = range(a.seeds)

    rows = []
    for h in horizons:
        row = {"steps": h, "tokens": h * a.batch * a.ctx}
        for k in sfk:
            row[name(k)] = ms([res["sf"][k][s][h] for s in seeds])
        for kind in ("cosine", "wsd"):
            best = min(a.grid, key=lambda lr: statistics.fmean(res[kind][lr][h][s] for s in seeds))
            row[kind] = {"lr": best, "edge": best in (min(a.grid), max(a.grid)),
                         "loss": ms([res[kind][best][h][s] for s in seeds]),
                         "grid": {str(lr): statistics.fmean(res[kind][lr][h][s] for s in seeds) for lr in a.grid}}
        for k in sfk:
            row[f"ratio_{name(k)}_cosine"] = row[name(k)][0] / row["cosine"]["loss"][0]
        rows.append(row)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "seconds": time.perf_counter() - t0, "torch": torch.__version__,
              "python": sys.version.split()[0], "rows": rows,
              "sf_curve": {name(k): {"steps": curve, "loss": [[res["sf"][k][s][t] for t in curve] for s in seeds]}
                           for k in sfk}}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    f = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"  # noqa: E731
    head = ["steps", "tokens"] + [f"SF β={k[0]} lr {k[1]:g}" for k in sfk] + ["tuned cosine (lr)", "tuned WSD (lr)"] + \
           [f"SF β={k[0]} lr {k[1]:g} / cosine" for k in sfk]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["steps"]), f"{r['tokens'] / 1e6:.2f}M"] + [f(r[name(k)]) for k in sfk]
        for kind in ("cosine", "wsd"):
            cells.append(f"{f(r[kind]['loss'])} ({r[kind]['lr']:g}{'*' if r[kind]['edge'] else ''})")
        cells += [f"{r[f'ratio_{name(k)}_cosine']:.3f}" for k in sfk]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"Held-out loss (nats/byte), mean ± sd over {a.seeds} seeds; * = best lr on the grid's edge.\n\n"
        f"Command: python benchmarks/lm_stdlib.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n"
        + table + "\n")
    print(table)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return result
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sfk):
        c = result["sf_curve"][name(k)]
        ax.plot([t * a.batch * a.ctx for t in curve], [statistics.fmean(v) for v in zip(*c["loss"])],
                color=("C0", "C1", "C4", "C5", "C6", "C7")[i % 6], lw=2,
                label=f"schedule-free AdamW β={k[0]}, lr {k[1]:g}: one run")
    toks = [r["tokens"] for r in rows]
    for kind, color, marker in (("cosine", "C3", "o"), ("wsd", "C2", "s")):
        ax.errorbar(toks, [r[kind]["loss"][0] for r in rows], yerr=[r[kind]["loss"][1] for r in rows],
                    color=color, marker=marker, ls="--", capsize=3, label=f"{kind}, lr tuned per stopping time")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("held-out loss (nats/byte)")
    lo = min(min(r["cosine"]["loss"][0], r["wsd"]["loss"][0]) for r in rows)
    ax.set_ylim(lo * 0.95, max(r["cosine"]["loss"][0] for r in rows) * 1.25)
    ax.set_title(f"Byte-level transformer on the Python stdlib, one pass ({a.seeds} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm.png", dpi=110)
    return result


if __name__ == "__main__":
    main()
