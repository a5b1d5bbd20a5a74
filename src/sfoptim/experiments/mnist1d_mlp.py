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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

import sfoptim
from sfoptim.experiments import compare
from sfoptim.experiments.compare import STOP_FRACTIONS, Task, evaluate, schedule_factor, total_steps
from sfoptim.experiments.methods import Method, grid, untuned_schedule_free_methods

__all__ = [
    "DEFAULT", "DEFAULT_METHODS", "QUICK", "STOP_FRACTIONS", "DemoConfig", "demo_methods", "evaluate",
    "load_task", "make_model", "run_comparison", "schedule_factor", "total_steps", "train_method",
    "train_run", "TASK",
]

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
    once with their defaults.  ``sf-adamw-bf16state`` and ``sf-adamw-8bit``
    are ``sf-adamw`` (same grid) with its state stored in bfloat16 and in 8
    bits (``state_precision``).
    """
    tuned = grid(lr=cfg.lrs, weight_decay=cfg.weight_decays)

    def adamw(model, c):
        return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])

    def sf_adamw(model, c, precision="full"):
        return sfoptim.AdamWScheduleFree(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"],
                                         warmup_steps=cfg.sf_warmup, state_precision=precision)

    table = [
        Method("sf-adamw", "SF AdamW", sf_adamw, tuned, schedule_free=True),
        Method("adamw-cosine", "AdamW + cosine", adamw, tuned, schedule="cosine"),
        Method("adamw-linear", "AdamW + linear", adamw, tuned, schedule="linear"),
        *untuned_schedule_free_methods(_hidden_layer),
        Method("sf-adamw-bf16state", "SF AdamW, bfloat16 state", lambda m, c: sf_adamw(m, c, "bf16"), tuned,
               schedule_free=True),
        Method("sf-adamw-8bit", "SF AdamW, 8-bit state", lambda m, c: sf_adamw(m, c, "8bit"), tuned,
               schedule_free=True),
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
# Training and the comparison (the loop is shared with the other tasks)
# ---------------------------------------------------------------------------

def _make_task_model(xtr: torch.Tensor, cfg: DemoConfig) -> nn.Module:
    return make_model(xtr.shape[1], cfg.hidden)


#: The task as :mod:`sfoptim.experiments.compare` runs it.
TASK = Task("mnist1d", "MNIST-1D (mnist1d generator, offline), 3-layer MLP, cross-entropy",
            lambda n: load_task(n), _make_task_model)


def train_method(task, cfg: DemoConfig, seed: int, method: Method, config: dict, horizon: int,
                 eval_steps, progress=None, dtype=torch.float32):
    """Train one run of ``method`` on the data ``task`` (from :func:`load_task`) with
    hyperparameters ``config``; return ``{step: (train_loss, test_acc)}`` at ``eval_steps``
    (:func:`sfoptim.experiments.compare.train_method`)."""
    return compare.train_method(TASK, task, cfg, seed, method, config, horizon, eval_steps, progress, dtype)


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


def run_comparison(cfg: DemoConfig, progress: Callable[[int], object] | None = None,
                   methods: Sequence[Method] | None = None) -> dict:
    """The demo's comparison (:func:`sfoptim.experiments.compare.run_comparison` on this task).

    ``methods`` defaults to the available ones of :data:`DEFAULT_METHODS`.
    """
    if methods is None:
        table = demo_methods(cfg)
        methods = [table[n] for n in DEFAULT_METHODS if table[n].available() is None]
    return compare.run_comparison(TASK, cfg, methods, progress)
