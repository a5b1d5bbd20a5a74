"""Training in bfloat16 with and without sfoptim's precision options.

Two small tasks, each trained with AdamWScheduleFree in four settings:

* ``float32``: parameters and state in float32 (the target);
* ``bf16``: parameters, activations and state in bfloat16 (what the published
  package does with a bf16 model);
* ``bf16+state32``: bf16 parameters, ``state_dtype=torch.float32`` (float32
  master copy, ``z`` and second moment);
* ``bf16+state32+sr``: the same with stochastic rounding of the weight writes.

Tasks:

* ``mnist1d``: a 3-layer MLP on MNIST-1D (generated offline with the ``mnist1d``
  package); reports the final training loss at ``x`` over the whole training set.
* ``charlm``: a tiny causal transformer on the bytes of Python's standard
  library sources; reports the held-out loss (nats/byte) at ``x`` on text the
  model never trains on.

Example: ``python benchmarks/precision.py`` (both tasks, a few minutes on 2 CPU
cores) or ``python benchmarks/precision.py --task mnist1d --steps 2000``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim

CONFIGS = {
    "float32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16+state32": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
    "bf16+state32+sr": dict(dtype=torch.bfloat16, state_dtype=torch.float32, stochastic_rounding=True),
}


def make_optimizer(model: nn.Module, lr: float, warmup: int, cfg: dict) -> sfoptim.AdamWScheduleFree:
    extra = {k: cfg[k] for k in ("state_dtype", "stochastic_rounding") if k in cfg}
    return sfoptim.AdamWScheduleFree(model.parameters(), lr=lr, warmup_steps=warmup, **extra)


# ------------------------------------------------------------------ MNIST-1D
def mnist1d_data(seed: int) -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)  # generated locally; never downloads
    return {
        "x": torch.tensor(d["x"], dtype=torch.float32),
        "y": torch.tensor(d["y"], dtype=torch.long),
    }


def run_mnist1d(cfg: dict, data: dict, steps: int, lr: float, batch: int, seed: int) -> float:
    torch.manual_seed(seed)
    dtype = cfg["dtype"]
    model = nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dtype)
    opt = make_optimizer(model, lr, 0, cfg)
    x, y = data["x"].to(dtype), data["y"]
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.eval()
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x).float(), y).item()


# -------------------------------------------------------------- char-level LM
def stdlib_text(max_bytes: int) -> bytes:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        b = path.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=2)
        q, k, v = (u.view(b, t, self.heads, d // self.heads).transpose(1, 2) for u in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class CharLM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(h)))


def lm_batches(data: torch.Tensor, n: int, ctx: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - ctx - 1, (n,), generator=g)
    xb = torch.stack([data[s : s + ctx] for s in starts.tolist()])
    yb = torch.stack([data[s + 1 : s + ctx + 1] for s in starts.tolist()])
    return xb, yb


def run_charlm(cfg: dict, text: bytes, steps: int, lr: float, batch: int, seed: int, ctx: int = 64) -> float:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(0.9 * data.numel())
    train, held = data[:split], data[split:]
    torch.manual_seed(seed)
    model = CharLM(ctx=ctx).to(cfg["dtype"])
    opt = make_optimizer(model, lr, steps // 20, cfg)
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt.train()
    for _ in range(steps):
        xb, yb = lm_batches(train, batch, ctx, g)
        loss = F.cross_entropy(model(xb).float().flatten(0, 1), yb.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.eval()
    model.eval()
    # A fixed set of held-out windows, the same for every setting.
    ge = torch.Generator().manual_seed(12345)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            xb, yb = lm_batches(held, 64, ctx, ge)
            total += F.cross_entropy(model(xb).float().flatten(0, 1), yb.flatten()).item()
    return total / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["mnist1d", "charlm", "both"], default="both")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 2000 mnist1d, 300 charlm)")
    ap.add_argument("--mnist-lr", type=float, default=0.008)
    ap.add_argument("--lm-lr", type=float, default=0.003)
    ap.add_argument("--lm-bytes", type=int, default=2_000_000, help="bytes of stdlib source used (90%% train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",")]

    rows = []
    if args.task in ("mnist1d", "both"):
        data = mnist1d_data(args.seed)
        steps = args.steps or 2000
        for name in configs:
            t = time.perf_counter()
            loss = run_mnist1d(CONFIGS[name], data, steps, args.mnist_lr, 128, args.seed)
            rows.append(("mnist1d train loss", name, steps, loss, time.perf_counter() - t))
            print(f"  mnist1d {name:>16}: {loss:.6g} ({rows[-1][-1]:.0f} s)", flush=True)
    if args.task in ("charlm", "both"):
        text = stdlib_text(args.lm_bytes)
        steps = args.steps or 300
        for name in configs:
            t = time.perf_counter()
            loss = run_charlm(CONFIGS[name], text, steps, args.lm_lr, 32, args.seed)
            rows.append(("charlm held-out loss", name, steps, loss, time.perf_counter() - t))
            print(f"  charlm  {name:>16}: {loss:.6g} ({rows[-1][-1]:.0f} s)", flush=True)

    print()
    print(f"| {'metric':<22} | {'setting':<16} | {'steps':>5} | {'loss':>10} | {'vs float32':>10} | {'time':>6} |")
    print(f"|{'-' * 24}|{'-' * 18}|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    base = {m: l for m, n, _, l, _ in rows if n == "float32"}
    for metric, name, steps, loss, secs in rows:
        ratio = f"{loss / base[metric]:.3f}x" if metric in base and base[metric] > 0 else "-"
        print(f"| {metric:<22} | {name:<16} | {steps:>5} | {loss:>10.4g} | {ratio:>10} | {secs:>5.0f}s |")


if __name__ == "__main__":
    main()
