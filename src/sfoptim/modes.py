"""Mode helpers: keep the weights you evaluate and save at ``x``.

A schedule-free optimizer keeps two points per parameter.  While training,
the live parameters hold ``y`` (where gradients are taken); for evaluation
and checkpoints they must hold the average ``x``.  The helpers here make the
right point easy to get without having to remember where to call
``optimizer.train()`` / ``optimizer.eval()``:

* :func:`averaged_state_dict` -- ``model.state_dict()`` with ``x`` in it,
  computed without touching the live parameters.
* :func:`eval_optimizer_state_dict` -- the optimizer's state dict as it
  is in eval mode, to save next to :func:`averaged_state_dict`.
* :func:`eval_mode` -- a context manager that evaluates at ``x`` and puts
  model and optimizer back into their previous modes on exit.
* :func:`tie_mode` -- make ``model.train()`` / ``model.eval()`` switch the
  optimizer too.

All of them accept an optimizer that a framework has wrapped (Accelerate's
``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the wrapped
schedule-free optimizer is found by following ``.optimizer`` /
``._optimizer``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .engine import ScheduleFreeOptimizer

__all__ = [
    "averaged_state_dict",
    "eval_optimizer_state_dict",
    "eval_mode",
    "tie_mode",
    "TiedMode",
    "unwrap_optimizer",
]

OptimizerLike = torch.optim.Optimizer | Any
OptimizersArg = OptimizerLike | Sequence[OptimizerLike]

# Attribute names under which frameworks keep the optimizer they wrap:
# Accelerate (AcceleratedOptimizer.optimizer), Lightning
# (LightningOptimizer._optimizer), DeepSpeed (.optimizer).
_WRAPPER_ATTRS = ("optimizer", "_optimizer")
# Cap on how deep we follow wrappers, so a self-referencing object cannot
# loop forever.
_MAX_UNWRAP = 8


def unwrap_optimizer(optimizer: OptimizerLike) -> Any:
    """Return the schedule-free optimizer inside ``optimizer``.

    Contract: ``optimizer`` itself is returned when it is a
    :class:`sfoptim.ScheduleFreeOptimizer`; otherwise framework wrappers are
    followed through their ``optimizer`` / ``_optimizer`` attribute (up to 8
    levels).  Raises :class:`TypeError`, naming the type that was given, when
    no schedule-free optimizer is found.  Never changes anything.
    """
    base = ScheduleFreeOptimizer
    current = optimizer
    for _ in range(_MAX_UNWRAP):
        if isinstance(current, base):
            return current
        inner = None
        for attr in _WRAPPER_ATTRS:
            # getattr on the instance dict / properties only; a missing
            # attribute just means "not a wrapper of this kind".
            candidate = getattr(current, attr, None)
            if candidate is not None and candidate is not current:
                inner = candidate
                break
        if inner is None:
            break
        current = inner
    raise TypeError(
        "expected a schedule-free optimizer (an sfoptim.ScheduleFreeOptimizer, "
        f"possibly wrapped by Accelerate or Lightning), got {type(optimizer).__name__}"
    )


def _as_optimizer_list(optimizers: OptimizersArg) -> list[Any]:
    if isinstance(optimizers, (list, tuple)):
        if not optimizers:
            raise ValueError("expected at least one schedule-free optimizer, got an empty sequence")
        found = [unwrap_optimizer(o) for o in optimizers]
    else:
        found = [unwrap_optimizer(optimizers)]
    # The same optimizer twice would make mode restoration ambiguous.
    unique: list[Any] = []
    for opt in found:
        if not any(opt is u for u in unique):
            unique.append(opt)
    return unique


def _optimizer_params(opt: Any) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _check_model(model: nn.Module, optimizers: list[Any], *, strict: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    optimized = {id(p) for opt in optimizers for p in _optimizer_params(opt)}
    params = list(model.named_parameters())
    if not params:
        raise ValueError(f"model {type(model).__name__} has no parameters")
    inside = [n for n, p in params if id(p) in optimized]
    if not inside:
        raise ValueError(
            f"none of the parameters of {type(model).__name__} are optimized by the given "
            "optimizer(s); pass the optimizer that was built from this model's parameters"
        )
    if strict:
        missing = [n for n, p in params if p.requires_grad and id(p) not in optimized]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"{len(missing)} trainable parameter(s) of {type(model).__name__} are not in the "
                f"optimizer(s): {shown}; pass every optimizer of the model, or strict=False"
            )


def _x_by_param(optimizers: list[Any]) -> dict[int, torch.Tensor]:
    xs: dict[int, torch.Tensor] = {}
    for opt in optimizers:
        params = _optimizer_params(opt)
        values = opt.eval_params()
        if len(values) != len(params):
            raise RuntimeError(
                f"{type(opt).__name__}.eval_params() returned {len(values)} tensors for "
                f"{len(params)} parameters"
            )
        for p, x in zip(params, values):
            # With state_dtype, x comes from the wide master; a state dict keeps
            # the parameter's own dtype, so it loads into the same model.
            xs[id(p)] = x.detach().to(p.dtype)
    return xs


def averaged_state_dict(
    model: nn.Module, optimizer: OptimizersArg, *, strict: bool = True
) -> dict[str, Any]:
    """Return ``model.state_dict()`` with every optimized parameter at ``x``.

    Contract:

    * Works whatever mode the optimizer is in, before or after the first
      step, and never changes the model, its parameters or the optimizer.
    * Entries of parameters in the optimizer(s) are new tensors holding ``x``
      (``optimizer.eval_params()``); every other entry (buffers, frozen
      parameters) is exactly what ``model.state_dict()`` returns.  Tied
      parameters (one ``Parameter`` under several names) map to one tensor,
      so savers that deduplicate shared storage still see them as tied.
    * ``optimizer`` may be one optimizer, a wrapper around one (Accelerate,
      Lightning), or a sequence of them (a model trained by several).
    * Raises :class:`TypeError` when an optimizer is not schedule-free or
      ``model`` is not a module, and :class:`ValueError` when none of the
      model's parameters are optimized, or -- with ``strict=True`` -- when
      some trainable parameter is in none of the optimizers.
    """
    optimizers = _as_optimizer_list(optimizer)
    _check_model(model, optimizers, strict=strict)
    xs = _x_by_param(optimizers)

    # keep_vars=True hands back the Parameter objects themselves, so the
    # entries can be matched by identity whatever prefixes or names the
    # module's state_dict uses.
    raw = model.state_dict(keep_vars=True)
    result: dict[str, Any] = type(raw)()
    if hasattr(raw, "_metadata"):
        result._metadata = raw._metadata  # type: ignore[attr-defined]
    replaced: set[int] = set()
    for key, value in raw.items():
        if isinstance(value, torch.Tensor) and id(value) in xs:
            result[key] = xs[id(value)]
            replaced.add(id(value))
        elif isinstance(value, torch.Tensor):
            result[key] = value.detach()
        else:
            result[key] = value
    unmatched = [
        n for n, p in model.named_parameters() if id(p) in xs and id(p) not in replaced
    ]
    if unmatched:
        # A custom state_dict hook replaced parameters by other tensors; we
        # cannot tell which entry holds which parameter any more.
        raise RuntimeError(
            f"could not find parameter(s) {', '.join(unmatched[:5])} in "
            f"{type(model).__name__}.state_dict(keep_vars=True); a state_dict hook "
            "changes them, so the averaged weights cannot be placed"
        )
    return result


def _mode_key(opt: Any) -> str:
    # The wrapper prefixes its group keys ("sf_train_mode") so they cannot
    # clash with the base optimizer's; the engine knows the spelling.
    return opt.group_key("train_mode")


def eval_optimizer_state_dict(optimizer: OptimizerLike) -> dict[str, Any]:
    """Return ``optimizer.state_dict()`` as it would read in eval mode.

    Contract:

    * The per-parameter state and the averaging scalars do not depend on the
      mode; only the mode flag recorded in each param group does.  This
      returns ``optimizer.state_dict()`` with that flag set to eval in every
      group (the base optimizer's groups too, for the wrapper), without
      switching or otherwise changing the optimizer.
    * Saved together with :func:`averaged_state_dict` it makes a consistent
      checkpoint: parameters at ``x`` and an optimizer that knows they are at
      ``x``.  After loading both, ``optimizer.train()`` moves the parameters
      to ``y`` and training continues where it was.
    * Raises :class:`TypeError` when the optimizer is not schedule-free.
    """
    opt = unwrap_optimizer(optimizer)
    # state_dict() builds fresh group dicts, so editing them cannot reach
    # the live optimizer.
    return _mark_eval(opt.state_dict(), opt)


def _mark_eval(sd: dict[str, Any], opt: Any) -> dict[str, Any]:
    # Sets the mode flag to eval in a state dict produced by opt.state_dict()
    # (or a framework's copy of one), in place; returns it.
    key = _mode_key(opt)
    for group in sd.get("param_groups", []):
        if key in group:
            group[key] = False
    base = sd.get("base")
    if isinstance(base, dict):
        for group in base.get("param_groups", []):
            if key in group:
                group[key] = False
    return sd


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_module_modes(model: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    # model.train(flag) first so that a tied optimizer follows, then the
    # per-submodule flags, because a model may mix modes (e.g. a frozen
    # BatchNorm kept in eval while the rest trains).
    model.train(modes[0][1])
    for module, flag in modes:
        module.training = flag


@contextlib.contextmanager
def eval_mode(
    model: nn.Module | None, optimizer: OptimizersArg, *, strict: bool = True
) -> Iterator[None]:
    """Evaluate at ``x``: a context manager that switches model and optimizer.

    Contract:

    * On entry the optimizer(s) go to eval mode (parameters hold ``x``) and,
      if ``model`` is given, ``model.eval()`` is called.
    * On exit -- normal or by exception -- each optimizer gets back the mode
      it had on entry, and every submodule of ``model`` gets back its own
      ``training`` flag.  The exception propagates.
    * Arguments are checked before anything changes: :class:`TypeError` for
      an optimizer that is not schedule-free, :class:`ValueError` for a model
      whose parameters are not in the optimizer(s) (see
      :func:`averaged_state_dict` for ``strict``).  Pass ``model=None`` to
      switch the optimizer(s) only.
    * Gradient tracking is left alone; wrap the body in ``torch.no_grad()``
      as usual.
    """
    optimizers = _as_optimizer_list(optimizer)
    if model is not None:
        _check_model(model, optimizers, strict=strict)
        modes = _module_modes(model)
    previous = [opt.train_mode for opt in optimizers]
    try:
        for opt in optimizers:
            opt.eval()
        if model is not None:
            model.eval()
        yield
    finally:
        if model is not None:
            _restore_module_modes(model, modes)
        # Optimizers last: a tie_mode hook on the model may have switched
        # them while the model's flags were being restored.
        for opt, was_training in zip(optimizers, previous):
            if was_training:
                opt.train()
            else:
                opt.eval()


# Instance attribute that holds the optimizers tied to a module.
_TIED_ATTR = "_sfoptim_tied_optimizers"


def _tied_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Bound onto tied modules in place of nn.Module.train; nn.Module.eval()
    # calls self.train(False), so eval() is covered as well.
    result = type(self).train(self, mode)
    for opt in self.__dict__.get(_TIED_ATTR, ()):
        if mode:
            opt.train()
        else:
            opt.eval()
    return result


class TiedMode:
    """Handle returned by :func:`tie_mode`; ``remove()`` undoes the tie.

    Also a context manager: the tie is removed on exit.
    """

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self._model = model
        self._optimizer = optimizer
        self._active = True

    @property
    def active(self) -> bool:
        """Whether the tie is still in place."""
        return self._active

    def remove(self) -> None:
        """Untie: ``model.train()``/``eval()`` stop switching the optimizer.

        Idempotent.  Leaves both modes as they are.
        """
        if not self._active:
            return
        self._active = False
        tied: list[Any] = self._model.__dict__.get(_TIED_ATTR, [])
        tied[:] = [o for o in tied if o is not self._optimizer]
        if not tied:
            self._model.__dict__.pop(_TIED_ATTR, None)
            # Drop our bound method so the class's train() is used again.
            if isinstance(self._model.__dict__.get("train"), types.MethodType):
                del self._model.__dict__["train"]

    def __enter__(self) -> TiedMode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tie_mode(model: nn.Module, optimizer: OptimizerLike, *, strict: bool = True) -> TiedMode:
    """Make ``model.train()`` / ``model.eval()`` switch the optimizer as well.

    Contract:

    * After the call, ``model.train(True)`` also calls ``optimizer.train()``
      and ``model.train(False)`` / ``model.eval()`` also calls
      ``optimizer.eval()``, so one call does both.
    * The optimizer is put in the model's current mode right away
      (``model.training``), so the two agree from the start.
    * Several optimizers may be tied to one model (one call each); tying
      the same pair twice is a no-op that returns a new handle.
    * Returns a :class:`TiedMode` handle; ``handle.remove()`` (or leaving it
      as a context manager) unties.
    * Checks first, changes nothing on error: :class:`TypeError` when the
      optimizer is not schedule-free, :class:`ValueError` when the model's
      parameters are not in it (see :func:`averaged_state_dict`).
    * Implemented by binding a ``train`` method on the model instance; a
      module that already has an instance-level ``train`` attribute of its
      own is refused with :class:`ValueError`.
    """
    opt = _as_optimizer_list(optimizer)[0]
    _check_model(model, [opt], strict=strict)
    existing = model.__dict__.get("train")
    if existing is not None and not (
        isinstance(existing, types.MethodType) and existing.__func__ is _tied_train
    ):
        raise ValueError(
            f"{type(model).__name__} already has an instance attribute 'train'; "
            "tie_mode cannot hook it"
        )
    tied: list[Any] = model.__dict__.setdefault(_TIED_ATTR, [])
    if not any(o is opt for o in tied):
        tied.append(opt)
    # object.__setattr__ bypasses nn.Module.__setattr__, which would try to
    # treat the value as a submodule/parameter/buffer.
    object.__setattr__(model, "train", types.MethodType(_tied_train, model))
    if model.training:
        opt.train()
    else:
        opt.eval()
    return TiedMode(model, opt)
