r"""Reference forms: ``x``, ``y`` and ``z`` stored explicitly, written like the paper.

These classes are the specification that the fast optimizers are tested
against, so they share nothing with them: each is a plain
:class:`torch.optim.Optimizer` with its own schedule, its own hyperparameter
checks and its own step. From the rest of sfoptim they take only the
exception type :class:`sfoptim.ModeError` (so that callers catch one error
whichever form they use), the check of the ``params`` argument, and two
choices of schedule-free Muon that are policies, not equations: which
parameters it orthogonalizes, and the dtype ``"auto"`` stands for on the
hardware at hand. They use more memory (three parameter-sized copies)
and are slower; every line of a step is one equation of Defazio et al. (2024),
Algorithm 1, for step :math:`t = 1, 2, \dots`:

.. math::

    \gamma_t &= \gamma \cdot \min(1, t / T_{\mathrm{warmup}})
        &&\text{(RAdam: } \gamma\, r_t \text{ instead)} \\
    z_{t} &= z_{t-1} - \gamma_t\,(d(y_{t-1}) + \lambda y_{t-1}) \\
    x_{t} &= (1 - c_t)\, x_{t-1} + c_t\, z_{t},
        \qquad c_t = \frac{w_t}{\sum_{i \le t} w_i},
        \qquad w_t = t^{r}\, (\max_{i \le t} \gamma_i)^{p} \\
    y_{t} &= (1-\beta)\, z_{t} + \beta\, x_{t}

where :math:`d` is the base direction (the gradient for SGD, Adam's
preconditioned gradient for AdamW and RAdam). While every weight so far is 0
(learning rate 0 from the start) :math:`c_t = 0`.

In train mode the parameters hold ``y``; :meth:`eval` copies ``x`` into them
and :meth:`train` copies ``y`` back. The optimizers start in train mode.
Stepping in eval mode raises :class:`sfoptim.ModeError`. Gradients are read,
never written. Complex parameters are optimized as pairs of reals. The
SGD, AdamW, RAdam and wrapper forms take the arguments of the published
``schedulefree`` classes in the same order; ``foreach`` is accepted for
compatibility and has no effect (the step is a plain loop over tensors). The
Prodigy, Muon and ScheduleFree+ forms take the arguments of sfoptim's classes
less the backend and precision options (ScheduleFree+: those of its authors'
class).

These forms are oracles for tests and a readable starting point for research
code; the helpers of :mod:`sfoptim.modes` accept only the fast optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _validation
from .directions.muon import adamw_lr_of, module_roles, param_role, resolve_ns_dtype
from .engine import ModeError

__all__ = [
    "AdamCScheduleFreePlusReference",
    "AdamWScheduleFreeReference",
    "MuonScheduleFreeReference",
    "ProdigyScheduleFreeReference",
    "RAdamScheduleFreeReference",
    "SGDScheduleFreeReference",
    "ScheduleFreeWrapperReference",
]

#: Per-group scalars of the averaging schedule, with their values before the first step.
#: The names are those of the published package, so its checkpoints load here.
_SCHEDULE_STATE = {"k": 0, "lr_max": -1.0, "weight_sum": 0.0, "scheduled_lr": 0.0}


# ----------------------------------------------------------------- checks
def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite real number)")
    return float(value)


def _check(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    if not ok(_number(name, value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {rule})")


def _check_common(group: dict, decay_key: str) -> None:
    """The checks every schedule-free group needs: rates, decay and averaging powers."""
    _check("lr", group["lr"], lambda v: v >= 0, ">= 0")
    _check(decay_key, group[decay_key], lambda v: v >= 0, ">= 0")
    _check("r", group["r"], lambda v: v >= 0, ">= 0")
    _check("weight_lr_power", group["weight_lr_power"], lambda v: v >= 0, ">= 0")
    if "warmup_steps" in group:
        steps = group["warmup_steps"]
        number = isinstance(steps, (int, float)) and not isinstance(steps, bool) and math.isfinite(steps)
        if not number or steps < 0 or steps != int(steps):
            raise ValueError(f"Invalid warmup_steps: {steps!r} (must be a whole number of steps >= 0)")
    if group.get("state_dtype") is not None:
        raise ValueError("Invalid state_dtype: the reference forms compute in the parameters' own dtype")


def _check_interpolation(name: str, value: Any) -> None:
    # beta = 0 would make y = z, from which x can no longer be told apart.
    _check(name, value, lambda v: 0 < v <= 1, "in (0, 1]")


def _check_adam(group: dict) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta, beta2))")
    _check_interpolation("betas[0]", betas[0])
    _check("betas[1]", betas[1], lambda v: 0 <= v < 1, "in [0, 1)")
    _check("eps", group["eps"], lambda v: v >= 0, ">= 0")


# --------------------------------------------------------------- schedule
def _warmup(lr: float, t: int, warmup_steps: float) -> float:
    """:math:`\\gamma \\min(1, t / T)` for the 1-based step ``t``."""
    return lr * t / warmup_steps if t <= warmup_steps else lr


def _radam_rectifier(t: int, beta2: float) -> float | None:
    """RAdam's :math:`r_t`, or None while :math:`\\rho_t \\le 4` (the variance estimate is too young)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho_t <= 4:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def _advance_average(group: dict, lr: float, t: int) -> float:
    """Records step ``t`` with learning rate ``lr`` in ``group``; returns :math:`c_t`."""
    group["scheduled_lr"] = lr
    group["lr_max"] = max(group["lr_max"], lr)
    weight = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
    group["weight_sum"] += weight
    group["k"] = t
    return weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


