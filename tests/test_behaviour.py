"""Behaviour users rely on: modes, gradients untouched, groups, state dicts, dtypes, errors."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import registry
import torch
from problems import loss_fn, make_batches, make_model, rel_diff, two_groups

import sfoptim

#: Every registered optimizer in train/eval form whose step needs no loss.
FACTORIES: dict[str, Callable[[Any], Any]] = {i.name: i.make for i in registry.select(closure=False, needs_loss=False)}
NAMES = sorted(FACTORIES)


def train_steps(model: torch.nn.Module, opt: Any, batches: list) -> None:
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
def test_step_never_modifies_grad(name: str) -> None:
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    for batch in make_batches(8):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


# --------------------------------------------------------------------- modes
@pytest.mark.parametrize("name", NAMES)
def test_train_eval_are_idempotent_and_return_self(name: str) -> None:
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    assert opt.train_mode
    # Before the first step both modes hold the same point.
    before = params_of(model)
    assert opt.eval() is opt and opt.eval() is opt
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert opt.train() is opt
    train_steps(model, opt, make_batches(10))
    y = params_of(model)
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(y, params_of(model)))
    opt.eval()
    x = params_of(model)
    assert any(rel_diff(a, b) > 1e-6 for a, b in zip(x, y)), "eval() must move the parameters to x"
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(x, params_of(model)))
    opt.train()
    assert all(rel_diff(a, b) < 1e-12 for a, b in zip(y, params_of(model)))


@pytest.mark.parametrize("name", NAMES)
def test_step_in_eval_mode_raises_mode_error_and_changes_nothing(name: str) -> None:
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    train_steps(model, opt, make_batches(3))
    opt.eval()
    loss_fn(model, make_batches(1)[0]).backward()
    before = params_of(model)
    with pytest.raises(sfoptim.ModeError, match=r"optimizer\.train\(\)"):
        opt.step()
    assert isinstance(sfoptim.ModeError("x"), RuntimeError)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


@pytest.mark.parametrize("name", NAMES)
def test_eval_params_is_x_and_touches_nothing(name: str) -> None:
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    # In the order of the param groups (Muon splits the model's parameters into two).
    ordered = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(opt.eval_params(), ordered))
    train_steps(model, opt, make_batches(10))
    y = params_of(model)
    xs = opt.eval_params()
    assert all(torch.equal(a, b) for a, b in zip(y, params_of(model)))
    opt.eval()
    assert all(rel_diff(a, b) < 1e-12 for a, b in zip(xs, ordered))
    assert all(rel_diff(a, b) < 1e-12 for a, b in zip(opt.eval_params(), ordered))


# ------------------------------------------------------------- param groups
def test_frozen_parameters_are_skipped() -> None:
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.01)
    train_steps(model, opt, make_batches(5))
    opt.eval()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state


@pytest.mark.parametrize("fast, ref", [
    (sfoptim.AdamWScheduleFree, sfoptim.AdamWScheduleFreeReference),
    (sfoptim.SGDScheduleFree, sfoptim.SGDScheduleFreeReference),
])
def test_add_param_group_mid_training_matches_reference(fast: type, ref: type) -> None:
    models = [make_model(), make_model()]
    opts = []
    for model, cls in zip(models, (fast, ref)):
        groups = two_groups(model)
        opts.append(cls(groups[0]["params"], lr=0.05))
    batches = make_batches(30)
    for i, batch in enumerate(batches):
        if i == 10:
            for model, opt in zip(models, opts):
                opt.add_param_group({"params": two_groups(model)[1]["params"], "lr": 0.02, "weight_decay": 0.1})
                assert opt.param_groups[-1]["train_mode"] is True
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert rel_diff(a, b) < 1e-10


def test_add_param_group_in_eval_mode_joins_eval_mode() -> None:
    model = make_model()
    groups = two_groups(model)
    opt = sfoptim.AdamWScheduleFree(groups[0]["params"], lr=0.01)
    train_steps(model, opt, make_batches(2))
    opt.eval()
    opt.add_param_group({"params": groups[1]["params"]})
    assert not opt.train_mode
    opt.train()
    train_steps(model, opt, make_batches(2))


def test_add_param_group_validates() -> None:
    model = make_model()
    groups = two_groups(model)
    opt = sfoptim.AdamWScheduleFree(groups[0]["params"])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": groups[1]["params"], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_tensor_lr_equals_float_lr() -> None:
    a, b = make_model(), make_model()
    oa = sfoptim.AdamWScheduleFree(a.parameters(), lr=0.01, warmup_steps=5)
    ob = sfoptim.AdamWScheduleFree(b.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), warmup_steps=5)
    batches = make_batches(20)
    train_steps(a, oa, batches)
    train_steps(b, ob, batches)
    oa.eval()
    ob.eval()
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_diff(p, q) < 1e-12


def test_lr_scheduler_changes_the_step() -> None:
    a, b = make_model(), make_model()
    oa = sfoptim.SGDScheduleFree(a.parameters(), lr=0.2)
    ob = sfoptim.SGDScheduleFree(b.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(ob, lambda step: 0.1 if step >= 5 else 1.0)
    for batch in make_batches(10):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        sched.step()
    assert ob.param_groups[0]["scheduled_lr"] == pytest.approx(0.02)
    assert any(rel_diff(p, q) > 1e-6 for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------- state dicts
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("save_in_eval", [False, True])
def test_state_dict_round_trip_is_bit_identical(name: str, save_in_eval: bool) -> None:
    batches = make_batches(50)

    def segment(model: torch.nn.Module, opt: Any, chunk: list) -> None:
        opt.train()
        train_steps(model, opt, chunk)

    model = make_model()
    opt = FACTORIES[name](model.parameters())
    segment(model, opt, batches[:20])
    if save_in_eval:
        opt.eval()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    segment(model, opt, batches[20:])
    opt.eval()

    resumed = make_model(seed=123)
    resumed_opt = FACTORIES[name](resumed.parameters())
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.train_mode == (not save_in_eval)
    segment(resumed, resumed_opt, batches[20:])
    resumed_opt.eval()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# -------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sgd", "adamw", "radam", "wrapper_adam"])
def test_low_and_high_precision_parameters_train(name: str, dtype: torch.dtype) -> None:
    model = make_model(dtype)
    opt = FACTORIES[name](model.parameters())
    if dtype == torch.float16 and name in ("adamw", "radam", "wrapper_adam"):
        # eps=1e-8 underflows to 0 in float16 (torch.optim.Adam too), so 0/0 appears where a gradient
        # underflows; float16 Adam needs an eps that float16 can hold.
        opt.param_groups[0]["eps"] = 1e-4
    batches = make_batches(40, dtype)
    first = loss_fn(model, batches[0]).item()
    train_steps(model, opt, batches)
    opt.eval()
    last = loss_fn(model, batches[0]).item()
    assert math.isfinite(last) and last < first
    for p in model.parameters():
        assert opt.state[p]["z"].dtype == dtype


@pytest.mark.parametrize("name", ["sgd", "adamw", "radam", "adamw_inner", "adamw_reference"])
def test_complex_parameters_match_their_real_view(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    init = torch.randn(4, 3, dtype=torch.complex128, generator=g)
    c = torch.nn.Parameter(init.clone())
    r = torch.nn.Parameter(torch.view_as_real(init).clone())
    oc, orl = FACTORIES[name]([c]), FACTORIES[name]([r])
    for _ in range(15):
        noise = torch.randn(4, 3, dtype=torch.complex128, generator=g)
        c.grad = c.detach() * 0.3 + noise
        r.grad = torch.view_as_real(c.grad).clone()
        oc.step()
        orl.step()
        assert rel_diff(torch.view_as_real(c), r) < 1e-12
    assert rel_diff(torch.view_as_real(oc.eval_params()[0]), orl.eval_params()[0]) < 1e-12


def test_mixed_dtypes_in_one_group_equal_separate_optimizers() -> None:
    g = torch.Generator().manual_seed(0)
    a64, a32 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(7, generator=g).float()
    mixed = [torch.nn.Parameter(a64.clone()), torch.nn.Parameter(a32.clone())]
    alone = [torch.nn.Parameter(a64.clone()), torch.nn.Parameter(a32.clone())]
    om = sfoptim.AdamWScheduleFree(mixed, lr=0.01)
    o1, o2 = sfoptim.AdamWScheduleFree([alone[0]], lr=0.01), sfoptim.AdamWScheduleFree([alone[1]], lr=0.01)
    for _ in range(10):
        for ps in (mixed, alone):
            for p in ps:
                p.grad = torch.sin(p.detach()) + 0.1
        om.step(), o1.step(), o2.step()
    for p, q in zip(mixed, alone):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- bad input
BAD = [
    (sfoptim.AdamWScheduleFree, "lr", -0.1),
    (sfoptim.AdamWScheduleFree, "lr", float("nan")),
    (sfoptim.AdamWScheduleFree, "eps", -1e-8),
    (sfoptim.AdamWScheduleFree, "weight_decay", -0.01),
    (sfoptim.AdamWScheduleFree, "warmup_steps", -5),
    (sfoptim.AdamWScheduleFree, "warmup_steps", 0.05),
    (sfoptim.AdamWScheduleFree, "betas", (0.0, 0.999)),
    (sfoptim.AdamWScheduleFree, "betas", (0.9, 1.0)),
    (sfoptim.AdamWScheduleFree, "betas", (float("nan"), 0.999)),
    (sfoptim.AdamWScheduleFree, "r", -1.0),
    (sfoptim.AdamWScheduleFree, "weight_lr_power", float("inf")),
    (sfoptim.AdamWScheduleFree, "inner_momentum", 1.0),
    (sfoptim.SGDScheduleFree, "momentum", 0.0),
    (sfoptim.SGDScheduleFree, "momentum", 1.5),
    (sfoptim.SGDScheduleFree, "lr", -1.0),
    (sfoptim.RAdamScheduleFree, "eps", float("nan")),
    (sfoptim.RAdamScheduleFree, "betas", (0.9, -0.1)),
]


@pytest.mark.parametrize("cls, arg, value", BAD, ids=[f"{c.__name__}-{a}-{v}" for c, a, v in BAD])
def test_bad_hyperparameters_raise_value_error_naming_them(cls: type, arg: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        cls(make_model().parameters(), **{arg: value})
    message = str(info.value)
    assert arg.split("[")[0] in message and "Invalid" in message


@pytest.mark.parametrize("arg, value", [("momentum", 0.0), ("weight_decay_at_y", -1.0), ("r", float("nan"))])
def test_bad_wrapper_hyperparameters(arg: str, value: float) -> None:
    with pytest.raises(ValueError, match=arg):
        sfoptim.ScheduleFreeWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), **{arg: value})


def test_wrapper_refuses_non_optimizers() -> None:
    with pytest.raises(TypeError, match="Invalid base"):
        sfoptim.ScheduleFreeWrapper(make_model().parameters())  # type: ignore[arg-type]


def test_sparse_gradient_raises_naming_parameter_and_changes_nothing() -> None:
    dense = torch.nn.Linear(3, 2)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = sfoptim.AdamWScheduleFree([{"params": dense.parameters()}, {"params": emb.parameters()}], lr=0.1)
    (dense(emb(torch.tensor([1, 2]))).sum()).backward()
    before = [p.detach().clone() for p in (*dense.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match=r"sparse.*param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    after = [p.detach() for p in (*dense.parameters(), emb.weight)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(opt.state) == 0 and opt.param_groups[0]["k"] == 0


@pytest.mark.parametrize("name", ["sgd", "adamw", "radam", "wrapper"])
def test_zero_learning_rate_keeps_parameters_put(name: str) -> None:
    model = make_model()
    before = params_of(model)
    opt = {
        "sgd": lambda p: sfoptim.SGDScheduleFree(p, lr=0.0),
        "adamw": lambda p: sfoptim.AdamWScheduleFree(p, lr=0.0, warmup_steps=3),
        "radam": lambda p: sfoptim.RAdamScheduleFree(p, lr=0.0),
        "wrapper": lambda p: sfoptim.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.0)),
    }[name](model.parameters())
    train_steps(model, opt, make_batches(5))
    opt.eval()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_published_wrapper_fails_at_zero_learning_rate() -> None:
    """The published wrapper divides by a zero weight sum; ours keeps x put (above)."""
    schedulefree = pytest.importorskip("schedulefree")
    model = make_model()
    opt = schedulefree.ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), lr=0.0))
    opt.train()
    loss_fn(model, make_batches(1)[0]).backward()
    with pytest.raises(ZeroDivisionError):
        opt.step()


# ------------------------------------------------------------------- closure
def test_closure_form_needs_a_closure_and_restores_x_on_error() -> None:
    model = make_model()
    opt = sfoptim.AdamWScheduleFreeClosure(model.parameters(), lr=0.01)
    batches = make_batches(5)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, batches[0])
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    x = params_of(model)
    assert all(torch.equal(a, b) for a, b in zip(x, opt.eval_params()))
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)  # type: ignore[arg-type]

    def broken() -> torch.Tensor:
        raise KeyError("data loader failed")

    with pytest.raises(KeyError):
        opt.step(broken)
    assert all(rel_diff(a, b) < 1e-12 for a, b in zip(x, model.parameters()))
    assert opt.train() is opt and opt.eval() is opt


# ------------------------------------------------------------------- wrapper
@pytest.mark.parametrize("base", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adam, torch.optim.AdamW])
def test_wrapper_works_with_stateful_bases(base: type) -> None:
    # Against the reference wrapper (x, y, z stored) around the same base, in
    # float64: rounding stays below 1e-13, a wrong step is far above 1e-10.
    model, ref_model = make_model(), make_model()
    opt = sfoptim.ScheduleFreeWrapper(base(model.parameters(), lr=0.01))
    ref = sfoptim.ScheduleFreeWrapperReference(base(ref_model.parameters(), lr=0.01))
    batches = make_batches(60)
    train_steps(model, opt, batches)
    train_steps(ref_model, ref, batches)
    assert all(rel_diff(a, b) <= 1e-10 for a, b in zip(model.parameters(), ref_model.parameters())), "y"
    opt.eval()
    ref.eval()
    assert all(rel_diff(a, b) <= 1e-10 for a, b in zip(model.parameters(), ref_model.parameters())), "x"
    assert all(set(opt.state[p]) == {"z"} for p in model.parameters())
    assert all(len(opt.base.state[p]) > 0 for p in model.parameters())


def test_wrapper_shares_param_groups_with_base() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = sfoptim.ScheduleFreeWrapper(base)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    train_steps(model, opt, make_batches(1))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.3})
    assert base.param_groups is opt.param_groups and len(base.param_groups) == 2
    assert base.param_groups[1]["sf_momentum"] == 0.9 and base.param_groups[1]["momentum"] == 0


# ---------------------------------------------------- names a user can act on
OPTIMIZER_CLASSES = [
    getattr(sfoptim, n) for n in sfoptim.__all__
    if isinstance(getattr(sfoptim, n), type) and issubclass(getattr(sfoptim, n), torch.optim.Optimizer)
    and n != "ScheduleFreeOptimizer"
]  # fmt: skip


def test_only_classes_the_published_package_has_point_to_it() -> None:
    from sfoptim.engine.state_checks import PUBLISHED_CLASSES

    schedulefree = pytest.importorskip("schedulefree")
    published = {n for n in dir(schedulefree) if isinstance(getattr(schedulefree, n), type)}
    assert published == PUBLISHED_CLASSES
    for cls in OPTIMIZER_CLASSES:
        if cls.__name__ not in published:
            doc = cls.__doc__ or ""
            assert "published package" not in doc and "same name" not in doc, cls.__name__


@pytest.mark.parametrize("cls", [sfoptim.MuonScheduleFree])
def test_fused_true_without_a_kernel_names_the_optimizer_class(cls: type) -> None:
    from sfoptim.backends import dispatch

    dispatch._no_kernel_warned.discard(cls.__name__)
    p = torch.nn.Parameter(torch.randn(4, 3))
    # No decay: a decay at z (Muon's default place) would take foreach before any kernel is asked for.
    opt = cls([p], fused=True, weight_decay=0.0)
    p.grad = torch.ones(4, 3)
    with pytest.warns(RuntimeWarning, match=f"{cls.__name__} has no fused kernel") as caught:
        opt.step()
    assert not any("Direction" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "cls", [sfoptim.AdamWScheduleFree, sfoptim.MuonScheduleFree, sfoptim.ProdigyScheduleFreeClosure, sfoptim.SGDScheduleFreeReference]
)
def test_a_spent_parameter_generator_is_explained(cls: type) -> None:
    model = make_model()
    params = model.parameters()
    sfoptim.AdamWScheduleFree(params)  # consumes the generator
    with pytest.raises(ValueError, match=r"parameter iterable is empty.*generator like model\.parameters\(\) can be consumed only once"):
        cls(params)


def test_a_checkpoint_of_another_class_or_layout_is_explained_and_changes_nothing() -> None:
    model = make_model()
    adamw = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.01)
    train_steps(model, adamw, make_batches(2))
    saved = adamw.state_dict()
    n = len(list(model.parameters()))

    muon = sfoptim.MuonScheduleFree(model.named_parameters())
    train_steps(model, muon, make_batches(1))
    before = copy.deepcopy(muon.state_dict())
    with pytest.raises(ValueError, match=rf"it holds 1 parameter group of {n} parameters, but this MuonScheduleFree has 2 parameter groups") as caught:
        muon.load_state_dict(saved)
    assert "saved by AdamWScheduleFree" in str(caught.value)
    after = muon.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in before["state"].items() for k, v in s.items())

    regrouped = sfoptim.AdamWScheduleFree(two_groups(model))
    with pytest.raises(ValueError, match=r"same parameters in the same groups") as caught:
        regrouped.load_state_dict(saved)
    assert f"1 parameter group of {n} parameters" in str(caught.value) and "2 parameter groups" in str(caught.value)
