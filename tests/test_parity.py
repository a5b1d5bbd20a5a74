"""Trajectory parity with the published ``schedulefree`` 1.4.1 package.

Both packages train the same model on the same batches for 200 steps; the
parameters are compared after every step (at ``y``) and after ``eval()`` (at
``x``). Tolerances: 1e-9 relative in float64, 2e-5 in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import loss_fn, make_batches, make_model, rel_diff, run_pair, two_groups

import sfoptim

schedulefree = pytest.importorskip("schedulefree")

STEPS = 200
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


ADAMW_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, warmup_steps=20),
    dict(lr=0.02, warmup_steps=10, weight_decay=0.05),
    dict(lr=0.01, r=1.0, weight_lr_power=0.0),
    dict(lr=0.01, r=0.5, weight_lr_power=1.0, betas=(0.95, 0.99), eps=1e-6),
]
SGD_CASES = [
    dict(lr=0.2),
    dict(lr=0.2, warmup_steps=20, weight_decay=0.01),
    dict(lr=0.1, momentum=0.5, r=1.0, weight_lr_power=0.0),
]
RADAM_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, weight_decay=0.05, r=1.0),
    dict(lr=0.01, silent_sgd_phase=False, betas=(0.9, 0.99)),
]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kw", ADAMW_CASES)
def test_adamw_matches_published(kw: dict, foreach: bool, dtype: torch.dtype) -> None:
    worst = run_pair(
        lambda p: sfoptim.AdamWScheduleFree(p, foreach=foreach, **kw),
        lambda p: schedulefree.AdamWScheduleFree(p, foreach=foreach, **kw),
        dtype,
    )
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_published(kw: dict, dtype: torch.dtype) -> None:
    worst = run_pair(lambda p: sfoptim.SGDScheduleFree(p, **kw), lambda p: schedulefree.SGDScheduleFree(p, **kw), dtype)
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", RADAM_CASES)
def test_radam_matches_published(kw: dict, dtype: torch.dtype) -> None:
    worst = run_pair(lambda p: sfoptim.RAdamScheduleFree(p, **kw), lambda p: schedulefree.RAdamScheduleFree(p, **kw), dtype)
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_paper_form_matches_published(dtype: torch.dtype) -> None:
    kw = dict(lr=0.01, warmup_steps=10, weight_decay=0.01)
    worst = run_pair(
        lambda p: sfoptim.AdamWScheduleFreePaper(p, **kw), lambda p: schedulefree.AdamWScheduleFreePaper(p, **kw), dtype
    )
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (sfoptim.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=0.01, warmup_steps=10)),
        (sfoptim.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.2, warmup_steps=5)),
        (sfoptim.RAdamScheduleFree, schedulefree.RAdamScheduleFree, dict(lr=0.01)),
    ],
)
def test_param_groups_and_lr_scheduler_match_published(ours: type, theirs: type, kw: dict, dtype: torch.dtype) -> None:
    second = dict(lr=kw["lr"] / 2, weight_decay=0.1)
    worst = run_pair(
        lambda p: ours(p, **kw), lambda p: theirs(p, **kw), dtype, groups=lambda m: two_groups(m, **second), scheduler=True
    )
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [dict(momentum=0.9), dict(momentum=0.8, weight_decay_at_y=0.05), dict(momentum=0.9, r=1.0, weight_lr_power=1.0)],
)
def test_wrapper_matches_published_around_sgd(kw: dict, dtype: torch.dtype) -> None:
    worst = run_pair(
        lambda p: sfoptim.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.1), **kw),
        lambda p: schedulefree.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.1), **kw),
        dtype,
        scheduler=True,
    )
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.RMSprop(p, lr=0.005),
])
def test_wrapper_around_stateful_base_matches_our_reference(dtype: torch.dtype, base: Callable) -> None:
    """Around Adam or RMSprop the published wrappers crash (they share one state
    dict with the base optimizer, which then skips its own initialisation), so
    the oracle here is our reference form; the crash is pinned below."""
    kw = dict(momentum=0.9, weight_decay_at_y=0.01)
    worst = run_pair(
        lambda p: sfoptim.ScheduleFreeWrapper(base(p), **kw),
        lambda p: sfoptim.ScheduleFreeWrapperReference(base(p), **kw),
        dtype,
        scheduler=True,
    )
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("published", ["ScheduleFreeWrapper", "ScheduleFreeWrapperReference"])
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.RMSprop])
def test_published_wrappers_crash_around_stateful_bases(published: str, base: type) -> None:
    """Documents the published bug our wrapper fixes (see the test above)."""
    model = make_model()
    opt = getattr(schedulefree, published)(base(model.parameters(), lr=0.01))
    opt.train()
    loss_fn(model, make_batches(1)[0]).backward()
    with pytest.raises(KeyError):
        opt.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (sfoptim.AdamWScheduleFreeClosure, schedulefree.AdamWScheduleFreeClosure, dict(lr=0.01, warmup_steps=10, weight_decay=0.01)),
        (sfoptim.SGDScheduleFreeClosure, schedulefree.SGDScheduleFreeClosure, dict(lr=0.2, warmup_steps=5, weight_decay=0.01)),
        (sfoptim.RAdamScheduleFreeClosure, schedulefree.RAdamScheduleFreeClosure, dict(lr=0.01, weight_decay=0.01)),
    ],
)
def test_closure_forms_match_published(ours: type, theirs: type, kw: dict, dtype: torch.dtype) -> None:
    ours_model = make_model(dtype)
    theirs_model = copy.deepcopy(ours_model)
    opts = [(ours_model, ours(ours_model.parameters(), **kw)), (theirs_model, theirs(theirs_model.parameters(), **kw))]
    worst = 0.0
    for batch in make_batches(STEPS, dtype):
        losses = []
        for model, opt in opts:

            def closure(model: torch.nn.Module = model, opt: Any = opt) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        assert rel_diff(losses[0], losses[1]) <= TOL[dtype] * 10
        for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
            worst = max(worst, rel_diff(a, b))
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (sfoptim.AdamWScheduleFreeReference, schedulefree.AdamWScheduleFreeReference, dict(lr=0.01, warmup_steps=10, weight_decay=0.01)),
        (sfoptim.SGDScheduleFreeReference, schedulefree.SGDScheduleFreeReference, dict(lr=0.2, warmup_steps=5, weight_decay=0.01)),
    ],
)
def test_reference_forms_match_published(ours: type, theirs: type, kw: dict, dtype: torch.dtype, capsys: Any) -> None:
    worst = run_pair(lambda p: ours(p, **kw), lambda p: theirs(p, **kw), dtype)
    assert worst <= TOL[dtype]


@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (sfoptim.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=0.01, warmup_steps=10)),
        (sfoptim.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.2)),
        (sfoptim.RAdamScheduleFree, schedulefree.RAdamScheduleFree, dict(lr=0.01)),
    ],
)
def test_published_checkpoint_loads_and_continues(ours: type, theirs: type, kw: dict) -> None:
    """A run started with the published package resumes under sfoptim on the same trajectory."""
    batches = make_batches(40)
    model = make_model()
    opt = theirs(model.parameters(), **kw)
    opt.train()
    for batch in batches[:20]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    opt.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = make_model(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = ours(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(saved_opt)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        o.train()
        for batch in batches[20:]:
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
        o.eval()
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert rel_diff(a, b) <= 1e-12