# ------------------------------------------------------------------ modes
class _XYZ(torch.optim.Optimizer):
    """Storage of ``x``, ``y``, ``z`` per parameter and the train/eval switch."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(_validation.param_list(params, type(self).__name__), defaults)

    def _validate(self, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group after checking its hyperparameters; it joins in the current mode."""
        mode = self.train_mode if self.param_groups else True
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group["train_mode"] = mode

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checkpoints of the published classes lack our extra hyperparameters
        # (inner_momentum): they take their defaults. torch adds
        # ``differentiable`` to ``defaults``, an option these classes do not
        # have: it stays out of the groups, so a loaded state dict saves as it was.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":
                    group.setdefault(key, value)

    @property
    def train_mode(self) -> bool:
        """True while the parameters hold ``y``."""
        return all(g["train_mode"] for g in self.param_groups)

    @torch.no_grad()
    def train(self) -> Any:
        """Copies ``y`` into the parameters. Idempotent; returns self."""
        self._copy_into_params("y")
        return self

    @torch.no_grad()
    def eval(self) -> Any:
        """Copies ``x`` into the parameters. Idempotent; returns self."""
        self._copy_into_params("x")
        return self

    def _copy_into_params(self, point: str) -> None:
        for group in self.param_groups:
            if group["train_mode"] != (point == "y"):
                for p in group["params"]:
                    if point in self.state.get(p, {}):
                        p.copy_(self.state[p][point])
                group["train_mode"] = point == "y"

    @torch.no_grad()
    def eval_params(self) -> list[Tensor]:
        """``x`` of every parameter as new tensors, in ``param_groups`` order; changes nothing."""
        return [
            (self.state[p]["x"] if "x" in self.state.get(p, {}) else p).detach().clone()
            for g in self.param_groups
            for p in g["params"]
        ]

    def _start_step(self, closure: Callable[[], Any] | None) -> Any:
        if not self.train_mode:
            raise ModeError(
                f"{type(self).__name__}.step() was called in eval mode: the parameters hold x. "
                "Call optimizer.train() before training steps."
            )
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _xyz(self, p: Tensor) -> dict:
        state = self.state[p]
        if "z" not in state:
            for name in ("x", "y", "z"):
                state[name] = p.detach().clone(memory_format=torch.preserve_format)
        return state


