r"""The fused CPU backend: one C kernel call per bucket, one pass over memory.

The kernel (``cpu_kernel.c``) reads ``y``, ``g``, ``z`` and ``v`` once and
writes ``y``, ``z``, ``v`` once per element: for schedule-free AdamW the same
seven passes as ``torch.optim.AdamW(fused=True)``, and no parameter-sized
temporary (with inner momentum, ``m`` adds a read and a write; an ``m`` slot
with momentum 0, as in ScheduleFree+'s defaults, is set to ``g`` and only
written). Scalars (step-dependent lr, ``c``, bias corrections) are plain
arguments, so nothing is rebuilt when they change.

Dtypes: every tensor of a call has the same dtype, one of float64 (computed in
float64), float32, bfloat16 and float16 (computed in float32). A 16-bit
element is widened exactly when it is read and rounded once when it is
written: to nearest, ties to even, or, when :func:`step` is given a ``seed``,
stochastically (up or down with probability proportional to the distance, so
the stored value equals the computed one in expectation). The random bits are
a hash of the seed, the tensor's position in the call and the element's index,
so the result does not depend on the thread count.

A direction whose global reductions are generic bucket sums
(:class:`~sfoptim.backends.abi.BucketSum`: ScheduleFree+'s
:math:`\sum |g|` and :math:`\sum \langle g, z - y\rangle`) gets them from
:func:`sums`, one more read of ``g``, ``z`` and ``y`` in a single call per
bucket, accumulated in float64 and independent of the thread count.

Schedule-free Prodigy (the ``PRODIGY`` family) has entry points of its own,
since its buffers may be narrower than the parameter (``buffer_dtype``): a
call takes parameters, gradients and ``z`` of one dtype and buffers of one
dtype, in the pairs of :data:`PRODIGY_PAIRS`. Its sums (:math:`\sum g(p_0 -
z)`, :math:`\sum |\rho s + a g|`) read ``g``, ``z``, ``p0`` and ``s``; its
step reads ``g`` and ``v`` once more for the update clip (each tensor's RMS)
and then updates ``y``, ``z``, ``v`` and ``s`` in one pass.

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
The direction kinds, the scalar slots and the bucket sums' output slots are
passed to the compiler as definitions generated from
:class:`sfoptim.backends.abi.Kind`,
:data:`~sfoptim.backends.abi.KERNEL_SCALARS` and
:class:`~sfoptim.backends.abi.BucketSum`, so the C source restates none of
them.

OpenMP: the library is linked against ``libgomp.so.1``, the soname of the
runtime that the PyTorch wheel ships and has already loaded, so the dynamic
loader binds both to one runtime and one thread pool. The thread count is
passed per call from :func:`torch.get_num_threads`.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import operator
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernel_cache
from .abi import ABI_VERSION, BUFFER_SUMS, KERNEL_SCALARS, KIND_SLOTS, BucketSum, Kind, build_defines
from .compiled import update_one
from .lowbit import num_blocks

__all__ = ["NARROW", "PRODIGY_PAIRS", "available", "lowbit_step", "step", "sums", "wrap_before", "wrap_after"]

_SOURCE = Path(__file__).with_name("cpu_kernel.c")
_DEFINES = build_defines()
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11", *_DEFINES)
_LIBS = ("-lm",)
_DTYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: Dtypes whose stores round (a ``seed`` makes the rounding stochastic).
NARROW = frozenset({torch.bfloat16, torch.float16})
#: (parameter dtype, buffer dtype) pairs of the ``PRODIGY`` family: one dtype for
#: both, or float32 with 16-bit buffers, or 16-bit parameters with float32 buffers.
PRODIGY_PAIRS = frozenset(
    {(t, t) for t in _DTYPES}
    | {(torch.float32, t) for t in NARROW}
    | {(t, torch.float32) for t in NARROW}
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_warned: set[str] = set()
#: Number of compilations and library loads in this process (tests check reuse).
build_count = 0
load_count = 0


_Scalars = ctypes.c_double * len(KERNEL_SCALARS)
_WDZ = KERNEL_SCALARS.index("wdz")
_Sums = ctypes.c_double * len(BucketSum)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptrs, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for t in _DTYPES.values():
        fn = getattr(lib, f"sf_step_{t}")
        fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ptrs, ptrs, ctypes.POINTER(ctypes.c_double), cint, cint, ctypes.c_uint64, cint]
        fn.restype = cint
        fn = getattr(lib, f"sf_sums_{t}")
        fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, cint, ctypes.POINTER(ctypes.c_double), cint]
        fn.restype = cint
        if t != "double":
            fn = getattr(lib, f"sf_lowbit_step_{t}")
            fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ptrs, ptrs, ctypes.POINTER(ctypes.c_double), cint, cint, cint, ctypes.c_uint64, cint]
            fn.restype = cint
        for name in ("sf_wrap_before", "sf_wrap_after"):
            fn = getattr(lib, f"{name}_{t}")
            fn.argtypes = [i64, ptrs, ptrs, ptrs, dbl, dbl, cint]
            fn.restype = cint
    scalars = ctypes.POINTER(ctypes.c_double)
    for pdt, bdt in PRODIGY_PAIRS:
        pair = f"{_DTYPES[pdt]}_{_DTYPES[bdt]}"
        fn = getattr(lib, f"sf_prodigy_step_{pair}")
        fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ptrs, ptrs, scalars, cint, ctypes.c_uint64, cint]
        fn.restype = cint
        fn = getattr(lib, f"sf_prodigy_sums_{pair}")
        fn.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ptrs, scalars, scalars, cint]
        fn.restype = cint


def _load() -> ctypes.CDLL | None:
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
            if lib.sf_abi_version() != ABI_VERSION:
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


def _install_library_for_tests(lib: ctypes.CDLL) -> None:
    """Makes an already opened build of ``cpu_kernel.c`` the kernel (tests only).

    The AddressSanitizer test compiles the kernel with ``-fsanitize=address``
    and runs the fuzz cases through this; nothing else ever calls it, and no
    environment variable or file name can reach it.
    """
    global _lib, _failed
    _declare(lib)
    _lib, _failed = lib, None


class _Call(NamedTuple):
    """What one kernel call needs, gathered while every tensor is checked.

    ``table`` holds, as C ``int64``, the data pointers of the lists back to
    back (list ``k`` from index ``k * n``) followed by the ``n`` element
    counts; :meth:`array` gives the address of its ``k``-th array, valid while
    this object lives.
    """

    dtype: torch.dtype
    n: int
    table: array.array
    address: int
    #: The dtype of the lists from ``split`` on (the parameter's where the call has one dtype).
    buffer_dtype: torch.dtype | None = None

    def array(self, k: int) -> int:
        return self.address + k * self.n * self.table.itemsize


#: Pointer tables of disjoint calls (None: overlapping) by (pointers, sizes, element
#: size), which is all the verdict and the table depend on; see :func:`_table`.
_tables: dict[tuple, array.array | None] = {}

_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")
_PLAIN = {Tensor}


def _inspect(tensors: Sequence[Sequence[Tensor]], split: int | None = None) -> str | _Call:
    """Checks every tensor of a kernel call: a refusal reason, or the call's pointers.

    With ``split``, the lists from that index on (Prodigy's buffers) share a
    dtype of their own, which must form one of :data:`PRODIGY_PAIRS` with the
    others'.

    The C kernel trusts its arguments completely: every list holds, at each
    index, a dense tensor of the same number of elements and of the dtype the
    kernel is compiled for, in CPU memory, and no written element is reachable
    through two pointers. So every tensor is checked here, on every call:
    layouts the kernel does not handle (other devices or dtypes, strides,
    tensor subclasses, memory shared between tensors) get a reason and take the
    foreach path, which defines the result; tensors that cannot belong
    together (a state buffer whose shape is not its parameter's) raise
    RuntimeError, as foreach does, before anything is modified.

    Each property is read for all tensors of the call in one ``map`` (which
    iterates in C) rather than tensor by tensor in Python: with hundreds of
    small tensors these reads are most of what a step costs beyond the kernel.
    """
    head = tensors[0]
    first = head[0]
    if not first.is_cpu:
        return "cpu"
    dtype = first.dtype
    if dtype not in _DTYPES:
        return "dtype"
    n = len(head)
    shapes = list(map(_shape_of, head))
    for lst in tensors:
        if len(lst) != n:
            raise RuntimeError(f"sfoptim fused kernel: tensor lists of different lengths ({len(lst)} and {n})")
        if lst is not head and list(map(_shape_of, lst)) != shapes:
            i = next(i for i, (t, s) in enumerate(zip(lst, shapes)) if t.shape != s)
            raise RuntimeError(
                f"sfoptim: tensor {i} of a bucket has shape {tuple(shapes[i])} but its state or gradient has "
                f"shape {tuple(lst[i].shape)}; the optimizer state does not belong to this parameter"
            )
    flat = list(itertools.chain.from_iterable(tensors))
    # Tensor subclasses (DTensor shards under FSDP2) hide their storage
    # behind data_ptr(); they take the foreach path, which handles them. The
    # type is checked first, so the reads below only ever see plain tensors.
    if set(map(type, flat)) != _PLAIN:
        return "layout"
    cut = len(tensors) if split is None else split
    main = n * cut
    buffer_dtype = dtype
    if main < len(flat) and n:
        buffer_dtype = flat[main].dtype
        if (dtype, buffer_dtype) not in PRODIGY_PAIRS:
            return "pair" if buffer_dtype in _DTYPES else "layout"
    dtypes = list(map(_dtype_of, flat))
    if (
        dtypes[:main].count(dtype) != main
        or dtypes[main:].count(buffer_dtype) != len(flat) - main
        or not all(map(_is_cpu, flat))
        or not all(map(Tensor.is_contiguous, flat))
    ):
        return "layout"
    sizes = (first.element_size(),) * cut
    if main < len(flat):
        sizes += (flat[main].element_size(),) * (len(tensors) - cut)
    table = _table(list(map(Tensor.data_ptr, flat)), list(map(Tensor.numel, head)), sizes)
    if table is None:
        return "alias"
    return _Call(dtype, n, table, table.buffer_info()[0], buffer_dtype)


def _table(pointers: list[int], sizes: list[int], element_sizes: tuple[int, ...]) -> array.array | None:
    """The call's pointer table, or None when two tensors of the call share any byte of memory.

    ``pointers`` are those of all lists back to back, each list as long as
    ``sizes`` (element counts by index), list ``k`` of elements of
    ``element_sizes[k]`` bytes. The kernel splits the work across
    threads and keeps each element's values in registers between reading and
    writing them, which is only the foreach result when no element is
    reachable twice (the same parameter listed twice, overlapping views, a
    state buffer aliasing its gradient). Sorted by start address, disjoint
    intervals have each start at or after the previous end, so one comparison
    per neighbour decides. Both the verdict and the table are functions of the
    exact addresses and sizes, so they are kept by those: a training loop
    whose tensors stay where they are builds neither again.
    """
    key = (tuple(pointers), tuple(sizes), element_sizes)
    try:
        return _tables[key]
    except KeyError:
        pass
    nbytes = [s * e for e in element_sizes for s in sizes]
    spans = sorted((start, start + size) for start, size in zip(pointers, nbytes) if size)
    table = None
    if not any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        table = array.array("q", pointers)
        table.extend(sizes)
    if len(_tables) >= 64:
        _tables.clear()
    _tables[key] = table
    return table


def _refuse(reason: str, explicit: bool) -> bool:
    if explicit:
        what = {
            "cpu": "tensors that are not on the CPU (no fused GPU kernel yet)",
            "dtype": "dtypes other than float64, float32, bfloat16 and float16",
            "layout": "non-contiguous tensors, tensor subclasses such as DTensor, or mixed dtypes",
            "alias": "parameters or state that share memory (a parameter listed twice, overlapping views)",
            "lowbit-dtype": "low-bit state (state_precision) of parameters other than float32, bfloat16 and float16",
            "pair": "this buffer_dtype with these parameters (supported: the parameters' dtype, float32 with 16-bit "
            "buffers, 16-bit parameters with float32 buffers)",
        }[reason]
        _warn_once(reason, f"sfoptim: fused=True does not support {what}; using the foreach implementation for them.")
    return False


def step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    slots: Sequence[list[Tensor]],
    kind: Kind,
    scalars: Sequence[float],
    explicit: bool = False,
    seed: int | None = None,
) -> bool:
    r"""One fused schedule-free step over a bucket; False if it cannot run here.

    ``slots`` are the direction's buffers in the kernel's order (``v``, then
    ``m``) and ``scalars`` the values of :data:`KERNEL_SCALARS` in order. With
    :math:`d = \hat m/(\sqrt{v/bc_2}+\epsilon) + \lambda y` (``ADAM``, after
    :math:`v \leftarrow \beta_2 v + (1-\beta_2)g^2`; :math:`\hat m = g`, or the
    inner-momentum EMA divided by ``bc1``) or :math:`d = g + \lambda y`
    (``SGD``; ``SGD_V`` also updates ``v``), every element gets
    :math:`y \leftarrow \operatorname{lerp}(y, z, c) + \gamma(\beta(1-c)-1)d`,
    :math:`z \leftarrow z - \gamma d`, where the decay :math:`\lambda y` (``wd``)
    is :math:`\lambda z` when the scalar ``wdz`` = :math:`\lambda` is nonzero.
    ``grads`` are only read. When False is returned nothing has been modified.

    All tensors share one dtype (see the module docstring); bfloat16 and
    float16 are computed in float32 and every written element is rounded to
    nearest, or stochastically with ``seed`` (an integer, drawn afresh for
    every step: the same seed and tensors give the same result). float32 and
    float64 ignore ``seed``.
    """
    if not ys:
        return True
    fewest, most = KIND_SLOTS.get(kind, (-1, -1))
    if not fewest <= len(slots) <= most:
        raise ValueError(f"sfoptim fused kernel: direction kind {kind!r} takes {fewest} to {most} buffers, got {len(slots)}")
    if kind == Kind.PRODIGY:
        return _prodigy_step(ys, grads, zs, slots, scalars, explicit, seed)
    call = _inspect([ys, grads, zs, *slots])
    if isinstance(call, str):
        return _refuse(call, explicit)
    lib = _load()
    if lib is None:
        return False
    lists = 3 + len(slots)
    fn = getattr(lib, f"sf_step_{_DTYPES[call.dtype]}")
    rc = fn(
        call.n,
        call.array(0),
        call.array(1),
        call.array(2),
        call.array(3) if len(slots) > 0 else None,
        call.array(4) if len(slots) > 1 else None,
        call.array(lists),
        _Scalars(*scalars),
        int(kind),
        int(seed is not None and call.dtype in NARROW),
        (seed or 0) & 0xFFFF_FFFF_FFFF_FFFF,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


def _prodigy_step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    slots: Sequence[list[Tensor]],
    scalars: Sequence[float],
    explicit: bool,
    seed: int | None,
) -> bool:
    """The ``PRODIGY`` family: ``slots`` are ``v`` and ``s`` in a dtype of their own (see :func:`step`)."""
    call = _inspect([ys, grads, zs, *slots], split=3)
    if isinstance(call, str):
        return _refuse(call, explicit)
    lib = _load()
    if lib is None:
        return False
    narrow = call.dtype in NARROW or call.buffer_dtype in NARROW
    fn = getattr(lib, f"sf_prodigy_step_{_DTYPES[call.dtype]}_{_DTYPES[call.buffer_dtype]}")  # type: ignore[index]
    rc = fn(
        call.n,
        call.array(0),
        call.array(1),
        call.array(2),
        call.array(3),
        call.array(4),
        call.array(5),
        _Scalars(*scalars),
        int(seed is not None and narrow),
        (seed or 0) & 0xFFFF_FFFF_FFFF_FFFF,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


def sums(
    grads: list[Tensor],
    zs: list[Tensor],
    ys: list[Tensor],
    wanted: Sequence[BucketSum],
    buffers: Sequence[list[Tensor]] = (),
    scalars: Sequence[float] = (),
) -> dict[BucketSum, float] | None:
    r"""The bucket sums ``wanted`` in one pass over the bucket; None if the kernel cannot take it.

    :math:`\sum |g|` (``GRAD_L1``) and :math:`\sum g\,(z - y)`
    (``GRAD_Z_MINUS_Y``) over every element of every tensor, accumulated in
    float64 in an order that depends only on the sizes (not on the thread
    count), so repeated calls agree bit for bit. Without ``GRAD_Z_MINUS_Y``
    only the gradients are read (and checked). Or Prodigy's
    :data:`~sfoptim.backends.abi.BUFFER_SUMS`, :math:`\sum g(p_0 - z)` and
    :math:`\sum |\rho s + a g|`, with ``buffers`` = ``[p0, s]`` (in a dtype
    of their own, see :data:`PRODIGY_PAIRS`) and ``scalars`` the values of
    :data:`KERNEL_SCALARS` (``rho`` and ``accum`` are read); ``ys`` are not
    read. Every tensor passes the same checks as for :func:`step`; nothing
    is written. Refusals are silent: the caller's torch path gives the sums
    instead.
    """
    if not grads:
        return {s: 0.0 for s in wanted}
    if BUFFER_SUMS & set(wanted):
        return _buffer_sums(grads, zs, wanted, buffers, scalars)
    gap = BucketSum.GRAD_Z_MINUS_Y in wanted
    call = _inspect([grads, zs, ys] if gap else [grads])
    if isinstance(call, str):
        return None
    lib = _load()
    if lib is None:
        return None
    out = _Sums()
    fn = getattr(lib, f"sf_sums_{_DTYPES[call.dtype]}")
    lists = 3 if gap else 1
    rc = fn(
        call.n,
        call.array(0),
        call.array(1) if gap else None,
        call.array(2) if gap else None,
        call.array(lists),
        int(gap),
        out,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return {s: out[s] for s in wanted}


def _buffer_sums(
    grads: list[Tensor], zs: list[Tensor], wanted: Sequence[BucketSum], buffers: Sequence[list[Tensor]], scalars: Sequence[float]
) -> dict[BucketSum, float] | None:
    if not BUFFER_SUMS.issuperset(wanted) or len(buffers) != 2 or len(scalars) != len(KERNEL_SCALARS):
        raise ValueError(
            "sfoptim fused kernel: Prodigy's bucket sums are taken on their own, with the buffers p0 and s and every scalar"
        )
    call = _inspect([grads, zs, *buffers], split=2)
    if isinstance(call, str):
        return None
    lib = _load()
    if lib is None:
        return None
    out = _Sums()
    fn = getattr(lib, f"sf_prodigy_sums_{_DTYPES[call.dtype]}_{_DTYPES[call.buffer_dtype]}")  # type: ignore[index]
    rc = fn(
        call.n, call.array(0), call.array(1), call.array(2), call.array(3), call.array(4),
        _Scalars(*scalars), out, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return {s: out[s] for s in wanted}


def _wrap_call(name: str, a: list[Tensor], b: list[Tensor], s1: float, s2: float, explicit: bool) -> bool:
    if not a:
        return True
    call = _inspect([a, b])
    if isinstance(call, str):
        return _refuse(call, explicit)
    lib = _load()
    if lib is None:
        return False
    fn = getattr(lib, f"{name}_{_DTYPES[call.dtype]}")
    if fn(call.n, call.array(0), call.array(1), call.array(2), s1, s2, torch.get_num_threads()) != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


def wrap_before(ys: list[Tensor], zs: list[Tensor], lr_decay: float, beta: float, explicit: bool = False) -> bool:
    r"""The wrapper's pre-step in one pass: ``z -= a y``; ``y *= 1 - a(1-\beta)``; ``y = lerp(y, z, 1-1/\beta)``.

    ``a`` is ``lr * weight_decay_at_y``. Afterwards ``ys`` hold ``x``. False if it cannot run here.
    16-bit tensors are computed in float32 and rounded to nearest, as by :func:`step` without a seed.
    """
    return _wrap_call("sf_wrap_before", ys, zs, lr_decay, beta, explicit)


def wrap_after(xs: list[Tensor], zs: list[Tensor], ckp1: float, beta: float, explicit: bool = False) -> bool:
    r"""The wrapper's post-step in one pass: ``x = lerp(x, z, c)``, then ``lerp(x, z, 1-\beta)`` (the new ``y``)."""
    return _wrap_call("sf_wrap_after", xs, zs, ckp1, beta, explicit)


#: Formats of the low-bit kernel's v (cpu_kernel.c: SF_LB_BF16, SF_LB_8BIT).
_LOWBIT_FORMATS = {"bf16": 1, "8bit": 2}
_LOWBIT_PARAMS = (torch.float32, torch.bfloat16, torch.float16)


def _inspect_lowbit(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], vs: list[Tensor], exps: list[Tensor] | None
) -> str | tuple[array.array, int]:
    """Checks every tensor of a low-bit kernel call: a refusal reason, or (pointer table, n).

    Same contract as :func:`_inspect`, for lists of different dtypes: ``ys``
    and ``grads`` of one dtype in float32/bfloat16/float16, ``zs`` bfloat16,
    ``vs`` bfloat16 (no ``exps``) or uint8 with ``exps`` int8 of
    :func:`~sfoptim.backends.lowbit.num_blocks` elements; every tensor dense,
    contiguous, a plain CPU tensor, no byte reachable twice. A state buffer
    whose shape or size is not its parameter's raises RuntimeError.
    """
    first = ys[0]
    if not first.is_cpu:
        return "cpu"
    dtype = first.dtype
    if dtype not in _LOWBIT_PARAMS:
        return "lowbit-dtype"
    n = len(ys)
    lists = [ys, grads, zs, vs] + ([exps] if exps is not None else [])
    for lst in lists:
        if len(lst) != n:
            raise RuntimeError(f"sfoptim fused kernel: tensor lists of different lengths ({len(lst)} and {n})")
    shapes = list(map(_shape_of, ys))
    for lst in (grads, zs, vs):
        if list(map(_shape_of, lst)) != shapes:
            i = next(i for i, (t, s) in enumerate(zip(lst, shapes)) if t.shape != s)
            raise RuntimeError(
                f"sfoptim: tensor {i} of a bucket has shape {tuple(shapes[i])} but its state or gradient has "
                f"shape {tuple(lst[i].shape)}; the optimizer state does not belong to this parameter"
            )
    sizes = list(map(Tensor.numel, ys))
    if exps is not None and list(map(Tensor.numel, exps)) != [num_blocks(s) for s in sizes]:
        raise RuntimeError("sfoptim: an 8-bit second moment has the wrong number of block exponents for its parameter")
    flat = list(itertools.chain.from_iterable(lists))
    if set(map(type, flat)) != _PLAIN or not all(map(_is_cpu, flat)) or not all(map(Tensor.is_contiguous, flat)):
        return "layout"
    v_dtype = torch.uint8 if exps is not None else torch.bfloat16
    wanted = [dtype, dtype, torch.bfloat16, v_dtype] + ([torch.int8] if exps is not None else [])
    if any(list(map(_dtype_of, lst)).count(want) != n for lst, want in zip(lists, wanted)):
        return "layout"
    pointers = list(map(Tensor.data_ptr, flat))
    nbytes = list(itertools.chain.from_iterable([t.numel() * t.element_size() for t in lst] for lst in lists))
    spans = sorted((start, start + size) for start, size in zip(pointers, nbytes) if size)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        return "alias"
    table = array.array("q", pointers)
    table.extend(sizes)
    return table, n


def lowbit_step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    vs: list[Tensor],
    exps: list[Tensor] | None,
    kind: Kind,
    scalars: Sequence[float],
    seed: int | None,
    stochastic_y: bool = False,
    explicit: bool = False,
) -> bool:
    r"""One fused schedule-free Adam step with low-bit state; False (nothing changed) if it cannot run here.

    The math and the formats are those of :func:`sfoptim.backends.lowbit.step`
    (``z`` bfloat16; ``v`` bfloat16, or 8-bit codes of :math:`\sqrt v` with
    int8 block exponents ``exps``), and so are the bits: ``z`` and ``v`` are
    rounded stochastically with random bits from ``seed`` (None: to nearest).
    ``stochastic_y`` rounds 16-bit parameters stochastically too (the torch
    implementation rounds them to nearest). ``kind`` is ``ADAM`` or ``SGD_V``.
    The decay is taken at ``y`` only (``wdz`` must be 0).
    """
    if not ys:
        return True
    if len(scalars) > _WDZ and scalars[_WDZ] != 0:
        raise ValueError(f"sfoptim low-bit kernel: wdz={scalars[_WDZ]!r}, but the low-bit step decays at y only")
    if kind not in (Kind.ADAM, Kind.SGD_V):
        raise ValueError(f"sfoptim low-bit kernel: direction kind {kind!r} is not ADAM or SGD_V")
    checked = _inspect_lowbit(ys, grads, zs, vs, exps)
    if isinstance(checked, str):
        return _refuse(checked, explicit)
    lib = _load()
    if lib is None:
        return False
    table, n = checked
    lists = 5 if exps is not None else 4
    address = table.buffer_info()[0]

    def arr(k: int) -> int:
        return address + k * n * table.itemsize

    fn = getattr(lib, f"sf_lowbit_step_{_DTYPES[ys[0].dtype]}")
    rc = fn(
        n, arr(0), arr(1), arr(2), arr(3), arr(4) if exps is not None else None, arr(lists),
        _Scalars(*scalars), int(kind), _LOWBIT_FORMATS["8bit" if exps is not None else "bf16"],
        int(seed is not None) | (2 * int(bool(stochastic_y) and ys[0].dtype in NARROW)),
        (seed or 0) & 0xFFFF_FFFF_FFFF_FFFF, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("sfoptim fused kernel: out of memory for its work list")
    return True


@torch.library.custom_op("sfoptim::cpu_kernel_step", mutates_args=("ys", "zs", "v", "m"), device_types="cpu")
def step_op(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], v: list[Tensor], m: list[Tensor], scalars: Tensor, kind: int
) -> None:
    r""":func:`step` as an operator that ``torch.compile`` keeps in its graph (``sfoptim::cpu_kernel_step``).

    Same math and the same checks of every tensor before the C call; the
    scalars arrive as one float64 tensor in the order of :data:`KERNEL_SCALARS`,
    so a new learning rate or averaging weight is new data, not a new graph.
    ``v`` and ``m`` are the kernel's buffer slots (empty lists where the family
    has fewer). Where the kernel cannot run (a layout it refuses, no compiler)
    the same update is done with torch operations, so the operator always
    completes the step.
    """
    if kind == Kind.PRODIGY:
        raise ValueError("sfoptim::cpu_kernel_step takes the SGD, ADAM and SGD_V families; Prodigy's runs eagerly")
    slots = [s for s in (v, m) if s]
    values = scalars.tolist()
    if step(ys, grads, zs, slots, Kind(kind), values):
        return
    # The kernel's math in torch operations.
    for i, y in enumerate(ys):
        update_one(y, grads[i], zs[i], v[i] if v else None, m[i] if m else None, scalars, kind)


@step_op.register_fake
def _step_op_fake(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], v: list[Tensor], m: list[Tensor], scalars: Tensor, kind: int
) -> None:
    return None
