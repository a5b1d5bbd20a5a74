"""Schedule-free Prodigy on the fused CPU kernel, against its foreach path (the definition).

The kernel takes Prodigy's global sums in a pass of their own, each tensor's
update clip in a second and the update in a third; the foreach path computes
the same with torch operations. They must agree to rounding (float64: 1e-12;
float32: float32 noise), including the estimate ``d`` and its numerator, for
every layout, buffer dtype and thread count, and the kernel must be the path
that actually ran.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu
from sfoptim.directions import Kind
from sfoptim.directions.base import Bucket, BucketSum
from sfoptim.directions.prodigy import ProdigyDirection

pytestmark = pytest.mark.skipif(not _fused_cpu.available(), reason="no C compiler for the fused kernel")

# One tensor longer than a 16K-element chunk (chunks that split a tensor), a complex one (its real view).
SHAPES = [(40, 30), (7,), (20_000,), (3, 4)]
KW = dict(d0=1e-3, weight_decay=0.01, warmup_steps=3)


def _params(dtype: torch.dtype, complex_too: bool = True, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    if complex_too and dtype in (torch.float32, torch.float64):
        ps.append(torch.randn(5, 2, generator=gen, dtype=torch.complex64 if dtype == torch.float32 else torch.complex128))
    return ps


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    """Noise plus 0.5 y: a contractive quadratic, so rounding differences do not grow."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.complex128 if p.is_complex() else torch.float64)
        p.grad = (noise.to(p.dtype) + 0.5 * p.detach()).to(p.dtype)


class _Spy:
    """Counts the kernel calls that ran (returned True / a result) while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[Kind] = []
        self.sums = 0
        step, sums = _fused_cpu.step, _fused_cpu.sums

        def spy_step(*args: Any, **kwargs: Any) -> bool:
            ran = step(*args, **kwargs)
            if ran:
                self.steps.append(args[4])
            return ran

        def spy_sums(*args: Any, **kwargs: Any) -> Any:
            out = sums(*args, **kwargs)
            self.sums += out is not None
            return out

        monkeypatch.setattr(_fused_cpu, "step", spy_step)
        monkeypatch.setattr(_fused_cpu, "sums", spy_sums)


def _pair(dtype: torch.dtype, steps: int, groups: Any = None, complex_too: bool = True, **kw: Any) -> tuple[Any, Any, list, list]:
    init = _params(dtype, complex_too)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opts = []
    for params, fused in ((a, True), (b, False)):
        where = params if groups is None else groups(params)
        opts.append(sfoptim.ProdigyScheduleFree(where, fused=fused, **{**KW, **kw}))
    for step in range(steps):
        _grads(a, step)
        _grads(b, step)
        opts[0].step()
        opts[1].step()
    return opts[0], opts[1], a, b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (torch.view_as_real(a), torch.view_as_real(b)) if a.is_complex() else (a, b)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item() if b.numel() else 0.0


def _assert_agree(fused: Any, ref: Any, a: list, b: list, tol: float, d_tol: float) -> None:
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert _rel(pa.detach(), pb.detach()) <= tol, f"y[{i}]: {_rel(pa.detach(), pb.detach()):.3g}"
        for key in ("z", "exp_avg_sq", "s", "p0"):
            err = _rel(fused.state[pa][key], ref.state[pb][key])
            assert err <= tol, f"{key}[{i}]: {err:.3g}"
    for xa, xb in zip(fused.eval_params(), ref.eval_params()):
        assert _rel(xa, xb) <= tol
    for ga, gb in zip(fused.param_groups, ref.param_groups):
        for key in ("d", "d_numerator"):
            assert math.isclose(ga[key], gb[key], rel_tol=d_tol), f"{key}: {ga[key]!r} vs {gb[key]!r}"


CASES = {
    "defaults": {},
    "no_clip": {"update_clip": None},
    "tight_clip_no_growth_limit": {"update_clip": 0.3, "d_growth": None, "betas": (0.8, 0.9)},
    "algoperf": {"averaging": "algoperf", "d_growth": None, "update_clip": None, "betas": (0.9, 0.9955), "eps": 1e-4},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_foreach_and_is_the_path_taken(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, case: str) -> None:
    spy = _Spy(monkeypatch)
    steps = 40
    fused, ref, a, b = _pair(dtype, steps, **CASES[case])
    # Every step of the fused run, and none of the foreach run, took the kernel (the complex tensor's real view shares the bucket).
    assert spy.steps == [Kind.PRODIGY] * steps and spy.sums == steps
    assert fused.param_groups[0]["d"] > 10 * KW["d0"], "d must have grown for the test to mean anything"
    if dtype == torch.float64:
        _assert_agree(fused, ref, a, b, tol=1e-12, d_tol=1e-12)
    else:
        _assert_agree(fused, ref, a, b, tol=2e-5, d_tol=2e-6)


def test_clip_binds_in_the_tight_case() -> None:
    """The tight clip case of the test above is one where the clip divides the update (else it tests nothing)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen, dtype=torch.float64))
    runs = []
    for clip in (0.3, None):
        q = torch.nn.Parameter(p.detach().clone())
        opt = sfoptim.ProdigyScheduleFree([q], fused=True, **{**KW, "update_clip": clip})
        for step in range(3):
            _grads([q], step)
            opt.step()
        runs.append(q.detach())
    assert _rel(runs[0], runs[1]) > 1e-6


