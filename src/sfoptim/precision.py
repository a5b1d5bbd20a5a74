r"""Low-precision parameters: optimizer state in a wider dtype, stochastic rounding.

With bfloat16 parameters the schedule-free update loses most small steps: ``z``
moves by ``lr * d`` per step, which is far below half a bfloat16 ulp of a
weight of order one, so round-to-nearest leaves ``z`` (and ``y``, and so the
implied average ``x``) where it was. Two group options fix that:

``state_dtype`` (e.g. ``torch.float32``)
    For every floating parameter narrower than ``state_dtype`` the optimizer
    keeps a ``master`` copy of the parameter (``y`` in train mode, ``x`` in eval
    mode) and all its state (``z``, Adam's moments) in ``state_dtype``. Every
    update, and every :meth:`train`/:meth:`eval` switch, is computed on the
    master and then written to the parameter, so the optimizer's arithmetic is
    exactly that of a ``state_dtype`` run fed with gradients computed at the
    rounded weights. Memory per parameter element with ``torch.float32`` and
    bfloat16 parameters: 2 bytes (parameter) + 4 (master) + 4 (``z``) + 4 per
    moment buffer; AdamW: 14 bytes, against 12 for a float32 run and 6 for
    plain bfloat16. Activations and gradients stay in bfloat16.
    Parameters at least as wide as ``state_dtype`` are unaffected.

``stochastic_rounding`` (bool)
    The write of the master into the narrower parameter rounds up or down at
    random, with probability proportional to the distance, so the weights the
    model computes with equal the master in expectation. Without
    ``state_dtype``, bfloat16 and float16 parameters keep ``y``, ``z`` and
    their buffers in 16 bits; the fused CPU kernel computes their update in
    float32 and, with this option, rounds every stored value stochastically
    (the foreach path, and the kernel without it, round to nearest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_state_precision",
    "grads_are_finite",
    "master_dtype",
    "restore_wide_state",
    "state_precision",
    "stochastic_round_",
    "write_params",
    "z_dtype",
]

#: The values of ``state_precision`` (see docs/precision.md and :mod:`sfoptim.backends.lowbit`).
STATE_PRECISIONS = ("full", "bf16", "8bit")

# Narrow float dtype -> the integer dtype of the same width, for bit-level rounding.
_FLOAT32_TO: dict[torch.dtype, int] = {torch.bfloat16: 16}


def _local(t: Tensor) -> Tensor:
    # DTensor shards are rounded where they live: the operation is elementwise,
    # so each rank rounding its own shard is the same as rounding the whole.
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def master_dtype(group: dict, p: Tensor) -> torch.dtype | None:
    """The dtype of ``p``'s master copy and state, or None when it needs none.

    A master exists only for real floating parameters strictly narrower than the
    group's ``state_dtype``; everything else keeps state in its own dtype.
    """
    wide = group.get("state_dtype")
    if wide is None or not p.is_floating_point() or p.dtype == wide:
        return None
    if torch.finfo(p.dtype).bits >= torch.finfo(wide).bits:
        return None
    return wide


def state_precision(group: dict) -> str:
    """The group's ``state_precision`` ("full" where the optimizer has no such option)."""
    return group.get("state_precision", "full") or "full"


def z_dtype(group: dict, p: Tensor) -> torch.dtype | None:
    """The dtype of ``z`` for ``p`` when it is not the working copy's: bfloat16 with low-bit state, else None."""
    precision = state_precision(group)
    if precision == "full":
        return None
    if not p.is_floating_point():
        raise ValueError(f"state_precision={precision!r} needs real floating parameters, not {p.dtype} ones")
    if type(p) is not Tensor and hasattr(p, "placements"):
        raise ValueError(f"state_precision={precision!r} does not support sharded (DTensor, FSDP2) parameters yet")
    return torch.bfloat16


