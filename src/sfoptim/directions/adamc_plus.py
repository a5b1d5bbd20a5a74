r"""ScheduleFree+: Adam inside schedule-free, a Polyak step size, AdamC decay, annealed interpolation.

The authors' rule, equation by equation, is
:class:`sfoptim.reference.AdamCScheduleFreePlusReference`: Adam's
bias-corrected direction, a step size :math:`\gamma_t = \max(\gamma,
\epsilon)\, \eta_t` from the loss :math:`f` at ``y`` (the caller supplies it)
and two sums over every parameter, :math:`\eta_t = \max(0, f + \beta_t \sum
\langle g, z - x\rangle) / \bar e_t` with :math:`\bar e_t` an EMA of
:math:`\sqrt{\pi/2} \sum \|g\|_1`, the decay :math:`\gamma_t^2 \lambda y` and
an interpolation weight annealed from ``sf_beta1`` to ``sf_beta1_max``.
:class:`AdamCScheduleFreePlusPaper` is the authors' interface and trajectory;
:class:`AdamCScheduleFreePlus` adds guard rails around the rule.

Papers: "ScheduleFree+" (Defazio et al.); AdamC, "Why Gradients Rapidly
Increase Near the End of Training" (arXiv 2506.02285); the guard rails from
SPS_max (Loizou et al., 2021), MoMo (Schaipp et al., ICML 2024) and
Prodigy's growth limit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from numbers import Real
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation, precision
from ..engine import ClosureForm, ModeError, ScheduleFreeOptimizer, with_backend_args
from ..engine.optimizer import _NO_INPUTS, _evaluate, work
from ..engine.step import averaging, real
from .adamw import adam_direction
from .base import Bucket, BucketSum, Direction, KernelSpec, Kind

__all__ = [
    "AdamCPlusDirection",
    "AdamCPlusPaperDirection",
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


class _Refused(Exception):
    """A step whose loss, Polyak sums or step size are not usable; nothing has changed yet."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        #: ``"loss"``, ``"gradient"`` or ``"step size"``.
        self.kind = kind


class _GroupPlan(NamedTuple):
    """The Polyak scalars of one group for one step (pure: computed before anything is written)."""

    lr: float
    ema: float
    ema_corrected: float
    ip: float
    loss: float
    #: The production class's guard state (None for the paper form).
    loss_ema: float | None = None
    polyak: float | None = None
    counts: dict[str, int] | None = None
    f_star: float | None = None


