"""The per-step bookkeeping's shortcuts give what the general code gives.

A step reads every parameter's gradient and state in bulk (the usual case:
one device, one real dtype, state present) and the CPU kernel keeps the
pointer table of a call by the exact addresses and sizes. These tests change,
between steps, each thing those shortcuts depend on (a gradient that becomes
None or changes dtype, state replaced by hand, a parameter replaced through
``.data``, memory that becomes shared) and require the result of the general
path: the same buckets, or the foreach path's numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu


def _params(dtypes: list[torch.dtype], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3 + i, generator=gen, dtype=torch.float64).to(d)) for i, d in enumerate(dtypes)]


def _grads(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def _ids(buckets: list) -> list[tuple]:
    """A bucket list by what it holds: tensor storage and layout, and the buffers' names."""

    def ident(ts: list[torch.Tensor]) -> list[tuple]:
        return [(t.data_ptr(), t.dtype, tuple(t.shape), type(t)) for t in ts]

    def values(ts: list[torch.Tensor]) -> list[tuple]:
        # A gradient converted to the parameter's dtype is a new tensor on every call.
        return [(t.dtype, tuple(t.shape), type(t), tuple(t.tolist())) for t in ts]

    return [
        (ident(b.params), values(b.grads), ident(b.z), {n: ident(v) for n, v in b.buffers.items()}) for b in buckets
    ]


def _same_buckets_as_general_path(opt: Any) -> None:
    for gi, group in enumerate(opt.param_groups):
        active = opt._active_params(gi, group)
        names = opt.direction_for(group).state_buffers(group)
        fast = opt._buckets(group, active, names)
        general = opt._sorted_buckets(group, active, names)
        assert _ids(fast) == _ids(general)


def _grad_becomes_none(opt: Any, ps: list) -> None:
    ps[1].grad = None


def _grad_of_another_dtype(opt: Any, ps: list) -> None:
    ps[0].grad_dtype = None  # torch refuses such a gradient unless asked to accept it
    ps[0].grad = ps[0].grad.double()


def _state_buffer_removed(opt: Any, ps: list) -> None:
    del opt.state[ps[2]]["exp_avg_sq"]


def _z_replaced_by_hand(opt: Any, ps: list) -> None:
    opt.state[ps[0]]["z"] = opt.state[ps[0]]["z"].clone()


def _param_replaced_through_data(opt: Any, ps: list) -> None:
    ps[1].data = ps[1].data.clone()


def _param_dtype_changed_through_data(opt: Any, ps: list) -> None:
    ps[1].data = ps[1].data.double()
    ps[1].grad = ps[1].grad.double()


def _master_copy_added(opt: Any, ps: list) -> None:
    opt.state[ps[0]]["master"] = ps[0].detach().double()


#: Changes after which a step runs (and must equal foreach).
CHANGES: dict[str, Callable[[Any, list], None]] = {
    "grad-becomes-none": _grad_becomes_none,
    "grad-of-another-dtype": _grad_of_another_dtype,
    "state-buffer-removed": _state_buffer_removed,
    "z-replaced-by-hand": _z_replaced_by_hand,
    "param-replaced-through-data": _param_replaced_through_data,
}
#: Changes that only the bucketing must see (the state no longer fits for a step).
BUCKET_CHANGES = dict(
    CHANGES, param_dtype_changed_through_data=_param_dtype_changed_through_data, master_copy_added=_master_copy_added
)


@pytest.mark.parametrize("change", list(BUCKET_CHANGES))
def test_bulk_bucketing_equals_the_general_path_after_a_change(change: str):
    ps = _params([torch.float32] * 3)
    opt = sfoptim.AdamWScheduleFree(ps, lr=0.01)
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    _same_buckets_as_general_path(opt)
    BUCKET_CHANGES[change](opt, ps)
    if change == "state-buffer-removed":
        # Missing state is created by the step, in the general path.
        buckets = opt._buckets(opt.param_groups[0], opt._active_params(0, opt.param_groups[0]), ("exp_avg_sq",))
        assert "exp_avg_sq" in opt.state[ps[2]] and len(buckets[0].params) == 3
    _same_buckets_as_general_path(opt)


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32, torch.float64, torch.float32],
        [torch.complex64, torch.float32],
        [torch.complex64, torch.complex64],
        [torch.bfloat16, torch.bfloat16],
    ],
    ids=["mixed", "complex-and-real", "complex", "bfloat16"],
)
def test_groups_the_bulk_path_cannot_take_give_the_general_buckets(dtypes: list[torch.dtype]):
    ps = _params(dtypes)
    opt = sfoptim.AdamWScheduleFree(ps, lr=0.01)
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    _same_buckets_as_general_path(opt)


