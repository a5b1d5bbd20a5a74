"""The wrapper around third-party optimizers (``pytorch_optimizer``'s ADOPT and Adan).

The generic checks run on ADOPT through ``tests/registry.py``; here a small
model trains with each base, on the same trajectory as the wrapper's
reference form around a twin of the base, and a checkpoint resumes exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import loss_fn, make_batches, make_model, rel_diff, two_groups

import sfoptim

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

BASES: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adopt": lambda ps: pytorch_optimizer.ADOPT(ps, lr=0.01, weight_decay=0.01, weight_decouple=True),
    "adan": lambda ps: pytorch_optimizer.Adan(ps, lr=0.01, weight_decay=0.01, weight_decouple=True),
}


@pytest.mark.parametrize("name", list(BASES))
def test_wrapped_third_party_optimizer_trains_like_the_reference(name: str) -> None:
    batches = make_batches(60)
    model, twin = make_model(), make_model()
    opt = sfoptim.ScheduleFreeWrapper(BASES[name](two_groups(model, lr=0.005)), momentum=0.9, weight_decay_at_y=0.01)
    ref = sfoptim.ScheduleFreeWrapperReference(BASES[name](two_groups(twin, lr=0.005)), momentum=0.9, weight_decay_at_y=0.01)
    with torch.no_grad():
        start = sum(float(loss_fn(model, b)) for b in batches[:10])
    for batch in batches:
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert rel_diff(p.detach(), q.detach()) <= 1e-9
    opt.eval()
    ref.eval()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_diff(p.detach(), q.detach()) <= 1e-9
    with torch.no_grad():
        end = sum(float(loss_fn(model, b)) for b in batches[:10])
    assert end < 0.7 * start, f"{name}: loss {start:.4g} -> {end:.4g}"


@pytest.mark.parametrize("name", list(BASES))
def test_wrapped_third_party_checkpoint_resumes_exactly(name: str) -> None:
    batches = make_batches(20)

    def train(model: torch.nn.Module, opt: Any, part: list) -> None:
        for batch in part:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()

    model = make_model()
    opt = sfoptim.ScheduleFreeWrapper(BASES[name](model.parameters()))
    train(model, opt, batches[:10])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, batches[10:])

    resumed = make_model(seed=3)
    resumed.load_state_dict(saved[0])
    resumed_opt = sfoptim.ScheduleFreeWrapper(BASES[name](resumed.parameters()))
    resumed_opt.load_state_dict(saved[1])
    train(resumed, resumed_opt, batches[10:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
