"""The paper form of ScheduleFree+ behaves as the authors' class does where users can see it.

It starts in eval mode and refuses to step before ``train()``; it keeps ``x``
and ``y`` in its state; it logs the authors' group entries; and with plain
(unsharded) gradients it uses each rank's own loss, reducing nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _dist import rel_diff, spawn

import sfoptim

PAPER = sfoptim.AdamCScheduleFreePlusPaper


def params_and_grads(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((3, 2), (5,))]
    return params, g


def test_paper_form_starts_in_eval_mode_and_steps_only_after_train() -> None:
    params, g = params_and_grads()
    opt = PAPER(params, weight_decay=1.0)
    assert not opt.train_mode
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    before, state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    for call in (lambda: opt.step_func(1.0), lambda: opt.step(loss=1.0)):
        with pytest.raises(sfoptim.ModeError, match=r"train mode.*optimizer\.train\(\)"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert opt.state_dict() == state
    assert opt.train() is opt and opt.train_mode
    opt.step_func(1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, params))


def test_paper_form_keeps_x_and_y_in_its_state_as_the_reference_does() -> None:
    """x and y after every step equal the reference form's stored x and y; eval() puts x in the parameters, train() y.

    One parameter has no gradient on even steps while the interpolation
    weight anneals, so its ``y`` moves without a step.
    """
    kw = dict(weight_decay=1.0, polyak_beta=0.9, c_warmup=2, sf_beta1_anneal_steps=6, r=1.0)
    ours, g = params_and_grads(1)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = PAPER(ours, **kw).train()
    ref = sfoptim.AdamCScheduleFreePlusReference(theirs, **kw)
    for step in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
            b.grad = a.grad.clone()
        if step % 2 == 0:
            ours[1].grad = theirs[1].grad = None
        opt.step_func(1.0 + 1.0 / (step + 1))
        ref.step_func(1.0 + 1.0 / (step + 1))
        stepped = [i for i, p in enumerate(theirs) if "z" in ref.state.get(p, {})]
        assert stepped == [i for i, p in enumerate(ours) if opt.state.get(p)]
        for name in ("x", "y", "z", "exp_avg", "exp_avg_sq"):
            mine = [opt.state[ours[i]][name] for i in stepped]
            assert rel_diff(mine, [ref.state[theirs[i]][name] for i in stepped]) <= 1e-12, f"{name} at step {step + 1}"
        assert all(torch.equal(ours[i], opt.state[ours[i]]["y"]) for i in stepped)
    group = opt.param_groups[0]
    assert group["grad_l1_ema_corr"] == group["grad_l1_ema"] > 0
    assert group["function_value_ema"] == group["function_value"] + group["ip_term"]
    opt.eval()
    assert all(torch.equal(p, opt.state[p]["x"]) for p in ours)
    opt.train()
    assert all(torch.equal(p, opt.state[p]["y"]) for p in ours)


def test_paper_form_state_dict_carries_x_and_y_and_resumes() -> None:
    params, g = params_and_grads(2)
    opt = PAPER(params).train()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step_func(1.0)
    saved = copy.deepcopy(opt.state_dict())
    assert all({"x", "y"} <= set(s) for s in saved["state"].values())
    copies = [p.detach().clone().requires_grad_() for p in params]
    other = PAPER(copies)
    other.load_state_dict(saved)
    for p, q in zip(params, copies):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        q.grad = p.grad.clone()
    opt.step_func(0.5)
    other.step_func(0.5)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    assert all(torch.equal(opt.state[p]["x"], other.state[q]["x"]) for p, q in zip(params, copies))


# ------------------------------------------------------------------ ranks
def _own_loss_worker(rank: int, world: int, result: str) -> None:
    out = {}
    for name, cls in (("paper", PAPER), ("production", sfoptim.AdamCScheduleFreePlus)):
        params, g = params_and_grads(3)
        opt = cls(params, weight_decay=1.0).train()
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)  # the same on every rank
            opt.step(loss=1.0 + rank + step)  # each rank's loss of its own batch
        flat = torch.cat([p.detach().flatten() for p in params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        out[name] = gathered
    if rank == 0:
        torch.save(out, result)


def _alone(cls, losses_of_rank: int, average: bool = False) -> torch.Tensor:
    params, g = params_and_grads(3)
    opt = cls(params, weight_decay=1.0).train()
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step(loss=(1.5 + step) if average else (1.0 + losses_of_rank + step))
    return torch.cat([p.detach().flatten() for p in params])


def test_paper_form_uses_each_ranks_own_loss_with_plain_gradients(tmp_path) -> None:
    """2 gloo ranks with equal gradients and different losses: the paper form reduces nothing, the production class averages."""
    result = str(tmp_path / "result.pt")
    spawn(_own_loss_worker, 2, result)
    out = torch.load(result)
    for rank in range(2):
        assert torch.equal(out["paper"][rank], _alone(PAPER, rank)), f"paper form on rank {rank}"
        assert rel_diff([out["production"][rank]], [_alone(sfoptim.AdamCScheduleFreePlus, 0, average=True)]) <= 1e-15
    assert not torch.equal(out["paper"][0], out["paper"][1])
