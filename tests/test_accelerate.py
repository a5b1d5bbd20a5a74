"""accelerator.prepare(optimizer) keeps train()/eval() and the helpers working."""

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import sfoptim  # noqa: E402
from sfoptim.modes import averaged_state_dict, eval_mode, unwrap_optimizer  # noqa: E402

torch.set_num_threads(1)


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    accelerator = Accelerator(cpu=True)
    return (accelerator, *accelerator.prepare(model, optimizer, loader))


def train(accelerator, model, optimizer, loader):
    for inputs, targets in loader:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_prepared_optimizer_switches_modes(tmp_path):
    accelerator, model, optimizer, loader = setup()
    inner = unwrap_optimizer(optimizer)
    assert optimizer is not inner  # really wrapped by Accelerate
    optimizer.train()
    train(accelerator, model, optimizer, loader)
    y = [p.detach().clone() for p in model.parameters()]
    x = inner.eval_params()
    assert any(not torch.equal(a, b) for a, b in zip(x, y))

    optimizer.eval()  # through the wrapper
    assert not inner.train_mode
    for p, xi in zip(model.parameters(), x):
        assert torch.equal(p, xi)
    with pytest.raises(sfoptim.ModeError):
        optimizer.step()
    optimizer.train()
    assert inner.train_mode
    for p, yi in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), yi)

    # The helpers take the prepared optimizer as it is. The eval()/train()
    # round trip above is not bit-exact, so x is compared to rounding.
    sd = averaged_state_dict(model, optimizer)
    torch.testing.assert_close(sd["0.weight"], x[0])
    with eval_mode(model, optimizer):
        torch.testing.assert_close(model[0].weight.detach(), x[0])
    assert inner.train_mode


def test_save_state_at_x_and_resume(tmp_path):
    accelerator, model, optimizer, loader = setup()
    optimizer.train()
    train(accelerator, model, optimizer, loader)
    x = unwrap_optimizer(optimizer).eval_params()
    with eval_mode(model, optimizer):
        accelerator.save_state(str(tmp_path / "state"))
    saved = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert torch.equal(saved["0.weight"], x[0])
    train(accelerator, model, optimizer, loader)  # the uninterrupted run

    accelerator2, model2, optimizer2, loader2 = setup(seed=1)
    accelerator2.load_state(str(tmp_path / "state"))
    assert not unwrap_optimizer(optimizer2).train_mode  # saved in eval mode
    optimizer2.train()
    train(accelerator2, model2, optimizer2, loader2)
    for a, b in zip(unwrap_optimizer(optimizer).eval_params(), unwrap_optimizer(optimizer2).eval_params()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_docs_example_runs(tmp_path, monkeypatch):
    from docs_examples import run_doc

    ns = run_doc("accelerate", tmp_path, monkeypatch)
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    x = unwrap_optimizer(ns["optimizer"]).eval_params()
    assert torch.equal(checkpoint["model"]["0.weight"], x[0])
    assert (tmp_path / "accelerate_state").is_dir()
