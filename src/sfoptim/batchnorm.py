"""Recompute BatchNorm running statistics at the averaged point ``x``.

BatchNorm layers accumulate running mean/variance during training, i.e. at
the points ``y`` where gradients are taken.  Evaluation happens at ``x``, a
different set of weights, so those statistics describe the wrong network
and validation numbers suffer.  :func:`recalibrate_batchnorm` fixes that by
running a few batches through the network at ``x`` and recording fresh
statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modes import (
    OptimizersArg,
    _as_optimizer_list,
    _check_model,
    _module_modes,
    _restore_module_modes,
    eval_mode,
)

__all__ = ["recalibrate_batchnorm"]

ForwardFn = Callable[[nn.Module, Any], Any]


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    # Datasets usually yield (input, target) pairs; only the input matters
    # for activation statistics.  Dicts are treated as keyword inputs, the
    # way Hugging Face models take them.
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 50,
    *,
    optimizer: OptimizersArg | None = None,
    forward: ForwardFn | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer at ``x``.

    Contract:

    * Resets the running mean/variance of every ``_BatchNorm`` layer that
      tracks running statistics (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``)
      and sets them to the plain average over the first ``num_batches``
      batches of ``batches``, computed under ``torch.no_grad()``.
    * During the pass every other module is in eval mode (dropout off), so
      the statistics are those of the network that evaluation runs.
    * The statistics are taken at whatever the parameters hold.  Pass
      ``optimizer`` to have them taken at ``x`` whatever the optimizer's
      mode (it is switched to eval for the pass and back afterwards);
      without it, call ``optimizer.eval()`` first.
    * Afterwards each module's ``training`` flag, each BatchNorm's
      ``momentum`` and the optimizer's mode are what they were before.
    * Each batch is moved to ``device`` (default: the model's device) and
      fed by ``forward(model, batch)``; the default calls ``model(**batch)``
      for a mapping, ``model(batch[0])`` for a list/tuple (an
      ``(input, target)`` pair) and ``model(batch)`` otherwise.
    * Returns the number of batches used.  A model without BatchNorm layers
      is left untouched and 0 is returned.
    * Raises :class:`ValueError` for ``num_batches`` < 1 or when
      ``batches`` yields nothing; :class:`TypeError` for a non-module or a
      non-schedule-free ``optimizer``.  On any error, including one raised
      by the forward pass, the old statistics, momenta and modes are put
      back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    if forward is None:
        forward = _default_forward
    elif not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")

    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if optimizer is not None:
        # Validate before touching any statistics: schedule-free, and
        # optimizing this model.
        _check_model(model, _as_optimizer_list(optimizer), strict=False)
    switch = (
        eval_mode(None, optimizer) if optimizer is not None else contextlib.nullcontext()
    )
    if not norms:
        return 0

    dev = torch.device(device) if device is not None else _model_device(model)
    modes = _module_modes(model)
    saved = [
        (
            m,
            m.momentum,
            m.running_mean.clone() if m.running_mean is not None else None,
            m.running_var.clone() if m.running_var is not None else None,
            m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
        )
        for m in norms
    ]
    used = 0
    ok = False
    try:
        with switch, torch.no_grad():
            model.eval()
            for m in norms:
                m.reset_running_stats()
                # momentum=None makes BatchNorm keep a cumulative average, so
                # every batch counts equally.
                m.momentum = None
                m.train()
            for batch in batches:
                forward(model, _to_device(batch, dev))
                used += 1
                # Stop before pulling another batch: a stream may be costly
                # or have side effects.
                if used >= num_batches:
                    break
        if used == 0:
            raise ValueError("batches yielded no batch; BatchNorm statistics were left as they were")
        ok = True
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if not ok:
                if mean is not None and m.running_mean is not None:
                    m.running_mean.copy_(mean)
                if var is not None and m.running_var is not None:
                    m.running_var.copy_(var)
                if count is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(count)
        _restore_module_modes(model, modes)
    return used

