"""The wrapper as an object: copies, pickles, failed base steps, duplicates, published checkpoints."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import loss_fn, make_batches, make_model, rel_diff

import sfoptim

schedulefree = pytest.importorskip("schedulefree")

BASES: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


def train(model: torch.nn.Module, opt: Any, batches: list) -> None:
    opt.train()
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def _torch_save_load(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _torch_save_load,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("base", list(BASES))
def test_copied_wrapper_continues_like_the_original(base: str, how: str) -> None:
    batches = make_batches(20)
    model = make_model()
    opt = sfoptim.ScheduleFreeWrapper(BASES[base](model.parameters()), weight_decay_at_y=0.01)
    train(model, opt, batches[:10])
    model2, opt2 = COPIES[how]((model, opt))
    assert opt2.base.param_groups is opt2.param_groups
    params2 = list(model2.parameters())
    assert [id(p) for g in opt2.param_groups for p in g["params"]] == [id(p) for p in params2]
    assert all(p in opt2.base.state and "z" in opt2.state[p] for p in params2)
    train(model, opt, batches[10:])
    train(model2, opt2, batches[10:])
    opt.eval()
    opt2.eval()
    for a, b in zip(model.parameters(), params2):
        assert torch.equal(a, b)


def _decay_case_params() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(3)
    return torch.nn.Parameter(torch.randn(40, generator=g, dtype=torch.float64)), torch.nn.Parameter(
        torch.randn(7, 5, generator=g, dtype=torch.float64)
    )


def _dense_grads(params: tuple, step: int) -> None:
    for i, p in enumerate(params):
        p.grad = torch.sin(torch.arange(p.numel(), dtype=p.dtype) * (step + 1) + i).reshape(p.shape)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("decay", [0.1, 0.0])
def test_failed_base_step_leaves_everything_exactly_as_before(decay: float, fused: Any) -> None:
    """Adam refuses a sparse gradient inside its step, after the wrapper has
    prepared z; the wrapper must undo that exactly, and a retry with a dense
    gradient must follow the run that never failed, bit for bit."""
    runs = []
    for fail in (True, False):
        params = _decay_case_params()
        opt = sfoptim.ScheduleFreeWrapper(torch.optim.Adam(params, lr=0.01), weight_decay_at_y=decay, fused=fused)
        for step in range(3):
            _dense_grads(params, step)
            opt.step()
        if fail:
            before = [p.detach().clone() for p in params]
            z_before = [opt.state[p]["z"].clone() for p in params]
            scalars = [dict(g) for g in opt.param_groups]
            _dense_grads(params, 3)
            params[1].grad = params[1].grad.to_sparse()
            with pytest.raises(RuntimeError, match="sparse"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert all(torch.equal(opt.state[p]["z"], z) for p, z in zip(params, z_before))
            assert [dict(g) for g in opt.param_groups] == scalars
        _dense_grads(params, 3)
        opt.step()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["z"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_failed_first_step_leaves_no_z() -> None:
    params = _decay_case_params()
    opt = sfoptim.ScheduleFreeWrapper(torch.optim.Adam(params, lr=0.01), weight_decay_at_y=0.1)
    before = [p.detach().clone() for p in params]
    _dense_grads(params, 0)
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all("z" not in opt.state[p] for p in params)


def test_duplicate_parameter_warning_is_shown_once() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([p, p], lr=0.1))
        opt.add_param_group({"params": [q, q]})
    duplicates = [w for w in caught if "duplicate parameters" in str(w.message)]
    assert len(duplicates) == 2  # one per group


class _TwiceSGD(torch.optim.SGD):
    """SGD that applies its update twice per step, as SGD does for a parameter listed twice."""

    def step(self, closure: Any = None) -> Any:
        super().step()
        return super().step()


def test_parameter_listed_twice_is_one_parameter_to_the_wrapper() -> None:
    """Torch's SGD steps a parameter listed twice twice; the wrapper's own
    bookkeeping (x, y, z) must still treat it as one parameter."""
    init = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice_listed = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([p, p], lr=0.1), weight_decay_at_y=0.01)
    once_listed = sfoptim.ScheduleFreeWrapper(_TwiceSGD([q], lr=0.1), weight_decay_at_y=0.01)
    for step in range(5):
        for w, opt in ((p, twice_listed), (q, once_listed)):
            w.grad = torch.cos(torch.arange(9, dtype=torch.float64) + step)
            opt.step()
        assert torch.equal(p, q)
    assert torch.equal(twice_listed.state[p]["z"], once_listed.state[q]["z"])


# ------------------------------------------------- published wrapper checkpoints
PUBLISHED_CASES = [
    (dict(lr=0.1), dict()),
    (dict(lr=0.05, momentum=0.9), dict(momentum=0.8, weight_decay_at_y=0.05, r=1.0, weight_lr_power=1.0)),
    (dict(lr=0.05, momentum=0.5, weight_decay=0.01), dict(weight_decay_at_y=0.02)),
]


@pytest.mark.parametrize("base_kw, wrapper_kw", PUBLISHED_CASES)
def test_published_wrapper_checkpoint_loads_and_continues(base_kw: dict, wrapper_kw: dict) -> None:
    batches = make_batches(40)
    model = make_model()
    published = schedulefree.ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), **base_kw), **wrapper_kw)
    sched = torch.optim.lr_scheduler.StepLR(published.base, 8, 0.5)
    published.train()
    for batch in batches[:20]:
        published.zero_grad()
        loss_fn(model, batch).backward()
        published.step()
        sched.step()
    published.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(published.state_dict())
    assert set(saved_opt) == {"state", "param_groups"}

    resumed = make_model(seed=5)
    resumed.load_state_dict(saved_model)
    ours = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(resumed.parameters(), **base_kw), **wrapper_kw)
    ours.load_state_dict(saved_opt)
    assert not ours.train_mode  # the published wrapper is saved at x
    if base_kw.get("momentum"):
        assert all("momentum_buffer" in ours.base.state[p] and set(ours.state[p]) == {"z"} for p in resumed.parameters())
    assert ours.param_groups[0]["lr"] == published.param_groups[0]["lr"]

    published.train()
    ours.train()
    worst = 0.0
    for batch in batches[20:]:
        for m, o in ((model, published), (resumed, ours)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
        for a, b in zip(resumed.parameters(), model.parameters()):
            worst = max(worst, rel_diff(a, b))
    published.eval()
    ours.eval()
    for a, b in zip(resumed.parameters(), model.parameters()):
        worst = max(worst, rel_diff(a, b))
    assert worst <= 1e-9


def test_own_checkpoint_without_base_entry_is_refused() -> None:
    model = make_model()
    opt = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, make_batches(2))
    sd = opt.state_dict()
    del sd["base"]
    with pytest.raises(ValueError, match="'base'"):
        opt.load_state_dict(sd)


def test_refused_checkpoint_leaves_the_base_optimizer_as_it_was() -> None:
    # A checkpoint of a smaller model: the wrapper refuses it, and the base
    # optimizer's momentum buffers must not have been replaced on the way.
    small = torch.nn.Linear(3, 2, dtype=torch.float64)
    opt_small = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9))
    big = torch.nn.Linear(5, 2, dtype=torch.float64)
    opt_big = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9))
    for model, opt in ((small, opt_small), (big, opt_big)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    before = copy.deepcopy(opt_big.state_dict())
    with pytest.raises(ValueError):
        opt_big.load_state_dict(opt_small.state_dict())
    after = opt_big.state_dict()
    for i, state in before["base"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["base"]["state"][i][key], value), f"base state {i}/{key} changed"
    assert opt_big.param_groups is opt_big.base.param_groups