class AdamCPlusDirection(Direction):
    """Adam's bias-corrected direction with a Polyak step size and AdamC decay; state ``exp_avg_sq``, ``exp_avg``.

    The step's loss and gradient-clipping factor come in ``reduced``
    (``"loss"``, ``"clip_coef"``) beside the Polyak sums. :meth:`lr` raises
    :class:`_Refused` for unusable scalars; the engine takes every group's
    ``lr`` before it changes anything, so a refused step changes nothing.
    """

    reductions = ("grad_l1", "ip_term")
    varying_beta = True
    bucket_sums = (BucketSum.GRAD_L1, BucketSum.GRAD_Z_MINUS_Y)
    #: Store the gradient-norm EMA bias-corrected, so that the next step
    #: corrects it again (the authors' code does; the paper form keeps it).
    ema_stored_corrected: ClassVar[bool] = False

    def beta(self, group: dict, step: int) -> float:
        return annealed_beta(group["sf_beta1"], group["sf_beta1_max"], group["sf_beta1_anneal_steps"], step)

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq", "exp_avg")

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]:
        r""":math:`\sum \|g\|_1` and :math:`\beta_t \sum \langle g, z - x\rangle` over the bucket, with torch operations."""
        grads = bucket.grads
        l1 = torch.stack(torch._foreach_norm(grads, 1)).sum(dtype=torch.float64)
        ip = torch.stack([_inner_gap(g, z, y) for g, z, y in zip(grads, bucket.z, bucket.params)]).sum(dtype=torch.float64)
        return self.reduce_sums(group, step, beta, {BucketSum.GRAD_L1: l1, BucketSum.GRAD_Z_MINUS_Y: ip})

    def reduce_sums(self, group: dict, step: int, beta: float, sums: Mapping[BucketSum, Tensor]) -> dict[str, Tensor]:
        r"""With ``y`` built with ``beta``, :math:`\beta_t \langle g, z - x\rangle = (\beta_t/\beta) \langle g, z - y\rangle`."""
        beta_now = self.beta(group, step)
        return {"grad_l1": sums[BucketSum.GRAD_L1], "ip_term": sums[BucketSum.GRAD_Z_MINUS_Y] * (beta_now / beta)}

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        """The group's Polyak step size; raises :class:`_Refused` when it or the sums are not usable."""
        plan = self.polyak_plan(group, step, reduced)
        _check_step_size(group, step, plan.lr, self.beta(group, step), plan.loss)
        return plan.lr

    def commit(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> None:
        self._record(group, self.polyak_plan(group, step, reduced))

    def _record(self, group: dict, plan: _GroupPlan) -> None:
        """Writes the group's Polyak state (``grad_l1_ema``, ``ip_term``, ``function_value``, the guards')."""
        group["grad_l1_ema"] = plan.ema
        group["ip_term"] = plan.ip
        group["function_value"] = plan.loss
        if plan.counts is not None:
            group["loss_ema"] = plan.loss_ema
            group["polyak_max"] = plan.polyak
            group["guard_counts"] = plan.counts
            group["f_star_estimate"] = plan.f_star

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

    def polyak_plan(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> _GroupPlan:
        """The group's Polyak scalars of the 1-based ``step`` (class docstring of :class:`AdamCScheduleFreePlus`)."""
        f, clip = float(reduced["loss"]), float(reduced["clip_coef"])
        empty = "grad_l1" not in reduced  # no parameter has a gradient
        l1 = 0.0 if empty else float(reduced["grad_l1"]) / clip
        ip = 0.0 if empty else float(reduced["ip_term"]) / clip
        if not (math.isfinite(l1) and math.isfinite(ip)):
            raise _Refused(
                "gradient",
                f"the Polyak sums are not finite (sum |g| = {l1!r}, inner product with z - x = {ip!r}): "
                "the parameters or z hold non-finite values",
            )
        rho = group["polyak_beta"]
        guarded = "warmup_steps" in group
        counts = group.get("guard_counts")
        loss_ema = group.get("loss_ema", 0.0)
        polyak_max = group.get("polyak_max", 0.0)
        f_star = group.get("f_star_estimate", 0.0)
        h = 0.0
        if empty:
            ema = corrected = group["grad_l1_ema"]
            polyak = 0.0
        else:
            ema = rho * group["grad_l1_ema"] + (1 - rho) * l1 * _SQRT_HALF_PI
            corrected = ema / (1 - rho**step)
            h = f + ip
            if guarded:
                beta_f = group["loss_beta"]
                loss_ema = beta_f * loss_ema + (1 - beta_f) * f
                h = loss_ema / (1 - beta_f**step) + ip
                if not group["estimate_f_star"]:
                    f_star = group["f_star"]
                elif h < f_star:  # the loss went below the estimate: start again from half the gap
                    f_star = max(group["f_star"], h / 2)
            polyak = max(0.0, h - f_star) / corrected if corrected > 0 else 0.0
            limit = group.get("growth_limit")
            if limit is not None and polyak_max > 0 and polyak > limit * polyak_max:
                polyak = limit * polyak_max
                counts = _counted(counts, "growth")
            polyak_max = max(polyak_max, polyak)
        lr = max(float(group["lr"]), group["eps"]) * polyak
        if guarded and not empty:
            warmup = group["warmup_steps"]
            if step < warmup:
                lr *= step / warmup
            cap = group["lr_cap"]
            if cap is not None and lr > cap:
                lr = float(cap)
                counts = _counted(counts, "cap")
            if group["estimate_f_star"]:
                # MoMo's online lower bound: the model's value after the step taken.
                taken = lr / max(float(group["lr"]), group["eps"])
                f_star = max(group["f_star"], h - 0.5 * taken * corrected)
        stored = corrected if self.ema_stored_corrected else ema
        if not guarded:
            return _GroupPlan(lr, stored, corrected, ip, f)
        return _GroupPlan(lr, stored, corrected, ip, f, loss_ema, polyak_max, counts, f_star)


class AdamCPlusPaperDirection(AdamCPlusDirection):
    """The paper form's direction: also ``x`` and ``y`` in the state, the authors' EMA and logged keys."""

    ema_stored_corrected = True

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq", "exp_avg", "x", "y")

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        if name in ("x", "y"):
            return torch.clone(like, memory_format=torch.preserve_format)
        return super().new_buffer(group, name, like)

    def _record(self, group: dict, plan: _GroupPlan) -> None:
        super()._record(group, plan)
        group["grad_l1_ema_corr"] = plan.ema_corrected
        group["function_value_ema"] = plan.loss + plan.ip


def _check_step_size(group: dict, step: int, lr: float, beta: float, f: float) -> None:
    """Refuses a step size that is not finite, or whose averaging or decay overflows."""
    decay = lr * lr * float(group["weight_decay"])
    try:
        sched = averaging(group, AdamCScheduleFreePlus.group_key, step, lr, beta)
        ok = all(map(math.isfinite, (lr, decay, sched.weight_sum, sched.ckp1)))
    except OverflowError:
        ok = False
    if ok and max(lr, decay) > _SMALLEST_FLOAT_MAX:
        dtypes = (precision.master_dtype(group, p) or p.dtype for p in group["params"] if p.is_floating_point())
        ok = max(lr, decay) <= min((torch.finfo(d).max for d in dtypes), default=math.inf)
    if not ok:
        raise _Refused(
            "step size",
            f"the Polyak step size {lr!r} (loss {f!r}) overflows the averaging weights, the decay or the parameters' dtype",
        )


@with_backend_args
class AdamCScheduleFreePlus(ScheduleFreeOptimizer):
    r"""ScheduleFree+: schedule-free Adam with a Polyak step size (no learning rate to tune), with guard rails.

    The step needs the loss at the current parameters: pass a closure that
    returns it (``opt.step(closure)``, as Lightning does), or the value itself
    (``opt.step(loss=loss)``, a float or a 0-d tensor). When a process group
    is initialised the loss is averaged over its ranks before use (each rank
    passes the loss of its own batch), so that data-parallel replicas take the
    same step; set ``average_loss=False`` when the ranks train different
    models. Call :meth:`train` before training and :meth:`eval` before
    evaluating or saving, as for every schedule-free optimizer.

    The step size of the authors' rule (module docstring), with each guard rail applied in turn:

    .. math::

        h_t &= \bar f_t + \beta_t \textstyle\sum \langle g, z - x\rangle, \qquad
            \bar f_t = \frac{\textstyle\sum_{s \le t} (1-\rho_f)\rho_f^{t-s} f_s}{1-\rho_f^t} \\
        \eta_t &= \min\big(\max(0, h_t - f^*_t) / \bar e_t,\ \ g_{\max} \max_{s<t} \eta_s\big) \\
        \gamma_t &= \min\big(\max(\gamma, \epsilon)\, \eta_t \min(1, t/W),\ \gamma_{\mathrm{cap}}\big)

    with :math:`\bar e_t` the gradient-norm EMA debiased once,
    :math:`\rho_f` = ``loss_beta``, :math:`g_{\max}` = ``growth_limit``,
    :math:`W` = ``warmup_steps``, :math:`\gamma_{\mathrm{cap}}` = ``lr_cap``
    (MoMo-Adam's cap). :math:`f^*_t` is ``f_star``, or with
    ``estimate_f_star`` MoMo's online lower bound: after a step of size
    :math:`\tau = \gamma_t / \max(\gamma, \epsilon)` it becomes
    :math:`\max(f^*, h_t - \tau \bar e_t / 2)`, and a loss below it resets it to
    :math:`\max(f^*, h_t / 2)`. The gradient sums are divided by ``clip_coef``
    when :meth:`step` is given one. ``param_groups[i]["guard_counts"]``
    counts the steps on which the cap (``"cap"``) and the growth limit
    (``"growth"``) bound and the skipped steps (``"skipped"``); it is saved
    in :meth:`state_dict`. With ``warmup_steps=0``, ``lr_cap=None``,
    ``growth_limit=None``, ``polyak_beta=0`` and the authors' ``betas=(0.9,
    0.95)``, ``c_warmup=0`` the trajectory is :class:`AdamCScheduleFreePlusPaper`'s.

    The defaults were chosen on a byte-level language model (batch 16) and
    MNIST-1D (batch 128), where the authors' rule diverges: a warmup, a cap
    that stays above the Polyak estimate on MNIST-1D and binds on most steps
    of the language model, and no inner momentum (``betas[0] = 0``), which
    on both tasks is better than the authors' 0.9 (with 0.9 the MNIST-1D run
    diverges even after a warmup). The authors use 0.9 at batches of millions
    of tokens, where the gradient noise that misaligns momentum and gradient
    is small.

    Args:
        params: parameters or parameter groups.
        lr: multiplier :math:`\gamma` of the Polyak step size (default 1.0).
        betas: Adam's moment decays :math:`(\beta_1, \beta_2)` in [0, 1) (default (0.0, 0.95)).
        sf_beta1: the interpolation weight :math:`\beta` in (0, 1] (default 0.9).
        eps: added to Adam's denominator, and the floor of ``lr`` (default 1e-8).
        weight_decay: :math:`\lambda`, decoupled, applied at ``y`` and scaled by
            the squared step size (AdamC; try 20 to 50; default 0).
        r: polynomial weighting power of the average (default 0).
        polyak_beta: :math:`\rho \in [0, 1)`, EMA decay of the gradient norm in
            the Polyak rule (default 0: the current norm).
        c_warmup: number of first steps with averaging coefficient 1 (``x``
            follows ``z``; default None: ``warmup_steps``).
        sf_beta1_anneal_steps: steps over which :math:`\beta` anneals from
            ``sf_beta1`` to ``sf_beta1_max`` (default 0: no annealing).
        sf_beta1_max: the final interpolation weight (default 0.965).
        weight_lr_power: power of the largest step size in the averaging
            weights (default 2).
        {backend_args}
        average_loss: average the loss over the ranks of the default process
            group when one is initialised (default True).
        skip_nonfinite: skip (and count, and warn about) a step whose loss,
            gradient sums or step size are not finite, changing nothing;
            False raises instead (default True).
        warmup_steps: :math:`W`, steps over which the step size rises
            linearly (default 20).
        lr_cap: :math:`\gamma_{\mathrm{cap}}`, the largest step size, or None
            (default 0.05).
        growth_limit: :math:`g_{\max} \ge 1`, how far the Polyak estimate may
            exceed its largest value so far in one step, or None (default
            :math:`2^{1/4}`, Prodigy's).
        loss_beta: :math:`\rho_f \in [0, 1)`, EMA decay of the loss (default 0:
            the current loss).
        f_star: :math:`f^*`, a lower bound of the loss (default 0).
        estimate_f_star: raise the lower bound online from ``f_star`` (MoMo's
            estimate; default False).

    State per parameter: ``z``, ``exp_avg_sq`` and ``exp_avg``.

    Example::

        opt = sfoptim.AdamCScheduleFreePlus(model.parameters())
        opt.train(); model.train()
        for xb, yb in loader:
            opt.zero_grad(); loss = loss_fn(model(xb), yb); loss.backward()
            opt.step(loss=loss)
        opt.eval(); model.eval()   # parameters now hold x
    """

    direction = AdamCPlusDirection()
    #: Refuse a step with a non-finite loss, gradient or step size (raise)
    #: instead of skipping it; the paper form always refuses.
    _refuses: bool = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.0, 0.95),
        sf_beta1: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0,
        polyak_beta: float = 0,
        c_warmup: int | None = None,
        sf_beta1_anneal_steps: int = 0,
        sf_beta1_max: float = 0.965,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        average_loss: bool = True,
        skip_nonfinite: bool = True,
        warmup_steps: int = 20,
        lr_cap: float | None = 0.05,
        growth_limit: float | None = 2**0.25,
        loss_beta: float = 0,
        f_star: float = 0.0,
        estimate_f_star: bool = False,
    ) -> None:
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"Invalid skip_nonfinite: {skip_nonfinite!r} (expected True or False)")
        self.average_loss = average_loss
        self.skip_nonfinite = skip_nonfinite
        self._pending_loss: Tensor | float | None = None
        defaults: dict[str, Any] = dict(
            lr=lr, betas=betas, sf_beta1=sf_beta1, eps=eps, weight_decay=weight_decay, r=r, polyak_beta=polyak_beta,
            c_warmup=c_warmup, sf_beta1_anneal_steps=sf_beta1_anneal_steps, sf_beta1_max=sf_beta1_max,
            weight_lr_power=weight_lr_power, foreach=foreach, fused=fused, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, grad_l1_ema=0.0, function_value=0.0, ip_term=0.0,
        )  # fmt: skip
        if self._refuses:  # the paper form: no guard rails, the authors' logged keys
            defaults.update(grad_l1_ema_corr=0.0, function_value_ema=0.0)
        else:
            defaults.update(
                warmup_steps=warmup_steps, lr_cap=lr_cap, growth_limit=growth_limit, loss_beta=loss_beta, f_star=f_star,
                estimate_f_star=estimate_f_star, f_star_estimate=f_star, loss_ema=0.0, polyak_max=0.0,
                guard_counts=dict.fromkeys(_GUARDS, 0),
            )  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("average_loss", True)
        self.__dict__.setdefault("skip_nonfinite", not self._refuses)
        self._pending_loss = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group[self.group_key("k")] == 0:
            # The largest step size starts at eps, as in the authors' code, so a
            # first step of size 0 (loss 0) still has a positive averaging weight.
            group[self.group_key("lr_max")] = max(group[self.group_key("lr_max")], group["eps"])
        if "guard_counts" in group:
            group["guard_counts"] = dict(group["guard_counts"])

    def _validate_group(self, group: dict) -> None:
        if group.get("c_warmup", 0) is None:  # tied to the warmup of the step size
            group["c_warmup"] = _validation.check_steps("warmup_steps", group.get("warmup_steps", 0))
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
        _validation.check_steps("c_warmup", group["c_warmup"])
        if "warmup_steps" in group:  # the production class's guard rails
            _validation.check_steps("warmup_steps", group["warmup_steps"])
            if group["lr_cap"] is not None:
                _validation.check_in_range("lr_cap", group["lr_cap"], 0.0, math.inf, low_open=True, high_open=True)
            if group["growth_limit"] is not None:
                _validation.check_in_range("growth_limit", group["growth_limit"], 1.0, math.inf, low_open=False, high_open=True)
            _validation.check_in_range("loss_beta", group["loss_beta"], 0.0, 1.0, low_open=False, high_open=True)
            _validation.check_in_range("f_star", group["f_star"], -math.inf, math.inf, low_open=True, high_open=True)
            if not isinstance(group["estimate_f_star"], bool):
                raise ValueError(f"Invalid estimate_f_star: {group['estimate_f_star']!r} (expected True or False)")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None, clip_coef: float | Tensor = 1.0
    ) -> Any:
        """One step with the gradients in ``p.grad`` and the loss at the current ``y``.

        The loss is ``loss`` if given, else the value ``closure`` returns (the
        closure runs first, with gradients enabled), else the sum passed to
        :meth:`accumulate_loss` since the last step; the closure's value is
        returned. When no parameter has a gradient the step is empty: the
        step size is 0 and only the step count and averaging weights advance.
        ``clip_coef`` is the factor gradient clipping multiplied the gradients
        by (``min(1, max_norm / total_norm)``): the Polyak sums are divided by
        it, so that the step size is the unclipped gradients' (1: no clipping).

        A loss, gradient sum or step size that is not finite (or too large
        for the parameters' dtype) skips the step: parameters and state stay
        as they were, ``param_groups[i]["guard_counts"]["skipped"]`` counts
        it and a ``RuntimeWarning`` says why. With ``skip_nonfinite=False``
        the step raises instead, also changing nothing.

        Raises:
            TypeError: neither a closure, ``loss`` nor an accumulated loss was
                given, or the closure returned None; nothing has changed.
            ValueError: the loss is not one number (or, with
                ``skip_nonfinite=False``, not finite); nothing has changed.
            FloatingPointError: with ``skip_nonfinite=False``, a gradient or the
                step size is not finite; nothing has changed.
            ModeError: in eval mode (call :meth:`train` first).
        """
        return self._run_step(closure, loss=loss, clip_coef=clip_coef)

    def _run_step(
        self, closure: Callable[[], Any] | None, loss: float | Tensor | None = None, clip_coef: float | Tensor = 1.0
    ) -> Any:
        coef = _validation._as_float("clip_coef", clip_coef)
        if not 0.0 < coef <= 1.0:
            raise ValueError(f"Invalid clip_coef: {clip_coef!r} (must be in (0, 1])")
        if loss is None and closure is None and self._pending_loss is not None:
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
            try:
                if not math.isfinite(f):
                    raise _Refused("loss", f"Invalid loss: {f!r} (the Polyak step size needs a finite loss)")
                wide = torch.float64
                self._update({"loss": torch.tensor(f, dtype=wide), "clip_coef": torch.tensor(coef, dtype=wide)})
            except _Refused as refused:
                self._pending_loss = None
                self._refuse(refused)
            else:
                self._pending_loss = None
        finally:
            self._leave_step()
        return value

    def _update(self, inputs: Mapping[str, Tensor] = _NO_INPUTS) -> None:
        # State that this step creates (first steps of parameters) is removed
        # again when the step is refused; it is appended to ``self.state``.
        created_from = len(self.state)
        try:
            super()._update(inputs)
        except _Refused:
            for p in list(self.state)[created_from:]:
                del self.state[p]
            raise

    def _refuse(self, refused: _Refused) -> None:
        """Raises for a refused step (``skip_nonfinite=False``, the paper form), else counts and warns."""
        if refused.kind == "gradient":
            refused = _Refused("gradient", self._nonfinite_gradients() or str(refused))
        if self._refuses or not self.skip_nonfinite:
            if refused.kind == "loss":
                raise ValueError(str(refused)) from None
            raise FloatingPointError(str(refused)) from None
        for group in self.param_groups:
            group["guard_counts"] = _counted(group.get("guard_counts", {}), "skipped")
        warnings.warn(
            f"{type(self).__name__} skipped a step: its {refused.kind} was not finite; parameters and state are "
            "unchanged (param_groups[i]['guard_counts']['skipped'] counts such steps). The first: " + str(refused),
            RuntimeWarning,
            stacklevel=4,
        )

    def _nonfinite_gradients(self) -> str | None:
        """Names the parameters whose gradients hold non-finite elements (None if none do)."""
        bad = [
            self._param_label(gi, pi, p)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        if not bad:
            return None
        return f"non-finite gradient elements in {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")

    # ------------------------------------------------------------ the loss
    def accumulate_loss(self, loss: float | Tensor) -> None:
        """Adds ``loss`` to the loss the next argument-less :meth:`step` uses.

        For training loops that call ``step()`` without arguments (trainers):
        call it once per micro-batch with the loss whose gradient was
        accumulated (scaled as it was for ``backward``): a number or a
        one-element tensor, summed in float64 whatever its dtype. The sum is
        used by the next ``step()`` without ``closure`` or ``loss`` and
        cleared by every step that completes or is skipped, by
        :meth:`zero_grad` (which discards the gradients it belongs to), by
        :meth:`load_state_dict` and by :meth:`clear_accumulated_loss`.

        Raises:
            TypeError: ``loss`` is not a number or a tensor.
            ValueError: ``loss`` is a tensor of more than one element, or complex.
        """
        value = _loss_value(loss)
        pending = self._pending_loss
        if pending is None:
            self._pending_loss = value
        elif isinstance(pending, Tensor) and isinstance(value, Tensor):
            self._pending_loss = pending + value.to(pending.device)
        else:
            self._pending_loss = pending + value

    def clear_accumulated_loss(self) -> None:
        """Discards the loss summed by :meth:`accumulate_loss` since the last step."""
        self._pending_loss = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients (as ``torch.optim.Optimizer.zero_grad``) and the accumulated loss."""
        self._pending_loss = None
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict (see :meth:`ScheduleFreeOptimizer.load_state_dict`); the accumulated loss is discarded.

        A checkpoint of this class whose groups have no guard-rail settings
        (``warmup_steps``, ``lr_cap``, ``growth_limit``, ``loss_beta``,
        ``f_star``, ``estimate_f_star``) continues with every guard rail off,
        the step size it was taking, and a ``UserWarning``; a checkpoint of
        :class:`AdamCScheduleFreePlusPaper` is refused.
        """
        filled = None if self._refuses else _with_guards_off(state_dict)
        super().load_state_dict(state_dict if filled is None else filled)
        if filled is not None:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict(): the checkpoint has no guard-rail settings (warmup_steps, "
                "lr_cap, growth_limit, loss_beta, f_star, estimate_f_star); they stay off for this run, which "
                "continues with the step size it was taking. To use them, construct the optimizer with them and load "
                "a checkpoint that has them, or set them in param_groups[i] after loading (e.g. group['lr_cap'] = 0.05).",
                UserWarning,
                stacklevel=2,
            )
        self._pending_loss = None
        for group in self.param_groups:
            if "guard_counts" in group:
                group["guard_counts"] = dict(group["guard_counts"])

    def _averages_loss(self) -> bool:
        """Whether the loss is averaged over the ranks of the default process group this step."""
        return bool(self.average_loss) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _global_loss(self, loss: Any) -> float:
        """The loss as a float (maybe not finite), averaged over the ranks of the default process group."""
        if loss is None:
            raise TypeError(f"{type(self).__name__}.step(): the closure returned None; it must return the loss")
        value = _loss_value(loss, error=ValueError)
        if not isinstance(value, Tensor):
            value = torch.tensor(value, dtype=torch.float64)
        if self._averages_loss():
            # Plain data-parallel replicas hold the same gradients (averaged by
            # DDP) but each rank's loss is of its own batch: average it too, or
            # every replica computes a different step size and they drift apart.
            device = next(p.device for g in self.param_groups for p in g["params"])
            buf = value.reshape(1).to(device=device, dtype=torch.float64)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            return buf.item() / dist.get_world_size()
        return float(value)


