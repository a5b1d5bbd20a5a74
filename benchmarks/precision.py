"""Training in bfloat16 with and without sfoptim's precision options.

The two tasks are the project's own, reused rather than copied:

* ``demo``: the task of ``sfoptim demo`` (``sfoptim.experiments.mnist1d_mlp``:
  MNIST-1D generated offline, its 3-layer MLP, hidden 256, batch 128, and the
  schedule-free run's settings: lr 0.008, 50 warmup steps, 2000 steps).  Metric: training loss at
  ``x`` on the whole training set after the last step; 3 seeds, like the demo.
* ``lm``: the language-model benchmark's task (``benchmarks/lm_stdlib.py``,
  ``sfoptim.experiments.char_lm``: byte-level transformer on Python's standard
  library, its default sizes, 480 steps, one pass).  Its schedule-free run with beta1 0.9 and lr 0.016 (the benchmark's
  best schedule-free setting); metric: held-out loss (nats/byte) at ``x`` after
  the last step; 2 seeds, like the benchmark.

Each task is trained with AdamWScheduleFree in four settings:

* ``float32``: parameters and state in float32 (the reference);
* ``bf16``: model (parameters, activations) and optimizer state in bfloat16,
  no option, on the foreach path (``fused=False``: arithmetic in bfloat16,
  what the published package does with a bf16 model);
* ``bf16+state32``: bf16 model, ``state_dtype=torch.float32`` (float32 master
  copy, ``z`` and second moment);
* ``bf16+state32+sr``: the same plus ``stochastic_rounding=True``.

Within a task and seed every setting starts from the same initial weights (drawn
in float32, then cast) and sees the same batches.  The table gives each loss and
its ratio to float32 (1.0 = as good as float32).

Examples:
  python benchmarks/precision.py --task demo --out out/precision-demo
  python benchmarks/precision.py --task lm --out out/precision-lm
  python benchmarks/precision.py --steps 20 --demo-samples 600 --lm-heldout 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sfoptim.experiments import char_lm, mnist1d_mlp

CONFIGS = {
    "float32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {"fused": False}),
    "bf16+state32": (torch.bfloat16, {"state_dtype": torch.float32}),
    "bf16+state32+sr": (torch.bfloat16, {"state_dtype": torch.float32, "stochastic_rounding": True}),
}


def run_demo_task(configs, seeds, steps=None, num_samples=None, log=print):
    """``{config: {seed: (train_loss_at_x, heldout_acc, seconds)}}`` on the demo task."""
    cfg = mnist1d_mlp.DemoConfig()  # sfoptim demo's defaults
    if steps:
        cfg.steps = steps
    if num_samples:
        cfg.num_samples = num_samples
    task = mnist1d_mlp.load_task(cfg.num_samples)
    out = {name: {} for name in configs}
    for seed in seeds:
        for name in configs:
            dtype, kw = CONFIGS[name]
            t = time.perf_counter()
            r = mnist1d_mlp.train_run(task, cfg, seed, "schedulefree", cfg.sf_lr, cfg.steps, [cfg.steps],
                               dtype=dtype, opt_kwargs=kw)[cfg.steps]
            out[name][seed] = (r[0], r[1], time.perf_counter() - t)
            log(f"  demo seed {seed} {name:>16}: train loss {r[0]:.6g}, acc {r[1]:.4f} "
                f"({out[name][seed][2]:.0f} s)")
    return out, {"steps": cfg.steps, "lr": cfg.sf_lr, "warmup": cfg.sf_warmup, "batch": cfg.batch_size,
                 "hidden": cfg.hidden, "num_samples": cfg.num_samples}


def run_lm_task(configs, seeds, lr, beta, steps=None, heldout=None, log=print):
    """``{config: {seed: (heldout_loss_at_x, seconds)}}`` on the LM benchmark."""
    a = char_lm.LMConfig()  # the benchmark's default sizes
    if steps:
        a.steps = steps
    if heldout:
        a.heldout = heldout
    train_files, held_files = char_lm.load_text()
    # The same held-out windows and per-seed training windows as lm_stdlib.main.
    held = char_lm.chunks(held_files, a.ctx, 12345)[: a.heldout]
    out = {name: {} for name in configs}
    for seed in seeds:
        data = char_lm.chunks(train_files, a.ctx, seed)[: a.steps * a.batch]
        for name in configs:
            dtype, kw = CONFIGS[name]
            t = time.perf_counter()
            loss = char_lm.run_schedulefree(a, data, held, seed, beta, lr, [a.steps], lambda: None,
                                              dtype=dtype, opt_kwargs=kw)[a.steps]
            out[name][seed] = (loss, time.perf_counter() - t)
            log(f"  lm   seed {seed} {name:>16}: held-out loss {loss:.6g} ({out[name][seed][1]:.0f} s)")
    return out, {"steps": a.steps, "lr": lr, "beta1": beta, "beta2": a.beta2, "warmup": a.warmup,
                 "batch": a.batch, "ctx": a.ctx, "d": a.d, "layers": a.layers, "heads": a.heads,
                 "heldout": a.heldout}


def summarize(task, runs, configs):
    """Rows ``(config, mean loss, per-seed losses, ratio to float32, mean seconds)``.

    The ratio is of means over seeds (per-seed ratios are in the JSON output).
    """
    rows = []
    base = statistics.fmean(v[0] for v in runs["float32"].values()) if "float32" in runs else None
    for name in configs:
        losses = [v[0] for v in runs[name].values()]
        m = statistics.fmean(losses)
        rows.append({
            "task": task, "config": name, "loss": m, "per_seed": losses,
            "ratio": (m / base) if base else None,
            "per_seed_ratio": ([loss / runs["float32"][s][0] for s, loss in zip(runs[name], losses)] if base else None),
            "seconds": statistics.fmean(v[-1] for v in runs[name].values()),
        })
    return rows


def table(rows, meta):
    """A Markdown table of every row."""
    metric = {"demo": "training loss at x", "lm": "held-out loss at x (nats/byte)"}
    lines = ["| task | metric | steps | seeds | setting | loss | vs float32 | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.4f}x" if r["ratio"] < 10 else f"{r['ratio']:.3g}x")
        lines.append(f"| {r['task']} | {metric[r['task']]} | {meta[r['task']]['steps']} | {len(r['per_seed'])} | "
                     f"{r['config']} | {r['loss']:.5g} | {ratio} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["demo", "lm", "both"], default="both",
                   help="which task(s) to run (default: %(default)s)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated subset of: " + ", ".join(CONFIGS) + " (default: all)")
    p.add_argument("--steps", type=int, default=None,
                   help="override the horizon of both tasks (defaults: demo 2000, lm 480); small values for smoke runs")
    # Seed counts default to those of sfoptim demo (3) and lm_stdlib.py (2).
    p.add_argument("--demo-seeds", type=int, default=len(mnist1d_mlp.DemoConfig().seeds),
                   help="demo seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--lm-seeds", type=int, default=char_lm.LMConfig().seeds,
                   help="LM seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--demo-samples", type=int, default=None,
                   help="MNIST-1D samples to generate (default: the demo's 5000); smaller for smoke runs")
    p.add_argument("--lm-lr", type=float, default=0.016, help="LM schedule-free lr (default: %(default)s)")
    p.add_argument("--lm-beta", type=float, default=0.9, help="LM schedule-free beta1 (default: %(default)s)")
    p.add_argument("--lm-heldout", type=int, default=None,
                   help="held-out windows (default: lm_stdlib's 256); smaller for smoke runs")
    # One thread, as sfoptim demo and lm_stdlib default to: on a small shared
    # machine more threads made these tiny models slower, not faster.
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default: print only)")
    return p


def main(argv=None):
    """Run the chosen tasks and print (and optionally write) the table; returns the result dict."""
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    rows, meta, raw = [], {}, {}
    if a.task in ("demo", "both"):
        runs, meta["demo"] = run_demo_task(configs, range(a.demo_seeds), a.steps, a.demo_samples, log)
        raw["demo"] = {n: {str(s): v for s, v in r.items()} for n, r in runs.items()}
        rows += summarize("demo", runs, configs)
    if a.task in ("lm", "both"):
        runs, meta["lm"] = run_lm_task(configs, range(a.lm_seeds), a.lm_lr, a.lm_beta, a.steps, a.lm_heldout, log)
        raw["lm"] = {n: {str(s): v for s, v in r.items()} for n, r in runs.items()}
        rows += summarize("lm", runs, configs)

    md = table(rows, meta)
    print(md)
    result = {"args": vars(a), "meta": meta, "rows": rows, "runs": raw,
              "seconds": time.perf_counter() - t0, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        cmd = " ".join(sys.argv[1:] if argv is None else argv)
        (out / "results.md").write_text(f"Command: python benchmarks/precision.py {cmd}\n\n{md}\n")
    return result


if __name__ == "__main__":
    main()
