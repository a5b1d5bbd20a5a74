"""The fused CPU backend: exactness against the reference forms, dispatch, build reuse, fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu
from sfoptim.backends import kernel_cache as _kernel_cache

pytestmark = pytest.mark.skipif(not _fused_cpu.available(), reason="no C compiler for the fused kernel")

STEPS = 200
RTOL = 2e-5


def _shapes():
    # One tensor longer than the kernel's 16K-element chunk, so chunks that
    # split a tensor are covered; a complex one goes through its real view.
    return [(40, 30), (7,), (20_000,), (3, 4)]


def _make_params(dtype=torch.float32, complex_too=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in _shapes()]
    if complex_too:
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        ps.append(torch.randn(5, 2, generator=gen, dtype=cdtype))
    return ps


def _set_grads(params, step, seed=1):
    """Noise plus 0.5*y: a contractive quadratic, so rounding differences do not grow."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = noise + 0.5 * p.detach()


def _groups(params, split):
    if not split:
        return params
    return [
        {"params": params[:2]},
        {"params": params[2:], "lr": 3e-3, "weight_decay": 0.05},
    ]


def _assert_close(actual, expected, what):
    for i, (a, b) in enumerate(zip(actual, expected)):
        a, b = torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        assert err <= RTOL, f"{what}: tensor {i} relative difference {err:.3g} > {RTOL}"


def _run_pair(fast_cls, ref_cls, kwargs, *, split=False, dtype=torch.float32, lr_changes=False):
    init = _make_params(dtype)
    fast_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fast = fast_cls(_groups(fast_params, split), fused=True, **kwargs)
    ref = ref_cls(_groups(ref_params, split), **kwargs)
    for step in range(STEPS):
        if lr_changes:
            for opt in (fast, ref):
                for g in opt.param_groups:
                    g["lr"] = 1e-3 * (1 + (step % 7))
        _set_grads(fast_params, step)
        _set_grads(ref_params, step)
        grads_before = [p.grad.clone() for p in fast_params]
        fast.step()
        ref.step()
        for p, g in zip(fast_params, grads_before):
            assert torch.equal(p.grad, g), "p.grad was modified"
        _assert_close([p.detach() for p in fast_params], [p.detach() for p in ref_params], f"y after step {step + 1}")
    _assert_close(fast.eval_params(), ref.eval_params(), "x at the end")
    return fast


ADAMW_CASES = {
    "defaults": {},
    "warmup_r_power": {"warmup_steps": 20, "r": 1.5, "weight_lr_power": 1.0},
    "decay_inner_momentum": {"inner_momentum": 0.9, "weight_decay": 0.1, "lr": 1e-2},
    "betas_eps": {"betas": (0.5, 0.95), "eps": 1e-6, "warmup_steps": 5},
}


@pytest.mark.parametrize("case", list(ADAMW_CASES))
def test_adamw_matches_reference(case):
    _run_pair(sfoptim.AdamWScheduleFree, sfoptim.AdamWScheduleFreeReference, ADAMW_CASES[case])


def test_adamw_param_groups_and_changing_lr_match_reference():
    _run_pair(
        sfoptim.AdamWScheduleFree,
        sfoptim.AdamWScheduleFreeReference,
        {"weight_decay": 0.01, "warmup_steps": 10},
        split=True,
        lr_changes=True,
    )


def test_adamw_float64_matches_reference():
    _run_pair(sfoptim.AdamWScheduleFree, sfoptim.AdamWScheduleFreeReference, {"weight_decay": 0.1}, dtype=torch.float64)


LARGE_EPS_CASES = {
    "adamw": (sfoptim.AdamWScheduleFree, sfoptim.AdamWScheduleFreeReference, {"weight_decay": 0.1}),
    "adamw_inner_momentum": (
        sfoptim.AdamWScheduleFree,
        sfoptim.AdamWScheduleFreeReference,
        {"inner_momentum": 0.9, "warmup_steps": 5},
    ),
    "radam": (sfoptim.RAdamScheduleFree, sfoptim.RAdamScheduleFreeReference, {"silent_sgd_phase": False}),
}


