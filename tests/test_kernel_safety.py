"""The fused CPU kernel's boundary: nothing a user can construct reaches C wrong.

The kernel trusts the pointers and sizes it is given, so a wrong size is an
out-of-bounds write, not an exception. These tests feed it what users can
build through the public API (checkpoints of other models, other dtypes or
other optimizer classes, the same parameter twice, overlapping views, any
strides) and require either a clear error before anything changes or exactly
the foreach path's result. Reproductions that crashed the process run in a
subprocess, so that a regression fails one test instead of killing pytest.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu
from sfoptim.directions import Kind

SRC = Path(sfoptim.__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def _assert_clean_exit(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 0, (
        f"exit status {proc.returncode} (negative: killed by signal {-proc.returncode})\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    assert expected in proc.stdout, proc.stdout


def _grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = g.to(p.dtype) if not p.is_complex() else torch.complex(g, g.flip(-1) if g.dim() else g).to(p.dtype)


def _stepped(opt_cls: type, params: list[torch.nn.Parameter], steps: int = 1, **kw: Any) -> torch.optim.Optimizer:
    opt = opt_cls(params, **kw)
    for s in range(steps):
        _grads(params, s)
        opt.step()
    return opt


# --------------------------------------------------- checkpoints that do not fit
# Reproductions that crashed the process, run together in one subprocess (one
# interpreter start); each prints its verdict, so a crash fails every test
# whose verdict is missing.
_CRASH_REPRODUCTIONS = {
    "bigger-model": """
        old = torch.nn.Linear(8, 4); o1 = sfoptim.AdamWScheduleFree(old.parameters())
        for p in old.parameters(): p.grad = torch.ones_like(p)
        o1.step(); sd = o1.state_dict()
        for fused in (None, False):
            new = torch.nn.Linear(100000, 4); o2 = sfoptim.AdamWScheduleFree(new.parameters(), fused=fused)
            try:
                o2.load_state_dict(sd)
            except ValueError as e:
                assert "param_groups[0]['params'][0]" in str(e) and "'z'" in str(e) and "(4, 100000)" in str(e), e
                assert not o2.state, "a refused load changed the state"
                continue
            for p in new.parameters(): p.grad = torch.ones_like(p)
            o2.step()
            raise AssertionError("accepted")
    """,
    "wrapper": """
        old = torch.nn.Linear(8, 4)
        w0 = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(old.parameters(), lr=0.1))
        for p in old.parameters(): p.grad = torch.ones_like(p)
        w0.step(); sd = w0.state_dict()
        new = torch.nn.Linear(100000, 4)
        w = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(new.parameters(), lr=0.1))
        try:
            w.load_state_dict(sd)
        except ValueError as e:
            assert "'z'" in str(e) and "(4, 100000)" in str(e), e
        else:
            for p in new.parameters(): p.grad = torch.ones_like(p)
            w.step()
            raise AssertionError("accepted")
    """,
    "state-by-hand": """
        p = torch.nn.Parameter(torch.randn(200000))
        opt = sfoptim.AdamWScheduleFree([p])
        p.grad = torch.ones_like(p); opt.step()
        opt.state[p]["exp_avg_sq"] = torch.zeros(10)
        before = p.detach().clone()
        try:
            opt.step()
        except RuntimeError as e:
            assert "shape" in str(e) and torch.equal(p.detach(), before), e
        else:
            raise AssertionError("accepted")
    """,
}

_CRASH_DRIVER = """
import textwrap, traceback, torch, sfoptim
for name, code in CASES.items():
    try:
        exec(textwrap.dedent(code), {"torch": torch, "sfoptim": sfoptim})
        print(name, "refused", flush=True)
    except BaseException:
        print(name, "FAILED", traceback.format_exc().replace(chr(10), " | "), flush=True)
"""


@pytest.fixture(scope="module")
def crash_reproductions() -> subprocess.CompletedProcess:
    return _run_python(f"CASES = {_CRASH_REPRODUCTIONS!r}\n" + _CRASH_DRIVER)


def _verdict(proc: subprocess.CompletedProcess, name: str) -> None:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(name + " ")]
    assert lines == [f"{name} refused"], (
        f"exit status {proc.returncode} (negative: killed by signal {-proc.returncode})\n"
        f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    )


def test_checkpoint_of_a_smaller_model_is_refused_not_a_crash(crash_reproductions):
    """The issue's reproduction: before, the step wrote past the end of the state (SIGSEGV)."""
    _verdict(crash_reproductions, "bigger-model")


def test_checkpoint_of_a_slightly_smaller_model_is_refused():
    """Linear(64, 4) gave NaN weights first and crashed later."""
    old = torch.nn.Linear(8, 4)
    sd = _stepped(sfoptim.AdamWScheduleFree, list(old.parameters())).state_dict()
    new = torch.nn.Linear(64, 4)
    opt = sfoptim.AdamWScheduleFree(new.parameters())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*shape \(4, 64\)"):
        opt.load_state_dict(sd)


