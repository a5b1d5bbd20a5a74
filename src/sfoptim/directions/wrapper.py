r"""Schedule-free training around any ``torch.optim.Optimizer``.

The base optimizer moves ``z`` with the gradient taken at ``y``; the wrapper
keeps the average ``x`` and the interpolation ``y = (1-\beta) z + \beta x``:

.. math::

    z_{t+1} = \mathrm{base}(z_t, g(y_t)), \quad
    x_{t+1} = \operatorname{lerp}(x_t, z_{t+1}, c_{t+1}), \quad
    y_{t+1} = \operatorname{lerp}(x_{t+1}, z_{t+1}, 1-\beta)

The wrapper's own state (``z``) lives apart from the base optimizer's, so any
base optimizer works, whatever it keeps in its state.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _validation
from ..backends import dispatch
from ..engine import ScheduleFreeOptimizer, state_checks
from ..engine.schedule import decay_coefficient
from ..engine.step import GroupStep, real, swap
from .base import DelegatedDirection

__all__ = ["BaseOptimizerDirection", "ScheduleFreeWrapper"]


class BaseOptimizerDirection(DelegatedDirection):
    r"""The direction of a wrapped optimizer ``base``: it moves ``z`` itself.

    The interpolation weight is the wrapper's ``momentum``; the learning rate
    that weights the average is the base optimizer's, times ``group["d"]``
    for D-Adaptation style optimizers. Weight decay at ``y`` is scaled by the
    group's own ``lr``, read before the move (a D-Adaptation ``d`` only
    weights the average, as in the published wrapper).
    """

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base

    def beta(self, group: dict, step: int) -> float:
        return group[ScheduleFreeWrapper.group_key("momentum")]

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        return float(group["lr"]) * float(group.get("d", 1.0))

    def move(self, plans: list[GroupStep], reduced: Mapping[str, Tensor]) -> None:
        r"""One ``base.step()`` moves a copy of ``z`` held in the parameters.

        Each parameter lends its storage to a new tensor holding ``z`` (minus
        :math:`\gamma\lambda y` for weight decay at ``y``, or
        :math:`\gamma\lambda z` with ``sf_decay_at="z"``, with this step's
        learning rate, read before the base optimizer may change it); ``y`` and
        the stored ``z`` are not touched. If the base optimizer raises, the
        parameters get their ``y`` back and the ``z`` buffers this step created
        are removed, so everything is bit for bit as before.
        """
        for p in plans:
            key, group = p.key, p.group
            created = [st for st in p.states if "z" not in st]
            for st, q in zip(p.states, p.active):
                if "z" not in st:
                    st["z"] = q.detach().clone()
            decay = group[key("weight_decay")]
            if decay != 0 and group.get(key("adamc"), False):
                lr = self.lr(group, p.step, reduced)
                decay = decay_coefficient(decay, lr, max(lr, group[key("lr_max")]), True)
            lr_decay = float(group["lr"]) * decay if decay != 0 else 0.0
            at_z = group.get(key("decay_at"), "y") == "z"
            zs = [st["z"] for st in p.states]
            if not zs:
                iterates: list[Tensor] = []
            elif lr_decay != 0:
                iterates = list(torch._foreach_sub(zs, zs if at_z else [q.data for q in p.active], alpha=lr_decay))
            else:
                iterates = [torch.clone(z, memory_format=torch.preserve_format) for z in zs]
            # Decay at z moves only the base optimizer's iterate: x comes from y and the old z as they are.
            p.moved = (iterates, created, 0.0 if at_z else lr_decay)
        for p in plans:
            for q, t in zip(p.active, p.moved[0]):
                swap(q, t)
        try:
            self.base.step()
        except BaseException:
            for p in plans:
                iterates, created, _ = p.moved
                for q, t in zip(p.active, iterates):
                    swap(q, t)
                for st in created:
                    del st["z"]
            raise

    def finish(self, plan: GroupStep, ckp1: float) -> None:
        """``x`` from ``y`` and the old ``z``, averaged with the base optimizer's new ``z``, gives the new ``y``."""
        if not plan.active:
            return
        iterates, _, lr_decay = plan.moved
        for q, t in zip(plan.active, iterates):
            swap(q, t)
        ys = [real(q.data) for q in plan.active]
        # The decay moves the old z by -lr*decay*y and y by (1-beta) of that, so x
        # stays put; the old z is replaced by the base optimizer's iterate below.
        dispatch.wrap_before(ys, [real(st["z"]) for st in plan.states], lr_decay, plan.beta_prev, plan.fused)
        dispatch.wrap_after(ys, [real(t) for t in iterates], ckp1, plan.beta, plan.fused)
        for st, t in zip(plan.states, iterates):
            st["z"] = t


