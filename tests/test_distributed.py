"""DDP, FSDP2 and distributed checkpoints with real gloo process groups on CPU.

Every distributed run is compared with a single-process run over the combined
batch, step by step. In float64 rounding cannot hide a logic error, so the
bound there is 1e-9 relative (what is measured is ~1e-15).
"""

from __future__ import annotations

import functools

import registry
import torch
import torch.distributed as dist
import torch.nn as nn
from _dist import full, rel_diff, spawn

import sfoptim
from sfoptim import averaged_state_dict

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
GLOBAL_BATCH = 8

#: The registry's distributed entries (ScheduleFree+ has its own DDP test), and backend variants of AdamW.
CASES = {info.name: info for info in registry.select(distributed=True, needs_loss=False)}
VARIANTS = {"adamw_fused": {"fused": True}, "adamw_foreach": {"fused": False}, "adamw_loop": {"foreach": False}}
# fused=True: the one-pass kernel on plain tensors (DDP); DTensor shards fall back to foreach with a warning.
OPTIMIZERS = {name: info.make for name, info in CASES.items()}
OPTIMIZERS.update({name: functools.partial(CASES["adamw"].make, **flags) for name, flags in VARIANTS.items()})
#: Muon's entries need whole matrices: they have tests of their own below.
MUON = sorted(name for name, info in CASES.items() if info.cls is sfoptim.MuonScheduleFree)
#: Prodigy's entries are checked in test_prodigy.py, with its estimate ``d``.
PRODIGY = sorted(name for name, info in CASES.items() if issubclass(info.cls, sfoptim.ProdigyScheduleFree))
OTHERS = sorted(set(OPTIMIZERS) - set(MUON) - set(PRODIGY))


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # Odd widths give FSDP2 uneven shards (4 + 3 rows, 2 + 1 rows).
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=dtype), torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=dtype)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def train_step(model: nn.Module, opt, xb: torch.Tensor, yb: torch.Tensor) -> None:
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        return loss

    if isinstance(opt, sfoptim.engine.ClosureForm):
        opt.step(closure)
    else:
        closure()
        opt.step()


def reference_run(name: str, dtype: torch.dtype, steps: int):
    """Single process, whole batch: yields (model, opt) after every step."""
    model = make_model(dtype)
    opt = OPTIMIZERS[name](model.parameters())
    for step in range(steps):
        train_step(model, opt, *batch(step, dtype))
        yield model, opt


def params(model: nn.Module) -> list[torch.Tensor]:
    return [full(p.detach()).clone() for p in model.parameters()]


def check_mode_switch(model, opt, ref_model, ref_opt, tol: float, what: str) -> None:
    """eval() on both moves to x (equal), train() returns to y (equal)."""
    opt.eval()
    ref_opt.eval()
    d = rel_diff(params(model), params(ref_model))
    assert d <= tol, f"{what}: x differs from single process by {d:.3g}"
    opt.train()
    ref_opt.train()
    d = rel_diff(params(model), params(ref_model))
    assert d <= tol, f"{what}: y after eval/train differs by {d:.3g}"


# --------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, names: list[str], dtype_names: list[str], steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for name in names:
            ddp = DDP(make_model(dtype))
            opt = OPTIMIZERS[name](ddp.parameters())
            ref = reference_run(name, dtype, steps)
            for step in range(steps):
                xb, yb = batch(step, dtype)
                train_step(ddp, opt, shard(xb, rank, world), shard(yb, rank, world))
                ref_model, ref_opt = next(ref)
                mine = params(ddp.module)
                # Bitwise identical on every rank: all ranks step the same way.
                flat = torch.cat([p.flatten() for p in mine])
                gathered = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: ranks diverged at step {step}"
                d = rel_diff(mine, params(ref_model))
                assert d <= TOL[dtype], f"{name}/{dtype_name} step {step}: rel diff {d:.3g} vs single process"
                if step % 5 == 4:
                    check_mode_switch(ddp.module, opt, ref_model, ref_opt, TOL[dtype], f"{name}/{dtype_name}")


def test_ddp_two_ranks_match_single_process():
    spawn(_ddp_worker, 2, OTHERS, ["float64", "float32"], 10)


def test_ddp_muon_two_ranks_match_single_process():
    spawn(_ddp_worker, 2, MUON, ["float64"], 10)


