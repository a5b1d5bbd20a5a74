"""PyTorch Lightning integration: :class:`ScheduleFreeCallback`.

Add the callback to the ``Trainer`` and the schedule-free optimizers that
``configure_optimizers`` returns are kept in the right mode: train (``y``)
for training steps, eval (``x``) for validation, test and predict, and every
checkpoint holds ``x`` -- including ones saved in the middle of training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        'sfoptim.integrations.lightning needs PyTorch Lightning: pip install "lightning>=2.6"'
    ) from exc

from ..batchnorm import ForwardFn, recalibrate_batchnorm
from ..modes import _mark_eval, averaged_state_dict, unwrap_optimizer

__all__ = ["ScheduleFreeCallback"]


def _schedule_free(optimizers: Iterable[Any]) -> list[tuple[int, Any]]:
    found = []
    for index, opt in enumerate(optimizers):
        try:
            found.append((index, unwrap_optimizer(opt)))
        except TypeError:
            # Modules may mix schedule-free and ordinary optimizers (a GAN's
            # discriminator on Adam, say); the ordinary ones have no modes.
            continue
    return found


class ScheduleFreeCallback(Callback):
    """Keeps Lightning's schedule-free optimizers in the right mode.

    Contract:

    * Training steps run in train mode: every schedule-free optimizer of the
      module is switched to train at the start of training and before each
      training batch (after a validation run, too).
    * Validation (sanity check included), test and predict run in eval mode,
      so logged metrics are those of ``x``.  After ``fit`` ends the module
      holds ``x``, ready to use or save.
    * Every checkpoint holds ``x``: the weights in ``checkpoint["state_dict"]``
      are replaced by ``x`` and the optimizer states record eval mode.  The
      live parameters are not touched, so saving does not disturb training,
      and resuming from the checkpoint continues the same trajectory.
    * With ``recalibrate_bn=True`` the BatchNorm statistics are recomputed
      at ``x`` (:func:`sfoptim.recalibrate_batchnorm`) before each
      validation run during ``fit`` (not during the sanity check), from
      ``bn_batches`` batches of ``bn_dataloader`` (default: the training
      dataloader), fed by ``bn_forward(module, batch)`` (default:
      ``module(batch[0])`` for an ``(input, target)`` pair, ``module(batch)``
      otherwise).  Note that reading the training dataloader draws from its
      sampler's random generator.
    * Optimizers that are not schedule-free are ignored; if the module has
      no schedule-free optimizer at all, training start raises
      :class:`TypeError`.
    """

    def __init__(
        self,
        recalibrate_bn: bool = False,
        bn_batches: int = 50,
        bn_dataloader: Iterable[Any] | None = None,
        bn_forward: ForwardFn | None = None,
    ) -> None:
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1:
            raise ValueError(f"bn_batches must be an int >= 1, got {bn_batches!r}")
        if bn_forward is not None and not callable(bn_forward):
            raise TypeError(f"bn_forward must be callable, got {type(bn_forward).__name__}")
        self.recalibrate_bn = bool(recalibrate_bn)
        self.bn_batches = bn_batches
        self.bn_dataloader = bn_dataloader
        self.bn_forward = bn_forward

    # ------------------------------------------------------------- switching
    @staticmethod
    def _set_mode(trainer: pl.Trainer, train: bool) -> None:
        for _, opt in _schedule_free(trainer.optimizers):
            if train:
                opt.train()
            else:
                opt.eval()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _schedule_free(trainer.optimizers):
            names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise TypeError(
                "ScheduleFreeCallback: none of the module's optimizers is schedule-free "
                f"(got: {names}); return an sfoptim optimizer from configure_optimizers"
            )
        self._set_mode(trainer, True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Idempotent and cheap; needed here because validation can interrupt
        # an epoch (val_check_interval) and leaves the optimizers in eval.
        self._set_mode(trainer, True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recalibrate_bn and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._recalibrate(trainer, pl_module)
        self._set_mode(trainer, False)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_mode(trainer, False)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_mode(trainer, False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_mode(trainer, False)

    # ------------------------------------------------------------ BatchNorm
    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [opt for _, opt in _schedule_free(trainer.optimizers)]
        if not optimizers:
            return
        batches = self.bn_dataloader if self.bn_dataloader is not None else trainer.train_dataloader
        if batches is None:
            return
        recalibrate_batchnorm(
            pl_module,
            batches,
            num_batches=self.bn_batches,
            optimizer=optimizers,
            forward=self.bn_forward,
            device=pl_module.device,
        )

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        found = _schedule_free(trainer.optimizers)
        if not found:
            return
        # Lightning has already taken the state dicts; rewriting them here
        # covers every save path (ModelCheckpoint, trainer.save_checkpoint)
        # without moving the live parameters.
        weights = checkpoint.get("state_dict")
        if isinstance(weights, dict):
            at_x = averaged_state_dict(pl_module, [opt for _, opt in found], strict=False)
            for key in weights:
                if key in at_x:
                    weights[key] = at_x[key]
        states = checkpoint.get("optimizer_states")
        if isinstance(states, list):
            for index, opt in found:
                if index < len(states) and isinstance(states[index], dict):
                    # The weights saved are x, so the optimizer state must
                    # say "eval mode", or loading it would take x for y.
                    _mark_eval(states[index], opt)
