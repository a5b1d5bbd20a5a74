"""The reference forms are drop-ins for the published ``schedulefree`` 1.4.1 classes.

Every parameter of the published constructor appears here with the same name,
kind, position and default; parameters of our own may follow, never precede.
``RAdamScheduleFreeReference`` has no published counterpart and mirrors the
published ``RAdamScheduleFree``. A checkpoint of a published reference class
resumes here on the same trajectory.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io

import pytest
import torch
from problems import loss_fn, make_batches, make_model, rel_diff

import sfoptim

schedulefree = pytest.importorskip("schedulefree")

PAIRS = [
    ("SGDScheduleFreeReference", "SGDScheduleFreeReference"),
    ("AdamWScheduleFreeReference", "AdamWScheduleFreeReference"),
    ("RAdamScheduleFreeReference", "RAdamScheduleFree"),
    ("ScheduleFreeWrapperReference", "ScheduleFreeWrapperReference"),
]


def _shape(param: inspect.Parameter) -> tuple:
    return param.name, param.kind, param.default


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_published_parameters_come_first_with_the_same_defaults(ours: str, theirs: str) -> None:
    mine = list(inspect.signature(getattr(sfoptim, ours)).parameters.values())
    published = list(inspect.signature(getattr(schedulefree, theirs)).parameters.values())
    assert [_shape(p) for p in mine[: len(published)]] == [_shape(p) for p in published]
    extras = mine[len(published) :]
    assert all(p.default is not inspect.Parameter.empty for p in extras), "extra parameters need defaults"


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_positional_call_means_the_same(ours: str, theirs: str) -> None:
    """Every published argument passed positionally lands in the same hyperparameter."""
    published = list(inspect.signature(getattr(schedulefree, theirs)).parameters)[1:]
    values = {
        "lr": 0.125, "momentum": 0.75, "weight_decay": 0.03125, "warmup_steps": 7, "r": 0.5,
        "weight_lr_power": 1.5, "foreach": False, "betas": (0.8, 0.95), "eps": 1e-6,
        "decay_at_z": True, "silent_sgd_phase": False, "weight_decay_at_y": 0.0625,
    }
    p = torch.nn.Parameter(torch.zeros(2))
    first = torch.optim.SGD([p], lr=0.1) if "Wrapper" in ours else [p]
    opt = getattr(sfoptim, ours)(first, *[values[name] for name in published])
    group = opt.param_groups[0]
    for name in published:
        if name != "foreach":  # accepted for compatibility, not stored
            assert group[name] == values[name], name


def test_wrapper_reference_takes_base_by_keyword() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = sfoptim.ScheduleFreeWrapperReference(base=torch.optim.SGD([p], lr=0.1), weight_decay_at_y=0.5)
    assert opt.param_groups[0]["weight_decay_at_y"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("name, kw", [
    ("AdamWScheduleFreeReference", dict(lr=0.01, warmup_steps=5, weight_decay=0.01)),
    ("SGDScheduleFreeReference", dict(lr=0.2, warmup_steps=5)),
])
def test_published_reference_checkpoint_resumes_on_the_same_trajectory(name: str, kw: dict) -> None:
    batches = make_batches(30)
    model = make_model()
    with contextlib.redirect_stdout(io.StringIO()):  # the published classes print on mode switches
        opt = getattr(schedulefree, name)(model.parameters(), **kw)
        opt.train()
        for batch in batches[:15]:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        opt.eval()
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        resumed = make_model(seed=5)
        resumed.load_state_dict(saved_model)
        resumed_opt = getattr(sfoptim, name)(resumed.parameters(), **kw)
        resumed_opt.load_state_dict(saved_opt)
        for m, o in ((model, opt), (resumed, resumed_opt)):
            o.train()
            for batch in batches[15:]:
                o.zero_grad()
                loss_fn(m, batch).backward()
                o.step()
            o.eval()
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert rel_diff(a, b) <= 1e-12
