"""The fused CPU kernel on bfloat16 and float16 tensors: float32 arithmetic, one rounding per store.

Round to nearest: every step of every kernel family is, to within half a unit
in the last place of the 16-bit format (and float32 noise), the foreach path
run in float32 from the same state. Stochastic rounding: each stored value is one of
its two 16-bit neighbours, the mean over many draws is the float32 value, a
seed gives the same bits on any thread count, and other seeds give other bits.
"""

from __future__ import annotations

import copy
import platform
import shutil
import subprocess
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu
from sfoptim.backends import foreach as _foreach
from sfoptim.directions import Kind
from sfoptim.directions.base import BucketSum

pytestmark = pytest.mark.skipif(not _fused_cpu.available(), reason="no C compiler for the fused kernel")

NARROW = [torch.bfloat16, torch.float16]
# One tensor longer than the kernel's 16K-element chunk and its 512-element blocks.
SIZES = [(3, 5), (1,), (16_385 + 700,), (0,)]


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between neighbouring ``dtype`` values at the magnitude of each element of ``t``."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(t.float().abs())
    gap = torch.ldexp(torch.full_like(t, info.eps, dtype=torch.float32), exponent - 1)
    smallest = info.smallest_normal * info.eps
    return torch.where(t == 0, torch.full_like(gap, smallest), gap.clamp_min(smallest))


def _assert_rounded(actual: torch.Tensor, wide: torch.Tensor, what: str) -> None:
    """``actual`` (16 bits) is the float32 ``wide`` rounded to nearest: within half a unit in the last place.

    Both sides compute in float32 in their own order, so they may differ by
    float32 rounding of inputs of order one: 2^-18 is allowed on top (a
    quarter of float16's unit at 1, an eighth of bfloat16's half unit), far
    less than the half unit that rounding in another direction would cost.
    """
    dtype = actual.dtype
    a, w = actual.float(), wide.float()
    assert torch.isfinite(a).all() and torch.isfinite(w).all(), what
    half_gap = torch.maximum(_ulp(a, dtype), _ulp(w.to(dtype), dtype)) / 2
    excess = ((a - w).abs() - half_gap - 2.0**-18 * (1 + w.abs())).max().item() if a.numel() else 0.0
    assert excess <= 0, f"{what}: {dtype} kernel is not float32 foreach rounded to nearest ({excess:.3g} over)"


def _make(name: str, params: list[Any], **kw: Any) -> Any:
    common: dict[str, Any] = {"weight_decay": 0.01, **kw}
    if name == "sgd":
        return sfoptim.SGDScheduleFree(params, lr=0.05, **common)
    if name == "adamw":
        return sfoptim.AdamWScheduleFree(params, lr=0.01, **common)
    if name == "adamw-momentum":
        return sfoptim.AdamWScheduleFree(params, lr=0.01, inner_momentum=0.5, **common)
    if name == "radam":
        return sfoptim.RAdamScheduleFree(params, lr=0.01, **common)
    if name == "plus":
        return sfoptim.AdamCScheduleFreePlus(params, **common)
    if name == "prodigy":
        return sfoptim.ProdigyScheduleFree(params, d0=1e-2, update_clip=0.5, **common)
    raise AssertionError(name)


STEP_CASES = dict(
    name=st.sampled_from(["sgd", "adamw", "adamw-momentum", "radam", "plus", "prodigy"]),
    dtype=st.sampled_from(NARROW),
    steps=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    decay_at=st.sampled_from(["y", "z"]),
    weight_decay=st.sampled_from([0.01, 5.0]),
)


