"""Mode helpers: averaged_state_dict, eval_mode, tie_mode."""

import io

import pytest
import torch
from torch import nn

import sfoptim
from sfoptim.modes import (
    averaged_state_dict,
    eval_mode,
    eval_optimizer_state_dict,
    tie_mode,
    unwrap_optimizer,
)

torch.set_num_threads(1)

OPTIMIZERS = {
    "adamw": lambda params: sfoptim.AdamWScheduleFree(params, lr=0.05),
    "sgd": lambda params: sfoptim.SGDScheduleFree(params, lr=0.5),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def trained(kind: str = "adamw", steps: int = 5):
    torch.manual_seed(0)
    model = Net()
    opt = OPTIMIZERS[kind](model.parameters())
    data = torch.randn(16, 4)
    target = torch.randn(16, 2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(data), target).backward()
        opt.step()
    return model, opt


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_averaged_state_dict_holds_x_without_touching_the_model(kind):
    model, opt = trained(kind)
    before = snapshot(model)
    xs = opt.eval_params()
    sd = averaged_state_dict(model, opt)

    assert opt.train_mode
    assert_same(snapshot(model), before)  # live parameters still hold y
    names = [n for n, _ in model.named_parameters()]
    assert sd.keys() == model.state_dict().keys()
    moved = 0
    for name, x in zip(names, xs):
        assert torch.equal(sd[name], x), name
        moved += not torch.equal(x, before[name])
    assert moved > 0  # x really differs from y, so the test can tell them apart
    for name in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        assert torch.equal(sd[name], before[name])
    # The returned tensors are copies: editing them leaves the model alone.
    sd["fc1.weight"].add_(1.0)
    assert_same(snapshot(model), before)

    # In eval mode the live parameters are x and the dict agrees with them.
    opt.eval()
    assert_same(averaged_state_dict(model, opt), snapshot(model))


def test_averaged_state_dict_before_the_first_step_is_the_state_dict():
    model = Net()
    opt = sfoptim.AdamWScheduleFree(model.parameters())
    assert_same(averaged_state_dict(model, opt), snapshot(model))


def test_tied_parameters_stay_one_tensor():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.1)
    model["head"](model["emb"](torch.tensor([1, 2]))).sum().backward()
    opt.step()
    sd = averaged_state_dict(model, opt)
    assert sd["emb.weight"] is sd["head.weight"]
    assert torch.equal(sd["emb.weight"], opt.eval_params()[0])


def test_several_optimizers_and_wrappers():
    model, opt = trained()
    extra = nn.Linear(2, 2)
    model.extra = extra
    opt2 = sfoptim.SGDScheduleFree(extra.parameters(), lr=0.1)

    class Wrapper:  # the shape of Accelerate's / Lightning's wrappers
        def __init__(self, inner):
            self.optimizer = inner

    sd = averaged_state_dict(model, [Wrapper(opt), opt2])
    assert torch.equal(sd["fc1.weight"], opt.eval_params()[0])
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt


def test_bad_input_raises_and_changes_nothing():
    model, opt = trained()
    before = snapshot(model)
    with pytest.raises(TypeError, match="schedule-free"):
        averaged_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="schedule-free"):
        with eval_mode(model, torch.optim.SGD(model.parameters(), lr=0.1)):
            pass
    other = Net()
    with pytest.raises(ValueError, match="none of the parameters"):
        averaged_state_dict(other, opt)
    with pytest.raises(ValueError, match="none of the parameters"):
        with eval_mode(other, opt):
            pytest.fail("body must not run")
    with pytest.raises(ValueError, match="none of the parameters"):
        tie_mode(other, opt)
    with pytest.raises(TypeError, match="Module"):
        averaged_state_dict("not a model", opt)
    # A trainable parameter outside the optimizer is refused unless strict=False.
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        averaged_state_dict(model, opt)
    assert "extra.weight" in averaged_state_dict(model, opt, strict=False)
    del model.extra
    assert opt.train_mode and model.training
    assert_same(snapshot(model), before)
    assert "train" not in other.__dict__


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_eval_mode_evaluates_at_x_and_restores(kind):
    model, opt = trained(kind)
    model.norm.eval()  # a mixed-mode model: its flags must come back exactly
    y = [p.detach().clone() for p in model.parameters()]
    xs = opt.eval_params()
    with eval_mode(model, opt):
        assert not opt.train_mode
        assert not any(m.training for m in model.modules())
        for p, x in zip(model.parameters(), xs):
            assert torch.equal(p, x)
    assert opt.train_mode
    assert model.training and not model.norm.training and model.fc1.training
    for p, y0 in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), y0)

    # An optimizer that was in eval mode stays there.
    opt.eval()
    with eval_mode(model, opt):
        pass
    assert not opt.train_mode


