r"""The foreach backend: the schedule-free update with ``torch._foreach_*`` ops.

This is the reference every other backend must equal (bit for bit on the
parity tests). It runs wherever torch runs: any device, dtype, tensor
subclass (DTensor shards under FSDP2) and memory layout. The per-tensor
backend is the same code called with one tensor per list.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .abi import Bucket
from .abi import DirectionHooks as Direction

__all__ = ["interpolate_and_step", "split", "step", "update", "wrap_after", "wrap_before"]


def interpolate_and_step(
    y: list[Tensor], z: list[Tensor], d: list[Tensor], lr: float, ckp1: float, beta: float
) -> None:
    r"""The schedule-free update of ``y`` and ``z`` given the direction ``d`` at ``y``.

    :math:`y \leftarrow \operatorname{lerp}(y, z, c) + \gamma(\beta(1-c)-1)d`,
    :math:`z \leftarrow z - \gamma d`. Equivalent to updating ``z``, averaging
    ``x`` and re-interpolating ``y``, without ever storing ``x``.
    """
    torch._foreach_lerp_(y, z, ckp1)
    torch._foreach_add_(y, d, alpha=lr * (beta * (1 - ckp1) - 1))
    torch._foreach_sub_(z, d, alpha=lr)


def step(
    direction: Direction,
    group: dict,
    step_index: int,
    bucket: Bucket,
    reduced: Mapping[str, Tensor],
    *,
    lr: float,
    ckp1: float,
    beta: float,
    weight_decay: float,
    decay_at_z: bool = False,
) -> None:
    r"""One step of a bucket: the direction's foreach form, weight decay, the update.

    The decay :math:`\lambda` is taken at ``y`` (:math:`d + \lambda y`) or,
    with ``decay_at_z``, at ``z`` (:math:`d + \lambda z`); ``y`` and ``z``
    are then updated with the same decayed direction.
    """
    d, owned = direction.foreach(group, step_index, bucket, reduced)
    update(bucket, d, lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay, decay_at_z=decay_at_z, owned=owned)


def update(
    bucket: Bucket,
    d: list[Tensor],
    *,
    lr: float,
    ckp1: float,
    beta: float,
    weight_decay: float,
    decay_at_z: bool = False,
    owned: bool = False,
) -> None:
    """Weight decay and the update of ``y`` and ``z`` with the direction ``d`` (``owned``: ``d`` may be modified)."""
    if weight_decay != 0:
        at = bucket.z if decay_at_z else bucket.params
        if owned:
            torch._foreach_add_(d, at, alpha=weight_decay)
        else:
            d = list(torch._foreach_add(d, at, alpha=weight_decay))
    interpolate_and_step(bucket.params, bucket.z, d, lr, ckp1, beta)


def split(bucket: Bucket) -> list[Bucket]:
    """One bucket per tensor (the per-tensor backend)."""
    return [
        Bucket([p], [g], [z], {n: [bufs[i]] for n, bufs in bucket.buffers.items()})
        for i, (p, g, z) in enumerate(zip(bucket.params, bucket.grads, bucket.z))
    ]


def wrap_before(ys: list[Tensor], zs: list[Tensor], lr_decay: float, beta: float) -> None:
    r"""Before a delegated move: ``z -= a y``; ``y *= 1 - a(1-\beta)``; ``y = lerp(y, z, 1-1/\beta)``.

    ``a`` is ``lr * weight_decay_at_y``; ``z`` moves by the decay and ``y`` by
    :math:`1-\beta` of it, so ``x`` stays put. Afterwards ``ys`` hold ``x``.
    """
    if lr_decay != 0:
        torch._foreach_sub_(zs, ys, alpha=lr_decay)
        torch._foreach_mul_(ys, 1 - lr_decay * (1 - beta))
    torch._foreach_lerp_(ys, zs, 1 - 1 / beta)


def wrap_after(xs: list[Tensor], zs: list[Tensor], ckp1: float, beta: float) -> None:
    r"""After a delegated move: ``x = lerp(x, z, c)``, then ``lerp(x, z, 1-\beta)`` (the new ``y``)."""
    torch._foreach_lerp_(xs, zs, ckp1)
    torch._foreach_lerp_(xs, zs, 1 - beta)
