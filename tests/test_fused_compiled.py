"""The compiled fused backend (used for fused=True on GPUs), exercised on CPU.

No GPU is needed: the same ``torch.compile``-d function runs through Inductor's
CPU code generator here. The engine is pointed at it for CPU tensors, and its
trajectories must match the reference forms; dynamo must not recompile as the
learning rate, warmup and modes change.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import registry
import torch
from problems import rel_diff

import sfoptim
from sfoptim.backends import compiled as _fused_compiled
from sfoptim.backends import dispatch

torch._dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture
def compiled_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "kernel_backend", lambda device_type, fused: _fused_compiled)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


#: The registry's compile entries with a one-pass kernel and a reference form of ours, as (name, fused, reference).
CASES: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
    (i.name, functools.partial(i.make, fused=True), i.make_reference)
    for i in registry.select(compile=True, fused_kernel=True, closure=False)
    if i.reference_is_ours and i.base is None
]


@pytest.mark.parametrize("name, fast, ref", CASES, ids=[c[0] for c in CASES])
def test_compiled_backend_matches_reference_without_recompiling(
    compiled_on_cpu: None, name: str, fast: Callable[..., Any], ref: Callable[..., Any]
) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (33,), (4, 3, 2), (1000,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt, oracle = fast(ours), ref(theirs)
    settled = None
    for step in range(60):
        for a, b in zip(ours, theirs):
            noise = torch.randn(a.shape, generator=g)
            a.grad = a.detach() * 0.5 + noise
            b.grad = b.detach() * 0.5 + noise
        if step == 30:
            for o in (opt, oracle):
                o.param_groups[0]["lr"] *= 0.5
        opt.step()
        oracle.step()
        if step % 10 == 9:
            for o in (opt, oracle):
                o.eval()
                o.train()
        for a, b in zip(ours, theirs):
            assert rel_diff(a, b) <= 2e-5, f"{name} step {step}"
        if step == 3:
            # RAdam's SGD phase and the Adam phase are two kernels; both exist by now.
            settled = graphs()
    assert settled is not None and settled >= 1, "the compiled kernel never ran"
    assert graphs() == settled, "the compiled kernel recompiled as lr, warmup or modes changed"
    for a, b in zip(opt.eval_params(), oracle.eval_params()):
        assert rel_diff(a, b) <= 2e-5


#: Those of them with an ``eps``, set to 0.1.
LARGE_EPS_CASES: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
    (i.name, functools.partial(i.make, eps=0.1, fused=True), functools.partial(i.make_reference, eps=0.1))
    for i in registry.select(compile=True, fused_kernel=True, closure=False)
    if i.reference_is_ours and i.base is None and "eps" in inspect.signature(i.cls).parameters
]


@pytest.mark.parametrize("name, fast, ref", LARGE_EPS_CASES, ids=[c[0] for c in LARGE_EPS_CASES])
def test_compiled_backend_float64_large_eps_matches_reference_tightly(
    compiled_on_cpu: None, monkeypatch: pytest.MonkeyPatch, name: str, fast: Callable[..., Any], ref: Callable[..., Any]
) -> None:
    """eps = 0.1 against v of order one: a misplaced eps (inside the square root)
    moves the step by percents, float64 rounding by less than 1e-14."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(7, 5), (33,), (300,)]]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt, oracle = fast(ours), ref(theirs)
    ran = []
    compiled_step = _fused_compiled.step
    monkeypatch.setattr(_fused_compiled, "step", lambda *a, **k: ran.append(compiled_step(*a, **k)) or ran[-1])
    for _step in range(20):
        for a, b in zip(ours, theirs):
            noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
            a.grad = a.detach() * 0.5 + noise
            b.grad = b.detach() * 0.5 + noise
        opt.step()
        oracle.step()
    assert ran == [True] * 20, "the compiled kernel must have made every step"
    for a, b in zip(ours + opt.eval_params(), theirs + oracle.eval_params()):
        assert rel_diff(a, b) <= 1e-10, f"{name}: {rel_diff(a, b):.3g}"


def test_compiled_backend_leaves_gradients_alone(compiled_on_cpu: None) -> None:
    p = torch.nn.Parameter(torch.randn(50))
    p.grad = torch.randn(50)
    before = p.grad.clone()
    opt = sfoptim.AdamWScheduleFree([p], lr=0.1, weight_decay=0.1, fused=True)
    for _ in range(3):
        opt.step()
    assert torch.equal(p.grad, before)
    assert set(opt.state[p]) == {"z", "exp_avg_sq"}


def test_no_recompilation_over_1000_steps(compiled_on_cpu: None) -> None:
    """Warmup, a learning rate changed every 100 steps and eval()/train() every 50."""
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(40, 30), (30,), (129,)]]
    opt = sfoptim.AdamWScheduleFree(params, lr=0.01, warmup_steps=100, weight_decay=0.01, fused=True)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    settled = graphs()
    for step in range(1, 1000):
        if step % 100 == 0:
            opt.param_groups[0]["lr"] *= 0.9
        if step % 50 == 0:
            opt.eval()
            opt.train()
        opt.step()
    assert graphs() == settled
    assert opt.param_groups[0]["k"] == 1000
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("inner_momentum", [0.0, 0.9], ids=["adamw", "adamw_inner"])
def test_compiled_backend_takes_decay_at_z_and_matches_foreach(
    compiled_on_cpu: None, monkeypatch: pytest.MonkeyPatch, inner_momentum: float
) -> None:
    """``decay_at="z"`` runs on the compiled kernel (the scalar ``wdz``) in float64, to rounding of the foreach path."""
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(7, 5), (33,)]]
    ends, ran = [], []
    compiled_step = _fused_compiled.step
    monkeypatch.setattr(_fused_compiled, "step", lambda *a, **k: ran.append(compiled_step(*a, **k)) or ran[-1])
    for fused, decay_at in ((True, "z"), (False, "z"), (True, "y")):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = sfoptim.AdamWScheduleFree(
            [{"params": params, "decay_at": decay_at}], lr=0.05, weight_decay=0.5, inner_momentum=inner_momentum, fused=fused
        )
        for step in range(10):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        ends.append([p.detach().clone() for p in params])
    assert ran == [True] * 20, "the compiled kernel must have made every fused step"
    for a, b, at_y in zip(*ends):
        assert rel_diff(a, b) <= 1e-12, f"{rel_diff(a, b):.3g}"
        assert rel_diff(at_y, b) > 1e-3, "decay at y gives the same numbers"
