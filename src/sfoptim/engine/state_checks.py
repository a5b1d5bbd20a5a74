"""What ``load_state_dict`` checks before it changes anything, and what it settles after.

A loaded state dict is trusted by every later step: the fused CPU kernel reads
and writes as many elements of every state buffer as its parameter has, and
the foreach path mixes nothing but equal dtypes. So a checkpoint is accepted
only when it was saved by this kind of optimizer (its param groups carry the
hyperparameters this class reads) and every state buffer has its parameter's
shape and kind of dtype (real or complex floating point). The checks run on
the state dict as given, before ``torch.optim.Optimizer.load_state_dict``
touches the optimizer, so a refused checkpoint leaves it as it was.

After the load, the optimizer's own choices that describe this machine rather
than the trajectory are put back: the backend (``foreach``, ``fused``) and the
options a checkpoint of the published ``schedulefree`` package does not carry
(``state_dtype``, ``stochastic_rounding``, ``inner_momentum``, the wrapper's
hyperparameters) keep the values this optimizer was constructed with. State is
then brought to the dtype the step expects: the parameter's, or the group's
``state_dtype`` for parameters that keep a wide master copy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import precision

__all__ = ["PUBLISHED_CLASSES", "Target", "check_load", "param_label", "settle_load"]


class Target(NamedTuple):
    """The optimizer a state dict is loaded into, as the checks see it."""

    #: The optimizer (its class, ``defaults``, ``param_groups`` and ``state``).
    optimizer: torch.optim.Optimizer
    #: The group key under which it stores an engine key (``group_key``).
    key: Callable[[str], str]
    #: The prefix of its engine keys ("" except for the wrapper).
    prefix: str
    #: The engine's bookkeeping keys (``k``, ``lr_max``, ...), filled in afresh by a load.
    schedule_keys: frozenset[str]
    #: The direction of a group (its state buffers, their shapes and dtypes).
    direction_for: Callable[[dict], Any]


def param_label(groups: list[dict], group_index: int, param_index: int, p: Tensor) -> str:
    """How messages name parameter ``param_index`` of group ``group_index`` (with its name when groups carry names)."""
    names = groups[group_index].get("param_names")
    name = f" '{names[param_index]}'" if names else ""
    return f"param_groups[{group_index}]['params'][{param_index}]{name} (shape {tuple(p.shape)})"

#: The classes that the published ``schedulefree`` package (1.4.1) has too,
#: under the same names: their checkpoints load into sfoptim's.
PUBLISHED_CLASSES = frozenset({
    "SGDScheduleFree", "SGDScheduleFreeClosure", "SGDScheduleFreeReference",
    "AdamWScheduleFree", "AdamWScheduleFreeClosure", "AdamWScheduleFreePaper", "AdamWScheduleFreeReference",
    "RAdamScheduleFree", "RAdamScheduleFreeClosure", "ScheduleFreeWrapper", "ScheduleFreeWrapperReference",
})  # fmt: skip
#: Options that sfoptim added to the published classes: a checkpoint that lacks
#: them was saved by ``schedulefree`` and gets the constructed values.
_ADDED_OPTIONS = ("state_dtype", "stochastic_rounding", "inner_momentum", "state_precision")
#: Per-parameter state that always has the parameter's shape, besides the
#: direction's own buffers: the reference forms store x and y.
_PARAMETER_SIZED = ("z", "master", "x", "y")
#: Group keys that say nothing about which class saved a checkpoint.
_NOT_IDENTIFYING = {"params", "param_names", "initial_lr"}


def _backend_keys(t: Target) -> tuple[str, ...]:
    return (t.key("foreach"), t.key("fused"))


def _fillable_keys(t: Target) -> set[str]:
    """Group keys a loadable checkpoint may lack.

    The engine's bookkeeping starts afresh (``__setstate__`` fills it in); the
    backend and the options in ``_ADDED_OPTIONS`` are taken from this
    optimizer. Keys under a non-empty prefix (the wrapper's ``sf_``) are
    sfoptim's own too: the published wrapper keeps its hyperparameters out of
    its state dict.
    """
    keys = set(t.schedule_keys) | set(_backend_keys(t)) | {t.key(n) for n in _ADDED_OPTIONS}
    if t.prefix:
        keys |= {k for k in t.optimizer.defaults if k.startswith(t.prefix)}
    return keys


def _hyperparameters(cls: type) -> set[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if n not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _candidate_classes() -> list[type]:
    """The public optimizer classes of torch.optim and sfoptim (every one defined by now)."""
    found: list[type] = []
    todo = [torch.optim.Optimizer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    public = [c for c in found if c.__module__.startswith(("sfoptim.", "torch.optim.")) and not c.__name__.startswith("_")]
    return sorted(public, key=lambda c: (c.__module__.startswith("torch"), c.__name__))


def _likely_savers(keys: set[str]) -> list[str]:
    """The optimizer classes whose hyperparameter names best match a saved group's keys."""
    scored: dict[str, float] = {}
    for cls in _candidate_classes():
        names = _hyperparameters(cls)
        if names:
            scored[cls.__name__] = len(keys & names) / len(keys | names)
    best = max(scored.values(), default=0.0)
    # Below half the names in common, any guess would mislead.
    return sorted(n for n, v in scored.items() if v == best) if best > 0.5 else []


def _required_keys(t: Target) -> set[str]:
    """The hyperparameters that every checkpoint of the target's class carries in its groups.

    Taken from the constructor (the nearest class in the MRO that names its
    arguments), not from its ``defaults``, which frameworks extend at run time.
    """
    for cls in type(t.optimizer).__mro__:
        names = _hyperparameters(cls)
        if names:
            return (names & set(t.optimizer.defaults)) - _fillable_keys(t)
    return set()


def _check_class(t: Target, saved_groups: list[dict]) -> None:
    required = _required_keys(t)
    cls = type(t.optimizer).__name__
    for gi, group in enumerate(saved_groups):
        if not isinstance(group, dict):
            raise ValueError(f"Invalid state_dict: param_groups[{gi}] is a {type(group).__name__}, not a dict")
        missing = required - group.keys()
        if not missing:
            continue
        keys = set(group) - _NOT_IDENTIFYING - set(t.schedule_keys)
        savers = [n for n in _likely_savers(keys) if n != cls]
        by = " or ".join(savers[:3]) if savers else "another optimizer"
        raise ValueError(
            f"Invalid state_dict: it was saved by {by}, not by {cls}: its param_groups[{gi}] has no "
            f"{', '.join(repr(k) for k in sorted(missing))}. Load a checkpoint saved by {cls}"
            + (" (or by schedulefree's class of the same name)." if cls in PUBLISHED_CLASSES else ".")
        )


def _kept_keys(t: Target, saved: dict, current: dict) -> dict:
    """The values of ``current`` (this optimizer's group) that the load must keep.

    The backend always; the options sfoptim added (and the wrapper's own
    hyperparameters) where the checkpoint does not have them.
    """
    backend = _backend_keys(t)
    fillable = _fillable_keys(t) - set(t.schedule_keys)
    return {k: v for k, v in current.items() if k in backend or (k in fillable and k not in saved)}


def _expected_group(t: Target, saved: dict, current: dict) -> dict:
    """The group as it will be after the load, as far as the state checks need it."""
    group = {k: v for k, v in saved.items() if k != "params"}
    group.update(_kept_keys(t, saved, current))
    return group


def _new_buffer(direction: Any, group: dict, name: str, p: Tensor, dtype: torch.dtype) -> Tensor:
    """The direction's buffer ``name`` for ``p`` with a working copy of ``dtype``, on the meta device (no memory)."""
    return direction.new_buffer(group, name, torch.empty(p.shape, dtype=dtype, device="meta"))


def _check_tensor(label: str, key: Any, value: Tensor, p: Tensor, shape: Any = None, dtype: Any = None) -> None:
    where = f"state {key!r} of {label}"
    if value.shape != (p.shape if shape is None else shape):
        raise ValueError(
            f"Invalid state_dict: {where} has shape {tuple(value.shape)}, which is not the one the parameter needs; "
            "was the checkpoint saved for another model, or with the parameters in another order?"
        )
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        # An integer buffer (the codes of 8-bit state) must come back as it was saved.
        if value.dtype != dtype:
            raise ValueError(f"Invalid state_dict: {where} has dtype {value.dtype}, but this optimizer stores it as {dtype}")
    elif not (value.is_floating_point() or value.is_complex()) or value.is_complex() != p.is_complex():
        raise ValueError(
            f"Invalid state_dict: {where} has dtype {value.dtype}, which cannot hold state of a {p.dtype} parameter"
        )
    if value.device.type == "meta":
        raise ValueError(f"Invalid state_dict: {where} is a meta tensor and holds no values")


def _describe(sizes: list[int]) -> str:
    groups = f"{len(sizes)} parameter group{'s' * (len(sizes) != 1)}"
    return f"{groups} of {' + '.join(map(str, sizes))} parameters" if sizes else groups


def _check_structure(t: Target, saved_groups: list) -> None:
    """Raises ValueError, saying which class saved it where that shows, unless the groups and their sizes match."""
    if not all(isinstance(s, dict) and isinstance(s.get("params"), (list, tuple)) for s in saved_groups):
        raise ValueError("Invalid state_dict: every param group must be a dict with a 'params' list, as state_dict() returns")
    saved = [len(s["params"]) for s in saved_groups]
    here = [len(g["params"]) for g in t.optimizer.param_groups]
    if saved == here:
        return
    cls = type(t.optimizer).__name__
    message = f"Invalid state_dict: it holds {_describe(saved)}, but this {cls} has {_describe(here)}."
    keys = set().union(*(set(s) for s in saved_groups)) - _NOT_IDENTIFYING - set(t.schedule_keys)
    savers = _likely_savers(keys) if saved_groups else []
    if savers and cls not in savers:
        message += (
            f" It was saved by {' or '.join(savers[:3])}, not by {cls}: load it into the class that saved it."
        )
    else:
        message += (
            " Build the optimizer with the same parameters in the same groups as the one that saved it"
            " (same model, same order, same add_param_group calls)."
        )
    raise ValueError(message)


def _check_precision(gi: int, saved: dict, group: dict) -> None:
    """Raises ValueError when the checkpoint's state format (``state_precision``) is not this group's.

    A checkpoint's state is loaded as it was saved, never converted: z and
    the second moment of a low-bit checkpoint have lost precision that a
    full one would claim to have, and rounding a full one down is a choice
    the user should make by building the optimizer that saved it.
    """
    ours = group.get("state_precision", "full")
    theirs = saved.get("state_precision", "full")
    if "state_precision" in group and ours != theirs:
        raise ValueError(
            f"Invalid state_dict: its param_groups[{gi}] was saved with state_precision={theirs!r}, but this "
            f"optimizer keeps state_precision={ours!r}; the state is not converted between formats. Build the "
            f"optimizer with state_precision={theirs!r} to resume from this checkpoint."
        )


def check_load(t: Target, state_dict: dict) -> None:
    """Raises ValueError unless ``state_dict`` can be loaded into ``t``; changes nothing.

    The message says what does not fit: the number of groups or parameters
    (and which class saved the checkpoint, where its keys show it), the class,
    or a parameter's state.
    """
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("Invalid state_dict: expected a dict with 'state' and 'param_groups', as state_dict() returns")
    saved_groups = state_dict["param_groups"]
    _check_structure(t, saved_groups)
    _check_class(t, saved_groups)
    saved_state = state_dict["state"]
    for gi, (saved, group) in enumerate(zip(saved_groups, t.optimizer.param_groups)):
        _check_precision(gi, saved, group)
        expected = _expected_group(t, saved, group)
        direction = t.direction_for(expected)
        own = set(direction.state_buffers(expected))
        sized = set(_PARAMETER_SIZED) | own
        for pi, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            entry = saved_state.get(saved_id)
            if entry is None:
                continue
            label = param_label(t.optimizer.param_groups, gi, pi, p)
            if not isinstance(entry, dict):
                raise ValueError(f"Invalid state_dict: the state of {label} is a {type(entry).__name__}, not a dict")
            for key, value in entry.items():
                if key in sized:
                    if not isinstance(value, Tensor):
                        raise ValueError(f"Invalid state_dict: state {key!r} of {label} is not a tensor")
                    like = _new_buffer(direction, expected, key, p, p.dtype) if key in own else None
                    _check_tensor(label, key, value, p, *((like.shape, like.dtype) if like is not None else ()))


def settle_load(t: Target, state_dict: dict, previous_groups: list[dict]) -> None:
    """After the base load: this optimizer's backend and options, and state in the step's dtypes."""
    for group, saved, previous in zip(t.optimizer.param_groups, state_dict["param_groups"], previous_groups):
        group.update(_kept_keys(t, saved, previous))
    precision.restore_wide_state(t.optimizer, state_dict)
    for group in t.optimizer.param_groups:
        direction = t.direction_for(group)
        own = set(direction.state_buffers(group))
        sized = set(_PARAMETER_SIZED) | own
        for p in group["params"]:
            state = t.optimizer.state.get(p)
            if not state:
                continue
            work = precision.master_dtype(group, p)
            if work is None:
                # Without a master in this group the parameter itself is the working
                # copy (it holds the master's rounded value already).
                state.pop("master", None)
                work = p.dtype
            narrow_z = precision.z_dtype(group, p)
            for key in sized & state.keys():
                value = state[key]
                want = _new_buffer(direction, group, key, p, work).dtype if key in own else work
                if key == "z" and narrow_z is not None:
                    want = narrow_z
                if isinstance(value, Tensor) and value.dtype != want:
                    state[key] = value.to(dtype=want)
