r"""ScheduleFree+: Adam inside schedule-free, a Polyak step size, AdamC decay, annealed interpolation.

The base direction is Adam's, with both moments bias-corrected:

.. math::

    m_t = \beta_1 m + (1-\beta_1) g, \quad v_t = \beta_2 v + (1-\beta_2) g^2, \quad
    d_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

The step size is not a hyperparameter but a Polyak rule on the loss :math:`f`
at ``y`` (the caller supplies it) and two sums over every parameter of every
group, taken before the update:

.. math::

    e_t &= \rho\, \bar e_{t-1} + (1-\rho) \sqrt{\pi/2}\, \textstyle\sum \|g\|_1,
        \qquad \bar e_t = e_t / (1-\rho^t) \\
    \gamma_t &= \max(\gamma, \epsilon) \cdot
        \max\big(0,\ f + \beta_t \textstyle\sum \langle g, z - x\rangle\big) / \bar e_t

(:math:`\gamma` = ``lr``, 1 by default, :math:`\rho` = ``polyak_beta``; the
running estimate is kept bias-corrected, as in the authors' code). Weight decay
is decoupled, applied at ``y`` and scaled by :math:`\gamma_t^2` (AdamC):
:math:`z \leftarrow z - \gamma_t^2 \lambda y - \gamma_t d_t`, so sensible
values of :math:`\lambda` are 20 to 50, not 0.1. The interpolation weight
anneals from ``sf_beta1`` to ``sf_beta1_max`` over ``sf_beta1_anneal_steps``,
linearly in :math:`\log(1-\beta)`; ``c_warmup`` holds the averaging
coefficient at 1 for the first steps.

Papers: "ScheduleFree+" (Defazio et al.) and AdamC, "Why Gradients Rapidly
Increase Near the End of Training" (arXiv 2506.02285).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation
from ..engine import ClosureForm, ScheduleFreeOptimizer, with_backend_args
from ..engine.optimizer import _evaluate
from .adamw import adam_direction
from .base import Bucket, BucketSum, Direction, KernelSpec, Kind

__all__ = [
    "AdamCPlusDirection",
    "AdamCScheduleFreePlus",
    "AdamCScheduleFreePlusClosure",
    "AdamCScheduleFreePlusPaper",
    "annealed_beta",
]

_SQRT_HALF_PI = math.sqrt(math.pi / 2)


def annealed_beta(beta: float, beta_max: float, anneal_steps: int, step: int) -> float:
    r""":math:`1 - (1-\beta)^{1-s} (1-\beta_{\max})^{s}` with :math:`s = \min(1, (t-1)/T)` for the 1-based ``step``."""
    if anneal_steps <= 0:
        return beta
    s = min(max(step - 1, 0) / anneal_steps, 1.0)
    return 1 - math.exp(math.log(1 - beta) * (1 - s) + math.log(1 - beta_max) * s)


#: A larger tensor on CPU goes through :func:`_inner_gap` in slices of this
#: many elements, sharing one buffer: a temporary as large as a big parameter
#: costs more to allocate every step than the arithmetic.
_GAP_SLICE = 1 << 20


def _inner_gap(g: Tensor, z: Tensor, y: Tensor) -> Tensor:
    r""":math:`\langle g, z - y\rangle`, with ``z - y`` formed before the product.

    ``z`` and ``y`` are close late in training, so ``<g, z> - <g, y>`` loses
    most of its digits to cancellation (a relative error near 1e-2 in float32
    for 2M elements with ``|z - y|`` a thousandth of ``|z|``). The products
    are summed by torch's summation, not a dot product, whose single running
    float32 sum loses about 1e-5 relative over a million terms of mixed sign.
    A large tensor on CPU is taken in slices; a sharded (DTensor) parameter
    keeps the plain elementwise form, whose partial sum the engine completes
    across ranks.
    """
    if type(g) is Tensor and type(z) is Tensor and type(y) is Tensor:
        n = g.numel()
        if n <= _GAP_SLICE or g.device.type != "cpu":
            return torch.sub(z, y).mul_(g).sum()
        gf, zf, yf = g.reshape(-1), z.reshape(-1), y.reshape(-1)
        buf = torch.empty(_GAP_SLICE, dtype=zf.dtype, device=zf.device)
        parts = []
        for start in range(0, n, _GAP_SLICE):
            stop = min(start + _GAP_SLICE, n)
            gap = buf[: stop - start]
            torch.sub(zf[start:stop], yf[start:stop], out=gap)
            parts.append(gap.mul_(gf[start:stop]).sum())
        return torch.stack(parts).sum()
    return (g * (z - y)).sum()


class AdamCPlusDirection(Direction):
    """Adam's bias-corrected direction with a Polyak step size and AdamC decay.

    State: ``exp_avg_sq`` and ``exp_avg``. The group carries the loss of the
    step (``function_value``, written by the optimizer's ``step``) and the
    running gradient-norm estimate (``grad_l1_ema``).
    """

    reductions = ("grad_l1", "ip_term")
    varying_beta = True

    def beta(self, group: dict, step: int) -> float:
        return annealed_beta(group["sf_beta1"], group["sf_beta1_max"], group["sf_beta1_anneal_steps"], step)

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq", "exp_avg")

    bucket_sums = (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y)

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]:
        r""":math:`\sum \|g\|_1` and :math:`\beta_t \sum \langle g, z - x\rangle` over the bucket, with torch operations."""
        grads = bucket.grads
        l1 = torch.stack(torch._foreach_norm(grads, 1)).sum(dtype=torch.float64)
        ip = torch.stack([_inner_gap(g, z, y) for g, z, y in zip(grads, bucket.z, bucket.params)]).sum(dtype=torch.float64)
        return self.reduce_sums(group, step, beta, {BucketSum.GRAD_L1: l1, BucketSum.GRAD_Z_MINUS_Y: ip})

    def reduce_sums(self, group: dict, step: int, beta: float, sums: Mapping[BucketSum, Tensor]) -> dict[str, Tensor]:
        r"""The reductions from :math:`\sum |g|` and :math:`\sum \langle g, z - y\rangle`.

        With ``y`` built with ``beta``, :math:`z - x = (z - y)/\beta`, so
        :math:`\beta_t \langle g, z - x\rangle = (\beta_t/\beta) \langle g, z - y\rangle`.
        """
        beta_now = self.beta(group, step)
        return {"grad_l1": sums[BucketSum.GRAD_L1], "ip_term": sums[BucketSum.GRAD_Z_MINUS_Y] * (beta_now / beta)}

    def _estimate(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> tuple[float, float]:
        """The step's gradient-norm estimate (bias-corrected EMA) and inner-product term (changes nothing)."""
        rho = group["polyak_beta"]
        ema = rho * group["grad_l1_ema"] + (1 - rho) * float(reduced["grad_l1"]) * _SQRT_HALF_PI
        return ema / (1 - rho**step), float(reduced["ip_term"])

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        """The Polyak step size times ``max(lr, eps)``; zero when every gradient is zero (the rule has no scale then)."""
        ema, ip = self._estimate(group, step, reduced)
        polyak = max(0.0, group["function_value"] + ip) / ema if ema > 0 else 0.0
        return max(float(group["lr"]), group["eps"]) * polyak

    def commit(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> None:
        """Keeps the step's ``grad_l1_ema`` and ``ip_term`` in the group."""
        group["grad_l1_ema"], group["ip_term"] = self._estimate(group, step, reduced)

    def weight_decay_at_y(self, group: dict, lr: float, weight_decay: float) -> float:
        return weight_decay * lr

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        beta1, beta2 = group["betas"]
        direction = adam_direction(
            bucket.grads,
            bucket.buffers["exp_avg_sq"],
            step=step,
            beta2=beta2,
            eps=group["eps"],
            exp_avg=bucket.buffers["exp_avg"],
            inner_momentum=beta1,
        )
        return direction, True

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        beta1, beta2 = group["betas"]
        scalars = {"beta2": beta2, "bc2": 1 - beta2**step, "eps": group["eps"], "mu": beta1, "bc1": 1 - beta1**step}
        return KernelSpec(Kind.ADAM, ("exp_avg_sq", "exp_avg"), scalars)


@with_backend_args
class AdamCScheduleFreePlus(ScheduleFreeOptimizer):
    r"""ScheduleFree+: schedule-free Adam with a Polyak step size (no learning rate to tune).

    The step needs the loss at the current parameters: pass a closure that
    returns it (``opt.step(closure)``, as Lightning does), or the value itself
    (``opt.step(loss=loss)``, a float or a 0-d tensor). When a process group
    is initialised the loss is averaged over its ranks before use (each rank
    passes the loss of its own batch), so that data-parallel replicas take the
    same step; set ``average_loss=False`` when the ranks train different
    models. Call :meth:`train` before training and :meth:`eval` before
    evaluating or saving, as for every schedule-free optimizer.

    Args:
        params: parameters or parameter groups.
        lr: multiplier :math:`\gamma` of the Polyak step size (default 1.0).
        betas: Adam's moment decays :math:`(\beta_1, \beta_2)` in [0, 1) (default (0.9, 0.95)).
        sf_beta1: the interpolation weight :math:`\beta` in (0, 1] (default 0.9).
        eps: added to Adam's denominator, and the floor of ``lr`` (default 1e-8).
        weight_decay: :math:`\lambda`, decoupled, applied at ``y`` and scaled by
            the squared step size (AdamC; try 20 to 50; default 0).
        r: polynomial weighting power of the average (default 0).
        polyak_beta: :math:`\rho \in [0, 1)`, EMA decay of the gradient norm in
            the Polyak rule (default 0: the current norm).
        c_warmup: number of first steps with averaging coefficient 1 (``x``
            follows ``z``; default 0). One or two times a warmup length is typical.
        sf_beta1_anneal_steps: steps over which :math:`\beta` anneals from
            ``sf_beta1`` to ``sf_beta1_max`` (default 0: no annealing).
        sf_beta1_max: the final interpolation weight (default 0.965).
        weight_lr_power: power of the largest step size in the averaging
            weights (default 2).
        {backend_args}
        average_loss: average the loss over the ranks of the default process
            group when one is initialised (default True).

    State per parameter: ``z``, ``exp_avg_sq`` and ``exp_avg``.

    Example::

        opt = sfoptim.AdamCScheduleFreePlus(model.parameters(), weight_decay=20.0)
        opt.train(); model.train()
        for xb, yb in loader:
            opt.zero_grad(); loss = loss_fn(model(xb), yb); loss.backward()
            opt.step(loss=loss)
        opt.eval(); model.eval()   # parameters now hold x
    """

    direction = AdamCPlusDirection()

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
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        average_loss: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            sf_beta1=sf_beta1,
            eps=eps,
            weight_decay=weight_decay,
            r=r,
            polyak_beta=polyak_beta,
            c_warmup=c_warmup,
            sf_beta1_anneal_steps=sf_beta1_anneal_steps,
            sf_beta1_max=sf_beta1_max,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            fused=fused,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            grad_l1_ema=0.0,
            function_value=0.0,
            ip_term=0.0,
        )
        self.average_loss = average_loss
        self._pending_loss: Tensor | float | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group[self.group_key("k")] == 0:
            # The largest step size starts at eps, as in the authors' code, so a
            # first step of size 0 (loss 0) still has a positive averaging weight.
            group[self.group_key("lr_max")] = max(group[self.group_key("lr_max")], group["eps"])

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if group.get("adamc"):
            # Its decay is already scaled by the step size; the engine's option would scale it twice.
            raise ValueError(f"Invalid adamc: {group['adamc']!r} (ScheduleFree+ always applies AdamC's scaling of weight decay)")
        betas = group["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))") from None
        _validation.check_in_range("betas[0]", beta1, 0.0, 1.0, low_open=False, high_open=True)
        _validation.check_in_range("betas[1]", beta2, 0.0, 1.0, low_open=False, high_open=True)
        _validation.check_nonnegative("eps", group["eps"])
        _validation.check_in_range("polyak_beta", group["polyak_beta"], 0.0, 1.0, low_open=False, high_open=True)
        annealing = _validation.check_steps("sf_beta1_anneal_steps", group["sf_beta1_anneal_steps"]) > 0
        # Annealing is linear in log(1 - beta), which needs beta < 1.
        for name in ("sf_beta1", "sf_beta1_max"):
            _validation.check_in_range(name, group[name], 0.0, 1.0, low_open=True, high_open=annealing)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None) -> Any:
        """One step with the gradients in ``p.grad`` and the loss at the current ``y``.

        The loss is ``loss`` if given, else the value ``closure`` returns (the
        closure runs first, with gradients enabled); the closure's value is
        returned.

        Raises:
            TypeError: neither a closure nor ``loss`` was given, or the closure
                returned None; nothing has changed.
            ValueError: the loss is not a finite number; nothing has changed.
            ModeError: in eval mode (call :meth:`train` first).
        """
        if loss is None and closure is None and getattr(self, "_pending_loss", None) is not None:
            loss = self._pending_loss
        self._enter_step(closure)
        try:
            if closure is None and loss is None:
                raise TypeError(
                    f"{type(self).__name__}.step() needs the loss for its Polyak step size: "
                    "call step(loss=loss), step(closure) with a closure that returns the loss, "
                    "or accumulate_loss(loss) before step()"
                )
            value = _evaluate(closure)
            f = self._global_loss(loss if loss is not None else value)
            for group in self.param_groups:
                group["function_value"] = f
            self._update()
            self._pending_loss = None
        finally:
            self._leave_step()
        return value

    def accumulate_loss(self, loss: float | Tensor) -> None:
        """Adds ``loss`` to the loss the next argument-less :meth:`step` uses.

        For training loops that call ``step()`` without arguments (trainers):
        call it once per micro-batch with the loss whose gradient was
        accumulated (scaled as it was for ``backward``). The sum is used by the
        next ``step()`` without ``closure`` or ``loss`` and then cleared.
        """
        value = loss.detach() if isinstance(loss, Tensor) else loss
        self._pending_loss = value if self._pending_loss is None else self._pending_loss + value

    def _global_loss(self, loss: Any) -> float:
        """The loss as a float, averaged over the ranks of the default process group."""
        if loss is None:
            raise TypeError(f"{type(self).__name__}.step(): the closure returned None; it must return the loss")
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"Invalid loss: a tensor of shape {tuple(loss.shape)} (expected one number)")
            loss = loss.detach()
        else:
            loss = torch.tensor(_validation._as_float("loss", loss), dtype=torch.float64)
        if self.average_loss and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Plain data-parallel replicas hold the same gradients (averaged by
            # DDP) but each rank's loss is of its own batch: average it too, or
            # every replica computes a different step size and they drift apart.
            device = next(p.device for g in self.param_groups for p in g["params"])
            buf = loss.reshape(1).to(device=device, dtype=torch.float64)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            value = buf.item() / dist.get_world_size()
        else:
            value = float(loss)
        if not math.isfinite(value):
            raise ValueError(f"Invalid loss: {value!r} (the Polyak step size needs a finite loss)")
        return value


class AdamCScheduleFreePlusClosure(ClosureForm, AdamCScheduleFreePlus):
    """ScheduleFree+ whose parameters always hold ``x``; ``step(closure)`` with a closure returning the loss.

    Same arguments and math as :class:`AdamCScheduleFreePlus`.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None) -> Any:
        """Evaluates ``closure`` at ``y`` and steps with its loss (or ``loss``, if given)."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step() needs a closure that computes the loss and gradients")
        return AdamCScheduleFreePlus.step(self, closure, loss=loss)


