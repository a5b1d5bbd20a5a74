"""Generic checks over every entry of ``tests/registry.py``.

State-dict round trips, train/eval modes, gradients left untouched, backends
that agree, agreement with an independent oracle, hyperparameter validation.
Each check runs on a few small float tensors with a quadratic-plus-noise
gradient taken at the current point, so the trajectory depends on every part
of the step.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import pytest
import torch
from registry import F64, OPTIMIZERS, OptimizerInfo
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import sfoptim

SHAPES = [(4, 3), (5,), (2, 2, 2)]
ids = [info.name for info in OPTIMIZERS]


def make_params(dtype: torch.dtype = F64, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """The gradient of 0.25|p|^2 plus noise that depends on the step only."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def loss_of(params: list[torch.Tensor]) -> float:
    """A loss for the optimizers that need one (a Polyak step size); positive, varies with the point."""
    return 1.0 + 0.25 * sum(float((p.detach().double() ** 2).sum()) for p in params)


def step_args(info: OptimizerInfo, params: list[torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments of a plain ``step()``: the loss where the optimizer needs it."""
    return {"loss": loss_of(params)} if info.needs_loss else {}


def take_step(info: OptimizerInfo, opt: Any, params: list[torch.Tensor], step: int) -> None:
    if info.closure:

        def closure() -> float:
            set_grads(params, step)
            return loss_of(params)

        opt.step(closure)
    else:
        set_grads(params, step)
        opt.step(**step_args(info, params))


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def worst(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(rel(a, b) for a, b in zip(xs, ys))


@contextlib.contextmanager
def quiet():
    # The published reference classes print on every mode switch.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def x_of(opt: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The averaged point, read through eval()/train() so that any optimizer with modes can be asked."""
    with quiet():
        opt.eval()
        x = snapshot(params)
        opt.train()
    return x


# --------------------------------------------------------------- state dicts
@pytest.mark.parametrize("save_in_eval", [False, True], ids=["saved_in_train", "saved_in_eval"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_state_dict_round_trip_resumes_bit_identically(info: OptimizerInfo, save_in_eval: bool) -> None:
    params = make_params()
    opt = info.make(params)
    for step in range(10):
        take_step(info, opt, params, step)
    if save_in_eval:
        opt.eval()
    saved_params, saved_state = snapshot(params), copy.deepcopy(opt.state_dict())
    opt.train()
    for step in range(10, 20):
        take_step(info, opt, params, step)
    opt.eval()

    resumed = make_params(seed=7)
    with torch.no_grad():
        for p, saved in zip(resumed, saved_params):
            p.copy_(saved)
    resumed_opt = info.make(resumed)
    resumed_opt.load_state_dict(saved_state)
    if not info.closure:
        assert resumed_opt.train_mode == (not save_in_eval)
    resumed_opt.train()
    for step in range(10, 20):
        take_step(info, resumed_opt, resumed, step)
    resumed_opt.eval()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def assert_same(loaded: Any, saved: Any, where: str = "state_dict") -> None:
    """Deep equality of two state dicts: same keys, same types, tensors equal in dtype, shape and value."""
    assert type(loaded) is type(saved), f"{where}: {type(loaded).__name__} != {type(saved).__name__}"
    if isinstance(saved, dict):
        assert loaded.keys() == saved.keys(), f"{where}: keys {sorted(map(str, loaded))} != {sorted(map(str, saved))}"
        for key in saved:
            assert_same(loaded[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), f"{where}: length {len(loaded)} != {len(saved)}"
        for i, (a, b) in enumerate(zip(loaded, saved)):
            assert_same(a, b, f"{where}[{i}]")
    elif torch.is_tensor(saved):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), f"{where}: tensors differ"
    else:
        assert loaded == saved, f"{where}: {loaded!r} != {saved!r}"


@pytest.mark.parametrize("save_in_eval", [False, True], ids=["saved_in_train", "saved_in_eval"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_state_dict_after_a_load_is_the_loaded_state_dict(info: OptimizerInfo, save_in_eval: bool) -> None:
    """``state_dict()`` after ``load_state_dict(sd)`` equals ``sd``: save, load, save gives the same dict."""
    params = make_params()
    opt = info.make(params)
    for step in range(3):
        take_step(info, opt, params, step)
    if save_in_eval:
        with quiet():
            opt.eval()
    saved = copy.deepcopy(opt.state_dict())
    resumed = info.make(make_params(seed=7))
    for _ in range(2):  # a second load into the same optimizer too
        resumed.load_state_dict(copy.deepcopy(saved))
        assert_same(resumed.state_dict(), saved)


# ---------------------------------------------------------------- step hooks
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_step_hooks_run_once_per_step_whichever_classes_exist(info: OptimizerInfo) -> None:
    """Per-optimizer and global step hooks run once per step, in torch's order.

    ``torch.optim`` wraps the ``step`` of each class with the hooks when the
    class is first constructed; a form whose ``step`` went through a parent
    class's ``step`` would run them twice once both classes exist. Building
    every registered class first makes that the case whatever ran before.
    """
    for other in OPTIMIZERS:
        other.make(make_params())
    params = make_params()
    opt = info.make(params)
    calls: list[str] = []

    def record(name: str) -> Any:
        return lambda o, args, kwargs: calls.append(name) if o is opt else None

    handles = [
        opt.register_step_pre_hook(record("pre")),
        opt.register_step_post_hook(record("post")),
        register_optimizer_step_pre_hook(record("global pre")),
        register_optimizer_step_post_hook(record("global post")),
    ]
    try:
        for step in range(2):
            take_step(info, opt, params, step)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "pre", "post", "global post"] * 2


# --------------------------------------------------------------------- modes
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if not i.closure], ids=[i.name for i in OPTIMIZERS if not i.closure])
def test_eval_moves_to_x_and_train_back_to_y(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.make(params)
    assert opt.train_mode
    for step in range(10):
        take_step(info, opt, params, step)
    # eval_params() follows param_groups, which an optimizer that splits groups (Muon) reorders.
    params = [p for g in opt.param_groups for p in g["params"]]
    y, x = snapshot(params), opt.eval_params()
    assert worst(x, y) > 1e-6, "x and y should differ after training"
    assert all(torch.equal(a, b) for a, b in zip(y, params)), "eval_params() must not touch the parameters"
    assert opt.eval() is opt and not opt.train_mode
    assert worst(params, x) <= 1e-12
    at_x = snapshot(params)
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(at_x, params)), "eval() twice must be a no-op"
    assert worst(opt.eval_params(), x) <= 1e-12
    assert opt.train() is opt and opt.train_mode
    assert worst(params, y) <= 1e-12


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if not i.closure], ids=[i.name for i in OPTIMIZERS if not i.closure])
def test_step_in_eval_mode_raises_mode_error_and_changes_nothing(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.make(params)
    for step in range(3):
        take_step(info, opt, params, step)
    opt.eval()
    set_grads(params, 3)
    before, state = snapshot(params), copy.deepcopy(opt.state_dict())
    with pytest.raises(sfoptim.ModeError, match=r"train\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, saved in state["state"].items():
        assert all(torch.equal(saved[n], after["state"][key][n]) for n in saved if torch.is_tensor(saved[n]))


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.closure], ids=[i.name for i in OPTIMIZERS if i.closure])
def test_closure_form_holds_x_and_ignores_mode_calls(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.make(params)
    for step in range(10):
        take_step(info, opt, params, step)
    x = snapshot(params)
    assert opt.train() is opt and opt.eval() is opt
    assert all(torch.equal(a, b) for a, b in zip(x, params))
    assert worst(opt.eval_params(), x) <= 1e-12


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_step_never_writes_gradients(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.make(params)
    for step in range(5):
        seen: list[torch.Tensor] = []

        def closure(step: int = step, seen: list = seen) -> float:
            set_grads(params, step)
            seen[:] = [p.grad.clone() for p in params]
            return loss_of(params)

        if info.closure:
            opt.step(closure)
        else:
            closure()
            opt.step(**step_args(info, params))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, seen))


# ------------------------------------------------------------------ backends
BACKEND_CASES = [(info, dtype) for info in OPTIMIZERS if info.backends for dtype in info.dtypes]


@pytest.mark.parametrize(
    "info, dtype", BACKEND_CASES, ids=[f"{i.name}-{str(d).removeprefix('torch.')}" for i, d in BACKEND_CASES]
)
def test_backends_agree(info: OptimizerInfo, dtype: torch.dtype) -> None:
    from sfoptim.backends import cpu_kernel as _fused_cpu

    if any(b.get("fused") for b in info.backends) and not _fused_cpu.available():
        pytest.skip("no C compiler for the fused kernel")
    runs = []
    for flags in info.backends:
        params = make_params(dtype)
        opt = info.make(params, **flags)
        trajectory = []
        for step in range(30):
            take_step(info, opt, params, step)
            trajectory.append(snapshot(params))
        runs.append((flags, trajectory, x_of(opt, params) if not info.closure else snapshot(params)))
    tol = info.backend_tolerance[dtype]
    (base_flags, base_traj, base_x), others = runs[0], runs[1:]
    for flags, traj, x in others:
        for step, (a, b) in enumerate(zip(traj, base_traj)):
            assert worst(a, b) <= tol, f"{flags} vs {base_flags} at step {step + 1}"
        assert worst(x, base_x) <= tol, f"{flags} vs {base_flags} at x"


# ----------------------------------------------------------------- reference
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_matches_independent_reference(info: OptimizerInfo) -> None:
    """30 steps side by side with the oracle in float64: the point held after each step and x."""
    if info.reference is None:
        pytest.skip("no independent reference for this configuration")
    ours, theirs = make_params(), make_params()
    opt = info.make(ours)
    with quiet():
        oracle = info.make_reference(theirs)
        oracle.train()
    for step in range(30):
        if step == 15:
            for o in (opt, oracle):  # a learning-rate change mid-run, as a scheduler would make
                for group in (o.base if info.base is not None else o).param_groups:
                    group["lr"] *= 0.5
        take_step(info, opt, ours, step)
        set_grads(theirs, step)
        oracle.step(**step_args(info, theirs))
        expected = x_of(oracle, theirs) if info.closure else snapshot(theirs)
        assert worst(ours, expected) <= info.tolerance, f"step {step + 1}"
    if not info.closure:
        assert worst(x_of(opt, ours), x_of(oracle, theirs)) <= info.tolerance, "x at the end"


# ------------------------------------------------------------- validation
VALIDATION_CASES = [(info, arg, value) for info in OPTIMIZERS for arg, value in info.invalid]


@pytest.mark.parametrize(
    "info, arg, value", VALIDATION_CASES, ids=[f"{i.name}-{a}-{v}" for i, a, v in VALIDATION_CASES]
)
def test_invalid_hyperparameter_raises_value_error_naming_it(info: OptimizerInfo, arg: str, value: Any) -> None:
    builders = [info.make] + ([info.make_reference] if info.reference_is_ours else [])
    for build in builders:
        with pytest.raises(ValueError, match="Invalid") as caught:
            build(make_params(), **{arg: value})
        assert arg in str(caught.value)


# ----------------------------------------------------------------- state_dtype
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_state_dtype_is_honoured_or_refused(info: OptimizerInfo) -> None:
    """A float32 master for bfloat16 weights where supported; a ValueError naming it elsewhere."""
    params = make_params(torch.bfloat16)
    group = [{"params": params, "state_dtype": torch.float32}]
    if "state_dtype" not in info.flags:
        with pytest.raises(ValueError, match="state_dtype"):
            info.cls(info.base(group) if info.base is not None else group, **info.kwargs)
        return
    opt = info.make(group)
    for step in range(3):
        take_step(info, opt, params, step)
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["master"].dtype == torch.float32 and opt.state[p]["z"].dtype == torch.float32
