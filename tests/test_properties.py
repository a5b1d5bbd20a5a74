"""Property tests: every fast form equals its reference form (x, y, z stored explicitly).

Hypothesis draws parameter shapes, hyperparameters and gradient sequences; the
fast optimizer and the reference are fed identical gradients and must agree at
``y`` after every step and at ``x`` at the end (float64, relative 1e-9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import rel_diff

import sfoptim

TOL = 1e-9

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)
common = dict(
    r=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    weight_lr_power=st.sampled_from([0.0, 1.0, 2.0]),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
)
settings.register_profile("sfoptim", max_examples=25, deadline=None)
settings.load_profile("sfoptim")


def compare(build_fast: Callable[[list], Any], build_ref: Callable[[list], Any], shapes: list, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    fast_p = [torch.nn.Parameter(t.clone()) for t in init]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    fast, ref = build_fast(fast_p), build_ref(ref_p)
    for _ in range(steps):
        for pf, pr in zip(fast_p, ref_p):
            # Gradient of a quadratic plus noise, so that it depends on y.
            noise = torch.randn(pf.shape, generator=g, dtype=torch.float64)
            pf.grad = pf.detach() * 0.5 + noise
            pr.grad = pr.detach() * 0.5 + noise
        fast.step()
        ref.step()
        for pf, pr in zip(fast_p, ref_p):
            assert rel_diff(pf, pr) <= TOL
    for a, b in zip(fast.eval_params(), ref.eval_params()):
        assert rel_diff(a, b) <= TOL
    fast.eval()
    ref.eval()
    for pf, pr in zip(fast_p, ref_p):
        assert rel_diff(pf, pr) <= TOL


@given(
    shapes=shapes,
    steps=st.integers(1, 15),
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-4, 0.1),
    betas=st.tuples(st.floats(0.05, 1.0), st.floats(0.0, 0.999)),
    warmup_steps=st.integers(0, 10),
    inner_momentum=st.sampled_from([0.0, 0.5, 0.9]),
    foreach=st.booleans(),
    **common,
)
def test_adamw_equals_reference(shapes: list, steps: int, seed: int, foreach: bool, **kw: Any) -> None:
    compare(
        lambda p: sfoptim.AdamWScheduleFree(p, foreach=foreach, **kw),
        lambda p: sfoptim.AdamWScheduleFreeReference(p, **kw),
        shapes,
        steps,
        seed,
    )


@given(
    shapes=shapes,
    steps=st.integers(1, 15),
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-3, 1.0),
    momentum=st.floats(0.05, 1.0),
    warmup_steps=st.integers(0, 10),
    foreach=st.booleans(),
    **common,
)
def test_sgd_equals_reference(shapes: list, steps: int, seed: int, foreach: bool, **kw: Any) -> None:
    compare(
        lambda p: sfoptim.SGDScheduleFree(p, foreach=foreach, **kw),
        lambda p: sfoptim.SGDScheduleFreeReference(p, **kw),
        shapes,
        steps,
        seed,
    )


@given(
    shapes=shapes,
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-4, 0.1),
    betas=st.tuples(st.floats(0.05, 1.0), st.sampled_from([0.5, 0.9, 0.99])),
    silent_sgd_phase=st.booleans(),
    foreach=st.booleans(),
    **common,
)
def test_radam_equals_reference(shapes: list, steps: int, seed: int, foreach: bool, **kw: Any) -> None:
    compare(
        lambda p: sfoptim.RAdamScheduleFree(p, foreach=foreach, **kw),
        lambda p: sfoptim.RAdamScheduleFreeReference(p, **kw),
        shapes,
        steps,
        seed,
    )


BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}


@given(
    shapes=shapes,
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    base=st.sampled_from(sorted(BASES)),
    momentum=st.floats(0.05, 1.0),
    weight_decay_at_y=st.sampled_from([0.0, 0.01, 0.1]),
    r=common["r"],
    weight_lr_power=common["weight_lr_power"],
)
def test_wrapper_equals_reference(shapes: list, steps: int, seed: int, base: str, **kw: Any) -> None:
    compare(
        lambda p: sfoptim.ScheduleFreeWrapper(BASES[base](p), **kw),
        lambda p: sfoptim.ScheduleFreeWrapperReference(BASES[base](p), **kw),
        shapes,
        steps,
        seed,
    )
