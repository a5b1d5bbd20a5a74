"""Convex benchmark: multinomial logistic regression on scikit-learn's bundled sets.

Following the convex experiments of the schedule-free paper, four SGD variants
train a linear softmax classifier with batch 16 for a fixed number of epochs:

* schedule-free SGD (``sfoptim.SGDScheduleFree``, momentum 0.9),
* SGD with linear decay of the learning rate to zero (the tuned-schedule baseline),
* Polyak averaging: constant-step SGD, evaluated at the running mean of its iterates,
* primal averaging: gradients taken at the running mean itself (schedule-free's
  beta = 1 limit), written out here because SGDScheduleFree requires beta < 1.

Each method's learning rate is tuned on a log grid; the table reports final
training accuracy and loss (mean ± sd over seeds) at each method's best rate.
The learning-rate-free schedule-free optimizers run once with their defaults
(nothing tuned): ``sf-plus`` (``sfoptim.AdamCScheduleFreePlus``), ``muon-sf``,
``prodigy-sf`` (from sfoptim, run by default when this sfoptim has them) and
``prodigyplus`` (the prodigy-plus-schedule-free package, on request).

Example:
  python benchmarks/convex.py --out out/convex
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sfoptim
from sfoptim.experiments.methods import step_with_loss, untuned_schedule_free_methods

#: Run once with their defaults, evaluated at x after eval(); the lr grid does not apply.
UNTUNED = {m.name: m for m in untuned_schedule_free_methods()}
TUNED = ("schedulefree", "linear", "polyak", "primal")
DATASETS = ("digits", "iris", "wine", "breast_cancer")


def load(name):
    """Standardised features and labels of a bundled scikit-learn dataset."""
    import sklearn.datasets as ds

    d = getattr(ds, f"load_{name}")()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(d.target, dtype=torch.long)


def _finite(v):
    # A diverged run (nan loss) must never win the tuning.
    return v if v == v else float("inf")


def full_metrics(w, b, x, y):
    """Full-batch cross-entropy and accuracy of the linear model ``(w, b)``."""
    with torch.no_grad():
        logits = x @ w + b
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


class _LinearModel(torch.nn.Module):
    """The parameters ``w`` and ``b`` as a module, for optimizers built from a model."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)


