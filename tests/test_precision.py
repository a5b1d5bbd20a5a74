"""bfloat16 parameters with wide state, stochastic rounding, GradScaler, non-finite gradients."""

from __future__ import annotations

import copy

import pytest
import registry
import torch
import torch.nn as nn

import sfoptim
from sfoptim.precision import grads_are_finite, stochastic_round_

BF16, F32 = torch.bfloat16, torch.float32

#: Every registered optimizer that keeps wide master copies, in train/eval form, whose step needs no loss.
FACTORIES = {i.name: i.make for i in registry.select(low_precision=True, closure=False, needs_loss=False)}


def bf16_exact_params(seed: int = 0) -> list[torch.Tensor]:
    """float32 parameters whose values are exactly representable in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(BF16).to(F32) for shape in [(6, 5), (5,), (3, 6)]]


def bf16_exact_grads(step: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(BF16).to(F32) for p in like]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bf16_with_float32_state_follows_the_float32_run_exactly(name):
    # Same starting point and same gradients: the optimizer's arithmetic must be
    # that of the float32 run, and the bf16 weights its rounding.
    ref = [nn.Parameter(p.clone()) for p in bf16_exact_params()]
    low = [nn.Parameter(p.to(BF16)) for p in bf16_exact_params()]
    opt_ref = FACTORIES[name](ref)
    opt_low = FACTORIES[name](low, state_dtype=F32)
    for step in range(12):
        grads = bf16_exact_grads(step, ref)
        for p, q, g in zip(ref, low, grads):
            p.grad, q.grad = g.clone(), g.to(BF16)
        opt_ref.step()
        opt_low.step()
        for p, q in zip(ref, low):
            state = opt_low.state[q]
            assert state["master"].dtype == F32 and state["z"].dtype == F32 and q.dtype == BF16
            torch.testing.assert_close(state["master"], p.detach(), rtol=0, atol=0)
            torch.testing.assert_close(state["z"], opt_ref.state[p]["z"], rtol=0, atol=0)
            assert torch.equal(q.detach(), p.detach().to(BF16))
        if step % 4 == 3:
            for x_low, x_ref in zip(opt_low.eval_params(), opt_ref.eval_params()):
                assert x_low.dtype == F32
                torch.testing.assert_close(x_low, x_ref, rtol=0, atol=0)
            opt_low.eval()
            opt_ref.eval()
            for p, q in zip(ref, low):
                assert torch.equal(q.detach(), p.detach().to(BF16)), "eval() writes the rounded x"
            opt_low.train()
            opt_ref.train()
            for p, q in zip(ref, low):
                torch.testing.assert_close(opt_low.state[q]["master"], p.detach(), rtol=0, atol=1e-6)


def test_buffers_are_kept_in_state_dtype_and_only_for_narrow_params():
    wide = nn.Parameter(torch.randn(4))
    narrow = nn.Parameter(torch.randn(4).to(BF16))
    opt = sfoptim.AdamWScheduleFree([wide, narrow], state_dtype=F32)
    wide.grad, narrow.grad = torch.randn(4), torch.randn(4).to(BF16)
    opt.step()
    assert "master" not in opt.state[wide]
    assert {k: v.dtype for k, v in opt.state[narrow].items()} == {"master": F32, "z": F32, "exp_avg_sq": F32}
    plain = sfoptim.AdamWScheduleFree([nn.Parameter(torch.randn(4).to(BF16))])
    p = plain.param_groups[0]["params"][0]
    p.grad = torch.randn(4).to(BF16)
    plain.step()
    assert {k: v.dtype for k, v in plain.state[p].items()} == {"z": BF16, "exp_avg_sq": BF16}


def test_small_updates_survive_only_with_wide_state():
    # 1e-4-sized steps on weights near 1 are far below half a bf16 ulp (2^-8).
    plain_p = nn.Parameter(torch.ones(64, dtype=BF16))
    wide_p = nn.Parameter(torch.ones(64, dtype=BF16))
    plain = sfoptim.SGDScheduleFree([plain_p], lr=1e-4)
    wide = sfoptim.SGDScheduleFree([wide_p], lr=1e-4, state_dtype=F32)
    for _ in range(200):
        plain_p.grad = torch.ones(64, dtype=BF16)
        wide_p.grad = torch.ones(64, dtype=BF16)
        plain.step()
        wide.step()
    assert torch.all(plain.state[plain_p]["z"] == 1), "published behaviour: bf16 z does not move"
    torch.testing.assert_close(wide.state[wide_p]["z"], torch.full((64,), 1 - 200 * 1e-4), rtol=1e-5, atol=0)
    wide.eval()
    assert torch.all(wide_p < 1), "the rounded x moved too"


def test_state_dict_round_trip_keeps_state_wide():
    p = nn.Parameter(torch.randn(5).to(BF16))
    opt = sfoptim.AdamWScheduleFree([p], state_dtype=F32)
    p.grad = torch.randn(5).to(BF16)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    opt2 = sfoptim.AdamWScheduleFree([q], state_dtype=F32)
    opt2.load_state_dict(sd)
    for key in ("master", "z", "exp_avg_sq"):
        assert opt2.state[q][key].dtype == F32
        assert torch.equal(opt2.state[q][key], opt.state[p][key])


def test_invalid_state_dtype_is_rejected():
    with pytest.raises(ValueError, match="state_dtype"):
        sfoptim.AdamWScheduleFree([nn.Parameter(torch.randn(2))], state_dtype=torch.int32)
    with pytest.raises(ValueError, match="state_dtype"):
        base = torch.optim.SGD([{"params": [nn.Parameter(torch.randn(2))], "state_dtype": F32}], lr=0.1)
        sfoptim.ScheduleFreeWrapper(base)
    with pytest.raises(ValueError, match="state_dtype"):
        sfoptim.SGDScheduleFreeReference([{"params": [nn.Parameter(torch.randn(2))], "state_dtype": F32}])


# ------------------------------------------------------- stochastic rounding
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    lo = torch.tensor(1.0, dtype=BF16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=BF16))
    value = (lo.float() + 0.3 * (hi.float() - lo.float())).item()
    src = torch.full((20000,), value)
    src[:10] = -value  # negative numbers round in magnitude the same way
    dst = torch.empty(20000, dtype=BF16)
    stochastic_round_(dst, src, generator=torch.Generator().manual_seed(0))
    body = dst[10:].float()
    assert set(body.unique().tolist()) <= {lo.item(), hi.item()}
    assert abs(body.mean().item() - value) < 4 * (hi - lo).float().item() / (20000**0.5)
    assert torch.all(dst[:10] < 0)


def test_stochastic_rounding_keeps_exact_and_special_values():
    src = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan")])
    dst = torch.empty(7, dtype=BF16)
    for seed in range(5):
        stochastic_round_(dst, src, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(dst.float(), src, equal_nan=True, rtol=0, atol=0)


def test_optimizer_with_stochastic_rounding_writes_a_neighbour_of_the_master():
    p = nn.Parameter(torch.randn(1000).to(BF16))
    opt = sfoptim.AdamWScheduleFree([p], lr=1e-3, state_dtype=F32, stochastic_rounding=True)
    for _ in range(5):
        p.grad = torch.randn(1000).to(BF16)
        opt.step()
    master = opt.state[p]["master"]
    down = master.to(BF16)  # nearest; the stochastic value is it or its other neighbour
    gap = (p.detach().float() - master).abs()
    ulp = torch.finfo(BF16).eps * master.abs().clamp_min(1e-30) * 2
    assert torch.all(gap <= ulp)
    assert not torch.equal(p.detach(), down), "stochastic rounding differs from nearest somewhere"


# ------------------------------------------------------------- GradScaler
def _scaled_run(skip_at: set[int], poison: bool, wrapper: bool) -> tuple[nn.Module, torch.optim.Optimizer, list[int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    if wrapper:
        opt = sfoptim.ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), lr=0.05), momentum=0.9)
    else:
        opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    counts = []
    for step in range(10):
        if step in skip_at and not poison:
            continue
        g = torch.Generator().manual_seed(step)
        xb, yb = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(xb).float(), yb)
        scaler.scale(loss).backward()
        if step in skip_at:
            model[0].weight.grad[0, 0] = float("inf")  # an fp16 overflow in the backward
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step in skip_at:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "skipped step moved y"
        counts.append(opt.param_groups[0][opt.group_key("k")])
    return model, opt, counts


@pytest.mark.parametrize("wrapper", [False, True], ids=["adamw", "wrapper"])
def test_gradscaler_skipped_steps_do_not_advance_the_optimizer(wrapper):
    model, opt, counts = _scaled_run({3, 7}, poison=True, wrapper=wrapper)
    clean_model, clean_opt, _ = _scaled_run({3, 7}, poison=False, wrapper=wrapper)
    assert counts == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    key = opt.group_key("weight_sum")
    assert opt.param_groups[0][key] == pytest.approx(clean_opt.param_groups[0][key], rel=1e-12)
    for p, q in zip(model.parameters(), clean_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for x, x_clean in zip(opt.eval_params(), clean_opt.eval_params()):
        torch.testing.assert_close(x, x_clean, rtol=1e-5, atol=1e-6)


# ------------------------------------------------ non-finite without scaler
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_non_finite_gradient_poisons_only_its_elements_consistently(name):
    ps = [nn.Parameter(p) for p in bf16_exact_params()]
    opt = FACTORIES[name](ps)
    for step in range(3):
        for p, g in zip(ps, bf16_exact_grads(step, ps)):
            p.grad = g
        if step == 2:
            ps[0].grad[1, 2] = float("nan")
            assert not grads_are_finite(opt)
        else:
            assert grads_are_finite(opt)
        opt.step()
    y, z = ps[0].detach(), opt.state[ps[0]]["z"]
    bad_y, bad_z = ~torch.isfinite(y), ~torch.isfinite(z)
    assert torch.equal(bad_y, bad_z), "y and z must be poisoned in the same elements"
    assert bad_y.sum() == 1 and bad_y[1, 2]
    assert all(torch.isfinite(p).all() for p in ps[1:])
    # Mode switching keeps the damage where it is.
    opt.eval()
    assert (~torch.isfinite(ps[0])).sum() == 1
