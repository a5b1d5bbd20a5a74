"""BatchNorm and schedule-free: held-out accuracy at ``x`` with and without
recomputing BatchNorm statistics.

A schedule-free optimizer takes gradients at ``y`` but returns the average
``x``.  BatchNorm's running statistics are accumulated during training forward
passes, i.e. at ``y``, so after ``optimizer.eval()`` the network evaluates ``x``
with statistics that belong to other weights.  This script measures how much
that costs on a small BatchNorm CNN trained with schedule-free AdamW on
scikit-learn's 8x8 digits: accuracy at ``x`` with the running statistics as
they are, and after recomputing them at ``x`` with a few no-grad forward passes
over training batches (by hand, and with ``sfoptim.recalibrate_batchnorm``
when the installed sfoptim has it).

Example:
  python benchmarks/batchnorm.py --out out/batchnorm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim


def load_digits(seed=0):
    """Digits as (x_train, y_train, x_test, y_test), a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk

    d = sk()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(y) // 5
    return x[n:], y[n:], x[:n], y[:n]


def make_cnn():
    """Small CNN for 8x8 inputs with BatchNorm after every hidden layer."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )


@torch.no_grad()
def accuracy(model, x, y):
    """Held-out accuracy in eval mode (running BatchNorm statistics)."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def recompute_bn(model, x, batch, batches, seed):
    """Replace running statistics by their average over ``batches`` training
    batches at the current weights (cumulative average: momentum=None)."""
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.reset_running_stats()
            m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    for i in range(batches):
        model(x[perm[(i * batch) % len(x):][:batch]])
    for m, mom in saved.items():
        m.momentum = mom
    model.eval()


def run(a, seed, beta, data):
    """Train one seed; return ``{epoch: (stale, recomputed, library)}`` accuracies."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_cnn()
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=a.lr, betas=(beta, 0.999), warmup_steps=a.warmup)
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for epoch in range(1, a.epochs + 1):
        model.train()
        opt.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm) - a.batch + 1, a.batch):
            idx = perm[i:i + a.batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch in a.report:
            # Keep the training-time statistics intact for the next epoch: measure
            # on a copy so recomputing does not leak into training.
            opt.eval()
            stale = accuracy(model, xte, yte)
            probe = __import__("copy").deepcopy(model)
            recompute_bn(probe, xtr, a.batch, a.bn_batches, seed)
            fresh = accuracy(probe, xte, yte)
            lib = float("nan")
            if hasattr(sfoptim, "recalibrate_batchnorm"):
                # The library utility, fed the same training batches, as a check
                # that it gives what the hand-written recomputation gives.
                probe = __import__("copy").deepcopy(model)
                gen = torch.Generator().manual_seed(seed)
                perm = torch.randperm(len(xtr), generator=gen)
                batches = [xtr[perm[(i * a.batch) % len(xtr):][:a.batch]] for i in range(a.bn_batches)]
                sfoptim.recalibrate_batchnorm(probe, batches, num_batches=a.bn_batches)
                lib = accuracy(probe, xte, yte)
            out[epoch] = (stale, fresh, lib)
    return out


def main(argv=None):
    """Run the benchmark and write results.json, results.md and batchnorm.png to --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--report", type=int, nargs="+", default=[1, 2, 5, 10], help="epochs to measure at")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--betas", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bn-batches", type=int, default=20, help="training batches used to recompute statistics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/batchnorm")
    a = p.parse_args(argv)
    a.report = sorted(e for e in set(a.report) if e <= a.epochs) or [a.epochs]
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    data = load_digits()
    res = {b: [run(a, s, b, data) for s in range(a.seeds)] for b in a.betas}
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def ms(v):
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    rows = []
    for b in a.betas:
        for e in a.report:
            stale = ms([r[e][0] for r in res[b]])
            fresh = ms([r[e][1] for r in res[b]])
            lib = ms([r[e][2] for r in res[b]])
            rows.append({"beta1": b, "epoch": e, "x_stale_bn": stale, "x_recomputed_bn": fresh,
                         "x_recalibrate_batchnorm": lib})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows,
                                                  "seconds": time.perf_counter() - t0}, indent=2))
    f = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"  # noqa: E731
    lines = ["| β1 | epoch | held-out acc at x, BN stats from training | at x, BN stats recomputed at x "
             "| at x, sfoptim.recalibrate_batchnorm |", "|---|---|---|---|---|"]
    lines += [f"| {r['beta1']} | {r['epoch']} | {f(r['x_stale_bn'])} | {f(r['x_recomputed_bn'])} "
              f"| {f(r['x_recalibrate_batchnorm'])} |" for r in rows]
    md = "\n".join(lines)
    (out / "results.md").write_text(f"Digits, BatchNorm CNN, schedule-free AdamW lr {a.lr}, "
                                    f"{a.seeds} seeds (mean ± sd).\n\n{md}\n")
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, b in enumerate(a.betas):
        rs = [r for r in rows if r["beta1"] == b]
        for key, ls, lab in (("x_stale_bn", "--", "training-time BN stats"), ("x_recomputed_bn", "-", "BN stats recomputed at x")):
            ax.errorbar([r["epoch"] for r in rs], [r[key][0] for r in rs], yerr=[r[key][1] for r in rs],
                        color=f"C{i}", ls=ls, marker="o", capsize=3, label=f"β1={b}, {lab}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy at x")
    ax.set_title("BatchNorm CNN on digits, schedule-free AdamW")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batchnorm.png", dpi=110)
    return rows


if __name__ == "__main__":
    main()
