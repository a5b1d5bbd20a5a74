"""Low-bit optimizer state (``state_precision="bf16"`` and ``"8bit"``).

The C kernel's low-bit step against the same step in torch operations (the
same bits, stochastic rounding included: both hash the same seed), the
torch step against a float64 recomputation, the 8-bit format (its range,
resolution, unbiased stochastic rounding, EMA updates far below a code step),
the thread count, and the optimizer: stored dtypes and bytes, training,
checkpoints between precisions, validation, eval mode.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfoptim
from sfoptim.backends import cpu_kernel, lowbit
from sfoptim.backends.abi import KERNEL_SCALARS, Kind

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler for the fused kernel")

PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALARS = dict(lr=0.01, ckp1=0.3, beta=0.9, wd=0.01, beta2=0.999, bc2=0.05, eps=1e-8, mu=0.0, bc1=1.0)


def scalars(**changes: float) -> list[float]:
    values = dict(SCALARS, **changes)
    return [values.get(name, 0.0) for name in KERNEL_SCALARS]


def make_bucket(fmt: str, dtype: torch.dtype, sizes: list[int], seed: int = 0) -> list[Any]:
    """y, g, z, v and (8-bit) the block exponents of a bucket, v spanning many orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    ys = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in sizes]
    zs = [(y.float() + 0.1 * torch.randn(n, generator=gen)).bfloat16() for y, n in zip(ys, sizes)]
    vs, es = [], []
    for n in sizes:
        v = torch.rand(n, generator=gen) * torch.logspace(-10, 0, n)
        if fmt == "bf16":
            vs.append(v.bfloat16())
        else:
            code, e = lowbit.encode_sqrt(v.sqrt(), None)
            vs.append(code)
            es.append(e)
    return [ys, gs, zs, vs, es if fmt == "8bit" else None]


def clone_bucket(bucket: list[Any]) -> list[Any]:
    return [[t.clone() for t in lst] if lst is not None else None for lst in bucket]


def assert_same_bits(a: list[Any], b: list[Any]) -> None:
    for name, la, lb in zip(("y", "g", "z", "v", "exp"), a, b):
        if la is None:
            continue
        for i, (ta, tb) in enumerate(zip(la, lb)):
            assert ta.dtype == tb.dtype
            same = torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)) if ta.numel() else True
            assert same, f"{name}[{i}] ({ta.dtype}, {ta.numel()} elements) differs"


# ------------------------------------------------------- kernel == torch path
@st.composite
def kernel_cases(draw: Any) -> dict:
    sizes = draw(st.lists(st.sampled_from([0, 1, 7, 511, 512, 513, 1500, 16_384, 16_385, 40_000]), min_size=1, max_size=4))
    return dict(
        fmt=draw(st.sampled_from(["bf16", "8bit"])),
        dtype=draw(st.sampled_from(PARAM_DTYPES)),
        sizes=sizes,
        kind=draw(st.sampled_from([Kind.ADAM, Kind.SGD_V])),
        ckp1=draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0])),
        wd=draw(st.sampled_from([0.0, 0.01])),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        data=draw(st.integers(0, 1000)),
    )


def check_kernel_case(case: dict) -> None:
    """The kernel and the torch step give the same bits for the same seed (and the kernel takes the call)."""
    a = make_bucket(case["fmt"], case["dtype"], case["sizes"], case["data"])
    b = clone_bucket(a)
    sc = scalars(ckp1=case["ckp1"], wd=case["wd"])
    assert cpu_kernel.lowbit_step(*a, case["kind"], sc, case["seed"])
    lowbit.step(*b, case["kind"], sc, case["seed"])
    assert_same_bits(a, b)


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=kernel_cases())
def test_kernel_and_torch_step_agree_bit_for_bit(case: dict) -> None:
    check_kernel_case(case)


