"""One list of optimizer configurations that the generic tests run over.

Modelled on torch's ``optim_db``: each :class:`OptimizerInfo` says how to build
the optimizer, which independent oracle it must agree with, and what it
supports (closure form, fused kernel, reference, distributed, torch.compile,
low precision). Every test that runs over several optimizers draws them from
``OPTIMIZERS`` (filtered by those capabilities), so a new optimizer joins all
of them by adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import sfoptim

try:
    import schedulefree
except ImportError:  # the published package is only the oracle of some entries
    schedulefree = None

try:
    import pytorch_optimizer
except ImportError:  # a third-party base optimizer for the wrapper (the bench extra)
    pytorch_optimizer = None

F64, F32 = torch.float64, torch.float32


@dataclass(frozen=True)
class OptimizerInfo:
    """How to build, check and compare one optimizer configuration.

    Attributes:
        name: test id.
        cls: the optimizer class.
        kwargs: its hyperparameters for the tests (backend flags are added by the tests).
        reference: the independent oracle's class, built with ``kwargs`` too
            (or ``reference_kwargs``); None when there is none. Our reference
            forms for the fast classes, the published package for our
            reference forms and for the paper form.
        base: for wrappers, builds the base optimizer from the parameters.
        closure: ``step(closure)`` form: the parameters always hold ``x``.
        flags: backend flags the class accepts (``foreach``, ``fused``, ``state_dtype``).
        tolerance: relative agreement with the reference in float64.
        invalid: ``(argument, value)`` pairs that must raise ValueError naming the argument.
        needs_loss: the step takes the loss (ScheduleFree+'s Polyak step size).
        starts_in_eval: the class starts in eval mode, as the authors' class it
            follows does; ``make`` calls ``train()`` so every check starts alike.
        fused_kernel: its direction has a one-pass kernel (the C kernel on CPU), so ``fused=True`` changes the backend.
        distributed: run by the DDP and FSDP2 tests against a single process.
        compile: run by the ``torch.compile`` tests.
    """

    name: str
    cls: type
    kwargs: dict[str, Any]
    reference: type | None
    reference_kwargs: dict[str, Any] | None = None
    base: Callable[[Any], torch.optim.Optimizer] | None = None
    closure: bool = False
    flags: frozenset[str] = frozenset()
    dtypes: tuple[torch.dtype, ...] = (F64, F32)
    tolerance: float = 1e-9
    backend_tolerance: dict[torch.dtype, float] = field(default_factory=lambda: {F64: 1e-12, F32: 2e-5})
    invalid: tuple[tuple[str, Any], ...] = ()
    #: ``step()`` needs the loss (``step(loss=...)``, or a closure that returns it).
    needs_loss: bool = False
    starts_in_eval: bool = False
    fused_kernel: bool = False
    distributed: bool = False
    compile: bool = False

    @property
    def fused(self) -> bool:
        """Whether it takes ``fused`` (a one-pass kernel where its direction has one)."""
        return "fused" in self.flags

    @property
    def low_precision(self) -> bool:
        """Whether it keeps wide master copies of narrow parameters (``state_dtype``)."""
        return "state_dtype" in self.flags

    def make(self, params: list[torch.Tensor], **overrides: Any) -> Any:
        first = self.base(params) if self.base is not None else params
        opt = self.cls(first, **{**self.kwargs, **overrides})
        return opt.train() if self.starts_in_eval else opt

    def make_reference(self, params: list[torch.Tensor], **overrides: Any) -> Any:
        assert self.reference is not None
        first = self.base(params) if self.base is not None else params
        kwargs = self.kwargs if self.reference_kwargs is None else self.reference_kwargs
        return self.reference(first, **{**kwargs, **overrides})

    @property
    def reference_is_ours(self) -> bool:
        """Whether the oracle is an sfoptim class (so it validates like ours)."""
        return self.reference is not None and self.reference.__module__.startswith("sfoptim")

    @property
    def backends(self) -> list[dict[str, Any]]:
        """Backend flag sets that must give the same trajectory (the first is the baseline)."""
        out: list[dict[str, Any]] = []
        if "fused" in self.flags:
            out += [{"fused": False}, {"fused": True}]
        if "foreach" in self.flags:
            out += [{"fused": False, "foreach": False}]
        return out


def _published(name: str) -> type | None:
    return getattr(schedulefree, name) if schedulefree is not None else None


COMMON_INVALID = (
    ("lr", -0.1),
    ("lr", float("nan")),
    ("weight_decay", -0.01),
    ("r", -1.0),
    ("weight_lr_power", float("inf")),
)
WARMUP_INVALID = (("warmup_steps", -5), ("warmup_steps", 0.05))
ADAM_INVALID = (("betas", (0.0, 0.999)), ("betas", (0.9, 1.0)), ("eps", -1e-8), ("eps", float("nan")))
SGD_INVALID = COMMON_INVALID + WARMUP_INVALID + (("momentum", 0.0), ("momentum", 1.5))
ADAMW_INVALID = COMMON_INVALID + WARMUP_INVALID + ADAM_INVALID + (("inner_momentum", 1.0),)
RADAM_INVALID = COMMON_INVALID + ADAM_INVALID
PRODIGY_INVALID = COMMON_INVALID + WARMUP_INVALID + ADAM_INVALID + (
    ("d0", 0.0),
    ("d0", float("inf")),
    ("d_coef", -1.0),
    ("update_clip", 0.0),
    ("update_clip", float("nan")),
    ("split_groups", "yes"),
)
WRAPPER_INVALID = (("momentum", 0.0), ("weight_decay_at_y", -1.0), ("r", float("nan")), ("weight_lr_power", -1.0))

MUON_INVALID = COMMON_INVALID + WARMUP_INVALID + (
    ("beta", 0.0), ("momentum", 1.0), ("decay_at", "x"), ("ns_steps", 0), ("adjust_lr_fn", "cubic"),
    ("normuon_beta2", 1.0), ("beta_horizon", 0), ("beta_horizon", "later"), ("adamw_beta2", 1.0), ("adamw_eps", -1.0),
)  # fmt: skip
FAST = frozenset({"foreach", "fused", "state_dtype"})
#: Low-bit state refuses ``state_dtype`` (its own ValueError names it).
LOWBIT = frozenset({"foreach", "fused"})
LOWBIT_INVALID = (("state_precision", "4bit"), ("state_precision", None), ("inner_momentum", 0.5), ("lr", -0.1))
SGD_KW = dict(lr=0.2, warmup_steps=3, weight_decay=0.01, r=1.0)
ADAMW_KW = dict(lr=0.02, warmup_steps=5, weight_decay=0.01, weight_lr_power=1.0)
ADAMW_INNER_KW = dict(lr=0.02, inner_momentum=0.9, betas=(0.8, 0.99), weight_decay=0.05)
RADAM_KW = dict(lr=0.02, weight_decay=0.01, betas=(0.9, 0.99), r=0.5)
RADAM_SGD_KW = dict(lr=0.02, silent_sgd_phase=False)
PRODIGY_KW = dict(d0=1e-3, betas=(0.9, 0.99), warmup_steps=3, weight_decay=0.01)
PRODIGY_SPLIT_KW = dict(d0=1e-4, split_groups=True, r=0.0, weight_lr_power=1.0, d_coef=0.5)
WRAPPER_KW = dict(momentum=0.8, weight_decay_at_y=0.01, r=1.0)
PLUS_KW = dict(weight_decay=2.0, polyak_beta=0.9, c_warmup=3, sf_beta1_anneal_steps=10, r=1.0, betas=(0.8, 0.99))
#: The production class with every guard rail set (the cap and the estimate of f* bind on the generic problem).
PLUS_GUARDED_KW = dict(
    PLUS_KW, warmup_steps=4, lr_cap=0.05, growth_limit=1.1, loss_beta=0.5, f_star=0.1, estimate_f_star=True
)  # fmt: skip
PLUS_INVALID = (
    *COMMON_INVALID,
    ("betas", (1.0, 0.95)),
    ("betas", (0.9, 1.0)),
    ("eps", -1e-8),
    ("polyak_beta", 1.0),
    ("sf_beta1", 0.0),
    ("sf_beta1", 1.5),
    ("sf_beta1_max", 1.0),  # annealing towards 1 is refused (it is linear in log(1 - beta))
    ("c_warmup", -1),
    ("c_warmup", 2.5),
    ("sf_beta1_anneal_steps", -3),
    ("warmup_steps", -1),
    ("warmup_steps", 2.5),
    ("lr_cap", 0.0),
    ("growth_limit", 0.5),
    ("loss_beta", 1.0),
    ("f_star", float("nan")),
    ("estimate_f_star", "yes"),
)

# Newton-Schulz in the parameters' dtype, so that float64 runs are exact against the reference.
MUON_KW = dict(lr=0.02, warmup_steps=3, weight_decay=0.01, adamw_lr=0.01, ns_dtype=None)
NORMUON_KW = dict(
    lr=0.02, weight_decay=0.02, decay_at="y", normuon=True, nesterov=False, adjust_lr_fn="match_rms_adamw",
    beta_horizon=4, beta_power=0.5, ns_dtype=None, r=1.0,
)  # fmt: skip


def _sgd(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.1)


def _adam(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=0.01)


def _rmsprop(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(ps, lr=0.005, weight_decay=0.01)


def _adopt(ps: Any) -> torch.optim.Optimizer:
    return pytorch_optimizer.ADOPT(ps, lr=0.01, weight_decay=0.01, weight_decouple=True)


OPTIMIZERS: list[OptimizerInfo] = [
    # The fast forms, each against our reference form.
    OptimizerInfo("sgd", sfoptim.SGDScheduleFree, SGD_KW, sfoptim.SGDScheduleFreeReference, flags=FAST, invalid=SGD_INVALID, distributed=True, compile=True, fused_kernel=True),
    OptimizerInfo("adamw", sfoptim.AdamWScheduleFree, ADAMW_KW, sfoptim.AdamWScheduleFreeReference, flags=FAST, invalid=ADAMW_INVALID, distributed=True, compile=True, fused_kernel=True),
    OptimizerInfo("adamw_inner", sfoptim.AdamWScheduleFree, ADAMW_INNER_KW, sfoptim.AdamWScheduleFreeReference, flags=FAST, compile=True, fused_kernel=True),
    OptimizerInfo("adamw_paper", sfoptim.AdamWScheduleFreePaper, ADAMW_KW, _published("AdamWScheduleFreePaper"), flags=FAST, fused_kernel=True),
    OptimizerInfo("radam", sfoptim.RAdamScheduleFree, RADAM_KW, sfoptim.RAdamScheduleFreeReference, flags=FAST, invalid=RADAM_INVALID, distributed=True, fused_kernel=True),
    OptimizerInfo("radam_sgd_phase", sfoptim.RAdamScheduleFree, RADAM_SGD_KW, sfoptim.RAdamScheduleFreeReference, flags=FAST, compile=True, fused_kernel=True),
    OptimizerInfo("muon", sfoptim.MuonScheduleFree, MUON_KW, sfoptim.MuonScheduleFreeReference, flags=FAST, invalid=MUON_INVALID, distributed=True, fused_kernel=True),
    OptimizerInfo("normuon", sfoptim.MuonScheduleFree, NORMUON_KW, sfoptim.MuonScheduleFreeReference, flags=FAST, distributed=True, fused_kernel=True),
    OptimizerInfo("prodigy", sfoptim.ProdigyScheduleFree, PRODIGY_KW, sfoptim.ProdigyScheduleFreeReference, flags=FAST, invalid=PRODIGY_INVALID, distributed=True, fused_kernel=True),
    OptimizerInfo("prodigy_split", sfoptim.ProdigyScheduleFree, PRODIGY_SPLIT_KW, sfoptim.ProdigyScheduleFreeReference, flags=FAST, distributed=True, fused_kernel=True),
    # Low-bit state (z bfloat16, v bfloat16 or 8-bit): no independent oracle (tests/test_state_precision.py
    # checks the math against float64); the fused kernel and the torch path agree bit for bit.
    OptimizerInfo("adamw_bf16state", sfoptim.AdamWScheduleFree, {**ADAMW_KW, "state_precision": "bf16"}, None, flags=LOWBIT, invalid=LOWBIT_INVALID, fused_kernel=True),
    OptimizerInfo("adamw_8bit", sfoptim.AdamWScheduleFree, {**ADAMW_KW, "state_precision": "8bit"}, None, flags=LOWBIT, invalid=LOWBIT_INVALID, fused_kernel=True),
    OptimizerInfo("adamw_8bit_closure", sfoptim.AdamWScheduleFreeClosure, {**ADAMW_KW, "state_precision": "8bit"}, None, closure=True, flags=LOWBIT, fused_kernel=True),
    OptimizerInfo("radam_8bit", sfoptim.RAdamScheduleFree, {**RADAM_SGD_KW, "state_precision": "8bit"}, None, flags=LOWBIT, fused_kernel=True),
    # The closure forms: parameters hold x between steps.
    OptimizerInfo("sgd_closure", sfoptim.SGDScheduleFreeClosure, SGD_KW, sfoptim.SGDScheduleFreeReference, closure=True, flags=FAST, fused_kernel=True),
    OptimizerInfo("adamw_closure", sfoptim.AdamWScheduleFreeClosure, ADAMW_KW, sfoptim.AdamWScheduleFreeReference, closure=True, flags=FAST, distributed=True, fused_kernel=True, compile=True),
    OptimizerInfo("radam_closure", sfoptim.RAdamScheduleFreeClosure, RADAM_KW, sfoptim.RAdamScheduleFreeReference, closure=True, flags=FAST, fused_kernel=True),
    OptimizerInfo("prodigy_closure", sfoptim.ProdigyScheduleFreeClosure, PRODIGY_KW, sfoptim.ProdigyScheduleFreeReference, closure=True, flags=FAST, distributed=True, fused_kernel=True),
    # The wrapper around plain and stateful base optimizers.
    OptimizerInfo("wrapper_sgd", sfoptim.ScheduleFreeWrapper, WRAPPER_KW, sfoptim.ScheduleFreeWrapperReference, base=_sgd, flags=frozenset({"fused"}), invalid=WRAPPER_INVALID, fused_kernel=True),
    OptimizerInfo("wrapper_adam", sfoptim.ScheduleFreeWrapper, WRAPPER_KW, sfoptim.ScheduleFreeWrapperReference, base=_adam, flags=frozenset({"fused"}), distributed=True, compile=True, fused_kernel=True),
    OptimizerInfo("wrapper_rmsprop", sfoptim.ScheduleFreeWrapper, WRAPPER_KW, sfoptim.ScheduleFreeWrapperReference, base=_rmsprop, flags=frozenset({"fused"}), fused_kernel=True),
    # ScheduleFree+ (the step takes the loss), against our reference form.
    OptimizerInfo("adamc_plus", sfoptim.AdamCScheduleFreePlus, PLUS_GUARDED_KW, sfoptim.AdamCScheduleFreePlusReference, reference_kwargs={**PLUS_GUARDED_KW, "guards": True}, flags=FAST, invalid=PLUS_INVALID, needs_loss=True, fused_kernel=True),
    OptimizerInfo("adamc_plus_closure", sfoptim.AdamCScheduleFreePlusClosure, PLUS_GUARDED_KW, sfoptim.AdamCScheduleFreePlusReference, reference_kwargs={**PLUS_GUARDED_KW, "guards": True}, closure=True, flags=FAST, needs_loss=True, fused_kernel=True),
    OptimizerInfo("adamc_plus_paper", sfoptim.AdamCScheduleFreePlusPaper, PLUS_KW, sfoptim.AdamCScheduleFreePlusReference, flags=FAST, needs_loss=True, starts_in_eval=True, fused_kernel=True),
    # Our reference forms, against the published package (RAdam against its fast form: it has no reference).
    OptimizerInfo("sgd_reference", sfoptim.SGDScheduleFreeReference, SGD_KW, _published("SGDScheduleFreeReference"), tolerance=1e-12, invalid=SGD_INVALID),
    OptimizerInfo("adamw_reference", sfoptim.AdamWScheduleFreeReference, {**ADAMW_KW, "decay_at_z": True}, _published("AdamWScheduleFreeReference"), tolerance=1e-12, invalid=ADAMW_INVALID, distributed=True),
    OptimizerInfo("radam_reference", sfoptim.RAdamScheduleFreeReference, RADAM_KW, _published("RAdamScheduleFree"), tolerance=1e-12, invalid=RADAM_INVALID),
    OptimizerInfo("radam_reference_sgd_phase", sfoptim.RAdamScheduleFreeReference, RADAM_SGD_KW, _published("RAdamScheduleFree"), tolerance=1e-12),
    OptimizerInfo("wrapper_reference", sfoptim.ScheduleFreeWrapperReference, WRAPPER_KW, _published("ScheduleFreeWrapperReference"), base=_sgd, tolerance=1e-12, invalid=WRAPPER_INVALID),
    OptimizerInfo("prodigy_reference", sfoptim.ProdigyScheduleFreeReference, PRODIGY_KW, None, invalid=PRODIGY_INVALID),
    OptimizerInfo("wrapper_reference_adam", sfoptim.ScheduleFreeWrapperReference, WRAPPER_KW, None, base=_adam),
]

if pytorch_optimizer is not None:
    OPTIMIZERS.append(
        OptimizerInfo("wrapper_adopt", sfoptim.ScheduleFreeWrapper, WRAPPER_KW, sfoptim.ScheduleFreeWrapperReference, base=_adopt, flags=frozenset({"fused"}), fused_kernel=True)
    )

BY_NAME = {info.name: info for info in OPTIMIZERS}
assert len(BY_NAME) == len(OPTIMIZERS), "registry names must be unique"


def select(**wanted: bool) -> list[OptimizerInfo]:
    """The entries whose capabilities (attributes or properties) have the given values, e.g. ``select(distributed=True)``."""
    return [info for info in OPTIMIZERS if all(bool(getattr(info, k)) == v for k, v in wanted.items())]
