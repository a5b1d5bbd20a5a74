r"""The schedule-free engine: everything that is not the base optimizer's direction.

Schedule-free training (Defazio et al., 2024, "The Road Less Scheduled") keeps
three sequences per parameter:

.. math::

    y_t &= (1-\beta)\, z_t + \beta\, x_t            &&\text{(gradients are taken here)}\\
    z_{t+1} &= z_t - \gamma_t\, d_t                &&\text{(the base optimizer's iterate)}\\
    x_{t+1} &= (1-c_{t+1})\, x_t + c_{t+1}\, z_{t+1} &&\text{(the average: evaluate here)}

where :math:`d_t` is the base direction evaluated at :math:`y_t` (the gradient
for SGD, the preconditioned gradient for Adam) plus weight decay
:math:`\lambda y_t`, and :math:`c_{t+1}` comes from :mod:`sfoptim.averaging`.

Only two buffers are stored: the parameter holds ``y`` in train mode (``x`` in
eval mode) and the state holds ``z``. ``x`` is recovered from them:
:math:`x = y + (1 - 1/\beta)(z - y)` and back :math:`y = x + (1-\beta)(z - x)`.
One step updates ``y`` in place without forming ``x``:

.. math::

    y_{t+1} = \operatorname{lerp}(y_t, z_t, c_{t+1}) + \gamma_t\,(\beta(1-c_{t+1}) - 1)\, d_t

This module holds that machinery once; :class:`ScheduleFreeOptimizer`
subclasses add only :meth:`ScheduleFreeOptimizer._direction` (and, where the
algorithm needs it, a learning-rate hook).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _fused_compiled, _fused_cpu, _state_checks, _validation, precision
from .averaging import AveragingStep, averaging_step, warmup_factor

__all__ = ["ModeError", "ScheduleFreeOptimizer"]


#: Docstring entries of the backend and precision arguments that SGD, AdamW and
#: RAdam share; each class inserts them where its docstring says ``{backend_args}``.
BACKEND_ARGS_DOC = """foreach: ``True``/``None`` updates all tensors of a device and dtype
            together; ``False`` one at a time (less temporary memory). The
            default is ``None`` (the published package's is ``True``): it
            leaves the choice to ``fused``. Arguments the published package
            does not have come after all of its own, so its positional calls
            mean the same here.
        fused: ``None`` (default) uses the fused one-pass CPU kernel wherever
            it runs (CPU, float32/float64, contiguous) and ``foreach`` elsewhere;
            ``True`` also uses a ``torch.compile``-d one-pass kernel on GPUs,
            and warns once where no fused kernel can run; ``False`` never
            uses them.
        state_dtype: keep a master copy of narrower parameters and all their
            state in this dtype (e.g. ``torch.float32`` for bfloat16 weights;
            see :mod:`sfoptim.precision`). Default None: the parameter's dtype.
        stochastic_rounding: round the master into the parameter stochastically
            (only with ``state_dtype``; default False)."""


def with_backend_args(cls: type) -> type:
    """Class decorator: fills ``{backend_args}`` in the class docstring."""
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{backend_args}", BACKEND_ARGS_DOC)
    return cls


class ModeError(RuntimeError):
    """Raised when the optimizer is asked to step while its parameters hold ``x``."""


_MODE_MESSAGE = (
    "{name}.step() was called in eval mode: the parameters hold the averaged point x, "
    "not the training point y. Call optimizer.train() before training steps "
    "(and optimizer.eval() before evaluating or saving)."
)


class Bucket(NamedTuple):
    """Tensors of one device and dtype that one backend call updates together."""

    params: list[Tensor]
    grads: list[Tensor]
    z: list[Tensor]
    buffers: dict[str, list[Tensor]]


def _real(t: Tensor) -> Tensor:
    # Complex parameters are optimized as pairs of reals, as torch.optim does,
    # so that |g|^2 in Adam is the squared modulus and lerp stays elementwise.
    return torch.view_as_real(t) if torch.is_complex(t) else t


class ScheduleFreeOptimizer(torch.optim.Optimizer):
    """Base class of every sfoptim optimizer: mode handling, averaging, state.

    Subclasses provide:

    * ``_beta(group)``: the interpolation weight :math:`\\beta` of the group.
    * ``_state_buffers(group)``: names of parameter-sized buffers besides ``z``.
    * ``_direction(group, sched, bucket)``: the base direction at ``y``.
    * optionally ``_scheduled_lr(group, step)`` (default: linear warmup).

    The optimizer starts in train mode. In train mode the parameters hold
    ``y``; :meth:`eval` moves them to ``x`` and :meth:`train` back.
    """

    #: Prefix of the group keys the engine owns; the wrapper namespaces them so
    #: they cannot collide with its base optimizer's own keys (Prodigy's ``k``).
    _key_prefix: str = ""
    #: Group key of the weight decay applied at ``y``.
    _decay_key: str = "weight_decay"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        defaults = dict(defaults)
        defaults.setdefault("foreach", None)
        defaults.setdefault("state_dtype", None)
        defaults.setdefault("stochastic_rounding", False)
        defaults.setdefault(self.group_key("fused"), None)
        for name, value in self._schedule_defaults().items():
            defaults.setdefault(name, value)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ hooks
    def _beta(self, group: dict) -> float:
        raise NotImplementedError

    def _state_buffers(self, group: dict) -> tuple[str, ...]:
        return ()

    def _scheduled_lr(self, group: dict, step: int) -> float:
        """Learning rate of a 1-based ``step``: ``lr * min(1, step/warmup_steps)``."""
        return float(group["lr"]) * warmup_factor(step, int(group.get("warmup_steps", 0)))

    def _direction(self, group: dict, sched: AveragingStep, bucket: Bucket) -> tuple[list[Tensor], bool]:
        """Returns the base direction for the bucket and whether the engine owns it.

        When the second item is False the tensors alias something that must not
        change (the gradients), and the engine copies before adding weight decay.
        """
        raise NotImplementedError

    def _fused_direction(self, group: dict, sched: AveragingStep) -> Optional[dict[str, Any]]:
        """Keyword arguments of :func:`sfoptim._fused_cpu.step` for this step, or None.

        None (the default) means the algorithm has no fused kernel and always
        takes the foreach path.
        """
        return None

    def _validate_group(self, group: dict) -> None:
        if group.get(self.group_key("fused")) and group.get(self.group_key("foreach")):
            raise ValueError("Invalid arguments: fused=True and foreach=True cannot be used together")
        _validation.check_nonnegative("lr", group["lr"])
        _validation.check_nonnegative(self._decay_key.removeprefix(self._key_prefix), group[self._decay_key])
        _validation.check_nonnegative("r", group[self.group_key("r")])
        _validation.check_nonnegative("weight_lr_power", group[self.group_key("weight_lr_power")])
        precision.check_state_dtype(group.get("state_dtype"))

    # ------------------------------------------------------------ group keys
    def group_key(self, name: str) -> str:
        """The param-group key under which this optimizer stores ``name``.

        The engine keeps ``k`` (steps taken), ``train_mode``, ``lr_max``,
        ``weight_sum`` and ``scheduled_lr`` in every group; the wrapper prefixes
        them (``sf_k``) so they cannot collide with its base optimizer's keys.
        """
        return self._key_prefix + name

    def _schedule_defaults(self) -> dict[str, Any]:
        return {
            self.group_key("k"): 0,
            self.group_key("train_mode"): True,
            self.group_key("weight_sum"): 0.0,
            self.group_key("lr_max"): -1.0,
            self.group_key("scheduled_lr"): 0.0,
        }

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
        return all(g[self.group_key("train_mode")] for g in self.param_groups)

    @torch.no_grad()
    def train(self) -> "ScheduleFreeOptimizer":
        """Moves the parameters to the training point ``y``. Idempotent; returns self."""
        for group in self.param_groups:
            if not group[self.group_key("train_mode")]:
                self._params_to_y(group)
                group[self.group_key("train_mode")] = True
        return self

    @torch.no_grad()
    def eval(self) -> "ScheduleFreeOptimizer":
        """Moves the parameters to the averaged point ``x``. Idempotent; returns self."""
        for group in self.param_groups:
            if group[self.group_key("train_mode")]:
                self._params_to_x(group)
                group[self.group_key("train_mode")] = False
        return self

    def _params_with_z(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        ps, zs = [], []
        for p in group["params"]:
            state = self.state.get(p)
            if state and "z" in state:
                ps.append(_real(_work(p, state)))
                zs.append(_real(state["z"]))
        return ps, zs

    def _params_to_x(self, group: dict) -> None:
        ps, zs = self._params_with_z(group)
        if ps:
            torch._foreach_lerp_(ps, zs, 1 - 1 / self._beta(group))
            self._sync_params(group, group["params"])

    def _params_to_y(self, group: dict) -> None:
        ps, zs = self._params_with_z(group)
        if ps:
            torch._foreach_lerp_(ps, zs, 1 - self._beta(group))
            self._sync_params(group, group["params"])

    def _sync_params(self, group: dict, params: list[Tensor]) -> None:
        """Writes the wide master copies (``state_dtype``) into their narrow parameters."""
        if group.get("state_dtype") is None:
            return
        ps, ms = [], []
        for p in params:
            state = self.state.get(p)
            if state and "master" in state:
                ps.append(p.data)
                ms.append(state["master"])
        precision.write_params(ps, ms, bool(group.get("stochastic_rounding", False)))

    @torch.no_grad()
    def eval_params(self) -> list[Tensor]:
        """The averaged point ``x`` of every parameter, as new tensors.

        The live parameters and the state are not touched, whatever the mode.
        The order is ``[p for g in self.param_groups for p in g["params"]]``;
        a parameter that has not been stepped yet is its own ``x``.
        """
        out: list[Tensor] = []
        for group in self.param_groups:
            in_train = group[self.group_key("train_mode")]
            for p in group["params"]:
                out.append(self._x_of(group, p, in_train))
        return out

    def _x_of(self, group: dict, p: Tensor, in_train: bool) -> Tensor:
        state = self.state.get(p)
        if in_train and state and "z" in state:
            return torch.lerp(_work(p, state).detach(), state["z"], 1 - 1 / self._beta(group))
        return (_work(p, state) if state else p).detach().clone()

    # ------------------------------------------------------------------- step
    def _check_train_mode(self) -> None:
        if not self.train_mode:
            raise ModeError(_MODE_MESSAGE.format(name=type(self).__name__))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs one schedule-free step with the gradients stored in ``p.grad``.

        ``closure``, if given, is evaluated first (with gradients enabled) and
        its result returned. ``p.grad`` is read, never written.

        Raises:
            ModeError: in eval mode (call :meth:`train` first).
            RuntimeError: for a sparse gradient; nothing has changed then.
        """
        loss = self._start_step(closure)
        self._update()
        return loss

    def _start_step(self, closure: Optional[Callable[[], Any]]) -> Any:
        """Refuses to step in eval mode, then evaluates the closure (if any) with gradients on."""
        self._check_train_mode()
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _param_label(self, group_index: int, param_index: int, p: Tensor) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        name = f" '{names[param_index]}'" if names else ""
        return f"param_groups[{group_index}]['params'][{param_index}]{name} (shape {tuple(p.shape)})"

    def _active_params(self, group_index: int, group: dict) -> list[Tensor]:
        active = []
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
            active.append(p)
        return active

    def _schedule(self, group: dict) -> AveragingStep:
        step = group[self.group_key("k")] + 1
        lr = self._scheduled_lr(group, step)
        return averaging_step(
            step,
            lr,
            group[self.group_key("lr_max")],
            group[self.group_key("weight_sum")],
            group[self.group_key("r")],
            group[self.group_key("weight_lr_power")],
        )

    def _commit(self, group: dict, sched: AveragingStep) -> None:
        group[self.group_key("k")] = sched.step
        group[self.group_key("lr_max")] = sched.lr_max
        group[self.group_key("weight_sum")] = sched.weight_sum
        group[self.group_key("scheduled_lr")] = sched.lr

    def _init_state(self, group: dict, p: Tensor) -> dict:
        state = self.state[p]
        wide = precision.master_dtype(group, p)
        if wide is not None and "master" not in state:
            state["master"] = p.detach().to(wide, memory_format=torch.preserve_format, copy=True)
        src = _work(p, state).detach()
        if "z" not in state:
            state["z"] = torch.clone(src, memory_format=torch.preserve_format)
        for name in self._state_buffers(group):
            if name not in state:
                state[name] = torch.zeros_like(src, memory_format=torch.preserve_format)
        return state

    def _buckets(self, group: dict, active: list[Tensor]) -> list[Bucket]:
        # This loop runs for every parameter on every step, so it stays lean:
        # state is created once, complex views only where needed.
        names = self._state_buffers(group)
        needed = {"z", *names}
        by_key: dict[tuple, Bucket] = {}
        for p in active:
            state = self.state[p]
            if not state.keys() >= needed:
                self._init_state(group, p)
            master = state.get("master")
            work = p.data if master is None else master
            grad = p.grad
            if grad.dtype != work.dtype:
                # With a master the gradient (taken at the rounded weights) is widened too.
                grad = grad.to(work.dtype)
            z = state["z"]
            buffers = [state[n] for n in names]
            if work.is_complex():
                work, grad, z = _real(work), _real(grad), _real(z)
                buffers = [_real(b) for b in buffers]
            key = (work.device, work.dtype)
            bucket = by_key.get(key)
            if bucket is None:
                bucket = by_key[key] = Bucket([], [], [], {n: [] for n in names})
            bucket.params.append(work)
            bucket.grads.append(grad)
            bucket.z.append(z)
            for n, b in zip(names, buffers):
                bucket.buffers[n].append(b)
        return list(by_key.values())

    def _update(self) -> None:
        # Validate every group before mutating anything, so that a bad gradient
        # in the last group leaves the first group's parameters untouched.
        plans = []
        for gi, group in enumerate(self.param_groups):
            plans.append((group, self._active_params(gi, group), self._schedule(group)))
        for group, active, sched in plans:
            if active:
                for bucket in self._buckets(group, active):
                    if self._apply_fused(group, sched, bucket):
                        continue
                    if group.get("foreach") is False:
                        for single in _split(bucket):
                            self._apply(group, sched, single)
                    else:
                        self._apply(group, sched, bucket)
                self._sync_params(group, active)
            self._commit(group, sched)

    def _apply_fused(self, group: dict, sched: AveragingStep, bucket: Bucket) -> bool:
        """Runs the fused kernel on the bucket if the group allows it; False if not run.

        ``fused=None`` (the default) takes the CPU kernel wherever it runs unless
        ``foreach=False`` asked for the per-tensor loop; ``fused=True`` also
        takes the compiled kernel on other devices (GPU), and warns once where
        neither can run (other dtypes on CPU, DTensor shards, no compiler)
        before falling back to foreach.
        """
        fused = group.get(self.group_key("fused"))
        if fused is False or (fused is None and group.get("foreach") is False):
            return False
        backend = _fused_backend(bucket.params[0].device.type, fused)
        if backend is None:
            return False
        spec = self._fused_direction(group, sched)
        if spec is None:
            return False
        buffers = bucket.buffers
        return backend.step(
            bucket.params,
            bucket.grads,
            bucket.z,
            buffers.get("exp_avg_sq"),
            buffers.get("exp_avg"),
            lr=sched.lr,
            ckp1=sched.ckp1,
            beta=self._beta(group),
            weight_decay=float(group[self._decay_key]),
            explicit=fused is True,
            **spec,
        )

    def _apply(self, group: dict, sched: AveragingStep, bucket: Bucket) -> None:
        direction, owned = self._direction(group, sched, bucket)
        decay = group[self._decay_key]
        if decay != 0:
            if owned:
                torch._foreach_add_(direction, bucket.params, alpha=decay)
            else:
                direction = torch._foreach_add(direction, bucket.params, alpha=decay)
        interpolate_and_step(bucket.params, bucket.z, direction, sched.lr, sched.ckp1, self._beta(group))

    # ------------------------------------------------------------ state dicts
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name, value in self._schedule_defaults().items():
                group.setdefault(name, value)
            group.setdefault("foreach", None)
            group.setdefault(self.group_key("fused"), None)
            group.setdefault("state_dtype", None)
            group.setdefault("stochastic_rounding", False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class (or by ``schedulefree``'s class of the same name).

        Raises ValueError, before anything changes, for a checkpoint of another
        optimizer class, or whose state does not fit the parameters (a buffer
        of another shape, a complex buffer for a real parameter); the message
        names the parameter and the buffer. This optimizer's backend
        (``foreach``, ``fused``) is kept: it describes the machine, not the run.
        State comes back in the parameter's dtype, except that parameters with
        a wide master copy (``state_dtype``) keep all their state wide.
        """
        previous = [dict(g) for g in self.param_groups]
        matched = _state_checks.check_load(self, state_dict)
        super().load_state_dict(state_dict)
        if matched:
            _state_checks.settle_load(self, state_dict, previous)


def _work(p: Tensor, state: dict) -> Tensor:
    # The tensor the optimizer's arithmetic acts on: the wide master copy when
    # the group keeps state in a wider dtype than the parameter, else the parameter.
    master = state.get("master")
    return master if master is not None else p.data


def _fused_backend(device_type: str, fused: Optional[bool]) -> Any:
    """The fused implementation for a device: the C kernel on CPU; on other
    devices the compiled one, only when asked for (``fused=True``): its
    speed against foreach there has not been measured yet."""
    if device_type == "cpu":
        return _fused_cpu
    return _fused_compiled if fused else None


def interpolate_and_step(
    y: list[Tensor], z: list[Tensor], d: list[Tensor], lr: float, ckp1: float, beta: float
) -> None:
    r"""The schedule-free update of ``y`` and ``z`` given the direction ``d`` at ``y``.

    :math:`y \leftarrow \operatorname{lerp}(y, z, c) + \gamma(\beta(1-c)-1)d`,
    :math:`z \leftarrow z - \gamma d`. Equivalent to updating ``z``, averaging
    ``x`` and re-interpolating ``y``, without ever storing ``x``.
    """
    torch._foreach_lerp_(y, z, ckp1)
    torch._foreach_add_(y, d, alpha=lr * (beta * (1 - ckp1) - 1))
    torch._foreach_sub_(z, d, alpha=lr)


def _split(bucket: Bucket) -> list[Bucket]:
    return [
        Bucket([p], [g], [z], {n: [bufs[i]] for n, bufs in bucket.buffers.items()})
        for i, (p, g, z) in enumerate(zip(bucket.params, bucket.grads, bucket.z))
    ]


class ClosureForm:
    """Mixin: parameters hold ``x`` between steps; ``step(closure)`` visits ``y``.

    The closure is evaluated at ``y``, the usual update is applied, and the
    parameters return to ``x``. No :meth:`train`/:meth:`eval` calls are needed
    (they are accepted and do nothing), so evaluation code needs no changes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        for group in self.param_groups:  # type: ignore[attr-defined]
            group[self.group_key("train_mode")] = False  # type: ignore[attr-defined]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        self.param_groups[-1][self.group_key("train_mode")] = False  # type: ignore[attr-defined]

    def train(self) -> Any:
        """No-op: a closure form keeps ``x`` in the parameters between steps."""
        return self

    def eval(self) -> Any:
        """No-op: a closure form keeps ``x`` in the parameters between steps."""
        return self

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Evaluates ``closure`` at ``y`` (with gradients enabled) and steps.

        The closure must zero the gradients, compute the loss and call
        ``backward()``; its return value is returned. If it raises, the
        parameters are moved back to ``x`` before the error propagates.
        """
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step() needs a closure that computes the loss and gradients")
        engine: ScheduleFreeOptimizer = self  # type: ignore[assignment]
        for group in engine.param_groups:
            engine._params_to_y(group)
        try:
            with torch.enable_grad():
                loss = closure()
            engine._update()
        finally:
            for group in engine.param_groups:
                engine._params_to_x(group)
        return loss