class AdamCScheduleFreePlusPaper(AdamCScheduleFreePlus):
    """The authors' interface to ScheduleFree+: ``step_func(function_value)``.

    Same arguments and defaults as ``AdamCScheduleFreePlusPaper`` of the
    authors' repository, and the same trajectory, with two buffers fewer
    (``x`` and ``y`` are not stored) and the foreach and fused backends. The
    authors' code takes ``sf_beta1``, its annealing and ``polyak_beta`` from
    the first group; here every group uses its own (the same unless set per
    group). While :math:`\beta` anneals, a parameter without a gradient keeps
    ``x`` and ``z`` and its ``y`` follows the new :math:`\beta`, so that
    :math:`y = \beta x + (1-\beta) z` holds for every parameter; the authors'
    code leaves such a ``y`` where an earlier :math:`\beta` put it, so runs
    that freeze parameters during annealing evaluate those parameters at a
    slightly different point. The loss is averaged over ranks under data
    parallelism too (the authors' code does so only for sharded parameters).

    In float32 the trajectory agrees with the authors' to float32 rounding:
    ``y`` and ``z`` are updated directly instead of through a stored ``x``,
    and the Polyak step size feeds each step's rounding into the next, so the
    two runs differ as much as either differs from the same run in float64.
    """

    @torch.no_grad()
    def step_func(self, function_value: float | Tensor | None = None) -> Any:
        """One step with the loss ``function_value`` at ``y``; returns ``function_value``."""
        if function_value is None:
            raise TypeError(f"{type(self).__name__}.step_func() needs the loss: step_func(function_value)")
        self.step(loss=function_value)
        return function_value