#: The guard rails whose binding is counted in ``param_groups[i]["guard_counts"]``.
_GUARDS = ("skipped", "cap", "growth")
#: The guard-rail settings of :class:`AdamCScheduleFreePlus` with every guard
#: off (its step size is then the paper form's), and their bookkeeping as a
#: new optimizer starts it.
_GUARDS_OFF: dict[str, Any] = dict(warmup_steps=0, lr_cap=None, growth_limit=None, loss_beta=0.0, f_star=0.0, estimate_f_star=False)
_GUARD_BOOKKEEPING: dict[str, Any] = dict(f_star_estimate=0.0, loss_ema=0.0, polyak_max=0.0)
#: Group keys every ScheduleFree+ checkpoint carries.
_SCHEDULE_FREE_PLUS_KEYS = ("polyak_beta", "sf_beta1", "sf_beta1_max", "sf_beta1_anneal_steps", "grad_l1_ema", "function_value", "ip_term")
#: Keys only the paper form's checkpoints carry (besides ``x`` and ``y`` in the state).
_PAPER_ONLY_KEYS = ("grad_l1_ema_corr", "function_value_ema")


def _with_guards_off(state_dict: Any) -> dict[str, Any] | None:
    """A copy of ``state_dict`` with the missing guard-rail keys of its groups filled in (off), or None.

    None when nothing is missing, and for every checkpoint that is not one of
    ScheduleFree+'s production class: the class check then refuses it as it
    is. The paper form's checkpoints are told apart by ``x`` and ``y`` in
    their state and by their own group keys.
    """
    if not isinstance(state_dict, Mapping):
        return None
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        return None
    if not any(k not in g for g in groups for k in _GUARDS_OFF):
        return None
    if not all(k in g for g in groups for k in _SCHEDULE_FREE_PLUS_KEYS):
        return None
    if any(k in g for g in groups for k in _PAPER_ONLY_KEYS):
        return None
    if isinstance(state, Mapping) and any(isinstance(s, Mapping) and ("x" in s or "y" in s) for s in state.values()):
        return None
    filled: list[dict[str, Any]] = []
    for group in groups:
        group = dict(group)
        for key, value in {**_GUARDS_OFF, **_GUARD_BOOKKEEPING}.items():
            group.setdefault(key, value)
        group["guard_counts"] = {**dict.fromkeys(_GUARDS, 0), **dict(group.get("guard_counts") or {})}
        filled.append(group)
    return {**state_dict, "param_groups": filled}


