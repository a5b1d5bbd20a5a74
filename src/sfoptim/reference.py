r"""Reference forms: ``x``, ``y`` and ``z`` stored explicitly, written like the paper.

These are the specification the fast forms are tested against. They use more
memory (three extra parameter-sized buffers) and are slower, but every line is
one equation of Defazio et al. (2024), Algorithm 1:

.. math::

    z_{t+1} &= z_t - \gamma_t\,(d(y_t) + \lambda y_t) \\
    x_{t+1} &= (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1} \\
    y_{t+1} &= (1-\beta)\, z_{t+1} + \beta\, x_{t+1}

In train mode the parameters hold ``y``, in eval mode ``x``; both are copies.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from .directions.adamw import AdamWScheduleFree
from .directions.radam import RAdamScheduleFree, radam_rectification
from .directions.sgd import SGDScheduleFree
from .directions.wrapper import ScheduleFreeWrapper
from .engine import ScheduleFreeOptimizer
from .engine.step import real as _real

__all__ = [
    "SGDScheduleFreeReference",
    "AdamWScheduleFreeReference",
    "RAdamScheduleFreeReference",
    "ScheduleFreeWrapperReference",
]


class _ExplicitXYZ(ScheduleFreeOptimizer):
    """Mode switching by copying the stored ``x`` or ``y`` into the parameters."""

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if group.get("state_dtype") is not None:
            raise ValueError("Invalid state_dtype: the reference forms compute in the parameters' dtype only")

    def _init_xyz(self, p: Tensor) -> dict:
        state = self.state[p]
        if "z" not in state:
            for name in ("z", "x", "y"):
                state[name] = p.detach().clone(memory_format=torch.preserve_format)
        return state

    def _params_to_x(self, group: dict) -> None:
        for p in group["params"]:
            if "x" in self.state.get(p, {}):
                p.copy_(self.state[p]["x"])

    def _params_to_y(self, group: dict) -> None:
        for p in group["params"]:
            if "y" in self.state.get(p, {}):
                p.copy_(self.state[p]["y"])

    def _x_of(self, group: dict, p: Tensor, in_train: bool) -> Tensor:
        state = self.state.get(p)
        if state and "x" in state:
            return state["x"].clone()
        return p.detach().clone()


class _ReferenceStep(_ExplicitXYZ):
    """The paper's step for optimizers with a per-tensor base direction."""

    def _decay_point(self, group: dict, state: dict) -> Tensor:
        return state["y"]

    def _base_direction(self, group: dict, step: int, grad: Tensor, state: dict) -> Tensor:
        raise NotImplementedError

    def _update(self) -> None:
        plans = [(g, self._active_params(gi, g), self._schedule(g)) for gi, g in enumerate(self.param_groups)]
        for group, active, sched in plans:
            lr, c, beta, decay = sched.lr, sched.ckp1, self._beta(group), group["weight_decay"]
            for p in active:
                state = self._init_xyz(p)
                x, y, z = (_real(state[n]) for n in ("x", "y", "z"))
                grad = _real(p.grad)
                if decay != 0:
                    z.sub_(_real(self._decay_point(group, state)), alpha=lr * decay)
                z.sub_(self._base_direction(group, sched.step, grad, state), alpha=lr)
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_(x * beta + z * (1 - beta))
                p.copy_(state["y"])
            self._commit(group, sched)


class SGDScheduleFreeReference(_ReferenceStep, SGDScheduleFree):
    """Schedule-free SGD with ``x``, ``y``, ``z`` stored explicitly (the oracle)."""

    def _base_direction(self, group: dict, step: int, grad: Tensor, state: dict) -> Tensor:
        return grad


class AdamWScheduleFreeReference(_ReferenceStep, AdamWScheduleFree):
    """Schedule-free AdamW with ``x``, ``y``, ``z`` stored explicitly (the oracle).

    ``decay_at_z=True`` computes weight decay at ``z`` instead of ``y``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        decay_at_z: bool = False,
        foreach: Optional[bool] = False,
        inner_momentum: float = 0.0,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power, foreach, inner_momentum)
        self.defaults["decay_at_z"] = decay_at_z
        for group in self.param_groups:
            group["decay_at_z"] = decay_at_z

    def _decay_point(self, group: dict, state: dict) -> Tensor:
        return state["z"] if group.get("decay_at_z", False) else state["y"]

    def _base_direction(self, group: dict, step: int, grad: Tensor, state: dict) -> Tensor:
        beta2 = group["betas"][1]
        inner = group.get("inner_momentum", 0.0)
        v = _real(state.setdefault("exp_avg_sq", torch.zeros_like(state["z"])))
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v / (1 - beta2**step)).sqrt() + group["eps"]
        if inner > 0:
            m = _real(state.setdefault("exp_avg", torch.zeros_like(state["z"])))
            m.mul_(inner).add_(grad, alpha=1 - inner)
            return m / (1 - inner**step) / denom
        return grad / denom


class RAdamScheduleFreeReference(_ReferenceStep, RAdamScheduleFree):
    """Schedule-free RAdam with ``x``, ``y``, ``z`` stored explicitly (the oracle)."""

    def _base_direction(self, group: dict, step: int, grad: Tensor, state: dict) -> Tensor:
        beta2 = group["betas"][1]
        v = _real(state.setdefault("exp_avg_sq", torch.zeros_like(state["z"])))
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if radam_rectification(step, beta2) is None:
            return grad
        return grad / (torch.sqrt(v / (1 - beta2**step)) + group["eps"])


class ScheduleFreeWrapperReference(_ExplicitXYZ, ScheduleFreeWrapper):
    """:class:`ScheduleFreeWrapper` with ``x``, ``y``, ``z`` stored explicitly (the oracle)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._start_step(closure)
        active = [self._active_params(gi, g) for gi, g in enumerate(self.param_groups)]
        for group, params in zip(self.param_groups, active):
            decay = group["sf_weight_decay_at_y"]
            lr = self._scheduled_lr(group, group["sf_k"] + 1)
            for p in params:
                state = self._init_xyz(p)
                if decay != 0:
                    state["z"].sub_(state["y"], alpha=lr * decay)
                p.copy_(state["z"])
        self.base.step()
        for group, params in zip(self.param_groups, active):
            sched = self._schedule(group)
            beta = self._beta(group)
            for p in params:
                state = self.state[p]
                state["z"].copy_(p)
                state["x"].mul_(1 - sched.ckp1).add_(state["z"], alpha=sched.ckp1)
                state["y"].copy_(state["x"] * beta + state["z"] * (1 - beta))
                p.copy_(state["y"])
            self._commit(group, sched)
        return loss


