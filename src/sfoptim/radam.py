r"""Schedule-free RAdam: rectified Adam as the base direction, no warmup needed.

While the variance estimate is too young for the rectifier to exist
(:math:`\rho_t \le 4`, the first few steps) the step falls back to SGD, or does
nothing when ``silent_sgd_phase`` is True (the default). Afterwards the
learning rate is :math:`\gamma r_t` and the direction Adam's
(see :func:`sfoptim.averaging.radam_rectification`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from . import _fused_cpu, _validation
from .adamw import adam_direction, update_second_moment
from .averaging import AveragingStep, radam_rectification
from .engine import Bucket, ClosureForm, ScheduleFreeOptimizer, with_backend_args

__all__ = ["RAdamScheduleFree", "RAdamScheduleFreeClosure"]


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
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: Optional[bool] = None,
        silent_sgd_phase: bool = True,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        fused: Optional[bool] = None,
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
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_betas(group["betas"])
        _validation.check_nonnegative("eps", group["eps"])

    def _beta(self, group: dict) -> float:
        return group["betas"][0]

    def _state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq",)

    def _scheduled_lr(self, group: dict, step: int) -> float:
        rect = radam_rectification(step, group["betas"][1])
        if rect is None:
            rect = float(not group["silent_sgd_phase"])
        return float(group["lr"]) * rect

    def _direction(self, group: dict, sched: AveragingStep, bucket: Bucket) -> tuple[list[Tensor], bool]:
        beta2 = group["betas"][1]
        if radam_rectification(sched.step, beta2) is None:
            # The second moment still accumulates during the SGD phase.
            update_second_moment(bucket.buffers["exp_avg_sq"], bucket.grads, beta2)
            return bucket.grads, False
        return adam_direction(bucket.grads, bucket.buffers["exp_avg_sq"], step=sched.step, beta2=beta2, eps=group["eps"]), True

    def _fused_direction(self, group: dict, sched: AveragingStep) -> Optional[dict[str, Any]]:
        beta2 = group["betas"][1]
        if radam_rectification(sched.step, beta2) is None:
            return {"kind": _fused_cpu.SGD_V, "beta2": beta2}
        return {"kind": _fused_cpu.ADAM, "beta2": beta2, "bias_correction2": 1 - beta2**sched.step, "eps": group["eps"]}


class RAdamScheduleFreeClosure(ClosureForm, RAdamScheduleFree):
    """Schedule-free RAdam whose parameters always hold ``x``; ``step(closure)`` required.

    Same arguments and math as :class:`RAdamScheduleFree`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: Optional[bool] = None,
        silent_sgd_phase: bool = True,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(
            params,
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
            fused=fused,
        )
