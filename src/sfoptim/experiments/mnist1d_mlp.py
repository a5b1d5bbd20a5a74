"""MNIST-1D with a 3-layer MLP: one schedule-free run against schedules tuned per stopping time.

The task of ``sfoptim demo``.  A *single* schedule-free AdamW run, evaluated at
the stopping times T/8, T/4, T/2 and T, is compared with AdamW with linear
warmup and cosine (and linear) decay whose learning rate is tuned on a small
grid separately for each stopping time.  Every baseline run knows its stopping
time in advance; the schedule-free run does not.

The data is generated offline by the ``mnist1d`` package (the ``demo`` extra).
Within a seed every method starts from the same weights and sees the same
minibatches, so differences between methods come from the optimizer.
``benchmarks/precision.py`` reuses :func:`train_run` to run the schedule-free
setting in bfloat16.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim

__all__ = [
    "DEFAULT", "QUICK", "STOP_FRACTIONS", "DemoConfig", "evaluate", "load_task", "make_model",
    "run_comparison", "schedule_factor", "total_steps", "train_run",
]

#: Fractions of the full horizon at which every method is compared.
STOP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


@dataclass
class DemoConfig:
    """Everything that determines a comparison run (and so its numbers)."""

    steps: int = 2000
    seeds: tuple = (0, 1, 2)
    batch_size: int = 128
    hidden: int = 256
    sf_lr: float = 0.008
    sf_warmup: int = 50
    # The schedule-free rate is fixed in advance, not picked from a sweep.  The
    # baseline grid brackets the cosine optimum of a wider one-seed sweep
    # (0.004..0.064: 0.016 won at every horizon); the report flags any optimum
    # on the grid's edge.
    grid: tuple = (0.008, 0.016, 0.032)
    warmup_frac: float = 0.05
    linear_decay: bool = True
    curve_points: int = 40
    threads: int = 1
    num_samples: int = 5000
    label: str = "default"

    def horizons(self):
        """The four stopping times T/8, T/4, T/2, T as step counts."""
        return [max(1, round(self.steps * f)) for f in STOP_FRACTIONS]

    def baselines(self):
        """The decay schedules compared against: cosine, and linear unless disabled."""
        return ["cosine"] + (["linear"] if self.linear_decay else [])


DEFAULT = DemoConfig()
QUICK = DemoConfig(
    steps=400,
    seeds=(0,),
    grid=(0.008, 0.016, 0.032),
    sf_warmup=20,
    curve_points=20,
    num_samples=2500,
    label="quick",
)


# ---------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------

def load_task(num_samples: int = 5000, seed: int = 42):
    """Generate MNIST-1D offline and return ``(x_train, y_train, x_test, y_test)``.

    ``mnist1d.data.get_dataset`` would try to download the canonical pickle, so
    the generator is called directly; it is deterministic given ``seed``.
    Raises ``SystemExit`` with an install hint when ``mnist1d`` is missing.
    """
    try:
        import numpy as np
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the MNIST-1D task needs the 'mnist1d' package to generate its data offline: "
            'pip install -e ".[demo]" in a clone of the repository'
        ) from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds NumPy's global generator; restore it so importing the
    # task from a user's program does not change their random stream.
    state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    as_t = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return (
        as_t(data["x"], torch.float32),
        as_t(data["y"], torch.long),
        as_t(data["x_test"], torch.float32),
        as_t(data["y_test"], torch.long),
    )


def make_model(in_dim: int, hidden: int, classes: int = 10) -> nn.Module:
    """The task's 3-layer MLP."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


# ---------------------------------------------------------------------------
# Schedules and training
# ---------------------------------------------------------------------------