def test_eval_mode_restores_modes_after_a_crash():
    model, opt = trained()
    y = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ZeroDivisionError):
        with eval_mode(model, opt):
            assert not opt.train_mode and not model.training
            raise ZeroDivisionError("inside eval_mode")
    assert opt.train_mode and model.training
    assert all(m.training for m in model.modules())
    for p, y0 in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), y0)
    # Training can go on: step() would raise ModeError in eval mode.
    model(torch.randn(4, 4)).sum().backward()
    opt.step()


def test_tie_mode_switches_the_optimizer_with_the_model():
    model, opt = trained()
    model.eval()
    handle = tie_mode(model, opt)
    assert not opt.train_mode  # synced to the model's mode right away
    model.train()
    assert opt.train_mode
    xs = opt.eval_params()
    model.eval()
    assert not opt.train_mode
    for p, x in zip(model.parameters(), xs):
        assert torch.equal(p, x)
    model.train(True)
    assert opt.train_mode
    # eval_mode on a tied model still restores the optimizer correctly.
    with pytest.raises(RuntimeError):
        with eval_mode(model, opt):
            raise RuntimeError("boom")
    assert opt.train_mode and model.training

    handle.remove()
    handle.remove()  # idempotent
    assert "train" not in model.__dict__
    model.eval()
    assert opt.train_mode  # no longer tied


def test_tie_mode_context_and_step_error():
    model, opt = trained()
    with tie_mode(model, opt) as handle:
        assert handle.active
        model.eval()
        with pytest.raises(sfoptim.ModeError):
            opt.step()
    assert not handle.active
    model.train()
    assert not opt.train_mode


def _wrapper_opt(params):
    return sfoptim.ScheduleFreeWrapper(torch.optim.SGD(params, lr=0.1), momentum=0.9)


@pytest.mark.parametrize(
    "make",
    [OPTIMIZERS["adamw"], OPTIMIZERS["sgd"], _wrapper_opt],
    ids=["adamw", "sgd", "wrapper"],
)
def test_checkpoint_at_x_resumes_the_same_trajectory(make):
    """averaged_state_dict + eval_optimizer_state_dict, reloaded, continue exactly."""
    torch.manual_seed(0)
    data, target = torch.randn(16, 4), torch.randn(16, 2)

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(data), target).backward()
            opt.step()

    def mlp():
        # No BatchNorm here: a bias right before BatchNorm has a zero gradient
        # up to round-off, which Adam scales up to full-size steps, so its
        # trajectory is round-off noise and cannot be compared.
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    torch.manual_seed(1)
    model = mlp()
    opt = make(model.parameters())
    run(model, opt, 3)
    y_before = snapshot(model)
    buffer = io.BytesIO()
    # Through bytes, as a file would: state dicts share storage with the live
    # optimizer state, which the next steps change in place.
    torch.save(
        {"model": averaged_state_dict(model, opt), "optimizer": eval_optimizer_state_dict(opt)},
        buffer,
    )
    assert opt.train_mode  # saving switched nothing
    assert_same(snapshot(model), y_before)
    run(model, opt, 3)

    torch.manual_seed(2)
    resumed = mlp()
    resumed_opt = make(resumed.parameters())
    buffer.seek(0)
    ckpt = torch.load(buffer)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optimizer"])
    assert not resumed_opt.train_mode
    resumed_opt.train()
    run(resumed, resumed_opt, 3)
    for a, b in zip(opt.eval_params(), resumed_opt.eval_params()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_docs_example_runs(tmp_path, monkeypatch):
    from docs_examples import run_doc

    ns = run_doc("modes", tmp_path, monkeypatch)
    assert (tmp_path / "checkpoint.pt").exists()
    assert ns["optimizer"].train_mode  # resumed into train mode
