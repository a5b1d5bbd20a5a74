"""Averaging options every schedule-free optimizer accepts as param-group keys (off when absent).

``decoupling_c`` (Song et al., 2025: :math:`c \\leftarrow \\min(1, c(1-\\beta)C)`)
and ``c_warmup`` (:math:`c = 1` for the first steps), checked against a loop
that stores ``x``, ``y`` and ``z`` and writes the schedule out by hand.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch

import sfoptim

LR, BETA, DECAY = 0.1, 0.8, 0.01


def grad_at(y: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return 0.5 * y + torch.randn(y.shape, generator=g, dtype=torch.float64)


def assert_x_follows(
    opt: torch.optim.Optimizer, p: torch.nn.Parameter, expected: list[torch.Tensor], lr_at: Callable[[int], float] | None = None
) -> None:
    """Steps ``opt`` once per entry of ``expected`` and checks ``x`` (eval mode) after each step."""
    for t in range(1, len(expected) + 1):
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        p.grad = grad_at(p.detach(), t)
        opt.step()
        opt.eval()
        assert torch.allclose(p.detach(), expected[t - 1], rtol=1e-12, atol=1e-12), f"step {t}"
        opt.train()


def by_hand(y0: torch.Tensor, steps: int, decoupling_c: float | None, c_warmup: int) -> list[torch.Tensor]:
    """Schedule-free SGD with x, y, z stored; returns x after every step."""
    x, y, z = y0.clone(), y0.clone(), y0.clone()
    weight_sum, out = 0.0, []
    for t in range(1, steps + 1):
        g = grad_at(y, t)
        z = z - LR * (g + DECAY * y)
        if t <= c_warmup:
            c = 1.0
        else:
            weight_sum += LR**2
            c = LR**2 / weight_sum
            if decoupling_c is not None:
                c = min(1.0, c * (1 - BETA) * decoupling_c)
        x = (1 - c) * x + c * z
        y = BETA * x + (1 - BETA) * z
        out.append(x)
    return out


@pytest.mark.parametrize("decoupling_c, c_warmup", [(None, 0), (None, 4), (3.0, 0), (50.0, 2), (1e9, 0)])
def test_sgd_follows_the_schedule_written_by_hand(decoupling_c, c_warmup) -> None:
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(y0.clone())
    group = {"params": [p], "c_warmup": c_warmup}
    if decoupling_c is not None:
        group["decoupling_c"] = decoupling_c
    opt = sfoptim.SGDScheduleFree([group], lr=LR, momentum=BETA, weight_decay=DECAY)
    expected = by_hand(y0, 20, decoupling_c, c_warmup)
    assert_x_follows(opt, p, expected)


def test_neutral_decoupling_c_leaves_adamw_bit_identical() -> None:
    """(1 - beta) * C = 1 changes nothing, on every backend."""
    for backend in ({"fused": False}, {"fused": True}, {"foreach": False}):
        runs = []
        for extra in ({}, {"decoupling_c": 2.0}):
            p = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3))
            opt = sfoptim.AdamWScheduleFree([{"params": [p], **extra}], lr=0.01, betas=(0.5, 0.999), **backend)
            for t in range(10):
                p.grad = grad_at(p.detach(), t)
                opt.step()
            runs.append(p.detach().clone())
        assert torch.equal(runs[0], runs[1]), backend


@pytest.mark.parametrize("key, value", [("decoupling_c", 0.0), ("decoupling_c", float("nan")), ("c_warmup", -1), ("c_warmup", 1.5)])
def test_invalid_averaging_options_raise_value_error_naming_them(key, value) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        sfoptim.AdamWScheduleFree([{"params": [p], key: value}])


# ----------------------------------------------------------- weight-decay options
# ``decay_at="z"`` takes the decay at z (the direction becomes d + lambda z);
# ``adamc=True`` scales lambda by lr / lr_max (AdamC). A falling learning rate,
# set in the group before each step as a scheduler does, makes AdamC act.
WD, BETA2, EPS, STEPS = 0.3, 0.9, 1e-8, 12


def lr_at(step: int) -> float:
    return LR * (1.0 - step / (STEPS + 4))


def decayed_by_hand(kind: str, y0: torch.Tensor, decay_at: str, adamc: bool) -> list[torch.Tensor]:
    """Schedule-free SGD or AdamW with x, y, z stored; returns x after every step."""
    x, y, z = y0.clone(), y0.clone(), y0.clone()
    v = torch.zeros_like(y0)
    weight_sum, lr_max, out = 0.0, 0.0, []
    for t in range(1, STEPS + 1):
        lr = lr_at(t)
        lr_max = max(lr_max, lr)
        g = grad_at(y, t)
        if kind == "adamw":
            v = BETA2 * v + (1 - BETA2) * g * g
            d = g / ((v / (1 - BETA2**t)).sqrt() + EPS)
        else:
            d = g
        decay = WD * lr / lr_max if adamc else WD
        d = d + decay * (z if decay_at == "z" else y)
        z = z - lr * d
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        x = (1 - c) * x + c * z
        y = BETA * x + (1 - BETA) * z
        out.append(x)
    return out


def decayed_optimizer(kind: str, p: torch.nn.Parameter, options: dict, **backend) -> torch.optim.Optimizer:
    group = {"params": [p], **options}
    if kind == "adamw":
        return sfoptim.AdamWScheduleFree([group], lr=LR, betas=(BETA, BETA2), eps=EPS, weight_decay=WD, **backend)
    return sfoptim.SGDScheduleFree([group], lr=LR, momentum=BETA, weight_decay=WD, **backend)


DECAY_OPTIONS = [("z", False), ("y", True), ("z", True)]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("decay_at, adamc", DECAY_OPTIONS)
@pytest.mark.parametrize(
    "backend", [{}, {"fused": True}, {"foreach": True}, {"foreach": False}], ids=["default", "fused", "foreach", "per-tensor"]
)
def test_weight_decay_options_follow_the_loop_written_by_hand(kind, decay_at, adamc, backend) -> None:
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(y0.clone())
    opt = decayed_optimizer(kind, p, {"decay_at": decay_at, "adamc": adamc}, **backend)
    expected = decayed_by_hand(kind, y0, decay_at, adamc)
    # The option must matter on this run: the default decay gives other numbers.
    assert not torch.allclose(expected[-1], decayed_by_hand(kind, y0, "y", False)[-1], rtol=1e-6, atol=1e-6)
    assert_x_follows(opt, p, expected, lr_at)


def test_fused_true_with_decay_at_z_takes_the_kernel_without_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfoptim.backends import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler")
    ran, original = [], cpu_kernel.step
    monkeypatch.setattr(cpu_kernel, "step", lambda *a, **k: ran.append(original(*a, **k)) or ran[-1])
    p = torch.nn.Parameter(torch.ones(3))
    opt = sfoptim.AdamWScheduleFree([{"params": [p], "decay_at": "z"}], weight_decay=0.1, fused=True)
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert ran == [True]


@pytest.mark.parametrize("decay_at, adamc", DECAY_OPTIONS)
def test_weight_decay_options_survive_a_state_dict_round_trip(decay_at, adamc) -> None:
    """An optimizer built without the options and loaded from a checkpoint continues with them."""
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = torch.nn.Parameter(y0.clone())
    opt = decayed_optimizer("adamw", p, {"decay_at": decay_at, "adamc": adamc})
    for t in range(1, 5):
        opt.param_groups[0]["lr"] = lr_at(t)
        p.grad = grad_at(p.detach(), t)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    loaded = decayed_optimizer("adamw", q, {})
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared tensors
    assert loaded.param_groups[0]["decay_at"] == decay_at and loaded.param_groups[0]["adamc"] is adamc
    for t in range(5, STEPS + 1):
        loaded.param_groups[0]["lr"] = lr_at(t)
        q.grad = grad_at(q.detach(), t)
        loaded.step()
    loaded.eval()
    expected = decayed_by_hand("adamw", y0, decay_at, adamc)[-1]
    assert torch.allclose(q.detach(), expected, rtol=1e-12, atol=1e-12)


def test_decay_options_in_the_wrapper_follow_the_loop_written_by_hand() -> None:
    """ScheduleFreeWrapper around SGD with ``sf_decay_at="z"`` and ``sf_adamc``: schedule-free SGD decaying at z."""
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q = torch.nn.Parameter(y0.clone())
    wrapper = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([q], lr=LR), weight_decay_at_y=WD, momentum=BETA)
    for group in wrapper.param_groups:
        group["sf_decay_at"], group["sf_adamc"] = "z", True
    wrapper.train()
    for t in range(1, STEPS + 1):
        wrapper.param_groups[0]["lr"] = lr_at(t)
        q.grad = grad_at(q.detach(), t)
        wrapper.step()
    wrapper.eval()
    assert torch.allclose(q.detach(), decayed_by_hand("sgd", y0, "z", True)[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key, value", [("decay_at", "x"), ("decay_at", None), ("adamc", 1), ("adamc", "yes")])
def test_invalid_weight_decay_options_raise_value_error_naming_them(key, value) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"Invalid {key}: {value!r}"):
        sfoptim.AdamWScheduleFree([{"params": [p], key: value}])
    with pytest.raises(ValueError, match=f"Invalid sf_{key}"):
        wrapper = sfoptim.ScheduleFreeWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
        wrapper.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], f"sf_{key}": value})