def check_state_precision(group: dict) -> None:
    """Raises ValueError for an unknown ``state_precision`` or one combined with an option it excludes."""
    value = group.get("state_precision", "full")
    if not isinstance(value, str) or value not in STATE_PRECISIONS:
        raise ValueError(f"Invalid state_precision: {value!r} (expected one of {', '.join(map(repr, STATE_PRECISIONS))})")
    if value == "full":
        return
    if group.get("state_dtype") is not None:
        raise ValueError(
            f"Invalid state_precision: {value!r} together with state_dtype={group['state_dtype']}; the low-bit formats "
            "keep z and the second moment narrower than the parameter, state_dtype keeps them wider: choose one"
        )
    if group.get("inner_momentum", 0.0) > 0:
        raise ValueError(f"Invalid state_precision: {value!r} with inner_momentum > 0 (the low-bit formats have no exp_avg)")
    if group.get("decay_at", "y") == "z" and group.get("weight_decay", 0) != 0:
        raise ValueError(f"Invalid state_precision: {value!r} with decay_at='z' (the low-bit step decays at y)")


def check_state_dtype(value: Any) -> None:
    """Raises ValueError unless ``value`` is None or a floating torch.dtype."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"Invalid state_dtype: {value!r}; expected None or a floating torch.dtype")


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> None:
    """Writes ``src`` (float32) into ``dst`` (bfloat16), rounding stochastically.

    Each element becomes one of its two bfloat16 neighbours with probability
    proportional to the closeness, so ``E[dst] == src``. bfloat16 is the top 16
    bits of float32, so adding uniform noise below bit 16 and truncating does
    exactly that. Any other dtype pair falls back to round-to-nearest.
    """
    dst_l, src_l = _local(dst), _local(src)
    if src_l.dtype != torch.float32 or dst_l.dtype not in _FLOAT32_TO:
        dst_l.copy_(src_l)
        return
    bits = _FLOAT32_TO[dst_l.dtype]
    noise = torch.randint(0, 1 << bits, src_l.shape, dtype=torch.int32, device=src_l.device, generator=generator)
    as_int = src_l.contiguous().view(torch.int32) + noise
    # Truncation towards zero of the sign-magnitude encoding: the mask clears the
    # low bits, and the result is exactly representable in the narrow dtype.
    as_int.bitwise_and_(-(1 << bits))
    rounded = as_int.view(torch.float32)
    # Non-finite values must stay what they are (noise could turn inf into NaN).
    rounded = torch.where(torch.isfinite(src_l), rounded, src_l)
    dst_l.copy_(rounded)


def write_params(params: list[Tensor], masters: list[Tensor], stochastic: bool) -> None:
    """Copies each master into its (narrower) parameter."""
    if not params:
        return
    if stochastic:
        for p, m in zip(params, masters):
            stochastic_round_(p, m)
    else:
        torch._foreach_copy_(params, masters)


def restore_wide_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Puts back, in ``state_dtype``, the state that ``Optimizer.load_state_dict`` narrowed.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor
    to its parameter's dtype, which would round a float32 ``z`` or master to
    bfloat16 on every resume. After the base load, the state of every parameter
    that keeps a master copy (:func:`master_dtype`) is taken again from
    ``state_dict`` and converted to the group's ``state_dtype``: unrounded when
    it was saved wide, widened when it was saved narrow (by a run without
    ``state_dtype``, or by the published package), with a master made from the
    parameter when the checkpoint has none. State of any other parameter stays
    in the parameter's dtype, however it was saved: a float64 checkpoint
    resumed by a float32 model is float32 state.
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    owned = [(g, p) for g in optimizer.param_groups for p in g["params"]]
    for saved_id, (group, p) in zip(saved_ids, owned):
        wide = master_dtype(group, p)
        state = optimizer.state.get(p)
        if wide is None or not state:
            continue
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point() and key in state:
                state[key] = value.to(device=p.device, dtype=wide, copy=True)
        if "master" not in state:
            state["master"] = p.detach().to(wide, memory_format=torch.preserve_format, copy=True)


@torch.no_grad()
def grads_are_finite(optimizer: torch.optim.Optimizer, process_group: Any = None) -> bool:
    """True when every gradient of ``optimizer``'s parameters is finite.

    Use it to skip a step without a GradScaler: ``if grads_are_finite(opt): opt.step()``.
    Under ``torch.distributed`` (initialized) the answer is agreed across the
    ranks of ``process_group``, so that every rank skips the same steps (with
    FSDP each rank only sees its own shard of the gradients).
    """
    flags = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                g = _local(p.grad)
                flags.append(torch.isfinite(g).all())
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        bad = (~ok).to(torch.int32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=process_group)
        return bool(bad.item() == 0)
    return bool(ok)