def test_wrapper_around_sgd_refuses_a_mismatched_checkpoint(crash_reproductions):
    _verdict(crash_reproductions, "wrapper")


def test_swapped_states_of_same_size_parameters_are_refused():
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    sd = _stepped(sfoptim.AdamWScheduleFree, [a, b]).state_dict()
    sd["state"][0], sd["state"][1] = sd["state"][1], sd["state"][0]
    opt = sfoptim.AdamWScheduleFree([a, b])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 8\)\) has shape \(8, 4\)"):
        opt.load_state_dict(sd)


def test_refused_load_leaves_the_optimizer_as_it_was():
    ps = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    opt = _stepped(sfoptim.AdamWScheduleFree, ps, steps=2, lr=0.01)
    before_state = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps)})
    before_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["lr"] = 1.0
    bad["state"][1]["exp_avg_sq"] = torch.ones(6)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of param_groups\[0\]\['params'\]\[1\]"):
        opt.load_state_dict(bad)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before_groups
    for i, p in enumerate(ps):
        assert opt.state[p].keys() == before_state[i].keys()
        for key, value in before_state[i].items():
            assert torch.equal(opt.state[p][key], value)


def test_complex_state_for_a_real_parameter_is_refused():
    c = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    sd = _stepped(sfoptim.AdamWScheduleFree, [c]).state_dict()
    r = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="complex64"):
        sfoptim.AdamWScheduleFree([r]).load_state_dict(sd)


def test_float64_state_into_float32_model_is_float32_and_matches_foreach():
    """Before, the float64 state was kept and the kernel read it as float32 (silent NaN)."""
    p64 = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    sd = _stepped(sfoptim.AdamWScheduleFree, [p64], steps=3, lr=0.01).state_dict()
    results = []
    for kw in ({}, {"fused": False, "foreach": True}):
        p = torch.nn.Parameter(p64.detach().float())
        opt = sfoptim.AdamWScheduleFree([p], lr=0.01, **kw)
        opt.load_state_dict(copy.deepcopy(sd))
        assert {k: v.dtype for k, v in opt.state[p].items()} == {"z": torch.float32, "exp_avg_sq": torch.float32}
        _grads([p], 7)
        opt.step()
        assert torch.isfinite(p).all()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_narrow_checkpoint_into_state_dtype_optimizer_is_widened():
    """A checkpoint saved without state_dtype (or by schedulefree) resumes with wide state and a master."""
    bf16, f32 = torch.bfloat16, torch.float32
    p0 = torch.nn.Parameter(torch.randn(16).to(bf16))
    sd = _stepped(sfoptim.AdamWScheduleFree, [p0], steps=2).state_dict()
    for g in sd["param_groups"]:
        for key in ("state_dtype", "stochastic_rounding", "fused", "inner_momentum"):
            g.pop(key)
    p = torch.nn.Parameter(p0.detach().clone())
    opt = sfoptim.AdamWScheduleFree([p], state_dtype=f32)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["state_dtype"] == f32, "the constructed state_dtype was dropped"
    assert {k: v.dtype for k, v in opt.state[p].items()} == {"z": f32, "exp_avg_sq": f32, "master": f32}
    _grads([p], 3)
    opt.step()
    assert torch.isfinite(opt.state[p]["master"]).all()


def test_master_without_state_dtype_is_dropped():
    """Otherwise the step would move the master and never write the parameter."""
    bf16 = torch.bfloat16
    p0 = torch.nn.Parameter(torch.randn(16).to(bf16))
    sd = _stepped(sfoptim.AdamWScheduleFree, [p0], steps=2, state_dtype=torch.float32).state_dict()
    for g in sd["param_groups"]:
        g.pop("state_dtype")
    p = torch.nn.Parameter(p0.detach().clone())
    opt = sfoptim.AdamWScheduleFree([p])
    opt.load_state_dict(sd)
    assert set(opt.state[p]) == {"z", "exp_avg_sq"} and opt.state[p]["z"].dtype == bf16
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_checkpoint_backend_flags_do_not_override_the_constructed_ones():
    old = torch.nn.Linear(8, 4)
    sd = _stepped(sfoptim.AdamWScheduleFree, list(old.parameters())).state_dict()
    assert sd["param_groups"][0]["fused"] is None and sd["param_groups"][0]["foreach"] is None
    opt = sfoptim.AdamWScheduleFree(old.parameters(), fused=False, foreach=False)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["fused"] is False and opt.param_groups[0]["foreach"] is False


