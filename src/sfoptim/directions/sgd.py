r"""Schedule-free SGD: the base direction is the (weight-decayed) gradient at ``y``.

.. math::

    d_t = g(y_t) + \lambda y_t, \qquad z_{t+1} = z_t - \gamma_t d_t

with ``momentum`` playing the role of the interpolation weight :math:`\beta`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _validation
from ..engine import ClosureForm, ScheduleFreeOptimizer, with_backend_args
from .base import Bucket, Direction, KernelSpec, Kind

__all__ = ["SGDDirection", "SGDScheduleFree", "SGDScheduleFreeClosure"]


class SGDDirection(Direction):
    """The gradient itself; ``momentum`` is the interpolation weight."""

    def beta(self, group: dict, step: int) -> float:
        return group["momentum"]

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        return bucket.grads, False

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        return _SGD_KERNEL


_SGD_KERNEL = KernelSpec(Kind.SGD)


@with_backend_args
class SGDScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free SGD (Defazio et al., 2024).

    No learning-rate schedule is needed: warmup is built in (``warmup_steps``)
    and the averaged point ``x`` plays the role of the decayed iterate at every
    step. Call :meth:`train` before training steps and :meth:`eval` before
    evaluating or saving (the optimizer starts in train mode).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1.0; schedule-free SGD takes
            larger rates than SGD with momentum, typically 10-50x).
        momentum: interpolation weight :math:`\beta \in (0, 1]` (default 0.9).
        weight_decay: :math:`\lambda`, applied at ``y`` (default 0).
        warmup_steps: linear warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        {backend_args}

    Example::

        opt = sfoptim.SGDScheduleFree(model.parameters(), lr=0.5)
        opt.train(); model.train()
        for xb, yb in loader:
            opt.zero_grad(); loss_fn(model(xb), yb).backward(); opt.step()
        opt.eval(); model.eval()   # parameters now hold x
    """

    direction = SGDDirection()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            fused=fused,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_interpolation("momentum", group["momentum"])
        _validation.check_warmup_steps(group["warmup_steps"])


class SGDScheduleFreeClosure(ClosureForm, SGDScheduleFree):
    """Schedule-free SGD whose parameters always hold ``x``; ``step(closure)`` required.

    Same arguments and math as :class:`SGDScheduleFree`, but ``weight_decay``
    comes before ``momentum`` in the positional order, as in the published
    ``schedulefree.SGDScheduleFreeClosure`` (``SGDScheduleFreeClosure(p, 0.1, 0.5)``
    sets ``weight_decay=0.5``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            fused=fused,
        )