def schedule_factor(kind: str, step: int, horizon: int, warmup: int) -> float:
    """Learning-rate multiplier for ``step`` (0-based) of a run of ``horizon`` steps.

    ``kind`` is ``"cosine"`` or ``"linear"``; both warm up linearly for
    ``warmup`` steps and then decay to zero exactly at the horizon.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup + 1) / max(1, horizon - warmup)
    progress = min(1.0, progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {kind!r}")


@torch.no_grad()
def evaluate(model, task):
    """Training loss over the whole training set and held-out accuracy."""
    xtr, ytr, xte, yte = task
    # Inputs follow the model's dtype (float32 for the demo; bfloat16 in
    # benchmarks/precision.py); the loss is taken in float32 either way.  For a
    # float32 model both casts return the tensor itself.
    dtype = next(model.parameters()).dtype
    model.eval()
    loss = F.cross_entropy(model(xtr.to(dtype)).float(), ytr).item()
    acc = (model(xte.to(dtype)).argmax(1) == yte).float().mean().item()
    model.train()
    return loss, acc


def _batch_order(n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Minibatch indices shared by every method for a given seed.

    Sharing the data order (and the initialisation) means differences between
    methods come from the optimizer, not from luck in the sampling.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    idx = torch.cat([torch.randperm(n, generator=g)[: per_epoch * batch] for _ in range(epochs)])
    return idx.view(-1, batch)[:steps]


def train_run(task, cfg: DemoConfig, seed: int, method: str, lr: float,
              horizon: int, eval_steps, progress=None, dtype=torch.float32, opt_kwargs=None):
    """Train one run and return ``{step: (train_loss, test_acc)}`` at ``eval_steps``.

    ``method`` is ``"schedulefree"`` (never told ``horizon``; it only stops
    there), ``"cosine"`` or ``"linear"`` (warmup then decay to zero at
    ``horizon``).  ``progress``, when given, is called with 1 after every step.
    ``dtype`` is the model's (and the inputs') dtype and ``opt_kwargs`` are
    extra keyword arguments for the schedule-free optimizer (e.g.
    ``state_dtype``); ``benchmarks/precision.py`` uses both to run this exact
    task in bfloat16.  The defaults are what ``sfoptim demo`` runs.
    """
    xtr, ytr = task[0], task[1]
    torch.manual_seed(seed)
    # Initialise in float32 and then cast, so every dtype starts from the same
    # (rounded) weights for a given seed.
    model = make_model(xtr.shape[1], cfg.hidden).to(dtype)
    xtr = xtr.to(dtype)
    order = _batch_order(len(xtr), horizon, cfg.batch_size, seed)
    opt: torch.optim.Optimizer
    sf_opt = None  # the schedule-free optimizer, which has train()/eval()
    if method == "schedulefree":
        opt = sf_opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=lr, warmup_steps=cfg.sf_warmup,
                                                 **(opt_kwargs or {}))
        sf_opt.train()
    elif opt_kwargs:
        raise ValueError("opt_kwargs applies to the schedule-free run only")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, round(cfg.warmup_frac * horizon))
    wanted = set(eval_steps)
    out = {}
    for step in range(horizon):
        if method != "schedulefree":
            for group in opt.param_groups:
                group["lr"] = lr * schedule_factor(method, step, horizon, warmup)
        idx = order[step]
        loss = F.cross_entropy(model(xtr[idx]).float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
        if step + 1 in wanted:
            if sf_opt is not None:
                sf_opt.eval()  # parameters now hold the averaged point x
            out[step + 1] = evaluate(model, task)
            if sf_opt is not None:
                sf_opt.train()
    return out


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------

def _mean_sd(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def total_steps(cfg: DemoConfig) -> int:
    """Training steps that :func:`run_comparison` takes in all (for a progress bar)."""
    return len(cfg.seeds) * (cfg.steps + len(cfg.baselines()) * len(cfg.grid) * sum(cfg.horizons()))


def run_comparison(cfg: DemoConfig, progress: Callable[[int], object] | None = None) -> dict:
    """Run every training run of the comparison and return a JSON-ready result dict.

    ``rows`` holds, per stopping time, the schedule-free run's training loss and
    held-out accuracy (mean, sd over seeds) and, per baseline, those of the
    learning rate on ``cfg.grid`` with the lowest mean training loss at that
    stopping time, the ratio of means (schedule-free / baseline) and the
    per-seed ratios.  ``progress`` is called with 1 after every training step.
    """
    task = load_task(cfg.num_samples)
    horizons = cfg.horizons()
    T = cfg.steps
    baselines = cfg.baselines()
    curve = sorted({max(1, round(T * i / cfg.curve_points)) for i in range(1, cfg.curve_points + 1)} | set(horizons))
    t0, c0 = time.perf_counter(), time.process_time()

    sf: dict[int, dict[int, tuple[float, float]]] = {}  # seed -> {step: (loss, acc)}
    # baseline -> horizon -> lr -> seed -> (loss, acc)
    base: dict[str, dict[int, dict[float, dict[int, tuple[float, float]]]]] = {
        b: {h: {lr: {} for lr in cfg.grid} for h in horizons} for b in baselines}
    for seed in cfg.seeds:
        sf[seed] = train_run(task, cfg, seed, "schedulefree", cfg.sf_lr, T, curve, progress)
        for b in baselines:
            for h in horizons:
                for lr in cfg.grid:
                    base[b][h][lr][seed] = train_run(task, cfg, seed, b, lr, h, [h], progress)[h]
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0

    rows = []
    for h in horizons:
        row = {"steps": h}
        losses = [sf[s][h][0] for s in cfg.seeds]
        accs = [sf[s][h][1] for s in cfg.seeds]
        row["schedulefree"] = {"lr": cfg.sf_lr, "loss": _mean_sd(losses), "acc": _mean_sd(accs)}
        for b in baselines:
            # Tuning picks the learning rate with the lowest mean training loss
            # over seeds, as a practitioner tuning this one horizon would.
            best_lr = min(cfg.grid, key=lambda lr: statistics.fmean(base[b][h][lr][s][0] for s in cfg.seeds))
            bl = [base[b][h][best_lr][s][0] for s in cfg.seeds]
            ba = [base[b][h][best_lr][s][1] for s in cfg.seeds]
            row[b] = {
                "lr": best_lr,
                "lr_on_grid_edge": best_lr in (min(cfg.grid), max(cfg.grid)),
                "loss": _mean_sd(bl),
                "acc": _mean_sd(ba),
                "grid_loss": {str(lr): statistics.fmean(base[b][h][lr][s][0] for s in cfg.seeds) for lr in cfg.grid},
            }
            # Ratio of means, and the per-seed ratios behind it, so a reader can
            # see whether one seed carries the result.
            row[b]["ratio"] = statistics.fmean(losses) / statistics.fmean(bl)
            row[b]["ratio_per_seed"] = [loss / c for loss, c in zip(losses, bl)]
        rows.append(row)

    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "task": "MNIST-1D (mnist1d generator, offline), 3-layer MLP, cross-entropy",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "rows": rows,
        "schedulefree_curve": {
            "steps": curve,
            "loss": [[sf[s][t][0] for t in curve] for s in cfg.seeds],
            "acc": [[sf[s][t][1] for t in curve] for s in cfg.seeds],
        },
    }