@needs_kernel
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("seed", [None, 2**64 - 5])
def test_kernel_and_torch_step_agree_on_blocks_that_span_the_subnormal_codes(
    dtype: torch.dtype, seed: int | None
) -> None:
    """Gradients and second moments over many orders of magnitude within each block, and zeros."""
    gen = torch.Generator().manual_seed(3)
    a = make_bucket("8bit", dtype, [5000, 16_384 + 700], seed=3)
    for i, g in enumerate(a[1]):
        n = g.numel()
        wide = torch.randn(n, generator=gen) * 10.0 ** (-12 * torch.rand(n, generator=gen))
        wide[torch.rand(n, generator=gen) < 0.05] = 0.0
        g.copy_(wide)
        v = torch.rand(n, generator=gen) * 10.0 ** (-24 * torch.rand(n, generator=gen))
        v[torch.rand(n, generator=gen) < 0.05] = 0.0
        a[3][i], a[4][i] = lowbit.encode_sqrt(v.sqrt(), None)
    b = clone_bucket(a)
    for kind, wd in ((Kind.ADAM, 0.01), (Kind.SGD_V, 0.01), (Kind.ADAM, 0.0), (Kind.SGD_V, 0.0)):
        assert cpu_kernel.lowbit_step(*a, kind, scalars(wd=wd), seed)
        lowbit.step(*b, kind, scalars(wd=wd), seed)
        assert_same_bits(a, b)
    subnormal = sum(int(((c > 0) & (c < 16)).sum()) for c in a[3])
    assert subnormal > 1000


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_without_decay_d_has_no_decay_term(fmt: str) -> None:
    """With wd = 0 neither step adds 0 * y to d: an infinite y leaves z finite (0 * inf would be NaN)."""
    a = make_bucket(fmt, torch.float32, [1000], seed=4)
    a[0][0][:10] = float("inf")
    b = clone_bucket(a)
    for kind in (Kind.ADAM, Kind.SGD_V):
        assert cpu_kernel.lowbit_step(*a, kind, scalars(wd=0.0), 7)
        lowbit.step(*b, kind, scalars(wd=0.0), 7)
        assert_same_bits(a, b)
        assert torch.isfinite(a[2][0].float()).all()


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_kernel_result_does_not_depend_on_the_thread_count(fmt: str) -> None:
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            bucket = make_bucket(fmt, torch.float32, [200_000, 70_001, 3])
            assert cpu_kernel.lowbit_step(*bucket, Kind.ADAM, scalars(), seed=99)
            runs.append(bucket)
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert_same_bits(runs[0], other)


@needs_kernel
def test_kernel_refuses_what_it_cannot_take_and_checks_sizes_before_c() -> None:
    bucket = make_bucket("8bit", torch.float32, [1000, 600])
    before = clone_bucket(bucket)
    # float64 parameters and non-contiguous tensors: refused, nothing written.
    f64 = [[t.double() for t in bucket[0]], [t.double() for t in bucket[1]], *bucket[2:]]
    assert not cpu_kernel.lowbit_step(*f64, Kind.ADAM, scalars(), 1)
    strided = [[torch.randn(2 * n)[::2] for n in (1000, 600)], *bucket[1:]]
    assert not cpu_kernel.lowbit_step(*strided, Kind.ADAM, scalars(), 1)
    aliased = [bucket[0], bucket[1], bucket[2], [bucket[3][0], bucket[3][0][:600]], bucket[4]]
    assert not cpu_kernel.lowbit_step(*aliased, Kind.ADAM, scalars(), 1)
    assert_same_bits(bucket, before)
    # A state of another size, or too few block exponents: an error before C, nothing written.
    short_v = [bucket[0], bucket[1], bucket[2], [bucket[3][0], bucket[3][1][:599]], bucket[4]]
    with pytest.raises(RuntimeError, match="does not belong"):
        cpu_kernel.lowbit_step(*short_v, Kind.ADAM, scalars(), 1)
    with pytest.raises(RuntimeError, match="does not belong"):
        lowbit.step(*short_v, Kind.ADAM, scalars(), 1)
    short_e = [*bucket[:4], [bucket[4][0], bucket[4][1][:1]]]
    with pytest.raises(RuntimeError, match="block exponents"):
        cpu_kernel.lowbit_step(*short_e, Kind.ADAM, scalars(), 1)
    with pytest.raises(RuntimeError, match="block exponents"):
        lowbit.step(*short_e, Kind.ADAM, scalars(), 1)
    assert_same_bits(bucket, before)