# -------------------------------------------------------------------- FSDP2
def _fsdp(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_worker(rank: int, world: int, cases: list[tuple[str, str]], steps: int) -> None:
    from torch.distributed.tensor import DTensor, Shard

    worst: dict[str, float] = {}
    for name, dtype_name in cases:
        dtype = getattr(torch, dtype_name)
        model = _fsdp(make_model(dtype), world)
        opt = OPTIMIZERS[name](model.parameters())
        ref = reference_run(name, dtype, steps)
        for step in range(steps):
            xb, yb = batch(step, dtype)
            train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
            ref_model, ref_opt = next(ref)
            d = rel_diff(params(model), params(ref_model))
            worst[dtype_name] = max(worst.get(dtype_name, 0.0), d)
            assert d <= TOL[dtype], f"{name}/{dtype_name} step {step}: rel diff {d:.3g} vs single process"
            if step % 5 == 4:
                check_mode_switch(model, opt, ref_model, ref_opt, TOL[dtype], f"{name}/{dtype_name}")
        for p in model.parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),)
            z = opt.state[p]["z"]
            assert isinstance(z, DTensor) and z.placements == (Shard(0),), f"{name}: z is not a shard"
            assert z.to_local().shape == p.to_local().shape
    if rank == 0:
        print(f"FSDP2 worst relative difference per dtype: {worst}")


def test_fsdp2_two_ranks_match_single_process_every_backend():
    cases = [(n, "float64") for n in OTHERS] + [("adamw", "float32"), ("wrapper_adam", "float32")]
    spawn(_fsdp_worker, 2, cases, 15)


def test_fsdp2_muon_gathers_whole_matrices_and_matches_single_process():
    """The whole (unevenly sharded) matrices are orthogonalized, each on one rank, and every rank gets its rows."""
    spawn(_fsdp_worker, 2, [(n, "float64") for n in MUON], 10)


# --------------------------------------------------------------------- DCP
SAVE_AT, TOTAL = 6, 12


def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _dcp_load(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # Building the target dict initializes a fresh optimizer's state (torch
    # does a zero-lr step); the load then overwrites all of it.
    sd = _dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _save_sharded_worker(rank: int, world: int, path: str, x_path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dtype = torch.float64
    model = _fsdp(make_model(dtype), world)
    opt = OPTIMIZERS["adamw"](model.parameters())
    for step in range(SAVE_AT):
        xb, yb = batch(step, dtype)
        train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
    # The averaged weights alone, shard by shard, while still in train mode.
    x_sd = averaged_state_dict(model, opt)
    assert all(v.placements == (dist.tensor.Shard(0),) for v in x_sd.values())
    dcp.save(x_sd, checkpoint_id=x_path)
    opt.eval()
    dcp.save(_dcp_state(model, opt), checkpoint_id=path)


def _load_sharded_worker(rank: int, world: int, path: str) -> None:
    dtype = torch.float64
    model = _fsdp(make_model(dtype), world)
    opt = OPTIMIZERS["adamw"](model.parameters())
    _dcp_load(model, opt, path)
    assert not opt.train_mode, "the checkpoint was saved in eval mode"
    opt.train()
    ref = list(reference_run("adamw", dtype, TOTAL))
    for step in range(SAVE_AT, TOTAL):
        xb, yb = batch(step, dtype)
        train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
    ref_model, ref_opt = ref[-1]
    d = rel_diff(params(model), params(ref_model))
    assert d <= 1e-9, f"resumed on {world} ranks: rel diff {d:.3g} from the uninterrupted run"


def test_dcp_save_two_ranks_load_one_rank(tmp_path):
    import torch.distributed.checkpoint as dcp

    path, x_path = str(tmp_path / "ckpt"), str(tmp_path / "x")
    spawn(_save_sharded_worker, 2, path, x_path)

    dtype = torch.float64
    uninterrupted = reference_run("adamw", dtype, TOTAL)
    for _ in range(SAVE_AT):
        ref_model, ref_opt = next(uninterrupted)
    x_expected = [x.clone() for x in ref_opt.eval_params()]

    # The x-only checkpoint loads into a plain model.
    plain = make_model(dtype)
    x_sd = plain.state_dict()
    dcp.load(x_sd, checkpoint_id=x_path)
    assert rel_diff(list(x_sd.values()), x_expected) <= 1e-9

    # The full checkpoint resumes on one process (no process group at all).
    model = make_model(dtype)
    opt = OPTIMIZERS["adamw"](model.parameters())
    _dcp_load(model, opt, path)
    assert rel_diff(params(model), x_expected) <= 1e-9, "the model checkpoint holds x"
    opt.train()
    for step in range(SAVE_AT, TOTAL):
        train_step(model, opt, *batch(step, dtype))
        ref_model, _ = next(uninterrupted)
        d = rel_diff(params(model), params(ref_model))
        assert d <= 1e-9, f"step {step}: resumed run is {d:.3g} off the uninterrupted one"
    assert opt.param_groups[0]["k"] == TOTAL


def test_dcp_save_one_rank_load_two_ranks(tmp_path):
    import torch.distributed.checkpoint as dcp

    dtype = torch.float64
    path = str(tmp_path / "ckpt")
    model = make_model(dtype)
    opt = OPTIMIZERS["adamw"](model.parameters())
    for step in range(SAVE_AT):
        train_step(model, opt, *batch(step, dtype))
    opt.eval()
    dcp.save(_dcp_state(model, opt), checkpoint_id=path)
    spawn(_load_sharded_worker, 2, path)
