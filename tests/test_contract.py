"""The direction contract, through small test-only directions.

Each direction here uses one part of the contract that the shipped optimizers
do not (global reductions, an interpolation weight that changes, a different
direction per group, no kernel, a step refused from ``lr``, refused shards),
and its trajectory is checked against the schedule-free recursion written out
with ``x``, ``y`` and ``z`` in the test.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn as nn
from _dist import spawn
from torch import Tensor

import sfoptim
from sfoptim.backends import dispatch
from sfoptim.directions import Bucket, Direction, KernelSpec, Kind
from sfoptim.directions.adamw import AdamDirection
from sfoptim.directions.sgd import SGDDirection

F64 = torch.float64


class GlobalNormSGD(Direction):
    """d = g / ||g||, the norm taken over every parameter of every group."""

    reductions = ("grad_sq",)

    def beta(self, group: dict, step: int) -> float:
        return group["momentum"]

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]:
        return {"grad_sq": torch.stack([(g * g).sum() for g in bucket.grads]).sum()}

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        return torch._foreach_div(bucket.grads, reduced["grad_sq"].sqrt().item()), True


class AnnealedSGD(SGDDirection):
    """SGD whose interpolation weight is read from the group at every step (a scheduler may change it)."""

    varying_beta = True


class WholeMatrixSGD(SGDDirection):
    """Stands for an orthogonalizing direction: it must see whole matrices."""

    refuses_shards = True


class PerGroup(sfoptim.ScheduleFreeOptimizer):
    """A test optimizer taking its direction from the group's ``direction`` entry."""

    directions: dict[str, Direction] = {"sgd": SGDDirection(), "adam": AdamDirection(), "norm": GlobalNormSGD(), "annealed": AnnealedSGD(), "whole": WholeMatrixSGD()}

    def __init__(self, params: Any, lr: float = 0.1, **kwargs: Any) -> None:
        defaults = dict(lr=lr, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0)
        defaults.update(kwargs)
        super().__init__(params, defaults)

    def direction_for(self, group: dict) -> Direction:
        return self.directions[group["direction"]]


def grads_for(params: list[Tensor], step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * p.detach() for p in params]


class Explicit:
    """Schedule-free with x, y, z stored, for any direction function d(grads) -> list."""

    def __init__(self, groups: list[list[Tensor]], lrs: list[float]) -> None:
        self.x = [[p.detach().clone() for p in g] for g in groups]
        self.y = [[p.detach().clone() for p in g] for g in groups]
        self.z = [[p.detach().clone() for p in g] for g in groups]
        self.lrs = lrs
        self.weight_sum = [0.0 for _ in groups]

    def step(self, directions: list[list[Tensor]], betas: list[float]) -> None:
        for gi, lr in enumerate(self.lrs):
            weight = lr**2
            self.weight_sum[gi] += weight
            c = weight / self.weight_sum[gi]
            for x, y, z, d in zip(self.x[gi], self.y[gi], self.z[gi], directions[gi]):
                z.sub_(d, alpha=lr)
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_(x * betas[gi] + z * (1 - betas[gi]))


def _close(a: list[Tensor], b: list[Tensor], tol: float = 1e-12) -> None:
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=tol, atol=tol), (u - v).abs().max()


@pytest.mark.parametrize("foreach", [True, False])
def test_global_reduction_spans_every_group(foreach: bool) -> None:
    torch.manual_seed(0)
    groups = [[nn.Parameter(torch.randn(7, 3, dtype=F64)), nn.Parameter(torch.randn(4, dtype=F64))], [nn.Parameter(torch.randn(5, dtype=F64))]]
    lrs = [0.1, 0.03]
    opt = PerGroup(
        [{"params": g, "lr": lr, "direction": "norm"} for g, lr in zip(groups, lrs)], foreach=foreach
    )
    ref = Explicit(groups, lrs)
    flat = [p for g in groups for p in g]
    for step in range(6):
        ys = [y for g in ref.y for y in g]
        gs = grads_for(ys, step)
        for p, g in zip(flat, gs):
            p.grad = g.clone()
        norm = torch.stack([(g * g).sum() for g in gs]).sum().sqrt()
        it = iter(gs)
        ref.step([[next(it) / norm for _ in g] for g in groups], [0.9, 0.9])
        opt.step()
        _close([p.detach() for p in flat], [y for g in ref.y for y in g])
    _close(opt.eval_params(), [x for g in ref.x for x in g])