def _run(fused: bool | None, change: Callable[[Any, list], None] | None) -> list[torch.Tensor]:
    ps = _params([torch.float32] * 3, seed=3)
    opt = sfoptim.AdamWScheduleFree(ps, lr=0.01, weight_decay=0.1, fused=fused, foreach=None if fused is None else True)
    for s in range(4):
        _grads(ps, 10 + s)
        if s == 2 and change is not None:
            change(opt, ps)
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("change", list(CHANGES))
def test_steps_after_a_change_equal_foreach(change: str):
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, foreach = _run(None, CHANGES[change]), _run(False, CHANGES[change])
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# The pointer-table tests run in a subprocess: a table reused for the wrong
# tensors is a write through stale pointers, which can kill the interpreter.
_TABLE_CHECKS = r'''
import torch, sfoptim
from sfoptim.backends import cpu_kernel as K
from sfoptim.directions import Kind

def call(lists):
    y, g, z, v = lists
    return K.step(y, g, z, [v], Kind.ADAM, [0.1, 0.5, 0.9, 0.0, 0.999, 0.001, 1e-8, 0.0, 1.0])

def lists(n):
    gen = torch.Generator().manual_seed(5)
    # v (the last list) is a second moment: not negative.
    return [[torch.rand(n, generator=gen) for _ in range(2)] for _ in range(4)]

# A parameter moved through .data is updated where it now lives.
p = torch.nn.Parameter(torch.zeros(1000))
opt = sfoptim.SGDScheduleFree([p], lr=0.1)
for _ in range(2):
    p.grad = torch.ones_like(p)
    opt.step()
old = p.data
before = old.clone()
p.data = old.clone()
p.grad = torch.ones_like(p)
opt.step()
assert torch.equal(old, before), "the step wrote into the parameter's former storage"
assert not torch.equal(p.detach(), before), "the parameter did not move"
print("moved-parameter ok", flush=True)

# Memory shared after a disjoint call of the same sizes is refused.
ls = lists(4)
assert call(ls) is True
ls[2][1] = ls[3][1]  # z of the second parameter becomes its v
before = [[t.clone() for t in lst] for lst in ls]
assert call(ls) is False
assert all(torch.equal(t, o) for lst, old in zip(ls, before) for t, o in zip(lst, old))
print("shared-memory ok", flush=True)

# The table holds exactly this call's pointers and sizes.
ls = lists(6)
assert not isinstance(K._inspect(ls), str)
ls[1][0] = torch.rand(6)
second = K._inspect(ls)
assert list(second.table) == [t.data_ptr() for lst in ls for t in lst] + [6, 6]
print("table ok", flush=True)
'''


@pytest.fixture(scope="module")
def table_checks() -> subprocess.CompletedProcess:
    src = Path(sfoptim.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([sys.executable, "-c", _TABLE_CHECKS], capture_output=True, text=True, env=env, timeout=300)


def _passed(proc: subprocess.CompletedProcess, name: str) -> None:
    assert f"{name} ok" in proc.stdout.splitlines(), (
        f"exit status {proc.returncode} (negative: killed by signal {-proc.returncode})\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("name", ["moved-parameter", "shared-memory", "table"])
def test_pointer_table_is_rebuilt_for_tensors_at_other_addresses(table_checks, name: str):
    """The table and overlap verdict are kept by exact addresses: never reused for other tensors."""
    if not _fused_cpu.available():
        pytest.skip("no C compiler")
    _passed(table_checks, name)