@pytest.mark.parametrize(
    "saver, loader, saved_name",
    [
        (sfoptim.SGDScheduleFree, sfoptim.AdamWScheduleFree, "SGDScheduleFree"),
        (sfoptim.AdamWScheduleFree, sfoptim.SGDScheduleFree, "AdamWScheduleFree"),
        (sfoptim.AdamWScheduleFree, sfoptim.RAdamScheduleFree, "AdamWScheduleFree"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), sfoptim.SGDScheduleFree, "SGD"),
    ],
)
def test_state_of_another_optimizer_class_names_both(saver: Any, loader: type, saved_name: str):
    """Before, the load was accepted and the step failed with a bare KeyError."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = saver([p])
    _grads([p], 0)
    opt.step()
    target = loader([p])
    with pytest.raises(ValueError) as info:
        target.load_state_dict(opt.state_dict())
    message = str(info.value)
    assert f"saved by {saved_name}" in message and f"not by {loader.__name__}" in message, message
    assert not target.state


# ------------------------------------------------------- aliasing in one call
@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _aliased_run(make_params: Any, fused: bool | None, foreach: bool | None) -> torch.Tensor:
    params = make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about duplicate parameters
        opt = sfoptim.AdamWScheduleFree(params, lr=0.01, weight_decay=0.1, fused=fused, foreach=foreach)
    for s in range(3):
        for p in params:
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * (s + 1))
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def _same_parameter_twice() -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.randn(1_200_000, generator=torch.Generator().manual_seed(0)))
    return [p, p]


def _overlapping_views() -> list[torch.nn.Parameter]:
    base = torch.randn(1_500_000, generator=torch.Generator().manual_seed(0))
    return [torch.nn.Parameter(base[:1_000_000]), torch.nn.Parameter(base[500_000:])]


@pytest.mark.parametrize("make_params", [_same_parameter_twice, _overlapping_views])
def test_aliased_parameters_are_deterministic_and_equal_foreach(two_threads, make_params: Any):
    """Before: run-to-run differences with 2 threads, and 4e-3 away from foreach."""
    runs = [_aliased_run(make_params, None, None) for _ in range(2)]
    foreach = _aliased_run(make_params, False, True)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], foreach)


def test_explicit_fused_warns_for_aliased_parameters():
    p = torch.nn.Parameter(torch.randn(10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = sfoptim.AdamWScheduleFree([p, p], fused=True)
    _fused_cpu._warned.discard("alias")
    p.grad = torch.ones_like(p)
    with pytest.warns(RuntimeWarning, match="share memory"):
        opt.step()


# ------------------------------------------------------- the entry's own checks
def _bucket(n: int = 6, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(n, generator=gen, dtype=dtype) for _ in range(2)] for _ in range(4)]


def _call(lists: list[list[torch.Tensor]]) -> bool:
    y, g, z, v = lists
    # Scalars in the order of KERNEL_SCALARS: lr, ckp1, beta, wd, beta2, bc2, eps, mu, bc1.
    return _fused_cpu.step(y, g, z, [v], Kind.ADAM, [0.1, 0.5, 0.9, 0.0, 0.999, 0.001, 1e-8, 0.0, 1.0])


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda ls: ls[2].__setitem__(1, torch.zeros(6, dtype=torch.float64)), id="one-z-float64"),
        pytest.param(lambda ls: ls[3].__setitem__(1, torch.zeros(12)[::2]), id="strided-v"),
        pytest.param(lambda ls: ls[1].__setitem__(0, ls[3][0]), id="grad-is-v"),
        pytest.param(lambda ls: ls[2].__setitem__(1, ls[0][1]), id="z-is-y"),
    ],
)
def test_kernel_entry_routes_layouts_it_cannot_run_to_foreach(corrupt: Any):
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    lists = _bucket()
    corrupt(lists)
    before = [[t.clone() for t in lst] for lst in lists]
    assert _call(lists) is False
    for lst, old in zip(lists, before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o), "a refused call modified a tensor"


@pytest.mark.parametrize("bad", [torch.zeros(7), torch.zeros(2, 3), torch.zeros(3)])
def test_kernel_entry_refuses_state_of_another_size_before_touching_anything(bad: torch.Tensor):
    lists = _bucket()
    lists[3][1] = bad
    before = [t.clone() for t in lists[0]]
    with pytest.raises(RuntimeError, match="shape"):
        _call(lists)
    assert all(torch.equal(a, b) for a, b in zip(lists[0], before))


def test_state_replaced_by_hand_with_a_smaller_tensor_is_an_error_not_a_crash(crash_reproductions):
    """Whatever bypasses load_state_dict, the kernel entry checks each tensor's size."""
    _verdict(crash_reproductions, "state-by-hand")


# ------------------------------------------------------------------- fuzz
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
# The kernel computes 16-bit tensors in float32 and rounds each stored value
# once; foreach rounds after every operation in 16 bits. Their difference is a
# few units in the last place of the 16-bit format (2^-8 for bfloat16, 2^-11
# for float16, relative), as tests/test_fused.py checks against foreach in
# float32 to one unit.
TOLERANCE = {
    torch.float32: 1e-6,
    torch.complex64: 1e-6,
    torch.float64: 1e-12,
    torch.complex128: 1e-12,
    torch.bfloat16: 2**-5,
    torch.float16: 2**-8,
}


