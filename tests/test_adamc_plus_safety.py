"""ScheduleFree+ under bad input: non-finite gradients and losses, overflowing step sizes, no gradients, accumulated losses.

The production class skips a step it cannot take (and counts and says so);
the paper form and ``skip_nonfinite=False`` refuse it with an error. Either
way nothing changes, and the next healthy step is the one a run that never
saw the bad step takes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sfoptim

PLUS, PAPER, CLOSURE = sfoptim.AdamCScheduleFreePlus, sfoptim.AdamCScheduleFreePlusPaper, sfoptim.AdamCScheduleFreePlusClosure
#: The production class without the guard rails that bound the step size (its cap would hide an overflow).
UNCAPPED = {"lr_cap": None, "growth_limit": None}


def make(cls=PLUS, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((3, 2), (4,))]
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.5}]
    return params, cls(groups, weight_decay=1.0, **kw).train()


def grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def loss_at(step: int) -> float:
    return 2.0 / (1 + step)


def frozen(opt, params):
    """Everything a step could change: parameters, state tensors, group entries (``guard_counts`` aside)."""
    sd = copy.deepcopy(opt.state_dict())
    groups = [{k: v for k, v in g.items() if k != "guard_counts"} for g in sd["param_groups"]]
    return [p.detach().clone() for p in params], sd["state"], groups


def assert_unchanged(before, after) -> None:
    (p0, s0, g0), (p1, s1, g1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "parameters changed"
    assert s0.keys() == s1.keys(), "state created or dropped"
    for key in s0:
        assert s0[key].keys() == s1[key].keys()
        assert all(torch.equal(s0[key][n], s1[key][n]) for n in s0[key])
    assert g0 == g1, "group state changed"


def clean_run(cls=PLUS, steps=(0, 1, 2, 4, 5), **kw):
    params, opt = make(cls, **kw)
    for s in steps:
        grads(params, s)
        opt.step(loss=loss_at(s))
    return [p.detach().clone() for p in params]


def poison(params, value: float) -> None:
    params[0].grad[1, 0] = value


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_nonfinite_gradient_element_skips_the_step_and_training_goes_on(bad: float) -> None:
    params, opt = make()
    for s in range(3):
        grads(params, s)
        opt.step(loss=loss_at(s))
    grads(params, 3)
    poison(params, bad)
    before = frozen(opt, params)
    with pytest.warns(RuntimeWarning, match=r"skipped a step: its gradient was not finite.*params'\]\[0\]"):
        opt.step(loss=loss_at(3))
    assert_unchanged(before, frozen(opt, params))
    assert [g["guard_counts"]["skipped"] for g in opt.param_groups] == [1, 1]
    for s in (4, 5):
        grads(params, s)
        opt.step(loss=loss_at(s))
        assert all(g["scheduled_lr"] > 0 for g in opt.param_groups)
    assert all(torch.equal(p, q) for p, q in zip(params, clean_run()))


@pytest.mark.parametrize("cls, kw", [(PAPER, {}), (PLUS, {"skip_nonfinite": False})])
def test_strict_forms_refuse_a_nonfinite_gradient_naming_the_parameter(cls, kw) -> None:
    params, opt = make(cls, **kw)
    for s in range(3):
        grads(params, s)
        opt.step(loss=loss_at(s))
    grads(params, 3)
    poison(params, float("nan"))
    before = frozen(opt, params)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient elements in param_groups\[0\]\['params'\]\[0\]"):
        opt.step(loss=loss_at(3))
    assert_unchanged(before, frozen(opt, params))
    for s in (4, 5):
        grads(params, s)
        opt.step(loss=loss_at(s))
    assert all(torch.equal(p, q) for p, q in zip(params, clean_run(cls, **kw)))


@pytest.mark.parametrize("loss", [1e160, 1e200, 1e300])
def test_a_huge_finite_loss_is_refused_whole_before_any_group_changes(loss: float) -> None:
    """The Polyak step size overflows the averaging weights: skipped (refused), every group as it was."""
    for cls, kw in ((PLUS, UNCAPPED), (PAPER, {})):
        params, opt = make(cls, **kw)
        for s in range(3):
            grads(params, s)
            opt.step(loss=loss_at(s))
        grads(params, 3)
        before = frozen(opt, params)
        if cls is PAPER:
            with pytest.raises(FloatingPointError, match="step size"):
                opt.step(loss=loss)
        else:
            with pytest.warns(RuntimeWarning, match="step size was not finite"):
                opt.step(loss=loss)
        assert_unchanged(before, frozen(opt, params))
        for s in (4, 5):
            grads(params, s)
            opt.step(loss=loss_at(s))
        assert all(torch.equal(p, q) for p, q in zip(params, clean_run(cls, **kw)))


def test_a_step_refused_for_the_last_group_leaves_the_first_group_untouched() -> None:
    """Only the second group's step size overflows (its multiplier is 1e8 times the first's)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(2)]
    opt = PAPER([{"params": params[:1], "lr": 1e-8}, {"params": params[1:], "lr": 1.0}]).train()
    grads(params, 0)
    opt.step(loss=1.0)
    grads(params, 1)
    before = frozen(opt, params)
    with pytest.raises(FloatingPointError, match="step size"):
        opt.step(loss=1e160)
    assert_unchanged(before, frozen(opt, params))


def test_a_step_size_beyond_float32_is_refused_for_float32_parameters() -> None:
    params, opt = make(dtype=torch.float32, **UNCAPPED)
    grads(params, 0)
    before = frozen(opt, params)
    with pytest.warns(RuntimeWarning, match="step size"):
        opt.step(loss=1e100)
    assert_unchanged(before, frozen(opt, params))
    assert not opt.state, "the refused first step left state behind"


