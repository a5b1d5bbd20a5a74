r"""The fused CPU backend: one C kernel call per bucket, one pass over memory.

The kernel (``cpu_kernel.c``) reads ``y``, ``g``, ``z`` (and ``v``, plus
``m`` with inner momentum) once and writes ``y``, ``z``, ``v`` once per
element: the same seven passes as ``torch.optim.AdamW(fused=True)`` and no
parameter-sized temporary. Scalars (step-dependent lr, ``c``, bias
corrections) are plain arguments, so nothing is rebuilt when they change.

Build contract: the source is compiled on first use with the system C compiler
(``$SFOPTIM_CC``, else ``$CC``, else ``gcc``) into a per-user cache directory
(``$SFOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/sfoptim``, else
``~/.cache/sfoptim``), under a name keyed by a hash of the source, the
compiler's identity, the flags and the CPU's feature flags (``-march=native``
code must not run on another CPU model) and carrying the SHA-256 of the built
library. :mod:`sfoptim.backends.kernel_cache` owns that contract: it loads only a
private file of the user's own whose bytes match that hash, checked before
``dlopen``. Later processes load the cached file; within a process the library
is loaded once. Without a working compiler (or with ``SFOPTIM_DISABLE_FUSED=1``)
the loader warns once and every call returns False, so the engine falls back to
foreach.
The direction kinds and the scalar slots are passed to the compiler as
definitions generated from :class:`sfoptim.directions.base.Kind` and
:data:`~sfoptim.directions.base.KERNEL_SCALARS`, so the C source restates
neither.

OpenMP: the library is linked against ``libgomp.so.1``, the soname of the
runtime that the PyTorch wheel ships and has already loaded, so the dynamic
loader binds both to one runtime and one thread pool. The thread count is
passed per call from :func:`torch.get_num_threads`.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..directions.base import KERNEL_SCALARS, Kind
from . import kernel_cache

__all__ = ["available", "step", "wrap_before", "wrap_after"]

_SOURCE = Path(__file__).with_name("cpu_kernel.c")
_DEFINES = tuple(f"-DSF_{kind.name}={kind.value}" for kind in Kind) + tuple(
    f"-DSF_{name.upper()}={slot}" for slot, name in enumerate(KERNEL_SCALARS)
)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11", *_DEFINES)
_LIBS = ("-lm",)
_DTYPES = {torch.float32: "float", torch.float64: "double"}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None
_warned: set[str] = set()
#: Number of compilations and library loads in this process (tests check reuse).
build_count = 0
load_count = 0


_Scalars = ctypes.c_double * len(KERNEL_SCALARS)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptrs, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for t in _DTYPES.values():
        fn = getattr(lib, f"sf_step_{t}")
        fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ptrs, ptrs, ctypes.POINTER(ctypes.c_double), cint, cint]
        fn.restype = cint
        for name in ("sf_wrap_before", "sf_wrap_after"):
            fn = getattr(lib, f"{name}_{t}")
            fn.argtypes = [i64, ptrs, ptrs, ptrs, dbl, dbl, cint]
            fn.restype = cint


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _failed, build_count, load_count
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get("SFOPTIM_DISABLE_FUSED", "") not in ("", "0"):
            _failed = "disabled by SFOPTIM_DISABLE_FUSED"
            return None
        try:
            loaded = kernel_cache.load(
                _SOURCE, _FLAGS, _LIBS, warn=lambda message: _warn_once("cache", f"sfoptim: {message}.")
            )
            if loaded.built:
                build_count += 1
            lib = loaded.lib
            if lib.sf_abi_version() != 1:
                raise RuntimeError("stale kernel library in the cache")
            _declare(lib)
        except Exception as exc:  # any failure means: use foreach, say so once
            _failed = str(exc)
            _warn_once(
                "build",
                f"sfoptim: the fused CPU kernel is unavailable ({_failed}); falling back to the foreach implementation.",
            )
            return None
        load_count += 1
        _lib = lib
        return lib


def available() -> bool:
    """True when the CPU kernel is built (or buildable now) and loaded."""
    return _load() is not None


def _reset_for_tests() -> None:
    global _lib, _failed
    _lib, _failed = None, None
    _warned.clear()


def _eligible(tensors: Sequence[Sequence[Tensor]], bucketed: bool = True) -> Optional[str]:
    first = tensors[0][0]
    if first.device.type != "cpu":
        return "cpu"
    if first.dtype not in _DTYPES:
        return "dtype"
    # Buckets share one device and dtype, and autograd keeps each gradient on
    # its parameter's device and dtype; state buffers are created like the
    # parameter. So the per-step cost is one contiguity check per tensor,
    # plus a dtype check per list head. Lists that are not engine buckets (the
    # wrapper's param groups may mix dtypes) get every tensor checked.
    for group in tensors:
        if group[0].dtype != first.dtype or group[0].device != first.device:
            return "layout"
        if not bucketed and any(t.dtype != first.dtype or t.device != first.device for t in group):
            return "layout"
        # Tensor subclasses (DTensor shards under FSDP2) hide their storage
        # behind data_ptr(); they take the foreach path, which handles them.
        if not all(type(t) is Tensor and t.is_contiguous() for t in group):
            return "layout"
    return None


def _refuse(reason: str, explicit: bool) -> bool:
    if explicit:
        what = {
            "cpu": "tensors that are not on the CPU (no fused GPU kernel yet)",
            "dtype": "dtypes other than float32/float64",
            "layout": "non-contiguous tensors, tensor subclasses such as DTensor, or mixed gradient dtypes",
        }[reason]
        _warn_once(reason, f"sfoptim: fused=True does not support {what}; using the foreach implementation for them.")
    return False


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    slots: Sequence[list[Tensor]],
    kind: Kind,
    scalars: Sequence[float],
    explicit: bool = False,
) -> bool:
    r"""One fused schedule-free step over a bucket; False if it cannot run here.

    ``slots`` are the direction's buffers in the kernel's order (``v``, then
    ``m``) and ``scalars`` the values of :data:`KERNEL_SCALARS` in order. With
    :math:`d = \hat m/(\sqrt{v/bc_2}+\epsilon) + \lambda y` (``ADAM``, after
    :math:`v \leftarrow \beta_2 v + (1-\beta_2)g^2`; :math:`\hat m = g`, or the
    inner-momentum EMA divided by ``bc1``) or :math:`d = g + \lambda y`
    (``SGD``; ``SGD_V`` also updates ``v``), every element gets
    :math:`y \leftarrow \operatorname{lerp}(y, z, c) + \gamma(\beta(1-c)-1)d`,
    :math:`z \leftarrow z - \gamma d`. ``grads`` are only read. When False is
    returned nothing has been modified.
    """
    if not ys:
        return True
    reason = _eligible([ys, grads, zs, *slots])
    if reason is not None:
        return _refuse(reason, explicit)
    lib = _load()
    if lib is None:
        return False
    sizes = (ctypes.c_int64 * len(ys))(*[t.numel() for t in ys])
    fn = getattr(lib, f"sf_step_{_DTYPES[ys[0].dtype]}")
    rc = fn(
        len(ys),
        _pointers(ys),
        _pointers(grads),
        _pointers(zs),
        _pointers(slots[0]) if len(slots) > 0 else None,
        _pointers(slots[1]) if len(slots) > 1 else None,
        sizes,
        _Scalars(*scalars),
        int(kind),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


def _wrap_call(name: str, a: list[Tensor], b: list[Tensor], s1: float, s2: float, explicit: bool) -> bool:
    if not a:
        return True
    reason = _eligible([a, b], bucketed=False)
    if reason is not None:
        return _refuse(reason, explicit)
    lib = _load()
    if lib is None:
        return False
    sizes = (ctypes.c_int64 * len(a))(*[t.numel() for t in a])
    fn = getattr(lib, f"{name}_{_DTYPES[a[0].dtype]}")
    if fn(len(a), _pointers(a), _pointers(b), sizes, s1, s2, torch.get_num_threads()) != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


def wrap_before(ys: list[Tensor], zs: list[Tensor], lr_decay: float, beta: float, explicit: bool = False) -> bool:
    r"""The wrapper's pre-step in one pass: ``z -= a y``; ``y *= 1 - a(1-\beta)``; ``y = lerp(y, z, 1-1/\beta)``.

    ``a`` is ``lr * weight_decay_at_y``. Afterwards ``ys`` hold ``x``. False if it cannot run here.
    """
    return _wrap_call("sf_wrap_before", ys, zs, lr_decay, beta, explicit)


def wrap_after(xs: list[Tensor], zs: list[Tensor], ckp1: float, beta: float, explicit: bool = False) -> bool:
    r"""The wrapper's post-step in one pass: ``x = lerp(x, z, c)``, then ``lerp(x, z, 1-\beta)`` (the new ``y``)."""
    return _wrap_call("sf_wrap_after", xs, zs, ckp1, beta, explicit)
