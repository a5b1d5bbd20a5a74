"""Character-level transformer, one pass over Python's standard-library source.

Optimizers that are never told their stopping time (schedule-free ones) are
evaluated at T/8, T/4, T/2 and T of a single run and compared with baselines
whose every run knows its stopping time: AdamW + warmup + cosine decay, AdamW +
warmup-stable-decay (WSD) and Muon + WSD, each with its learning rate tuned on a
grid separately for every stopping time.  The metric is held-out loss (nats per
byte) on standard-library files kept out of training; the tables give it at
every stopping time, its ratio to tuned AdamW + cosine, and each method's
tuning budget.

Methods (--methods; default: every one whose optimizer is installed):
  sf-adamw      schedule-free AdamW, one run per (beta1, lr) in --sf-betas x --sf-lr;
                the one with the lowest held-out loss averaged over the stopping times
  adamw-cosine  AdamW + warmup + cosine, lr tuned per stopping time over --grid
  adamw-wsd     AdamW + WSD, lr tuned per stopping time over --grid
  muon-wsd      torch.optim.Muon (transformer blocks' weight matrices, RMS matched
                to AdamW) + AdamW (embeddings, head, norms, biases), WSD, lr tuned
                per stopping time over --grid
  prodigyplus   prodigy-plus-schedule-free's ProdigyPlusScheduleFree, defaults
  sf-plus       sfoptim.AdamCScheduleFreePlus (ScheduleFree+), defaults (lr 1.0)
  muon-sf       sfoptim.MuonScheduleFree, defaults
  muon-sf-rising-beta
                sfoptim.MuonScheduleFree with AMUSE's interpolation weight rising
                after step 200 (beta_horizon=200), the rest defaults
  muon-sf-amuse sfoptim.MuonScheduleFree with AMUSE's interpolation weight as AMUSE
                sets it: from 0.6, rising from the end of the warmup
                (beta=0.6, beta_horizon="warmup", beta_power=0.3), the rest defaults
  prodigy-sf    sfoptim.ProdigyScheduleFree, defaults (lr 1.0)
  prodigy-sf-algoperf
                sfoptim.ProdigyScheduleFree in the AlgoPerf submission's form
                (averaging="algoperf", betas=(0.9, 0.9955), d_growth=None,
                update_clip=None)
  sf-adamw-fixed, sf-adamw-bf16state, sf-adamw-8bit
                schedule-free AdamW at beta1 0.9, lr 0.016 (one run each) with its
                state in float32, in bfloat16 (state_precision="bf16") and in 8 bits
                (state_precision="8bit"); not in the default set
  muon-sf-tuned sfoptim.MuonScheduleFree over --grid (lr) x --muon-sf-betas x --muon-sf-horizons
                (beta_horizon) x --muon-sf-powers x --muon-sf-weight-decays, the best run chosen
                for each stopping time
                (a bound on tuning it; not run by default)

The text is read from the running interpreter's standard library (the directory
of ``os.__file__``); nothing is downloaded or shipped.  Every batch is new data
(a single pass), so training and held-out loss measure the same thing up to the
file split.  The task, model, method table and runs are
``sfoptim.experiments.char_lm``.

Example:
  python benchmarks/lm_stdlib.py --out out/lm           # the documented run
  python benchmarks/lm_stdlib.py --steps 200 --seeds 1  # smoke test
  python benchmarks/lm_stdlib.py --methods sf-adamw-fixed sf-adamw-bf16state sf-adamw-8bit --out out/lm_lowbit
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
    DEFAULT_METHODS,
    LMConfig,
    chunks,
    lm_methods,
    load_text,
    run_decay,
    run_once,
    run_wsd,
)

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
REFERENCE = "adamw-cosine"


# --------------------------------------------------------------------------- report

def ms(v):
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _horizon(text):
    if text.lower() in ("none", "warmup"):
        return None if text.lower() == "none" else "warmup"
    return int(text)


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
                   help="warmup steps of sf-adamw and the tuned schedules (default: %(default)s)")
    p.add_argument("--decay-frac", type=float, default=d.decay_frac,
                   help="WSD: fraction of the run spent decaying (default: %(default)s)")
    p.add_argument("--sf-lr", type=float, nargs="+", default=[0.008, 0.016],
                   help="sf-adamw learning rates (one run per value and beta; one kept for all "
                        "stopping times) (default: %(default)s)")
    p.add_argument("--sf-betas", type=float, nargs="+", default=[0.9, 0.98],
                   help="sf-adamw beta1 values (default: %(default)s)")
    p.add_argument("--grid", type=float, nargs="+", default=[0.004, 0.008, 0.016, 0.032],
                   help="learning rates of adamw-cosine, adamw-wsd and muon-wsd, tuned per stopping time "
                        "(default: %(default)s)")
    p.add_argument("--muon-sf-horizons", type=_horizon, nargs="+", default=[None, 100, 200, 400],
                   help="muon-sf-tuned: beta_horizon values ('none': constant beta; 'warmup': from the end of the "
                        "warmup), crossed with --grid "
                        "(default: none 100 200 400)")
    p.add_argument("--muon-sf-weight-decays", type=float, nargs="+", default=[0.1],
                   help="muon-sf-tuned: weight decays, crossed with the above (default: 0.1, its default)")
    p.add_argument("--muon-sf-betas", type=float, nargs="+", default=[0.9],
                   help="muon-sf-tuned: interpolation weights beta, crossed with the above (default: 0.9, its default)")
    p.add_argument("--muon-sf-powers", type=float, nargs="+", default=[1.0],
                   help="muon-sf-tuned: beta_power values of the rise, crossed with the above (default: 1, its default)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to run (listed above; default: every one whose optimizer is installed)")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out windows (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--out", default="out/lm", help="(default: %(default)s)")
    return p


def config(a) -> LMConfig:
    """The run sizes among the parsed options ``a``."""
    return LMConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(LMConfig)})


def select_methods(a, cfg):
    """The methods named by --methods (an unknown or unavailable name is an error), or the
    installed ones of the default list; also returns the defaults left out and why."""
    table = lm_methods(cfg, lrs=tuple(a.grid), sf_lrs=tuple(a.sf_lr), sf_betas=tuple(a.sf_betas),
                       muon_sf_horizons=tuple(a.muon_sf_horizons),
                       muon_sf_weight_decays=tuple(a.muon_sf_weight_decays),
                       muon_sf_betas=tuple(a.muon_sf_betas), muon_sf_powers=tuple(a.muon_sf_powers))
    if a.methods is None:
        skipped = {n: table[n].available() for n in DEFAULT_METHODS if table[n].available() is not None}
        return [table[n] for n in DEFAULT_METHODS if n not in skipped], skipped
    out = []
    for name in dict.fromkeys(a.methods):
        if name not in table:
            raise SystemExit(f"--methods: unknown method {name!r} (choose from {', '.join(table)})")
        why = table[name].available()
        if why is not None:
            raise SystemExit(f"--methods: {name!r} cannot run here: {why}")
        out.append(table[name])
    return out, {}


def _steps_per_config(m, a, horizons):
    if m.schedule is None:
        return a.steps
    if m.schedule == "wsd":  # one shared stable phase, one decay branch per horizon
        return a.steps + sum(round(a.decay_frac * h) for h in horizons) - round(a.decay_frac * a.steps)
    return sum(horizons)


def _on_edge(grid, i):
    """Whether configuration ``i`` sits at either end of an axis of three or more learning rates."""
    for key in grid[i]:
        if key == "lr" or key.endswith("_lr"):
            values = sorted({c[key] for c in grid})
            if len(values) >= 3 and grid[i][key] in (values[0], values[-1]):
                return True
    return False


def choose(method, mean_loss, horizons):
    """``{stopping time: index of the configuration chosen there}``.

    ``mean_loss(i, steps)`` is configuration ``i``'s held-out loss averaged over
    the seeds and the stopping times ``steps``.  A method with a schedule, or
    marked ``per_stopping_time``, takes the lowest at each stopping time; any
    other keeps one configuration, the lowest averaged over all of them.
    """
    configs = range(len(method.grid))
    if method.schedule is None and not method.per_stopping_time:
        best = min(configs, key=lambda i: mean_loss(i, horizons))
        return dict.fromkeys(horizons, best)
    return {h: min(configs, key=lambda i: mean_loss(i, [h])) for h in horizons}


def _config(c):
    return ", ".join(f"{k} {'none' if v is None else v if isinstance(v, str) else f'{v:g}'}"
                     for k, v in c.items()) or "defaults"


def main(argv=None):
    """Run the benchmark and write results.json, results.md and lm.png to --out."""
    a = build_parser().parse_args(argv)
    cfg = config(a)
    torch.set_num_threads(a.threads)
    methods, skipped = select_methods(a, cfg)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)

    train_files, held_files = load_text()
    held = chunks(held_files, a.ctx, 12345)[: a.heldout]
    horizons = [round(a.steps * f) for f in FRACTIONS]
    curve = sorted({max(1, round(a.steps * i / 24)) for i in range(1, 25)} | set(horizons))
    total = a.seeds * sum(len(m.grid) * _steps_per_config(m, a, horizons) for m in methods)
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
    # res[name][config index][seed] = {step: held-out loss}
    res: dict = {m.name: [{} for _ in m.grid] for m in methods}
    seconds: dict = {m.name: 0.0 for m in methods}
    for seed in range(a.seeds):
        data = chunks(train_files, a.ctx, seed)
        if len(data) < need:
            raise SystemExit(f"only {len(data)} windows of text for {need} needed: lower --steps/--batch")
        data = data[:need]
        for m in methods:
            t = time.perf_counter()
            for i, c in enumerate(m.grid):
                if m.schedule is None:
                    res[m.name][i][seed] = run_once(cfg, data, held, seed, m, c, curve, tick)
                elif m.schedule == "wsd":
                    res[m.name][i][seed] = run_wsd(cfg, data, held, seed, m, horizons, tick, config=c)
                else:
                    res[m.name][i][seed] = {h: run_decay(cfg, data, held, seed, m, c, h, tick) for h in horizons}
            seconds[m.name] += time.perf_counter() - t
    if bar:
        bar.close()
    seeds = range(a.seeds)

    def mean_loss(name, i, steps):
        return statistics.fmean(res[name][i][s][h] for s in seeds for h in steps)

    # Tuned per stopping time: the lowest mean held-out loss there.  One run:
    # one configuration for all stopping times, the lowest mean over them.
    chosen = {m.name: choose(m, lambda i, steps, m=m: mean_loss(m.name, i, steps), horizons) for m in methods}

    rows = []
    for h in horizons:
        row: dict = {"steps": h, "tokens": h * a.batch * a.ctx}
        for m in methods:
            i = chosen[m.name][h]
            row[m.name] = {"config": m.grid[i], "loss": ms([res[m.name][i][s][h] for s in seeds]),
                           "edge": _on_edge(m.grid, i),
                           "grid": [mean_loss(m.name, j, [h]) for j in range(len(m.grid))]}
        if REFERENCE in row:
            for m in methods:
                row[m.name]["ratio"] = row[m.name]["loss"][0] / row[REFERENCE]["loss"][0]
        rows.append(row)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "seconds": time.perf_counter() - t0, "torch": torch.__version__,
              "python": sys.version.split()[0], "skipped": skipped,
              "methods": {m.name: {"label": m.label, "tuning": m.tuning(), "schedule": m.schedule,
                                   "grid": list(m.grid), "seconds": seconds[m.name]} for m in methods},
              "rows": rows,
              "curves": {m.name: {"steps": curve, "config": m.grid[chosen[m.name][a.steps]],
                                  "loss": [[res[m.name][chosen[m.name][a.steps]][s][t] for t in curve] for s in seeds]}
                         for m in methods if m.schedule is None}}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    f = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"  # noqa: E731
    head = ["method"] + [f"{r['steps']} ({r['tokens'] / 1e6:.2f}M)" for r in rows]
    md = lambda h, body: ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + [  # noqa: E731
        "| " + " | ".join(b) + " |" for b in body]
    lines = [f"Held-out loss (nats/byte), mean ± sd over {a.seeds} seed{'s' * (a.seeds > 1)}, "
             "by stopping time (steps, training bytes):", ""]
    lines += md(head, [[m.label] + [f(r[m.name]["loss"]) for r in rows] for m in methods])
    if REFERENCE in res:
        lines += ["", "Ratio to AdamW + cosine tuned for each stopping time (below 1: lower loss):", ""]
        lines += md(["method"] + [str(r["steps"]) for r in rows],
                    [[m.label] + [f"{r[m.name]['ratio']:.3f}" for r in rows] for m in methods if m.name != REFERENCE])
    lines += ["", "Tuning budget, configuration chosen by held-out loss (* = a learning rate on the grid's edge), wall time:", ""]
    body = []
    for m in methods:
        picks = [_config(r[m.name]["config"]) + ("*" if r[m.name]["edge"] else "") for r in rows]
        chosen_text = picks[0] if m.schedule is None and not m.per_stopping_time else "; ".join(f"{r['steps']}: {p}" for r, p in zip(rows, picks))
        body.append([m.label, m.tuning(), chosen_text, f"{seconds[m.name]:.0f} s"])
    lines += md(["method", "budget", "chosen", "wall"], body)
    table = "\n".join(lines)
    (out / "results.md").write_text(
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
    toks = [r["tokens"] for r in rows]
    markers = "osD^v<>"
    for i, m in enumerate(methods):
        if m.schedule is None:
            c = result["curves"][m.name]
            ax.plot([t * a.batch * a.ctx for t in curve], [statistics.fmean(v) for v in zip(*c["loss"])],
                    color=f"C{i}", lw=2, label=f"{m.label} ({_config(c['config'])}): one run")
        else:
            ax.errorbar(toks, [r[m.name]["loss"][0] for r in rows], yerr=[r[m.name]["loss"][1] for r in rows],
                        color=f"C{i}", marker=markers[i % len(markers)], ls="--", capsize=3,
                        label=f"{m.label}, lr tuned per stopping time")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ends = [r[m.name]["loss"][0] for r in rows for m in methods]
    ax.set_ylim(min(ends) * 0.95, max(r[m.name]["loss"][0] for r in rows[:1] for m in methods) * 1.15)
    ax.set_title(f"Byte-level transformer on the Python stdlib, one pass ({a.seeds} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm.png", dpi=110)
    plt.close(fig)
    return result


if __name__ == "__main__":
    main()
