"""Schedule-free training with DDP or FSDP2, and distributed checkpoints.

Trains a 3-layer MLP on MNIST-1D (generated locally by the ``mnist1d``
package; random data if it is not installed) with ``AdamWScheduleFree``.

Run on CPU with 2 processes started by the script itself::

    python examples/distributed.py --mode ddp
    python examples/distributed.py --mode fsdp --checkpoint /tmp/sf_ckpt

or under ``torchrun`` (one process per GPU, NCCL)::

    torchrun --nproc-per-node 8 examples/distributed.py --mode fsdp

The pattern to copy:

1. wrap the model (``DistributedDataParallel`` or ``fully_shard``) *before*
   creating the optimizer, so that it sees the wrapped (sharded) parameters;
2. ``opt.train()`` with ``model.train()``, ``opt.eval()`` with ``model.eval()``;
3. save in eval mode (the model state then holds the averaged weights ``x``)
   with ``get_model_state_dict``/``get_optimizer_state_dict`` and
   ``torch.distributed.checkpoint``; resume with a fresh optimizer in train
   mode, load, then ``opt.train()``;
4. to export only ``x`` without switching modes or gathering,
   ``sfoptim.averaged_state_dict(model, opt)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import sfoptim
from sfoptim import averaged_state_dict


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)
        return torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4000, 40, generator=g), torch.randint(0, 10, (4000,), generator=g)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model.to(device))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model.to(device), mesh=mesh)


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    x, y = load_data()
    model = wrap(make_model(), args.mode, device)
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=args.lr, warmup_steps=50)

    if args.checkpoint and os.path.exists(args.checkpoint):
        # A fresh optimizer in train mode; the load restores mode, step count and state.
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=args.checkpoint)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        if rank == 0:
            print(f"resumed at step {opt.param_groups[0]['k']}")

    g = torch.Generator().manual_seed(1234 + opt.param_groups[0]["k"])
    per_rank = args.batch // world
    model.train()
    opt.train()
    for step in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)  # same on every rank...
        idx = idx[rank * per_rank : (rank + 1) * per_rank]  # ...each rank takes its slice
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and step % 200 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}")

    model.eval()
    opt.eval()  # parameters (shards) now hold the averaged weights x
    with torch.no_grad():
        full_loss = F.cross_entropy(model(x.to(device)), y.to(device))
    if rank == 0:
        print(f"training loss at x: {full_loss.item():.5f}")

    if args.checkpoint:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=args.checkpoint)
        # Only x, written shard by shard (could equally be done in train mode).
        dcp.save(averaged_state_dict(model, opt), checkpoint_id=args.checkpoint + "_x")
        if rank == 0:
            print(f"saved {args.checkpoint} (model x + optimizer) and {args.checkpoint}_x (x only)")


def _spawned(rank: int, world: int, rendezvous: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        train(rank, world, args)
        # A rank that is done must not tear the group down under a peer still
        # inside a collective (gloo aborts the process then).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["ddp", "fsdp"], default="fsdp")
    ap.add_argument("--world", type=int, default=2, help="processes to start when not under torchrun")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--lr", type=float, default=0.008)
    ap.add_argument("--checkpoint", default=None, help="DCP directory: resume from it if present, save to it at the end")
    args = ap.parse_args()

    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    # The local processes meet through a file, so no TCP port can be taken
    # by someone else between choosing it and binding it.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(args.world, os.path.join(tmp, "rendezvous"), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
