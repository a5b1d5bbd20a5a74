"""recalibrate_batchnorm: running statistics at x, on a small BatchNorm CNN."""

import pytest
import torch
from torch import nn

import sfoptim
from sfoptim.batchnorm import recalibrate_batchnorm

torch.set_num_threads(1)


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.3),  # must be off while statistics are collected
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


def make_data(n: int = 128):
    g = torch.Generator().manual_seed(0)
    offsets = torch.randn(n, 1, 1, 1, generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) + 2.0 + offsets
    # Class: is the image brighter than average?
    labels = (offsets.flatten() > 0).long()
    return [(images[i : i + 16], labels[i : i + 16]) for i in range(0, n, 16)]


def train_cnn(steps: int = 16):
    torch.manual_seed(0)
    model = make_cnn()
    # Early in training with a brisk learning rate y is far from x, which is
    # when statistics gathered at y hurt evaluation at x most.
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.05)
    batches = make_data()
    model.train()
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model, opt, batches


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    losses = [nn.functional.cross_entropy(model(x), y) for x, y in batches]
    return torch.stack(losses).mean().item()


def bn_layers(model):
    return [m for m in model if isinstance(m, nn.BatchNorm2d)]


def test_recalibration_gives_the_statistics_of_x_and_fixes_validation():
    model, opt, batches = train_cnn()
    opt.eval()  # parameters now hold x
    stale_loss = eval_loss(model, batches)
    stale_mean = bn_layers(model)[0].running_mean.clone()

    model.train()
    used = recalibrate_batchnorm(model, batches, num_batches=len(batches))
    assert used == len(batches)

    # The first BatchNorm now holds the exact statistics of the first
    # convolution's output at x: mean over batches of the per-batch mean and
    # unbiased variance (all batches have the same size).
    with torch.no_grad():
        acts = [model[0](x) for x, _ in batches]
    expected_mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    expected_var = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts]).mean(0)
    first = bn_layers(model)[0]
    torch.testing.assert_close(first.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stale_mean, expected_mean, atol=1e-3)

    # The point of it all: validation at x gets better.
    fixed_loss = eval_loss(model, batches)
    # (Measured: about 0.49 -> 0.14.)
    assert fixed_loss < 0.5 * stale_loss, (stale_loss, fixed_loss)

    # Modes and momenta are as before the call.
    model.train()
    assert all(m.training for m in model)
    assert all(m.momentum == 0.1 for m in bn_layers(model))


def test_optimizer_argument_measures_at_x_and_keeps_training_at_y():
    model, opt, batches = train_cnn(steps=10)
    y = [p.detach().clone() for p in model.parameters()]
    reference = make_cnn()
    reference.load_state_dict(sfoptim.modes.averaged_state_dict(model, opt))
    recalibrate_batchnorm(reference, batches, num_batches=3)

    assert opt.train_mode and model.training
    recalibrate_batchnorm(model, batches, num_batches=3, optimizer=opt)
    assert opt.train_mode and model.training  # restored
    for p, y0 in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), y0)
    for ours, ref in zip(bn_layers(model), bn_layers(reference)):
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)


def test_num_batches_limits_what_is_read():
    model, _, batches = train_cnn(steps=1)
    seen = []

    def stream():
        for b in batches:
            seen.append(b)
            yield b

    assert recalibrate_batchnorm(model, stream(), num_batches=2) == 2
    assert len(seen) == 2
    assert bn_layers(model)[0].num_batches_tracked.item() == 2


def test_bad_input_and_crashes_leave_statistics_alone():
    model, opt, batches = train_cnn(steps=3)
    model[1].eval()  # mixed modes must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]

    def unchanged():
        for k, v in model.state_dict().items():
            # Parameters went y -> x -> y when the optimizer was passed,
            # which is exact only up to round-off; statistics are copied back.
            torch.testing.assert_close(v, before[k], msg=k)
        assert [m.training for m in model.modules()] == flags
        assert all(m.momentum == 0.1 for m in bn_layers(model))
        assert opt.train_mode

    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(model, batches, num_batches=0)
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm(model, [], num_batches=5)
    unchanged()
    with pytest.raises(TypeError, match="schedule-free"):
        recalibrate_batchnorm(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="none of the parameters"):
        recalibrate_batchnorm(model, batches, optimizer=sfoptim.SGDScheduleFree(make_cnn().parameters()))
    unchanged()

    calls = []

    def crashing_forward(m, batch):
        calls.append(1)
        m(batch[0])
        if len(calls) == 2:
            raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        recalibrate_batchnorm(model, batches, optimizer=opt, forward=crashing_forward)
    unchanged()


def test_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 3))
    before = model[0].weight.clone()
    assert recalibrate_batchnorm(model, [torch.randn(2, 3)]) == 0
    assert torch.equal(model[0].weight, before)