def test_groups_with_own_estimates_match_foreach() -> None:
    def groups(ps: list) -> list:
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5, "weight_decay": 0.0, "d_coef": 0.7}]

    fused, ref, a, b = _pair(torch.float64, 25, groups=groups, split_groups=True)
    assert fused.param_groups[0]["d"] != fused.param_groups[1]["d"]
    _assert_agree(fused, ref, a, b, tol=1e-12, d_tol=1e-12)


@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16])
def test_narrow_buffers_with_float32_parameters_take_the_kernel_and_round_once(
    monkeypatch: pytest.MonkeyPatch, buffer_dtype: torch.dtype
) -> None:
    """float32 parameters, 16-bit v, s, p0: both paths compute in float32 and round each buffer once.

    (A complex parameter keeps complex buffers, which would make a bucket of mixed buffer dtypes: foreach.)
    """
    spy = _Spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel takes the pair: no fallback warning
        fused, ref, a, b = _pair(torch.float32, 12, complex_too=False, buffer_dtype=buffer_dtype)
    assert spy.steps.count(Kind.PRODIGY) == 12 and spy.sums == 12
    for pa in a:
        assert {k: v.dtype for k, v in fused.state[pa].items() if k != "z"} == dict.fromkeys(("exp_avg_sq", "s", "p0"), buffer_dtype)
    # A 16-bit rounding that falls the other way changes a buffer by one unit (2^-8 for bfloat16).
    # Over 12 steps such flips reach d and, through it, every later value: allow a few units.
    unit = 4 * (2.0**-7 if buffer_dtype == torch.bfloat16 else 2.0**-10)
    for pa, pb in zip(a, b):
        for key in ("exp_avg_sq", "s"):
            x, y = fused.state[pa][key].float(), ref.state[pb][key].float()
            assert ((x - y).abs() <= unit * y.abs() + 2.0**-24).all(), key  # 2^-24: float16's subnormal gap
        assert _rel(pa.detach(), pb.detach()) <= 1e-4
    assert math.isclose(fused.param_groups[0]["d"], ref.param_groups[0]["d"], rel_tol=1e-4)


