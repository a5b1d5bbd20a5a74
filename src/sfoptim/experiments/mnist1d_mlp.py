"""MNIST-1D with a 3-layer MLP: one schedule-free run against schedules tuned per stopping time.

The task of ``sfoptim demo``.  Each method of :func:`demo_methods` is trained
and evaluated at the stopping times T/8, T/4, T/2 and T.  A schedule-free
method is one run per configuration, never told when it stops; a decay
schedule (AdamW with linear warmup and cosine or linear decay) is one run per
configuration *and* stopping time.  Methods compared on equal terms get the
same configurations (the same tuning budget), and every configuration is chosen
by the metric the demo reports, held-out accuracy:

* a schedule-free method picks **one** configuration, the one with the highest
  held-out accuracy averaged over seeds and over the four stopping times;
* a decay schedule picks the configuration with the highest mean held-out
  accuracy **separately for each stopping time**.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim
from sfoptim.experiments.methods import Method, grid, step_with_loss, untuned_schedule_free_methods

__all__ = [
    "DEFAULT", "DEFAULT_METHODS", "QUICK", "STOP_FRACTIONS", "DemoConfig", "demo_methods", "evaluate",
    "load_task", "make_model", "run_comparison", "schedule_factor", "total_steps", "train_method",
    "train_run",
]

#: Fractions of the full horizon at which every method is compared.
STOP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)

#: Methods run when none are named: schedule-free AdamW against tuned cosine,
#: plus every untuned schedule-free optimizer this sfoptim has (sf-plus,
#: muon-sf, prodigy-sf).
DEFAULT_METHODS = ("sf-adamw", "adamw-cosine", "sf-plus", "muon-sf", "prodigy-sf")


@dataclass
class DemoConfig:
    """Everything that determines a comparison run (and so its numbers)."""

    steps: int = 2000
    seeds: tuple = (0, 1, 2)
    batch_size: int = 128
    hidden: int = 256
    # The tuning grid shared by schedule-free AdamW and the decay schedules.
    # A one-seed sweep over a wider range (lr 0.004..0.064) had its best
    # held-out accuracy inside this one.
    lrs: tuple = (0.008, 0.016, 0.032)
    weight_decays: tuple = (0.1, 1.0)
    sf_warmup: int = 50
    # The schedule-free rate of train_run's "schedulefree" method, which
    # benchmarks/precision.py runs; the demo itself tunes over ``lrs``.
    sf_lr: float = 0.008
    warmup_frac: float = 0.05
    curve_points: int = 40
    threads: int = 1
    num_samples: int = 5000
    label: str = "default"

    def horizons(self):
        """The four stopping times T/8, T/4, T/2, T as step counts."""
        return [max(1, round(self.steps * f)) for f in STOP_FRACTIONS]


DEFAULT = DemoConfig()
QUICK = DemoConfig(
    steps=400,
    seeds=(0,),
    lrs=(0.016, 0.032),
    weight_decays=(1.0,),
    sf_warmup=20,
    curve_points=20,
    num_samples=2500,
    label="quick",
)


def _hidden_layer(name: str, module: nn.Module) -> bool:
    """The MLP's hidden-to-hidden layer (``make_model``'s second ``nn.Linear``)."""
    return name == "2"


def demo_methods(cfg: DemoConfig) -> dict[str, Method]:
    """The demo's method table, by name.

    ``sf-adamw``, ``adamw-cosine`` and ``adamw-linear`` share the grid
    ``lr`` in ``cfg.lrs`` x ``weight_decay`` in ``cfg.weight_decays``
    (AdamW's decoupled weight decay, betas (0.9, 0.999)); the decay schedules
    warm up linearly over ``cfg.warmup_frac`` of each run, schedule-free AdamW
    over ``cfg.sf_warmup`` steps.  The untuned schedule-free optimizers run
    once with their defaults.
    """
    tuned = grid(lr=cfg.lrs, weight_decay=cfg.weight_decays)

    def adamw(model, c):
        return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])

    def sf_adamw(model, c):
        return sfoptim.AdamWScheduleFree(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"],
                                         warmup_steps=cfg.sf_warmup)

    table = [
        Method("sf-adamw", "SF AdamW", sf_adamw, tuned, schedule_free=True),
        Method("adamw-cosine", "AdamW + cosine", adamw, tuned, schedule="cosine"),
        Method("adamw-linear", "AdamW + linear", adamw, tuned, schedule="linear"),
        *untuned_schedule_free_methods(_hidden_layer),
    ]
    return {m.name: m for m in table}


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


def train_method(task, cfg: DemoConfig, seed: int, method: Method, config: dict, horizon: int,
                 eval_steps, progress=None, dtype=torch.float32):
    """Train one run of ``method`` with hyperparameters ``config``; return
    ``{step: (train_loss, test_acc)}`` at ``eval_steps``.

    A method with a decay schedule warms up over ``cfg.warmup_frac`` of
    ``horizon`` and decays to zero there; any other method only stops at
    ``horizon``.  Schedule-free methods are evaluated after
    ``optimizer.eval()`` (at their averaged point ``x``).  ``progress``, when
    given, is called with 1 after every step; ``dtype`` is the model's (and the
    inputs') dtype.
    """
    xtr, ytr = task[0], task[1]
    torch.manual_seed(seed)
    # Initialise in float32 and then cast, so every dtype starts from the same
    # (rounded) weights for a given seed.
    model = make_model(xtr.shape[1], cfg.hidden).to(dtype)
    xtr = xtr.to(dtype)
    order = _batch_order(len(xtr), horizon, cfg.batch_size, seed)
    opt = method.build(model, config)
    if method.schedule_free:
        opt.train()
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
            out[step + 1] = evaluate(model, task)
            if method.schedule_free:
                opt.train()
    return out


def train_run(task, cfg: DemoConfig, seed: int, method: str, lr: float,
              horizon: int, eval_steps, progress=None, dtype=torch.float32, opt_kwargs=None):
    """Train one run without weight decay; return ``{step: (train_loss, test_acc)}`` at ``eval_steps``.

    ``method`` is ``"schedulefree"`` (schedule-free AdamW with
    ``cfg.sf_warmup`` warmup steps, never told ``horizon``), ``"cosine"`` or
    ``"linear"`` (AdamW, warmup then decay to zero at ``horizon``).
    ``opt_kwargs`` are extra keyword arguments for the schedule-free optimizer
    (e.g. ``state_dtype``); ``benchmarks/precision.py`` uses them with
    ``dtype`` to run this task in bfloat16.
    """
    if method == "schedulefree":
        m = Method("schedulefree", "SF AdamW", lambda model, c: sfoptim.AdamWScheduleFree(
            model.parameters(), lr=c["lr"], warmup_steps=cfg.sf_warmup, **(opt_kwargs or {})), schedule_free=True)
    elif opt_kwargs:
        raise ValueError("opt_kwargs applies to the schedule-free run only")
    elif method in ("cosine", "linear"):
        m = Method(method, f"AdamW + {method}", lambda model, c: torch.optim.AdamW(
            model.parameters(), lr=c["lr"], weight_decay=0.0), schedule=method)
    else:
        raise ValueError(f"unknown method {method!r}")
    return train_method(task, cfg, seed, m, {"lr": lr}, horizon, eval_steps, progress, dtype)


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------

def _mean_sd(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def total_steps(cfg: DemoConfig, methods: Sequence[Method]) -> int:
    """Training steps that :func:`run_comparison` takes in all (for a progress bar)."""
    per_config = {m.name: (sum(cfg.horizons()) if m.schedule else cfg.steps) for m in methods}
    return len(cfg.seeds) * sum(len(m.grid) * per_config[m.name] for m in methods)


def _on_edge(config: dict, configs) -> list[str]:
    """The hyperparameters of ``config`` at an end of their range in ``configs``
    (only for ranges of three or more values, where an end means something)."""
    out = []
    for k, v in config.items():
        values = sorted({c[k] for c in configs})
        if len(values) >= 3 and v in (values[0], values[-1]):
            out.append(k)
    return out


def run_comparison(cfg: DemoConfig, progress: Callable[[int], object] | None = None,
                   methods: Sequence[Method] | None = None) -> dict:
    """Run every training run of the comparison and return a JSON-ready result dict.

    ``methods`` defaults to the available ones of :data:`DEFAULT_METHODS`.
    ``rows`` holds, per stopping time and method, the training loss and
    held-out accuracy (mean, sd over seeds) of the chosen configuration (see
    the module's docstring for the rule), the configuration, and every
    configuration's mean accuracy.  ``curves`` holds each one-run method's
    per-seed training loss and accuracy over the run at its chosen
    configuration.  ``progress`` is called with 1 after every training step.
    """
    if methods is None:
        table = demo_methods(cfg)
        methods = [table[n] for n in DEFAULT_METHODS if table[n].available() is None]
    task = load_task(cfg.num_samples)
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
                        h: train_method(task, cfg, seed, m, config, h, [h], progress)[h] for h in horizons}
                else:
                    runs[m.name][i][seed] = train_method(task, cfg, seed, m, config, T, curve, progress)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0

    def mean_acc(name, i, steps):
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
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "task": "MNIST-1D (mnist1d generator, offline), 3-layer MLP, cross-entropy",
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
