r"""Schedule-free AdamW: the base direction is Adam's preconditioned gradient at ``y``.

.. math::

    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    d_t &= \frac{\hat m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon} + \lambda y_t

where :math:`\hat m_t = g_t` by default, or with ``inner_momentum`` =
:math:`\mu > 0` the bias-corrected EMA
:math:`m_t = \mu m_{t-1} + (1-\mu) g_t`, :math:`\hat m_t = m_t/(1-\mu^t)`.
``betas[0]`` is the interpolation weight :math:`\beta` of the engine, not a
momentum: schedule-free needs none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _validation
from ..backends import lowbit
from ..engine import ClosureForm, ScheduleFreeOptimizer, with_backend_args
from .base import Bucket, Direction, KernelSpec, Kind, warmup_lr

__all__ = [
    "AdamDirection",
    "AdamWScheduleFree",
    "AdamWScheduleFreeClosure",
    "AdamWScheduleFreePaper",
    "adam_direction",
    "lowbit_buffers",
    "new_lowbit_buffer",
]

#: The second-moment buffers of each ``state_precision``.
_V_BUFFERS = {"full": ("exp_avg_sq",), "bf16": ("exp_avg_sq",), "8bit": ("exp_avg_sq_code", "exp_avg_sq_exp")}


def lowbit_buffers(group: dict) -> tuple[str, ...] | None:
    """The second-moment buffers of a group with low-bit state, or None with ``state_precision="full"``."""
    precision = group.get("state_precision", "full")
    return None if precision == "full" else _V_BUFFERS[precision]


def new_lowbit_buffer(group: dict, name: str, like: Tensor) -> Tensor:
    r"""A zero second moment of a low-bit group for a parameter like ``like``.

    ``"bf16"``: ``exp_avg_sq`` in bfloat16. ``"8bit"``: ``exp_avg_sq_code``,
    uint8 codes of :math:`\sqrt v` in the parameter's shape, and
    ``exp_avg_sq_exp``, one int8 exponent per block of
    :data:`~sfoptim.backends.lowbit.BLOCK` elements (flattened, row-major).
    """
    if like.is_complex():
        raise ValueError(f"state_precision={group['state_precision']!r} needs real parameters, not {like.dtype} ones")
    if name == "exp_avg_sq":
        return torch.zeros(like.shape, dtype=torch.bfloat16, device=like.device)
    if name == "exp_avg_sq_code":
        return torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    return torch.zeros(lowbit.num_blocks(like.numel()), dtype=torch.int8, device=like.device)


def update_second_moment(exp_avg_sq: list[Tensor], grads: list[Tensor], beta2: float) -> None:
    r""":math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`, in place."""
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)


def adam_direction(
    grads: list[Tensor],
    exp_avg_sq: list[Tensor],
    *,
    step: int,
    beta2: float,
    eps: float,
    bias_correction: bool = True,
    exp_avg: list[Tensor] | None = None,
    inner_momentum: float = 0.0,
) -> list[Tensor]:
    r"""Updates the second moment in place and returns Adam's direction as new tensors.

    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`;
    direction :math:`\hat m / (\sqrt{v/(1-\beta_2^t)} + \epsilon)` (without the
    bias correction when ``bias_correction`` is False). ``grads`` are not changed.
    """
    update_second_moment(exp_avg_sq, grads, beta2)
    if bias_correction:
        denom = torch._foreach_div(exp_avg_sq, 1 - beta2**step)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_add_(denom, eps)
    if exp_avg is None:
        return list(torch._foreach_div(grads, denom))
    torch._foreach_lerp_(exp_avg, grads, 1 - inner_momentum)
    direction = list(torch._foreach_div(exp_avg, denom))
    torch._foreach_div_(direction, 1 - inner_momentum**step)
    return direction


class AdamDirection(Direction):
    r"""Adam's preconditioned gradient; ``betas[0]`` is the interpolation weight.

    State: ``exp_avg_sq`` (:math:`v`), plus ``exp_avg`` (:math:`m`) when the
    group's ``inner_momentum`` is positive. ``paper=True`` is the paper's
    Algorithm 1: no bias correction in the direction, the learning rate scaled
    by :math:`\sqrt{1-\beta_2^t}` instead.
    """

    def __init__(self, paper: bool = False) -> None:
        self.paper = paper

    def beta(self, group: dict, step: int) -> float:
        return group["betas"][0]

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        lr = warmup_lr(group, step)
        return lr * math.sqrt(1 - group["betas"][1] ** step) if self.paper else lr

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        low = lowbit_buffers(group)
        if low is not None:
            return low
        if group.get("inner_momentum", 0.0) > 0:
            return ("exp_avg_sq", "exp_avg")
        return ("exp_avg_sq",)

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        if lowbit_buffers(group) is not None:
            return new_lowbit_buffer(group, name, like)
        return super().new_buffer(group, name, like)

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        inner = group.get("inner_momentum", 0.0)
        direction = adam_direction(
            bucket.grads,
            bucket.buffers["exp_avg_sq"],
            step=step,
            beta2=group["betas"][1],
            eps=group["eps"],
            bias_correction=not self.paper,
            exp_avg=bucket.buffers["exp_avg"] if inner > 0 else None,
            inner_momentum=inner,
        )
        return direction, True

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        beta2, inner = group["betas"][1], group.get("inner_momentum", 0.0)
        scalars = {
            "beta2": beta2,
            "bc2": 1.0 if self.paper else 1 - beta2**step,
            "eps": group["eps"],
            "mu": inner,
            "bc1": 1 - inner**step,
        }
        return KernelSpec(Kind.ADAM, self.state_buffers(group), scalars, group.get("state_precision", "full"))


@with_backend_args
class AdamWScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free AdamW (Defazio et al., 2024).

    No learning-rate schedule is needed: warmup is built in (``warmup_steps``)
    and the averaged point ``x`` plays the role of the decayed iterate at every
    step. Call :meth:`train` before training steps and :meth:`eval` before
    evaluating or saving (the optimizer starts in train mode).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 0.0025).
        betas: :math:`(\beta, \beta_2)`: the interpolation weight in (0, 1] and
            the second-moment decay in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\lambda`, decoupled and applied at ``y`` (default 0).
        warmup_steps: linear warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        {backend_args}
        inner_momentum: :math:`\mu \in [0, 1)`, an EMA of the gradient inside the
            Adam direction (default 0: no buffer is allocated).
        state_precision: how ``z`` and the second moment are stored (see
            ``docs/precision.md``). ``"full"`` (default): in the parameter's
            dtype. ``"bf16"``: both in bfloat16 (4 bytes per parameter).
            ``"8bit"``: ``z`` in bfloat16, :math:`\sqrt v` in 8-bit codes with
            a power-of-two scale per block of 512 elements (3.002 bytes per
            parameter; :mod:`sfoptim.backends.lowbit`). Both round every stored
            value stochastically and take the step's direction from the new
            :math:`v` before it is rounded; neither combines with
            ``state_dtype``, ``inner_momentum`` or decay at ``z``.

    State per parameter: ``z`` and ``exp_avg_sq`` (plus ``exp_avg`` when
    ``inner_momentum > 0``); with ``state_precision="8bit"``, ``z``,
    ``exp_avg_sq_code`` and ``exp_avg_sq_exp``.

    Example::

        opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=100)
        opt.train(); model.train()
        for xb, yb in loader:
            opt.zero_grad(); loss_fn(model(xb), yb).backward(); opt.step()
        opt.eval(); model.eval()   # parameters now hold x
    """

    direction = AdamDirection()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        inner_momentum: float = 0.0,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
        state_precision: str = "full",
    ) -> None:
        defaults = dict(
            fused=fused,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            inner_momentum=inner_momentum,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            state_precision=state_precision,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_betas(group["betas"])
        _validation.check_nonnegative("eps", group["eps"])
        _validation.check_warmup_steps(group["warmup_steps"])
        _validation.check_in_range(
            "inner_momentum", group.get("inner_momentum", 0.0), 0.0, 1.0, low_open=False, high_open=True
        )


class AdamWScheduleFreeClosure(ClosureForm, AdamWScheduleFree):
    """Schedule-free AdamW whose parameters always hold ``x``; ``step(closure)`` required.

    Same arguments and math as :class:`AdamWScheduleFree`.
    """


class AdamWScheduleFreePaper(AdamWScheduleFree):
    r"""The paper's Algorithm 1: Adam's bias correction folded into the learning rate.

    :math:`\gamma_t = \gamma \cdot \mathrm{warmup}(t) \cdot \sqrt{1-\beta_2^t}` and
    :math:`d_t = g_t / (\sqrt{v_t} + \epsilon)`, as in the published package
    before version 1.3. The smaller early learning rates also enter the
    averaging weights through ``lr_max``. Use it to reproduce published numbers.
    """

    direction = AdamDirection(paper=True)