def test_interpolation_weight_may_change_between_steps_on_every_backend() -> None:
    torch.manual_seed(1)
    init = [torch.randn(40, 3, dtype=F64), torch.randn(9, dtype=F64)]
    runs = {}
    for fused in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = PerGroup([{"params": params, "direction": "annealed"}], lr=0.2, fused=fused)
        ref = Explicit([params], [0.2])
        for step in range(8):
            beta = 0.5 + 0.05 * step  # what a scheduler would write into the group
            opt.param_groups[0]["momentum"] = beta
            gs = grads_for(ref.y[0], step)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            ref.step([gs], [beta])
            _close([p.detach() for p in params], ref.y[0])
            # x is recovered with the weight y was built with, not the group's next one.
            opt.param_groups[0]["momentum"] = 0.99
            _close(opt.eval_params(), ref.x[0])
            opt.eval()
            _close([p.detach() for p in params], ref.x[0])
            opt.train()
            _close([p.detach() for p in params], ref.y[0])
        runs[fused] = [p.detach().clone() for p in params]
        # The weight survives a checkpoint.
        resumed = PerGroup([{"params": [nn.Parameter(p.detach().clone()) for p in params], "direction": "annealed"}])
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        _close(resumed.eval_params(), ref.x[0])
    _close(runs[False], runs[True])


def test_each_group_may_have_its_own_direction() -> None:
    torch.manual_seed(2)
    init = [torch.randn(6, 4), torch.randn(4), torch.randn(10)]
    mixed = [nn.Parameter(t.clone()) for t in init]
    alone = [nn.Parameter(t.clone()) for t in init]
    opt = PerGroup(
        [
            {"params": mixed[:2], "direction": "sgd", "lr": 0.3, "weight_decay": 0.01},
            {"params": mixed[2:], "direction": "adam", "lr": 0.01, "warmup_steps": 3},
        ]
    )
    sgd = sfoptim.SGDScheduleFree(alone[:2], lr=0.3, weight_decay=0.01)
    adam = sfoptim.AdamWScheduleFree(alone[2:], lr=0.01, warmup_steps=3)
    for step in range(6):
        for ps in (mixed, alone):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        opt.step()
        sgd.step()
        adam.step()
        for a, b in zip(mixed, alone):
            assert torch.equal(a, b)
    assert set(opt.state[mixed[2]]) == {"z", "exp_avg_sq"} and set(opt.state[mixed[0]]) == {"z"}


class RefusingSGD(SGDDirection):
    """SGD that refuses any step of a group whose ``lr`` is above 1, by raising from ``lr``."""

    def lr(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> float:
        if group["lr"] > 1:
            raise FloatingPointError("learning rate above 1")
        return super().lr(group, step, reduced)


@pytest.mark.parametrize("fused", [False, True])
def test_a_direction_refusing_from_lr_in_the_last_group_leaves_every_group_untouched(fused: bool) -> None:
    PerGroup.directions["refusing"] = RefusingSGD()
    try:
        params = [nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3))]
        opt = PerGroup([{"params": [p], "direction": "refusing"} for p in params], lr=0.5, fused=fused)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        before = copy.deepcopy(opt.state_dict())
        values = [p.detach().clone() for p in params]
        opt.param_groups[1]["lr"] = 2.0
        with pytest.raises(FloatingPointError):
            opt.step()
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        after = opt.state_dict()
        assert after["param_groups"][0] == before["param_groups"][0]
        assert all(torch.equal(after["state"][i]["z"], before["state"][i]["z"]) for i in (0, 1))
    finally:
        del PerGroup.directions["refusing"]


def test_fused_true_without_a_kernel_warns_once_and_runs_foreach() -> None:
    dispatch._no_kernel_warned.discard("PerGroup")
    p = nn.Parameter(torch.randn(8))
    q = nn.Parameter(p.detach().clone())
    fused = PerGroup([{"params": [p], "direction": "norm"}], fused=True)
    plain = PerGroup([{"params": [q], "direction": "norm"}], fused=False)
    with pytest.warns(RuntimeWarning, match="PerGroup has no fused kernel"):
        p.grad = torch.ones(8)
        fused.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(8)
        fused.step()
    for _ in range(2):
        q.grad = torch.ones(8)
        plain.step()
    assert torch.equal(p, q)


def test_plain_closure_and_wrapper_forms_share_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfoptim.engine import step as skeleton

    calls: list[str] = []
    original = skeleton.update
    monkeypatch.setattr(skeleton, "update", lambda plan, *inputs: (calls.append(type(plan.__self__).__name__), original(plan, *inputs))[1])
    p = nn.Parameter(torch.randn(3))

    def closure() -> Tensor:
        p.grad = torch.ones(3)
        return torch.zeros(())

    sfoptim.AdamWScheduleFree([p]).step(closure)
    sfoptim.SGDScheduleFreeClosure([p]).step(closure)
    sfoptim.ScheduleFreeWrapper(torch.optim.SGD([p], lr=0.1)).step(closure)
    assert calls == ["AdamWScheduleFree", "SGDScheduleFreeClosure", "ScheduleFreeWrapper"]


