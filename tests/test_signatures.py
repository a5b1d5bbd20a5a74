"""Call forms of the published ``schedulefree`` 1.4.1 package mean the same here.

For every class both packages have (the ``*Reference`` forms are covered in
their own tests), the published parameters must be a prefix of ours: same
names, kinds, order and defaults. sfoptim's own parameters come after them.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import sfoptim

schedulefree = pytest.importorskip("schedulefree")

SHARED = sorted(
    name
    for name, obj in vars(schedulefree).items()
    if inspect.isclass(obj) and not name.endswith("Reference") and hasattr(sfoptim, name)
)

#: Defaults that differ on purpose: (published, ours, reason).
DELIBERATE_DEFAULTS = {
    "foreach": (
        True,
        None,
        "None leaves the choice to `fused`: the one-pass CPU kernel where it runs, foreach elsewhere; "
        "True and None give the same numbers",
    ),
}

#: Valid, non-default values for every published parameter, to check that a
#: positional call sets the same hyperparameter in both packages.
NON_DEFAULT = {
    "lr": 0.3,
    "betas": (0.8, 0.99),
    "eps": 1e-6,
    "weight_decay": 0.05,
    "warmup_steps": 7,
    "r": 0.5,
    "weight_lr_power": 1.5,
    "momentum": 0.7,
    "foreach": False,
    "silent_sgd_phase": False,
    "weight_decay_at_y": 0.02,
}


def test_every_published_class_is_compared() -> None:
    assert SHARED == sorted(
        [
            "AdamWScheduleFree",
            "AdamWScheduleFreeClosure",
            "AdamWScheduleFreePaper",
            "RAdamScheduleFree",
            "RAdamScheduleFreeClosure",
            "SGDScheduleFree",
            "SGDScheduleFreeClosure",
            "ScheduleFreeWrapper",
        ]
    )


@pytest.mark.parametrize("name", SHARED)
def test_published_parameters_are_a_prefix_of_ours(name: str) -> None:
    theirs = list(inspect.signature(getattr(schedulefree, name)).parameters.values())
    ours = list(inspect.signature(getattr(sfoptim, name)).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs], name
    for t, o in zip(theirs, ours):
        assert o.kind == t.kind, f"{name}({o.name}): {o.kind} here, {t.kind} published"
        if o.name in DELIBERATE_DEFAULTS:
            published, here, _ = DELIBERATE_DEFAULTS[o.name]
            assert (t.default, o.default) == (published, here), f"{name}({o.name})"
        else:
            assert o.default == t.default, f"{name}({o.name}): default {o.default!r} here, {t.default!r} published"
    for extra in ours[len(theirs) :]:
        # A published call never names these, so they must have defaults.
        assert extra.default is not inspect.Parameter.empty, f"{name}({extra.name}) has no default"
        assert extra.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD), name


def _positional_args(cls: type, params: Any) -> list[Any]:
    names = list(inspect.signature(cls).parameters)[1:]
    return [params, *(NON_DEFAULT[n] for n in names)]


@pytest.mark.parametrize("name", [n for n in SHARED if n != "ScheduleFreeWrapper"])
def test_positional_call_sets_the_same_hyperparameters(name: str) -> None:
    theirs_cls = getattr(schedulefree, name)
    w1 = torch.nn.Parameter(torch.zeros(3))
    w2 = torch.nn.Parameter(torch.zeros(3))
    theirs = theirs_cls(*_positional_args(theirs_cls, [w1]))
    ours = getattr(sfoptim, name)(*_positional_args(theirs_cls, [w2]))
    for key in list(inspect.signature(theirs_cls).parameters)[1:]:
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], f"{name}: {key}"


def test_sgd_closure_takes_weight_decay_before_momentum() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    ours = sfoptim.SGDScheduleFreeClosure([w], 0.1, 0.5)
    theirs = schedulefree.SGDScheduleFreeClosure([torch.nn.Parameter(torch.zeros(3))], 0.1, 0.5)
    assert ours.param_groups[0]["weight_decay"] == theirs.param_groups[0]["weight_decay"] == 0.5
    assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"] == 0.9


def test_wrapper_positional_order_is_published() -> None:
    def base() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)

    ours = sfoptim.ScheduleFreeWrapper(base(), 0.1)
    assert ours.param_groups[0]["sf_weight_decay_at_y"] == schedulefree.ScheduleFreeWrapper(base(), 0.1).weight_decay_at_y
    assert ours.param_groups[0]["sf_momentum"] == 0.9
    args = (0.02, 0.7, 1.5, 0.5)
    ours = sfoptim.ScheduleFreeWrapper(base(), *args)
    theirs = schedulefree.ScheduleFreeWrapper(base(), *args)
    for key in ("weight_decay_at_y", "momentum", "weight_lr_power", "r"):
        assert ours.param_groups[0]["sf_" + key] == getattr(theirs, key), key


def test_wrapper_accepts_base_by_keyword() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert sfoptim.ScheduleFreeWrapper(base=opt).base is opt


@pytest.mark.parametrize("name", ["SGDScheduleFreeClosure", "AdamWScheduleFreeClosure", "RAdamScheduleFreeClosure"])
def test_closure_forms_show_their_arguments(name: str) -> None:
    params = inspect.signature(getattr(sfoptim, name)).parameters
    assert "lr" in params and "fused" in params
    assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
