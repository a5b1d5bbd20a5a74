"""The guard rails of the production ScheduleFree+ class, each on its own, and the class without them.

Every guard off and ``polyak_beta=0`` is the paper form, bit for bit; each
guard changes the step size exactly as its argument documents, and the steps
on which it binds are counted in ``param_groups[i]["guard_counts"]``.
"""

from __future__ import annotations

import math

import pytest
import torch

import sfoptim

PLUS, PAPER = sfoptim.AdamCScheduleFreePlus, sfoptim.AdamCScheduleFreePlusPaper
#: Every guard rail off (and the paper form's betas and c_warmup).
OFF = dict(warmup_steps=0, lr_cap=None, growth_limit=None, loss_beta=0.0, f_star=0.0, estimate_f_star=False)
PAPER_DEFAULTS = dict(betas=(0.9, 0.95), c_warmup=0)
SQRT_HALF_PI = math.sqrt(math.pi / 2)


def setup(cls, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((4, 3), (5,))]
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.5, "weight_decay": 3.0}]
    return params, cls(groups, **kw).train()


def grads(params, step: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)


def run(cls, losses, dtype=torch.float64, **kw):
    params, opt = setup(cls, dtype, **kw)
    lrs = []
    for step, loss in enumerate(losses):
        grads(params, step)
        opt.step(loss=loss)
        lrs.append([g["scheduled_lr"] for g in opt.param_groups])
    return params, opt, lrs


#: Falling, with a jump up every third step (so an active growth limit would bind).
LOSSES = [3.0 / (1 + 0.2 * t) * (2.0 if t % 3 == 2 else 1.0) for t in range(16)]


@pytest.mark.parametrize("backend", [{"fused": False}, {"fused": True}, {"foreach": False, "fused": False}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_guard_off_is_the_paper_form_bit_for_bit(backend, dtype) -> None:
    kw = dict(weight_decay=2.0, sf_beta1_anneal_steps=8, r=1.0, **PAPER_DEFAULTS, **backend)
    ours, opt, lrs = run(PLUS, LOSSES, dtype, **OFF, **kw)
    theirs, paper, paper_lrs = run(PAPER, LOSSES, dtype, **kw)
    assert lrs == paper_lrs
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert opt.param_groups[0]["guard_counts"] == {"skipped": 0, "cap": 0, "growth": 0}


def test_warmup_scales_the_step_size_linearly_and_c_warmup_follows_it() -> None:
    _, off, off_lrs = run(PLUS, LOSSES[:1], **OFF)
    _, opt, lrs = run(PLUS, LOSSES[:1], **{**OFF, "warmup_steps": 8})
    assert lrs[0] == pytest.approx([x / 8 for x in off_lrs[0]], rel=1e-14)
    assert [g["c_warmup"] for g in opt.param_groups] == [8, 8]
    assert [g["c_warmup"] for g in off.param_groups] == [0, 0]
    _, explicit = setup(PLUS, warmup_steps=8, c_warmup=3)
    assert explicit.param_groups[0]["c_warmup"] == 3


def test_the_cap_bounds_the_step_size_and_is_counted() -> None:
    _, off, off_lrs = run(PLUS, LOSSES, **OFF)
    cap = 0.5 * min(min(x) for x in off_lrs)
    _, opt, lrs = run(PLUS, LOSSES, **{**OFF, "lr_cap": cap})
    assert all(x == cap for step in lrs for x in step)
    assert [g["guard_counts"]["cap"] for g in opt.param_groups] == [len(LOSSES)] * 2
    _, loose, loose_lrs = run(PLUS, LOSSES, **{**OFF, "lr_cap": 1e9})
    assert loose_lrs == off_lrs and loose.param_groups[0]["guard_counts"]["cap"] == 0


def test_the_growth_limit_bounds_a_jump_of_the_polyak_estimate() -> None:
    """A loss 100 times larger on step 3: the estimate may exceed its largest value so far by ``growth_limit`` only."""
    losses = [1.0, 1.0, 100.0, 1.0]
    _, off, off_lrs = run(PLUS, losses, **OFF)
    _, opt, lrs = run(PLUS, losses, **{**OFF, "growth_limit": 1.5})
    assert lrs[:2] == off_lrs[:2]
    largest = max(off_lrs[0][0], off_lrs[1][0])
    assert off_lrs[2][0] > 10 * largest
    assert lrs[2][0] == pytest.approx(1.5 * largest, rel=1e-12)
    assert [g["guard_counts"]["growth"] for g in opt.param_groups] == [1, 1]


def test_the_gradient_norm_ema_is_debiased_once() -> None:
    """Gradients of the same l1 norm every step: the debiased EMA is that norm at every step (the paper form's is larger)."""
    for cls, kw in ((PLUS, OFF), (PAPER, {})):
        params, opt = setup(cls, polyak_beta=0.9, **kw)
        for step in range(4):
            grads(params, 0)  # the same gradients, so the same l1 norm
            opt.step(loss=1.0)
            l1 = sum(float(p.grad.abs().sum()) for p in params) * SQRT_HALF_PI
            ema = opt.param_groups[0]["grad_l1_ema"]
            used = ema / (1 - 0.9 ** (step + 1)) if cls is PLUS else ema
            if cls is PLUS:
                assert used == pytest.approx(l1, rel=1e-12)
            elif step > 0:
                assert used > 1.5 * l1  # corrected twice


def test_the_loss_ema_is_debiased_and_smooths_the_loss() -> None:
    """A constant loss gives the unsmoothed step; a changed loss enters with weight 1 - loss_beta."""
    _, _, off_lrs = run(PLUS, [2.0, 2.0, 2.0], **OFF)
    _, _, lrs = run(PLUS, [2.0, 2.0, 2.0], **{**OFF, "loss_beta": 0.9})
    assert sum(lrs, []) == pytest.approx(sum(off_lrs, []), rel=1e-12)
    _, opt, _ = run(PLUS, [2.0, 4.0], **{**OFF, "loss_beta": 0.9})
    assert opt.param_groups[0]["loss_ema"] == pytest.approx(0.9 * 0.1 * 2.0 + 0.1 * 4.0, rel=1e-14)


def test_f_star_is_subtracted_from_the_loss() -> None:
    _, _, lrs = run(PLUS, [1.5], **{**OFF, "f_star": 0.5})
    _, _, same = run(PLUS, [1.0], **OFF)
    assert lrs == same


def test_the_online_estimate_of_f_star_follows_the_step_taken_and_resets_below_the_loss() -> None:
    """After a step of size tau the estimate is h - tau * e / 2 (MoMo); a loss below it resets it to half the loss."""
    _, opt, lrs = run(PLUS, [2.0], **{**OFF, "estimate_f_star": True})
    group = opt.param_groups[0]
    e, h = group["grad_l1_ema"], 2.0  # the first step: no inner-product term yet
    assert group["f_star_estimate"] == pytest.approx(h - 0.5 * lrs[0][0] * e, rel=1e-12)
    assert group["f_star_estimate"] == pytest.approx(1.0, rel=1e-12)  # an uncapped step halves the gap
    _, opt, _ = run(PLUS, [2.0, 0.2], **{**OFF, "estimate_f_star": True})
    h2 = 0.2 + opt.param_groups[0]["ip_term"]
    assert h2 < 1.0
    step2 = opt.param_groups[0]["scheduled_lr"]
    # Reset to h2 / 2, then the uncapped step halves that gap again.
    assert opt.param_groups[0]["f_star_estimate"] == pytest.approx(h2 - 0.5 * step2 * opt.param_groups[0]["grad_l1_ema"], rel=1e-12)
    assert step2 == pytest.approx((h2 - h2 / 2) / opt.param_groups[0]["grad_l1_ema"], rel=1e-12)


def test_clip_coef_gives_the_step_size_of_the_unclipped_gradients() -> None:
    lrs = []
    for scale, coef in ((1.0, 1.0), (0.25, 0.25)):
        params, opt = setup(PLUS, **OFF)
        for step in range(3):
            grads(params, step, scale)
            opt.step(loss=LOSSES[step], clip_coef=coef)
        lrs.append(opt.param_groups[0]["scheduled_lr"])
    # Adam's eps is not scaled with the gradients: the directions, and so z, differ by about 1e-9.
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-7)
    params, opt = setup(PLUS)
    grads(params, 0)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="clip_coef"):
            opt.step(loss=1.0, clip_coef=bad)
    assert not opt.state


