"""A byte-level transformer trained for one pass over Python's standard-library source.

The task of ``benchmarks/lm_stdlib.py`` (and the language-model task of
``benchmarks/precision.py``).  The text is read from the running interpreter's
standard library (the directory of ``os.__file__``); nothing is downloaded.
Files are split into training and held-out sets by a hash of their path, and
every training batch is new data (a single pass), so training and held-out loss
measure the same thing up to the file split.

Runs take a :class:`~sfoptim.experiments.methods.Method` from the method table
:func:`lm_methods`: :func:`run_once` (a run never told its stopping time,
evaluated along the way), :func:`run_decay` (warmup and cosine decay to zero at
a known horizon) and :func:`run_wsd` (warmup-stable-decay, every horizon from
one shared stable phase).  :func:`run_schedulefree` and :func:`run_cosine` are
the schedule-free AdamW and AdamW + cosine runs by their hyperparameters.  The
metric is held-out loss in nats per byte.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sfoptim
from sfoptim.experiments.methods import (
    Method,
    grid,
    hidden_matrices,
    muon_adamw,
    step_with_loss,
    untuned_schedule_free_methods,
)

__all__ = [
    "DEFAULT_METHODS", "Block", "CharLM", "LMConfig", "chunks", "factor", "heldout_loss", "lm_loss",
    "lm_methods", "load_text", "run_cosine", "run_decay", "run_once", "run_schedulefree", "run_wsd",
    "stdlib_files",
]

#: Methods run when none are named (those whose optimizer is installed).
DEFAULT_METHODS = ("sf-adamw", "adamw-cosine", "adamw-wsd", "muon-wsd", "prodigyplus", "sf-plus", "muon-sf",
                   "muon-sf-rising-beta", "muon-sf-amuse", "prodigy-sf", "prodigy-sf-algoperf")


@dataclass
class LMConfig:
    """Model, data and schedule sizes of a run (the defaults are the benchmark's)."""

    steps: int = 480
    batch: int = 16
    ctx: int = 64
    d: int = 64
    layers: int = 2
    heads: int = 4
    beta2: float = 0.99
    warmup: int = 20  # the same for every method
    decay_frac: float = 0.2  # WSD: fraction of the run spent decaying
    heldout: int = 256  # held-out windows
    seeds: int = 2  # seeds 0..seeds-1 of a benchmark run (the runs take one seed each)


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
    train: list[bytes] = []
    held: list[bytes] = []
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


# --------------------------------------------------------------------------- methods

def _in_blocks(name: str, module: nn.Module) -> bool:
    """The transformer blocks' weight matrices: the hidden ones (not the embedding or the head)."""
    return name.startswith("blocks.")


def lm_methods(cfg: LMConfig, lrs=(0.004, 0.008, 0.016, 0.032), sf_lrs=(0.008, 0.016),
               sf_betas=(0.9, 0.98), muon_sf_horizons=(None, 100, 200, 400),
               muon_sf_weight_decays=(0.1,), muon_sf_betas=(0.9,), muon_sf_powers=(1.0,)) -> dict[str, Method]:
    """The benchmark's method table, by name.

    No weight decay anywhere, beta2 = ``cfg.beta2``, ``cfg.warmup`` warmup
    steps for the tuned methods.  ``adamw-cosine``, ``adamw-wsd`` and
    ``muon-wsd`` are tuned per stopping time over ``lrs``; ``muon-wsd`` is
    ``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``, so one learning
    rate serves both parts) on the transformer blocks' weight matrices and
    AdamW on the embeddings, head, norms and biases.  ``sf-adamw`` is one run
    per (beta1, lr) in ``sf_betas`` x ``sf_lrs``, one of them chosen for all
    stopping times.  The untuned schedule-free optimizers run with their
    defaults.  Three variants: ``muon-sf-rising-beta`` is schedule-free Muon
    with AMUSE's interpolation weight rising after step 200
    (``beta_horizon=200``), the rest at its defaults; ``muon-sf-amuse`` is
    schedule-free Muon with AMUSE's weight as AMUSE sets it, starting lower
    and rising from the end of the warmup (``beta=0.6, beta_horizon="warmup",
    beta_power=0.3``: the beta of AMUSE's 124M-parameter language model, the
    rho of its CIFAR-10 run), the rest at its defaults; ``prodigy-sf-algoperf``
    is schedule-free Prodigy in the AlgoPerf submission's form (averaging
    weights ``(k+1)**0.75``, ``betas=(0.9, 0.9955)``, no growth limit on
    ``d``, no update clip).  Three single runs compare how schedule-free
    AdamW's state is stored (``state_precision``) at one configuration
    (beta1 0.9, lr 0.016): ``sf-adamw-fixed`` (float32 state, the parameters'
    dtype), ``sf-adamw-bf16state`` and ``sf-adamw-8bit``.
    ``muon-sf-tuned`` (not run by default) is
    schedule-free Muon on the grid ``lrs`` x ``muon_sf_betas`` x ``muon_sf_horizons`` (``beta_horizon``,
    None: constant beta) x ``muon_sf_powers`` (``beta_power``) x ``muon_sf_weight_decays``, the best run chosen separately for each stopping time
    as for the scheduled baselines: what tuning schedule-free Muon could give.
    """
    betas = (0.9, cfg.beta2)

    def adamw(model, c):
        return torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=betas, weight_decay=0.0)

    def muon(model, c):
        return muon_adamw(model, c["lr"], _in_blocks, betas=betas)

    def sf_adamw(model, c):
        return sfoptim.AdamWScheduleFree(model.parameters(), lr=c["lr"], betas=(c["beta1"], cfg.beta2),
                                         warmup_steps=cfg.warmup)

    def sf_adamw_precision(precision):
        def build(model, c):
            return sfoptim.AdamWScheduleFree(model.parameters(), lr=c["lr"], betas=(c["beta1"], cfg.beta2),
                                             warmup_steps=cfg.warmup, state_precision=precision)
        return build

    fixed = grid(beta1=(0.9,), lr=(0.016,))

    def sf_muon_rising_beta(model, c):
        return sfoptim.MuonScheduleFree(hidden_matrices(model, _in_blocks), beta_horizon=c["beta_horizon"])

    def sf_prodigy_algoperf(model, c):
        return sfoptim.ProdigyScheduleFree(model.parameters(), averaging="algoperf", betas=(0.9, 0.9955),
                                           d_growth=None, update_clip=None)

    def sf_muon_tuned(model, c):
        return sfoptim.MuonScheduleFree(hidden_matrices(model, _in_blocks), lr=c["lr"], beta=c["beta"],
                                        beta_horizon=c["beta_horizon"], beta_power=c["beta_power"],
                                        weight_decay=c["weight_decay"])

    tuned = grid(lr=lrs)
    table = [
        Method("sf-adamw", "SF AdamW", sf_adamw, grid(beta1=sf_betas, lr=sf_lrs), schedule_free=True),
        Method("adamw-cosine", "AdamW + cosine", adamw, tuned, schedule="cosine"),
        Method("adamw-wsd", "AdamW + WSD", adamw, tuned, schedule="wsd"),
        Method("muon-wsd", "Muon + WSD", muon, tuned, schedule="wsd"),
        *untuned_schedule_free_methods(_in_blocks),
        Method("muon-sf-rising-beta", "SF Muon, rising beta", sf_muon_rising_beta, grid(beta_horizon=(200,)),
               schedule_free=True),
        Method("prodigy-sf-algoperf", "SF Prodigy, AlgoPerf form", sf_prodigy_algoperf, schedule_free=True),
        Method("sf-adamw-fixed", "SF AdamW, float32 state", sf_adamw_precision("full"), fixed, schedule_free=True),
        Method("sf-adamw-bf16state", "SF AdamW, bfloat16 state", sf_adamw_precision("bf16"), fixed,
               schedule_free=True),
        Method("sf-adamw-8bit", "SF AdamW, 8-bit state", sf_adamw_precision("8bit"), fixed, schedule_free=True),
        Method("muon-sf-tuned", "SF Muon, tuned per stopping time", sf_muon_tuned,
               grid(lr=lrs, beta=muon_sf_betas, beta_horizon=muon_sf_horizons,
                    beta_power=muon_sf_powers, weight_decay=muon_sf_weight_decays), schedule_free=True, per_stopping_time=True),
    ]
    return {m.name: m for m in table}


