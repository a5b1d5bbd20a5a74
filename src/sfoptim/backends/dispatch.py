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
  direction type. On CPU, where the policy allows a kernel, such a
  direction's foreach form gives the direction and the C kernel's ``SGD``
  family (:math:`d = g`) applies the decay and the update of ``y`` and ``z``
  in one pass (Muon's matrices).
* weight decay at ``z`` (``decay_at="z"``): the kernels take it as they
  take it at ``y``, in the same pass (the scalar ``wdz``).
* bfloat16 and float16 buckets (parameters kept in 16 bits, without
  ``state_dtype``): the C kernel computes in float32 and rounds every stored
  element once, to nearest, or stochastically with the group's
  ``stochastic_rounding`` (a seed drawn from torch's default generator per
  bucket and step, so ``torch.manual_seed`` makes it repeatable). Under
  ``torch.compile`` such a stochastic bucket is updated eagerly.
* what no kernel took: ``foreach=False`` one tensor at a time, else foreach.
* low-bit state (a :class:`KernelSpec` with ``state_precision`` "bf16" or
  "8bit"): the C kernel's low-bit step where the policy allows a kernel on
  CPU, else the same step in torch operations (:mod:`.lowbit`), eagerly also
  under ``torch.compile``; both round stochastically with a seed that is a
  function of the group's step count and the bucket's layout (not of torch's
  generator: a resumed run continues bit for bit, and every rank of a
  data-parallel run rounds alike), and agree bit for bit on float32
  parameters.

The same policy covers the wrapper's bookkeeping around its base optimizer,
and a direction's bucket sums (:attr:`Direction.bucket_sums`): where the
bucket may take the C kernel they come from :func:`.cpu_kernel.sums` in one
pass, else (and where that refuses the tensors) from the direction's own
``reduce``.
One description serves every mode: :func:`prepare` applies the policy and
fills in the kernel's scalars; :func:`run` executes it eagerly, and under
``torch.compile`` :func:`traced` packs the scalars into a tensor outside the
graph and :func:`traced_update` is the graph (the C kernel as the operator
``sfoptim::cpu_kernel_step`` on CPU, the kernel's math in torch operations
elsewhere).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import compiled, cpu_kernel, foreach, lowbit
from .abi import KERNEL_SCALARS, Bucket, Kind
from .abi import DirectionHooks as Direction

__all__ = ["BucketStep", "KernelCall", "TracedCall", "prepare", "reduce", "run", "traced", "traced_update", "wrap_after", "wrap_before"]

_no_kernel_warned: set[str] = set()
_SCALAR_DEFAULTS = {name: (1.0 if name in ("bc1", "bc2") else 0.0) for name in KERNEL_SCALARS}


def kernel_backend(device_type: str, fused: bool | None) -> Any:
    """The kernel module for a device: the C kernel on CPU, the compiled one elsewhere if asked for."""
    if device_type == "cpu":
        return cpu_kernel
    return compiled if fused else None


def _kernel_allowed(fused: bool | None, foreach_flag: bool | None) -> bool:
    return fused is not False and not (fused is None and foreach_flag is False)


class BucketStep(NamedTuple):
    """One bucket's update for one step, as the policy decided it; executed by :func:`run` or :func:`traced`."""

    direction: Direction
    group: dict
    step: int
    bucket: Bucket
    reduced: Mapping[str, Tensor]
    #: ``lr``, ``ckp1``, ``beta``, ``weight_decay`` and, when the decay is taken at z, ``decay_at_z``.
    args: dict[str, Any]
    #: The kernel module the policy allows for the bucket, or None.
    backend: Any
    #: The direction's kernel filled in for this step, or None (foreach).
    kernel: KernelCall | None
    fused: bool | None
    foreach_flag: bool | None


def prepare(
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
) -> BucketStep:
    """The update of ``bucket`` by this step: its scalars, and the kernel the policy allows (changes nothing).

    ``owner`` names the optimizer class in the warning about a missing kernel.
    """
    args: dict[str, Any] = dict(lr=lr, ckp1=ckp1, beta=beta, weight_decay=weight_decay)
    if decay_at_z and weight_decay != 0:
        args["decay_at_z"] = True
    allowed = _kernel_allowed(fused, foreach_flag)
    backend = kernel_backend(bucket.params[0].device.type, fused) if allowed else None
    call = _kernel_call(direction, group, step_index, bucket, reduced, fused, owner, **args)
    return BucketStep(direction, group, step_index, bucket, reduced, args, backend, call, fused, foreach_flag)


def run(u: BucketStep) -> None:
    """Executes ``u`` now: on the kernel the policy allows, else (and where the kernel refuses) foreach."""
    call = u.kernel
    if call is not None and call.state_precision != "full":
        _run_lowbit(u, call)
        return
    if call is not None and u.backend is not None:
        b = u.bucket
        rounding = {"seed": _stochastic_seed()} if u.backend is cpu_kernel and _stochastic(u.group, b) else {}
        if u.backend.step(b.params, b.grads, b.z, call.slots, call.kind, call.scalars, explicit=u.fused is True, **rounding):
            return
    if call is None and u.backend is cpu_kernel and u.foreach_flag is not False:
        _update_on_kernel(u)
        return
    _foreach(u)


def traced(u: BucketStep) -> TracedCall | None:
    """``u`` for a compiled step: its scalars packed into one tensor for :func:`traced_update`, or None after running it here.

    Runs outside the compiled region, so the graph depends on no changing
    number. An update without a kernel description runs here by the foreach
    path. On CPU, where the policy allows the kernel, the graph calls the C
    kernel as the operator ``sfoptim::cpu_kernel_step``; elsewhere (and with
    ``fused=False``) it traces the kernel's math (:func:`.compiled.update_one`),
    which the compiler fuses. Prodigy's family runs here, eagerly.
    """
    call = u.kernel
    if call is None:
        _foreach(u)
        return None
    device = u.bucket.params[0].device
    if call.state_precision != "full" or call.kind == Kind.PRODIGY or (u.backend is cpu_kernel and _stochastic(u.group, u.bucket)):
        # The traced operator rounds to nearest and has neither low-bit state
        # nor the Prodigy family: those take the eager kernel (or foreach).
        run(u)
        return None
    scalars = torch.tensor([float(v) for v in call.scalars], dtype=torch.float64)
    if device.type != "cpu":
        scalars = scalars.to(device)
    cpu_op = device.type == "cpu" and _kernel_allowed(u.fused, u.foreach_flag) and cpu_kernel.available()
    return TracedCall(u.bucket, int(call.kind), call.slots, scalars, cpu_op)


def _run_lowbit(u: BucketStep, call: KernelCall) -> None:
    """A bucket with low-bit state: the C kernel where allowed and possible, else torch operations (same bits)."""
    b = u.bucket
    seed = _lowbit_seed(u.step, b)
    vs, exps = call.slots[0], (call.slots[1] if call.state_precision == "8bit" else None)
    if u.backend is cpu_kernel and cpu_kernel.lowbit_step(
        b.params, b.grads, b.z, vs, exps, call.kind, call.scalars, seed, _stochastic(u.group, b), explicit=u.fused is True
    ):
        return
    lowbit.step(b.params, b.grads, b.z, vs, exps, call.kind, call.scalars, seed)


def _lowbit_seed(step_index: int, bucket: Bucket) -> int:
    """The rounding seed of a low-bit bucket: its step count, dtype, device and sizes, hashed (no random state)."""
    first = bucket.params[0]
    layout = f"{first.device.type}/{first.dtype}/{len(bucket.params)}/{sum(t.numel() for t in bucket.params)}"
    return (zlib.crc32(layout.encode()) << 32 | (step_index & 0xFFFF_FFFF)) & 0xFFFF_FFFF_FFFF_FFFF


def _stochastic(group: dict, bucket: Bucket) -> bool:
    """Whether the kernel rounds this bucket's stores stochastically (16-bit tensors, ``stochastic_rounding``)."""
    return bool(group.get("stochastic_rounding")) and bucket.params[0].dtype in cpu_kernel.NARROW


def _stochastic_seed() -> int:
    """A fresh 64-bit seed for one kernel call, from torch's default generator."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64).item())


def reduce(
    direction: Direction,
    group: dict,
    step_index: int,
    bucket: Bucket,
    beta: float,
    *,
    fused: bool | None,
    foreach_flag: bool | None,
) -> dict[str, Tensor]:
    """This bucket's contributions to the direction's reductions, on the backend its update will take."""
    wanted = direction.bucket_sums
    if wanted and _kernel_allowed(fused, foreach_flag) and bucket.params[0].device.type == "cpu":
        inputs = direction.sum_inputs(group, step_index)
        buffers = [bucket.buffers[name] for name in inputs.buffers]
        scalars = [dict(_SCALAR_DEFAULTS, **inputs.scalars)[name] for name in KERNEL_SCALARS] if inputs.scalars else []
        sums = cpu_kernel.sums(bucket.grads, bucket.z, bucket.params, wanted, buffers, scalars)
        if sums is not None:
            return direction.reduce_sums(
                group, step_index, beta, {s: torch.tensor(v, dtype=torch.float64) for s, v in sums.items()}
            )
    return direction.reduce(group, step_index, bucket, beta)


def _engine_scalars(lr: float, ckp1: float, beta: float, weight_decay: float, decay_at_z: bool) -> dict[str, Any]:
    """The kernel scalars the engine owns (the rest at their defaults); the decay goes to ``wdz`` when taken at ``z``."""
    decay = dict(wdz=weight_decay) if decay_at_z else dict(wd=weight_decay)
    return dict(_SCALAR_DEFAULTS, lr=lr, ckp1=ckp1, beta=beta, **decay)


def _update_on_kernel(u: BucketStep) -> None:
    """A direction without a kernel of its own (Muon's orthogonalized update) on CPU: its
    foreach form gives ``d``, and the C kernel's SGD family (:math:`d = g`) applies the decay
    and the update of ``y`` and ``z`` in one pass; where the kernel refuses, foreach does."""
    d, owned = u.direction.foreach(u.group, u.step, u.bucket, u.reduced)
    a = u.args
    values = _engine_scalars(a["lr"], a["ckp1"], a["beta"], a["weight_decay"], a.get("decay_at_z", False))
    b = u.bucket
    seed = _stochastic_seed() if _stochastic(u.group, b) else None
    if not cpu_kernel.step(b.params, d, b.z, [], Kind.SGD, [values[n] for n in KERNEL_SCALARS], seed=seed):
        foreach.update(b, d, owned=owned, **a)


def _foreach(u: BucketStep) -> None:
    buckets = foreach.split(u.bucket) if u.foreach_flag is False else [u.bucket]
    for bucket in buckets:
        foreach.step(u.direction, u.group, u.step, bucket, u.reduced, **u.args)


class KernelCall(NamedTuple):
    """What a kernel needs for one bucket besides its tensors."""

    kind: Kind
    #: The direction's buffers in the kernel's slot order (``v``, then ``m``).
    slots: list[list[Tensor]]
    #: The values of :data:`KERNEL_SCALARS`, in order.
    scalars: list[Any]
    #: The state's format (:attr:`KernelSpec.state_precision`).
    state_precision: str = "full"


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
    decay_at_z: bool = False,
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
                stacklevel=6,
            )
        return None
    if decay_at_z and spec.state_precision != "full":
        return None  # the low-bit step decays at y only (such groups are refused at construction)
    values = _engine_scalars(lr, ckp1, beta, weight_decay, decay_at_z)
    values.update(spec.scalars)
    return KernelCall(
        spec.kind, [bucket.buffers[name] for name in spec.buffers], [values[name] for name in KERNEL_SCALARS], spec.state_precision
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
