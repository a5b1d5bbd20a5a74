r"""The averaging schedule of schedule-free training, as pure functions.

Schedule-free training keeps the average ``x`` of the base iterates ``z``:

.. math::

    x_{t+1} = (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1}, \qquad
    c_{t+1} = \frac{w_{t+1}}{\sum_{i \le t+1} w_i}, \qquad
    w_t = t^{r}\, \gamma_{\max,t}^{p}

where :math:`\gamma_{\max,t}` is the largest learning rate used so far
(``lr_max``), :math:`r` the polynomial weighting power and :math:`p`
``weight_lr_power``. Weighting by the learning rate keeps the low-lr steps of
warmup from dominating the average.

Nothing here touches tensors or optimizer state: the engine calls these
functions and commits the results only once the step has succeeded.
"""

from __future__ import annotations

from typing import NamedTuple


class AveragingStep(NamedTuple):
    """Scalars of one schedule-free step for one parameter group.

    Attributes:
        step: the 1-based index ``t`` of this step.
        lr: the learning rate used by this step, after warmup/rectification.
        lr_max: running maximum of ``lr`` including this step.
        weight_sum: :math:`\\sum_{i \\le t} w_i` including this step.
        ckp1: the averaging coefficient :math:`c_{t}` (0 while every weight is 0).
    """

    step: int
    lr: float
    lr_max: float
    weight_sum: float
    ckp1: float


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: ``min(1, step / warmup_steps)`` for a 1-based ``step``."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    return 1.0


def averaging_step(
    step: int, lr: float, lr_max: float, weight_sum: float, r: float, weight_lr_power: float
) -> AveragingStep:
    """Advances the averaging schedule by one step.

    Args:
        step: 1-based step index ``t``.
        lr: the scheduled learning rate of this step (>= 0).
        lr_max: running maximum of the learning rate before this step
            (``-1.0`` before the first step, as the published package stores it).
        weight_sum: sum of the averaging weights before this step.
        r: polynomial weighting power.
        weight_lr_power: power of ``lr_max`` in the weight.

    Returns:
        The new scalars. While every weight so far is zero (``lr = 0`` from the
        start) the coefficient is 0, so ``x`` stays where it is instead of
        becoming NaN.
    """
    lr_max = max(lr, lr_max)
    weight = (step**r) * (max(lr_max, 0.0) ** weight_lr_power)
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum > 0.0 else 0.0
    return AveragingStep(step, lr, lr_max, weight_sum, ckp1)


def radam_rectification(step: int, beta2: float) -> float | None:
    r"""RAdam's variance rectification term :math:`r_t`, or ``None`` while undefined.

    With :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`, the rectifier
    :math:`\sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`
    exists only for :math:`\rho_t > 4`; before that the step falls back to SGD.
    """
    beta2_t = beta2**step
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
    if rho_t <= 4.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
