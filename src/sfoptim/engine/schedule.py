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
Learning-rate hooks (warmup, RAdam's rectification) belong to the
directions (:mod:`sfoptim.directions`).
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


def averaging_step(
    step: int, lr: float, lr_max: float, weight_sum: float, r: float, weight_lr_power: float, c_warmup: int = 0
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
        c_warmup: for steps ``t <= c_warmup`` the coefficient is 1 (``x``
            follows ``z``) and the weight is not added to ``weight_sum``;
            ``lr_max`` still grows.

    Returns:
        The new scalars. While every weight so far is zero (``lr = 0`` from the
        start) the coefficient is 0, so ``x`` stays where it is instead of
        becoming NaN.
    """
    lr_max = max(lr, lr_max)
    if step <= c_warmup:
        return AveragingStep(step, lr, lr_max, weight_sum, 1.0)
    weight = (step**r) * (max(lr_max, 0.0) ** weight_lr_power)
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum > 0.0 else 0.0
    return AveragingStep(step, lr, lr_max, weight_sum, ckp1)


def refined_coefficient(ckp1: float, beta: float, decoupling_c: float | None) -> float:
    r"""The averaging coefficient with the refinement of Song et al. (2025), "Through the River".

    :math:`c \leftarrow \min(1, c\,(1-\beta)\,C)` for ``decoupling_c`` = :math:`C`,
    which decouples the averaging window from the interpolation weight
    :math:`\beta`; ``None`` (the default) leaves :math:`c` as it is.
    """
    if decoupling_c is None:
        return ckp1
    return min(1.0, ckp1 * (1.0 - beta) * decoupling_c)


def decay_coefficient(weight_decay: float, lr: float, lr_max: float, adamc: bool) -> float:
    r"""The weight decay :math:`\lambda_t` of a step, with the AdamC correction when asked for.

    AdamC (Defazio, 2025, "Why Gradients Rapidly Increase Near the End of
    Training") makes decoupled weight decay follow the learning-rate schedule:
    :math:`\lambda_t = \lambda\,\gamma_t / \gamma_{\max,t}`. The paper's
    :math:`\gamma_{\max}` is the peak of the schedule; an optimizer that does
    not know the schedule ahead uses the largest learning rate so far, this
    step included (``lr_max``), which equals the peak once it is passed (during
    warmup the ratio is 1). The step then shrinks the decayed point by
    :math:`\gamma_t \lambda_t`, proportional to :math:`\gamma_t^2`, so that
    warmup and a decaying schedule keep the balance between gradient and
    decay. Without ``adamc`` (the default) :math:`\lambda_t = \lambda`.
    """
    if not adamc or weight_decay == 0 or lr_max <= 0.0:
        return weight_decay
    return weight_decay * (lr / lr_max)


def interpolation_step(ckp1: float, beta_prev: float, beta: float) -> tuple[float, float]:
    r"""The ``(weight, beta)`` pair that updates ``y`` in place when :math:`\beta` changes.

    The in-place update :math:`y \leftarrow \operatorname{lerp}(y, z, w) + \gamma(b(1-w) - 1)d`,
    :math:`z \leftarrow z - \gamma d` is exact for ``w = c`` and ``b = beta`` when
    ``y`` was built with the same :math:`\beta` as the new one. When ``y`` was
    built with :math:`\beta_-` and the step builds the new ``y`` with
    :math:`\beta`, substituting :math:`x = (y - (1-\beta_-) z)/\beta_-` gives
    the same form with :math:`w = 1 - \beta(1-c)/\beta_-` and :math:`b = \beta_-`,
    so every backend handles a changing :math:`\beta` unchanged. For an
    unchanged :math:`\beta` the inputs come back as they are (bit for bit).
    """
    if beta_prev == beta:
        return ckp1, beta
    return 1.0 - beta * (1.0 - ckp1) / beta_prev, beta_prev
