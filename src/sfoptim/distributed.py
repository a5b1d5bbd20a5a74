"""Helpers for schedule-free training under ``torch.distributed`` (DDP, FSDP2, DCP).

The optimizers themselves need nothing special: under DDP every rank holds
whole, identical parameters and steps them identically; under FSDP2
(``fully_shard``) parameters are DTensor shards and the engine's foreach
arithmetic, mode switching and state creation run on the shards (the state
``z``, moments and ``state_dtype`` masters are DTensors with the parameter's
placement). Everything here is optional convenience.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .engine import ScheduleFreeOptimizer

__all__ = ["averaged_state_dict"]


@torch.no_grad()
def averaged_state_dict(model: torch.nn.Module, optimizer: ScheduleFreeOptimizer) -> dict[str, Any]:
    """``model.state_dict()`` with every optimized parameter replaced by its average ``x``.

    Nothing is moved or gathered: under FSDP2 each entry is a DTensor shard
    computed on the rank that owns it, so the result can go straight to
    ``torch.distributed.checkpoint.save`` and every rank writes only its shard.
    Works in either mode and changes neither the parameters nor the state.
    ``x`` is returned in each parameter's dtype (with ``state_dtype`` it is
    computed from the wide master, then rounded to nearest once).

    Buffers and parameters the optimizer does not own are the live values.
    Keys are those of ``model.state_dict()`` (tied parameters appear under
    every name they have there).
    """
    x_by_id: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        in_train = group[optimizer.group_key("train_mode")]
        for p in group["params"]:
            x_by_id[id(p)] = optimizer._x_of(group, p, in_train).to(p.dtype)
    names_by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), []).append(name)
    sd = model.state_dict()
    for pid, names in names_by_id.items():
        if pid not in x_by_id:
            continue
        for name in names:
            if name in sd:
                sd[name] = x_by_id[pid]
    return sd