def _counted(counts: Mapping[str, int] | None, guard: str) -> dict[str, int]:
    """A copy of ``counts`` with ``guard`` counted once more (the group's dict is replaced, never changed)."""
    out = dict(counts or {})
    out[guard] = out.get(guard, 0) + 1
    return out


#: The largest finite value of the narrowest floating dtype (float16); a step
#: size below it fits every parameter dtype.
_SMALLEST_FLOAT_MAX = float(torch.finfo(torch.float16).max)


def _loss_value(loss: Any, error: type[Exception] = TypeError) -> Tensor | float:
    """A loss as a float64 0-d tensor (detached, on its device) or a Python float.

    ``error`` is raised for a value that is neither a real number nor a tensor.
    """
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"Invalid loss: a tensor of shape {tuple(loss.shape)} (expected one number)")
        if loss.is_complex():
            raise ValueError(f"Invalid loss: a complex tensor ({loss.dtype}; expected a real number)")
        wide = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
        return loss.detach().reshape(()).to(wide)
    if isinstance(loss, bool) or not isinstance(loss, Real):
        raise error(f"Invalid loss: {loss!r} (expected a real number or a one-element tensor)")
    return float(loss)


class AdamCScheduleFreePlusClosure(ClosureForm, AdamCScheduleFreePlus):
    """ScheduleFree+ whose parameters always hold ``x``; ``step(closure)`` with a closure returning the loss.

    Same arguments and math as :class:`AdamCScheduleFreePlus`.
    """

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None, clip_coef: float | Tensor = 1.0
    ) -> Any:
        """Evaluates ``closure`` at ``y`` and steps with its loss (or ``loss``, if given)."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step() needs a closure that computes the loss and gradients")
        return self._run_step(closure, loss=loss, clip_coef=clip_coef)


@with_backend_args
class AdamCScheduleFreePlusPaper(AdamCScheduleFreePlus):
    r"""The authors' interface to ScheduleFree+: ``step_func(function_value)``, their trajectory and state.

    Same arguments, defaults and trajectory as ``AdamCScheduleFreePlusPaper``
    of the authors' repository, on the foreach and fused backends. As theirs,
    it starts in eval mode (call :meth:`train` before the first step), keeps
    ``x`` and ``y`` in its state beside ``z``, ``exp_avg`` and
    ``exp_avg_sq`` (here copies of the points the step works from, refreshed
    after every step), logs ``grad_l1_ema_corr`` and ``function_value_ema``
    in its groups, and stores the gradient-norm EMA bias-corrected so that
    the next step corrects it again. The loss is averaged over ranks only
    when a gradient is sharded (a DTensor), as in the authors' code;
    :class:`AdamCScheduleFreePlus` averages it under plain data parallelism
    too, where each rank's loss is of its own batch.

    Differences: every group uses its own ``sf_beta1``, annealing and
    ``polyak_beta`` (the authors' code takes them from the first group). While
    :math:`\beta` anneals, a parameter without a gradient keeps ``x`` and
    ``z`` and its ``y`` follows the new :math:`\beta`; the authors' code
    leaves such a ``y`` where an earlier :math:`\beta` put it. A step with a
    non-finite loss, gradient or step size raises (ValueError for the loss,
    FloatingPointError otherwise) and changes nothing; a step without any
    gradient is empty (step size 0).

    In float32 the trajectory agrees with the authors' to float32 rounding:
    the Polyak step size feeds each step's rounding into the next, so the two
    runs differ as much as either differs from the same run in float64.

    Args:
        params, lr, betas, sf_beta1, eps, weight_decay, r, polyak_beta,
        c_warmup, sf_beta1_anneal_steps, sf_beta1_max, weight_lr_power: as
            for :class:`AdamCScheduleFreePlus` (the authors' defaults).
        {backend_args}
    """

    direction = AdamCPlusPaperDirection()
    _refuses = True

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
    ) -> None:
        super().__init__(
            params, lr, betas, sf_beta1, eps, weight_decay, r, polyak_beta, c_warmup, sf_beta1_anneal_steps,
            sf_beta1_max, weight_lr_power, foreach, fused, state_dtype, stochastic_rounding, skip_nonfinite=False,
        )  # fmt: skip
        for group in self.param_groups:
            group[self.group_key("train_mode")] = False  # the authors' class starts in eval mode

    def _enter_step(self, closure: Callable[[], Any] | None) -> None:
        if not self.train_mode:
            raise ModeError(
                f"{type(self).__name__} was not in train mode when step_func() or step() was called "
                "(it starts in eval mode, as the authors' class does): call optimizer.train() before "
                "training steps and optimizer.eval() before evaluating or saving."
            )

    def _averages_loss(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return any(hasattr(p.grad, "to_local") for g in self.param_groups for p in g["params"] if p.grad is not None)

    def _update(self, inputs: Mapping[str, Tensor] = _NO_INPUTS) -> None:
        super()._update(inputs)
        # x and y as the authors' class stores them: y is where the parameters
        # are, x = lerp(y, z, 1 - 1/beta).
        for group in self.param_groups:
            works, xs, ys, zs = [], [], [], []
            for p in group["params"]:
                state = self.state.get(p)
                if state and "x" in state:
                    works.append(real(work(p, state)))
                    xs.append(real(state["x"]))
                    ys.append(real(state["y"]))
                    zs.append(real(state["z"]))
            if works:
                torch._foreach_copy_(ys, works)
                torch._foreach_copy_(xs, works)
                torch._foreach_lerp_(xs, zs, 1 - 1 / self.y_beta(group))

    @torch.no_grad()
    def step_func(self, function_value: float | Tensor | None = None) -> Any:
        """One step with the loss ``function_value`` at ``y``; returns ``function_value``."""
        if function_value is None:
            raise TypeError(f"{type(self).__name__}.step_func() needs the loss: step_func(function_value)")
        self.step(loss=function_value)
        return function_value
