"""The fused CPU kernel with its work split across threads, as users run it.

The suite pins one thread (conftest.py), and the kernel only forks when every
thread gets at least ``SF_MIN_PER_THREAD`` (32,768) elements, in chunks of
``SF_CHUNK`` (16,384). Here two threads run on buckets above that threshold:
a few large tensors that are cut into many chunks, and hundreds of small
tensors that each make one chunk. The update is elementwise, so splitting the
work must not change a single bit: every threaded run is compared bitwise with
a one-thread run and with a second threaded run, and with the reference forms
(x, y, z stored explicitly) at a stated tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import registry
import torch

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu

pytestmark = pytest.mark.skipif(not _fused_cpu.available(), reason="no C compiler for the fused kernel")

STEPS = 8
#: Against the reference forms (another order of operations), relative to the
#: largest element of each tensor: measured below 5e-7 in float32 and 1e-15 in
#: float64.
RTOL32 = 5e-6
RTOL64 = 1e-12

# 3 x 100,000 + two odd sizes: 24 chunks, 316,392 elements (>= 2 x 32,768).
LARGE = [(100_000,), (250, 400), (1000, 100), (7,), (16_385,)]
# 200 tensors of 300-698 elements, one chunk each: 99,100 elements.
MANY_SMALL = [(300 + (i * 37) % 400,) for i in range(200)]
LAYOUTS = {"large": LARGE, "many_small": MANY_SMALL}


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def _run(
    factory: Callable[[list[torch.Tensor]], Any], shapes: list[tuple[int, ...]], dtype: torch.dtype, steps: int = STEPS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """y after the last step and x, for the same initial point and gradients every time."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    opt = factory(params)
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in params], [x.clone() for x in opt.eval_params()]


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(actual, expected)):
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        assert err <= rtol, f"{what}: tensor {i} ({tuple(b.shape)}) differs by {err:.3g} > {rtol}"


def _assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(actual, expected)):
        if not torch.equal(a, b):
            where = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{what}: tensor {i} ({tuple(b.shape)}) differs first at {where}")


#: Every registered optimizer with a one-pass kernel and a reference form of ours, as (fused, reference).
#: Muon's Newton-Schulz runs on torch's matrix products, whose bits may depend on how the BLAS
#: library splits them over threads on a given CPU; its kernel groups (AdamW) are covered by
#: tests/test_muon.py.
CASES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    i.name: (functools.partial(i.make, fused=True), i.make_reference)
    for i in registry.select(fused_kernel=True, closure=False, needs_loss=False)
    if i.reference_is_ours and i.name not in ("muon", "normuon")
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_two_threads_match_reference_and_one_thread_bitwise(threads, case: str, layout: str) -> None:
    fast, ref = CASES[case]
    shapes = LAYOUTS[layout]
    assert sum(torch.Size(s).numel() for s in shapes) >= 2 * 32_768, "the bucket must be large enough to fork"
    threads(1)
    y1, x1 = _run(fast, shapes, torch.float32)
    threads(2)
    y2, x2 = _run(fast, shapes, torch.float32)
    y2_again, x2_again = _run(fast, shapes, torch.float32)
    _assert_bitwise(y2_again, y2, "y, two runs with 2 threads")
    _assert_bitwise(x2_again, x2, "x, two runs with 2 threads")
    _assert_bitwise(y2, y1, "y, 2 threads against 1")
    _assert_bitwise(x2, x1, "x, 2 threads against 1")
    threads(1)
    y_ref, x_ref = _run(ref, shapes, torch.float32)
    _assert_close(y2, y_ref, RTOL32, "y against the reference form")
    _assert_close(x2, x_ref, RTOL32, "x against the reference form")


@pytest.mark.parametrize("case", ["adamw", "radam_sgd_phase", "wrapper_sgd"])
def test_two_threads_float64_match_reference(threads, case: str) -> None:
    fast, ref = CASES[case]
    threads(2)
    y2, x2 = _run(fast, LARGE, torch.float64)
    threads(1)
    y_ref, x_ref = _run(ref, LARGE, torch.float64)
    _assert_close(y2, y_ref, RTOL64, "y against the reference form")
    _assert_close(x2, x_ref, RTOL64, "x against the reference form")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decay_at_z_two_threads_match_one_bitwise(threads, layout: str, dtype: torch.dtype) -> None:
    """The kernel's decay at z (AdamW with inner momentum, a decay that matters) is the same on any thread count."""

    def fast(params: list[torch.Tensor]) -> Any:
        return sfoptim.AdamWScheduleFree(
            [{"params": params, "decay_at": "z"}], lr=0.01, weight_decay=0.5, inner_momentum=0.9, fused=True
        )

    threads(1)
    y1, x1 = _run(fast, LAYOUTS[layout], dtype)
    threads(2)
    y2, x2 = _run(fast, LAYOUTS[layout], dtype)
    _assert_bitwise(y2, y1, "y, 2 threads against 1")
    _assert_bitwise(x2, x1, "x, 2 threads against 1")