@st.composite
def fuzz_cases(draw: Any) -> dict:
    n = draw(st.integers(1, 4))
    specs = []
    for _ in range(n):
        specs.append(
            dict(
                shape=draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (4, 4), (2, 3, 4)])),
                dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "view", "overlap"])),
                duplicate=draw(st.booleans()),
                grad_layout=draw(st.sampled_from(["contiguous", "transposed"])),
            )
        )
    return dict(
        specs=specs,
        opt=draw(st.sampled_from(["adamw", "adamw-momentum", "sgd", "radam", "wrapper", "plus", "adamw-8bit", "adamw-bf16"])),
        state=draw(st.sampled_from(["fresh", "same", "other-shape", "other-dtype", "z-float64", "z-strided", "z-small"])),
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _make_params(specs: list[dict], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params: list[torch.nn.Parameter] = []
    for spec in specs:
        shape, dtype, layout = spec["shape"], spec["dtype"], spec["layout"]
        numel = 1
        for s in shape:
            numel *= s
        real = dtype.to_real() if dtype.is_complex else dtype
        raw = torch.randn(2 * numel + 3, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            base = torch.complex(raw, raw.flip(0)).to(dtype)
        else:
            base = raw.to(real)
        if layout == "transposed" and len(shape) >= 2:
            t = base[:numel].reshape(shape[::-1]).transpose(0, -1)
        elif layout == "strided":
            t = base[: 2 * numel : 2].reshape(shape) if numel else base[:0].reshape(shape)
        elif layout == "overlap" and params and params[-1].dtype == dtype and params[-1].is_contiguous():
            # A view that shares the previous parameter's memory.
            prev = params[-1]
            flat = prev.data.reshape(-1)
            t = flat[: min(numel, flat.numel())]
            t = t.reshape(shape) if t.numel() == numel else base[:numel].reshape(shape)
        elif layout == "view":
            t = base[3 : 3 + numel].reshape(shape)
        else:
            t = base[:numel].reshape(shape).clone()
        params.append(torch.nn.Parameter(t))
        if spec["duplicate"]:
            params.append(params[-1])
    return params


def _make_opt(kind: str, params: list[torch.nn.Parameter], fused: bool | None, foreach: bool | None) -> Any:
    if kind == "wrapper":
        base = torch.optim.SGD(params, lr=0.05, foreach=False)
        return sfoptim.ScheduleFreeWrapper(base, momentum=0.9, weight_decay_at_y=0.01, fused=fused)
    kw: dict[str, Any] = dict(fused=fused, foreach=foreach, weight_decay=0.01)
    if kind in ("adamw-8bit", "adamw-bf16"):
        # Low-bit state: the kernel and the torch path round alike, so both give the same bits.
        return sfoptim.AdamWScheduleFree(params, lr=0.01, state_precision=kind.removeprefix("adamw-"), **kw)
    if kind.startswith("adamw"):
        return sfoptim.AdamWScheduleFree(params, lr=0.01, inner_momentum=0.5 if kind == "adamw-momentum" else 0.0, **kw)
    if kind == "sgd":
        return sfoptim.SGDScheduleFree(params, lr=0.05, **kw)
    if kind == "plus":
        # Its step size comes from global sums, which the kernel takes in a pass of its own.
        return sfoptim.AdamCScheduleFreePlus(params, **kw)
    if kind.startswith("prodigy"):
        # Global sums too, and buffers that may be narrower than the parameter.
        narrow = torch.bfloat16 if kind == "prodigy-bf16" else None
        return sfoptim.ProdigyScheduleFree(params, d0=1e-2, update_clip=0.5, buffer_dtype=narrow, **kw)
    return sfoptim.RAdamScheduleFree(params, lr=0.01, **kw)


def _set_grads(params: list[torch.nn.Parameter], specs: list[dict], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layouts = [s["grad_layout"] for s in specs for _ in range(2 if s["duplicate"] else 1)]
    for p, layout in zip(params, layouts):
        real = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        g = torch.complex(real, -real).to(p.dtype) if p.is_complex() else real.to(p.dtype)
        if layout == "transposed" and p.dim() >= 2:
            g = g.transpose(0, -1).contiguous().transpose(0, -1)
        p.grad = g


def _checkpoint(case: dict, params: list[torch.nn.Parameter]) -> dict | None:
    """A state dict for the case's `state` variant, saved by a foreach run of some other parameters."""
    variant = case["state"]
    if variant == "fresh" or not params:
        return None
    specs = copy.deepcopy(case["specs"])
    for spec in specs:
        spec["layout"] = "contiguous"
        if variant == "other-shape":
            spec["shape"] = (spec["shape"][0] + 2,) + tuple(spec["shape"][1:])
        elif variant == "other-dtype" and not spec["dtype"].is_complex:
            spec["dtype"] = torch.float64 if spec["dtype"] != torch.float64 else torch.float32
    src = _make_params(specs, case["seed"] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _make_opt(case["opt"], src, False, True)
    _set_grads(src, specs, case["seed"] + 2)
    opt.step(**_loss(case, 0))
    return copy.deepcopy(opt.state_dict())


def _loss(case: dict, step: int) -> dict[str, float]:
    return {"loss": 2.0 / (step + 1)} if case["opt"] == "plus" else {}


def _corrupt_state(opt: Any, params: list[torch.nn.Parameter], variant: str) -> None:
    """State put in place by hand, bypassing load_state_dict's checks."""
    for p in params[:1]:
        z = opt.state[p]["z"]
        if variant == "z-float64" and not z.is_complex():
            opt.state[p]["z"] = z.to(torch.float64 if z.dtype != torch.float64 else torch.float32)
        elif variant == "z-strided" and z.dim() >= 2:
            opt.state[p]["z"] = z.transpose(0, -1).contiguous().transpose(0, -1)
        elif variant == "z-small":
            opt.state[p]["z"] = z.reshape(-1)[: max(z.numel() - 1, 0)].clone()


def _run_case(case: dict, fused: bool | None, foreach: bool | None) -> tuple[type | None, list[torch.Tensor]]:
    params = _make_params(case["specs"], case["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = _make_opt(case["opt"], params, fused, foreach)
            sd = _checkpoint(case, params)
            if sd is not None:
                opt.load_state_dict(sd)
            for s in range(case["steps"]):
                _set_grads(params, case["specs"], case["seed"] + 10 + s)
                opt.step(**_loss(case, s))
                if s == 0 and case["state"] in ("z-float64", "z-strided", "z-small"):
                    _corrupt_state(opt, params, case["state"])
        except (ValueError, RuntimeError, TypeError) as exc:
            return type(exc), []
    return None, [p.detach().clone() for p in params]


def check_fuzz_case(case: dict) -> None:
    """Default (fused where it runs) and foreach: the same numbers or the same exception type."""
    err_fused, fused = _run_case(case, None, None)
    err_foreach, foreach = _run_case(case, False, True)
    assert err_fused == err_foreach, f"fused raised {err_fused}, foreach {err_foreach}"
    shared = 0.0
    if case["opt"] == "plus" or case["opt"].startswith("prodigy"):
        # The Polyak step size is one number for all tensors, and the kernel sums
        # float32 and 16-bit buckets in float64 where torch sums them in their
        # own dtype: that rounding reaches every tensor.
        narrow = {t.dtype for t in foreach} & {torch.float32, torch.complex64, torch.bfloat16, torch.float16}
        shared = max((TOLERANCE[d] for d in narrow), default=0.0)
    for a, b in zip(fused, foreach):
        tol = max(TOLERANCE[a.dtype], shared)
        if case["opt"].startswith("prodigy") and torch.float16 in {t.dtype for t in foreach}:
            # Prodigy's v holds d^2 (1 - beta2) g^2, near float16's smallest subnormal for a small
            # d: foreach's float16 arithmetic loses most of its digits where the kernel's float32 does not
            # (an underflowed v leaves u = g/eps, which the clip then scales to its limit of up to 10),
            # and through the shared d that reaches every tensor of the step.
            tol = max(tol, 4 * TOLERANCE[torch.bfloat16])
        a_r, b_r = (torch.view_as_real(a), torch.view_as_real(b)) if a.is_complex() else (a, b)
        if a.dtype in (torch.bfloat16, torch.float16):
            # foreach's float16 arithmetic over- and underflows (Adam's eps is 0 in
            # float16) where the kernel's float32 does not: compare where both are
            # finite. bfloat16 has float32's range: the same elements are finite.
            both = torch.isfinite(a_r) & torch.isfinite(b_r)
            if a.dtype == torch.bfloat16:
                assert torch.equal(both, torch.isfinite(b_r)), "fused and foreach are not finite at the same elements"
            a_r, b_r = a_r[both], b_r[both]
        # Relative to the value, or to one where a value cancels to near zero
        # (the parameters start of order one; rounding errors scale with that).
        scale = max(b_r.abs().max().item() if b_r.numel() else 0.0, 1.0)
        diff = (a_r.double() - b_r.double()).abs().max().item() if a_r.numel() else 0.0
        assert diff <= tol * scale, f"{a.dtype} {tuple(a.shape)}: fused and foreach differ by {diff / scale:.3g}"


def _spec(**changes: Any) -> dict:
    spec = {"shape": (7,), "dtype": torch.float32, "layout": "contiguous", "duplicate": False, "grad_layout": "contiguous"}
    spec.update(changes)
    return spec


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases())
@example(case={"specs": [_spec(duplicate=True)], "opt": "adamw", "state": "fresh", "steps": 2, "seed": 1})
@example(
    case={"specs": [_spec(shape=(3, 5)), _spec(layout="overlap")], "opt": "adamw", "state": "fresh", "steps": 2, "seed": 1}
)
@example(case={"specs": [_spec(), _spec(shape=(4, 4))], "opt": "radam", "state": "other-shape", "steps": 1, "seed": 2})
def test_fuzz_fused_and_foreach_agree(case: dict) -> None:
    check_fuzz_case(case)


@example(case={"specs": [_spec(), _spec(shape=(3, 5), layout="transposed")], "opt": "plus", "state": "fresh", "steps": 3, "seed": 3})
@example(case={"specs": [_spec(dtype=torch.float64), _spec()], "opt": "plus", "state": "z-strided", "steps": 3, "seed": 4})
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases().map(lambda c: dict(c, opt="plus")))
def test_fuzz_polyak_sums_on_the_kernel_and_foreach_agree(case: dict) -> None:
    """ScheduleFree+, whose global sums the kernel takes too, on every layout the fuzz builds."""
    check_fuzz_case(case)


@example(case={"specs": [_spec(), _spec(shape=(3, 5), layout="transposed")], "opt": "prodigy", "state": "fresh", "steps": 3, "seed": 3})
@example(case={"specs": [_spec(shape=(4, 4)), _spec(dtype=torch.bfloat16)], "opt": "prodigy-bf16", "state": "other-dtype", "steps": 3, "seed": 5})
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases().map(lambda c: dict(c, opt=("prodigy", "prodigy-bf16")[c["seed"] % 2])))
def test_fuzz_prodigy_on_the_kernel_and_foreach_agree(case: dict) -> None:
    """Prodigy (global sums, update clip, bfloat16 buffers) on every layout the fuzz builds."""
    check_fuzz_case(case)


# ------------------------------------------------------------- bucket sums
SUM_SIZES = [0, 1, 7, 8, 9, 100, 16_385, 40_000, 70_001]


@st.composite
def sums_cases(draw: Any) -> dict:
    return dict(
        sizes=draw(st.lists(st.sampled_from(SUM_SIZES), min_size=1, max_size=5)),
        offsets=draw(st.lists(st.integers(0, 7), min_size=3, max_size=3)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        gap=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _sums_bucket(case: dict) -> tuple[list[torch.Tensor], ...]:
    """g, z, y: dense tensors of the case's sizes, each a view at an offset into its own buffer (any alignment)."""
    gen = torch.Generator().manual_seed(case["seed"])
    lists = []
    for offset in case["offsets"]:
        lists.append([torch.randn(n + offset, generator=gen, dtype=case["dtype"])[offset:] for n in case["sizes"]])
    return tuple(lists)


def _plus_group() -> dict:
    return {"sf_beta1": 0.9, "sf_beta1_max": 0.965, "sf_beta1_anneal_steps": 0, "k": 0}


def check_sums_case(case: dict) -> None:
    """The kernel's sums against float64 arithmetic and against the direction's torch path."""
    from sfoptim.directions.adamc_plus import AdamCPlusDirection
    from sfoptim.directions.base import Bucket, BucketSum

    g, z, y = _sums_bucket(case)
    wanted = (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y) if case["gap"] else (BucketSum.GRAD_L1,)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _fused_cpu.sums(g, z, y, wanted)
        torch.set_num_threads(1)
        single = _fused_cpu.sums(g, z, y, wanted)
    finally:
        torch.set_num_threads(saved)
    assert got is not None and set(got) == set(wanted)
    assert got == single, "the sums depend on the thread count"
    terms = {
        BucketSum.GRAD_L1: [t.double().abs() for t in g],
        BucketSum.GRAD_Z_MINUS_Y: [a.double() * (b.double() - c.double()) for a, b, c in zip(g, z, y)],
    }
    for which in wanted:
        exact = sum(float(t.sum()) for t in terms[which])
        scale = sum(float(t.abs().sum()) for t in terms[which]) + 1e-300
        # Every dtype is accumulated in float64 from exact products.
        assert abs(got[which] - exact) <= 1e-12 * scale, f"{which.name}: {got[which]!r} vs {exact!r}"
    if case["gap"]:
        direction, group = AdamCPlusDirection(), _plus_group()
        torch_path = direction.reduce(group, group["k"] + 1, Bucket(y, g, z, {}), 0.9)
        fused = direction.reduce_sums(group, group["k"] + 1, 0.9, {s: torch.tensor(v, dtype=torch.float64) for s, v in got.items()})
        # torch reduces each tensor in its own dtype (the float64 total aside).
        tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}[case["dtype"]]
        for name, value in torch_path.items():
            scale = float(sum(t.abs().sum() for t in terms[BucketSum.GRAD_Z_MINUS_Y if name == "ip_term" else BucketSum.GRAD_L1]))
            assert abs(float(fused[name]) - float(value)) <= tol * scale + 1e-300, name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sums_cases())
@example(case={"sizes": [70_001, 70_001], "offsets": [1, 3, 5], "dtype": torch.float32, "gap": True, "seed": 0})
@example(case={"sizes": [0, 9], "offsets": [0, 0, 0], "dtype": torch.float64, "gap": True, "seed": 1})
def test_fuzz_kernel_sums_agree_with_float64_and_the_torch_path(case: dict) -> None:
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    check_sums_case(case)


def _sums_lists(dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [[torch.randn(n, generator=gen, dtype=dtype) for n in (6, 20)] for _ in range(3)]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda ls: ls[1].__setitem__(1, ls[1][1].double()), id="one-z-float64"),
        pytest.param(lambda ls: ls[2].__setitem__(0, torch.zeros(12)[::2]), id="strided-y"),
        pytest.param(lambda ls: ls[0].__setitem__(1, torch.zeros(40)[::2]), id="strided-g"),
        pytest.param(lambda ls: ls.__setitem__(0, [t.bfloat16() for t in ls[0]]), id="bfloat16-g"),
        pytest.param(lambda ls: ls[1].__setitem__(0, ls[0][0]), id="z-is-g"),
    ],
)
def test_kernel_sums_refuse_layouts_they_cannot_read(corrupt: Any):
    """Refused (None, nothing read by C), so the caller's torch path gives the sums."""
    from sfoptim.directions.base import BucketSum

    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    lists = _sums_lists()
    assert _fused_cpu.sums(*lists, (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y)) is not None
    corrupt(lists)
    assert _fused_cpu.sums(*lists, (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y)) is None


@pytest.mark.parametrize("bad", [torch.zeros(21), torch.zeros(4, 5), torch.zeros(3)])
def test_kernel_sums_refuse_a_tensor_of_another_size_before_c(bad: torch.Tensor):
    from sfoptim.directions.base import BucketSum

    lists = _sums_lists()
    lists[2][1] = bad
    with pytest.raises(RuntimeError, match="shape"):
        _fused_cpu.sums(*lists, (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y))


def _polyak_sums_of_third_step(
    group_options: dict | None = None, **kw: Any
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(grad_l1, ip_term) the third step of ScheduleFree+ used, and those of the kernel's and torch's paths.

    The third, since the first step's averaging coefficient 1 leaves ``y = z``
    and the second step's inner product 0.
    """
    from sfoptim.directions.base import Bucket

    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3000, 17, 70_001)]
    # The authors' rule (no step-size warmup, no guards), so that y and z part after the first step.
    paper = dict(warmup_steps=0, c_warmup=0, lr_cap=None, growth_limit=None)
    opt = sfoptim.AdamCScheduleFreePlus([{"params": params, **(group_options or {})}], **{**paper, **kw})
    for s in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if s == 2:
            group, direction = opt.param_groups[0], opt.direction
            bucket = Bucket([p.detach() for p in params], [p.grad for p in params], [opt.state[p]["z"] for p in params], {})
            beta = opt.y_beta(group)
            raw = _fused_cpu.sums(bucket.grads, bucket.z, bucket.params, direction.bucket_sums)
            assert raw is not None
            step = group["k"] + 1
            fused = direction.reduce_sums(group, step, beta, {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items()})
            torch_path = direction.reduce(group, step, bucket, beta)
        opt.step(loss=3.0)
    group = opt.param_groups[0]
    used = (group["grad_l1_ema"] / math.sqrt(math.pi / 2), group["ip_term"])
    as_floats = lambda d: (float(d["grad_l1"]), float(d["ip_term"]))  # noqa: E731
    return used, as_floats(fused), as_floats(torch_path)


@pytest.mark.parametrize(
    "kw, on_kernel",
    [
        ({}, True),
        ({"fused": True}, True),
        ({"fused": False}, False),
        ({"foreach": False}, False),
        ({"fused": False, "foreach": True}, False),
    ],
)
def test_polyak_sums_come_from_the_kernel_exactly_where_the_update_does(kw: dict, on_kernel: bool):
    """The kernel's sums where the bucket takes the kernel; elsewhere the torch path's, unchanged."""
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    used, fused, torch_path = _polyak_sums_of_third_step(polyak_beta=0.0, **kw)
    assert fused[0] != torch_path[0] and fused[1] != torch_path[1], "sums that agree to the bit cannot tell the paths apart"
    expected = fused if on_kernel else torch_path
    assert used[1] == expected[1]
    assert math.isclose(used[0], expected[0], rel_tol=1e-15)


def test_polyak_sums_with_decay_at_z_come_from_the_kernel():
    """A group that decays at z takes the kernel, and so do its sums."""
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    used, fused, torch_path = _polyak_sums_of_third_step({"decay_at": "z"}, weight_decay=20.0)
    assert fused[1] != torch_path[1], "sums that agree to the bit cannot tell the paths apart"
    assert used[1] == fused[1]


# ----------------------------------------------------------- AddressSanitizer
def _gcc_library(name: str) -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    path = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def _asan_preload() -> str | None:
    # The C++ runtime is preloaded too: torch throws C++ exceptions, and the
    # sanitizer's __cxa_throw interceptor must find the real one at start-up
    # (python itself does not link libstdc++).
    asan, cxx = _gcc_library("libasan.so"), _gcc_library("libstdc++.so.6")
    return f"{asan} {cxx}" if asan and cxx else None


def _build_asan(source: Path, out: Path) -> Path:
    flags = [f for f in _fused_cpu._FLAGS if f != "-O3"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    subprocess.run(["gcc", *flags, str(source), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
    return out


_ASAN_DRIVER = """
import ctypes, sys, torch
from sfoptim.backends import cpu_kernel as _fused_cpu
_fused_cpu._install_library_for_tests(ctypes.CDLL({lib!r}))
{body}
"""

_ASAN_FUZZ = """
import test_kernel_safety as t
from hypothesis import settings, given
torch.set_num_threads(2)
for make in (t._same_parameter_twice, t._overlapping_views):
    assert torch.equal(t._aliased_run(make, None, None), t._aliased_run(make, False, True))
settings(max_examples=150, deadline=None, database=None)(given(case=t.fuzz_cases())(t.check_fuzz_case))()
plus = t.fuzz_cases().map(lambda c: dict(c, opt="plus"))
settings(max_examples=60, deadline=None, database=None)(given(case=plus)(t.check_fuzz_case))()
settings(max_examples=100, deadline=None, database=None)(given(case=t.sums_cases())(t.check_sums_case))()
prodigy = t.fuzz_cases().map(lambda c: dict(c, opt=("prodigy", "prodigy-bf16")[c["seed"] % 2]))
settings(max_examples=60, deadline=None, database=None)(given(case=prodigy)(t.check_fuzz_case))()
import test_prodigy_fused as pf
settings(max_examples=60, deadline=None, database=None)(given(case=pf.prodigy_sums_cases())(pf.check_prodigy_sums_case))()
for bd, sr, dt in ((torch.bfloat16, False, torch.float32), (None, True, torch.bfloat16), (None, False, torch.float64)):
    assert all(torch.equal(a, b) for a, b in zip(pf._threaded_run(1, bd, sr, dt), pf._threaded_run(2, bd, sr, dt)))
import test_kernel_dtypes as d
settings(max_examples=40, deadline=None, database=None)(given(**d.STEP_CASES)(d.check_step_case))()
for dtype in d.NARROW:
    for which in ("wrap_before", "wrap_after"):
        d.test_wrapper_bookkeeping_is_float32_rounded_once(dtype, which)
    d.test_bucket_sums_of_16_bit_tensors_are_exact_float64_sums(dtype)
    d.test_stochastic_rounding_repeats_for_a_seed_on_any_thread_count_and_differs_across_seeds(dtype)
d.test_stochastic_rounding_option_reaches_the_kernel_for_16_bit_parameters()
import test_state_precision as sp
settings(max_examples=40, deadline=None, database=None)(given(case=sp.kernel_cases())(sp.check_kernel_case))()
sp.test_kernel_refuses_what_it_cannot_take_and_checks_sizes_before_c()
p = torch.nn.Parameter(torch.randn(100_003)); opt = __import__("sfoptim").AdamWScheduleFree([p])
for _ in range(3):
    p.grad = torch.ones_like(p); opt.step()
assert _fused_cpu._lib is not None and _fused_cpu.load_count == 0
print("asan fuzz done")
"""


@pytest.mark.slow
@pytest.mark.skipif(_asan_preload() is None, reason="gcc with AddressSanitizer is not installed")
def test_fuzz_cases_under_address_sanitizer(tmp_path):
    """The kernel built with -fsanitize=address runs the fuzz cases without a report.

    A planted one-element overrun proves the harness would see a real one.
    """
    env = {"LD_PRELOAD": _asan_preload(), "ASAN_OPTIONS": "detect_leaks=0"}
    lib = _build_asan(_fused_cpu._SOURCE, tmp_path / "asan.so")
    proc = _run_python(_ASAN_DRIVER.format(lib=str(lib), body=_ASAN_FUZZ), env=env, timeout=1800)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-6000:]
    _assert_clean_exit(proc, "asan fuzz done")

    source = _fused_cpu._SOURCE.read_text()
    overrun = "chunks[k].len = sizes[i] - s < SF_CHUNK ? sizes[i] - s + 1 : SF_CHUNK;"
    planted = source.replace("chunks[k].len = sizes[i] - s < SF_CHUNK ? sizes[i] - s : SF_CHUNK;", overrun)
    assert planted != source
    (tmp_path / "planted.c").write_text(planted)
    bad = _build_asan(tmp_path / "planted.c", tmp_path / "planted.so")
    body = "p = torch.nn.Parameter(torch.randn(1001)); opt = __import__('sfoptim').AdamWScheduleFree([p])\n"
    body += "p.grad = torch.ones_like(p); opt.step(); print('no report')"
    proc = _run_python(_ASAN_DRIVER.format(lib=str(bad), body=body), env=env)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