def test_the_defaults_keep_a_huge_loss_to_the_capped_step() -> None:
    params, opt = setup(PLUS)
    for step in range(30):
        grads(params, step)
        opt.step(loss=1e150 if step == 25 else 1.0)
    assert opt.param_groups[0]["scheduled_lr"] <= 0.05
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.param_groups[0]["guard_counts"]["cap"] >= 1


#: The group keys that ScheduleFree+ checkpoints without guard rails lack.
GUARD_KEYS = (*OFF, "f_star_estimate", "loss_ema", "polyak_max", "guard_counts")


def test_a_checkpoint_without_guard_rails_resumes_with_them_off(recwarn) -> None:
    steps, saved_at = 12, 5
    full, _, _ = run(PLUS, LOSSES[:steps], **OFF)
    params, opt = setup(PLUS, **OFF)  # as the class without guard rails ran
    for step in range(saved_at):
        grads(params, step)
        opt.step(loss=LOSSES[step])
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in GUARD_KEYS:
            del group[key]
    kept = dict(saved["param_groups"][0])
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PLUS([{"params": resumed_params[:1]}, {"params": resumed_params[1:]}]).train()  # guard rails on
    with pytest.warns(UserWarning, match="no guard-rail settings.*stay off") as caught:
        resumed.load_state_dict(saved)
    assert len(caught) == 1
    assert saved["param_groups"][0] == kept  # the caller's state dict is left as it was
    for group in resumed.param_groups:
        assert {k: group[k] for k in OFF} == OFF
        assert group["guard_counts"] == {"skipped": 0, "cap": 0, "growth": 0}
    for step in range(saved_at, steps):
        grads(resumed_params, step)
        resumed.step(loss=LOSSES[step])
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, full))
    # The loaded optimizer's own state dict carries the guard rails (off) and loads without a warning.
    again = PLUS([{"params": resumed_params[:1]}, {"params": resumed_params[1:]}])
    recwarn.clear()
    again.load_state_dict(resumed.state_dict())
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert [{k: g[k] for k in GUARD_KEYS} for g in again.param_groups] == [{k: g[k] for k in GUARD_KEYS} for g in resumed.param_groups]


def test_a_paper_checkpoint_is_still_refused_by_the_production_class() -> None:
    params, paper = setup(PAPER)
    grads(params, 0)
    paper.step_func(LOSSES[0])
    _, opt = setup(PLUS)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="saved by AdamCScheduleFreePlusPaper"):
        opt.load_state_dict(paper.state_dict())
    assert opt.state_dict()["param_groups"] == before["param_groups"]