def test_wrapper_writes_only_prefixed_keys_into_its_base_optimizer() -> None:
    p = nn.Parameter(torch.randn(4))
    base = torch.optim.Adam([p], lr=0.01)
    before = dict(base.param_groups[0])
    opt = sfoptim.ScheduleFreeWrapper(base, weight_decay_at_y=0.1)
    p.grad = torch.ones(4)
    opt.step()
    opt.eval()
    opt.train()
    group = base.param_groups[0]
    added = set(group) - set(before)
    assert added and all(k.startswith("sf_") for k in added), sorted(added)
    assert all(group[k] is before[k] or group[k] == before[k] for k in before if k != "params")
    saved = opt.state_dict()
    assert all(k.startswith("sf_") for k in set(saved["base"]["param_groups"][0]) - set(before))


def test_kernel_description_drives_the_kernel() -> None:
    from sfoptim.backends import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler for the fused kernel")

    class Sgdv(SGDDirection):
        """The gradient as direction while a second moment accumulates (a kernel kind SGD does not use)."""

        def state_buffers(self, group: dict) -> tuple[str, ...]:
            return ("my_second_moment",)

        def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
            v = bucket.buffers["my_second_moment"]
            torch._foreach_mul_(v, 0.9)
            torch._foreach_addcmul_(v, bucket.grads, bucket.grads, value=0.1)
            return bucket.grads, False

        def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec:
            return KernelSpec(Kind.SGD_V, ("my_second_moment",), {"beta2": 0.9})

    PerGroup.directions["sgdv"] = Sgdv()
    try:
        init = torch.randn(50, dtype=F64)
        a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
        fa = PerGroup([{"params": [a], "direction": "sgdv"}], fused=True)
        fb = PerGroup([{"params": [b], "direction": "sgdv"}], fused=False)
        for step in range(5):
            for p, opt in ((a, fa), (b, fb)):
                p.grad = grads_for([p], step)[0]
                opt.step()
        _close([a.detach(), fa.state[a]["my_second_moment"]], [b.detach(), fb.state[b]["my_second_moment"]], 1e-14)
        assert fa.state[a]["my_second_moment"].abs().sum() > 0
    finally:
        del PerGroup.directions["sgdv"]


# ------------------------------------------------- reductions over FSDP2 shards
def _norm_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 7, dtype=F64), nn.Tanh(), nn.Linear(7, 3, dtype=F64))


def _norm_opt(model: nn.Module) -> PerGroup:
    params = list(model.parameters())
    return PerGroup(
        [{"params": params[:2], "direction": "norm", "lr": 0.1}, {"params": params[2:], "direction": "norm", "lr": 0.05}]
    )


def _norm_batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)


def _fsdp_norm_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _norm_model()
    ref_model = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt, ref = _norm_opt(model), _norm_opt(ref_model)
    rows = 8 // world
    for step in range(6):
        xb, yb = _norm_batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(xb[rank * rows : (rank + 1) * rows]), yb[rank * rows : (rank + 1) * rows]).backward()
        opt.step()
        ref.zero_grad()
        nn.functional.mse_loss(ref_model(xb), yb).backward()
        ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.allclose(p.full_tensor(), q.detach(), rtol=1e-9, atol=1e-12), f"step {step}"
    # A direction that needs whole matrices refuses shards, before changing anything.
    whole = PerGroup([{"params": list(model.parameters()), "direction": "whole"}])
    before = [p.full_tensor().clone() for p in model.parameters()]
    try:
        whole.step()
    except NotImplementedError as exc:
        assert "needs whole matrices" in str(exc)
    else:
        raise AssertionError("a whole-matrix direction stepped sharded parameters")
    assert all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
    assert len(whole.state) == 0


def test_global_reduction_is_summed_over_fsdp2_shards() -> None:
    spawn(_fsdp_norm_worker, 2)


def test_design_doc_example_follows_the_schedule_free_recursion(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/design.md's schedule-free Lion, against x, y, z written out with Lion's direction."""
    from docs_examples import ROOT, run_doc

    lion = run_doc("design", tmp_path, monkeypatch, folder=ROOT)["LionScheduleFree"]
    torch.manual_seed(4)
    params = [nn.Parameter(torch.randn(5, 3, dtype=F64)), nn.Parameter(torch.randn(4, dtype=F64))]
    opt = lion(params, lr=0.01, momentum=0.8, betas=(0.9, 0.99))
    ref = Explicit([params], [0.01])
    m = [torch.zeros_like(p) for p in params]
    for step in range(6):
        gs = grads_for(ref.y[0], step)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        ref.step([[torch.lerp(mi, g, 0.1).sign() for mi, g in zip(m, gs)]], [0.8])
        m = [torch.lerp(mi, g, 0.01) for mi, g in zip(m, gs)]
        _close([p.detach() for p in params], ref.y[0])
    _close(opt.eval_params(), ref.x[0])
    with pytest.raises(ValueError, match="betas"):
        lion(params, betas=(0.9, 1.0))
