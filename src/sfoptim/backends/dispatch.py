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
* bfloat16 and float16 buckets (parameters kept in 16 bits, without
  ``state_dtype``): the C kernel computes in float32 and rounds every stored
  element once, to nearest, or stochastically with the group's
  ``stochastic_rounding`` (a seed drawn from torch's default generator per
  bucket and step, so ``torch.manual_seed`` makes it repeatable). Under
  ``torch.compile`` such a stochastic bucket is updated eagerly.
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

from ..directions.base import KERNEL_SCALARS, Bucket, Direction, Kind
from . import compiled, cpu_kernel, foreach

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
    owner: str = "this optimizer",
) -> None:
    """Applies one schedule-free step to ``bucket`` on the backend the policy picks.

    ``owner`` names the optimizer class in the warning about a missing kernel.
    """
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
        call = _kernel_call(direction, group, step_index, bucket, reduced, fused, owner, **args)
        stochastic = call is not None and backend is cpu_kernel and _stochastic(group, bucket)
        rounding = {"seed": _stochastic_seed()} if stochastic else {}
        if call is not None and backend.step(
            bucket.params, bucket.grads, bucket.z, call.slots, call.kind, call.scalars, explicit=fused is True, **rounding
        ):
            return
    _foreach(direction, group, step_index, bucket, reduced, foreach_flag, args)


def _stochastic(group: dict, bucket: Bucket) -> bool:
    """Whether the kernel rounds this bucket's stores stochastically (16-bit tensors, ``stochastic_rounding``)."""
    return bool(group.get("stochastic_rounding")) and bucket.params[0].dtype in cpu_kernel.NARROW


def _stochastic_seed() -> int:
    """A fresh 64-bit seed for one kernel call, from torch's default generator."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64).item())


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
    owner: str,
    *,
    lr: float,
    ckp1: float,
    beta: float,
    weight_decay: float,
) -> KernelCall | None:
    """The direction's kernel description filled in for this step; None (and a warning with ``fused=True``) without one."""
    spec = direction.kernel(group, step_index, reduced)
    if spec is None:
        if fused and owner not in _no_kernel_warned:
            _no_kernel_warned.add(owner)
            warnings.warn(
                f"sfoptim: fused=True, but {owner} has no fused kernel for some of its parameter groups; "
                "they use the foreach implementation.",
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
    owner: str = "this optimizer",
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
    device = bucket.params[0].device
    if device.type == "cpu" and _kernel_allowed(fused, foreach_flag) and _stochastic(group, bucket):
        # The traced operator rounds to nearest; stochastic rounding takes the eager kernel.
        step(
            direction, group, step_index, bucket, reduced,
            lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay, fused=fused, foreach_flag=foreach_flag,
            owner=owner,
        )
        return None
    call = _kernel_call(direction, group, step_index, bucket, reduced, fused, owner, **args)
    if call is None:
        _foreach(direction, group, step_index, bucket, reduced, foreach_flag, args)
        return None
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
