r"""The schedule-free engine: everything that is not the base optimizer's direction.

Schedule-free training (Defazio et al., 2024, "The Road Less Scheduled";
equation by equation in :mod:`sfoptim.reference`) takes gradients at ``y``,
moves the base iterate ``z`` by the direction and averages ``z`` into ``x``
(coefficients: :mod:`sfoptim.engine.schedule`). Two buffers are stored: the
parameter holds ``y`` in train mode (``x`` in eval mode) and the state holds
``z``; :math:`x = \operatorname{lerp}(y, z, 1 - 1/\beta)`. This module holds
the optimizer object (modes, state, group keys, state dicts) and plans each
step; :mod:`sfoptim.engine.step` carries it out. Subclasses declare their base
direction (:mod:`sfoptim.directions`) and validate their hyperparameters.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _validation, precision
from ..backends.abi import Bucket
from . import state_checks
from . import step as _step
from .direction import DelegatedDirection, Direction
from .step import GroupStep, lerp_to_z, real

__all__ = ["ClosureForm", "ModeError", "ScheduleFreeOptimizer", "with_backend_args"]


#: Docstring entries of the backend and precision arguments that the
#: optimizers share; each class inserts them where its docstring says
#: ``{backend_args}`` (``{backend_args_cpu_kernel}`` for a class whose kernel
#: runs on CPU only). Classes that the published package has too also get the
#: sentence on its argument order.
_FOREACH_DOC = """foreach: ``True``/``None`` updates all tensors of a device and dtype
            together; ``False`` one at a time (less temporary memory). The
            default is ``None``: it leaves the choice to ``fused``."""
_PUBLISHED_ORDER_DOC = """
            The published package's default is ``True``. Arguments the
            published package does not have come after all of its own, so
            its positional calls mean the same here."""
_FUSED_DOC = """fused: ``None`` (default) uses the fused one-pass CPU kernel wherever
            it runs (CPU, float64/float32/bfloat16/float16, contiguous) and ``foreach`` elsewhere;
            ``True`` also uses a ``torch.compile``-d one-pass kernel on GPUs,
            and warns once where no fused kernel can run; ``False`` never
            uses them."""
_CPU_KERNEL_DOC = """fused: ``None`` (default) uses the fused CPU kernel wherever it runs
            (CPU, float64/float32/bfloat16/float16, contiguous; buffers in the
            parameters' dtype, or float32 and 16-bit in either role) and
            ``foreach`` elsewhere, GPUs included (this optimizer has no
            compiled kernel); ``True`` warns once where the kernel cannot run;
            ``False`` never uses it."""
_PRECISION_DOC = """state_dtype: keep a master copy of narrower parameters and all their
            state in this dtype (e.g. ``torch.float32`` for bfloat16 weights;
            see :mod:`sfoptim.precision`). Default None: the parameter's dtype.
        stochastic_rounding: round stochastically where a float32 result is
            stored in 16 bits: the master into the parameter (with
            ``state_dtype``), and, on the fused CPU kernel, ``y``, ``z`` and the
            buffers of 16-bit parameters kept without ``state_dtype``
            (default False)."""


def with_backend_args(cls: type) -> type:
    """Class decorator: fills ``{backend_args}`` (``{backend_args_cpu_kernel}``) in the class docstring."""
    if cls.__doc__:
        foreach = _FOREACH_DOC + (_PUBLISHED_ORDER_DOC if cls.__name__ in state_checks.PUBLISHED_CLASSES else "")
        keys = (("{backend_args}", _FUSED_DOC), ("{backend_args_cpu_kernel}", _CPU_KERNEL_DOC))
        for key, fused in keys:
            cls.__doc__ = cls.__doc__.replace(key, f"{foreach}\n        {fused}\n        {_PRECISION_DOC}")
    return cls


class ModeError(RuntimeError):
    """Raised when the optimizer is asked to step while its parameters hold ``x``."""


_MODE_MESSAGE = (
    "{name}.step() was called in eval mode: the parameters hold the averaged point x, "
    "not the training point y. Call optimizer.train() before training steps "
    "(and optimizer.eval() before evaluating or saving)."
)

_grad_of = operator.attrgetter("grad")
_data_of = operator.attrgetter("data")
_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_is_sparse = operator.attrgetter("is_sparse")
_z_of = operator.itemgetter("z")

#: State keys the engine owns; a direction's buffers must be named otherwise.
ENGINE_STATE = frozenset({"z", "master"})
_NO_INPUTS: Mapping[str, Tensor] = {}


def work(p: Tensor, state: dict) -> Tensor:
    """The tensor the arithmetic acts on: the wide master copy when the group
    keeps state in a wider dtype than the parameter, else the parameter."""
    master = state.get("master")
    return master if master is not None else p.data


class ScheduleFreeOptimizer(torch.optim.Optimizer):
    """Base class of every sfoptim optimizer: modes, ``z``, averaging, state.

    A subclass declares its base direction (``direction``, a
    :class:`sfoptim.directions.Direction`; or :meth:`direction_for` for a
    different one per parameter group) and validates its hyperparameters in
    ``_validate_group``. Everything else is here and in
    :mod:`sfoptim.engine.step`.

    The optimizer starts in train mode. In train mode the parameters hold
    ``y``; :meth:`eval` moves them to ``x`` and :meth:`train` back.
    """

    #: The base direction of every group (see :meth:`direction_for`).
    direction: ClassVar[Direction]
    #: Prefix of the group keys the engine owns; the wrapper namespaces them so
    #: they cannot collide with its base optimizer's own keys (Prodigy's ``k``).
    _key_prefix: ClassVar[str] = ""
    #: Engine key names spelled differently by a subclass (before the prefix).
    _key_aliases: ClassVar[dict[str, str]] = {}
    #: Backend and precision options the class accepts, with their defaults.
    _options: ClassVar[dict[str, Any]] = {
        "foreach": None,
        "fused": None,
        "state_dtype": None,
        "stochastic_rounding": False,
    }

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        defaults = dict(defaults)
        for name, value in self._options.items():
            defaults.setdefault(self.group_key(name), value)
        for name, value in self._schedule_defaults().items():
            defaults.setdefault(name, value)
        super().__init__(_validation.param_list(params, type(self).__name__), defaults)

    # ------------------------------------------------------------ group keys
    @classmethod
    def group_key(cls, name: str) -> str:
        """The param-group key under which this optimizer stores engine key ``name``.

        The engine keeps ``k`` (steps taken), ``train_mode``, ``lr_max``,
        ``weight_sum`` and ``scheduled_lr`` in every group and reads ``r``,
        ``weight_lr_power``, ``weight_decay`` and the backend options from it;
        the wrapper spells them ``sf_k``, ... so they cannot collide with its
        base optimizer's keys. Every reader of an engine key goes through here.
        """
        return cls._key_prefix + cls._key_aliases.get(name, name)

    def option(self, group: dict, name: str) -> Any:
        """The group's value of a backend/precision option (its default when absent)."""
        return group.get(self.group_key(name), self._options.get(name))

    def _schedule_defaults(self) -> dict[str, Any]:
        return {
            self.group_key("k"): 0,
            self.group_key("train_mode"): True,
            self.group_key("weight_sum"): 0.0,
            self.group_key("lr_max"): -1.0,
            self.group_key("scheduled_lr"): 0.0,
        }

    # ------------------------------------------------------------- directions
    def direction_for(self, group: dict) -> Direction:
        """The base direction of ``group`` (override to choose one per group)."""
        return self.direction

    def _validate_group(self, group: dict) -> None:
        if self.option(group, "fused") and self.option(group, "foreach"):
            raise ValueError("Invalid arguments: fused=True and foreach=True cannot be used together")
        _validation.check_nonnegative("lr", group["lr"])
        _validation.check_nonnegative(self._key_aliases.get("weight_decay", "weight_decay"), group[self.group_key("weight_decay")])
        _validation.check_nonnegative("r", group[self.group_key("r")])
        _validation.check_nonnegative("weight_lr_power", group[self.group_key("weight_lr_power")])
        precision.check_state_dtype(self.option(group, "state_dtype"))
        precision.check_state_precision(group)
        if "state_precision" not in self.defaults and precision.state_precision(group) != "full":
            raise ValueError(
                f"Invalid state_precision: {group['state_precision']!r}; {type(self).__name__} keeps its state in "
                "the parameters' dtype (state_precision is an option of AdamW and RAdam)"
            )
        # Averaging options any group may set (off when absent).
        if group.get(self.group_key("decoupling_c")) is not None:
            _validation.check_in_range("decoupling_c", group[self.group_key("decoupling_c")], 0.0, math.inf, low_open=True, high_open=True)
        if self.group_key("c_warmup") in group:
            _validation.check_steps("c_warmup", group[self.group_key("c_warmup")])
        # Weight-decay options (the default: decay at y, no AdamC correction).
        decay_at = group.get(self.group_key("decay_at"), "y")
        if decay_at not in ("y", "z"):
            raise ValueError(f"Invalid {self.group_key('decay_at')}: {decay_at!r} (expected 'y' or 'z')")
        adamc = group.get(self.group_key("adamc"), False)
        if not isinstance(adamc, bool):
            raise ValueError(f"Invalid {self.group_key('adamc')}: {adamc!r} (expected True or False)")
        clash = ENGINE_STATE.intersection(self.direction_for(group).state_buffers(group))
        if clash:
            raise TypeError(f"{type(self.direction_for(group)).__name__} declares engine state buffers {sorted(clash)}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, validating its hyperparameters; it joins in the current mode."""
        mode = self.train_mode if getattr(self, "param_groups", None) else True
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        # A group added mid-training has no z yet, so either mode is exact for
        # it; record the optimizer's mode so that one flag describes everything.
        group[self.group_key("train_mode")] = mode

    # ------------------------------------------------------------------ modes
    @property
    def train_mode(self) -> bool:
        """True while the parameters hold ``y`` (training), False while they hold ``x``."""
        key = self.group_key("train_mode")
        return all(g[key] for g in self.param_groups)

    @torch.no_grad()
    def train(self) -> ScheduleFreeOptimizer:
        """Moves the parameters to the training point ``y``. Idempotent; returns self."""
        key = self.group_key("train_mode")
        for group in self.param_groups:
            if not group[key]:
                self._params_to_y(group)
                group[key] = True
        return self

    @torch.no_grad()
    def eval(self) -> ScheduleFreeOptimizer:
        """Moves the parameters to the averaged point ``x``. Idempotent; returns self."""
        key = self.group_key("train_mode")
        for group in self.param_groups:
            if group[key]:
                self._params_to_x(group)
                group[key] = False
        return self

    def y_beta(self, group: dict) -> float:
        r"""The interpolation weight the group's current ``y`` was built with.

        ``x`` is recovered with it: :math:`x = \operatorname{lerp}(y, z, 1 - 1/\beta)`.
        """
        direction = self.direction_for(group)
        if direction.varying_beta:
            stored = group.get(self.group_key("y_beta"))
            if stored is not None:
                return stored
        return direction.beta(group, group[self.group_key("k")])

    def _params_with_z(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        ps, zs = [], []
        for p in group["params"]:
            state = self.state.get(p)
            if state and "z" in state:
                ps.append(real(work(p, state)))
                zs.append(real(state["z"]))
        return ps, zs

    def _params_to_x(self, group: dict) -> None:
        ps, zs = self._params_with_z(group)
        if ps:
            lerp_to_z(ps, zs, 1 - 1 / self.y_beta(group))
            self._sync_params(group, group["params"])

    def _params_to_y(self, group: dict) -> None:
        ps, zs = self._params_with_z(group)
        if ps:
            lerp_to_z(ps, zs, 1 - self.y_beta(group))
            self._sync_params(group, group["params"])

    def _sync_params(self, group: dict, params: list[Tensor]) -> None:
        """Writes the wide master copies (``state_dtype``) into their narrow parameters."""
        if self.option(group, "state_dtype") is None:
            return
        precision.write_params(*self._masters(params), bool(self.option(group, "stochastic_rounding")))

    @torch.no_grad()
    def eval_params(self) -> list[Tensor]:
        """The averaged point ``x`` of every parameter, as new tensors.

        The live parameters and the state are not touched, whatever the mode.
        The order is ``[p for g in self.param_groups for p in g["params"]]``;
        a parameter that has not been stepped yet is its own ``x``.
        """
        out: list[Tensor] = []
        key = self.group_key("train_mode")
        for group in self.param_groups:
            for p in group["params"]:
                out.append(self._x_of(group, p, group[key]))
        return out

    def _x_of(self, group: dict, p: Tensor, in_train: bool) -> Tensor:
        state = self.state.get(p)
        if in_train and state and "z" in state:
            w = work(p, state).detach()
            return torch.lerp(w, state["z"].to(w.dtype), 1 - 1 / self.y_beta(group))
        return (work(p, state) if state else p).detach().clone()

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one schedule-free step with the gradients stored in ``p.grad``.

        ``closure``, if given, is evaluated first (with gradients enabled) and
        its result returned. ``p.grad`` is read, never written.

        Raises:
            ModeError: in eval mode (call :meth:`train` first).
            RuntimeError: for a sparse gradient; nothing has changed then.
        """
        return self._run_step(closure)

    def _run_step(self, closure: Callable[[], Any] | None) -> Any:
        """The step without ``torch.optim``'s step hooks.

        ``torch.optim.Optimizer`` wraps the ``step`` of each class it constructs
        with the hooks, so a form's ``step`` calls this, never a parent class's
        ``step``: the hooks then run once per step whichever classes exist.
        """
        self._enter_step(closure)
        try:
            loss = _evaluate(closure)
            self._update()
        finally:
            self._leave_step()
        return loss

    def _enter_step(self, closure: Callable[[], Any] | None) -> None:
        """Puts the parameters where the closure and the update expect ``y`` (plain form: checks it)."""
        if not self.train_mode:
            raise ModeError(_MODE_MESSAGE.format(name=type(self).__name__))

    def _leave_step(self) -> None:
        """Puts the parameters where the form keeps them between steps (plain form: ``y``)."""

    def _update(self, inputs: Mapping[str, Tensor] = _NO_INPUTS) -> None:
        """The update of every group; ``inputs`` reach the directions in ``reduced`` (:func:`.step.update`)."""
        _step.update(self._plan_step, inputs)

    def _plan_step(self) -> list[GroupStep]:
        """The step of every group as :func:`sfoptim.engine.step.update` consumes it.

        Every group's gradients are checked (dense, of the parameter's shape)
        before any state is created, so a bad gradient in the last group leaves
        every group untouched.
        """
        key = self.group_key
        k = key("k")
        plans = []
        for gi, group in enumerate(self.param_groups):
            direction = self.direction_for(group)
            active = self._active_params(gi, group)
            if direction.refuses_shards:
                self._check_whole(gi, group, active)
            step = group[k] + 1
            beta = direction.beta(group, step)
            plan = GroupStep(group, direction, step, self.y_beta(group) if direction.varying_beta else beta, beta, key)
            plan.active = active
            plan.owner = type(self).__name__
            plans.append(plan)
        for p in plans:
            group = p.group
            p.fused, p.foreach = self.option(group, "fused"), self.option(group, "foreach")
            if isinstance(p.direction, DelegatedDirection):
                p.states = [self.state[q] for q in p.active]
                continue
            if p.active:
                p.buckets = self._buckets(group, p.active, p.direction.state_buffers(group))
            wide = self.option(group, "state_dtype") is not None
            if wide:
                p.masters = self._masters(p.active)
                p.stochastic = bool(self.option(group, "stochastic_rounding"))
            if p.beta != p.beta_prev:
                stepped = {id(q) for q in p.active}
                rest = [q for q in group["params"] if id(q) not in stepped and "z" in self.state.get(q, ())]
                ys = [real(work(q, self.state[q])) for q in rest]
                zs = [real(self.state[q]["z"]) for q in rest]
                p.inactive = (ys, zs, *self._masters(rest)) if wide else (ys, zs, [], [])
        return plans

    def _masters(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters of ``params`` that have a wide master copy, and those copies."""
        ps, ms = [], []
        for p in params:
            state = self.state.get(p)
            if state and "master" in state:
                ps.append(p.data)
                ms.append(state["master"])
        return ps, ms

    def _check_whole(self, gi: int, group: dict, active: list[Tensor]) -> None:
        for p in active:
            if any(getattr(pl, "dim", None) is not None for pl in getattr(p, "placements", ())):
                i = next(j for j, q in enumerate(group["params"]) if q is p)
                raise NotImplementedError(
                    f"{type(self).__name__} needs whole matrices, but {self._param_label(gi, i, p)} is sharded "
                    "(FSDP2); gathering shards for it is not supported yet."
                )

    def _param_label(self, group_index: int, param_index: int, p: Tensor) -> str:
        return state_checks.param_label(self.param_groups, group_index, param_index, p)

    def _load_target(self) -> state_checks.Target:
        """This optimizer as the state-dict checks see it."""
        return state_checks.Target(
            self, self.group_key, self._key_prefix, frozenset(self._schedule_defaults()), self.direction_for
        )

    def _active_params(self, group_index: int, group: dict) -> list[Tensor]:
        params = group["params"]
        # Read for all parameters at once (``map`` iterates in C); the loop
        # below, which names the offending parameter, runs only on a failure.
        grads = list(map(_grad_of, params))
        if any(map(operator.is_, grads, itertools.repeat(None))):
            present = [g is not None for g in grads]
            params = list(itertools.compress(params, present))
            grads = list(itertools.compress(grads, present))
        if not any(map(_is_sparse, grads)) and list(map(_shape_of, grads)) == list(map(_shape_of, params)):
            return list(params)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients, but "
                    f"{self._param_label(group_index, i, p)} has one; use a dense embedding "
                    "(sparse=False) or torch.optim.SparseAdam for that parameter."
                )
            if p.grad.shape != p.shape:
                raise RuntimeError(
                    f"{self._param_label(group_index, i, p)} has a gradient of shape "
                    f"{tuple(p.grad.shape)}, which does not match the parameter."
                )
        raise AssertionError("unreachable: a gradient failed a check that no parameter fails")

    def _init_state(self, group: dict, p: Tensor, names: tuple[str, ...]) -> dict:
        state = self.state[p]
        wide = precision.master_dtype(group, p)
        if wide is not None and "master" not in state:
            state["master"] = p.detach().to(wide, memory_format=torch.preserve_format, copy=True)
        src = work(p, state).detach()
        if "z" not in state:
            narrow = precision.z_dtype(group, p)
            if narrow is None:
                state["z"] = torch.clone(src, memory_format=torch.preserve_format)
            else:
                state["z"] = src.to(narrow, memory_format=torch.preserve_format, copy=True)
        if names:
            direction = self.direction_for(group)
            for name in names:
                if name not in state:
                    state[name] = direction.new_buffer(group, name, src)
        return state

    def _buckets(self, group: dict, active: list[Tensor], names: tuple[str, ...]) -> list[Bucket]:
        """The group's tensors in buckets of one device, dtype and tensor type (state created on first use)."""
        bucket = self._one_bucket(active, names)
        if bucket is not None:
            return [bucket]
        return self._sorted_buckets(group, active, names)

    def _one_bucket(self, active: list[Tensor], names: tuple[str, ...]) -> Bucket | None:
        """The usual case in one bucket, or None where :meth:`_sorted_buckets` is needed.

        The usual case: every parameter has its state already, no master copy,
        and all parameters and gradients share one device, one real dtype and
        one tensor type. It runs on every step for every parameter, so each
        property is read for all parameters at once.
        """
        if not active:
            return None
        states = list(map(self.state.__getitem__, active))
        if any(map(operator.contains, states, itertools.repeat("master"))):
            return None
        try:
            zs = list(map(_z_of, states))
            buffers = {n: list(map(operator.itemgetter(n), states)) for n in names}
        except KeyError:  # state still to be created
            return None
        ws = list(map(_data_of, active))
        grads: list[Tensor] = list(map(_grad_of, active))
        first = ws[0]
        dtype, n = first.dtype, len(ws)
        if dtype.is_complex or set(map(type, ws)) != {type(first)}:
            return None
        if list(map(_dtype_of, ws)).count(dtype) != n or list(map(_dtype_of, grads)).count(dtype) != n:
            return None
        if not (all(map(_is_cpu, ws)) if first.is_cpu else len(set(map(_device_of, ws))) == 1):
            return None
        return Bucket(ws, grads, zs, buffers)

    def _sorted_buckets(self, group: dict, active: list[Tensor], names: tuple[str, ...]) -> list[Bucket]:
        needed = {"z", *names}
        by_key: dict[tuple, Bucket] = {}
        for p in active:
            state = self.state[p]
            if not state.keys() >= needed:
                self._init_state(group, p, names)
            master = state.get("master")
            w = p.data if master is None else master
            grad: Tensor = p.grad  # type: ignore[assignment]  # active parameters have one
            if grad.dtype != w.dtype:
                # With a master the gradient (taken at the rounded weights) is widened too.
                grad = grad.to(w.dtype)
            z = state["z"]
            buffers = [state[n] for n in names]
            if w.is_complex():
                w, grad, z = real(w), real(grad), real(z)
                buffers = [real(b) for b in buffers]
            # Tensor subclasses (DTensor shards) never share a list with plain tensors.
            key = (w.device, w.dtype, type(w))
            bucket = by_key.get(key)
            if bucket is None:
                bucket = by_key[key] = Bucket([], [], [], {n: [] for n in names})
            bucket.params.append(w)
            bucket.grads.append(grad)
            bucket.z.append(z)
            for n, b in zip(names, buffers):
                bucket.buffers[n].append(b)
        return list(by_key.values())

    # ------------------------------------------------------------ state dicts
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name, value in self._schedule_defaults().items():
                group.setdefault(name, value)
            for name, value in self._options.items():
                group.setdefault(self.group_key(name), value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class (or, for the classes the published
        ``schedulefree`` package has too, by its class of the same name).

        Raises ValueError, before anything changes, for a checkpoint of another
        optimizer class, or whose state does not fit the parameters (a buffer
        of another shape, a complex buffer for a real parameter); the message
        names the parameter and the buffer. This optimizer's backend
        (``foreach``, ``fused``) is kept: it describes the machine, not the run.
        State comes back in the parameter's dtype, except that parameters with
        a wide master copy (``state_dtype``) keep all their state wide.
        """
        previous = [dict(g) for g in self.param_groups]
        target = self._load_target()
        state_checks.check_load(target, state_dict)
        super().load_state_dict(state_dict)
        state_checks.settle_load(target, state_dict, previous)


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ClosureForm:
    """Mixin: parameters hold ``x`` between steps; ``step(closure)`` visits ``y``.

    The closure is evaluated at ``y``, the usual update is applied, and the
    parameters return to ``x``. No :meth:`train`/:meth:`eval` calls are needed
    (they are accepted and do nothing), so evaluation code needs no changes.
    The step itself is the engine's: only where the parameters rest differs.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Also during construction: every group starts with its parameters at x.
        super().add_param_group(param_group)  # type: ignore[misc]
        self.param_groups[-1][self.group_key("train_mode")] = False  # type: ignore[attr-defined]

    def train(self) -> Any:
        """No-op: a closure form keeps ``x`` in the parameters between steps."""
        return self

    def eval(self) -> Any:
        """No-op: a closure form keeps ``x`` in the parameters between steps."""
        return self

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluates ``closure`` at ``y`` (with gradients enabled) and steps.

        The closure must zero the gradients, compute the loss and call
        ``backward()``; its return value is returned. If it raises, the
        parameters are moved back to ``x`` before the error propagates.
        """
        return self._run_step(closure)  # type: ignore[attr-defined]

    def _enter_step(self, closure: Callable[[], Any] | None) -> None:
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step() needs a closure that computes the loss and gradients")
        engine: ScheduleFreeOptimizer = self  # type: ignore[assignment]
        for group in engine.param_groups:
            engine._params_to_y(group)

    def _leave_step(self) -> None:
        engine: ScheduleFreeOptimizer = self  # type: ignore[assignment]
        for group in engine.param_groups:
            engine._params_to_x(group)
