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
* weight decay at ``z`` (``decay_at="z"`` with a nonzero decay): never a
  kernel, which decays at ``y`` only.
* what no kernel took: ``foreach=False`` one tensor at a time, else foreach.

The same policy covers the wrapper's bookkeeping around its base optimizer,
and a direction's bucket sums (:attr:`Direction.bucket_sums`): where the
bucket may take the C kernel they come from :func:`.cpu_kernel.sums` in one
pass, else (and where that refuses the tensors) from the direction's own
``reduce``.
Under ``torch.compile`` the same choice is made (:func:`_kernel_call` serves
both), but the update is split: :func:`prepare_traced` packs the scalars into
a tensor outside the graph and :func:`traced_update` is the graph (the C
kernel as the operator ``sfoptim::cpu_kernel_step`` on CPU, the kernel's math
in torch operations elsewhere).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import compiled, cpu_kernel, foreach
from .abi import KERNEL_SCALARS, Bucket, Kind

#: A direction (:class:`sfoptim.directions.base.Direction`); backends call its hooks only.
Direction = Any

__all__ = ["KernelCall", "TracedCall", "prepare_traced", "reduce", "step", "traced_update", "wrap_after", "wrap_before"]

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
    decay_at_z: bool = False,
    fused: bool | None,
    foreach_flag: bool | None,
) -> None:
    """Applies one schedule-free step to ``bucket`` on the backend the policy picks."""
    args = dict(lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay)
    backend = kernel_backend(bucket.params[0].device.type, fused) if _kernel_allowed(fused, foreach_flag) else None
    if decay_at_z and weight_decay != 0:
        # The kernels decay at y only.
        if fused and "decay_at" not in _no_kernel_warned:
            _no_kernel_warned.add("decay_at")
            warnings.warn(
                'sfoptim: fused=True, but the fused kernels take weight decay at y only; a group with decay_at="z" '
                "uses the foreach implementation.",
                RuntimeWarning,
                stacklevel=4,
            )
        _foreach(direction, group, step_index, bucket, reduced, foreach_flag, dict(args, decay_at_z=True))
        return
    if backend is not None:
        call = _kernel_call(direction, group, step_index, bucket, reduced, fused, **args)
        if call is not None and backend.step(
            bucket.params, bucket.grads, bucket.z, call.slots, call.kind, call.scalars, explicit=fused is True
        ):
            return
    _foreach(direction, group, step_index, bucket, reduced, foreach_flag, args)


def reduce(
    direction: Direction,
    group: dict,
    bucket: Bucket,
    beta: float,
    *,
    decay_at_z: bool,
    fused: bool | None,
    foreach_flag: bool | None,
) -> dict[str, Tensor]:
    """This bucket's contributions to the direction's reductions, on the backend its update will take.

    ``decay_at_z`` is whether the group's decay is taken at ``z`` and nonzero
    (such a bucket never takes a kernel).
    """
    wanted = direction.bucket_sums
    if (
        wanted
        and not decay_at_z
        and _kernel_allowed(fused, foreach_flag)
        and bucket.params[0].device.type == "cpu"
    ):
        sums = cpu_kernel.sums(bucket.grads, bucket.z, bucket.params, wanted)
        if sums is not None:
            return direction.reduce_sums(group, beta, {s: torch.tensor(v, dtype=torch.float64) for s, v in sums.items()})
    return direction.reduce(group, bucket, beta)


def _foreach(
    direction: Direction,
    group: dict,
    step_index: int,
    bucket: Bucket,
    reduced: Mapping[str, Tensor],
    foreach_flag: bool | None,
    args: dict[str, Any],
) -> None:
    if foreach_flag is False:
        for single in foreach.split(bucket):
            foreach.step(direction, group, step_index, single, reduced, **args)
    else:
        foreach.step(direction, group, step_index, bucket, reduced, **args)


class KernelCall(NamedTuple):
    """What a kernel needs for one bucket besides its tensors."""

    kind: Kind
    #: The direction's buffers in the kernel's slot order (``v``, then ``m``).
    slots: list[list[Tensor]]
    #: The values of :data:`KERNEL_SCALARS`, in order.
    scalars: list[Any]


def _kernel_call(
    direction: Direction,
    group: dict,
    step_index: int,
    bucket: Bucket,
    reduced: Mapping[str, Tensor],
    fused: bool | None,
    *,
    lr: float,
    ckp1: float,
    beta: float,
    weight_decay: float,
) -> KernelCall | None:
    """The direction's kernel description filled in for this step; None (and a warning with ``fused=True``) without one."""
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
        return None
    values = dict(_SCALAR_DEFAULTS, lr=lr, ckp1=ckp1, beta=beta, wd=weight_decay)
    values.update(spec.scalars)
    return KernelCall(spec.kind, [bucket.buffers[name] for name in spec.buffers], [values[name] for name in KERNEL_SCALARS])


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
    decay_at_z: bool = False,
    fused: bool | None,
    foreach_flag: bool | None,
) -> TracedCall | None:
    """The update of ``bucket`` for a compiled step, or None after doing it here eagerly.

    Runs outside the compiled region: it packs the step's Python scalars
    (with the direction's kernel scalars) into one float64 tensor, so the
    graph that consumes it (:func:`traced_update`) depends on no changing
    number. A direction without a kernel description is updated here by the
    foreach path. On CPU, where the policy allows the kernel, the graph calls
    the C kernel as the operator ``sfoptim::cpu_kernel_step``; elsewhere (and
    with ``fused=False``) it traces the kernel's math
    (:func:`.compiled.update_one`), which the compiler fuses.
    """
    args = dict(lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay)
    if decay_at_z and weight_decay != 0:
        # The kernels (and their traced math) decay at y only: this bucket runs eagerly on foreach.
        _foreach(direction, group, step_index, bucket, reduced, foreach_flag, dict(args, decay_at_z=True))
        return None
    call = _kernel_call(direction, group, step_index, bucket, reduced, fused, **args)
    if call is None:
        _foreach(direction, group, step_index, bucket, reduced, foreach_flag, args)
        return None
    device = bucket.params[0].device
    scalars = torch.tensor([float(v) for v in call.scalars], dtype=torch.float64)
    if device.type != "cpu":
        scalars = scalars.to(device)
    cpu_op = device.type == "cpu" and _kernel_allowed(fused, foreach_flag) and cpu_kernel.available()
    return TracedCall(bucket, int(call.kind), call.slots, scalars, cpu_op)


def traced_update(calls: list[TracedCall]) -> None:
    """The compiled part of a step: the updates of all buckets, every scalar in a tensor.

    Called from a frame that dynamo does not trace, this function is compiled
    as a frame of its own: one graph for the whole step, without graph breaks.
    """
    for call in calls:
        b = call.bucket
        v = call.slots[0] if len(call.slots) > 0 else []
        m = call.slots[1] if len(call.slots) > 1 else []
        if call.cpu_op:
            torch.ops.sfoptim.cpu_kernel_step(b.params, b.grads, b.z, v, m, call.scalars, call.kind)
            continue
        for i, y in enumerate(b.params):
            compiled.update_one(y, b.grads[i], b.z[i], v[i] if v else None, m[i] if m else None, call.scalars, call.kind)
