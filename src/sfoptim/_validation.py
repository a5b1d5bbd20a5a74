"""Hyperparameter checks shared by every optimizer.

Each check raises ``ValueError`` naming the argument and the offending value,
so a typo in a config file is found at construction, not as NaN at step 500.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value!r} (a tensor {name} must hold one element)")
        return float(value.detach().cpu().item())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    return float(value)


def param_list(params: Any, owner: str) -> Any:
    """``params`` as a list (a generator is read here, once); ValueError saying why when it is empty.

    A tensor or a dict is returned as it is, for ``torch.optim.Optimizer`` to
    refuse with its own message.
    """
    if isinstance(params, (torch.Tensor, dict)):
        return params
    try:
        params = list(params)
    except TypeError:
        return params
    if not params:
        raise ValueError(
            f"{owner} got an empty parameter list: the parameter iterable is empty. A generator like "
            "model.parameters() can be consumed only once; if it was passed to another optimizer or "
            "iterated before, call model.parameters() again (or keep list(model.parameters()))."
        )
    return params


def check_nonnegative(name: str, value: Any) -> None:
    """``value`` must be a finite real number >= 0."""
    v = _as_float(name, value)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")


def check_in_range(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """``value`` must lie in the interval given by ``low``/``high`` and openness flags."""
    v = _as_float(name, value)
    ok = math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low)
    ok = ok and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {interval})")


def check_interpolation(name: str, value: Any) -> None:
    """The y/x interpolation weight beta must lie in (0, 1].

    beta = 0 would make y equal z, and x could then no longer be recovered from
    the two stored buffers, so evaluation would be impossible.
    """
    check_in_range(name, value, 0.0, 1.0, low_open=True, high_open=False)


def check_steps(name: str, value: Any, minimum: int = 0) -> int:
    """A number of steps: a whole number >= ``minimum`` (a float such as 3.0 too; a ratio like 0.05 is refused)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < minimum or value != int(value):
        hint = "; to warm up over a fraction of training, multiply it by the total number of steps" if "warmup" in name else ""
        raise ValueError(f"Invalid {name}: {value!r} (must be a whole number of steps >= {minimum}{hint})")
    return int(value)


def check_warmup_steps(value: Any) -> None:
    """``warmup_steps``: a whole number of steps >= 0."""
    check_steps("warmup_steps", value)


def check_betas(value: Any) -> None:
    """Adam's ``betas``: beta1 in (0, 1] (the interpolation weight), beta2 in [0, 1)."""
    try:
        beta1, beta2 = value
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {value!r} (expected a pair (beta1, beta2))") from None
    check_interpolation("betas[0]", beta1)
    check_in_range("betas[1]", beta2, 0.0, 1.0, low_open=False, high_open=True)