def train_untuned(method, x, y, epochs, batch, seed):
    """One run of an untuned method of ``UNTUNED``; (training loss, training accuracy) at ``x``."""
    g = torch.Generator().manual_seed(seed)
    k = int(y.max()) + 1
    m = UNTUNED[method]
    model = _LinearModel(torch.zeros(x.shape[1], k), torch.zeros(k))
    opt = m.build(model, {})
    opt.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(x[idx] @ model.w + model.b, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step_with_loss(opt, loss, m)
    opt.eval()
    return full_metrics(model.w, model.b, x, y)


def train(method, x, y, lr, epochs, batch, seed):
    """Train one run; return (training loss, training accuracy) at its output point."""
    if method in UNTUNED:
        return train_untuned(method, x, y, epochs, batch, seed)
    g = torch.Generator().manual_seed(seed)
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    params = [w, b]
    steps_per_epoch = -(-len(y) // batch)
    total = epochs * steps_per_epoch
    if method == "schedulefree":
        opt = sfoptim.SGDScheduleFree(params, lr=lr, momentum=0.9)
        opt.train()
    else:
        opt = torch.optim.SGD(params, lr=lr)
    avg = [p.detach().clone() for p in params]  # the running mean for Polyak / primal
    z = [p.detach().clone() for p in params]    # the SGD iterate for primal averaging
    t = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            if method == "linear":
                for grp in opt.param_groups:
                    grp["lr"] = lr * (1 - t / total)
            loss = F.cross_entropy(x[idx] @ w + b, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t += 1
            if method == "primal":
                with torch.no_grad():
                    for p, zi, ai in zip(params, z, avg):
                        zi.sub_(lr * p.grad)
                        ai.lerp_(zi, 1.0 / (t + 1))  # mean of z_0..z_t
                        p.copy_(ai)                  # next gradient at the mean
                continue
            opt.step()
            if method == "polyak":
                with torch.no_grad():
                    for p, ai in zip(params, avg):
                        ai.lerp_(p, 1.0 / (t + 1))
    if method == "schedulefree":
        opt.eval()
        return full_metrics(w, b, x, y)
    if method in ("polyak", "primal"):
        return full_metrics(avg[0], avg[1], x, y)
    return full_metrics(w, b, x, y)


def main(argv=None):
    """Run the benchmark and write results.json, results.md and convex.png to --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--methods", nargs="+", choices=TUNED + tuple(UNTUNED),
                   help="default: the four SGD variants and the untuned schedule-free optimizers this "
                        "sfoptim has (sf-plus, muon-sf, prodigy-sf)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/convex")
    a = p.parse_args(argv)
    if a.methods is None:
        a.methods = list(TUNED) + [n for n in ("sf-plus", "muon-sf", "prodigy-sf") if UNTUNED[n].available() is None]
    for n in a.methods:
        why = UNTUNED[n].available() if n in UNTUNED else None
        if why is not None:
            p.error(f"argument --methods: {n!r} cannot run here: {why}")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()

    res = {}
    for name in a.datasets:
        x, y = load(name)
        for m in a.methods:
            for lr in ([None] if m in UNTUNED else a.grid):
                res[(name, m, lr)] = [train(m, x, y, lr, a.epochs, a.batch, s) for s in range(a.seeds)]
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    def ms(v):
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    table = {}
    for name in a.datasets:
        for m in a.methods:
            # Tuned for final training loss, the quantity every method minimises.
            grid = [None] if m in UNTUNED else a.grid
            best = min(grid, key=lambda lr: _finite(statistics.fmean(r[0] for r in res[(name, m, lr)])))
            runs = res[(name, m, best)]
            table[(name, m)] = {"lr": best, "edge": best is not None and best in (min(a.grid), max(a.grid)),
                                "loss": ms([r[0] for r in runs]), "acc": ms([r[1] for r in runs]),
                                "grid_loss": {str(lr): statistics.fmean(r[0] for r in res[(name, m, lr)])
                                              for lr in grid}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"args": vars(a), "seconds": time.perf_counter() - t0,
         "results": {f"{n}/{m}": v for (n, m), v in table.items()}}, indent=2))
    head = ["dataset"] + [f"{m}: train acc / loss (lr)" for m in a.methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in a.datasets:
        cells = [name]
        for m in a.methods:
            r = table[(name, m)]
            cells.append(f"{r['acc'][0]:.4f} ± {r['acc'][1]:.4f} / {r['loss'][0]:.3g} ± {r['loss'][1]:.2g} "
                         + (f"({r['lr']:g}{'*' if r['edge'] else ''})" if r["lr"] is not None else "(defaults)"))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (out / "results.md").write_text(
        f"Final training accuracy / loss, mean ± sd over {a.seeds} seeds, batch {a.batch}, {a.epochs} epochs; "
        f"lr tuned per method on {a.grid} for training loss (* = on the grid's edge); "
        f"{', '.join(m for m in a.methods if m in UNTUNED) or 'no method'} run once with defaults, not tuned."
        f"\n\n{md}\n")
    print(md)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table
    fig, axes = plt.subplots(1, len(a.datasets), figsize=(4 * len(a.datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], a.datasets):
        for i, m in enumerate(a.methods):
            if m in UNTUNED:  # one point per dataset, no lr: a horizontal line
                ax.axhline(statistics.fmean(r[0] for r in res[(name, m, None)]), color=f"C{i}", ls=":", label=m)
                continue
            ax.plot(a.grid, [statistics.fmean(r[0] for r in res[(name, m, lr)]) for lr in a.grid],
                    marker="o", color=f"C{i}", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"final training loss (mean of {a.seeds} seeds)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Logistic regression, batch 16: sensitivity to the learning rate")
    fig.tight_layout()
    fig.savefig(out / "convex.png", dpi=110)
    return table


if __name__ == "__main__":
    main()
