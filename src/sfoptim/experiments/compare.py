"""One comparison loop for every classification task: methods evaluated at four stopping times.

A :class:`Task` says how to load the data, build the model and evaluate it.
:func:`run_comparison` trains every method of a table on it and chooses each
method's configuration by held-out accuracy:

* a method without a schedule is one run per configuration, never told when it
  stops, evaluated at every stopping time; it keeps **one** configuration, the
  one with the best held-out accuracy averaged over seeds and stopping times;
* a decay schedule (warmup, then cosine or linear decay to zero at the
  stopping time) is one run per configuration *and* stopping time, and picks
  its best configuration **separately for each stopping time**.

Within a seed every method starts from the same weights and sees the same
minibatches, so differences come from the optimizer.  Schedule-free methods are
evaluated at ``x`` (after ``optimizer.eval()``); a task with BatchNorm layers
recomputes their statistics there first (:func:`sfoptim.recalibrate_batchnorm`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfoptim.batchnorm import recalibrate_batchnorm
from sfoptim.experiments.methods import Method, step_with_loss

__all__ = [
    "STOP_FRACTIONS", "ComparisonConfig", "Task", "batch_order", "run_comparison", "schedule_factor",
    "total_steps", "train_method",
]

#: Fractions of the full horizon at which every method is compared.
STOP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)

#: ``(x_train, y_train, x_test, y_test)``.
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class ComparisonConfig(Protocol):
    """What :func:`run_comparison` reads of a task's configuration (a dataclass)."""

    steps: int
    seeds: tuple
    batch_size: int
    warmup_frac: float
    curve_points: int
    num_samples: int

    def horizons(self) -> list[int]: ...


@dataclass(frozen=True)
class Task:
    """A classification task: data, model and metrics.

    ``load(num_samples)`` returns ``(x_train, y_train, x_test, y_test)``;
    ``make_model(x_train, cfg)`` builds a freshly initialised model (the
    caller seeds torch's generator); ``description`` names the task in result
    files.  Models with BatchNorm layers get their statistics recomputed at
    ``x`` before a schedule-free method is evaluated.
    """

    name: str
    description: str
    load: Callable[[int], Data]
    make_model: Callable[[torch.Tensor, Any], nn.Module]


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
def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """Training loss over the whole training set and held-out accuracy.

    Inputs follow the model's dtype; the loss is taken in float32 either way.
    """
    xtr, ytr, xte, yte = data
    dtype = next(model.parameters()).dtype
    model.eval()
    loss = F.cross_entropy(model(xtr.to(dtype)).float(), ytr).item()
    acc = (model(xte.to(dtype)).argmax(1) == yte).float().mean().item()
    model.train()
    return loss, acc


