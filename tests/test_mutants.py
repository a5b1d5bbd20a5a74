"""Behaviours that only show with inputs the other tests never produce.

Each test here names one rule and exercises it with the input that breaks it:
a base optimizer whose ``group["d"]`` changes every step (D-Adaptation,
Prodigy), a non-finite gradient on one rank only, a warmup ratio whose product
with the step count is not whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _dist import spawn

import sfoptim
from sfoptim.precision import grads_are_finite


# ------------------------------------------- the wrapper reads group["d"]
class GrowingD(torch.optim.Optimizer):
    """A D-Adaptation style base optimizer: plain SGD with step ``lr * d``.

    ``d`` starts small and grows in every step, as D-Adaptation's estimate of
    the distance to the solution does early in training (here by a fixed
    factor, capped at 1), so the learning rate that the wrapper must use for
    its averaging weights, ``lr * d``, changes from step to step while
    ``group["lr"]`` does not.
    """

    def __init__(self, params: Any, lr: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "d": 1e-3})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            group["d"] = min(group["d"] * 1.25, 1.0)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["d"])


def _d_adapted_run(wrap: Callable[[torch.optim.Optimizer], Any], steps: int = 25) -> tuple[list, list, list]:
    """Trajectory of y (after every step), the final x, and the d values seen."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(6, 5), (5,), (40,)]]
    base = GrowingD(params, lr=1.0)
    opt = wrap(base)
    opt.train()
    ys, ds = [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
        ds.append(base.param_groups[0]["d"])
        ys.append([p.detach().clone() for p in params])
    opt.eval()
    return ys, [p.detach().clone() for p in params], ds


@pytest.mark.parametrize("decay", [0.0, 0.1], ids=["no-decay", "decay-at-y"])
@pytest.mark.parametrize("fused", [None, False], ids=["fused", "foreach"])
def test_wrapper_uses_lr_times_d_of_a_d_adapted_base_like_the_published_wrapper(fused: bool | None, decay: float) -> None:
    # lr*d weights the average; the decay at y is scaled by the group's lr alone.
    schedulefree = pytest.importorskip("schedulefree")
    ours_y, ours_x, ds = _d_adapted_run(
        lambda base: sfoptim.ScheduleFreeWrapper(base, weight_decay_at_y=decay, momentum=0.9, fused=fused)
    )
    theirs_y, theirs_x, _ = _d_adapted_run(
        lambda base: schedulefree.ScheduleFreeWrapper(base, weight_decay_at_y=decay, momentum=0.9)
    )
    assert len(set(ds)) == len(ds), "the base optimizer's d must change every step for this test to mean anything"
    for step, (a, b) in enumerate(zip(ours_y, theirs_y)):
        for i, (u, v) in enumerate(zip(a, b)):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12, msg=lambda m: f"y of tensor {i} after step {step + 1}: {m}")
    for i, (u, v) in enumerate(zip(ours_x, theirs_x)):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12, msg=lambda m: f"x of tensor {i}: {m}")


# ------------------------------------ grads_are_finite agrees across ranks
def _finite_worker(rank: int, world: int) -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = sfoptim.AdamWScheduleFree([p])
    p.grad = torch.ones(4)
    assert grads_are_finite(opt), f"rank {rank}: all gradients are finite everywhere"
    # Only the last rank sees an overflow; every rank must skip the step.
    if rank == world - 1:
        p.grad[2] = float("inf")
    assert not grads_are_finite(opt), f"rank {rank}: rank {world - 1} has a non-finite gradient"
    p.grad = torch.ones(4)
    if rank == 0:
        p.grad[0] = float("nan")
    assert not grads_are_finite(opt), f"rank {rank}: rank 0 has a NaN gradient"


def test_grads_are_finite_is_false_on_every_rank_when_one_rank_overflows() -> None:
    spawn(_finite_worker, 2)


# ------------------------------------------------ transformers warmup ratio
@pytest.mark.parametrize(("ratio", "max_steps"), [(0.3, 7), (0.05, 30), (0.5, 3), (0.25, 8)])
def test_warmup_ratio_is_rounded_up_like_the_trainer(tmp_path, ratio: float, max_steps: int) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from sfoptim.integrations.transformers import warmup_steps_from_args

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[])
    expected = math.ceil(ratio * max_steps)
    assert warmup_steps_from_args(args, max_steps) == expected
    # The Trainer's own schedulers read the same ratio the same way.
    assert args.get_warmup_steps(max_steps) == expected
