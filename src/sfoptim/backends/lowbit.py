r"""Low-bit optimizer state: the formats, and the step with it in torch operations.

Schedule-free Adam with ``state_precision`` other than ``"full"`` keeps ``z`` in
bfloat16 and the second moment :math:`v` in one of two formats:

* ``"bf16"``: :math:`v` in bfloat16 (2 bytes per element).
* ``"8bit"``: :math:`s = \sqrt v` in 8 bits per element plus one ``int8``
  exponent :math:`E` per block of :data:`BLOCK` consecutive elements of a
  tensor (:math:`1 + 1/512` bytes per element). Each code is an unsigned
  float with 4 exponent and 4 mantissa bits and subnormals,
  :math:`q = (1 + m/16)\,2^{e-15}` for :math:`e \ge 1` and :math:`q = m\,2^{-18}` for
  :math:`e = 0` (so :math:`q \in [0, 1.9375]`), and :math:`s = q\,2^E`, where
  :math:`E` is the smallest exponent with the block's largest :math:`s` at most
  :math:`1.9375 \cdot 2^E`.

Why this code: coding :math:`\sqrt v` halves the dynamic range to cover, and
the direction uses :math:`\sqrt v` anyway. A float-like code has the same
relative resolution (3 to 6 %) from the block maximum down to :math:`2^{-15}`
of it (:math:`2^{-30}` in :math:`v`), where a linear or quantile code would
leave the small second moments of a block (rare embedding rows) with almost
no resolution. The block scale is a power of two, so a change of the block's
maximum moves :math:`E` but leaves the grid of every other element where it
was: only the element's own change is rounded. The rounding is stochastic, so
the slow EMA (:math:`(1-\beta_2) \approx 10^{-3}` of :math:`v` per step, far
below a code step) still moves :math:`v` in expectation; the noise this adds
stays of the order of a code step because the EMA forgets it at the rate it
adds it. The direction of the current step uses the new :math:`v` before it
is rounded.

Every stored value is rounded stochastically with random bits from a
counter-based hash of (seed, stream, tensor index in the bucket, element
index; one 32-bit number per element, its halves for ``z`` and ``v``), the
one the C kernel uses (``sf_key_for``/``sf_lb_random`` in
``cpu_kernel.c``), so this torch implementation and the kernel give the same
bits for the same seed on float32 parameters, and neither depends on the
thread count or on how the work is split.

This module is the foreach backend of the low-bit step (any device; the
temporaries are bounded by working in slices of :data:`SLICE` elements).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .abi import KERNEL_SCALARS, Kind

__all__ = [
    "BLOCK",
    "PRECISIONS",
    "decode_sqrt",
    "encode_sqrt",
    "num_blocks",
    "random_bits",
    "state_bytes_per_element",
    "step",
]

#: The accepted values of ``state_precision``.
PRECISIONS = ("full", "bf16", "8bit")
#: Elements per block of the 8-bit format (one int8 exponent each). Divides the
#: C kernel's chunk of 16384 elements, so blocks never straddle chunks.
BLOCK = 512
#: Elements per slice of the torch implementation (a multiple of BLOCK).
SLICE = 1 << 20
#: Streams of random bits, as in cpu_kernel.c (SF_STREAM_Y, _Z, _V).
STREAM_Y, STREAM_Z, STREAM_V = 0, 1, 2
#: Largest square root that is coded (larger ones, and NaN, are stored as this):
#: 1.9375 * 2^64, whose square overflows float32.
S_MAX = 1.9375 * 2.0**64

_M32 = 0xFFFF_FFFF
_M64 = 0xFFFF_FFFF_FFFF_FFFF
_SCALAR = {name: i for i, name in enumerate(KERNEL_SCALARS)}


def num_blocks(numel: int) -> int:
    """The number of 8-bit blocks (and exponents) of a tensor of ``numel`` elements."""
    return (numel + BLOCK - 1) // BLOCK


def state_bytes_per_element(precision: str) -> float:
    """Bytes of ``z`` and ``v`` per parameter element (for large tensors), besides the parameter."""
    return {"bf16": 4.0, "8bit": 3.0 + 1.0 / BLOCK}[precision]


# ----------------------------------------------------------------- random bits
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(seed: int, stream: int, tensor: int, start: int) -> tuple[int, int]:
    h = _splitmix64((seed & _M64) ^ _splitmix64((((tensor << 2) | stream) & _M64) ^ _splitmix64(start >> 32)))
    return h & _M32, h >> 32


def _mix32(x: Tensor) -> Tensor:
    x = (x * 0x9E3779B1) & _M32
    x = x ^ (x >> 16)
    return (x * 0x85EBCA6B) & _M32


def random_bits(seed: int, stream: int, tensor: int, start: int, n: int, device: torch.device) -> Tensor:
    """The kernel's 32-bit random numbers of elements ``start .. start+n`` of a stream (int64 tensor).

    ``start`` and ``start + n`` must lie in one span of 2^32 elements.
    """
    a = _key(seed, stream, tensor, start)[0]
    index = torch.arange(start & _M32, (start & _M32) + n, dtype=torch.int64, device=device)
    return _mix32((index + a) & _M32)


# --------------------------------------------------------------------- formats
def _bits(x: Tensor) -> Tensor:
    """The bits of a float32 tensor as non-negative int64."""
    return x.view(torch.int32).to(torch.int64) & _M32


def _from_bits(u: Tensor) -> Tensor:
    """float32 values from bit patterns in int64 (0 .. 2^32)."""
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)


def bf16_round(x: Tensor, rnd: Tensor | None) -> Tensor:
    """float32 ``x`` in bfloat16: stochastically with the random bits ``rnd``, to nearest without.

    As ``sf_bf16_stochastic``: 16 random bits added below the kept ones, then
    truncation of the magnitude; infinities and NaN round to nearest.
    """
    nearest = x.to(torch.bfloat16)
    if rnd is None:
        return nearest
    u = ((_bits(x) + (rnd >> 16)) >> 16) & 0xFFFF
    sr = (u - ((u >> 15) << 16)).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), sr, nearest)


def _pow2(e: Tensor) -> Tensor:
    """2^e as float32 for integer e in [-126, 127] (int64 tensor)."""
    return _from_bits((e + 127) << 23)


def _block_exponents(s: Tensor) -> Tensor:
    """The exponent E of each block of ``s`` (flat float32, >= 0): the smallest with max <= 1.9375 * 2^E."""
    n = s.numel()
    pad = num_blocks(n) * BLOCK - n
    blocks = torch.nn.functional.pad(s, (0, pad)).view(-1, BLOCK)
    mx = blocks.amax(dim=1)
    e = torch.where(mx > 0, ((_bits(mx) >> 23) & 0xFF) - 127, torch.zeros_like(mx, dtype=torch.int64))
    return e + (mx > _pow2(e) * 1.9375).to(torch.int64)


def _expand(e: Tensor, n: int) -> Tensor:
    return e.repeat_interleave(BLOCK)[:n]


def encode_sqrt(s: Tensor, rnd: Tensor | None) -> tuple[Tensor, Tensor]:
    """Codes (uint8, one per element) and block exponents (int8) of the square roots ``s`` (flat float32).

    Stochastic rounding with the low 16 bits of the random numbers ``rnd``
    (int64), to nearest without. NaN and values above :data:`S_MAX` are stored as
    :data:`S_MAX`.
    """
    s = torch.where(s < S_MAX, s, torch.full_like(s, S_MAX))
    e = _block_exponents(s)
    q = s * _pow2(-_expand(e, s.numel()))
    # r / 2^19 of the gap rounds up: 16 random bits, or one half (to nearest).
    r = ((rnd & 0xFFFF) << 3) if rnd is not None else torch.full_like(s, 1 << 18, dtype=torch.int64)
    # Below 2^-14 (subnormal codes, a gap of 2^-18) the bits of (q + 2^-14) / 2 code q with the
    # same formula; they are the larger (as signed integers) exactly there (and for q = -0).
    plain = q.view(torch.int32).to(torch.int64)
    lifted = (q + 2.0**-14).view(torch.int32).to(torch.int64) - (1 << 23)
    code = ((torch.maximum(plain, lifted) + r) >> 19) - 1792  # at most 255, as q <= 1.9375
    return code.to(torch.uint8), e.to(torch.int8)


def decode_sqrt(code: Tensor, exponents: Tensor) -> Tensor:
    """The square roots (float32, flat) that ``code`` (uint8, flat) and the block ``exponents`` stand for."""
    c = code.to(torch.int64)
    normal = _from_bits((c + 1792) << 19)
    sub = c.to(torch.float32) * 2.0**-18
    q = torch.where(c >= 16, normal, sub)
    return q * _pow2(_expand(exponents.to(torch.int64), c.numel()))


# ------------------------------------------------------------------------ step
def step(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    vs: list[Tensor],
    exps: list[Tensor] | None,
    kind: Kind,
    scalars: Sequence[float],
    seed: int | None,
) -> None:
    r"""One schedule-free Adam step of a bucket with low-bit state, in torch operations.

    ``zs`` are bfloat16; ``vs`` bfloat16 :math:`v` (``exps`` None) or uint8
    codes of :math:`\sqrt v` with their block exponents ``exps`` (int8).
    ``kind`` is ``ADAM`` or ``SGD_V``, ``scalars`` the values of
    :data:`~sfoptim.backends.abi.KERNEL_SCALARS` (without inner momentum).
    Per element, computed in float32 (float64 for float64 parameters):

    :math:`v' = \beta_2 \hat v + (1-\beta_2) g^2`,
    :math:`d = g / (\sqrt{v'} \cdot bc_2^{-1/2} + \epsilon) + \lambda y` (``SGD_V``: :math:`g + \lambda y`;
    no decay term when :math:`\lambda = 0`),
    :math:`y \leftarrow \operatorname{lerp}(y, z, c) + \gamma(\beta(1-c)-1) d`,
    :math:`z \leftarrow z - \gamma d`;

    ``z`` and :math:`v'` are stored with stochastic rounding driven by
    ``seed`` (None: to nearest), ``y`` in its dtype to nearest. With the same
    seed the C kernel (``cpu_kernel.lowbit_step``) gives the same bits.
    Every tensor's size is checked before anything is written (RuntimeError).
    """
    for i, y in enumerate(ys):
        for name, t in (("gradient", grads[i]), ("z", zs[i]), ("second moment", vs[i])):
            if t.shape != y.shape:
                raise RuntimeError(
                    f"sfoptim: tensor {i} of a bucket has shape {tuple(y.shape)} but its {name} has shape "
                    f"{tuple(t.shape)}; the optimizer state does not belong to this parameter"
                )
        if exps is not None and exps[i].numel() != num_blocks(y.numel()):
            raise RuntimeError("sfoptim: an 8-bit second moment has the wrong number of block exponents for its parameter")
    for i, y in enumerate(ys):
        _step_tensor(i, y, grads[i], zs[i], vs[i], exps[i] if exps is not None else None, kind, scalars, seed)


def _step_tensor(
    index: int, y: Tensor, g: Tensor, z: Tensor, v: Tensor, e: Tensor | None, kind: Kind, sc: Sequence[float], seed: int | None
) -> None:
    flat = [t if t.is_contiguous() else t.contiguous() for t in (y, g, z, v)]
    yf, gf, zf, vf = (t.view(-1) for t in flat)
    n = yf.numel()
    for start in range(0, n, SLICE):
        stop = min(n, start + SLICE)
        if seed is not None and (start >> 32) != ((stop - 1) >> 32):
            stop = ((start >> 32) + 1) << 32
        blocks = slice(start // BLOCK, num_blocks(stop))
        _step_slice(index, start, yf[start:stop], gf[start:stop], zf[start:stop], vf[start:stop],
                    e[blocks] if e is not None else None, kind, sc, seed)  # fmt: skip
    for t, orig in zip(flat, (y, g, z, v)):
        if t is not orig and orig is not g:
            orig.copy_(t)


def _step_slice(
    index: int, start: int, y: Tensor, g: Tensor, z: Tensor, v: Tensor, e: Tensor | None, kind: Kind,
    sc: Sequence[float], seed: int | None,
) -> None:  # fmt: skip
    ct = torch.float64 if y.dtype == torch.float64 else torch.float32
    s = {name: sc[i] for name, i in _SCALAR.items()}
    yi, gi, zi = y.to(ct), g.to(ct), z.to(ct)
    vo = v.to(ct) if e is None else _square(decode_sqrt(v, e)).to(ct)
    vi = vo * s["beta2"] + (gi * (1.0 - s["beta2"])) * gi
    root = _sqrt(vi)
    if kind == Kind.ADAM:
        d = gi / (root * (1.0 / math.sqrt(s["bc2"])) + s["eps"])
    else:
        d = gi
    if s["wd"] != 0:
        d = d + yi * s["wd"]
    c = s["ckp1"]
    diff = zi - yi
    lerped = zi - diff * (1.0 - c) if c >= 0.5 else yi + diff * c
    y.copy_(lerped + d * (s["lr"] * (s["beta"] * (1.0 - c) - 1.0)))
    z_new = (zi - d * s["lr"]).to(torch.float32)

    # One hash per element: its high 16 bits round z, its low 16 bits (shifted up) round v.
    r = None if seed is None else random_bits(seed, STREAM_Z, index, start, y.numel(), y.device)
    z.copy_(bf16_round(z_new, r))
    if e is None:
        v.copy_(bf16_round(vi.to(torch.float32), None if r is None else (r << 16) & _M32))
    else:
        code, exps = encode_sqrt(root.to(torch.float32), r)
        v.copy_(code)
        e.copy_(exps)


def _sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root (torch's float32 one on CPU may be an ulp off); float64 stays float64."""
    if x.dtype == torch.float64:
        return torch.sqrt(x)
    return torch.sqrt(x.to(torch.float64)).to(x.dtype)


def _square(s: Tensor) -> Tensor:
    return s * s