class ScheduleFreeWrapper(ScheduleFreeOptimizer):
    r"""Makes any optimizer schedule-free.

    Args:
        base: the optimizer that moves ``z`` (SGD, Adam, RMSprop, Adagrad,
            ...). Its weight decay, if any, acts at ``z``. Its
            ``param_groups`` are shared with the wrapper, so an LR scheduler may
            be attached to either. Its learning rate (times ``group["d"]`` for
            D-Adaptation style optimizers) sets the averaging weights.
        weight_decay_at_y: weight decay computed at ``y`` (default 0).
        momentum: interpolation weight :math:`\beta \in (0, 1]` (default 0.9);
            the base optimizer's own momentum can usually be turned off.
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        r: polynomial weighting power of the average (default 0).
        fused: keyword-only. The wrapper's own ``x``/``y`` bookkeeping in one
            pass per tensor (CPU, float64/float32/bfloat16/float16): ``None`` (default) wherever
            it runs, ``True`` warns once where it cannot, ``False`` never. The
            base optimizer's step is its own (pass ``fused=True`` to it if it
            has one).

    The positional order is the published package's:
    ``ScheduleFreeWrapper(base, 0.1)`` sets ``weight_decay_at_y=0.1``.

    If the base optimizer's step raises, the parameters and ``z`` are left
    bit-for-bit as they were, so the step can be retried; for that the wrapper
    holds one parameter-sized temporary per stepped parameter during
    :meth:`step`. The wrapper can be copied, pickled and saved with
    ``torch.save`` together with its base optimizer.

    Example::

        base = torch.optim.RMSprop(model.parameters(), lr=2e-3)
        opt = sfoptim.ScheduleFreeWrapper(base, momentum=0.9, weight_decay_at_y=0.1)
    """

    # The wrapper's keys share the base optimizer's group dicts: prefixed.
    _key_prefix: ClassVar[str] = "sf_"
    _key_aliases: ClassVar[dict[str, str]] = {"weight_decay": "weight_decay_at_y"}
    _options: ClassVar[dict[str, Any]] = {"fused": None}

    def __init__(
        self,
        base: torch.optim.Optimizer,
        weight_decay_at_y: float = 0.0,
        momentum: float = 0.9,
        weight_lr_power: float = 2,
        r: float = 0,
        *,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"Invalid base: expected a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, ScheduleFreeOptimizer):
            raise TypeError("Invalid base: it is already schedule-free; wrap a plain optimizer instead")
        self.base = base
        key = self.group_key
        defaults = {
            key("momentum"): momentum,
            key("weight_decay"): weight_decay_at_y,
            key("r"): r,
            key("weight_lr_power"): weight_lr_power,
            key("fused"): fused,
        }
        # Registering the base optimizer's own group dicts makes both objects
        # read and write the same hyperparameters (one lr for schedulers).
        with _base_already_warned():
            super().__init__(self.base.param_groups, defaults)
        self.param_groups = self.base.param_groups

    def direction_for(self, group: dict) -> BaseOptimizerDirection:
        """The direction of every group: the base optimizer's step."""
        direction = self.__dict__.get("_direction")
        if direction is None or direction.base is not self.base:
            direction = self.__dict__["_direction"] = BaseOptimizerDirection(self.base)
        return direction

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups;
        # the base optimizer travels along, and pickle's memo keeps the group
        # list and the parameters shared between the two.
        state = super().__getstate__()
        state["base"] = self.base
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by torch's load_state_dict with only state and
        # param_groups; load_state_dict below re-shares the groups itself.
        super().__setstate__(state)
        if "base" in state:
            self.param_groups = self.base.param_groups

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_interpolation("momentum", group[self.group_key("momentum")])
        if any(group.get(k) is not None for k in ("state_dtype", self.group_key("state_dtype"))):
            # The base optimizer steps the parameter tensors themselves, so a
            # wide master would need the base optimizer's cooperation. (A group
            # may carry the plain spelling when written for the other optimizers.)
            raise ValueError(
                "Invalid state_dtype: ScheduleFreeWrapper does not support it; keep the base optimizer's "
                "parameters in a wide dtype, or use AdamWScheduleFree/SGDScheduleFree/RAdamScheduleFree"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer and so to the wrapper."""
        if self.param_groups is not self.base.param_groups:
            # Construction: registering the base optimizer's existing groups.
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        # Re-append through the engine so the group gets its keys and checks.
        with _base_already_warned():
            super().add_param_group(self.base.param_groups.pop())

    def _active_params(self, group_index: int, group: dict) -> list[Tensor]:
        # Gradients are the base optimizer's business (it may accept sparse ones).
        # A parameter listed twice is still one y, one z: it is moved once.
        seen: set[int] = set()
        active = []
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                active.append(p)
        return active

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state (``z``, averaging scalars) with the base optimizer's under ``"base"``."""
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict produced by :meth:`state_dict`, or by the published ``schedulefree.ScheduleFreeWrapper``.

        A published wrapper's checkpoint is the base optimizer's state dict with
        ``z`` added to each parameter's state and the averaging scalars (``k``,
        ``lr_max``, ``weight_sum``) to each group; ``momentum``,
        ``weight_decay_at_y``, ``r`` and ``weight_lr_power`` are not in it and
        come from this wrapper's arguments. The published wrapper starts in
        eval mode, so the parameters are taken to hold ``x`` (as after
        ``eval()``, before saving): call :meth:`train` before the next step.
        """
        if "base" not in state_dict:
            state_dict = self._from_published(state_dict)
        own = {k: v for k, v in state_dict.items() if k != "base"}
        # Refuse before the base optimizer's state is replaced, and put it
        # back if the wrapper's own load still fails: a refused checkpoint
        # leaves both as they were.
        state_checks.check_load(self._load_target(), own)
        previous_base = copy.deepcopy(self.base.state_dict())
        self.base.load_state_dict(state_dict["base"])
        try:
            super().load_state_dict(own)
        except BaseException:
            self.base.load_state_dict(previous_base)
            self.base.param_groups = self.param_groups  # the groups shared before the load
            raise
        # Both loads built fresh group dicts; share one set again.
        for ours, theirs in zip(self.param_groups, self.base.param_groups):
            theirs.update({k: v for k, v in ours.items() if k != "params"})
        self.param_groups = self.base.param_groups

    def _from_published(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Splits a published wrapper's checkpoint into this wrapper's layout (own part plus ``"base"``)."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError("Invalid state_dict: expected the keys 'state' and 'param_groups'")
        if any(self.group_key("k") in g for g in groups):
            raise ValueError(
                "Invalid state_dict: it was saved from an sfoptim ScheduleFreeWrapper but has no 'base' entry"
            )
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict: it has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        own_groups, base_groups = [], []
        for current, saved in zip(self.param_groups, groups):
            # A key the base optimizer also uses (Prodigy's ``k``) stays with it too.
            base_group = {k: v for k, v in saved.items() if k not in _PUBLISHED_KEYS or k in self.base.defaults}
            own = {k: v for k, v in current.items() if k != "params"}
            own.update(base_group)
            for name in _PUBLISHED_KEYS:
                if name in saved:
                    own[self.group_key(name)] = saved[name]
            own[self.group_key("train_mode")] = False
            own_groups.append(own)
            base_groups.append(base_group)
        own_state = {i: {"z": s["z"]} for i, s in state.items() if "z" in s}
        base_state = {i: rest for i, s in state.items() if (rest := {k: v for k, v in s.items() if k != "z"})}
        return {
            "state": own_state,
            "param_groups": own_groups,
            "base": {"state": base_state, "param_groups": base_groups},
        }


#: Engine keys the published wrapper's checkpoints carry, spelled without the prefix.
_PUBLISHED_KEYS = ("k", "lr_max", "weight_sum")


@contextlib.contextmanager
def _base_already_warned() -> Iterator[None]:
    """Silences torch's duplicate-parameter warning while the wrapper registers
    groups its base optimizer has already registered (and warned about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
        yield