@pytest.mark.parametrize("case", list(LARGE_EPS_CASES))
def test_float64_with_a_large_eps_matches_reference_tightly(case):
    # With eps = 0.1 against v of order one, moving eps (inside the square
    # root, before the bias correction, ...) changes the step by percents,
    # while float64 rounding stays below 1e-14: the two are ten orders apart.
    fast_cls, ref_cls, kwargs = LARGE_EPS_CASES[case]
    init = _make_params(torch.float64)
    fast_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fast = fast_cls(fast_params, eps=0.1, lr=1e-2, fused=True, **kwargs)
    ref = ref_cls(ref_params, eps=0.1, lr=1e-2, **kwargs)
    calls = _count_calls(_fused_cpu, "step")
    for step in range(30):
        _set_grads(fast_params, step)
        _set_grads(ref_params, step)
        fast.step()
        ref.step()
    assert calls.n == 30
    for i, (a, b) in enumerate(zip(fast_params + fast.eval_params(), ref_params + ref.eval_params())):
        a, b = torch.view_as_real(a.detach()) if a.is_complex() else a.detach(), torch.view_as_real(b.detach()) if b.is_complex() else b.detach()
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-10, f"tensor {i}: relative difference {err:.3g} > 1e-10"


SGD_CASES = {
    "defaults": {"lr": 0.1},
    "warmup_decay_r_power": {"lr": 0.2, "warmup_steps": 10, "weight_decay": 0.05, "momentum": 0.8, "r": 2.0, "weight_lr_power": 0.5},
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_reference(case):
    _run_pair(sfoptim.SGDScheduleFree, sfoptim.SGDScheduleFreeReference, SGD_CASES[case])


def test_sgd_param_groups_match_reference():
    _run_pair(sfoptim.SGDScheduleFree, sfoptim.SGDScheduleFreeReference, {"lr": 0.1}, split=True, lr_changes=True)


RADAM_CASES = {
    "silent_sgd_phase": {},
    "sgd_phase": {"silent_sgd_phase": False, "lr": 1e-2},
    "decay_r": {"weight_decay": 0.05, "r": 1.0, "betas": (0.9, 0.99)},
}


@pytest.mark.parametrize("case", list(RADAM_CASES))
def test_radam_matches_reference_in_both_phases(case):
    # beta2 = 0.999 leaves the SGD phase at step 6; 200 steps cover both phases.
    _run_pair(sfoptim.RAdamScheduleFree, sfoptim.RAdamScheduleFreeReference, RADAM_CASES[case], split=case == "decay_r")


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "warmup_steps": 5}], ids=["defaults", "decay_warmup"])
def test_paper_form_fused_matches_its_foreach_form(kwargs):
    # The paper form has no reference class of its own; its foreach path is
    # tested against the published package elsewhere.
    init = _make_params()
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    fa = sfoptim.AdamWScheduleFreePaper(a, fused=True, **kwargs)
    fb = sfoptim.AdamWScheduleFreePaper(b, fused=False, **kwargs)
    for step in range(STEPS):
        _set_grads(a, step)
        _set_grads(b, step)
        fa.step()
        fb.step()
        _assert_close([p.detach() for p in a], [p.detach() for p in b], f"y after step {step + 1}")


def test_closure_form_uses_fused_kernel_and_matches():
    init = _make_params(complex_too=False)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    fa = sfoptim.AdamWScheduleFreeClosure(a, fused=True, weight_decay=0.1)
    fb = sfoptim.AdamWScheduleFreeClosure(b, fused=False, weight_decay=0.1)
    for step in range(50):
        for params, opt in ((a, fa), (b, fb)):
            opt.step(lambda params=params: _set_grads(params, step))
        _assert_close([p.detach() for p in a], [p.detach() for p in b], f"x after step {step + 1}")


# ---------------------------------------------------------------- the wrapper
WRAPPER_CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), 0.0),
    "adam_decay_at_y": (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), 0.05),
    "rmsprop_decay_both": (lambda ps: torch.optim.RMSprop(ps, lr=2e-3, weight_decay=0.01), 0.05),
}


@pytest.mark.parametrize("case", list(WRAPPER_CASES))
def test_wrapper_bookkeeping_matches_reference(case):
    base, decay_at_y = WRAPPER_CASES[case]
    init = _make_params()
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    fast = sfoptim.ScheduleFreeWrapper(base(a), momentum=0.9, weight_decay_at_y=decay_at_y, r=1.0, fused=True)
    ref = sfoptim.ScheduleFreeWrapperReference(base(b), momentum=0.9, weight_decay_at_y=decay_at_y, r=1.0)
    calls = _count_calls(_fused_cpu, "wrap_before")
    for step in range(STEPS):
        _set_grads(a, step)
        _set_grads(b, step)
        fast.step()
        ref.step()
        _assert_close([p.detach() for p in a], [p.detach() for p in b], f"y after step {step + 1}")
    _assert_close(fast.eval_params(), ref.eval_params(), "x at the end")
    assert calls.n == STEPS


