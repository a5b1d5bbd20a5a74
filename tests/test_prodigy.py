"""Schedule-free Prodigy: the estimate ``d`` across groups and ranks, narrow buffers.

The generic checks (state dicts, modes, backends, one group against the
reference form) run through ``tests/registry.py``. Here: several groups with
different learning rates (one shared ``d`` against one per group), a group
without gradients, DDP and FSDP2 against a single process, and
``buffer_dtype``.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import registry
import torch
import torch.nn as nn
from _dist import rel_diff, spawn
from test_distributed import PRODIGY, batch, check_mode_switch, make_model, params, shard, train_step

import sfoptim

F64 = torch.float64


def _groups(seed: int = 0) -> list[list[nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [[(4, 3), (5,)], [(6,)], [(2, 2)]]
    return [[nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in group] for group in shapes]


def _set_grads(groups: list[list[torch.Tensor]], step: int, skip_last: bool) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for gi, group in enumerate(groups):
        for p in group:
            noise = torch.randn(p.shape, generator=g, dtype=F64)
            # The last group has no gradient on odd steps (a frozen or unused branch).
            p.grad = None if skip_last and gi == len(groups) - 1 and step % 2 else 0.3 * p.detach() + noise


ALGOPERF = dict(averaging="algoperf", d_growth=None, update_clip=None)  # the submission: its averaging, d unlimited, no clip


@pytest.mark.parametrize("form", [ALGOPERF, {}], ids=["algoperf", "defaults"])
@pytest.mark.parametrize("split_groups", [False, True], ids=["shared_d", "split_groups"])
def test_groups_with_different_lrs_match_the_reference(split_groups: bool, form: dict) -> None:
    lrs = [1.0, 0.3, 2.0]
    kwargs = dict(d0=1e-4, betas=(0.9, 0.99), weight_decay=0.02, warmup_steps=4, split_groups=split_groups, **form)
    ours, theirs = _groups(), _groups()
    opt = sfoptim.ProdigyScheduleFree([{"params": g, "lr": lr} for g, lr in zip(ours, lrs)], **kwargs)
    ref = sfoptim.ProdigyScheduleFreeReference([{"params": g, "lr": lr} for g, lr in zip(theirs, lrs)], **kwargs)
    for step in range(40):
        _set_grads(ours, step, skip_last=True)
        _set_grads(theirs, step, skip_last=True)
        opt.step()
        ref.step()
        flat_ours = [p.detach() for g in ours for p in g]
        flat_theirs = [p.detach() for g in theirs for p in g]
        assert rel_diff(flat_ours, flat_theirs) <= 1e-9, f"step {step + 1}"
    assert rel_diff(opt.eval_params(), ref.eval_params()) <= 1e-9
    ds = [g["d"] for g in opt.param_groups]
    assert ds == pytest.approx([g["d"] for g in ref.param_groups], rel=1e-9)
    grown = 100 if form else 3  # the growth limit and the update clip of the defaults slow d down in these 40 steps
    assert min(ds) > grown * kwargs["d0"], "the estimate should have grown from d0"
    if split_groups:
        assert len(set(ds)) == 3, "each group keeps its own estimate"
    else:
        assert len(set(ds)) == 1, "the groups share one estimate"


def test_a_group_added_later_joins_the_shared_estimate() -> None:
    first, later = _groups()[:2]
    opt = sfoptim.ProdigyScheduleFree(first, d0=1e-4)
    for step in range(30):  # the update clip holds d at d0 for the first steps
        _set_grads([first], step, skip_last=False)
        opt.step()
    opt.add_param_group({"params": later})
    assert opt.param_groups[1]["d"] == opt.param_groups[0]["d"] > 1e-4
    assert opt.param_groups[1]["d_numerator"] == opt.param_groups[0]["d_numerator"]
    own = sfoptim.ProdigyScheduleFree(first, d0=1e-4, split_groups=True)
    own.param_groups[0]["d"] = 0.5
    own.add_param_group({"params": later})
    assert own.param_groups[1]["d"] == 1e-4


# ------------------------------------------------------------ defaults
def _d_trajectory(steps: int = 30, **kwargs) -> list[float]:
    (params,) = _groups()[:1]
    kwargs.setdefault("update_clip", None)  # the growth limit alone (the clip slows the first steps of d)
    opt = sfoptim.ProdigyScheduleFree(params, **kwargs)
    ds = [opt.param_groups[0]["d"]]
    for step in range(steps):
        _set_grads([params], step, skip_last=False)
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    return ds


def test_d_grows_by_at_most_d_growth_per_step() -> None:
    ds = _d_trajectory()
    ratios = [b / a for a, b in zip(ds, ds[1:])]
    assert max(ratios) <= 2**0.5 * (1 + 1e-12)
    assert ratios.count(pytest.approx(2**0.5, rel=1e-12)) >= 5, "the limit binds while d climbs from d0"
    free = _d_trajectory(d_growth=None)
    assert max(b / a for a, b in zip(free, free[1:])) > 3, "without the limit d jumps"
    doubled = _d_trajectory(d_growth=2.0)
    assert max(b / a for a, b in zip(doubled, doubled[1:])) == pytest.approx(2.0, rel=1e-12)


def _spike(update_clip: float | None, spike: float = 1e3) -> tuple[torch.Tensor, float, float]:
    """Steps on small gradients, then one ``spike`` times larger with ``update_clip``.

    Returns its change of ``z`` divided by ``d`` (the normalised update), and the clip's limit for
    that step, :math:`c\\,(d'/d)/\\sqrt{1-\\beta_2^t}` (inf without a clip).
    """
    p = nn.Parameter(torch.zeros(200, dtype=F64))
    opt = sfoptim.ProdigyScheduleFree([p], d0=1e-3, d_growth=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        p.grad = 1e-3 * torch.randn(200, generator=g, dtype=F64)
        opt.step()
    opt.param_groups[0]["update_clip"] = update_clip
    z, d = opt.state[p]["z"].clone(), opt.param_groups[0]["d"]
    p.grad = spike * 1e-3 * torch.randn(200, generator=g, dtype=F64)
    opt.step()
    d_new = opt.param_groups[0]["d"]
    limit = math.inf if update_clip is None else update_clip * (d_new / d) / math.sqrt(1 - 0.99**301)
    return (z - opt.state[p]["z"]) / d, limit


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


def test_update_clip_bounds_the_rms_of_a_spike_and_is_inactive_below_it() -> None:
    free, _ = _spike(None)
    assert _rms(free) > 5, "without the clip the spike moves every coordinate by about d / sqrt(1 - beta2)"
    for c in (1.0, 0.5):
        clipped, limit = _spike(c)
        assert 1.0 < limit / c < 1.5  # bias correction and the growth of d loosen it a little
        assert _rms(clipped) == pytest.approx(limit, rel=1e-12)
    loose, _ = _spike(1e9)
    assert torch.equal(loose, free), "a clip that does not bind changes nothing"
    calm, limit = _spike(1.0, spike=0.3)
    assert _rms(calm) < limit, "gradients smaller than v remembers are not clipped"
    assert torch.equal(calm, _spike(None, spike=0.3)[0])


def test_update_clip_does_not_bind_on_the_first_step() -> None:
    """On the first step v = (1 - beta2) d^2 g^2, so u has an RMS of (d'/d)/sqrt(1 - beta2), 10 times
    the limit if it were measured against v itself; against the bias-corrected v and the d that v was
    accumulated with it is at the limit, and the clip leaves the step as it is."""
    runs = []
    for clip in (1.0, None):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(500, dtype=F64))
        opt = sfoptim.ProdigyScheduleFree([p], update_clip=clip, eps=0.0)
        p.grad = torch.randn(500, dtype=F64)
        z0 = opt.state[p]["z"].clone() if p in opt.state else p.detach().clone()
        opt.step()
        runs.append((opt.state[p]["z"] - z0) / opt.param_groups[0]["d"])
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=0)



def test_averaging_options_set_the_weights() -> None:
    p = [nn.Parameter(torch.zeros(3))]
    group = sfoptim.ProdigyScheduleFree(p).param_groups[0]
    assert (group["r"], group["weight_lr_power"], group["betas"]) == (0.0, 2.0, (0.9, 0.99))
    group = sfoptim.ProdigyScheduleFree(p, averaging="algoperf").param_groups[0]
    assert (group["r"], group["weight_lr_power"]) == (0.75, 0.0)
    group = sfoptim.ProdigyScheduleFree(p, averaging="algoperf", r=0.5).param_groups[0]
    assert (group["r"], group["weight_lr_power"]) == (0.5, 0.0)
    opt = sfoptim.ProdigyScheduleFree(p)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "averaging": "algoperf"})
    assert (opt.param_groups[1]["r"], opt.param_groups[1]["weight_lr_power"]) == (0.75, 0.0)
    for cls in (sfoptim.ProdigyScheduleFree, sfoptim.ProdigyScheduleFreeReference):
        with pytest.raises(ValueError, match="averaging"):
            cls(p, averaging="uniform")
        with pytest.raises(ValueError, match="d_growth"):
            cls(p, d_growth=1.0)


# ------------------------------------------------------------ buffer_dtype
def test_bfloat16_buffers_train_and_survive_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    xb, yb = torch.randn(64, 5), torch.randn(64, 3)
    opt = sfoptim.ProdigyScheduleFree(model.parameters(), d0=1e-4, buffer_dtype=torch.bfloat16)

    def train(m: nn.Module, o: sfoptim.ProdigyScheduleFree, steps: int) -> float:
        loss = torch.tensor(0.0)
        for _ in range(steps):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(xb), yb)
            loss.backward()
            o.step()
        return float(loss.detach())

    with torch.no_grad():
        first = float(nn.functional.mse_loss(model(xb), yb))
    train(model, opt, 30)
    for p in model.parameters():
        state = opt.state[p]
        assert {state[n].dtype for n in ("exp_avg_sq", "s", "p0")} == {torch.bfloat16}
        assert state["z"].dtype == torch.float32
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    last = train(model, opt, 30)
    assert last < 0.8 * first

    resumed = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    resumed.load_state_dict(saved_model)
    resumed_opt = sfoptim.ProdigyScheduleFree(resumed.parameters(), d0=1e-4, buffer_dtype=torch.bfloat16)
    resumed_opt.load_state_dict(saved_opt)
    p0 = next(iter(resumed.parameters()))
    assert resumed_opt.state[p0]["s"].dtype == torch.bfloat16, "loading must keep the narrow buffers narrow"
    train(resumed, resumed_opt, 30)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_invalid_buffer_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="buffer_dtype"):
        sfoptim.ProdigyScheduleFree([nn.Parameter(torch.zeros(2))], buffer_dtype=torch.int32)


# ------------------------------------------------------------ distributed
def _split_in_two_groups(make):
    return lambda ps: make([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}])


SUBMISSION = dict(ALGOPERF, betas=(0.9, 0.9955))  # the AlgoPerf submission's form, where d grows freely
#: The registry's distributed Prodigy entries in the submission's form; split_groups=True in two groups of their own estimates.
OPTIMIZERS = {name: functools.partial(registry.BY_NAME[name].make, **SUBMISSION) for name in PRODIGY}
OPTIMIZERS = {n: _split_in_two_groups(m) if registry.BY_NAME[n].kwargs.get("split_groups") else m for n, m in OPTIMIZERS.items()}


def _step(model: nn.Module, opt, xb: torch.Tensor, yb: torch.Tensor) -> None:
    if isinstance(opt, sfoptim.ProdigyScheduleFreeClosure):

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        train_step(model, opt, xb, yb)


def _run(rank: int, world: int, wrap, name: str, steps: int) -> None:
    model = wrap(make_model(F64))
    opt = OPTIMIZERS[name](list(model.parameters()))
    ref_model = make_model(F64)
    ref_opt = OPTIMIZERS[name](list(ref_model.parameters()))
    for step in range(steps):
        xb, yb = batch(step, F64)
        _step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
        _step(ref_model, ref_opt, xb, yb)
        d = rel_diff(params(model), params(ref_model))
        assert d <= 1e-9, f"{name} step {step}: rel diff {d:.3g} vs single process"
        assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=1e-9)
        if step % 5 == 4 and not isinstance(opt, sfoptim.ProdigyScheduleFreeClosure):
            check_mode_switch(model, opt, ref_model, ref_opt, 1e-9, name)
    assert opt.param_groups[0]["d"] > 10 * opt.param_groups[0]["d0"], "the estimate should have grown"
    # Every rank holds the same estimate.
    ds = torch.tensor([g["d"] for g in opt.param_groups], dtype=F64)
    gathered = [torch.empty_like(ds) for _ in range(world)]
    torch.distributed.all_gather(gathered, ds)
    assert all(torch.equal(g, ds) for g in gathered)


def _ddp_worker(rank: int, world: int, names: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name in names:
        _run(rank, world, lambda m: DDP(m), name, 12)


def _fsdp_worker(rank: int, world: int, names: list[str]) -> None:
    from test_distributed import _fsdp

    for name in names:
        _run(rank, world, lambda m: _fsdp(m, world), name, 12)


def test_ddp_two_ranks_match_single_process() -> None:
    spawn(_ddp_worker, 2, list(OPTIMIZERS))


def test_fsdp2_two_ranks_match_single_process() -> None:
    spawn(_fsdp_worker, 2, list(OPTIMIZERS))


def test_a_checkpoint_without_update_clip_continues_unclipped() -> None:
    (ours,) = _groups()[:1]
    (theirs,) = _groups()[:1]
    opt = sfoptim.ProdigyScheduleFree(ours, d0=1e-3, update_clip=None)
    for step in range(6):
        _set_grads([ours], step, skip_last=False)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["update_clip"]
    resumed = sfoptim.ProdigyScheduleFree(theirs, d0=1e-3)
    with pytest.warns(UserWarning, match="no update_clip") as caught:
        resumed.load_state_dict(saved)
    assert len(caught) == 1 and resumed.param_groups[0]["update_clip"] is None
    assert "update_clip" not in saved["param_groups"][0]
    for p, q in zip(theirs, ours):
        p.data.copy_(q)
    for step in range(6, 12):
        _set_grads([ours], step, skip_last=False)
        _set_grads([theirs], step, skip_last=False)
        opt.step()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
