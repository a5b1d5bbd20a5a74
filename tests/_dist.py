"""Helpers for tests that start real ``torch.distributed`` process groups on CPU.

Every distributed test spawns its own processes with the gloo backend; they meet
through a rendezvous file (no TCP port that a parallel run could take between
choosing and binding it); nothing is mocked. Worker functions live in test modules and must
be importable by the spawned interpreters (pytest puts ``tests/`` on sys.path,
and spawn hands the parent's sys.path to its children).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # A rank that finished must not tear down the group under a peer that is
        # still inside a collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Runs ``fn(rank, world, *args)`` on ``world`` gloo ranks; a failure on any rank raises here."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for attempt in (1, 2):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_entry, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as exc:
            # A rank killed by a signal (gloo occasionally aborts a process at
            # teardown on this 2-core machine) says nothing about the code under
            # test, so the run is repeated once. A failed assertion or any other
            # exception raised by a rank is ProcessRaisedException: never retried.
            if attempt == 2 or exc.signal_name is None:
                raise


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors together."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathering a DTensor's shards (test-side checking only)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