def test_wrapper_with_mixed_dtypes_in_a_group_stays_exact():
    init = [torch.randn(50), torch.randn(30, dtype=torch.float64)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    fast = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(a, lr=0.1), weight_decay_at_y=0.01)
    ref = sfoptim.ScheduleFreeWrapperReference(torch.optim.SGD(b, lr=0.1), weight_decay_at_y=0.01)
    for step in range(20):
        _set_grads(a, step)
        _set_grads(b, step)
        fast.step()
        ref.step()
    _assert_close([p.detach() for p in a], [p.detach() for p in b], "y")


def test_wrapper_step_returns_the_closure_loss():
    p = torch.nn.Parameter(torch.randn(6))
    opt = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([p], lr=0.1), fused=True)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None


# ------------------------------------------------------------------- dispatch
class _Counter:
    n = 0


def _count_calls(module, name):
    """Counts calls of module.name that ran the kernel (returned True) until the test ends."""
    counter = _Counter()
    original = getattr(module, name)

    def spy(*args, **kwargs):
        ran = original(*args, **kwargs)
        counter.n += bool(ran)
        return ran

    _PATCHES.append((module, name, original))
    setattr(module, name, spy)
    return counter


_PATCHES: list = []


@pytest.fixture(autouse=True)
def _undo_spies():
    yield
    while _PATCHES:
        module, name, original = _PATCHES.pop()
        setattr(module, name, original)


def _one_step(opt_cls, params, **kwargs):
    opt = opt_cls(params, **kwargs)
    _set_grads(params, 0)
    opt.step()
    return opt


def test_default_picks_the_kernel_on_cpu_float32():
    calls = _count_calls(_fused_cpu, "step")
    for cls in (sfoptim.SGDScheduleFree, sfoptim.AdamWScheduleFree, sfoptim.RAdamScheduleFree):
        _one_step(cls, [torch.nn.Parameter(torch.randn(10))])
    assert calls.n == 3


def test_foreach_false_or_fused_false_never_use_the_kernel():
    calls = _count_calls(_fused_cpu, "step")
    _one_step(sfoptim.AdamWScheduleFree, [torch.nn.Parameter(torch.randn(10))], fused=False)
    _one_step(sfoptim.AdamWScheduleFree, [torch.nn.Parameter(torch.randn(10))], foreach=False)
    assert calls.n == 0


def test_fused_and_foreach_together_are_refused():
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        sfoptim.AdamWScheduleFree([torch.nn.Parameter(torch.randn(3))], fused=True, foreach=True)