# ------------------------------------------------------ against float64 math
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("ckp1", [0.2, 0.8])
def test_step_is_the_float64_step_rounded_once(fmt: str, ckp1: float) -> None:
    """y to float32 rounding; z and v within one step of their grids, the direction from the unrounded v."""
    y, g, z, v, e = (lst[0] if lst is not None else None for lst in make_bucket(fmt, torch.float32, [5000]))
    y0, g0, z0 = y.double(), g.double(), z.double()
    v0 = v.double() if e is None else lowbit.decode_sqrt(v, e).double() ** 2
    s = dict(SCALARS, ckp1=ckp1)
    vn = s["beta2"] * v0 + (1 - s["beta2"]) * g0 * g0
    d = g0 / ((vn / s["bc2"]).sqrt() + s["eps"]) + s["wd"] * y0
    y_exp = torch.lerp(y0, z0, ckp1) + s["lr"] * (s["beta"] * (1 - ckp1) - 1) * d
    z_exp = z0 - s["lr"] * d
    lowbit.step([y], [g], [z], [v], [e] if e is not None else None, Kind.ADAM, scalars(ckp1=ckp1), seed=5)
    assert ((y.double() - y_exp).abs() <= 1e-5 * (y_exp.abs() + 1e-3)).all()
    # bfloat16 keeps 8 significant bits: a stochastic rounding lands on a neighbour.
    assert ((z.double() - z_exp).abs() <= 2**-7 * z_exp.abs()).all()
    if e is None:
        assert ((v.double() - vn).abs() <= 2**-7 * vn).all()
    else:
        s_new = lowbit.decode_sqrt(v, e).double()
        # One code step: 1/16 of the binade, or the subnormal step 2^-18 of the block scale.
        scale = 2.0 ** e.double().repeat_interleave(lowbit.BLOCK)[: s_new.numel()]
        assert ((s_new - vn.sqrt()).abs() <= vn.sqrt() / 8 + scale * 2**-18).all()


# ------------------------------------------------------------ the 8-bit code
def test_8bit_code_covers_the_block_range_with_its_resolution() -> None:
    s = torch.cat([torch.logspace(-4.2, 0, 511), torch.tensor([1.0])])  # down to 2^-14 of the block max
    code, e = lowbit.encode_sqrt(s, None)
    back = lowbit.decode_sqrt(code, e)
    assert e.tolist() == [0]  # max 1.0 <= 1.9375 * 2^0
    assert ((back - s).abs() <= s / 31).all()  # half a step of 1/16 of the binade
    assert torch.equal(code.sort().values, code)  # monotone
    # The block's largest value is coded at most 1.9375 * 2^E and exactly when it is on the grid.
    for mx in (1.9375, 1.9376, 3.0, 1e-20, 7e18):
        code, e = lowbit.encode_sqrt(torch.tensor([mx, 0.0]), None)
        assert mx <= 1.9375 * 2.0 ** e.item() < 2 * mx
        assert lowbit.decode_sqrt(code, e)[1].item() == 0.0
    # NaN and overflowing square roots saturate (their square is inf in float32).
    code, e = lowbit.encode_sqrt(torch.tensor([float("nan"), float("inf"), 1.0]), None)
    assert code[:2].tolist() == [255, 255] and torch.isinf(lowbit.decode_sqrt(code, e)[:2] ** 2).all()


