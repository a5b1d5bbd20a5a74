"""Character-level transformer, one pass over Python's standard-library source.

One schedule-free AdamW run per momentum (beta1 = 0.9 and 0.98), never told its
stopping time, is evaluated at T/8, T/4, T/2 and T and compared with AdamW +
warmup + cosine decay and AdamW + warmup-stable-decay (WSD), each with its
learning rate tuned on a grid separately for every stopping time.  The metric is
held-out loss (nats per byte) on standard-library files kept out of training.

The text is read from the running interpreter's standard library (the directory
of ``os.__file__``); nothing is downloaded or shipped.  Every batch is new data
(a single pass), so training and held-out loss measure the same thing up to the
file split.

Example:
  python benchmarks/lm_stdlib.py --out out/lm           # the documented run
  python benchmarks/lm_stdlib.py --steps 200 --seeds 1  # smoke test
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


# --------------------------------------------------------------------------- data

def stdlib_files():
    """Sorted ``.py`` files of this interpreter's standard library (no site-packages)."""
    root = Path(os.__file__).resolve().parent
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append((rel, p))
    return files


def load_text(heldout_every: int = 10):
    """Byte streams ``(train, heldout)``: a file is held out by a hash of its path.

    Splitting by file (not by position) keeps near-duplicate neighbouring text
    from leaking into the held-out set.
    """
    train, held = [], []
    for rel, p in stdlib_files():
        try:
            data = p.read_bytes()
        except OSError:
            continue
        h = int(hashlib.sha1(rel.encode()).hexdigest(), 16)
        (held if h % heldout_every == 0 else train).append(data)
    return train, held


def chunks(files, ctx: int, seed: int):
    """All non-overlapping ``ctx + 1``-byte windows of the files, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=g).tolist()
    stream = b"\n".join(files[i] for i in order)
    t = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    n = len(t) // (ctx + 1)
    t = t[: n * (ctx + 1)].view(n, ctx + 1).long()
    # Shuffle windows so every stretch of training sees a mix of modules rather
    # than, say, all of ``email`` at the end of the run.
    return t[torch.randperm(n, generator=g)]


# --------------------------------------------------------------------------- model

class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """A small pre-LayerNorm GPT-style byte-level language model."""

    def __init__(self, ctx, d=128, layers=2, heads=4, vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model, batch):
    """Next-byte cross-entropy of ``model`` on windows ``batch`` (B, ctx + 1)."""
    # The loss is taken in float32 whatever the model's dtype (a no-op for a
    # float32 model; benchmarks/precision.py trains this model in bfloat16).
    logits = model(batch[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, held, bs=64):
    """Mean next-byte loss over the held-out windows."""
    model.eval()
    tot = sum(lm_loss(model, held[i:i + bs]).item() * len(held[i:i + bs]) for i in range(0, len(held), bs))
    model.train()
    return tot / len(held)


# --------------------------------------------------------------------------- schedules

def factor(kind, step, horizon, warmup, decay_frac):
    """LR multiplier at 0-based ``step``: linear warmup, then cosine or WSD."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        p = min(1.0, (step - warmup + 1) / max(1, horizon - warmup))
        return 0.5 * (1 + math.cos(math.pi * p))
    if kind == "wsd":
        start = horizon - round(decay_frac * horizon)
        if step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start + 1) / (horizon - start))
    raise ValueError(kind)


# --------------------------------------------------------------------------- runs

