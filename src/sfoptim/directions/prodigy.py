r"""Schedule-free Prodigy: Adam's direction with the step size estimated on the fly.

Prodigy (Mishchenko and Defazio, 2023) estimates the distance :math:`D` from
the initial point to a solution and uses it as the learning rate, so the
``lr`` argument is a multiplier that stays 1. Inside schedule-free (as in the
authors' AlgoPerf submission) the estimate is taken along the base iterate
``z``. For step :math:`t` with the estimate :math:`d` of the previous step,
:math:`\gamma_t` the learning rate after warmup and :math:`\rho = \sqrt{\beta_2}`:

.. math::

    a_t &= d^2 \gamma_t \\
    n_t &= \rho\, n_{t-1} + a_t \textstyle\sum \langle g_t,\, x_0 - z_t \rangle \\
    s_t &= \rho\, s_{t-1} + a_t\, g_t \\
    d' &= \max\bigl(d,\; \min(\kappa\, d,\; c_d\, n_t / \textstyle\sum |s_t|)\bigr)
        \quad(\text{unchanged, with } n_t, \text{ while } \textstyle\sum |s_t| = 0) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, d^2 g_t^2, \qquad
    u_t = \frac{d'\, g_t}{\sqrt{v_t} + d'\epsilon} \\
    z_{t+1} &= z_t - d\gamma_t \Bigl(\frac{u_t}{\max(1,\ \frac{d}{d'}\sqrt{1-\beta_2^t}\,\mathrm{RMS}(u_t) / c)} + \lambda y_t\Bigr)

where :math:`\kappa` = ``d_growth`` limits the growth of :math:`d` per step
(``None``: no limit, as in the submission). The sums run over every
parameter of every group (one global :math:`d`, as in the submission), or
over each group alone with ``split_groups=True``.

:math:`\mathrm{RMS}(u_t)` is the root mean square of :math:`u_t` over each
parameter tensor and :math:`c` = ``update_clip``: StableAdamW's update
clipping (Wortsman et al., "Stable and low-precision training for
large-scale vision-language models", 2023), as prodigy-plus-schedule-free
uses it. :math:`u_t` has an RMS near 1 while the gradients are as large as
:math:`v` remembers them (:math:`v` holds :math:`d^2 g^2`); after a stretch
of small gradients :math:`v` has decayed and a larger gradient gives up to
:math:`1/\sqrt{1-\beta_2}` in every coordinate, which the clip brings back
to an RMS of :math:`c`. The RMS is measured against the bias-corrected
:math:`v` (the factor :math:`\sqrt{1-\beta_2^t}`) and the :math:`d` that
:math:`v` was accumulated with (the factor :math:`d/d'`), so that a young
:math:`v` and a growing :math:`d` do not make the clip bind on the first
steps. ``update_clip=None`` leaves :math:`u_t` as it is (the submission).

The average ``x`` weights step :math:`t` by
:math:`w_t = t^r (\max_{i \le t} d_i\gamma_i)^p`. By default
(``averaging="lr"``: :math:`r = 0`, :math:`p = 2`) that is the square of the
largest step size so far, as schedule-free AdamW weights by its learning
rate and prodigy-plus-schedule-free by :math:`(d\gamma)^2`: the first steps,
taken while :math:`d` is still far too small, barely count.
``averaging="algoperf"`` is the submission's :math:`r = 0.75`, :math:`p = 0`.

Differences from the submission: weight decay is taken at ``y`` (as in every
sfoptim optimizer; the submission takes it at ``x``), each group uses its own
learning rate (the submission the largest), and a step whose gradients are
all zero still advances the average (the submission skips it).

State per parameter, 16 bytes in float32, none of it derivable from the rest:
``z`` (the base iterate that schedule-free steps; ``y`` is the parameter and
``x`` follows from both), ``exp_avg_sq`` (:math:`v`, Adam's second moment),
``s`` (the decayed sum of :math:`a_t g_t`, whose L1 norm is the estimate's
denominator) and ``p0`` (the initial point :math:`x_0`: the numerator
measures the progress away from it). ``buffer_dtype`` stores the last three
in 16 bits (10 bytes per parameter in all with float32 parameters).

On CPU (``fused=None``, the default) a step is three passes over memory, one
C call per bucket each; everything is written in the last, so a step that
fails (out of memory for a work list) changes nothing:

1. the sums: read ``g``, ``z``, ``p0``, ``s`` (4 streams), added in an
   order that does not depend on the thread count (so neither does ``d``).
   They come first and alone: the new estimate :math:`d'` needs their totals
   over every bucket (and rank).
2. the clip: read ``g`` and ``v`` (2 streams) for :math:`\mathrm{RMS}(u_t)`
   of each tensor, which needs :math:`v_t` and :math:`d'`; skipped with
   ``update_clip=None``.
3. the step: read ``y``, ``g``, ``z``, ``v``, ``s`` and write ``y``, ``z``,
   ``v``, ``s`` (9 streams).

That is 15 parameter-sized streams (13 without the clip) against the 7 of
``torch.optim.AdamW(fused=True)`` (read and write the parameter and its two
moments, read the gradient): with every buffer in the parameter's dtype the
bytes moved are 15/7 = 2.1 times AdamW's, with float32 parameters and
bfloat16 buffers 46/28 = 1.6 times. ``docs/precision.md`` has the measured
step times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _validation
from ..engine import ClosureForm, ScheduleFreeOptimizer, with_backend_args
from .base import Bucket, BucketSum, Direction, KernelSpec, Kind, SumInputs, group_reduction, warmup_lr

__all__ = ["AVERAGING", "D_GROWTH", "UPDATE_CLIP", "ProdigyDirection", "ProdigyScheduleFree", "ProdigyScheduleFreeClosure"]

_NUMERATOR, _DENOMINATOR = "prodigy_numerator", "prodigy_denominator"

#: ``(r, weight_lr_power)`` of each ``averaging``: weights :math:`(\max d\gamma)^2`, or the AlgoPerf submission's :math:`t^{0.75}`.
AVERAGING = {"lr": (0.0, 2.0), "algoperf": (0.75, 0.0)}
#: The default limit on the growth of ``d`` per step (prodigy-plus-schedule-free's ``d_limiter`` is :math:`2^{1/4}`).
D_GROWTH = 2**0.5
#: Group keys every checkpoint of :class:`ProdigyScheduleFree` carries.
_PRODIGY_KEYS = ("d", "d_numerator", "d0", "d_coef", "d_growth", "averaging", "split_groups")
#: The default bound on the RMS of each tensor's normalised update (StableAdamW's: 1).
UPDATE_CLIP = 1.0


class ProdigyDirection(Direction):
    r"""Adam's direction scaled by Prodigy's estimate ``d`` (see the module docstring).

    State per parameter: ``exp_avg_sq`` (:math:`v`), ``s`` and ``p0`` (the
    initial point :math:`x_0`), in the group's ``buffer_dtype`` when it is set.
    Per group: ``d`` and ``d_numerator`` (:math:`n`), committed after each
    step; groups that share ``d`` hold equal copies. The kernel family is
    ``PRODIGY``; its sums are :math:`\sum g(p_0 - z)` and
    :math:`\sum |\rho s + a g|`.
    """

    reductions = (_NUMERATOR, _DENOMINATOR)
    bucket_sums = (BucketSum.GRAD_P0_MINUS_Z, BucketSum.DECAYED_L1)

    def beta(self, group: dict, step: int) -> float:
        return group["betas"][0]

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq", "s", "p0")

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        narrow = group.get("buffer_dtype")
        dtype = narrow if narrow is not None and like.dtype.is_floating_point else like.dtype
        if name == "p0":
            return like.to(dtype, memory_format=torch.preserve_format, copy=True)
        return torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        return float(group["d"]) * warmup_lr(group, step)

    def _names(self, group: dict) -> tuple[str, str]:
        if group.get("split_groups"):
            return group_reduction(_NUMERATOR, group), group_reduction(_DENOMINATOR, group)
        return _NUMERATOR, _DENOMINATOR

    def _accumulator_scale(self, group: dict, step: int) -> float:
        """:math:`a_t = d^2 \\gamma_t`, the weight of this step in ``n`` and ``s``."""
        d = float(group["d"])
        return d * d * warmup_lr(group, step)

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]:
        scale = self._accumulator_scale(group, step)
        rho = math.sqrt(group["betas"][1])
        dots, l1s = [], []
        for g, z, p0, s in zip(bucket.grads, bucket.z, bucket.buffers["p0"], bucket.buffers["s"]):
            dots.append((g * (p0.to(g.dtype) - z)).sum())
            l1s.append((s.to(g.dtype) * rho + g * scale).abs().sum())
        numerator, denominator = self._names(group)
        return {numerator: torch.stack(dots).sum() * scale, denominator: torch.stack(l1s).sum()}

    def sum_inputs(self, group: dict, step: int) -> SumInputs:
        return SumInputs(("p0", "s"), {"rho": math.sqrt(group["betas"][1]), "accum": self._accumulator_scale(group, step)})

    def reduce_sums(self, group: dict, step: int, beta: float, sums: Mapping[BucketSum, Tensor]) -> dict[str, Tensor]:
        numerator, denominator = self._names(group)
        scale = self._accumulator_scale(group, step)
        return {numerator: sums[BucketSum.GRAD_P0_MINUS_Z] * scale, denominator: sums[BucketSum.DECAYED_L1]}

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        beta2, clip = group["betas"][1], group.get("update_clip")
        scalars = {
            "beta2": beta2,
            "eps": group["eps"],
            "d": float(group["d"]),
            "d_new": self.estimate(group, reduced)[0],
            "accum": self._accumulator_scale(group, step),
            "rho": math.sqrt(beta2),
            "clip": 0.0 if clip is None else clip_limit(group, step, float(group["d"]), self.estimate(group, reduced)[0]),
        }
        return KernelSpec(Kind.PRODIGY, ("exp_avg_sq", "s"), scalars)

    def estimate(self, group: dict, reduced: Mapping[str, Tensor]) -> tuple[float, float]:
        """The new ``(d, d_numerator)`` of ``group`` from this step's sums (changes nothing)."""
        numerator_name, denominator_name = self._names(group)
        d = float(group["d"])
        denominator = reduced.get(denominator_name)
        denominator_value = float(denominator) if denominator is not None else 0.0
        if denominator_value == 0.0:
            return d, float(group["d_numerator"])
        numerator = math.sqrt(group["betas"][1]) * float(group["d_numerator"]) + float(reduced[numerator_name])
        estimate = group["d_coef"] * numerator / denominator_value
        if group["d_growth"] is not None:
            estimate = min(estimate, group["d_growth"] * d)
        return max(d, estimate), numerator

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        d = float(group["d"])
        d_new, _ = self.estimate(group, reduced)
        beta2 = group["betas"][1]
        grads = bucket.grads
        v, s = bucket.buffers["exp_avg_sq"], bucket.buffers["s"]
        # Narrow buffers (buffer_dtype) are updated in the working dtype and rounded once.
        v_work, s_work = _widened(v, grads), _widened(s, grads)
        torch._foreach_mul_(v_work, beta2)
        torch._foreach_addcmul_(v_work, grads, grads, value=d * d * (1 - beta2))
        torch._foreach_mul_(s_work, math.sqrt(beta2))
        torch._foreach_add_(s_work, grads, alpha=self._accumulator_scale(group, step))
        denom = torch._foreach_sqrt(v_work)
        torch._foreach_add_(denom, d_new * group["eps"])
        direction = list(torch._foreach_div(grads, denom))
        torch._foreach_mul_(direction, d_new)
        if group.get("update_clip") is not None:
            clip_rms_(direction, clip_limit(group, step, d, d_new))
        _write_back(v, v_work)
        _write_back(s, s_work)
        return direction, True

    def commit(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> None:
        group["d"], group["d_numerator"] = self.estimate(group, reduced)


def clip_limit(group: dict, step: int, d: float, d_new: float) -> float:
    r"""The RMS limit of :math:`u_t` this step: :math:`c\, (d'/d) / \sqrt{1-\beta_2^t}`.

    :math:`v` holds :math:`d^2 g^2` accumulated since step 1 without bias
    correction; measured against the bias-corrected :math:`v` and the
    :math:`d` it was accumulated with, the normalised update has RMS near 1
    whenever the gradients are as large as :math:`v` remembers them, so the
    clip binds only on a genuine jump (and not on every early step).
    """
    beta2 = group["betas"][1]
    return float(group["update_clip"]) * (d_new / d) / math.sqrt(1.0 - beta2**step)


def clip_rms_(tensors: list[Tensor], limit: float) -> None:
    r"""Divides each tensor by :math:`\max(1, \mathrm{RMS}/\text{limit})`, in place (a complex one as its real view)."""
    norms = torch._foreach_norm(tensors)
    for t, norm in zip(tensors, norms):
        size = t.numel() * (2 if t.is_complex() else 1)
        if size:
            t.div_((norm / (limit * math.sqrt(size))).clamp_min_(1.0))


def _widened(buffers: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    if not buffers or buffers[0].dtype == like[0].dtype:
        return buffers
    return [b.to(g.dtype) for b, g in zip(buffers, like)]


def _write_back(buffers: list[Tensor], work: list[Tensor]) -> None:
    if work is not buffers:
        torch._foreach_copy_(buffers, work)


@with_backend_args
class ProdigyScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free Prodigy: no learning rate to tune (Defazio et al.'s AlgoPerf entry).

    The step size is Prodigy's estimate ``d`` of the distance to a solution
    (see :mod:`sfoptim.directions.prodigy` for the equations); ``lr`` scales
    it and is best left at 1. Call :meth:`train` before training steps and
    :meth:`eval` before evaluating or saving, as for every schedule-free
    optimizer.

    Defaults: the average weights each step by the square of the largest
    step size so far (``averaging="lr"``), ``d`` grows by at most
    ``d_growth`` = :math:`\sqrt 2` per step (as prodigy-plus-schedule-free's
    ``d_limiter``, which allows :math:`2^{1/4}`: from ``d0`` = 1e-6 to 1e-3
    takes 20 steps, a warmup of its own), and :math:`\beta_2` = 0.99
    (:math:`v` averages over about 100 steps, Prodigy's sums over about 200).
    The AlgoPerf submission is ``averaging="algoperf"``, ``d_growth=None``,
    ``betas=(0.9, 0.9955)`` with ``warmup_steps`` 7.5 % of the run: tuned for
    runs of 10^4 to 10^5 steps. Its :math:`v` has no bias correction, so
    while it is young the step is up to about :math:`1/\sqrt{1-\beta_2}`
    times :math:`d` per coordinate; without the growth limit or a warmup,
    :math:`d` can grow by orders of magnitude within the first few steps and
    those steps are then large. Late in a run the same happens after a
    stretch of small gradients; ``update_clip`` bounds the RMS of each
    tensor's normalised update (StableAdamW's clipping), which stays
    inactive while the gradients are as large as :math:`v` remembers (its
    RMS is taken against the bias-corrected :math:`v` and the :math:`d` it
    was accumulated with, so a young :math:`v` does not trigger it).

    Args:
        params: parameters or parameter groups.
        lr: multiplier of the estimated step size (default 1.0).
        betas: :math:`(\beta, \beta_2)`: the interpolation weight in (0, 1] and
            the second-moment decay in [0, 1); :math:`\sqrt{\beta_2}` also decays
            Prodigy's sums (default (0.9, 0.99); the submission's: (0.9, 0.9955)).
        eps: added to the denominator, times ``d`` (default 1e-8).
        weight_decay: :math:`\lambda`, decoupled and applied at ``y`` (default 0).
        warmup_steps: linear warmup of ``lr`` in steps (default 0).
        averaging: ``"lr"`` (default: weights :math:`(\max d\gamma)^2`,
            ``r=0``, ``weight_lr_power=2``) or ``"algoperf"`` (the
            submission's :math:`t^{0.75}`, ``r=0.75``, ``weight_lr_power=0``).
        r: polynomial weighting power of the average (default None: from
            ``averaging``).
        weight_lr_power: power of the maximal step size ``d * lr`` in the
            averaging weights (default None: from ``averaging``).
        d0: initial estimate of ``d`` (default 1e-6); must be > 0.
        d_coef: multiplies the estimate (default 1.0); > 0.
        d_growth: the most ``d`` may grow in one step, a factor > 1 (default
            :math:`\sqrt 2`; prodigy-plus's ``d_limiter``: :math:`2^{1/4}`);
            None: no limit (the submission).
        update_clip: :math:`c > 0`, the largest RMS of each tensor's normalised
            update :math:`u_t` (default 1.0, StableAdamW's); None: no clipping
            (the submission).
        split_groups: each parameter group estimates its own ``d`` from its own
            parameters (default False: one ``d`` over all of them). Groups that
            share ``d`` should share ``betas`` and ``d_coef``.
        buffer_dtype: dtype of Prodigy's buffers ``exp_avg_sq``, ``s`` and ``p0``
            (e.g. ``torch.bfloat16``, as the submission keeps them, to save
            memory); they are updated in the working dtype and rounded into it.
            Default None: the working dtype. ``z`` is never narrowed.
        {backend_args_cpu_kernel}

    State per parameter: ``z``, ``exp_avg_sq``, ``s``, ``p0``. Per group:
    ``d`` (read it to see the step size) and ``d_numerator``.

    Example::

        opt = sfoptim.ProdigyScheduleFree(model.parameters(), weight_decay=0.01)
        opt.train(); model.train()
        for xb, yb in loader:
            opt.zero_grad(); loss_fn(model(xb), yb).backward(); opt.step()
        opt.eval(); model.eval()   # parameters now hold x
    """

    direction = ProdigyDirection()

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
        d_growth: float | None = D_GROWTH,
        update_clip: float | None = UPDATE_CLIP,
        split_groups: bool = False,
        buffer_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            averaging=averaging,
            r=r,
            weight_lr_power=weight_lr_power,
            d0=d0,
            d_coef=d_coef,
            d_growth=d_growth,
            update_clip=update_clip,
            split_groups=split_groups,
            buffer_dtype=buffer_dtype,
            foreach=foreach,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_betas(group["betas"])
        _validation.check_nonnegative("eps", group["eps"])
        _validation.check_warmup_steps(group["warmup_steps"])
        _validation.check_in_range("d0", group["d0"], 0.0, math.inf, low_open=True, high_open=True)
        _validation.check_in_range("d_coef", group["d_coef"], 0.0, math.inf, low_open=True, high_open=True)
        if group["d_growth"] is not None:
            _validation.check_in_range("d_growth", group["d_growth"], 1.0, math.inf, low_open=True, high_open=False)
        if group["update_clip"] is not None:
            _validation.check_in_range("update_clip", group["update_clip"], 0.0, math.inf, low_open=True, high_open=True)
        if not isinstance(group["split_groups"], bool):
            raise ValueError(f"Invalid split_groups: {group['split_groups']!r} (expected True or False)")
        narrow = group["buffer_dtype"]
        if narrow is not None and not (isinstance(narrow, torch.dtype) and narrow.is_floating_point):
            raise ValueError(f"Invalid buffer_dtype: {narrow!r} (expected None or a floating torch.dtype)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict (see :meth:`ScheduleFreeOptimizer.load_state_dict`).

        A checkpoint of this class whose groups have no ``update_clip``
        continues unclipped (``update_clip=None``), the update it was taking,
        with a ``UserWarning``; set ``param_groups[i]["update_clip"]`` after
        loading to clip.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        old = (
            isinstance(groups, (list, tuple))
            and all(isinstance(g, Mapping) for g in groups)
            and any("update_clip" not in g for g in groups)
            and all(k in g for g in groups for k in _PRODIGY_KEYS)
        )
        if old:
            filled = [{"update_clip": None, **g} for g in groups]  # type: ignore[union-attr]
            state_dict = {**state_dict, "param_groups": filled}
        super().load_state_dict(state_dict)
        if old:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict(): the checkpoint has no update_clip; the run continues "
                "unclipped (update_clip=None), as it was saved. Set param_groups[i]['update_clip'] = 1.0 after "
                "loading to clip the update.",
                UserWarning,
                stacklevel=2,
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; one that shares ``d`` takes the current shared estimate.

        A group with ``split_groups=True`` starts its own estimate at ``d0``.
        ``r`` and ``weight_lr_power`` left at None take the values of the
        group's ``averaging``.
        """
        param_group = dict(param_group)
        averaging = param_group.get("averaging", self.defaults["averaging"])
        if averaging not in AVERAGING:
            raise ValueError(f"Invalid averaging: {averaging!r} (expected one of {sorted(AVERAGING)})")
        for name, value in zip(("r", "weight_lr_power"), AVERAGING[averaging]):
            if param_group.get(name, self.defaults[name]) is None:
                param_group[name] = value
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        shared = [g for g in self.param_groups[:-1] if not g["split_groups"]]
        if not group["split_groups"] and shared:
            group["d"], group["d_numerator"] = shared[0]["d"], shared[0]["d_numerator"]
        else:
            group.setdefault("d", float(group["d0"]))
            group.setdefault("d_numerator", 0.0)


class ProdigyScheduleFreeClosure(ClosureForm, ProdigyScheduleFree):
    """Schedule-free Prodigy whose parameters always hold ``x``; ``step(closure)`` required.

    Same arguments and math as :class:`ProdigyScheduleFree` (the submission's form).
    """