def test_unsupported_dtype_is_refused_silently_by_default_and_warns_once_when_asked():
    from sfoptim.directions import Kind

    def lists():
        return [[torch.ones(10, dtype=torch.float8_e4m3fn)] for _ in range(3)]

    scalars = [0.1, 0.5, 0.9, 0.0, 0.999, 1.0, 1e-8, 0.0, 1.0]
    ys, gs, zs = lists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fused_cpu.step(ys, gs, zs, [], Kind.SGD, scalars) is False
    assert all(torch.equal(t.float(), torch.ones(10)) for t in ys + zs), "a refused call changed a tensor"
    _fused_cpu._warned.discard("dtype")
    with pytest.warns(RuntimeWarning, match="fused=True does not support dtypes other than float64, float32, bfloat16"):
        assert _fused_cpu.step(ys, gs, zs, [], Kind.SGD, scalars, explicit=True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fused_cpu.step(ys, gs, zs, [], Kind.SGD, scalars, explicit=True) is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kernel_class_takes_the_kernel_for_16_bit_parameters(dtype):
    calls = _count_calls(_fused_cpu, "step")
    for cls in (sfoptim.SGDScheduleFree, sfoptim.AdamWScheduleFree, sfoptim.RAdamScheduleFree):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _one_step(cls, [torch.nn.Parameter(torch.randn(10, dtype=dtype))], fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = torch.nn.Parameter(torch.randn(10, dtype=dtype))
        opt = sfoptim.AdamCScheduleFreePlus([p], fused=True)
        p.grad = torch.randn_like(p)
        opt.step(loss=1.0)
    assert calls.n == 4
    wraps = [_count_calls(_fused_cpu, name) for name in ("wrap_before", "wrap_after")]
    p = torch.nn.Parameter(torch.randn(10, dtype=dtype))
    wrapper = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([p], lr=0.1), momentum=0.9, fused=True)
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.step()
    assert [c.n for c in wraps] == [1, 1]


def test_non_contiguous_parameter_takes_foreach_and_stays_exact():
    base = torch.randn(30, 20)
    a = torch.nn.Parameter(base.clone().t())  # a transposed, non-contiguous leaf
    b = torch.nn.Parameter(base.clone().t())
    fa = sfoptim.AdamWScheduleFree([a], weight_decay=0.1)
    fb = sfoptim.AdamWScheduleFreeReference([b], weight_decay=0.1)
    for step in range(20):
        _set_grads([a], step)
        _set_grads([b], step)
        fa.step()
        fb.step()
    _assert_close([a.detach()], [b.detach()], "y")


def test_state_is_exactly_z_and_v():
    p = torch.nn.Parameter(torch.randn(10))
    assert set(_one_step(sfoptim.AdamWScheduleFree, [p]).state[p]) == {"z", "exp_avg_sq"}
    p = torch.nn.Parameter(torch.randn(10))
    assert set(_one_step(sfoptim.SGDScheduleFree, [p]).state[p]) == {"z"}
    p = torch.nn.Parameter(torch.randn(10))
    assert set(_one_step(sfoptim.AdamWScheduleFree, [p], inner_momentum=0.9).state[p]) == {"z", "exp_avg_sq", "exp_avg"}



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [None, 7])
def test_adam_kernel_with_zero_inner_momentum_sets_m_to_g_without_reading_it(dtype, seed):
    """mu = 0 (ScheduleFree+'s default betas): m <- lerp(m, g, 1) is exactly g, as torch's lerp gives it.

    The old m does not enter the step: a buffer of huge values (where
    m + (g - m) loses g entirely) or of NaN gives the same y, z, v and m as
    a buffer of zeros, and m holds g bit for bit, with either rounding.
    """
    from sfoptim.backends.abi import KERNEL_SCALARS, Kind

    gen = torch.Generator().manual_seed(5)
    n = 20_000  # more than one chunk
    y0, z0 = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
    g = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    v0 = (torch.rand(n, generator=gen) * 1e-4).to(dtype)
    values = dict(lr=0.01, ckp1=0.3, beta=0.9, wd=0.01, beta2=0.95, bc2=0.1, eps=1e-8, mu=0.0, bc1=1.0)
    scalars = [values.get(k, 0.0) for k in KERNEL_SCALARS]  # other families' scalars unset (0)
    results = []
    for fill in (0.0, 3e4 if dtype == torch.float16 else 1e30, float("nan")):
        y, z, v = y0.clone(), z0.clone(), v0.clone()
        m = torch.full((n,), fill, dtype=dtype)
        assert _fused_cpu.step([y], [g], [z], [[v], [m]], Kind.ADAM, scalars, seed=seed)
        assert torch.equal(m, g), f"m is not g after a step with mu = 0 (old m = {fill})"
        results.append((y, z, v))
    for y, z, v in results[1:]:
        for a, b in zip((y, z, v), results[0]):
            assert torch.equal(a, b), "the old m entered the step"

def test_empty_and_zero_size_parameters():
    ps = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.randn(3))]
    opt = _one_step(sfoptim.AdamWScheduleFree, ps)
    opt.step()
    assert torch.isfinite(ps[1]).all()


def test_state_dict_without_fused_key_loads():
    p = torch.nn.Parameter(torch.randn(5))
    opt = _one_step(sfoptim.AdamWScheduleFree, [p])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("fused")
    opt2 = sfoptim.AdamWScheduleFree([p])
    opt2.load_state_dict(sd)
    _set_grads([p], 1)
    opt2.step()
    assert torch.isfinite(p).all()


# ------------------------------------------------------- build once, fallback
@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(tmp_path))
    saved = (_fused_cpu._lib, _fused_cpu._failed, set(_fused_cpu._warned))
    _fused_cpu._reset_for_tests()
    yield tmp_path
    _fused_cpu._lib, _fused_cpu._failed = saved[0], saved[1]
    _fused_cpu._warned.clear()
    _fused_cpu._warned.update(saved[2])


