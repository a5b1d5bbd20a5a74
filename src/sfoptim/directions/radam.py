r"""Schedule-free RAdam: rectified Adam as the base direction, no warmup needed.

While the variance estimate is too young for the rectifier to exist
(:math:`\rho_t \le 4`, the first few steps) the step falls back to SGD, or does
nothing when ``silent_sgd_phase`` is True (the default). Afterwards the
learning rate is :math:`\gamma r_t` and the direction Adam's
(see :func:`radam_rectification`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _validation
from ..engine import ClosureForm, ScheduleFreeOptimizer, with_backend_args
from .adamw import adam_direction, lowbit_buffers, new_lowbit_buffer, update_second_moment
from .base import Bucket, Direction, KernelSpec, Kind

__all__ = ["RAdamDirection", "RAdamScheduleFree", "RAdamScheduleFreeClosure", "radam_rectification"]


def radam_rectification(step: int, beta2: float) -> float | None:
    r"""RAdam's variance rectification term :math:`r_t`, or ``None`` while undefined.

    With :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`, the rectifier
    :math:`\sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`
    exists only for :math:`\rho_t > 4`; before that the step falls back to SGD.
    """
    beta2_t = beta2**step
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
    if rho_t <= 4.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


class RAdamDirection(Direction):
    """Adam's direction once the rectifier exists, the gradient before (``v`` still accumulates)."""

    def beta(self, group: dict, step: int) -> float:
        return group["betas"][0]

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        rect = radam_rectification(step, group["betas"][1])
        if rect is None:
            rect = float(not group["silent_sgd_phase"])
        return float(group["lr"]) * rect

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return lowbit_buffers(group) or ("exp_avg_sq",)

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        if lowbit_buffers(group) is not None:
            return new_lowbit_buffer(group, name, like)
        return super().new_buffer(group, name, like)

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        beta2 = group["betas"][1]
        if radam_rectification(step, beta2) is None:
            update_second_moment(bucket.buffers["exp_avg_sq"], bucket.grads, beta2)
            return bucket.grads, False
        return adam_direction(bucket.grads, bucket.buffers["exp_avg_sq"], step=step, beta2=beta2, eps=group["eps"]), True

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        beta2 = group["betas"][1]
        buffers, precision = self.state_buffers(group), group.get("state_precision", "full")
        if radam_rectification(step, beta2) is None:
            return KernelSpec(Kind.SGD_V, buffers, {"beta2": beta2}, precision)
        return KernelSpec(Kind.ADAM, buffers, {"beta2": beta2, "bc2": 1 - beta2**step, "eps": group["eps"]}, precision)


@with_backend_args
class RAdamScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free RAdam: schedule-free AdamW with RAdam's rectified learning rate.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 0.0025).
        betas: :math:`(\beta, \beta_2)` as for :class:`AdamWScheduleFree`.
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay applied at ``y`` (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        {backend_args}
        silent_sgd_phase: if True (default) the steps before the rectifier
            exists change nothing; if False they are SGD steps.
        state_precision: ``"full"`` (default), ``"bf16"`` or ``"8bit"``, as for
            :class:`~sfoptim.AdamWScheduleFree`.
    """

    direction = RAdamDirection()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        silent_sgd_phase: bool = True,
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
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            silent_sgd_phase=silent_sgd_phase,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            state_precision=state_precision,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_betas(group["betas"])
        _validation.check_nonnegative("eps", group["eps"])


class RAdamScheduleFreeClosure(ClosureForm, RAdamScheduleFree):
    """Schedule-free RAdam whose parameters always hold ``x``; ``step(closure)`` required.

    Same arguments and math as :class:`RAdamScheduleFree`.
    """