def test_8bit_stochastic_rounding_is_unbiased() -> None:
    s = torch.full((1024,), 1.0) * torch.linspace(0.3, 1.9, 1024)
    total = torch.zeros(1024, dtype=torch.float64)
    draws = 400
    for k in range(draws):
        code, e = lowbit.encode_sqrt(s, lowbit.random_bits(k, lowbit.STREAM_V, 0, 0, s.numel(), s.device))
        total += lowbit.decode_sqrt(code, e).double()
    mean = total / draws
    # One code step is at most 1/8 of the value; the mean of 400 draws is within ~4 sigma of it.
    assert ((mean - s.double()).abs() <= 4 * (s.double() / 8) / math.sqrt(draws) * 0.5 + 1e-7).all()
    nearest = lowbit.decode_sqrt(*lowbit.encode_sqrt(s, None)).double()
    assert (mean - s.double()).abs().mean() < 0.3 * (nearest - s.double()).abs().mean()


def test_random_bits_are_uncorrelated_between_halves_and_between_nearby_elements() -> None:
    """The rounding numbers of one step: z's half and v's half independent, no pattern along the tensor."""
    steps, n = 256, 2048
    r = torch.stack([lowbit.random_bits(t, lowbit.STREAM_Z, 3, 4096, n, torch.device("cpu")) for t in range(steps)])
    hi, lo = (r >> 16).double(), (r & 0xFFFF).double()
    for half in (hi, lo):
        assert abs(half.mean().item() / 65535 - 0.5) < 0.01
        centred = half - half.mean(1, keepdim=True)
        for lag in range(1, 17):
            corr = (centred[:, :-lag] * centred[:, lag:]).mean() / centred.var()
            assert abs(corr.item()) < 0.02, lag  # a single multiply leaves up to 0.45
    pooled = ((hi - hi.mean()) * (lo - lo.mean())).mean() / (hi.std() * lo.std())
    assert abs(pooled.item()) < 0.01


def test_8bit_stochastic_rounding_is_unbiased_on_the_subnormal_codes() -> None:
    """Below 2^-14 of the block scale the codes have a fixed gap of 2^-18; the rounding is unbiased there too."""
    s = torch.cat([torch.tensor([1.0]), torch.linspace(0.0, 2.0**-14, 511)])  # one block, E = 0: q = s
    total = torch.zeros(512, dtype=torch.float64)
    draws = 400
    for k in range(draws):
        code, e = lowbit.encode_sqrt(s, lowbit.random_bits(k, lowbit.STREAM_V, 0, 0, s.numel(), s.device))
        assert e.tolist() == [0] and (code[1:] <= 16).all()
        total += lowbit.decode_sqrt(code, e).double()
    err = (total / draws - s.double())[1:]
    # Half a gap of standard deviation at most; 4 sigma of the mean of 400 draws.
    assert (err.abs() <= 4 * 0.5 * 2.0**-18 / math.sqrt(draws)).all()
    nearest = lowbit.decode_sqrt(*lowbit.encode_sqrt(s, None)).double()
    assert err.abs().mean() < 0.3 * (nearest - s.double())[1:].abs().mean()


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_slow_ema_updates_do_not_stall(fmt: str) -> None:
    """v' = 0.999 v + 0.001 g^2 moves by 0.1 % a step, far below a code step: rounded stochastically it still follows.

    With rounding to nearest v would stay where it started.
    """
    n = 8192
    steps = 1500
    bucket = make_bucket(fmt, torch.float32, [n])
    bucket[0][0].zero_()
    bucket[2][0].zero_()
    if fmt == "bf16":
        bucket[3][0].fill_(1.0)
    else:
        code, e = lowbit.encode_sqrt(torch.ones(n), None)
        bucket[3][0].copy_(code)
        bucket[4][0].copy_(e)
    bucket[1][0].fill_(2.0)  # g^2 = 4
    nearest = clone_bucket(bucket)
    sc = scalars(lr=0.0, wd=0.0, ckp1=0.0)
    for t in range(steps):
        assert cpu_kernel.lowbit_step(*bucket, Kind.SGD_V, sc, seed=t)
        assert cpu_kernel.lowbit_step(*nearest, Kind.SGD_V, sc, seed=None)
    expected = 4 - 3 * 0.999**steps

    def v_of(b: list[Any]) -> torch.Tensor:
        return b[3][0].double() if fmt == "bf16" else lowbit.decode_sqrt(b[3][0], b[4][0]).double() ** 2

    assert abs(v_of(bucket).mean().item() / expected - 1) < 0.02
    assert v_of(nearest).mean().item() < 1.1  # stalled