def test_a_nonfinite_loss_is_skipped_by_the_production_class() -> None:
    params, opt = make()
    grads(params, 0)
    opt.step(loss=1.0)
    before = frozen(opt, params)
    with pytest.warns(RuntimeWarning, match="loss was not finite"):
        opt.step(loss=torch.tensor(float("nan")))
    assert_unchanged(before, frozen(opt, params))
    assert opt.param_groups[0]["guard_counts"]["skipped"] == 1


def test_skip_counts_round_trip_through_state_dict_and_are_not_shared() -> None:
    params, opt = make()
    grads(params, 0)
    poison(params, float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(loss=1.0)
        saved = opt.state_dict()
        opt.step(loss=1.0)  # a second skip must not reach into the saved dict
    assert saved["param_groups"][0]["guard_counts"] == {"skipped": 1, "cap": 0, "growth": 0}
    assert opt.param_groups[0]["guard_counts"]["skipped"] == 2
    other_params, other = make()
    other.load_state_dict(saved)
    assert [g["guard_counts"]["skipped"] for g in other.param_groups] == [1, 1]


@pytest.mark.parametrize("cls", [PLUS, PAPER, CLOSURE])
def test_a_step_without_any_gradient_is_an_empty_step(cls) -> None:
    params, opt = make(cls)
    for s in range(2):
        grads(params, s)
        if cls is CLOSURE:
            opt.step(lambda s=s: loss_at(s))
        else:
            opt.step(loss=loss_at(s))
    opt.zero_grad()
    before = [p.detach().clone() for p in params]
    if cls is CLOSURE:
        opt.step(lambda: 1.0)
    else:
        opt.step(loss=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert [g["k"] for g in opt.param_groups] == [3, 3]
    assert [g["scheduled_lr"] for g in opt.param_groups] == [0.0, 0.0]
    grads(params, 3)
    if cls is CLOSURE:
        opt.step(lambda: 1.0)
    else:
        opt.step(loss=1.0)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_an_empty_step_follows_the_reference_form() -> None:
    """With a gradient-norm EMA (``polyak_beta=0.9``) the empty step keeps the estimate in both forms."""
    runs = []
    for cls in (PAPER, sfoptim.AdamCScheduleFreePlusReference):
        params, opt = make(cls, polyak_beta=0.9, sf_beta1_anneal_steps=4)
        for s in range(5):
            grads(params, s)
            if s == 2:
                opt.zero_grad()
            opt.step(loss=loss_at(s))
        runs.append([p.detach().clone() for p in params])
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*runs)) <= 1e-12


# ------------------------------------------------------------ accumulate_loss
def accumulated_run(parts, cls=PLUS, **kw):
    params, opt = make(cls, **kw)
    grads(params, 0)
    for part in parts:
        opt.accumulate_loss(part)
    opt.step()
    return params, opt


def test_a_nan_micro_batch_loss_is_skipped_with_its_step_and_does_not_block_later_steps() -> None:
    params, opt = make()
    grads(params, 0)
    opt.accumulate_loss(0.25)
    opt.accumulate_loss(torch.tensor(float("nan")))
    with pytest.warns(RuntimeWarning, match="loss was not finite"):
        opt.step()
    assert not opt.state
    opt.accumulate_loss(0.5)
    opt.step()
    expected, _ = accumulated_run([0.5])
    assert all(torch.equal(p, q) for p, q in zip(params, expected))


def test_strict_form_refuses_a_nan_accumulated_loss_once() -> None:
    params, opt = make(PLUS, skip_nonfinite=False)
    grads(params, 0)
    opt.accumulate_loss(float("nan"))
    with pytest.raises(ValueError, match="Invalid loss"):
        opt.step()
    with pytest.raises(TypeError, match="accumulate_loss"):
        opt.step()  # the refused loss is gone with its step
    opt.accumulate_loss(0.5)
    opt.step()
    expected, _ = accumulated_run([0.5], skip_nonfinite=False)
    assert all(torch.equal(p, q) for p, q in zip(params, expected))


@pytest.mark.parametrize("clear", ["clear_accumulated_loss", "zero_grad", "load_state_dict"])
def test_the_accumulated_loss_is_cleared_publicly_by_zero_grad_and_by_loading(clear: str) -> None:
    params, opt = make()
    grads(params, 0)
    saved = opt.state_dict()
    opt.accumulate_loss(100.0)
    if clear == "load_state_dict":
        opt.load_state_dict(saved)
    elif clear == "zero_grad":
        opt.zero_grad()
        grads(params, 0)
    else:
        opt.clear_accumulated_loss()
    opt.accumulate_loss(0.5)
    opt.step()
    expected, _ = accumulated_run([0.5])
    assert opt.param_groups[0]["function_value"] == 0.5
    assert all(torch.equal(p, q) for p, q in zip(params, expected))


@pytest.mark.parametrize(
    "bad, error", [("0.5", TypeError), (None, TypeError), (True, TypeError), (torch.ones(2), ValueError), (torch.tensor(1j), ValueError)]
)
def test_accumulate_loss_refuses_what_is_not_one_number_and_keeps_the_sum(bad, error) -> None:
    params, opt = make()
    grads(params, 0)
    opt.accumulate_loss(0.5)
    with pytest.raises(error, match="Invalid loss"):
        opt.accumulate_loss(bad)
    opt.step()
    assert opt.param_groups[0]["function_value"] == 0.5


def test_bfloat16_micro_batch_losses_are_summed_in_float64() -> None:
    part = torch.tensor(0.001, dtype=torch.bfloat16)
    params, opt = accumulated_run([part] * 1000)
    expected = 1000 * float(part)
    assert abs(opt.param_groups[0]["function_value"] - expected) <= 1e-12 * expected