def check_step_case(name: str, dtype: torch.dtype, steps: int, seed: int, decay_at: str, weight_decay: float) -> None:
    """Step by step from the same state: the kernel's y, z and buffers are foreach in float32, rounded.

    RAdam's first steps take the SGD_V family, its later ones ADAM; seven steps reach both.
    ``decay_at`` is the group's point of weight decay, ``weight_decay`` its coefficient.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SIZES]
    wide = [torch.nn.Parameter(p.detach().float()) for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel takes every bucket: no fallback warning
        opt = _make(name, [{"params": params, "decay_at": decay_at}], fused=True, weight_decay=weight_decay)
    ref = _make(name, [{"params": wide, "decay_at": decay_at}], fused=False, foreach=True, weight_decay=weight_decay)
    calls = []
    original = _fused_cpu.step

    def spy(*args: Any, **kwargs: Any) -> bool:
        calls.append(original(*args, **kwargs))
        return calls[-1]

    _fused_cpu.step = spy  # type: ignore[assignment]
    try:
        for s in range(steps):
            # The reference starts from the kernel's state, widened exactly.
            ref.load_state_dict(copy.deepcopy(opt.state_dict()))
            for p, w in zip(params, wide):
                w.data.copy_(p.detach())
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1 + 0.5 * p.detach().float()).to(dtype)
                w.grad = p.grad.float()
            loss = {"loss": 2.0 / (s + 1)} if name == "plus" else {}
            opt.step(**loss)
            ref.step(**loss)
            for i, (p, w) in enumerate(zip(params, wide)):
                _assert_rounded(p.detach(), w.detach(), f"{name} step {s + 1} y[{i}]")
                for key, value in opt.state[p].items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        assert value.dtype == dtype, f"{key} is {value.dtype}"
                        _assert_rounded(value, ref.state[w][key], f"{name} step {s + 1} {key}[{i}]")
    finally:
        _fused_cpu.step = original  # type: ignore[assignment]
    assert calls and all(calls), "the kernel did not take the 16-bit bucket"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**STEP_CASES)
def test_each_step_is_float32_foreach_rounded_once(
    name: str, dtype: torch.dtype, steps: int, seed: int, decay_at: str, weight_decay: float
) -> None:
    check_step_case(name, dtype, steps, seed, decay_at, weight_decay)


@pytest.mark.parametrize("name", ["sgd", "adamw", "adamw-momentum", "radam", "plus", "prodigy"])
def test_decay_at_z_takes_the_kernel_as_float32_foreach_rounded_once(name: str) -> None:
    """A decay large enough that taking it at y instead is many roundings off (ScheduleFree+'s aside, scaled by its lr)."""
    check_step_case(name, torch.bfloat16, 12, 3, "z", 5.0)


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("which", ["wrap_before", "wrap_after"])
def test_wrapper_bookkeeping_is_float32_rounded_once(dtype: torch.dtype, which: str) -> None:
    gen = torch.Generator().manual_seed(3)
    ys = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    zs = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    wy, wz = [t.float() for t in ys], [t.float() for t in zs]
    for scalar, beta in ((0.01, 0.9), (0.0, 0.9), (0.7, 0.3)):
        assert getattr(_fused_cpu, which)(ys, zs, scalar, beta) is True
        getattr(_foreach, which)(wy, wz, scalar, beta)
        for i in range(len(SIZES)):
            _assert_rounded(ys[i], wy[i], f"{which} y[{i}]")
            _assert_rounded(zs[i], wz[i], f"{which} z[{i}]")
            wy[i].copy_(ys[i])
            wz[i].copy_(zs[i])


@pytest.mark.parametrize("dtype", NARROW)
def test_bucket_sums_of_16_bit_tensors_are_exact_float64_sums(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    g, z, y = ([torch.randn(s, generator=gen).to(dtype) for s in SIZES] for _ in range(3))
    got = _fused_cpu.sums(g, z, y, (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y))
    assert got is not None
    l1 = sum(float(t.double().abs().sum()) for t in g)
    ip = sum(float((a.double() * (b.double() - c.double())).sum()) for a, b, c in zip(g, z, y))
    assert abs(got[BucketSum.GRAD_L1] - l1) <= 1e-12 * l1
    assert abs(got[BucketSum.GRAD_Z_MINUS_Y] - ip) <= 1e-12 * sum(
        float((a.double() * (b.double() - c.double())).abs().sum()) for a, b, c in zip(g, z, y)
    )


@pytest.mark.parametrize("dtype", NARROW)
def test_round_to_nearest_equals_torch_conversion_on_every_range(dtype: torch.dtype) -> None:
    """The stored z is torch's own rounding of the same float32 value (NaN payloads and signs of zero aside).

    SGD family with c = 0 and no decay: z <- z - lr*g, two float32 roundings
    (the kernel is built without contraction), then one to 16 bits. The
    magnitudes span float16's subnormals to beyond its largest value.
    """
    gen = torch.Generator().manual_seed(9)
    n = 100_003
    magnitude = torch.exp2(torch.empty(n).uniform_(-30, 20, generator=gen))
    z = (torch.randn(n, generator=gen).sign() * magnitude).to(dtype)
    g = (torch.randn(n, generator=gen) * magnitude).to(dtype)
    lr = 0.3
    expected = (z.float() - torch.tensor(lr) * g.float()).to(dtype)
    y = torch.zeros(n, dtype=dtype)
    assert _fused_cpu.step([y], [g], [z], [], Kind.SGD, [lr, 0.0, 0.9, 0.0, 0.999, 1.0, 1e-8, 0.0, 1.0]) is True
    nan = expected.isnan()
    assert torch.equal(z.isnan(), nan)
    # Equal values (the sign of a zero may differ: the kernel's direction is g + 0*y).
    assert torch.equal(z[~nan].float(), expected[~nan].float())
    assert (z.float().abs() < torch.finfo(dtype).smallest_normal).any() or dtype == torch.bfloat16


# ------------------------------------------------------------ stochastic rounding
# The SGD family: z <- z - lr*g, computed exactly in float32 here, a value between two 16-bit neighbours.
_SCALARS = [0.25, 0.5, 0.9, 0.0, 0.999, 1.0, 1e-8, 0.0, 1.0]  # lr, ckp1, beta, wd, beta2, bc2, eps, mu, bc1


def _sr_step(dtype: torch.dtype, n: int, z0: float, g0: float, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD-family step on ``n`` identical elements: (stored z, z computed in float32)."""
    y = torch.full((n,), z0, dtype=dtype)
    z = torch.full((n,), z0, dtype=dtype)
    g = torch.full((n,), g0, dtype=dtype)
    exact = z.float() - torch.tensor(_SCALARS[0], dtype=torch.float32) * g.float()
    assert _fused_cpu.step([y], [g], [z], [], Kind.SGD, _SCALARS, seed=seed) is True
    return z, exact


@pytest.mark.parametrize(
    "dtype, z0, g0",
    [
        (torch.bfloat16, 1.0, 0.0068359375),  # the bfloat16 gap below 1 is 2^-8; the step 0.44 of it
        (torch.bfloat16, -3.0, -0.02734375),
        (torch.float16, 1.0, 0.00146484375),
        (torch.float16, 2.0**-20, 3 * 2.0**-24),  # float16 subnormals: a fixed gap of 2^-24, the step 0.75 of it
    ],
)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype: torch.dtype, z0: float, g0: float) -> None:
    n = 40_000
    z, exact = _sr_step(dtype, n, z0, g0, seed=12345)
    value = exact[0].item()
    lo, hi = sorted({torch.tensor(value).to(dtype).item(), _neighbour(value, dtype)})
    got = z.double()
    assert set(got.unique().tolist()) == {lo, hi}, "a stored value is not a neighbour of the float32 one"
    p = (value - lo) / (hi - lo)
    # The fraction that rounds up is p, within six standard deviations.
    frac_up = (got == hi).double().mean().item()
    assert abs(frac_up - p) <= 6 * (p * (1 - p) / n) ** 0.5, (frac_up, p)
    nearest, _ = _sr_step(dtype, n, z0, g0, seed=None)
    assert nearest.unique().numel() == 1, "without a seed every element rounds to nearest"


def _neighbour(value: float, dtype: torch.dtype) -> float:
    """The 16-bit neighbour of ``value`` on the other side from its nearest."""
    near = torch.tensor(value, dtype=torch.float32).to(dtype)
    step = torch.tensor(float("inf") if value > near.item() else float("-inf"), dtype=dtype)
    return torch.nextafter(near, step).item()


@pytest.mark.parametrize("dtype", NARROW)
def test_stochastic_rounding_repeats_for_a_seed_on_any_thread_count_and_differs_across_seeds(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    sizes = [70_001, 3, 16_384]
    start = [[torch.randn(s, generator=gen).to(dtype) for s in sizes] for _ in range(5)]
    scalars = [0.01, 0.3, 0.9, 0.1, 0.999, 0.05, 1e-6, 0.9, 0.5]

    def run(seed: int, threads: int) -> list[torch.Tensor]:
        y, g, z, v, m = (copy.deepcopy(lst) for lst in start)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert _fused_cpu.step(y, g, z, [v, m], Kind.ADAM, scalars, seed=seed) is True
        finally:
            torch.set_num_threads(saved)
        return [torch.cat([t.flatten() for t in lst]) for lst in (y, z, v, m)]

    first, again, threaded, other = run(7, 1), run(7, 1), run(7, 2), run(8, 1)
    for a, b, c, d in zip(first, again, threaded, other):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), "the same seed gave other bits"
        assert torch.equal(a.view(torch.int16), c.view(torch.int16)), "the thread count changed the bits"
        assert (a != d).float().mean().item() > 0.05, "another seed gave (nearly) the same bits"


def test_stochastic_rounding_option_reaches_the_kernel_for_16_bit_parameters() -> None:
    """``stochastic_rounding=True`` without ``state_dtype``: random, repeatable under torch.manual_seed."""

    def run(seed: int, **kw: Any) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
        opt = sfoptim.SGDScheduleFree([p], lr=0.002, warmup_steps=0, **kw)
        torch.manual_seed(seed)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return torch.cat([p.detach(), opt.state[p]["z"]])

    nearest = run(0)
    a, b, c = run(0, stochastic_rounding=True), run(0, stochastic_rounding=True), run(1, stochastic_rounding=True)
    assert nearest.unique().numel() <= 2, "round to nearest treats identical elements alike"
    assert a.unique().numel() > 2 and torch.equal(a, b) and not torch.equal(a, c)
    # z moved by 3 * 0.002 = 0.006 from 1: nearest keeps 1 (gap 2^-8 below 1), the mean of z follows the step.
    z = a[20_000:].double()
    assert abs(z.mean().item() - (1 - 0.006)) < 3e-4


# ------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "dtypes",
    [
        pytest.param((torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16), id="bf16-with-f16-z"),
        pytest.param((torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16), id="bf16-with-f32-grad"),
        pytest.param((torch.float16, torch.float16, torch.float16, torch.float32), id="f16-with-f32-v"),
        pytest.param((torch.float32, torch.float32, torch.float32, torch.bfloat16), id="f32-with-bf16-v"),
    ],
)
def test_mixed_dtypes_in_one_call_are_refused_with_nothing_changed(dtypes: tuple) -> None:
    gen = torch.Generator().manual_seed(6)
    y, g, z, v = ([torch.randn(9, generator=gen).to(dt), torch.randn(4, generator=gen).to(dtypes[0])] for dt in dtypes)
    before = [[t.clone() for t in lst] for lst in (y, g, z, v)]
    assert _fused_cpu.step(y, g, z, [v], Kind.ADAM, _SCALARS, seed=1) is False
    sums = _fused_cpu.sums(g, z, y, (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y))
    assert (sums is None) == (len(set(dtypes[:3])) > 1), "the sums read y, g and z only"
    for lst, old in zip((y, g, z, v), before):
        for t, o in zip(lst, old):
            assert t.dtype == o.dtype and torch.equal(t, o), "a refused call modified a tensor"


@pytest.mark.parametrize("stochastic", [False, True])
def test_compiled_step_on_16_bit_parameters_equals_eager(stochastic: bool) -> None:
    """Under torch.compile the 16-bit bucket takes the kernel too (stochastic rounding eagerly): eager's bits."""

    def run(compiled: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(8)
        p = torch.nn.Parameter(torch.randn(5000, generator=gen).to(torch.bfloat16))
        opt = sfoptim.AdamWScheduleFree([p], lr=0.01, stochastic_rounding=stochastic)

        def train_step() -> None:
            opt.step()

        step = torch.compile(train_step) if compiled else train_step
        torch.manual_seed(0)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            step()
        return torch.cat([p.detach(), opt.state[p]["z"], opt.state[p]["exp_avg_sq"]])

    assert torch.equal(run(True), run(False))


_PORTABLE_CHECKS = """
import ctypes, torch
from hypothesis import given, settings
from sfoptim.backends import cpu_kernel as _fused_cpu
_fused_cpu._install_library_for_tests(ctypes.CDLL({lib!r}))
import test_kernel_dtypes as d
d.test_round_to_nearest_equals_torch_conversion_on_every_range(torch.float16)
settings(max_examples=30, deadline=None, database=None)(given(**d.STEP_CASES)(d.check_step_case))()
for which in ("wrap_before", "wrap_after"):
    d.test_wrapper_bookkeeping_is_float32_rounded_once(torch.float16, which)
d.test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(torch.float16, 2.0**-20, 3 * 2.0**-24)
d.test_stochastic_rounding_repeats_for_a_seed_on_any_thread_count_and_differs_across_seeds(torch.float16)
print("portable float16 done")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("gcc") is None, reason="an x86-64 gcc")
def test_portable_float16_conversions_where_the_compiler_targets_no_f16c(tmp_path: Any) -> None:
    """The kernel built without F16C (its portable float16 conversions) passes the float16 checks."""
    from test_kernel_safety import _assert_clean_exit, _run_python

    flags = [*_fused_cpu._FLAGS, "-mno-f16c"]
    macros = subprocess.run(["gcc", *flags, "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True).stdout
    assert "__F16C__" not in macros
    lib = tmp_path / "portable.so"
    subprocess.run(["gcc", *flags, str(_fused_cpu._SOURCE), "-o", str(lib), "-lm"], check=True, capture_output=True, timeout=300)
    _assert_clean_exit(_run_python(_PORTABLE_CHECKS.format(lib=str(lib))), "portable float16 done")
