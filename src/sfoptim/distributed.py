"""Work on whole matrices of sharded (FSDP2) parameters, each on one rank.

A direction that needs whole matrices (an orthogonalization) gets FSDP2's
row shards. :func:`compute_on_owners` deals the matrices out to the ranks
(:func:`assign_owners`), gathers each one whole on its owner with one
``all_to_all``, lets the owner compute, and sends every rank its rows of the
result with a second one; :func:`row_sharded` says which tensors that layout
covers. Other layouts are gathered whole on every rank instead
(``DTensor.full_tensor()``, then :func:`shard_like`). Imports nothing from
sfoptim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Size, Tensor

__all__ = ["assign_owners", "compute_on_owners", "row_sharded", "shard_like"]


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` laid out as the DTensor ``like`` (this rank's part; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def assign_owners(costs: list[int], world: int) -> list[int]:
    """The rank that computes each matrix: by decreasing cost, each onto the least-loaded rank.

    Deterministic (ties go to the earlier matrix and to the lower rank), so
    every rank computes the same assignment without communicating.
    """
    load = [0] * world
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[j] = rank
        load[rank] += costs[j]
    return owners


def row_sharded(tensors: list[Tensor], whole: list[Tensor] | None = None) -> list[int]:
    """Indices of the tensors :func:`compute_on_owners` takes: FSDP2's layout.

    Those are DTensors sharded by rows over one and the same one-dimensional
    mesh of more than one rank. Every rank reaches the same answer from shapes
    and placements alone. With ``whole`` (per-tensor state that every rank
    keeps whole), a tensor whose state is itself sharded is left out.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    chosen = []
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor) or t.device_mesh.ndim != 1 or t.placements != (Shard(0),):
            continue
        if whole is not None and type(whole[i]) is not Tensor:
            continue
        if mesh is None and _exchanges_rank_by_rank(t.device_mesh):
            mesh = t.device_mesh
        if mesh is not None and t.device_mesh == mesh:
            chosen.append(i)
    return chosen


def _exchanges_rank_by_rank(mesh: Any) -> bool:
    """Whether the mesh has several ranks, this one among them, numbered as its process group numbers them.

    Shard ``i`` lives at mesh position ``i``, while ``all_to_all`` addresses
    ranks of the group; a mesh listing its ranks in another order is left to
    the gathering path rather than translated.
    """
    if mesh.size() < 2 or mesh.get_coordinate() is None:
        return False
    return dist.get_process_group_ranks(mesh.get_group()) == mesh.mesh.flatten().tolist()


def _flat(tensors: list[Tensor], like: Tensor) -> Tensor:
    return torch.cat(tensors) if tensors else like


def compute_on_owners(
    shards: list[Any],
    compute: Callable[[int, Tensor], Tensor],
    cost: Callable[[Size], int],
    whole: list[Tensor] | None = None,
) -> list[Tensor]:
    """``compute(j, matrix_j)`` for row-sharded matrices (:func:`row_sharded`), each on one rank; returns this rank's shards.

    The matrices are dealt out by ``cost`` of their shapes
    (:func:`assign_owners`). Two ``all_to_all`` exchanges over the shards'
    mesh: every rank sends its rows of each matrix to the matrix's owner,
    which computes on the whole matrix exactly as an unsharded step would
    (``compute`` returns a tensor of its shape); then the owner sends every
    rank its rows of the result and, with ``whole``, the state ``whole[j]``
    that every rank keeps whole and that ``compute`` may update in place.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh = shards[0].device_mesh
    pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    dtype = shards[0].dtype
    n_mat = len(shards)
    shapes = [s.shape for s in shards]
    owners = assign_owners([cost(shape) for shape in shapes], world)
    # (rows, first row) of each rank's part: torch.chunk's split, as FSDP2 and DTensor lay out Shard(0).
    rows = [[Shard.local_shard_size_and_offset(shape[0], world, r) for r in range(world)] for shape in shapes]
    row_numel = [math.prod(shape[1:]) for shape in shapes]
    local = [s.to_local() for s in shards]
    for j in range(n_mat):
        if local[j].shape[0] != rows[j][rank][0] or local[j].dtype != dtype:
            raise RuntimeError(
                f"sfoptim: rank {rank} holds a {tuple(local[j].shape)} {local[j].dtype} shard of a "
                f"{tuple(shapes[j])} matrix; expected {rows[j][rank][0]} rows (torch.chunk's split) in {dtype}"
            )
    mine = [j for j in range(n_mat) if owners[j] == rank]
    empty = local[0].new_empty(0)

    # Exchange 1: rows to their owners; what arrives is ordered by source rank, then by matrix.
    send = [[local[j].reshape(-1) for j in range(n_mat) if owners[j] == r] for r in range(world)]
    recv_sizes = [sum(rows[j][src][0] * row_numel[j] for j in mine) for src in range(world)]
    recv = empty.new_empty(sum(recv_sizes))
    send_sizes = [sum(t.numel() for t in ts) for ts in send]
    dist.all_to_all_single(recv, _flat([t for ts in send for t in ts], empty), recv_sizes, send_sizes, group=pg)
    parts: dict[int, list[Tensor]] = {j: [] for j in mine}
    at = 0
    for src in range(world):
        for j in mine:
            n = rows[j][src][0] * row_numel[j]
            parts[j].append(recv[at : at + n])
            at += n
    results = {j: compute(j, torch.cat(parts[j]).view(shapes[j])).reshape(shapes[j][0], row_numel[j]) for j in mine}

    # Exchange 2: every rank's rows of the results, and the whole state, back from the owners.
    whole_numel = [0 if whole is None else whole[j].numel() for j in range(n_mat)]
    send = [[] for _ in range(world)]
    for r in range(world):
        for j in mine:
            n, start = rows[j][r]
            send[r].append(results[j][start : start + n].reshape(-1))
            if whole is not None:
                send[r].append(whole[j].reshape(-1).to(dtype))
    recv_sizes = [
        sum(rows[j][rank][0] * row_numel[j] + whole_numel[j] for j in range(n_mat) if owners[j] == src) for src in range(world)
    ]
    recv = empty.new_empty(sum(recv_sizes))
    send_sizes = [sum(t.numel() for t in ts) for ts in send]
    dist.all_to_all_single(recv, _flat([t for ts in send for t in ts], empty), recv_sizes, send_sizes, group=pg)
    out: list[Tensor] = [empty] * n_mat
    at = 0
    for src in range(world):
        for j in range(n_mat):
            if owners[j] != src:
                continue
            n = rows[j][rank][0] * row_numel[j]
            mine_rows = recv[at : at + n].view(local[j].shape)
            at += n
            if whole is not None:
                if src != rank:
                    whole[j].copy_(recv[at : at + whole_numel[j]].view(whole[j].shape))
                at += whole_numel[j]
            out[j] = DTensor.from_local(
                mine_rows, mesh, shards[j].placements, run_check=False, shape=shapes[j], stride=shards[j].stride()
            )
    return out