class _PaperStep(_XYZ):
    """Algorithm 1 for a base direction computed tensor by tensor."""

    _decay_key = "weight_decay"

    def _beta(self, group: dict) -> float:
        raise NotImplementedError

    def _lr(self, group: dict, t: int) -> float:
        return _warmup(float(group["lr"]), t, group["warmup_steps"])

    def _direction(self, group: dict, t: int, grad: Tensor, state: dict) -> Tensor:
        """The base direction :math:`d` at ``y`` (a new tensor or the gradient itself)."""
        raise NotImplementedError

    def _decay_point(self, group: dict, state: dict) -> Tensor:
        return state["y"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step with the gradients in ``p.grad``; returns the closure's loss if one is given."""
        loss = self._start_step(closure)
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        for p in (p for ps in active for p in ps):
            if p.grad.is_sparse or p.grad.shape != p.shape:
                raise RuntimeError(f"{type(self).__name__} needs a dense gradient shaped like the parameter {tuple(p.shape)}")
        for group, params in zip(self.param_groups, active):
            t = group["k"] + 1
            lr = self._lr(group, t)
            c = _advance_average(group, lr, t)
            beta, decay = self._beta(group), group[self._decay_key]
            for p in params:
                state = self._xyz(p)
                x, y, z = (_real(state[n]) for n in ("x", "y", "z"))
                d = self._direction(group, t, _real(p.grad), state)
                if decay != 0:
                    z.sub_(_real(self._decay_point(group, state)), alpha=lr * decay)
                z.sub_(d, alpha=lr)
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_((1 - beta) * z + beta * x)
                p.copy_(state["y"])
        return loss


# ------------------------------------------------------------- optimizers
class SGDScheduleFreeReference(_PaperStep):
    r"""Schedule-free SGD with ``x``, ``y``, ``z`` stored: :math:`d = g(y)`, :math:`\beta` = ``momentum``.

    Same arguments and defaults as the published ``schedulefree.SGDScheduleFreeReference``
    (``foreach`` has no effect). See the module docstring for the step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
            weight_lr_power=weight_lr_power, train_mode=True, **_SCHEDULE_STATE,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        _check_common(group, "weight_decay")
        _check_interpolation("momentum", group["momentum"])

    def _beta(self, group: dict) -> float:
        return group["momentum"]

    def _direction(self, group: dict, t: int, grad: Tensor, state: dict) -> Tensor:
        return grad


def _adam_denominator(group: dict, t: int, grad: Tensor, state: dict) -> Tensor:
    r""":math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2`; returns :math:`\sqrt{v_t / (1-\beta_2^t)} + \epsilon`."""
    beta2 = group["betas"][1]
    if "exp_avg_sq" not in state:
        state["exp_avg_sq"] = torch.zeros_like(state["z"])
    v = _real(state["exp_avg_sq"])
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return (v / (1 - beta2**t)).sqrt() + group["eps"]


class AdamWScheduleFreeReference(_PaperStep):
    r"""Schedule-free AdamW with ``x``, ``y``, ``z`` stored.

    :math:`d = \hat m / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon)` with :math:`\hat m = g`,
    or with ``inner_momentum`` :math:`\mu > 0` the bias-corrected EMA
    :math:`m_t = \mu m_{t-1} + (1-\mu) g`, :math:`\hat m = m_t / (1-\mu^t)`;
    :math:`\beta` = ``betas[0]``. ``decay_at_z=True`` computes weight decay at
    ``z`` instead of ``y``.

    The arguments up to ``foreach`` are those of the published
    ``schedulefree.AdamWScheduleFreeReference`` (``foreach`` has no effect);
    ``inner_momentum`` is an extra.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0,
        weight_lr_power: float = 2,
        decay_at_z: bool = False,
        foreach: bool | None = False,
        inner_momentum: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
            weight_lr_power=weight_lr_power, decay_at_z=decay_at_z, inner_momentum=inner_momentum,
            train_mode=True, **_SCHEDULE_STATE,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        _check_common(group, "weight_decay")
        _check_adam(group)
        _check("inner_momentum", group["inner_momentum"], lambda v: 0 <= v < 1, "in [0, 1)")

    def _beta(self, group: dict) -> float:
        return group["betas"][0]

    def _decay_point(self, group: dict, state: dict) -> Tensor:
        return state["z"] if group["decay_at_z"] else state["y"]

    def _direction(self, group: dict, t: int, grad: Tensor, state: dict) -> Tensor:
        denom = _adam_denominator(group, t, grad, state)
        mu = group["inner_momentum"]
        if mu == 0:
            return grad / denom
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(state["z"])
        m = _real(state["exp_avg"])
        m.mul_(mu).add_(grad, alpha=1 - mu)
        return m / (1 - mu**t) / denom


class RAdamScheduleFreeReference(_PaperStep):
    r"""Schedule-free RAdam with ``x``, ``y``, ``z`` stored.

    :math:`\gamma_t = \gamma r_t` (:math:`r_t` RAdam's rectifier) and Adam's
    direction once :math:`r_t` exists (:math:`\rho_t > 4`). Before that the
    step is an SGD step (:math:`\gamma_t = \gamma`, :math:`d = g`), or no step
    at all (:math:`\gamma_t = 0`) with ``silent_sgd_phase=True``; the second
    moment accumulates either way. There is no warmup.

    Same arguments, order and defaults as the published
    ``schedulefree.RAdamScheduleFree`` (``foreach`` has no effect).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
        silent_sgd_phase: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r, weight_lr_power=weight_lr_power,
            silent_sgd_phase=silent_sgd_phase, train_mode=True, **_SCHEDULE_STATE,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        _check_common(group, "weight_decay")
        _check_adam(group)

    def _beta(self, group: dict) -> float:
        return group["betas"][0]

    def _lr(self, group: dict, t: int) -> float:
        rect = _radam_rectifier(t, group["betas"][1])
        if rect is None:
            rect = 0.0 if group["silent_sgd_phase"] else 1.0
        return float(group["lr"]) * rect

    def _direction(self, group: dict, t: int, grad: Tensor, state: dict) -> Tensor:
        denom = _adam_denominator(group, t, grad, state)
        if _radam_rectifier(t, group["betas"][1]) is None:
            return grad
        return grad / denom


class ProdigyScheduleFreeReference(_XYZ):
    r"""Schedule-free Prodigy with ``x``, ``y``, ``z`` stored (the authors' AlgoPerf algorithm).

    For step :math:`t`, with :math:`d` the estimate so far, :math:`\gamma_t`
    the learning rate after warmup, :math:`a_t = d^2\gamma_t` and
    :math:`\rho = \sqrt{\beta_2}`:

    .. math::

        n_t &= \rho\, n_{t-1} + a_t \textstyle\sum_p \langle g_p,\, x_{0,p} - z_p \rangle,
            \qquad s_p \leftarrow \rho\, s_p + a_t g_p,
            \qquad d' = \max(d,\; \min(\kappa d,\; c_d\, n_t / \textstyle\sum_p \|s_p\|_1)) \\
        v_p &\leftarrow \beta_2 v_p + (1-\beta_2)\, d^2 g_p^2, \qquad
        u_p = d' g_p / (\sqrt{v_p} + d'\epsilon), \qquad
        z_p \leftarrow z_p - d\gamma_t \bigl(u_p / \max(1, \tfrac{d}{d'} \sqrt{1-\beta_2^t}\, \mathrm{RMS}(u_p)/c) + \lambda y_p\bigr) \\
        x_p &\leftarrow (1 - c_t)\, x_p + c_t z_p, \qquad
        c_t = \frac{w_t}{\sum_{i \le t} w_i}, \qquad w_t = t^r (\max_{i \le t} d_i\gamma_i)^{p},
        \qquad y_p = (1-\beta) z_p + \beta x_p

    with :math:`\kappa` = ``d_growth`` (no limit when None), :math:`c` =
    ``update_clip`` (no clipping when None), the RMS over the elements of
    each parameter, and :math:`(r, p)` =
    (0, 2) for ``averaging="lr"``, (0.75, 0) for ``"algoperf"`` unless given.
    The sums run over all parameters, or over each group alone with
    ``split_groups=True``. While :math:`\sum_p \|s_p\|_1 = 0` neither :math:`d`
    nor :math:`n` changes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        averaging: str = "lr",
        r: float | None = None,
        weight_lr_power: float | None = None,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        d_growth: float | None = 2**0.5,
        update_clip: float | None = 1.0,
        split_groups: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, averaging=averaging,
            r=r, weight_lr_power=weight_lr_power, d0=d0, d_coef=d_coef, d_growth=d_growth, update_clip=update_clip,
            split_groups=split_groups,
            train_mode=True, **_SCHEDULE_STATE,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        if group["averaging"] not in ("lr", "algoperf"):
            raise ValueError(f"Invalid averaging: {group['averaging']!r} (expected 'algoperf' or 'lr')")
        r, power = (0.0, 2.0) if group["averaging"] == "lr" else (0.75, 0.0)
        group["r"] = r if group["r"] is None else group["r"]
        group["weight_lr_power"] = power if group["weight_lr_power"] is None else group["weight_lr_power"]
        _check_common(group, "weight_decay")
        _check_adam(group)
        if group["d_growth"] is not None:
            _check("d_growth", group["d_growth"], lambda v: v > 1, "> 1")
        if group["update_clip"] is not None:
            _check("update_clip", group["update_clip"], lambda v: 0 < v < math.inf, "> 0")
        _check("d0", group["d0"], lambda v: 0 < v < math.inf, "> 0")
        _check("d_coef", group["d_coef"], lambda v: 0 < v < math.inf, "> 0")
        if not isinstance(group["split_groups"], bool):
            raise ValueError(f"Invalid split_groups: {group['split_groups']!r} (expected True or False)")
        # A group that joins the shared estimate takes its current value.
        shared = [g for g in self.param_groups if g is not group and not g["split_groups"] and "d" in g]
        source = shared[0] if shared and not group["split_groups"] else {"d": float(group["d0"]), "d_numerator": 0.0}
        group.setdefault("d", source["d"])
        group.setdefault("d_numerator", source["d_numerator"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step with the gradients in ``p.grad``; returns the closure's loss if one is given."""
        loss = self._start_step(closure)
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        for p in (p for ps in active for p in ps):
            if p.grad.is_sparse or p.grad.shape != p.shape:
                raise RuntimeError(f"{type(self).__name__} needs a dense gradient shaped like the parameter {tuple(p.shape)}")
        # First pass: the sums, over the shared groups or each split group.
        sums: dict[Any, list[float]] = {}
        for gi, (group, params) in enumerate(zip(self.param_groups, active)):
            t = group["k"] + 1
            a = group["d"] ** 2 * _warmup(float(group["lr"]), t, group["warmup_steps"])
            rho = math.sqrt(group["betas"][1])
            total = sums.setdefault(gi if group["split_groups"] else "shared", [0.0, 0.0])
            for p in params:
                state = self._prodigy_state(p)
                g, z, p0, s = (_real(t) for t in (p.grad, state["z"], state["p0"], state["s"]))
                total[0] += a * float((g * (p0 - z)).sum())
                total[1] += float((rho * s + a * g).abs().sum())
        # Second pass: the new estimate, then the paper's step with it.
        for gi, (group, params) in enumerate(zip(self.param_groups, active)):
            t = group["k"] + 1
            gamma = _warmup(float(group["lr"]), t, group["warmup_steps"])
            d, beta2 = group["d"], group["betas"][1]
            rho = math.sqrt(beta2)
            numerator, denominator = sums.get(gi if group["split_groups"] else "shared", [0.0, 0.0])
            if denominator > 0:
                n_new = rho * group["d_numerator"] + numerator
                estimate = group["d_coef"] * n_new / denominator
                if group["d_growth"] is not None:
                    estimate = min(estimate, group["d_growth"] * d)
                d_new = max(d, estimate)
            else:
                n_new, d_new = group["d_numerator"], d
            c = _advance_average(group, d * gamma, t)
            beta, decay = group["betas"][0], group["weight_decay"]
            for p in params:
                state = self.state[p]
                x, y, z, v, s = (_real(state[n]) for n in ("x", "y", "z", "exp_avg_sq", "s"))
                g = _real(p.grad)
                v.mul_(beta2).addcmul_(g, g, value=(1 - beta2) * d * d)
                s.mul_(rho).add_(g, alpha=d * d * gamma)
                u = d_new * g / (v.sqrt() + d_new * group["eps"])
                if group["update_clip"] is not None and u.numel():
                    rms = math.sqrt(float(u.square().mean()))
                    u = u / max(1.0, (d / d_new) * math.sqrt(1 - beta2**t) * rms / group["update_clip"])
                z.sub_(d * gamma * (u + decay * y))
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_((1 - beta) * z + beta * x)
                p.copy_(state["y"])
            group["d"], group["d_numerator"] = d_new, n_new
        return loss

    def _prodigy_state(self, p: Tensor) -> dict:
        state = self._xyz(p)
        if "p0" not in state:
            state["p0"] = p.detach().clone(memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["z"])
            state["s"] = torch.zeros_like(state["z"])
        return state


class ScheduleFreeWrapperReference(_XYZ):
    r"""Any optimizer made schedule-free, with ``x``, ``y``, ``z`` stored.

    The base optimizer moves ``z``: the wrapper puts
    :math:`z_{t-1} - \gamma\lambda y_{t-1}` into the parameters (weight decay
    at ``y``, with the base group's ``lr``), the base steps them with the
    gradient taken at :math:`y_{t-1}`, and the result is :math:`z_t`. The
    averaging weights use the base's learning rate times ``group["d"]`` where
    the base keeps one (D-Adaptation style); there is no warmup.

    The wrapper's hyperparameters and schedule live in its own
    ``param_groups`` (one per base group, same parameters); the learning rate
    is always the base optimizer's, so schedule it on ``base``. The state dict
    holds the base optimizer's under ``"base"``. Same arguments, order and
    defaults as the published ``schedulefree.ScheduleFreeWrapperReference``.
    """

    _OWN_KEYS = ("momentum", "weight_decay_at_y", "r", "weight_lr_power")

    def __init__(
        self,
        base: torch.optim.Optimizer,
        momentum: float = 0.9,
        weight_decay_at_y: float = 0.0,
        r: float = 0,
        weight_lr_power: float = 2,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"Invalid base: expected a torch.optim.Optimizer, got {type(base).__name__}")
        if any(g.get("state_dtype") is not None for g in base.param_groups):
            raise ValueError("Invalid state_dtype: the reference forms compute in the parameters' own dtype")
        self.base = base
        defaults = dict(
            momentum=momentum, weight_decay_at_y=weight_decay_at_y, r=r, weight_lr_power=weight_lr_power,
            train_mode=True, **_SCHEDULE_STATE,
        )
        super().__init__([{"params": g["params"]} for g in base.param_groups], defaults)

    def _validate(self, group: dict) -> None:
        _check_interpolation("momentum", group["momentum"])
        for name in ("weight_decay_at_y", "r", "weight_lr_power"):
            _check(name, group[name], lambda v: v >= 0, ">= 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer and the matching one here.

        Keys named like the wrapper's arguments (``momentum``, ...) set the
        wrapper's group; every other key goes to the base optimizer.
        """
        if len(self.param_groups) < len(self.base.param_groups):
            super().add_param_group(param_group)  # construction: mirroring the base's groups
            return
        own = {k: param_group[k] for k in self._OWN_KEYS if k in param_group}
        self.base.add_param_group({k: v for k, v in param_group.items() if k not in own})
        try:
            super().add_param_group({"params": self.base.param_groups[-1]["params"], **own})
        except ValueError:
            self.base.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: the base optimizer moves ``z`` with the gradient at ``y``."""
        loss = self._start_step(closure)
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        for group, base_group, params in zip(self.param_groups, self.base.param_groups, active):
            lr_decay = float(base_group["lr"]) * group["weight_decay_at_y"]
            for p in params:
                state = self._xyz(p)
                p.copy_(state["z"] - lr_decay * state["y"])
        try:
            self.base.step()
        except BaseException:
            for p in (p for ps in active for p in ps):
                p.copy_(self.state[p]["y"])
            raise
        for group, base_group, params in zip(self.param_groups, self.base.param_groups, active):
            t = group["k"] + 1
            c = _advance_average(group, float(base_group["lr"]) * float(base_group.get("d", 1.0)), t)
            beta = group["momentum"]
            for p in params:
                state = self.state[p]
                x, y, z = (_real(state[n]) for n in ("x", "y", "z"))
                z.copy_(_real(p.detach()))
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_((1 - beta) * z + beta * x)
                p.copy_(state["y"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state (``x``, ``y``, ``z``, schedule) with the base optimizer's under ``"base"``."""
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict produced by :meth:`state_dict` into the wrapper and its base optimizer."""
        if "base" not in state_dict:
            raise ValueError("Invalid state_dict: it has no 'base' entry (the base optimizer's state)")
        self.base.load_state_dict(state_dict["base"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "base"})


# ------------------------------------------------------------------ Muon
def _orthogonalize(m: Tensor, group: dict) -> Tensor:
    r"""Newton-Schulz: :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, from :math:`m/\lVert m\rVert_F`.

    Wide orientation (rows <= columns) so that :math:`A` is the small Gram
    matrix; normalized in ``m``'s dtype, then iterated in ``ns_dtype`` (None:
    ``m``'s own), returned in ``m``'s.
    """
    a, b, c = group["ns_coefficients"]
    wide = m.shape[0] <= m.shape[1]
    ns_dtype = resolve_ns_dtype(group["ns_dtype"], m.device)
    x = m if wide else m.T
    x = (x / x.norm().clamp(min=group["ns_eps"])).to(m.dtype if ns_dtype is None else ns_dtype)
    for _ in range(group["ns_steps"]):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(m.dtype)


class MuonScheduleFreeReference(_XYZ):
    r"""Schedule-free Muon with ``x``, ``y``, ``z`` stored; AdamW's direction on the other parameters.

    Same arguments and defaults as :class:`sfoptim.MuonScheduleFree` (less
    ``foreach``, ``fused`` and the precision options) and the same split of
    groups. Per step :math:`t`, for every parameter of a group:

    .. math::

        z &\leftarrow z - \gamma_t \lambda p - \gamma_t d,
            \quad p = z \text{ or } y \text{ (decay\_at)} \\
        x &\leftarrow (1 - c_t) x + c_t z, \qquad y \leftarrow (1-\beta) z + \beta x

    where, for a matrix :math:`G` (the gradient reshaped to ``shape[0]`` rows):
    :math:`B \leftarrow \mu B + (1-\mu) G`, :math:`U = (1-\mu) G + \mu B`
    (nesterov) or :math:`B`, :math:`O = \mathrm{NS}(U)`, NorMuon's
    :math:`v \leftarrow \beta_2 v + (1-\beta_2)\,\mathrm{rowmean}(O^2)`,
    :math:`O \leftarrow (O / (\sqrt v + 10^{-10}))\,\lVert O\rVert / \lVert\cdot\rVert`,
    and :math:`d = s\,O` with :math:`s = \sqrt{\max(1, A/B)}` or
    :math:`0.2\sqrt{\max(A,B)}`; for the rest Adam's
    :math:`g / (\sqrt{v/(1-\beta_2^t)} + \epsilon)`. With ``beta_horizon``
    :math:`T_0` the weight of the ``y`` the gradient of step :math:`s` is taken
    at is :math:`1 - ((T_0-1)/(s-1))^\rho (1-\beta)` once :math:`s > T_0` (``beta_horizon="warmup"``:
    :math:`T_0` = ``warmup_steps``).
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        lr: float | Tensor = 0.016,
        beta: float = 0.9,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        decay_at: str = "z",
        warmup_steps: int = 20,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | str | None = "auto",
        adjust_lr_fn: str | None = "match_rms_adamw",
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        beta_horizon: int | str | None = None,
        beta_power: float = 1.0,
        adamw_lr: float | None = None,
        adamw_beta2: float = 0.999,
        adamw_eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr, beta=beta, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, decay_at=decay_at,
            warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, ns_coefficients=ns_coefficients,
            ns_steps=ns_steps, ns_eps=ns_eps, ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn, normuon=normuon,
            normuon_beta2=normuon_beta2, beta_horizon=beta_horizon, beta_power=beta_power, adamw_lr=adamw_lr,
            adamw_beta2=adamw_beta2, adamw_eps=adamw_eps, use_muon=None, train_mode=True, **_SCHEDULE_STATE,
        )  # fmt: skip
        if isinstance(params, nn.Module):
            self._module_roles = module_roles(params)
            params = list(params.named_parameters())
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Matrices (``ndim >= 2``, unnamed or not named like an embedding or head) in one group, the rest in another."""
        if param_group.get("use_muon") is not None:
            group = dict(param_group)
            if not group["use_muon"] and "lr" not in group:
                group["lr"] = adamw_lr_of(group, self.defaults)
            super().add_param_group(group)
            return
        named = list(param_group["params"])
        if named and not isinstance(named[0], tuple):
            names = param_group.get("param_names") or [None] * len(named)
            named = list(zip(names, named))
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        roles = getattr(self, "_module_roles", None)
        muon = [(n, p) for n, p in named if param_role(p, n, roles) == "muon"]
        other = [(n, p) for n, p in named if param_role(p, n, roles) != "muon"]
        for use_muon, members in ((True, muon), (False, other)):
            if members or (use_muon and not other):
                group = dict(rest, use_muon=use_muon, params=[p for _, p in members])
                if not use_muon:
                    group["lr"] = adamw_lr_of(rest, self.defaults)
                super().add_param_group(group)

    def _validate(self, group: dict) -> None:
        _check_common(group, "weight_decay")
        _check_interpolation("beta", group["beta"])
        _check("momentum", group["momentum"], lambda v: 0 <= v < 1, "in [0, 1)")
        _check("normuon_beta2", group["normuon_beta2"], lambda v: 0 <= v < 1, "in [0, 1)")
        _check("adamw_beta2", group["adamw_beta2"], lambda v: 0 <= v < 1, "in [0, 1)")
        if group["adamw_lr"] is not None:
            _check("adamw_lr", group["adamw_lr"], lambda v: v >= 0, ">= 0")
        for name in ("ns_eps", "beta_power", "adamw_eps"):
            _check(name, group[name], lambda v: v >= 0, ">= 0")
        if group["decay_at"] not in ("z", "y"):
            raise ValueError(f"Invalid decay_at: {group['decay_at']!r} (expected 'z' or 'y')")
        if group["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}")
        if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
            raise ValueError(f"Invalid ns_steps: {group['ns_steps']!r} (expected a whole number in [1, 100))")
        horizon = group["beta_horizon"]
        if horizon == "warmup":
            if group["warmup_steps"] < 1:
                raise ValueError("Invalid beta_horizon: 'warmup' needs warmup_steps >= 1")
        elif horizon is not None and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"Invalid beta_horizon: {horizon!r} (expected None, 'warmup' or a whole number >= 1)")

    def _beta(self, group: dict, s: int) -> float:
        """The weight of the ``y`` at which the gradient of step ``s`` is taken."""
        horizon = group["warmup_steps"] if group["beta_horizon"] == "warmup" else group["beta_horizon"]
        if horizon is None or s <= horizon:
            return group["beta"]
        return 1 - ((horizon - 1) / (s - 1)) ** group["beta_power"] * (1 - group["beta"])

    def _muon_direction(self, group: dict, grad: Tensor, state: dict) -> Tensor:
        mu = group["momentum"]
        u = grad
        if mu > 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buf = state["momentum_buffer"]
            buf.copy_(mu * buf + (1 - mu) * grad)
            u = (1 - mu) * grad + mu * buf if group["nesterov"] else buf
        if grad.numel() == 0:  # a matrix without elements: nothing to orthogonalize
            return torch.zeros_like(grad)
        g = u.reshape(grad.shape[0], -1)
        o = _orthogonalize(g, group)
        if group["normuon"]:
            if "normuon_v" not in state:
                state["normuon_v"] = torch.zeros(g.shape[0], 1, dtype=g.dtype)
            v, beta2 = state["normuon_v"], group["normuon_beta2"]
            v.copy_(beta2 * v + (1 - beta2) * (o * o).mean(dim=1, keepdim=True))
            normalized = o / (v.sqrt() + 1e-10)
            o = normalized * (o.norm() / (normalized.norm() + 1e-10))
        rows, cols = g.shape
        scale = 0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
        return (scale * o).reshape(grad.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step with the gradients in ``p.grad``; returns the closure's loss if one is given."""
        loss = self._start_step(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            t = group["k"] + 1
            lr = _warmup(float(group["lr"]), t, group["warmup_steps"])
            c = _advance_average(group, lr, t)
            beta, decay = self._beta(group, t + 1), group["weight_decay"]
            for p in params:
                state = self._xyz(p)
                x, y, z = state["x"], state["y"], state["z"]
                if group["use_muon"]:
                    d = self._muon_direction(group, p.grad, state)
                else:
                    group_adam = {"betas": (beta, group["adamw_beta2"]), "eps": group["adamw_eps"]}
                    d = p.grad / _adam_denominator(group_adam, t, p.grad, state)
                z.sub_(z if group["decay_at"] == "z" else y, alpha=lr * decay)
                z.sub_(d, alpha=lr)
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_((1 - beta) * z + beta * x)
                p.copy_(y)
        return loss


# ------------------------------------------------------- ScheduleFree+
def _annealed_beta(group: dict, t: int) -> float:
    r""":math:`\beta_t`: ``sf_beta1`` moved towards ``sf_beta1_max`` linearly in :math:`\log(1-\beta)`.

    Progress is :math:`\min(1, (t-1)/T)` over ``sf_beta1_anneal_steps`` = :math:`T`
    (no annealing when :math:`T = 0`).
    """
    steps = group["sf_beta1_anneal_steps"]
    if steps <= 0:
        return group["sf_beta1"]
    s = min(max(t - 1, 0) / steps, 1.0)
    return 1 - (1 - group["sf_beta1"]) ** (1 - s) * (1 - group["sf_beta1_max"]) ** s


class AdamCScheduleFreePlusReference(_XYZ):
    r"""ScheduleFree+ (AdamC decay, Polyak step size, interpolation annealing) with ``x``, ``y``, ``z`` stored.

    Step :math:`t` with loss :math:`f` at :math:`y_{t-1}` and gradients :math:`g`:

    .. math::

        \beta_t &= 1 - (1-\beta)^{1-s}(1-\beta_{\max})^{s}, \quad s = \min(1, (t-1)/T) \\
        e_t &= \rho\, e_{t-1} + (1-\rho)\sqrt{\pi/2}\, \textstyle\sum \|g\|_1,
            \qquad \bar e_t = e_t / (1-\rho^t) \\
        \eta_t &= \max\big(0,\ f + \beta_t \textstyle\sum \langle g, z_{t-1} - x_{t-1}\rangle\big) / \bar e_t \\
        \gamma_t &= \max(\gamma, \epsilon)\, \eta_t \\
        m_t &= \beta_1 m + (1-\beta_1) g, \quad v_t = \beta_2 v + (1-\beta_2) g^2 \\
        z_t &= z_{t-1} - \gamma_t^2 \lambda\, y_{t-1}
              - \gamma_t \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} \\
        x_t &= (1-c_t) x_{t-1} + c_t z_t, \quad y_t = \beta_t x_t + (1-\beta_t) z_t

    Sums run over every parameter of every group. :math:`\rho` is
    ``polyak_beta``; :math:`e` is stored bias-corrected (the next step's EMA
    starts from :math:`\bar e`), as the authors' code does. ``c_t = 1`` for
    :math:`t \le` ``c_warmup`` (``weight_sum`` does not grow then); afterwards
    :math:`c_t = w_t/\sum w` with :math:`w_t = t^r \gamma_{\max}^p`, where
    :math:`\gamma_{\max}` starts at :math:`\epsilon`. If every gradient is zero
    the step size is 0; if no parameter has a gradient it is 0 too and
    :math:`e` is kept. A parameter without a gradient keeps ``x`` and ``z``
    and its ``y`` is rebuilt with :math:`\beta_t` (the authors' code leaves its
    ``y`` as built with an earlier :math:`\beta` while annealing).

    The loss reaches the step as ``step(closure)`` (its return value),
    ``step(loss=f)`` or ``step_func(f)`` (the authors' spelling). Arguments and
    defaults are those of the authors' ``AdamCScheduleFreePlusPaper``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        sf_beta1: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0,
        polyak_beta: float = 0,
        c_warmup: int = 0,
        sf_beta1_anneal_steps: int = 0,
        sf_beta1_max: float = 0.965,
        weight_lr_power: float = 2,
        *,
        guards: bool = False,
        warmup_steps: int = 0,
        lr_cap: float | None = None,
        growth_limit: float | None = None,
        loss_beta: float = 0,
        f_star: float = 0.0,
        estimate_f_star: bool = False,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, sf_beta1=sf_beta1, eps=eps, weight_decay=weight_decay, r=r,
            polyak_beta=polyak_beta, c_warmup=c_warmup, sf_beta1_anneal_steps=sf_beta1_anneal_steps,
            sf_beta1_max=sf_beta1_max, weight_lr_power=weight_lr_power, train_mode=True,
            k=0, weight_sum=0.0, scheduled_lr=0.0, grad_l1_ema=0.0,
        )
        if guards:
            defaults.update(
                warmup_steps=warmup_steps, lr_cap=lr_cap, growth_limit=growth_limit, loss_beta=loss_beta,
                f_star=f_star, estimate_f_star=estimate_f_star, loss_ema=0.0, polyak_max=0.0, f_star_estimate=f_star,
            )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("lr_max", group["eps"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("lr_max", self.param_groups[-1]["eps"])

    def _validate(self, group: dict) -> None:
        if group["c_warmup"] is None:
            group["c_warmup"] = group.get("warmup_steps", 0)
        _check_common(group, "weight_decay")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        _check("betas[0]", betas[0], lambda v: 0 <= v < 1, "in [0, 1)")
        _check("betas[1]", betas[1], lambda v: 0 <= v < 1, "in [0, 1)")
        _check("eps", group["eps"], lambda v: v >= 0, ">= 0")
        _check("polyak_beta", group["polyak_beta"], lambda v: 0 <= v < 1, "in [0, 1)")
        annealing = group["sf_beta1_anneal_steps"] > 0
        for name in ("sf_beta1", "sf_beta1_max"):
            _check(name, group[name], (lambda v: 0 < v < 1) if annealing else (lambda v: 0 < v <= 1),
                   "in (0, 1)" if annealing else "in (0, 1]")  # fmt: skip
        for name in ("c_warmup", "sf_beta1_anneal_steps"):
            _check(name, group[name], lambda v: v >= 0 and v == int(v), "a whole number >= 0")
        if "loss_beta" in group:
            _check("warmup_steps", group["warmup_steps"], lambda v: v >= 0 and v == int(v), "a whole number >= 0")
            if group["lr_cap"] is not None:
                _check("lr_cap", group["lr_cap"], lambda v: 0 < v < math.inf, "> 0 and finite")
            if group["growth_limit"] is not None:
                _check("growth_limit", group["growth_limit"], lambda v: 1 <= v < math.inf, ">= 1 and finite")
            _check("loss_beta", group["loss_beta"], lambda v: 0 <= v < 1, "in [0, 1)")
            _check("f_star", group["f_star"], math.isfinite, "finite")
            if not isinstance(group["estimate_f_star"], bool):
                raise ValueError(f"Invalid estimate_f_star: {group['estimate_f_star']!r} (expected True or False)")

    def _polyak(self, group: dict, t: int, f: float, l1: float, ip: float, any_gradient: bool) -> float:
        """The step size over ``max(lr, eps)``; records the group's estimates.

        Without ``guards`` (the authors' rule) the estimates of the first group
        are used and stored, bias-corrected, in every group. With ``guards``
        each group keeps its own, bias-corrected once at use.
        """
        guarded = "loss_beta" in group
        rho = group["polyak_beta"]
        if not any_gradient:  # no gradient anywhere: an empty step, the estimates kept
            return 0.0
        ema = rho * group["grad_l1_ema"] + (1 - rho) * l1 * math.sqrt(math.pi / 2)
        corrected = ema / (1 - rho**t)
        if not guarded:
            for g in self.param_groups:
                g["grad_l1_ema"] = corrected
            return max(0.0, f + ip) / corrected if corrected > 0 else 0.0
        group["grad_l1_ema"] = ema
        group["loss_ema"] = group["loss_beta"] * group["loss_ema"] + (1 - group["loss_beta"]) * f
        h = group["loss_ema"] / (1 - group["loss_beta"] ** t) + ip
        low = group["f_star"]
        if group["estimate_f_star"]:
            low = group["f_star_estimate"] if h >= group["f_star_estimate"] else max(group["f_star"], h / 2)
        eta = max(0.0, h - low) / corrected if corrected > 0 else 0.0
        if group["growth_limit"] is not None and group["polyak_max"] > 0:
            eta = min(eta, group["growth_limit"] * group["polyak_max"])
        group["polyak_max"] = max(group["polyak_max"], eta)
        if t < group["warmup_steps"]:
            eta *= t / group["warmup_steps"]
        multiplier = max(float(group["lr"]), group["eps"])
        if group["lr_cap"] is not None:
            eta = min(eta, group["lr_cap"] / multiplier)
        if group["estimate_f_star"]:
            group["f_star_estimate"] = max(group["f_star"], h - 0.5 * eta * corrected)
        return eta

    @torch.no_grad()
    def step_func(self, function_value: float | Tensor | None = None) -> Any:
        """One step with the loss ``function_value`` at ``y``; returns it (the authors' interface)."""
        self.step(loss=function_value)
        return function_value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None) -> Any:
        """One step; the loss is ``loss`` if given, else the closure's return value."""
        if closure is None and loss is None:
            raise TypeError(f"{type(self).__name__}.step() needs the loss: pass a closure that returns it, or loss=")
        value = self._start_step(closure)
        f = loss if loss is not None else value
        if f is None:
            raise TypeError(f"{type(self).__name__}.step(): the closure returned None; it must return the loss")
        f = float(f)
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        first = self.param_groups[0]
        l1 = 0.0
        ip = 0.0
        for group, params in zip(self.param_groups, active):
            beta = _annealed_beta(group, group["k"] + 1)
            for p in params:
                state = self._xyz(p)
                g = _real(p.grad)
                l1 += g.abs().sum().item()
                ip += beta * (g * (_real(state["z"]) - _real(state["x"]))).sum().item()
        stepped = any(active)
        shared = None if "loss_beta" in first else self._polyak(first, first["k"] + 1, f, l1, ip, stepped)
        for group, params in zip(self.param_groups, active):
            t = group["k"] + 1
            beta, (beta1, beta2), eps = _annealed_beta(group, t), group["betas"], group["eps"]
            eta = shared if shared is not None else self._polyak(group, t, f, l1, ip, stepped)
            lr = max(float(group["lr"]), eps) * eta
            group["scheduled_lr"] = lr
            group["lr_max"] = max(group["lr_max"], lr)
            if t <= group["c_warmup"]:
                c = 1.0
            else:
                w = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
                group["weight_sum"] += w
                c = w / group["weight_sum"]
            group["k"] = t
            for p in group["params"]:
                if p.grad is None and "z" in self.state.get(p, {}):
                    # Not stepped: x and z stay, y follows this step's interpolation weight.
                    state = self.state[p]
                    _real(state["y"]).copy_(beta * _real(state["x"]) + (1 - beta) * _real(state["z"]))
                    p.copy_(state["y"])
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(state["z"])
                    state["exp_avg_sq"] = torch.zeros_like(state["z"])
                x, y, z, m, v = (_real(state[n]) for n in ("x", "y", "z", "exp_avg", "exp_avg_sq"))
                g = _real(p.grad)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                d = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
                z.sub_(y, alpha=lr * lr * group["weight_decay"])
                z.sub_(d, alpha=lr)
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_(beta * x + (1 - beta) * z)
                p.copy_(state["y"])
        return value