# ------------------------------------------------------------ the optimizer
def _model_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.3).to(dtype)) for s in [(512, 40), (1000,), (3,)]]


def _train(opt: Any, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = (p.detach().float() - 0.5 + 0.3 * torch.randn(p.shape, generator=gen)).to(p.dtype)
        opt.step()


def _distance(params: list[torch.Tensor]) -> float:
    return sum(float(((p.detach().double() - 0.5) ** 2).sum()) for p in params)


@pytest.mark.parametrize("cls", [sfoptim.AdamWScheduleFree, sfoptim.RAdamScheduleFree])
def test_state_is_stored_in_the_chosen_format(cls: type) -> None:
    params = _model_params()
    opt = cls(params, state_precision="8bit")
    _train(opt, params, 1)
    st8 = opt.state[params[0]]
    assert set(st8) == {"z", "exp_avg_sq_code", "exp_avg_sq_exp"}
    assert st8["z"].dtype == torch.bfloat16 and st8["exp_avg_sq_code"].dtype == torch.uint8
    assert st8["exp_avg_sq_exp"].dtype == torch.int8 and st8["exp_avg_sq_exp"].shape == (40,)
    nbytes = sum(t.numel() * t.element_size() for t in st8.values())
    assert nbytes / params[0].numel() == 3 + 1 / 512
    opt = cls(params, state_precision="bf16")
    _train(opt, params, 1)
    assert {k: v.dtype for k, v in opt.state[params[0]].items()} == {"z": torch.bfloat16, "exp_avg_sq": torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_bit_state_trains_like_full_state(dtype: torch.dtype) -> None:
    finals = {}
    for precision in ("full", "bf16", "8bit"):
        params = _model_params(dtype)
        opt = sfoptim.AdamWScheduleFree(params, lr=0.02, warmup_steps=10, state_precision=precision)
        _train(opt, params, 150)
        opt.eval()
        finals[precision] = _distance(params)
    start = _distance(_model_params(dtype))
    assert finals["full"] < 0.05 * start
    for precision in ("bf16", "8bit"):
        assert finals[precision] < 1.5 * finals["full"] + 1e-3 * start, finals


def test_fused_and_torch_paths_give_the_same_trajectory_and_resume_across_them() -> None:
    runs = {}
    for fused in (None, False):
        params = _model_params()
        opt = sfoptim.AdamWScheduleFree(params, lr=0.02, state_precision="8bit", fused=fused)
        _train(opt, params, 5)
        saved = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
        _train(opt, params, 5, start=5)
        runs[fused] = [p.detach().clone() for p in params], saved
    assert all(torch.equal(a, b) for a, b in zip(runs[None][0], runs[False][0]))
    # A checkpoint of the fused run resumed on the torch path continues bit for bit.
    (sd, saved_params) = runs[None][1]
    params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt = sfoptim.AdamWScheduleFree(params, lr=0.02, state_precision="8bit", fused=False)
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["exp_avg_sq_code"].dtype == torch.uint8
    assert opt.state[params[0]]["z"].dtype == torch.bfloat16
    _train(opt, params, 5, start=5)
    assert all(torch.equal(a, b) for a, b in zip(params, runs[None][0]))


@pytest.mark.parametrize(("saved", "loaded"), [("full", "8bit"), ("8bit", "full"), ("bf16", "8bit"), ("8bit", "bf16")])
def test_checkpoint_of_another_precision_is_refused_naming_both(saved: str, loaded: str) -> None:
    params = _model_params()
    opt = sfoptim.AdamWScheduleFree(params, state_precision=saved)
    _train(opt, params, 2)
    other = sfoptim.AdamWScheduleFree(_model_params(), state_precision=loaded)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=rf"state_precision='{saved}'.*state_precision='{loaded}'"):
        other.load_state_dict(opt.state_dict())
    assert other.state_dict() == before


def test_codes_of_another_dtype_in_a_checkpoint_are_refused() -> None:
    params = _model_params()
    opt = sfoptim.AdamWScheduleFree(params, state_precision="8bit")
    _train(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq_code"] = sd["state"][0]["exp_avg_sq_code"].float()
    with pytest.raises(ValueError, match="exp_avg_sq_code"):
        sfoptim.AdamWScheduleFree(_model_params(), state_precision="8bit").load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq_exp"] = sd["state"][0]["exp_avg_sq_exp"][:-1]
    with pytest.raises(ValueError, match="exp_avg_sq_exp"):
        sfoptim.AdamWScheduleFree(_model_params(), state_precision="8bit").load_state_dict(sd)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(state_precision="int8"), "state_precision"),
        (dict(state_precision=8), "state_precision"),
        (dict(state_precision="8bit", state_dtype=torch.float32), "state_dtype"),
        (dict(state_precision="bf16", inner_momentum=0.9), "inner_momentum"),
    ],
)
def test_invalid_state_precision_raises_value_error_naming_it(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match="Invalid state_precision") as caught:
        sfoptim.AdamWScheduleFree(_model_params(), **kwargs)
    assert named in str(caught.value)
    with pytest.raises(ValueError, match="decay_at"):
        sfoptim.AdamWScheduleFree(
            [{"params": _model_params(), "decay_at": "z"}], weight_decay=0.1, state_precision="8bit"
        )