def batch_order(n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Minibatch indices shared by every method for a given seed (``steps`` rows of ``batch``)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    idx = torch.cat([torch.randperm(n, generator=g)[: per_epoch * batch] for _ in range(epochs)])
    return idx.view(-1, batch)[:steps]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_method(task: Task, data: Data, cfg: ComparisonConfig, seed: int, method: Method, config: dict,
                 horizon: int, eval_steps: Sequence[int], progress: Callable[[int], object] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[int, tuple[float, float]]:
    """Train one run of ``method`` with hyperparameters ``config``; return
    ``{step: (train_loss, test_acc)}`` at ``eval_steps``.

    A method with a decay schedule warms up over ``cfg.warmup_frac`` of
    ``horizon`` and decays to zero there; any other method only stops at
    ``horizon``.  ``progress``, when given, is called with 1 after every step;
    ``dtype`` is the model's (and the inputs') dtype.
    """
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    # Initialise in float32 and then cast, so every dtype starts from the same
    # (rounded) weights for a given seed.
    model = task.make_model(xtr, cfg).to(dtype)
    xtr = xtr.to(dtype)
    order = batch_order(len(xtr), horizon, cfg.batch_size, seed)
    opt = method.build(model, config)
    if method.schedule_free:
        opt.train()
    recalibrate = method.schedule_free and _has_batchnorm(model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, round(cfg.warmup_frac * horizon))
    wanted = set(eval_steps)
    out = {}
    for step in range(horizon):
        if method.schedule is not None:
            f = schedule_factor(method.schedule, step, horizon, warmup)
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * f
        idx = order[step]
        loss = F.cross_entropy(model(xtr[idx]).float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_with_loss(opt, loss, method)
        if progress is not None:
            progress(1)
        if step + 1 in wanted:
            if method.schedule_free:
                opt.eval()  # parameters now hold the averaged point x
                if recalibrate:
                    recalibrate_batchnorm(model, (xtr[i] for i in order[: step + 1].flip(0)), num_batches=20)
            out[step + 1] = evaluate(model, data)
            if method.schedule_free:
                opt.train()
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def total_steps(cfg: ComparisonConfig, methods: Sequence[Method]) -> int:
    """Training steps that :func:`run_comparison` takes in all (for a progress bar)."""
    per_config = {m.name: (sum(cfg.horizons()) if m.schedule else cfg.steps) for m in methods}
    return len(cfg.seeds) * sum(len(m.grid) * per_config[m.name] for m in methods)


def _on_edge(config: dict, configs: Sequence[dict]) -> list[str]:
    """The hyperparameters of ``config`` at an end of their range in ``configs``
    (only for ranges of three or more values, where an end means something)."""
    out = []
    for k, v in config.items():
        values = sorted({c[k] for c in configs})
        if len(values) >= 3 and v in (values[0], values[-1]):
            out.append(k)
    return out


def run_comparison(task: Task, cfg: ComparisonConfig, methods: Sequence[Method],
                   progress: Callable[[int], object] | None = None) -> dict:
    """Run every training run of the comparison and return a JSON-ready result dict.

    ``rows`` holds, per stopping time and method, the training loss and
    held-out accuracy (mean, sd over seeds) of the chosen configuration (see
    the module's docstring for the rule), the configuration, and every
    configuration's mean accuracy.  ``curves`` holds each one-run method's
    per-seed training loss and accuracy over the run at its chosen
    configuration.  ``progress`` is called with 1 after every training step.
    """
    data = task.load(cfg.num_samples)
    horizons = cfg.horizons()
    T = cfg.steps
    curve = sorted({max(1, round(T * i / cfg.curve_points)) for i in range(1, cfg.curve_points + 1)} | set(horizons))
    t0, c0 = time.perf_counter(), time.process_time()

    # runs[name][config index][seed] = {step: (loss, acc)}
    runs: dict[str, list[dict[int, dict[int, tuple[float, float]]]]] = {
        m.name: [{} for _ in m.grid] for m in methods}
    for seed in cfg.seeds:
        for m in methods:
            for i, config in enumerate(m.grid):
                if m.schedule:
                    runs[m.name][i][seed] = {
                        h: train_method(task, data, cfg, seed, m, config, h, [h], progress)[h] for h in horizons}
                else:
                    runs[m.name][i][seed] = train_method(task, data, cfg, seed, m, config, T, curve, progress)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0

    def mean_acc(name: str, i: int, steps: Sequence[int]) -> float:
        return statistics.fmean(runs[name][i][s][h][1] for s in cfg.seeds for h in steps)

    chosen = {}  # name -> {horizon: config index}
    for m in methods:
        if m.schedule:
            chosen[m.name] = {h: max(range(len(m.grid)), key=lambda i: mean_acc(m.name, i, [h])) for h in horizons}
        else:
            best = max(range(len(m.grid)), key=lambda i: mean_acc(m.name, i, horizons))
            chosen[m.name] = dict.fromkeys(horizons, best)

    reference = "adamw-cosine" if "adamw-cosine" in runs else None
    rows = []
    for h in horizons:
        row: dict = {"steps": h}
        for m in methods:
            i = chosen[m.name][h]
            row[m.name] = {
                "config": m.grid[i],
                "on_grid_edge": _on_edge(m.grid[i], m.grid),
                "loss": _mean_sd([runs[m.name][i][s][h][0] for s in cfg.seeds]),
                "acc": _mean_sd([runs[m.name][i][s][h][1] for s in cfg.seeds]),
                "grid_acc": [mean_acc(m.name, j, [h]) for j in range(len(m.grid))],
            }
        if reference:
            for m in methods:
                row[m.name]["loss_ratio"] = row[m.name]["loss"][0] / row[reference]["loss"][0]
                row[m.name]["acc_diff"] = row[m.name]["acc"][0] - row[reference]["acc"][0]
        rows.append(row)

    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},  # type: ignore[call-overload]
        "task": task.description,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "reference": reference,
        "methods": {m.name: {"label": m.label, "tuning": m.tuning(), "schedule": m.schedule,
                             "schedule_free": m.schedule_free, "grid": list(m.grid)} for m in methods},
        "rows": rows,
        "curves": {
            m.name: {
                "steps": curve,
                "loss": [[runs[m.name][chosen[m.name][T]][s][t][0] for t in curve] for s in cfg.seeds],
                "acc": [[runs[m.name][chosen[m.name][T]][s][t][1] for t in curve] for s in cfg.seeds],
            }
            for m in methods if not m.schedule
        },
    }
