"""Named training methods for the experiments: an optimizer recipe plus how it is tuned.

A :class:`Method` is one entry of a task's method table (``sfoptim demo``,
``benchmarks/lm_stdlib.py``): how to build the optimizer for a model from one
hyperparameter configuration, the configurations tried (the tuning budget), and
whether the run is told its stopping time (a decay schedule, tuned separately
for every stopping time) or not (one run, evaluated at every stopping time).
Adding an optimizer to a comparison is adding one entry.  An entry whose
optimizer comes from a package that is not installed says so
(:meth:`Method.available`), so a command can refuse it with a clear message
before any training.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import sfoptim

__all__ = [
    "Method", "MethodUnavailable", "ParamSplitOptimizer", "grid", "hidden_matrices", "muon_adamw", "step_with_loss",
]

Config = dict[str, Any]


class MethodUnavailable(LookupError):
    """The method needs an optimizer that the installed packages do not provide."""


def grid(**axes: Sequence[Any]) -> tuple[Config, ...]:
    """Every combination of the given hyperparameter values, e.g. ``grid(lr=(1, 2), weight_decay=(0, 1))``."""
    names = list(axes)
    return tuple(dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names)))


@dataclass(frozen=True)
class Method:
    """One optimizer recipe of a comparison.

    ``build(model, config)`` returns the optimizer for ``model`` with the
    hyperparameters ``config`` (one element of ``grid``).  With ``schedule``
    set (``"cosine"``, ``"linear"``, ``"wsd"``) every group's learning rate is
    multiplied by that schedule, which knows the run's stopping time, and the
    best configuration is chosen separately for each stopping time; without it
    a run is never told when it stops, is evaluated at every stopping time and
    one configuration is chosen for all of them, or, with ``per_stopping_time``,
    the best of the runs separately for each stopping time (a bound on what
    tuning could give, not a usable recipe).  ``schedule_free`` runs are
    evaluated after ``optimizer.eval()``; ``needs_loss`` optimizers are stepped
    with ``step(loss=loss.detach())``.  ``requires`` names the optimizer class
    the recipe needs, for :meth:`available`.
    """

    name: str
    label: str
    build: Callable[[nn.Module, Config], Any]  # an optimizer (torch.optim-like)
    grid: tuple[Config, ...] = ({},)
    schedule: str | None = None
    schedule_free: bool = False
    needs_loss: bool = False
    per_stopping_time: bool = False
    requires: Callable[[], object] | None = None

    def available(self) -> str | None:
        """``None`` when the method can run here, otherwise why it cannot."""
        if self.requires is None:
            return None
        try:
            self.requires()
        except (MethodUnavailable, ImportError) as exc:
            return str(exc)
        return None

    def tuning(self) -> str:
        """The tuning budget in words, for the output tables."""
        n = len(self.grid)
        if n == 1 and not self.grid[0]:
            return "defaults, not tuned"
        values = ", ".join(f"{k} {{{', '.join(map(_fmt, _sorted({c[k] for c in self.grid})))}}}"
                           for k in self.grid[0])
        each = "for each stopping time" if self.schedule or self.per_stopping_time else "one for all stopping times"
        return f"{n} config{'s' * (n > 1)} ({values}), {each}"


def _fmt(v: Any) -> str:
    return "none" if v is None else v if isinstance(v, str) else f"{v:g}"


def _sorted(values: set[Any]) -> list[Any]:
    """Sorted, ``None`` (an option switched off) first, then words (such as ``"warmup"``), then numbers."""
    return sorted(values, key=lambda v: (0, "", 0) if v is None else (1, v, 0) if isinstance(v, str) else (2, "", v))


def step_with_loss(opt: Any, loss: torch.Tensor, method: Method) -> None:
    """``opt.step()``, or ``opt.step(loss=...)`` for optimizers whose step size uses the loss."""
    if method.needs_loss:
        opt.step(loss=loss.detach())
    else:
        opt.step()


class ParamSplitOptimizer:
    """Several optimizers over disjoint parameters, driven as one.

    ``param_groups`` is the concatenation of theirs (the same dicts, so a
    schedule that sets ``group["lr"]`` reaches every part), and ``step``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` act on every part.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: Iterable[dict]) -> None:
        for o, s in zip(self.optimizers, states, strict=True):
            o.load_state_dict(s)


def muon_adamw(model: nn.Module, lr: float, hidden: Callable[[str, nn.Module], bool],
               betas=(0.9, 0.999), weight_decay: float = 0.0) -> ParamSplitOptimizer:
    """``torch.optim.Muon`` for the hidden weight matrices, AdamW for everything else.

    ``hidden(name, module)`` says which ``nn.Linear`` modules hold hidden
    weight matrices (not an output head); their weights go to Muon, with
    ``adjust_lr_fn="match_rms_adamw"`` so that one learning rate ``lr`` suits
    both parts.  Embeddings, heads, biases, norms and other parameters go to
    AdamW.
    """
    matrices, rest = (g["params"] for g in hidden_matrices(model, hidden))
    return ParamSplitOptimizer(
        torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay),
    )


def _prodigyplus() -> type:
    try:
        from prodigyplus import ProdigyPlusScheduleFree
    except ImportError as exc:
        raise MethodUnavailable("needs the prodigy-plus-schedule-free package "
                                "(pip install prodigy-plus-schedule-free)") from exc
    return ProdigyPlusScheduleFree


def hidden_matrices(model: nn.Module, hidden: Callable[[str, nn.Module], bool]) -> list[dict[str, Any]]:
    """Two parameter groups: the weights of the ``nn.Linear`` modules ``hidden`` accepts, and the rest.

    The first group is marked ``use_muon=True``, the second ``use_muon=False``,
    so that :class:`sfoptim.MuonScheduleFree` orthogonalizes exactly the
    matrices that the ``torch.optim.Muon`` baseline (:func:`muon_adamw`) does.
    """
    matrices = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and hidden(n, m)]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": matrices, "use_muon": True}, {"params": rest, "use_muon": False}]


#: Schedule-free Muon's option of a rising interpolation weight, as AMUSE sets
#: it: a lower start, rising from the end of the warmup (``muon-sf-amuse``).
AMUSE_MUON: dict[str, Any] = dict(beta=0.6, beta_horizon="warmup", beta_power=0.3)


def untuned_schedule_free_methods(hidden: Callable[[str, nn.Module], bool] | None = None) -> list[Method]:
    """The learning-rate-free and spectral schedule-free optimizers, each run once with its defaults.

    ``ScheduleFree+`` (``sfoptim.AdamCScheduleFreePlus``, lr 1.0) takes its
    Polyak step size from the loss; schedule-free Muon and schedule-free
    Prodigy come from sfoptim (``muon-sf-amuse``: schedule-free Muon with
    :data:`AMUSE_MUON`); ``prodigyplus`` is the
    ``prodigy-plus-schedule-free`` package's ``ProdigyPlusScheduleFree``.  An
    entry whose optimizer is not installed reports itself unavailable.
    ``hidden(name, module)`` picks the ``nn.Linear`` modules whose weights
    schedule-free Muon orthogonalizes (as for the Muon baseline); without it
    Muon's own split of ``model.named_parameters()`` applies.
    """
    def sfoptim_method(name: str, label: str, cls: type, needs_loss: bool = False, **kwargs: Any) -> Method:
        return Method(name, label, lambda model, _: cls(model.parameters(), **kwargs),
                      schedule_free=True, needs_loss=needs_loss)

    def muon_params(model: nn.Module) -> Any:
        return hidden_matrices(model, hidden) if hidden is not None else model.named_parameters()

    return [
        sfoptim_method("sf-plus", "ScheduleFree+", sfoptim.AdamCScheduleFreePlus, needs_loss=True, lr=1.0),
        Method("muon-sf", "SF Muon", lambda model, _: sfoptim.MuonScheduleFree(muon_params(model)), schedule_free=True),
        Method("muon-sf-amuse", "SF Muon, AMUSE's rising beta",
               lambda model, c: sfoptim.MuonScheduleFree(muon_params(model), **c),
               grid(**{k: (v,) for k, v in AMUSE_MUON.items()}), schedule_free=True),
        sfoptim_method("prodigy-sf", "SF Prodigy", sfoptim.ProdigyScheduleFree, lr=1.0),
        Method("prodigyplus", "prodigyplus", lambda model, _: _prodigyplus()(model.parameters()),
               schedule_free=True, requires=_prodigyplus),
    ]
