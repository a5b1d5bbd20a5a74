r"""The direction contract: what one base optimizer contributes to schedule-free training.

The engine owns everything schedule-free (modes, ``z``, the averaging, weight
decay, the update of ``y`` and ``z``, the backend). A :class:`Direction` owns
the base optimizer's :math:`d_t` in :math:`z_{t+1} = z_t - \gamma_t (d_t + \lambda y_t)`,
the state it needs for it, and the step's :math:`\beta_t` and :math:`\gamma_t`.

Required: :meth:`~Direction.beta` and :meth:`~Direction.foreach`; the other
methods and flags have defaults (the bucket sums a kernel can take name what
they read in :meth:`~Direction.sum_inputs`). ``reduced``, which several methods receive,
holds the step's global sums (:attr:`~Direction.reductions`) and the inputs
the optimizer passes for the step (ScheduleFree+'s loss). A base optimizer
that moves ``z`` itself is a :class:`DelegatedDirection`. ``docs/design.md``
draws the layers and gives a complete example. Directions are stateless:
hyperparameters live in the param group, tensors in the optimizer's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..backends.abi import KERNEL_SCALARS, KIND_SLOTS, Bucket, BucketSum, KernelSpec, Kind, SumInputs

__all__ = [
    "KERNEL_SCALARS",
    "KIND_SLOTS",
    "Bucket",
    "BucketSum",
    "DelegatedDirection",
    "Direction",
    "KernelSpec",
    "Kind",
    "SumInputs",
    "group_reduction",
    "warmup_lr",
]


def warmup_lr(group: dict, step: int) -> float:
    """``lr * min(1, step / warmup_steps)`` for a 1-based ``step``."""
    warmup = int(group.get("warmup_steps", 0))
    factor = step / warmup if 0 < warmup and step <= warmup else 1.0
    return float(group["lr"]) * factor


def group_reduction(name: str, group: dict) -> str:
    """The reduction name under which ``reduce`` contributes to a sum over ``group`` alone.

    Only ``group``'s buckets return this name, so its total (completed across
    ranks like any other) covers that group's parameters: a per-group
    estimate, such as Prodigy's ``d`` with ``split_groups=True``.
    """
    return f"{name}@group{id(group)}"


class Direction:
    """A base direction (see the module docstring for the contract)."""

    #: Names of the global scalar reductions :meth:`reduce` contributes to.
    reductions: ClassVar[tuple[str, ...]] = ()
    #: The direction needs whole tensors and cannot gather shards itself:
    #: the engine refuses a sharded (FSDP2) parameter before anything changes.
    refuses_shards: ClassVar[bool] = False
    #: The interpolation weight depends on the step: the engine records the
    #: one each ``y`` was built with (costs one group key).
    varying_beta: ClassVar[bool] = False
    #: Generic bucket sums from which :meth:`reduce_sums` gives what
    #: :meth:`reduce` gives. Where a bucket may take the CPU kernel, the engine
    #: computes them there in one pass and calls :meth:`reduce_sums`;
    #: elsewhere (other devices, sharded or non-contiguous tensors, ``fused=False``) it calls :meth:`reduce`.
    bucket_sums: ClassVar[tuple[BucketSum, ...]] = ()

    def beta(self, group: dict, step: int) -> float:
        r"""The interpolation weight :math:`\beta \in (0, 1]` of the 1-based ``step``."""
        raise NotImplementedError

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        """The learning rate of the 1-based ``step`` (default: linear warmup).

        Pure. The engine takes every group's before it changes any tensor, so
        raising here refuses the whole step.
        """
        return warmup_lr(group, step)

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        """Names of the parameter-sized state buffers besides ``z`` (zeros at creation)."""
        return ()

    def weight_decay_at_y(self, group: dict, lr: float, weight_decay: float) -> float:
        r"""The decay :math:`\lambda` the engine adds as :math:`\lambda y` at learning rate ``lr`` (default: ``weight_decay``)."""
        return weight_decay

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        """State buffer ``name`` at creation, for a parameter whose working copy is ``like`` (default: zeros like it).

        Its shape and dtype are also what a checkpoint's buffer must have: the
        engine creates one on the meta device to check a load against it, and
        keeps a loaded buffer in its dtype.
        """
        return torch.zeros_like(like, memory_format=torch.preserve_format)

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]:
        """This bucket's contributions (0-d tensors) to each name in :attr:`reductions` for the 1-based ``step``.

        Called before the update with ``y`` in ``bucket.params``; ``beta`` is
        the weight ``y`` was built with, so ``x = lerp(y, z, 1 - 1/beta)``.
        It changes nothing. Names from :func:`group_reduction` give sums over
        one group.
        """
        return {}

    def reduce_sums(self, group: dict, step: int, beta: float, sums: Mapping[BucketSum, Tensor]) -> dict[str, Tensor]:
        """:meth:`reduce`'s contributions from the bucket's :attr:`bucket_sums` (0-d float64 tensors).

        Must agree with :meth:`reduce` on the same bucket to rounding.
        """
        raise NotImplementedError

    def sum_inputs(self, group: dict, step: int) -> SumInputs:
        """The buffers and scalars the :attr:`bucket_sums` of the 1-based ``step`` read besides ``g``, ``z``, ``y`` (default none)."""
        return SumInputs()

    def commit(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> None:
        """Records per-group scalar state after the group's 1-based ``step`` (default: none).

        Called once per group and step, after its tensors are updated (also
        for a group without gradients), with the same ``reduced`` that
        ``lr`` and ``foreach`` saw.
        """

    def foreach(
        self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]
    ) -> tuple[list[Tensor], bool]:
        """The direction for ``bucket`` and whether the caller may modify it.

        State buffers are updated in place. When the second item is False the
        tensors alias something that must not change (the gradients) and the
        engine copies before adding weight decay.
        """
        raise NotImplementedError

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        """The one-pass kernel for this step, or None (foreach only)."""
        return None


class DelegatedDirection(Direction):
    """A direction computed by another optimizer that moves ``z`` itself.

    The engine still owns the schedule; around the base optimizer's step the
    direction keeps ``x`` and ``y``: :meth:`move` runs once per step for all
    its groups (before any group's update), :meth:`finish` once per group
    with the step's averaging coefficient. The learning rate is read after
    the move, since the base optimizer may change it while stepping
    (D-Adaptation's ``d``).
    """

    def move(self, plans: list[Any], reduced: Mapping[str, Tensor]) -> None:
        """Moves ``z`` of the active parameters of ``plans`` (:class:`sfoptim.engine.step.GroupStep`).

        If it raises, parameters and state must be as they were.
        """
        raise NotImplementedError

    def finish(self, plan: Any, ckp1: float) -> None:
        """After :meth:`move`: the new ``y`` and ``z`` of one group, averaged with coefficient ``ckp1``."""
        raise NotImplementedError

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> Any:
        raise TypeError(f"{type(self).__name__} moves z through its base optimizer; it has no foreach direction")
