"""Averaging options every schedule-free optimizer accepts as param-group keys (off when absent).

``decoupling_c`` (Song et al., 2025: :math:`c \\leftarrow \\min(1, c(1-\\beta)C)`)
and ``c_warmup`` (:math:`c = 1` for the first steps), checked against a loop
that stores ``x``, ``y`` and ``z`` and writes the schedule out by hand.
"""

from __future__ import annotations

import pytest
import torch

import sfoptim

LR, BETA, DECAY = 0.1, 0.8, 0.01


def grad_at(y: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return 0.5 * y + torch.randn(y.shape, generator=g, dtype=torch.float64)


def by_hand(y0: torch.Tensor, steps: int, decoupling_c: float | None, c_warmup: int) -> list[torch.Tensor]:
    """Schedule-free SGD with x, y, z stored; returns x after every step."""
    x, y, z = y0.clone(), y0.clone(), y0.clone()
    weight_sum, out = 0.0, []
    for t in range(1, steps + 1):
        g = grad_at(y, t)
        z = z - LR * (g + DECAY * y)
        if t <= c_warmup:
            c = 1.0
        else:
            weight_sum += LR**2
            c = LR**2 / weight_sum
            if decoupling_c is not None:
                c = min(1.0, c * (1 - BETA) * decoupling_c)
        x = (1 - c) * x + c * z
        y = BETA * x + (1 - BETA) * z
        out.append(x)
    return out


@pytest.mark.parametrize("decoupling_c, c_warmup", [(None, 0), (None, 4), (3.0, 0), (50.0, 2), (1e9, 0)])
def test_sgd_follows_the_schedule_written_by_hand(decoupling_c, c_warmup) -> None:
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(y0.clone())
    group = {"params": [p], "c_warmup": c_warmup}
    if decoupling_c is not None:
        group["decoupling_c"] = decoupling_c
    opt = sfoptim.SGDScheduleFree([group], lr=LR, momentum=BETA, weight_decay=DECAY)
    expected = by_hand(y0, 20, decoupling_c, c_warmup)
    for t in range(1, 21):
        p.grad = grad_at(p.detach(), t)
        opt.step()
        opt.eval()
        assert torch.allclose(p.detach(), expected[t - 1], rtol=1e-12, atol=1e-12), f"step {t}"
        opt.train()


def test_neutral_decoupling_c_leaves_adamw_bit_identical() -> None:
    """(1 - beta) * C = 1 changes nothing, on every backend."""
    for backend in ({"fused": False}, {"fused": True}, {"foreach": False}):
        runs = []
        for extra in ({}, {"decoupling_c": 2.0}):
            p = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3))
            opt = sfoptim.AdamWScheduleFree([{"params": [p], **extra}], lr=0.01, betas=(0.5, 0.999), **backend)
            for t in range(10):
                p.grad = grad_at(p.detach(), t)
                opt.step()
            runs.append(p.detach().clone())
        assert torch.equal(runs[0], runs[1]), backend


@pytest.mark.parametrize("key, value", [("decoupling_c", 0.0), ("decoupling_c", float("nan")), ("c_warmup", -1), ("c_warmup", 1.5)])
def test_invalid_averaging_options_raise_value_error_naming_them(key, value) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        sfoptim.AdamWScheduleFree([{"params": [p], key: value}])
