"""The one place that picks a backend: CPU kernel, compiled kernel, foreach or per-tensor.

Policy, per bucket (tensors of one device and dtype):

* ``fused=False``, or ``fused=None`` with ``foreach=False``: never a kernel.
* otherwise, if the direction describes a kernel (:class:`KernelSpec`): on
  CPU the C kernel (:mod:`.cpu_kernel`); on other devices the compiled one
  (:mod:`.compiled`) only with ``fused=True``, its speed against foreach
  there being unmeasured. A kernel refuses (returns False, nothing changed)
  where it cannot run: other dtypes, non-contiguous tensors, DTensor shards,
  no compiler; with ``fused=True`` it warns once.
* with ``fused=True`` and a direction that has no kernel: a warning, once per
  direction type.
* what no kernel took: ``foreach=False`` one tensor at a time, else foreach.

The same policy covers the wrapper's bookkeeping around its base optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..directions.base import KERNEL_SCALARS, Bucket, Direction
from . import compiled, cpu_kernel, foreach

__all__ = ["TracedCall", "prepare_traced", "step", "traced_step", "wrap_after", "wrap_before"]

_no_kernel_warned: set[str] = set()
_SCALAR_DEFAULTS = {name: (1.0 if name in ("bc1", "bc2") else 0.0) for name in KERNEL_SCALARS}


def kernel_backend(device_type: str, fused: bool | None) -> Any:
    """The kernel module for a device: the C kernel on CPU, the compiled one elsewhere if asked for."""
    if device_type == "cpu":
        return cpu_kernel
    return compiled if fused else None


def _kernel_allowed(fused: bool | None, foreach_flag: bool | None) -> bool:
    return fused is not False and not (fused is None and foreach_flag is False)


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
    fused: bool | None,
    foreach_flag: bool | None,
) -> None:
    """Applies one schedule-free step to ``bucket`` on the backend the policy picks."""
    if _kernel_allowed(fused, foreach_flag) and _run_kernel(
        direction, group, step_index, bucket, reduced, lr, ckp1, beta, weight_decay, fused
    ):
        return
    args = dict(lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay)
    if foreach_flag is False:
        for single in foreach.split(bucket):
            foreach.step(direction, group, step_index, single, reduced, **args)
    else:
        foreach.step(direction, group, step_index, bucket, reduced, **args)


def _run_kernel(
    direction: Direction,
    group: dict,
    step_index: int,
    bucket: Bucket,
    reduced: Mapping[str, Tensor],
    lr: float,
    ckp1: float,
    beta: float,
    weight_decay: float,
    fused: bool | None,
) -> bool:
    backend = kernel_backend(bucket.params[0].device.type, fused)
    if backend is None:
        return False
    spec = direction.kernel(group, step_index, reduced)
    if spec is None:
        name = type(direction).__name__
        if fused and name not in _no_kernel_warned:
            _no_kernel_warned.add(name)
            warnings.warn(
                f"sfoptim: fused=True, but {name} has no fused kernel; using the foreach implementation.",
                RuntimeWarning,
                stacklevel=5,
            )
        return False
    values = dict(_SCALAR_DEFAULTS, lr=lr, ckp1=ckp1, beta=beta, wd=weight_decay)
    values.update(spec.scalars)
    return backend.step(
        bucket.params,
        bucket.grads,
        bucket.z,
        [bucket.buffers[name] for name in spec.buffers],
        spec.kind,
        [values[name] for name in KERNEL_SCALARS],
        explicit=fused is True,
    )


def _wrap(name: str, a: list[Tensor], b: list[Tensor], scalar: float, beta: float, fused: bool | None) -> None:
    if fused is not False and getattr(cpu_kernel, name)(a, b, scalar, beta, explicit=fused is True):
        return
    getattr(foreach, name)(a, b, scalar, beta)


def wrap_before(ys: list[Tensor], zs: list[Tensor], lr_decay: float, beta: float, fused: bool | None) -> None:
    """:func:`.foreach.wrap_before` on the backend the policy picks (``ys`` hold ``x`` afterwards)."""
    _wrap("wrap_before", ys, zs, lr_decay, beta, fused)


def wrap_after(xs: list[Tensor], zs: list[Tensor], ckp1: float, beta: float, fused: bool | None) -> None:
    """:func:`.foreach.wrap_after` on the backend the policy picks (``xs`` hold the new ``y``)."""
    _wrap("wrap_after", xs, zs, ckp1, beta, fused)


class TracedCall(NamedTuple):
    """One bucket's update under ``torch.compile``, its scalars already in a tensor."""

    bucket: Bucket
    kind: int
    slots: list[list[Tensor]]
    scalars: Tensor
    cpu_op: bool


def prepare_traced(
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
    fused: bool | None,
    foreach_flag: bool | None,
) -> TracedCall | None:
    """The update of ``bucket`` for a compiled step, or None after doing it here eagerly.

    Runs outside the compiled region: it reads the Python scalars of the step
    and packs them (with the direction's kernel scalars) into one float64
    tensor, so the graph that consumes it depends on no changing number. A
    direction without a kernel description is updated here by
    :func:`step`. On CPU, where the kernel is allowed, the graph calls the
    C kernel as the operator ``sfoptim::cpu_kernel_step``; elsewhere it
    traces the kernel's math (:func:`.compiled.update_one`).
    """
    spec = direction.kernel(group, step_index, reduced)
    if spec is None:
        step(
            direction, group, step_index, bucket, reduced,
            lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay, fused=fused, foreach_flag=foreach_flag,
        )  # fmt: skip
        return None
    values = dict(_SCALAR_DEFAULTS, lr=lr, ckp1=ckp1, beta=beta, wd=weight_decay)
    values.update(spec.scalars)
    device = bucket.params[0].device
    scalars = torch.tensor([float(values[name]) for name in KERNEL_SCALARS], dtype=torch.float64)
    cpu_op = device.type == "cpu" and _kernel_allowed(fused, foreach_flag) and cpu_kernel.available()
    if device.type != "cpu":
        scalars = scalars.to(device)
    slots = [bucket.buffers[name] for name in spec.buffers]
    return TracedCall(bucket, int(spec.kind), slots, scalars, cpu_op)


def traced_step(call: TracedCall) -> None:
    """The compiled part of a step: the update of one bucket, all its scalars in a tensor."""
    b = call.bucket
    v = call.slots[0] if len(call.slots) > 0 else []
    m = call.slots[1] if len(call.slots) > 1 else []
    if call.cpu_op:
        torch.ops.sfoptim.cpu_kernel_step(b.params, b.grads, b.z, v, m, call.scalars, call.kind)
        return
    for i, y in enumerate(b.params):
        compiled.update_one(y, b.grads[i], b.z[i], v[i] if v else None, m[i] if m else None, call.scalars, call.kind)
