"""Hugging Face Transformers integration.

* :class:`ScheduleFreeCallback` -- add it to any ``Trainer`` whose optimizer
  is schedule-free: evaluation runs at ``x``, every checkpoint and
  ``save_model`` after training hold ``x``, and training goes on at ``y``.
* :class:`ScheduleFreeTrainer` -- a ``Trainer`` that builds an sfoptim
  optimizer from its ``TrainingArguments`` (learning rate, weight decay,
  Adam betas/epsilon, warmup given as steps *or* as a ratio), uses a constant
  LR schedule and installs the callback: one line instead of four.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.optimization import get_constant_schedule
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        'sfoptim.integrations.transformers needs Transformers: pip install "transformers>=5.0" "accelerate>=1.0"'
    ) from exc

from ..directions.adamw import AdamWScheduleFree
from ..directions.wrapper import ScheduleFreeWrapper
from ..engine import ScheduleFreeOptimizer
from ..modes import unwrap_optimizer

__all__ = ["ScheduleFreeCallback", "ScheduleFreeTrainer", "warmup_steps_from_args"]


def warmup_steps_from_args(args: TrainingArguments, num_training_steps: int) -> int:
    """Return the warmup of ``args`` as a whole number of optimizer steps.

    Contract: ``args.warmup_steps`` >= 1 is a step count (truncated to an
    int); a value in ``[0, 1)`` is a fraction of ``num_training_steps``,
    rounded up -- the rule the ``Trainer``'s own schedulers follow.  (Older
    ``TrainingArguments`` also have ``warmup_ratio``; it is used when
    ``warmup_steps`` is 0.)  Raises :class:`ValueError` for a negative
    warmup or a ratio with ``num_training_steps`` < 1.
    """
    raw = float(getattr(args, "warmup_steps", 0) or 0)
    if raw == 0:
        raw = float(getattr(args, "warmup_ratio", 0) or 0)
    if raw < 0:
        raise ValueError(f"warmup must be >= 0, got {raw!r}")
    if raw >= 1:
        return int(raw)
    if raw == 0:
        return 0
    if num_training_steps < 1:
        raise ValueError(
            f"a warmup ratio ({raw}) needs the number of training steps, got {num_training_steps!r}"
        )
    # Same rounding as TrainingArguments.get_warmup_steps.
    return math.ceil(num_training_steps * raw)


def _find(optimizer: Any) -> Any:
    if optimizer is None:
        raise TypeError("ScheduleFreeCallback: the Trainer has no optimizer yet")
    return unwrap_optimizer(optimizer)


class ScheduleFreeCallback(TrainerCallback):
    """Keeps a ``Trainer``'s schedule-free optimizer in the right mode.

    Contract:

    * Training steps run in train mode (``y``): the optimizer is switched to
      train when training begins and before every optimizer step.
    * Whenever the ``Trainer`` is about to evaluate or save (its
      ``control.should_evaluate`` / ``should_save`` flags after a step or an
      epoch), the optimizer is switched to eval, so evaluation runs at ``x``
      and the checkpoint holds ``x`` together with an optimizer state that
      records eval mode; resuming from it switches back to ``y`` exactly.
    * When training ends the optimizer is left in eval mode, so
      ``trainer.save_model()``, ``evaluate()`` and ``predict()`` afterwards
      use ``x``.
    * Logged ``learning_rate`` values are replaced by the learning rate the
      optimizer used (warmup included), for the callbacks that report logs.
    * Raises :class:`TypeError` at the start of training when the optimizer
      is not schedule-free.
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _find(kwargs.get("optimizer")).train()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _find(kwargs.get("optimizer")).train()

    def _eval_if_needed(self, control: TrainerControl, optimizer: Any) -> None:
        # The Trainer's DefaultFlowCallback runs first and has already set
        # these flags; saving and evaluation happen right after this event.
        if control.should_save or control.should_evaluate:
            _find(optimizer).eval()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._eval_if_needed(control, kwargs.get("optimizer"))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._eval_if_needed(control, kwargs.get("optimizer"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _find(kwargs.get("optimizer")).eval()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "learning_rate" not in logs or kwargs.get("optimizer") is None:
            return
        opt = unwrap_optimizer(kwargs["optimizer"])
        lr = _scheduled_lr(opt)
        if lr is not None:
            logs["learning_rate"] = lr


def _scheduled_lr(opt: Any) -> float | None:
    # The wrapper prefixes its group keys; the engine knows the spelling.
    key = opt.group_key
    group = opt.param_groups[0]
    if not group.get(key("k"), 0):
        return None  # no step yet: nothing has been scheduled
    value = group.get(key("scheduled_lr"))
    return float(value) if value is not None else None


class ScheduleFreeTrainer(Trainer):
    """A ``Trainer`` that trains with an sfoptim optimizer, correctly.

    Contract (on top of ``transformers.Trainer``):

    * Builds ``optimizer_cls`` (default :class:`sfoptim.AdamWScheduleFree`)
      over the trainable parameters, with the ``Trainer``'s usual two groups
      (no weight decay for biases and norm weights).  From the
      ``TrainingArguments`` it takes ``learning_rate`` and ``weight_decay``,
      and for Adam-type classes ``adam_beta1/2`` and ``adam_epsilon``;
      ``optimizer_kwargs`` override any of them.
    * Warmup: ``args.warmup_steps`` -- a step count, or a ratio below 1 --
      reaches the optimizer as a whole number of steps
      (:func:`warmup_steps_from_args`), so step 1 runs at ``lr / warmup``.
      An explicit ``optimizer_kwargs["warmup_steps"]`` wins.
    * The LR scheduler is constant (schedule-free needs no schedule; a
      decaying one would fight the averaging); pass ``optimizers=`` to use
      your own optimizer and scheduler instead.
    * Adds :class:`ScheduleFreeCallback` (unless one is already there), so
      evaluation and checkpoints use ``x``.
    * Logged ``learning_rate`` is the one the optimizer used, warmup
      included.
    """

    def __init__(
        self,
        *args: Any,
        optimizer_cls: type | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer_cls is None:
            optimizer_cls = AdamWScheduleFree
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, ScheduleFreeOptimizer)):
            raise TypeError(
                f"optimizer_cls must be an sfoptim schedule-free optimizer class, got {optimizer_cls!r}"
            )
        if issubclass(optimizer_cls, ScheduleFreeWrapper):
            raise TypeError(
                "ScheduleFreeTrainer cannot build a ScheduleFreeWrapper (it needs a base optimizer); "
                "build it yourself and pass optimizers=(wrapper, None)"
            )
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise TypeError(f"optimizer_kwargs must be a dict, got {type(optimizer_kwargs).__name__}")
        self.sf_optimizer_cls = optimizer_cls
        self.sf_optimizer_kwargs = dict(optimizer_kwargs or {})
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, ScheduleFreeCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(ScheduleFreeCallback())

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Builds the schedule-free optimizer (see the class docstring)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if opt_model is None:
            raise ValueError("ScheduleFreeTrainer.create_optimizer needs a model")
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        kwargs: dict[str, Any] = {"lr": self.args.learning_rate}
        accepted = inspect.signature(self.sf_optimizer_cls.__init__).parameters
        if "betas" in accepted:
            kwargs["betas"] = (self.args.adam_beta1, self.args.adam_beta2)
        if "eps" in accepted:
            kwargs["eps"] = self.args.adam_epsilon
        kwargs.update(self.sf_optimizer_kwargs)
        # Warmup needs the number of training steps, known only when the
        # scheduler is created; create_scheduler sets it.
        self.optimizer = self.sf_optimizer_cls(groups, **kwargs)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Sets the warmup from the arguments and returns a constant schedule."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        if "warmup_steps" not in self.sf_optimizer_kwargs:
            try:
                opt = unwrap_optimizer(optimizer)
            except TypeError:
                opt = None  # the user passed another optimizer via optimizers=
            if opt is not None:
                steps = warmup_steps_from_args(self.args, num_training_steps)
                for group in opt.param_groups:
                    # Only before the first step: a resumed optimizer
                    # brings its own (equal) value from the checkpoint.
                    if "warmup_steps" in group and group.get(opt.group_key("k"), 0) == 0:
                        group["warmup_steps"] = steps
        if self.lr_scheduler is None:
            if optimizer is None:
                raise ValueError("ScheduleFreeTrainer.create_scheduler needs an optimizer; call create_optimizer first")
            self.lr_scheduler = get_constant_schedule(optimizer)
        return self.lr_scheduler

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The ``Trainer``'s step; hands its loss to optimizers whose step size needs it.

        The returned loss of each micro-batch is the one ``backward`` was called
        on, so their sum over an accumulation window is the loss of the
        accumulated gradient (:meth:`sfoptim.AdamCScheduleFreePlus.accumulate_loss`).
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        try:
            opt = unwrap_optimizer(self.optimizer)
        except TypeError:
            opt = None
        if opt is not None and hasattr(opt, "accumulate_loss"):
            opt.accumulate_loss(loss)
        return loss

    def _get_learning_rate(self) -> float:
        # The constant scheduler reports the base lr; the optimizer knows
        # the warmed-up one it actually used.
        try:
            lr = _scheduled_lr(unwrap_optimizer(self.optimizer))
        except TypeError:
            lr = None
        return lr if lr is not None else super()._get_learning_rate()