# --------------------------------------------------------------------------- runs

def _model(cfg, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    # Initialised in float32, then cast: every dtype starts from the same weights.
    return CharLM(cfg.ctx, cfg.d, cfg.layers, cfg.heads).to(dtype)


def run_once(cfg: LMConfig, data, held, seed, method: Method, config, evals, tick: Callable[[], object],
             dtype=torch.float32):
    """One run of ``method`` (never told its stopping time); returns ``{step: heldout_loss}`` at ``evals``.

    Schedule-free methods are evaluated after ``optimizer.eval()``.
    """
    model = _model(cfg, seed, dtype)
    opt = method.build(model, config)
    if method.schedule_free:
        opt.train()
    out, want = {}, set(evals)
    for step in range(cfg.steps):
        loss = lm_loss(model, data[step * cfg.batch:(step + 1) * cfg.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_with_loss(opt, loss, method)
        tick()
        if step + 1 in want:
            if method.schedule_free:
                opt.eval()
            out[step + 1] = heldout_loss(model, held)
            if method.schedule_free:
                opt.train()
    return out


def run_schedulefree(cfg: LMConfig, data, held, seed, beta, lr, evals, tick: Callable[[], object],
                     dtype=torch.float32, opt_kwargs=None):
    """One schedule-free AdamW run; returns ``{step: heldout_loss}`` at ``evals``.

    ``dtype`` (the model's dtype) and ``opt_kwargs`` (extra optimizer keyword
    arguments such as ``state_dtype``) let benchmarks/precision.py run this same
    training in bfloat16.
    """
    method = Method("sf-adamw", "SF AdamW", lambda model, c: sfoptim.AdamWScheduleFree(
        model.parameters(), lr=lr, betas=(beta, cfg.beta2), warmup_steps=cfg.warmup, **(opt_kwargs or {})),
        schedule_free=True)
    return run_once(cfg, data, held, seed, method, {}, evals, tick, dtype)


def _steps(model, opt, cfg, data, base_lrs, method, horizon, start, stop, tick):
    for step in range(start, stop):
        f = factor(method.schedule, step, horizon, cfg.warmup, cfg.decay_frac)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        loss = lm_loss(model, data[step * cfg.batch:(step + 1) * cfg.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_with_loss(opt, loss, method)
        tick()


def _adamw_method(cfg, kind):
    return lm_methods(cfg)[f"adamw-{kind}"]


def run_decay(cfg, data, held, seed, method: Method, config, horizon, tick):
    """``method`` with its decay schedule ending at ``horizon``; returns held-out loss there."""
    model = _model(cfg, seed)
    opt = method.build(model, config)
    base = [g["lr"] for g in opt.param_groups]
    _steps(model, opt, cfg, data, base, method, horizon, 0, horizon, tick)
    return heldout_loss(model, held)


def run_cosine(cfg, data, held, seed, lr, horizon, tick):
    """AdamW + warmup + cosine to zero at ``horizon``; returns held-out loss there."""
    return run_decay(cfg, data, held, seed, _adamw_method(cfg, "cosine"), {"lr": lr}, horizon, tick)


def run_wsd(cfg, data, held, seed, lr_or_method, horizons, tick, config=None):
    """WSD for every horizon at once: the stable phase is shared and each
    horizon's decay is a branch from a copy of it.  This equals separate runs
    exactly because the data order depends only on the seed.

    ``lr_or_method`` is AdamW's learning rate, or a ``Method`` with schedule
    ``"wsd"`` run with ``config``.  Returns ``{horizon: heldout_loss}``.
    """
    if isinstance(lr_or_method, Method):
        method = lr_or_method
    else:
        method, config = _adamw_method(cfg, "wsd"), {"lr": lr_or_method}
    model = _model(cfg, seed)
    opt = method.build(model, config or {})
    base = [g["lr"] for g in opt.param_groups]
    out, pos = {}, 0
    for h in sorted(horizons):
        start = h - round(cfg.decay_frac * h)
        _steps(model, opt, cfg, data, base, method, h, pos, start, tick)
        pos = start
        # Copied together, the branch's optimizer state refers to the branch's parameters.
        bm, bo = copy.deepcopy((model, opt))
        _steps(bm, bo, cfg, data, base, method, h, start, h, tick)
        out[h] = heldout_loss(bm, held)
    return out
