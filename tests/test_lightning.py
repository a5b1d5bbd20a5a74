"""ScheduleFreeCallback with the real lightning.Trainer on CPU."""

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sfoptim  # noqa: E402
from sfoptim.integrations.lightning import ScheduleFreeCallback  # noqa: E402

torch.set_num_threads(1)


def loaders(n: int = 32, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch), DataLoader(ds, batch_size=n)


class Regressor(pl.LightningModule):
    def __init__(self, batchnorm: bool = False, plain_adam: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(4, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Linear(16, 1)]
        self.net = nn.Sequential(*layers)
        self.plain_adam = plain_adam

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.plain_adam:
            return torch.optim.Adam(self.parameters(), lr=0.05)
        return sfoptim.AdamWScheduleFree(self.parameters(), lr=0.05)


def make_trainer(tmp_path, max_epochs, callbacks):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        deterministic=True,
    )


def loss_at(module, params, val_loader):
    names = [n for n, _ in module.named_parameters()]
    x, y = next(iter(val_loader))
    with torch.no_grad():
        out = torch.func.functional_call(module, dict(zip(names, params)), (x,))
    return nn.functional.mse_loss(out, y).item()


class SaveMidEpoch(pl.Callback):
    """Saves a checkpoint by hand in the middle of training (train mode)."""

    def __init__(self, path):
        self.path = path
        self.x = self.y = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2 and self.x is None:
            opt = trainer.optimizers[0]
            assert opt.train_mode
            self.y = [p.detach().clone() for p in pl_module.parameters()]
            self.x = opt.eval_params()
            trainer.save_checkpoint(self.path)
            # Saving must not move the live parameters.
            for p, y in zip(pl_module.parameters(), self.y):
                assert torch.equal(p, y)


def test_validation_checkpoints_and_resume(tmp_path):
    train_loader, val_loader = loaders()
    pl.seed_everything(0)
    module = Regressor()
    ckpt_dir = tmp_path / "ckpt"
    mid = SaveMidEpoch(tmp_path / "mid.ckpt")
    # Saved after the last training batch of each epoch, i.e. in train mode,
    # before validation runs.
    every_epoch = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(tmp_path, 3, [ScheduleFreeCallback(), mid, every_epoch])
    trainer.fit(module, train_loader, val_loader)
    opt = trainer.optimizers[0]

    # Validation metrics are those of x.
    x_final = opt.eval_params()
    val_loss = trainer.callback_metrics["val_loss"].item()
    assert val_loss == pytest.approx(loss_at(module, x_final, val_loader), rel=1e-6)
    # After fit the module holds x.
    assert not opt.train_mode
    for p, x in zip(module.parameters(), x_final):
        assert torch.equal(p, x)

    # A checkpoint saved by hand mid-training holds x, and says "eval mode".
    mid_ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    names = [n for n, _ in module.named_parameters()]
    moved = 0
    for name, x, y in zip(names, mid.x, mid.y):
        assert torch.equal(mid_ckpt["state_dict"][name], x), name
        moved += not torch.equal(x, y)
    assert moved > 0
    assert all(g["train_mode"] is False for g in mid_ckpt["optimizer_states"][0]["param_groups"])

    # Resuming from the end-of-epoch-1 checkpoint continues the same run.
    first = sorted(ckpt_dir.glob("*step=4*.ckpt"))
    assert len(first) == 1, list(ckpt_dir.iterdir())
    pl.seed_everything(1)
    resumed = Regressor()  # different initial weights: all must come from the checkpoint
    trainer2 = make_trainer(tmp_path / "resume", 3, [ScheduleFreeCallback()])
    trainer2.fit(resumed, train_loader, val_loader, ckpt_path=str(first[0]))
    opt2 = trainer2.optimizers[0]
    assert opt2.param_groups[0]["k"] == opt.param_groups[0]["k"] == 12
    for a, b in zip(opt.eval_params(), opt2.eval_params()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(module.parameters(), resumed.parameters()):
        torch.testing.assert_close(opt.state[p]["z"], opt2.state[q]["z"], rtol=1e-5, atol=1e-6)
    assert trainer2.callback_metrics["val_loss"].item() == pytest.approx(val_loss, rel=1e-4)


def test_module_holds_x_after_fit_without_validation(tmp_path):
    """No validation run ends the fit here, so only the end-of-fit switch can leave the module at x."""
    train_loader, _ = loaders()
    pl.seed_everything(0)
    module = Regressor()
    trainer = make_trainer(tmp_path, 2, [ScheduleFreeCallback()])
    trainer.fit(module, train_loader)
    opt = trainer.optimizers[0]
    x = opt.eval_params()
    assert not opt.train_mode
    for p, x_p in zip(module.parameters(), x):
        assert torch.equal(p, x_p)
    opt.train()  # y, where training left the parameters, is elsewhere
    assert any(not torch.equal(p, x_p) for p, x_p in zip(module.parameters(), x))


def test_without_the_callback_validation_sees_y(tmp_path):
    """The failure the callback prevents: without it, validation runs at y."""
    train_loader, val_loader = loaders()
    pl.seed_everything(0)
    module = Regressor()
    trainer = make_trainer(tmp_path, 1, [])
    trainer.fit(module, train_loader, val_loader)
    opt = trainer.optimizers[0]
    assert opt.train_mode
    val_loss = trainer.callback_metrics["val_loss"].item()
    y = [p.detach() for p in module.parameters()]
    assert val_loss == pytest.approx(loss_at(module, y, val_loader), rel=1e-6)
    assert abs(val_loss - loss_at(module, opt.eval_params(), val_loader)) > 1e-3


def test_batchnorm_is_recalibrated_before_validation(tmp_path):
    train_loader, val_loader = loaders()
    pl.seed_everything(0)
    module = Regressor(batchnorm=True)
    callback = ScheduleFreeCallback(recalibrate_bn=True, bn_batches=4)
    trainer = make_trainer(tmp_path, 1, [callback])
    trainer.fit(module, train_loader, val_loader)
    # No training after the last validation: the statistics are those of the
    # first layer's output at x over the four training batches.
    with torch.no_grad():
        acts = [module.net[0](x) for x, _ in train_loader]
    expected = torch.stack([a.mean(0) for a in acts]).mean(0)
    torch.testing.assert_close(module.net[1].running_mean, expected, rtol=1e-4, atol=1e-5)
    assert module.net[1].momentum == 0.1


def test_module_without_schedule_free_optimizer_is_refused(tmp_path):
    train_loader, _ = loaders()
    trainer = make_trainer(tmp_path, 1, [ScheduleFreeCallback()])
    with pytest.raises(TypeError, match="schedule-free"):
        trainer.fit(Regressor(plain_adam=True), train_loader)
    with pytest.raises(ValueError, match="bn_batches"):
        ScheduleFreeCallback(bn_batches=0)


def test_docs_example_runs(tmp_path, monkeypatch):
    from docs_examples import run_doc

    ns = run_doc("lightning", tmp_path, monkeypatch)
    opt = ns["trainer"].optimizers[0]
    saved = torch.load(tmp_path / "final.ckpt", weights_only=False)["state_dict"]
    names = [n for n, _ in ns["model"].named_parameters()]
    for name, x in zip(names, opt.eval_params()):
        assert torch.equal(saved[name], x)