def test_unsupported_buffer_pair_falls_back_to_foreach_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    _fused_cpu._warned.discard("pair")
    with pytest.warns(RuntimeWarning, match="buffer_dtype"):
        fused, ref, a, b = _pair(torch.float64, 5, buffer_dtype=torch.bfloat16)
    assert spy.steps == [] and spy.sums == 0
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parameters_take_the_kernel(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Parameters, z and buffers in 16 bits: computed in float32, every store rounded once (tests/test_kernel_dtypes.py checks each step)."""
    spy = _Spy(monkeypatch)
    p = torch.nn.Parameter(torch.randn(3000, dtype=torch.float64).to(dtype))
    opt = sfoptim.ProdigyScheduleFree([p], fused=True, **KW)
    for step in range(5):
        _grads([p], step)
        opt.step()
    assert spy.steps == [Kind.PRODIGY] * 5 and spy.sums == 5
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["s"]).all()


def _threaded_run(threads: int, buffer_dtype: torch.dtype | None, stochastic: bool = False, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        # 3 x 100,000 + odd sizes: enough elements to fork, chunks that split tensors.
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(100_000,), (250, 400), (1000, 100), (7,), (16_385,)]]
        opt = sfoptim.ProdigyScheduleFree(params, buffer_dtype=buffer_dtype, stochastic_rounding=stochastic, **KW)
        torch.manual_seed(1)
        for step in range(6):
            _grads(params, step)
            opt.step()
        out = [p.detach().clone() for p in params] + [opt.state[p][k].clone() for p in params for k in ("z", "exp_avg_sq", "s")]
        return out + [torch.tensor([opt.param_groups[0]["d"], opt.param_groups[0]["d_numerator"]], dtype=torch.float64)]
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "buffer_dtype, stochastic, dtype",
    [(torch.bfloat16, False, torch.float32), (None, True, torch.bfloat16)],
    ids=["float32-bf16-buffers", "bf16-stochastic"],
)
def test_thread_count_changes_no_bit(buffer_dtype: torch.dtype | None, stochastic: bool, dtype: torch.dtype) -> None:
    one, two = _threaded_run(1, buffer_dtype, stochastic, dtype), _threaded_run(2, buffer_dtype, stochastic, dtype)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"tensor {i} differs between 1 and 2 threads"


def test_stochastic_rounding_reaches_the_prodigy_kernel() -> None:
    """bfloat16 parameters with ``stochastic_rounding``: random (other seeds, other bits), repeatable for a seed."""

    def run(seed: int, **kw: Any) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
        opt = sfoptim.ProdigyScheduleFree([p], d0=1e-3, **kw)
        torch.manual_seed(seed)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return torch.cat([p.detach(), opt.state[p]["z"], opt.state[p]["exp_avg_sq"], opt.state[p]["s"]])

    nearest = run(0)
    a, b, c = run(0, stochastic_rounding=True), run(0, stochastic_rounding=True), run(1, stochastic_rounding=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, nearest)


def test_a_refused_step_changes_nothing() -> None:
    """A state buffer of another size is refused before C, by the sums' pass: parameters, state and d stay."""
    params = [torch.nn.Parameter(torch.randn(50_000)), torch.nn.Parameter(torch.randn(30))]
    opt = sfoptim.ProdigyScheduleFree(params, fused=True, **KW)
    for step in range(3):
        _grads(params, step)
        opt.step()
    for key in ("s", "exp_avg_sq"):
        broken = copy.deepcopy(opt)
        ps = broken.param_groups[0]["params"]
        broken.state[ps[1]][key] = torch.zeros(29)
        before = copy.deepcopy((broken.state_dict(), [p.detach().clone() for p in ps]))
        _grads(ps, 3)
        with pytest.raises(RuntimeError, match="shape"):
            broken.step()
        after = (broken.state_dict(), [p.detach() for p in ps])
        assert all(torch.equal(x, y) for x, y in zip(before[1], after[1]))
        assert before[0]["param_groups"] == after[0]["param_groups"]
        for i, saved in before[0]["state"].items():
            for k, v in saved.items():
                assert torch.equal(v, after[0]["state"][i][k]) if isinstance(v, torch.Tensor) else v == after[0]["state"][i][k]


def test_compiled_step_runs_the_kernel_eagerly_and_equals_eager() -> None:
    def run(compiled: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(8)
        p = torch.nn.Parameter(torch.randn(5000, generator=gen))
        opt = sfoptim.ProdigyScheduleFree([p], **KW)

        def train_step() -> None:
            opt.step()

        step = torch.compile(train_step) if compiled else train_step
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen)
            step()
        return torch.cat([p.detach(), opt.state[p]["z"], opt.state[p]["s"], torch.tensor([opt.param_groups[0]["d"]])])

    assert torch.equal(run(True), run(False))


# --------------------------------------------------------------- the sums
PAIRS = sorted(_fused_cpu.PRODIGY_PAIRS, key=str)
SUM_SIZES = [0, 1, 7, 8, 9, 100, 16_385, 40_000, 70_001]


@st.composite
def prodigy_sums_cases(draw: Any) -> dict:
    return dict(
        sizes=draw(st.lists(st.sampled_from(SUM_SIZES), min_size=1, max_size=4)),
        pair=draw(st.sampled_from(PAIRS)),
        rho=draw(st.sampled_from([0.0, 0.9, math.sqrt(0.999)])),
        accum=draw(st.sampled_from([1e-6, 0.3, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def check_prodigy_sums_case(case: dict) -> None:
    """The kernel's two sums: float64 sums to rounding, the same on 1 and 2 threads, and Prodigy's torch path."""
    pdt, bdt = case["pair"]
    gen = torch.Generator().manual_seed(case["seed"])
    g, z = ([torch.randn(n, generator=gen, dtype=torch.float64).to(pdt) for n in case["sizes"]] for _ in range(2))
    p0, s = ([torch.randn(n, generator=gen, dtype=torch.float64).to(bdt) for n in case["sizes"]] for _ in range(2))
    direction, group = ProdigyDirection(), {"d": 1.0, "lr": case["accum"], "betas": (0.9, case["rho"] ** 2)}
    inputs = direction.sum_inputs(group, 1)
    assert inputs.buffers == ("p0", "s")
    scalars = [dict(rho=case["rho"], accum=case["accum"]).get(n, 0.0) for n in sfoptim.directions.base.KERNEL_SCALARS]
    wanted = direction.bucket_sums
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _fused_cpu.sums(g, z, g, wanted, [p0, s], scalars)
        torch.set_num_threads(1)
        single = _fused_cpu.sums(g, z, g, wanted, [p0, s], scalars)
    finally:
        torch.set_num_threads(saved)
    assert got is not None and got == single, "the sums depend on the thread count"
    rho, a = case["rho"], case["accum"]
    terms = {
        BucketSum.GRAD_P0_MINUS_Z: [gi.double() * (pi.double() - zi.double()) for gi, zi, pi in zip(g, z, p0)],
        BucketSum.DECAYED_L1: [(rho * si.double() + a * gi.double()).abs() for gi, si in zip(g, s)],
    }
    # Terms in the computing format (float32 below float64), 16 of them summed per lane and block
    # before float64 takes over: within 2^-19 of the sum of magnitudes.
    tol = 1e-12 if pdt == torch.float64 else 2.0**-19
    for which, parts in terms.items():
        exact = sum(float(t.sum()) for t in parts)
        scale = sum(float(t.abs().sum()) for t in parts) + 1e-300
        assert abs(got[which] - exact) <= tol * scale, f"{which.name}: {got[which]!r} vs {exact!r}"
    torch_path = direction.reduce(group, 1, Bucket(g, g, z, {"p0": p0, "s": s}), 0.9)
    fused = direction.reduce_sums(group, 1, 0.9, {k: torch.tensor(v, dtype=torch.float64) for k, v in got.items()})
    # torch reduces each tensor in the parameters' dtype, whose products (float16's a g) may be subnormal.
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}[pdt]
    gap = torch.finfo(pdt).smallest_normal * torch.finfo(pdt).eps * (sum(case["sizes"]) + 1)
    for name, value in torch_path.items():
        if not math.isfinite(float(value)):
            assert pdt == torch.float16, "only float16's torch sums overflow (beyond 65504)"
            continue
        which = BucketSum.DECAYED_L1 if name.endswith("denominator") else BucketSum.GRAD_P0_MINUS_Z
        scale = sum(float(t.abs().sum()) for t in terms[which]) * (a if which == BucketSum.GRAD_P0_MINUS_Z else 1.0)
        assert abs(float(fused[name]) - float(value)) <= tol * scale + gap, name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=prodigy_sums_cases())
@example(case={"sizes": [70_001, 70_001], "pair": (torch.float32, torch.bfloat16), "rho": 0.9, "accum": 0.3, "seed": 0})
@example(case={"sizes": [0, 9], "pair": (torch.float64, torch.float64), "rho": 0.0, "accum": 2.0, "seed": 1})
def test_fuzz_prodigy_sums_agree_with_float64_and_the_torch_path(case: dict) -> None:
    check_prodigy_sums_case(case)


def test_sums_refuse_what_they_cannot_read_and_check_sizes_before_c() -> None:
    gen = torch.Generator().manual_seed(2)
    g, z, p0, s = ([torch.randn(n, generator=gen) for n in (6, 20)] for _ in range(4))
    scalars = [0.5] * len(sfoptim.directions.base.KERNEL_SCALARS)
    wanted = ProdigyDirection.bucket_sums
    assert _fused_cpu.sums(g, z, g, wanted, [p0, s], scalars) is not None
    assert _fused_cpu.sums(g, z, g, wanted, [[t.double() for t in p0], [t.double() for t in s]], scalars) is None, "float32 with float64 buffers"
    assert _fused_cpu.sums(g, z, g, wanted, [p0, [s[0], torch.zeros(40)[::2]]], scalars) is None, "strided"
    assert _fused_cpu.sums(g, z, g, wanted, [p0, [s[0], p0[1]]], scalars) is None, "s aliasing p0"
    with pytest.raises(RuntimeError, match="shape"):
        _fused_cpu.sums(g, z, g, wanted, [p0, [s[0], torch.zeros(21)]], scalars)
    with pytest.raises(ValueError, match="on their own"):
        _fused_cpu.sums(g, z, g, (BucketSum.GRAD_L1, *wanted), [p0, s], scalars)
