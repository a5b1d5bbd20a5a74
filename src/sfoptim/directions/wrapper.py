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

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _fused_cpu, _validation
from .engine import ScheduleFreeOptimizer, _real

__all__ = ["ScheduleFreeWrapper"]


def _swap(a: Tensor, b: Tensor) -> None:
    """Exchanges the contents of two same-shaped tensors."""
    if type(a.data) is Tensor and type(b.data) is Tensor:
        # Exchanging storages is free and leaves ``a.grad`` and object identity alone.
        tmp = a.data
        a.data = b.data
        b.data = tmp
    else:
        tmp = a.detach().clone()
        a.copy_(b)
        b.copy_(tmp)


class ScheduleFreeWrapper(ScheduleFreeOptimizer):
    r"""Makes any optimizer schedule-free.

    Args:
        base_optimizer: the optimizer that moves ``z`` (SGD, Adam, RMSprop,
            Adagrad, ...). Its weight decay, if any, acts at ``z``. Its
            ``param_groups`` are shared with the wrapper, so an LR scheduler may
            be attached to either. Its learning rate (times ``group["d"]`` for
            D-Adaptation style optimizers) sets the averaging weights.
        momentum: interpolation weight :math:`\beta \in (0, 1]` (default 0.9);
            the base optimizer's own momentum can usually be turned off.
        weight_decay_at_y: weight decay computed at ``y`` (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        fused: the wrapper's own ``x``/``y`` bookkeeping in one pass per
            tensor (CPU, float32/float64): ``None`` (default) wherever it runs,
            ``True`` warns once where it cannot, ``False`` never. The base
            optimizer's step is its own (pass ``fused=True`` to it if it has one).

    Example::

        base = torch.optim.RMSprop(model.parameters(), lr=2e-3)
        opt = sfoptim.ScheduleFreeWrapper(base, momentum=0.9, weight_decay_at_y=0.1)
    """

    _key_prefix = "sf_"
    _decay_key = "sf_weight_decay_at_y"

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        momentum: float = 0.9,
        weight_decay_at_y: float = 0.0,
        r: float = 0,
        weight_lr_power: float = 2,
        fused: Optional[bool] = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid base_optimizer: expected a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, ScheduleFreeOptimizer):
            raise TypeError("Invalid base_optimizer: it is already schedule-free; wrap a plain optimizer instead")
        self.base = base_optimizer
        defaults = {
            "sf_momentum": momentum,
            "sf_weight_decay_at_y": weight_decay_at_y,
            "sf_r": r,
            "sf_weight_lr_power": weight_lr_power,
            "sf_fused": fused,
        }
        # Registering the base optimizer's own group dicts makes both objects
        # read and write the same hyperparameters (one lr for schedulers).
        super().__init__(self.base.param_groups, defaults)
        self.param_groups = self.base.param_groups

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_interpolation("momentum", group["sf_momentum"])
        if group.get("state_dtype") is not None:
            # The base optimizer steps the parameter tensors themselves, so a
            # wide master would need the base optimizer's cooperation.
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
        super().add_param_group(self.base.param_groups.pop())

    def _beta(self, group: dict) -> float:
        return group["sf_momentum"]

    def _scheduled_lr(self, group: dict, step: int) -> float:
        return float(group["lr"]) * float(group.get("d", 1.0))

    def _active_params(self, group_index: int, group: dict) -> list[Tensor]:
        # Gradients are the base optimizer's business (it may accept sparse ones).
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One schedule-free step: the base optimizer steps ``z`` with the gradient at ``y``."""
        loss = self._start_step(closure)
        active = [self._active_params(gi, g) for gi, g in enumerate(self.param_groups)]
        for group, params in zip(self.param_groups, active):
            self._y_to_z(group, params)
        try:
            self.base.step()
        except BaseException:
            for group, params in zip(self.param_groups, active):
                self._swap_back(params)
                self._params_to_y_of(group, params)
            raise
        for group, params in zip(self.param_groups, active):
            sched = self._schedule(group)
            self._swap_back(params)
            xs = [p.data for p in params]
            zs = [self.state[p]["z"] for p in params]
            if xs and not self._fused_bookkeeping(group, _fused_cpu.wrap_after, xs, zs, sched.ckp1):
                torch._foreach_lerp_(xs, zs, sched.ckp1)
                torch._foreach_lerp_(xs, zs, 1 - self._beta(group))
            self._commit(group, sched)
        return loss

    def _fused_bookkeeping(self, group: dict, kernel: Any, a: list[Tensor], b: list[Tensor], scalar: float) -> bool:
        """Runs one of the wrapper kernels of :mod:`sfoptim._fused_cpu` unless ``fused=False``; False if not run."""
        fused = group.get("sf_fused")
        if fused is False:
            return False
        return kernel([_real(t) for t in a], [_real(t) for t in b], scalar, self._beta(group), explicit=fused is True)

    def _y_to_z(self, group: dict, params: list[Tensor]) -> None:
        """Leaves ``z`` in the parameters (for the base step) and ``x`` in the z buffer."""
        if not params:
            return
        beta = self._beta(group)
        ys = [p.data for p in params]
        zs = [self.state[p].setdefault("z", p.detach().clone()) for p in params]
        decay = group["sf_weight_decay_at_y"]
        lr_decay = self._scheduled_lr(group, group["sf_k"] + 1) * decay if decay != 0 else 0.0
        if not self._fused_bookkeeping(group, _fused_cpu.wrap_before, ys, zs, lr_decay):
            if decay != 0:
                # z moves by -lr*decay*y; y moves by (1-beta) of that, so x stays put.
                torch._foreach_sub_(zs, ys, alpha=lr_decay)
                torch._foreach_mul_(ys, 1 - lr_decay * (1 - beta))
            torch._foreach_lerp_(ys, zs, 1 - 1 / beta)
        for p, z in zip(params, zs):
            _swap(p, z)

    def _swap_back(self, params: list[Tensor]) -> None:
        for p in params:
            _swap(p, self.state[p]["z"])

    def _params_to_y_of(self, group: dict, params: list[Tensor]) -> None:
        if params:
            torch._foreach_lerp_([p.data for p in params], [self.state[p]["z"] for p in params], 1 - self._beta(group))

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state (``z``, averaging scalars) with the base optimizer's under ``"base"``."""
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict produced by :meth:`state_dict` into wrapper and base optimizer."""
        if "base" not in state_dict:
            raise ValueError("Invalid state_dict: it has no 'base' entry; was it saved from a ScheduleFreeWrapper?")
        own = {k: v for k, v in state_dict.items() if k != "base"}
        self.base.load_state_dict(state_dict["base"])
        super().load_state_dict(own)
        # Both loads built fresh group dicts; share one set again.
        for ours, theirs in zip(self.param_groups, self.base.param_groups):
            theirs.update({k: v for k, v in ours.items() if k != "params"})
        self.param_groups = self.base.param_groups