def _model(a, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    # Initialised in float32, then cast: every dtype starts from the same weights.
    return CharLM(a.ctx, a.d, a.layers, a.heads).to(dtype)


def run_schedulefree(a, data, held, seed, beta, lr, evals, tick, dtype=torch.float32, opt_kwargs=None):
    """One schedule-free run; returns ``{step: heldout_loss}`` at ``evals``.

    ``dtype`` (the model's dtype) and ``opt_kwargs`` (extra optimizer keyword
    arguments such as ``state_dtype``) let benchmarks/precision.py run this same
    training in bfloat16; the defaults are this benchmark's float32 run.
    """
    model = _model(a, seed, dtype)
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=lr, betas=(beta, a.beta2),
                                    warmup_steps=a.warmup, **(opt_kwargs or {}))
    opt.train()
    out, want = {}, set(evals)
    for step in range(a.steps):
        loss = lm_loss(model, data[step * a.batch:(step + 1) * a.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()
        if step + 1 in want:
            opt.eval()
            out[step + 1] = heldout_loss(model, held)
            opt.train()
    return out


def _steps(model, opt, a, data, lr, kind, horizon, start, stop, tick):
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = lr * factor(kind, step, horizon, a.warmup, a.decay_frac)
        loss = lm_loss(model, data[step * a.batch:(step + 1) * a.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()


def _adamw(model, a, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, a.beta2), weight_decay=0.0)


def run_cosine(a, data, held, seed, lr, horizon, tick):
    """AdamW + warmup + cosine to zero at ``horizon``; returns held-out loss there."""
    model = _model(a, seed)
    opt = _adamw(model, a, lr)
    _steps(model, opt, a, data, lr, "cosine", horizon, 0, horizon, tick)
    return heldout_loss(model, held)


def run_wsd(a, data, held, seed, lr, horizons, tick):
    """WSD for every horizon at once: the stable phase is shared and each
    horizon's decay is a branch from a copy of it.  This equals separate runs
    exactly because the data order depends only on the seed."""
    model = _model(a, seed)
    opt = _adamw(model, a, lr)
    out, pos = {}, 0
    for h in sorted(horizons):
        start = h - round(a.decay_frac * h)
        _steps(model, opt, a, data, lr, "wsd", h, pos, start, tick)
        pos = start
        bm, bo = copy.deepcopy(model), None
        bo = _adamw(bm, a, lr)
        bo.load_state_dict(opt.state_dict())
        _steps(bm, bo, a, data, lr, "wsd", h, start, h, tick)
        out[h] = heldout_loss(bm, held)
    return out


# --------------------------------------------------------------------------- report

def ms(v):
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def build_parser():
    """The command-line options; ``build_parser().parse_args([])`` gives the defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=480, help="horizon T")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--warmup", type=int, default=20, help="warmup steps, the same for every method")
    p.add_argument("--decay-frac", type=float, default=0.2, help="WSD: fraction of the run spent decaying")
    p.add_argument("--sf-lr", type=float, nargs="+", default=[0.008, 0.016],
                   help="one schedule-free run per value (each is never told its stopping time)")
    p.add_argument("--sf-betas", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--grid", type=float, nargs="+", default=[0.004, 0.008, 0.016, 0.032])
    p.add_argument("--heldout", type=int, default=256, help="held-out windows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/lm")
    return p


def main(argv=None):
    """Run the benchmark and write results.json, results.md and lm.png to --out."""
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)

    train_files, held_files = load_text()
    held = chunks(held_files, a.ctx, 12345)[: a.heldout]
    horizons = [round(a.steps * f) for f in FRACTIONS]
    curve = sorted({round(a.steps * i / 24) for i in range(1, 25)} | set(horizons))
    total = a.seeds * (
        len(a.sf_betas) * len(a.sf_lr) * a.steps + len(a.grid) * (sum(horizons) + a.steps + sum(round(a.decay_frac * h) for h in horizons) - round(a.decay_frac * a.steps)))
    need = a.steps * a.batch
    print(f"stdlib: {sum(map(len, train_files)) / 1e6:.1f} MB train, {sum(map(len, held_files)) / 1e6:.1f} MB "
          f"held-out; one pass uses {need * (a.ctx + 1) / 1e6:.1f} MB", file=sys.stderr)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="step", file=sys.stderr)
        tick = lambda: bar.update(1)  # noqa: E731
    except ImportError:
        bar, tick = None, (lambda: None)

    t0 = time.perf_counter()
    sfk = [(b, lr) for b in a.sf_betas for lr in a.sf_lr]
    name = lambda k: f"sf{k[0]}@{k[1]:g}"  # noqa: E731
    res = {"sf": {k: {} for k in sfk}, "cosine": {}, "wsd": {}}
    for seed in range(a.seeds):
        data = chunks(train_files, a.ctx, seed)
        if len(data) < need:
            raise SystemExit(f"only {len(data)} windows of text for {need} needed: lower --steps/--batch")
        data = data[:need]
        for k in sfk:
            res["sf"][k][seed] = run_schedulefree(a, data, held, seed, k[0], k[1], curve, tick)
        for lr in a.grid:
            for h in horizons:
                res["cosine"].setdefault(lr, {}).setdefault(h, {})[seed] = run_cosine(a, data, held, seed, lr, h, tick)
            for h, v in run_wsd(a, data, held, seed, lr, horizons, tick).items():
                res["wsd"].setdefault(lr, {}).setdefault(h, {})[seed] = v
    if bar:
        bar.close()
    seeds = range(a.seeds)

    rows = []
    for h in horizons:
        row = {"steps": h, "tokens": h * a.batch * a.ctx}
        for k in sfk:
            row[name(k)] = ms([res["sf"][k][s][h] for s in seeds])
        for kind in ("cosine", "wsd"):
            best = min(a.grid, key=lambda lr: statistics.fmean(res[kind][lr][h][s] for s in seeds))
            row[kind] = {"lr": best, "edge": best in (min(a.grid), max(a.grid)),
                         "loss": ms([res[kind][best][h][s] for s in seeds]),
                         "grid": {str(lr): statistics.fmean(res[kind][lr][h][s] for s in seeds) for lr in a.grid}}
        for k in sfk:
            row[f"ratio_{name(k)}_cosine"] = row[name(k)][0] / row["cosine"]["loss"][0]
        rows.append(row)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "seconds": time.perf_counter() - t0, "torch": torch.__version__,
              "python": sys.version.split()[0], "rows": rows,
              "sf_curve": {name(k): {"steps": curve, "loss": [[res["sf"][k][s][t] for t in curve] for s in seeds]}
                           for k in sfk}}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    f = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"  # noqa: E731
    head = ["steps", "tokens"] + [f"SF β={k[0]} lr {k[1]:g}" for k in sfk] + ["tuned cosine (lr)", "tuned WSD (lr)"] + \
           [f"SF β={k[0]} lr {k[1]:g} / cosine" for k in sfk]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["steps"]), f"{r['tokens'] / 1e6:.2f}M"] + [f(r[name(k)]) for k in sfk]
        for kind in ("cosine", "wsd"):
            cells.append(f"{f(r[kind]['loss'])} ({r[kind]['lr']:g}{'*' if r[kind]['edge'] else ''})")
        cells += [f"{r[f'ratio_{name(k)}_cosine']:.3f}" for k in sfk]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"Held-out loss (nats/byte), mean ± sd over {a.seeds} seeds; * = best lr on the grid's edge.\n\n"
        f"Command: python benchmarks/lm_stdlib.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n"
        + table + "\n")
    print(table)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return result
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sfk):
        c = result["sf_curve"][name(k)]
        ax.plot([t * a.batch * a.ctx for t in curve], [statistics.fmean(v) for v in zip(*c["loss"])],
                color=("C0", "C1", "C4", "C5", "C6", "C7")[i % 6], lw=2,
                label=f"schedule-free AdamW β={k[0]}, lr {k[1]:g}: one run")
    toks = [r["tokens"] for r in rows]
    for kind, color, marker in (("cosine", "C3", "o"), ("wsd", "C2", "s")):
        ax.errorbar(toks, [r[kind]["loss"][0] for r in rows], yerr=[r[kind]["loss"][1] for r in rows],
                    color=color, marker=marker, ls="--", capsize=3, label=f"{kind}, lr tuned per stopping time")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("held-out loss (nats/byte)")
    lo = min(min(r["cosine"]["loss"][0], r["wsd"]["loss"][0]) for r in rows)
    ax.set_ylim(lo * 0.95, max(r["cosine"]["loss"][0] for r in rows) * 1.25)
    ax.set_title(f"Byte-level transformer on the Python stdlib, one pass ({a.seeds} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm.png", dpi=110)
    return result


if __name__ == "__main__":
    main()