def test_kernel_is_built_once_and_reused(fresh_loader):
    builds, loads = _fused_cpu.build_count, _fused_cpu.load_count
    # The recompilation scenario: 1,000 steps with warmup, a changing
    # learning rate and eval()/train() switches, plus a second dtype and algorithm.
    params = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(20, dtype=torch.float64))]
    opt = sfoptim.AdamWScheduleFree(params, warmup_steps=100)
    radam = sfoptim.RAdamScheduleFree([torch.nn.Parameter(torch.randn(7))])
    for step in range(1000):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (1 + step % 5)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        if step % 100 == 99:
            opt.eval()
            opt.train()
            radam.param_groups[0]["params"][0].grad = torch.ones(7)
            radam.step()
    assert _fused_cpu.build_count == builds + 1
    assert _fused_cpu.load_count == loads + 1
    assert len(list(fresh_loader.glob("*.so"))) == 1
    # A new process finds the library in the cache and compiles nothing.
    _fused_cpu._reset_for_tests()
    assert _fused_cpu.available()
    assert _fused_cpu.build_count == builds + 1


def test_missing_compiler_warns_once_and_falls_back(fresh_loader, monkeypatch):
    monkeypatch.setenv("SFOPTIM_CC", "/nonexistent/cc")
    monkeypatch.setattr(_kernel_cache.shutil, "which", lambda name: None)
    init = _make_params(complex_too=False)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    fa = sfoptim.AdamWScheduleFree(a, weight_decay=0.1)
    fb = sfoptim.AdamWScheduleFreeReference(b, weight_decay=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10):
            _set_grads(a, step)
            _set_grads(b, step)
            fa.step()
            fb.step()
        sgd = sfoptim.SGDScheduleFree([torch.nn.Parameter(torch.randn(3))], fused=True)
        _set_grads(sgd.param_groups[0]["params"], 0)
        sgd.step()
    messages = [str(w.message) for w in caught if "fused" in str(w.message)]
    assert len(messages) == 1 and "no C compiler" in messages[0]
    _assert_close([p.detach() for p in a], [p.detach() for p in b], "y")


def test_failing_compiler_warns_once_and_falls_back(fresh_loader, monkeypatch):
    monkeypatch.setenv("SFOPTIM_CC", "false")
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable"):
        _one_step(sfoptim.SGDScheduleFree, [p])
    assert torch.isfinite(p).all()


# ------------------------------------------------------------ decay at z
DECAY_AT_Z_CASES = {
    "sgd": (sfoptim.SGDScheduleFree, dict(lr=0.05, weight_decay=0.5)),
    "adamw": (sfoptim.AdamWScheduleFree, dict(lr=1e-2, weight_decay=0.5, warmup_steps=3)),
    "adamw_inner": (sfoptim.AdamWScheduleFree, dict(lr=1e-2, weight_decay=0.5, inner_momentum=0.9)),
    "radam": (sfoptim.RAdamScheduleFree, dict(lr=5e-2, weight_decay=0.5, silent_sgd_phase=False)),
    "prodigy": (sfoptim.ProdigyScheduleFree, dict(d0=1e-2, weight_decay=0.5, update_clip=1.0)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(DECAY_AT_Z_CASES))
def test_decay_at_z_takes_the_kernel_and_matches_foreach(case, dtype):
    """``decay_at="z"`` runs on the kernel (the scalar ``wdz``), to rounding of the foreach path, and differs from decay at y."""
    cls, kwargs = DECAY_AT_Z_CASES[case]
    init = _make_params(dtype)
    scalars = []
    original = _fused_cpu.step

    def spy(*args, **kw):
        ran = original(*args, **kw)
        if ran:
            scalars.append(args[5])
        return ran

    _PATCHES.append((_fused_cpu, "step", original))
    _fused_cpu.step = spy
    runs = {}
    for name, fused, decay_at in (("kernel", True, "z"), ("foreach", False, "z"), ("at_y", True, "y")):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the kernel takes every bucket
            opt = cls([{"params": params, "decay_at": decay_at}], fused=fused, **kwargs)
            for step in range(30):
                _set_grads(params, step)
                opt.step()
        runs[name] = [p.detach().clone() for p in params]
        if name == "kernel":
            wdz = sfoptim.backends.abi.KERNEL_SCALARS.index("wdz")
            assert len(scalars) == 30 and all(s[wdz] != 0 and s[3] == 0 for s in scalars), "the kernel did not take the decay at z"
    tol = 1e-12 if dtype == torch.float64 else RTOL
    for i, (a, b) in enumerate(zip(runs["kernel"], runs["foreach"])):
        a, b = torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b
        err = (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
        assert err <= tol, f"tensor {i}: kernel and foreach differ by {err:.3g} > {tol}"
    assert max((a - b).abs().max().item() for a, b in zip(runs["kernel"], runs["at_y"])) > 1e-3, "decay at y gives the same numbers"
