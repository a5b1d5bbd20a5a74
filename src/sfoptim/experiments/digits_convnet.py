"""scikit-learn's 8x8 digits with a small ConvNet with BatchNorm.

A task of another kind than the demo's MLP: convolutions, BatchNorm layers
(whose statistics a schedule-free method recomputes at ``x`` before it is
evaluated, see :mod:`sfoptim.batchnorm`) and a small training set (360 of the
1,797 images; the other 1,437 are held out) that a long run overfits.  The data ships with
scikit-learn (the ``demo`` extra); nothing is downloaded.  The methods and the
tuning rule are those of the demo (:mod:`sfoptim.experiments.compare`):
schedule-free AdamW and AdamW + cosine share a grid of learning rates and
weight decays, the untuned optimizers run once with their defaults.
``benchmarks/convnet_digits.py`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim
from sfoptim.experiments import compare
from sfoptim.experiments.compare import STOP_FRACTIONS, Task
from sfoptim.experiments.methods import Method, grid, untuned_schedule_free_methods

__all__ = ["DEFAULT", "DEFAULT_METHODS", "TASK", "ConvNet", "DigitsConfig", "load_digits", "methods", "run_comparison"]

#: Methods run when none are named.
DEFAULT_METHODS = ("sf-adamw", "adamw-cosine", "sf-plus", "muon-sf", "prodigy-sf", "prodigyplus")


@dataclass
class DigitsConfig:
    """Everything that determines a comparison run on the digits task."""

    steps: int = 200
    seeds: tuple = (0, 1, 2)
    batch_size: int = 32
    width: int = 8
    lrs: tuple = (0.004, 0.008, 0.016)
    weight_decays: tuple = (0.01, 0.1)
    sf_warmup: int = 20
    warmup_frac: float = 0.05
    curve_points: int = 20
    # The digits set has 1,797 images; the split is fixed (see load_digits).
    num_samples: int = 1797
    label: str = "default"

    def horizons(self) -> list[int]:
        """The four stopping times T/8, T/4, T/2 and T as step counts."""
        return [max(1, round(self.steps * f)) for f in STOP_FRACTIONS]


DEFAULT = DigitsConfig()


def load_digits(num_samples: int = 1797, seed: int = 0, train_fraction: float = 0.2):
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``, standardised.

    The first ``num_samples`` images of a fixed shuffle; ``train_fraction`` of
    them train, the rest are held out.
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit('the digits task needs scikit-learn: pip install -e ".[demo]"') from exc
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:num_samples]
    x, y = x[perm], y[perm]
    n_train = round(len(y) * train_fraction)
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class ConvNet(nn.Module):
    """Two 3x3 convolutions with BatchNorm, max-pooling, and two linear layers (the first with BatchNorm)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, 64, bias=False)
        self.bn3 = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2).flatten(1)
        return self.head(F.relu(self.bn3(self.fc1(x))))


def _hidden_layer(name: str, module: nn.Module) -> bool:
    """The hidden ``nn.Linear`` (``fc1``): the matrix the Muon methods orthogonalize."""
    return name == "fc1"


TASK = Task("digits", "scikit-learn 8x8 digits, ConvNet with BatchNorm, cross-entropy",
            lambda n: load_digits(n), lambda xtr, cfg: ConvNet(cfg.width))


def methods(cfg: DigitsConfig) -> dict[str, Method]:
    """The method table: ``sf-adamw`` and ``adamw-cosine`` share the grid ``lr`` x ``weight_decay``;
    the untuned schedule-free optimizers (and ``prodigyplus``) run once with their defaults."""
    tuned = grid(lr=cfg.lrs, weight_decay=cfg.weight_decays)

    def adamw(model: nn.Module, c: dict) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])

    def sf_adamw(model: nn.Module, c: dict) -> sfoptim.AdamWScheduleFree:
        return sfoptim.AdamWScheduleFree(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"],
                                         warmup_steps=cfg.sf_warmup)

    table = [
        Method("sf-adamw", "SF AdamW", sf_adamw, tuned, schedule_free=True),
        Method("adamw-cosine", "AdamW + cosine", adamw, tuned, schedule="cosine"),
        *untuned_schedule_free_methods(_hidden_layer),
    ]
    return {m.name: m for m in table}


def run_comparison(cfg: DigitsConfig, progress: Callable[[int], object] | None = None,
                   names: Sequence[str] | None = None) -> dict:
    """Train and evaluate the named methods (default :data:`DEFAULT_METHODS`, those installed)."""
    table = methods(cfg)
    chosen = [table[n] for n in (names or DEFAULT_METHODS) if names or table[n].available() is None]
    return compare.run_comparison(TASK, cfg, chosen, progress)
