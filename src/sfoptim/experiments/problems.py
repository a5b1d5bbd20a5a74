"""Tiny deterministic problems for comparing optimizers step by step.

A small MLP regresses a noisy teacher; :func:`run_pair` trains two copies of it
side by side with two optimizers and reports how far apart they drift.  The
parity tests and ``benchmarks/parity_report.py`` use it to compare sfoptim with
the published ``schedulefree`` package.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["loss_fn", "make_batches", "make_model", "rel_diff", "run_pair", "two_groups"]


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A small MLP with a bias-free layer, so groups differ in shape and count."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def make_batches(n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 32 inputs and targets ``sin(x @ teacher) + 0.1 * noise``."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), (torch.sin(x @ teacher) + 0.1 * torch.randn(32, 3, generator=g, dtype=torch.float64)).to(dtype)))
    return out


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``model`` on ``batch``."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ||a-b|| / max(||b||, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def two_groups(model: torch.nn.Module, **second: float) -> list[dict]:
    """Weights in one group, biases in another with its own hyperparameters."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, **second}]


def run_pair(
    build_ours: Callable[[Any], Any],
    build_theirs: Callable[[Any], Any],
    dtype: torch.dtype,
    *,
    groups: Callable[[torch.nn.Module], Any] = lambda m: m.parameters(),
    scheduler: bool = False,
    eval_every: int = 50,
    steps: int = 200,
) -> float:
    """Trains twin models side by side; returns the worst relative difference seen.

    Both start from the same weights and see the same ``steps`` batches.  The
    parameters are compared after every step (at ``y``) and every
    ``eval_every`` steps after ``eval()`` (at ``x``).  With ``scheduler`` a
    ``StepLR`` (halving every 40 steps) drives each optimizer (a wrapper's
    ``base``).
    """
    ours_model = make_model(dtype)
    theirs_model = copy.deepcopy(ours_model)
    ours, theirs = build_ours(groups(ours_model)), build_theirs(groups(theirs_model))
    scheds = []
    if scheduler:
        scheds = [torch.optim.lr_scheduler.StepLR(o if not hasattr(o, "base") else o.base, 40, 0.5) for o in (ours, theirs)]
    ours.train()
    theirs.train()
    worst = 0.0
    for step, batch in enumerate(make_batches(steps, dtype)):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        for s in scheds:
            s.step()
        for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
            worst = max(worst, rel_diff(a, b))
        if (step + 1) % eval_every == 0:
            ours.eval()
            theirs.eval()
            for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
                worst = max(worst, rel_diff(a, b))
            ours.train()
            theirs.train()
    return worst