@pytest.mark.parametrize("cls", [sfoptim.SGDScheduleFree, sfoptim.ProdigyScheduleFree])
def test_classes_without_low_bit_state_refuse_it_in_a_group(cls: type) -> None:
    with pytest.raises(ValueError, match="Invalid state_precision: '8bit'"):
        cls([{"params": _model_params(), "state_precision": "8bit"}])


def test_complex_parameters_are_refused_before_anything_changes() -> None:
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    q = torch.nn.Parameter(torch.randn(4))
    opt = sfoptim.AdamWScheduleFree([q, p], state_precision="8bit")
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    before = q.detach().clone()
    with pytest.raises(ValueError, match="real floating"):
        opt.step()
    assert torch.equal(q, before)


def test_eval_mode_and_averaged_state_dict_recover_x_from_y_and_bfloat16_z() -> None:
    model = torch.nn.Linear(30, 20)
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.05, state_precision="8bit")
    params = list(model.parameters())
    _train(opt, params, 20)
    y = [p.detach().clone() for p in params]
    x = [torch.lerp(a, opt.state[p]["z"].float(), 1 - 1 / 0.9) for p, a in zip(params, y)]
    assert all(torch.equal(a, b) for a, b in zip(opt.eval_params(), x))
    averaged = sfoptim.averaged_state_dict(model, opt)
    assert torch.equal(averaged["weight"], x[0]) and torch.equal(averaged["bias"], x[1])
    opt.eval()
    assert all(torch.equal(p, b) for p, b in zip(params, x))
    opt.train()
    assert all(torch.allclose(p, a, atol=1e-6) for p, a in zip(params, y))


def test_closure_form_keeps_x_between_steps() -> None:
    params = _model_params()
    opt = sfoptim.AdamWScheduleFreeClosure(params, lr=0.02, state_precision="bf16")

    def closure() -> float:
        for p in params:
            p.grad = p.detach() - 0.5
        return 0.0

    for _ in range(10):
        opt.step(closure)
    x = opt.eval_params()
    assert all(torch.equal(p, q) for p, q in zip(params, x))
    assert _distance(params) < _distance(_model_params())


def test_compiled_step_runs_the_low_bit_step_eagerly_with_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(600, 3, generator=gen)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    compiled_opt = sfoptim.AdamWScheduleFree(ps, lr=0.01, state_precision="8bit")
    eager_opt = sfoptim.AdamWScheduleFree(qs, lr=0.01, state_precision="8bit")

    @torch.compile
    def step() -> None:
        compiled_opt.step()

    for _ in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        step()
        eager_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
