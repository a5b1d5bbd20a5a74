"""Schedule-free Muon under FSDP2 on real gloo ranks: shared orthogonalization work, and checkpoints.

Under FSDP2 each matrix is orthogonalized by one rank only (its owner) and
every rank receives its rows of the result; the runs are compared with a
single process over the combined batch in float64 (bound 1e-9 relative).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from _dist import full, rel_diff, spawn
from test_distributed import SAVE_AT, TOTAL, _dcp_load, _dcp_state, _fsdp, batch, params, shard, train_step

import sfoptim
import sfoptim.directions.muon as muon

DTYPE = torch.float64


def normuon(ps):
    return sfoptim.MuonScheduleFree(
        ps, lr=0.02, weight_decay=0.01, normuon=True, beta_horizon=3, ns_dtype=None, warmup_steps=2
    )


def deep_model() -> nn.Module:
    """Six matrices: 9 x 5, four 9 x 9 (odd rows: uneven 5 + 4 shards), 3 x 9 (2 + 1)."""
    torch.manual_seed(0)
    widths = [5, 9, 9, 9, 9, 9, 3]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DTYPE)


def edge_model() -> nn.Module:
    """Shards of every shape: a conv kernel (3 x 4 as a matrix: 2 + 1 rows), a one-row matrix (1 + 0), a tall 3 x 1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 9), nn.Tanh(), nn.Unflatten(1, (1, 3, 3)), nn.Conv2d(1, 3, 2), nn.Flatten(),
        nn.Linear(12, 1), nn.Tanh(), nn.Linear(1, 3),
    ).to(DTYPE)


def single_process(make, steps: int) -> list[list[torch.Tensor]]:
    """Parameters and NorMuon's v after every step of one process over the whole batch."""
    model = make()
    opt = normuon(model.parameters())
    out = []
    for step in range(steps):
        train_step(model, opt, *batch(step, DTYPE))
        out.append(params(model) + [opt.state[p]["normuon_v"].clone() for p in model.parameters() if p.ndim >= 2])
    return out


def _count_worker(rank: int, world: int, steps: int) -> None:
    calls: list[tuple[int, ...]] = []
    real = muon.newton_schulz

    def counting(g, *args, **kwargs):
        calls.append(tuple(g.shape))
        return real(g, *args, **kwargs)

    muon.newton_schulz = counting
    try:
        model = _fsdp(deep_model(), world)
        opt = normuon(model.parameters())
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        expected = single_process(deep_model, steps)
        for step in range(steps):
            calls.clear()
            xb, yb = batch(step, DTYPE)
            train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
            # This rank orthogonalized whole matrices, half of them, and the ranks together each matrix once.
            assert len(calls) == len(matrices) // world, f"rank {rank} step {step}: {len(calls)} orthogonalizations"
            assert all(shape in {(9, 5), (9, 9), (3, 9)} for shape in calls), f"not whole matrices: {calls}"
            everyone: list[list[tuple[int, ...]]] = [[] for _ in range(world)]
            dist.all_gather_object(everyone, calls)
            done = sorted(shape for shapes in everyone for shape in shapes)
            assert done == sorted(tuple(p.shape) for p in matrices), f"step {step}: {everyone}"
            vs = [opt.state[p]["normuon_v"] for p in matrices]
            mine = params(model) + vs
            d = rel_diff(mine, expected[step])
            assert d <= 1e-9, f"step {step}: rel diff {d:.3g} from a single process (v included)"
            # v is kept whole on every rank: the owner's update must reach them all, bit for bit.
            flat = torch.cat([v.flatten() for v in vs])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(g, flat) for g in gathered), f"step {step}: NorMuon's v differs between ranks"
    finally:
        muon.newton_schulz = real


def test_owners_balance_the_work_deterministically():
    assert muon.assign_owners([5] * 6, 2) == [0, 1, 0, 1, 0, 1]
    # Largest first, each onto the least-loaded rank: loads 10 + 2 + 1 = 13 and 8 + 4 = 12.
    assert muon.assign_owners([1, 8, 2, 10, 4], 2) == [0, 1, 0, 0, 1]
    assert muon.assign_owners([3, 3], 4) == [0, 1]
    assert muon.orthogonalization_cost(torch.Size((3, 4))) == 3 * 12
    assert muon.orthogonalization_cost(torch.Size((8, 1, 2, 2))) == 4 * 32


def test_fsdp2_muon_splits_the_orthogonalization_across_ranks():
    spawn(_count_worker, 2, 4)


def _dcp_worker(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    def fsdp_model():
        return _fsdp(edge_model(), world)

    model = fsdp_model()
    opt = normuon(model.parameters())
    for step in range(SAVE_AT):
        xb, yb = batch(step, DTYPE)
        train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
    opt.eval()
    dcp.save(_dcp_state(model, opt), checkpoint_id=path)

    # A fresh model and optimizer resume from the checkpoint alone.
    model = fsdp_model()
    opt = normuon(model.parameters())
    _dcp_load(model, opt, path)
    assert not opt.train_mode, "the checkpoint was saved in eval mode"
    opt.train()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    expected = single_process(edge_model, TOTAL)
    for step in range(SAVE_AT, TOTAL):
        xb, yb = batch(step, DTYPE)
        train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
        mine = params(model) + [full(opt.state[p]["normuon_v"]) for p in matrices]
        d = rel_diff(mine, expected[step])
        assert d <= 1e-9, f"step {step}: resumed run is {d:.3g} off the uninterrupted one (v included)"
    assert opt.param_groups[0]["k"] == TOTAL


def test_dcp_normuon_fsdp2_save_and_resume_match_uninterrupted_run(tmp_path):
    spawn(_dcp_worker, 2, str(tmp_path / "ckpt"))
