r"""The fused backend for accelerators: one ``torch.compile``-d pass per tensor.

On CUDA (and other non-CPU devices) ``fused=True`` runs the whole schedule-free
update of a tensor as one generated kernel (Triton on GPU): it reads ``y``,
``g``, ``z`` and ``v`` (plus ``m`` with inner momentum) once and writes ``y``,
``z``, ``v`` once, with no parameter-sized temporary in memory. The math is
that of :func:`sfoptim.backends.cpu_kernel.step`.

Compile discipline (why nothing recompiles as training goes on):

* every tensor is flattened to 1-D and the function is compiled with dynamic
  shapes, so one graph serves every parameter size (sizes 0 and 1 aside, which
  dynamo specialises: at most two more graphs);
* every scalar that changes during training (learning rate, averaging weight,
  bias corrections) travels in one small tensor, so a new value is new data,
  not a new graph;
* what selects the graph is fixed for a run: the direction kind, whether an
  inner-momentum buffer exists, and the dtype.

The CPU uses the hand-written kernel in :mod:`sfoptim.backends.cpu_kernel` instead,
which needs no compilation time; this path is exercised on CPU by the tests.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .abi import KERNEL_SCALARS, Kind

__all__ = ["step", "update_one"]

_compiled: dict[tuple, Any] = {}
# Plain ints: dynamo does not fold comparisons with IntEnum members reliably.
_SGD, _ADAM = int(Kind.SGD), int(Kind.ADAM)
_warned = False
_warned_family = False


def update_one(y: Tensor, g: Tensor, z: Tensor, v: Tensor | None, m: Tensor | None, s: Tensor, kind: int) -> None:
    """The kernel's update of one tensor in torch operations (families ``SGD``, ``ADAM``, ``SGD_V``); ``s`` holds :data:`KERNEL_SCALARS` in order."""
    lr, ckp1, beta, wd, beta2, bc2, eps, mu, bc1 = s.unbind(0)[:9]  # the order of KERNEL_SCALARS
    if kind != _SGD:
        v.copy_(v * beta2 + g * g * (1 - beta2))  # type: ignore[union-attr, operator]
    if kind == _ADAM:
        num = g
        if m is not None:
            m.copy_(m * mu + g * (1 - mu))
            num = m / bc1
        d = num / ((v / bc2).sqrt() + eps)  # type: ignore[operator, arg-type]
    else:
        d = g
    wdz = s[_WDZ]
    at_z = wdz != 0  # the decay at z (wdz) in place of that at y (wd), as the C kernel selects it
    d = d + torch.where(at_z, wdz, wd) * torch.where(at_z, z, y)
    y.copy_(y + ckp1 * (z - y) + lr * (beta * (1 - ckp1) - 1) * d)
    z.copy_(z - lr * d)


# The unpacking above names the slots of the one declaration.
assert KERNEL_SCALARS[:9] == ("lr", "ckp1", "beta", "wd", "beta2", "bc2", "eps", "mu", "bc1")
_WDZ = KERNEL_SCALARS.index("wdz")
#: The families :func:`update_one` computes; others (Prodigy's) take the foreach path on these devices.
_FAMILIES = frozenset({Kind.SGD, Kind.ADAM, Kind.SGD_V})


def _kernel(kind: int, has_m: bool, dtype: torch.dtype) -> Any:
    """The compiled update for one variant, each with a code object of its own.

    Dynamo's recompile limit (8) counts graphs per code object; one shared
    ``update_one`` would reach it in a process that mixes directions, dtypes and
    size specialisations, and ``fullgraph=True`` turns that into an error.
    """
    key = (kind, has_m, dtype)
    compiled = _compiled.get(key)
    if compiled is None:
        name = f"_update_{kind}_{int(has_m)}_{str(dtype).rsplit('.', 1)[-1]}"
        names: dict[str, Any] = {"co_name": name}
        if sys.version_info >= (3, 11):
            names["co_qualname"] = name
        code = update_one.__code__.replace(**names)
        variant = types.FunctionType(code, update_one.__globals__, name)
        compiled = _compiled[key] = torch.compile(variant, dynamic=True, fullgraph=True)
    return compiled


def step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    slots: Sequence[list[Tensor]],
    kind: Kind,
    scalars: Sequence[float],
    explicit: bool = False,
) -> bool:
    """Same contract as :func:`sfoptim.backends.cpu_kernel.step`; False (nothing changed) if it cannot run.

    The ``PRODIGY`` family is not compiled: False, so its buckets take the foreach path.
    """
    global _warned, _warned_family
    if not ys:
        return True
    if kind not in _FAMILIES:
        if explicit and not _warned_family:
            _warned_family = True
            warnings.warn(
                f"sfoptim: fused=True, but the {kind.name} family has no compiled kernel; "
                "using the foreach implementation on this device.",
                stacklevel=4,
            )
        return False
    lists = [ys, grads, zs, *slots]
    if not all(type(t) is Tensor and t.is_contiguous() for group in lists for t in group):
        if explicit and not _warned:
            _warned = True
            warnings.warn(
                "sfoptim: fused=True needs contiguous plain tensors (not DTensor shards); "
                "using the foreach implementation for the others.",
                stacklevel=4,
            )
        return False
    values = torch.tensor(list(scalars), dtype=torch.float64, device=ys[0].device)
    v = slots[0] if len(slots) > 0 else None
    m = slots[1] if len(slots) > 1 else None
    kernel = _kernel(int(kind), m is not None, ys[0].dtype)
    for i, y in enumerate(ys):
        if y.numel() == 0:
            continue
        kernel(
            y.view(-1),
            grads[i].view(-1),
            zs[i].view(-1),
            v[i].view(-1) if v is not None else None,
            m[i].view(-1) if m is not None else None,
            values,
            int(kind),
        )
    return True
