"""Tiny deterministic problems that the tests run optimizers on."""

from __future__ import annotations

import torch


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
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), (torch.sin(x @ teacher) + 0.1 * torch.randn(32, 3, generator=g, dtype=torch.float64)).to(dtype)))
    return out


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
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
