r"""The one schedule-free step, shared by the plain, closure and wrapper forms.

The optimizer describes a step as a plan (:class:`GroupStep` per param group:
its direction, step index, interpolation weights, buckets of tensors with
their state, options) and hands it to :func:`update`, which consumes it and
never calls back into the optimizer:

1. **reductions**: if any direction declares some, its per-bucket partial
   sums are added over all groups and, for sharded parameters, all ranks;
   with the optimizer's own inputs of the step (a loss) they are ``reduced``.
2. **delegated move**: a direction that moves ``z`` through another
   optimizer (the wrapper) does so for all its groups at once.
3. **schedule**: every group's learning rate and averaging scalars
   (:mod:`.schedule`), before any tensor changes, so a direction may refuse
   the step by raising from ``lr``.
4. **update**, per group: for each bucket the description of its update
   (:func:`.dispatch.prepare`), which an executor carries out; the master
   copies written into the parameters; the group's schedule committed.

Eager and ``torch.compile``-d steps run the same function (:func:`_run`);
only the executor of the kernel updates differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import precision
from ..backends import dispatch
from ..backends.abi import Bucket
from .direction import DelegatedDirection, Direction
from .schedule import AveragingStep, averaging_step, decay_coefficient, interpolation_step, refined_coefficient

_dynamo_callback: Callable[[], object] | None
try:  # the frame callback dynamo installs while a compiled function runs (None or False otherwise)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:  # pragma: no cover - a torch without dynamo
    _dynamo_callback = None

__all__ = ["GroupStep", "averaging", "lerp_to_z", "real", "swap", "update"]

_NO_REDUCTIONS: Mapping[str, Tensor] = {}


class GroupStep:
    """One param group's part of a step, as the optimizer plans it.

    The plan holds everything the step reads: the group (whose schedule keys,
    spelled by ``key``, the step advances), its direction, the 1-based
    ``step``, the interpolation weight the current ``y`` was built with
    (``beta_prev``) and the new one (``beta``), the buckets of the parameters
    with a gradient (state created), and the tensors to keep in step besides:
    master copies to round into their parameters (``masters``), and the ``y``
    and ``z`` of parameters without a gradient when :math:`\\beta` changes
    (``inactive``). A delegated move gets the active parameters and their
    state dicts instead of buckets, and keeps what it needs in ``moved``.
    """

    __slots__ = (
        "group", "direction", "step", "beta_prev", "beta", "key", "owner", "fused", "foreach", "active", "buckets",
        "masters", "stochastic", "inactive", "states", "moved",
    )  # fmt: skip

    def __init__(
        self, group: dict, direction: Direction, step: int, beta_prev: float, beta: float, key: Callable[[str], str]
    ) -> None:
        self.group = group
        self.direction = direction
        self.step = step
        self.beta_prev = beta_prev
        self.beta = beta
        self.key = key
        #: The optimizer's class name, for messages.
        self.owner = "this optimizer"
        self.fused: bool | None = None
        self.foreach: bool | None = None
        self.active: list[Tensor] = []
        self.buckets: list[Bucket] = []
        #: (parameters, their wide masters) to write after the update.
        self.masters: tuple[list[Tensor], list[Tensor]] = ([], [])
        self.stochastic = False
        #: (ys, zs, parameters, masters) of the parameters without a gradient, when beta changes.
        self.inactive: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self.states: list[dict] = []
        self.moved: Any = None


@torch.compiler.disable(recursive=False)
def update(plan: Callable[[], list[GroupStep]], inputs: Mapping[str, Tensor] = _NO_REDUCTIONS) -> None:
    """One step of every group of the plan that ``plan()`` returns; the parameters hold ``y`` before and after.

    ``plan`` validates the gradients and creates state before anything changes;
    ``inputs`` join the reductions' sums in ``reduced`` (names must differ).
    Inside a ``torch.compile``-d region the step is split in two: the Python
    part (:func:`_run` with a list for the kernel updates) runs eagerly, and
    the arithmetic (:func:`.dispatch.traced_update`) is traced as a frame of
    its own, one graph whose inputs are tensors only, so no number that
    changes between steps reaches the guards. This frame itself is never
    traced (``recursive=False`` leaves the functions it calls to dynamo):
    calling the eager part from a traced frame would cost a graph break of its
    own, on top of the one every enclosing traced frame takes at
    ``optimizer.step()`` (as with ``torch.optim``).
    """
    if _in_compiled_region():
        calls: list[dispatch.TracedCall] = []
        plans = _run_eagerly(plan, inputs, calls)
        if calls:
            dispatch.traced_update(calls)
        if any(p.masters[0] for p in plans):
            _write_masters(plans)
        return
    _run(plan(), inputs, None)


def _in_compiled_region() -> bool:
    """Whether dynamo is watching the frames this step runs (a ``torch.compile``-d caller).

    ``torch.compiler.is_compiling()`` answers only inside a frame being
    traced, and :func:`update` is not one; the frame callback dynamo installs
    for the duration of a compiled call is the signal that remains. Without
    that hook (another torch) the step runs eagerly, as outside compile.
    """
    if _dynamo_callback is None:
        return False
    callback = _dynamo_callback()
    return callback is not None and callback is not False


@torch.compiler.disable
def _run_eagerly(
    plan: Callable[[], list[GroupStep]], inputs: Mapping[str, Tensor], calls: list[dispatch.TracedCall]
) -> list[GroupStep]:
    plans = plan()
    _run(plans, inputs, calls)
    return plans


@torch.compiler.disable
def _write_masters(plans: list[GroupStep]) -> None:
    """After the graph: the updated master copies rounded into their parameters."""
    for p in plans:
        precision.write_params(*p.masters, p.stochastic)


def _run(plans: list[GroupStep], inputs: Mapping[str, Tensor], calls: list[dispatch.TracedCall] | None) -> None:
    """The step of every group; with ``calls`` a list, the kernel updates are packed into it instead of run.

    The schedule is committed per group once its tensors are updated (or, for
    packed updates, once every check that can refuse the step has run).
    """
    reduced = reduce(plans)
    if inputs:
        reduced = {**reduced, **inputs}
    movers = {id(p.direction): p.direction for p in plans if isinstance(p.direction, DelegatedDirection)}
    for mover in movers.values():
        mover.move([p for p in plans if p.direction is mover], reduced)
    scheds = [_schedule(p, p.direction.lr(p.group, p.step, reduced)) for p in plans]
    for p, sched in zip(plans, scheds):
        group, direction = p.group, p.direction
        if isinstance(direction, DelegatedDirection):
            direction.finish(p, sched.ckp1)
        elif p.buckets:
            ckp1, beta = interpolation_step(sched.ckp1, p.beta_prev, p.beta)
            decay = decay_coefficient(
                direction.weight_decay_at_y(group, sched.lr, group[p.key("weight_decay")]),
                sched.lr,
                sched.lr_max,
                bool(group.get(p.key("adamc"), False)),
            )
            at_z = _decay_at_z(p)
            for bucket in p.buckets:
                step = dispatch.prepare(
                    direction, group, p.step, bucket, reduced,
                    lr=sched.lr, ckp1=ckp1, beta=beta, weight_decay=decay, decay_at_z=at_z,
                    fused=p.fused, foreach_flag=p.foreach, owner=p.owner,
                )  # fmt: skip
                if calls is None:
                    dispatch.run(step)
                elif (call := dispatch.traced(step)) is not None:
                    calls.append(call)
            if calls is None:
                precision.write_params(*p.masters, p.stochastic)
        if p.inactive is not None:
            _rebuild_inactive(p)
        _commit(p, sched)
        direction.commit(group, p.step, reduced)


def reduce(plans: list[GroupStep]) -> Mapping[str, Tensor]:
    """The global sums the directions asked for (empty when none did).

    Each bucket's partial sums come from the backend its update will take
    (:func:`.dispatch.reduce`). Partial sums of plain tensors are added locally (under DDP they are the
    same on every rank, the gradients being averaged already). Those of
    sharded parameters (DTensor, FSDP2) stay partial over their mesh until
    they are summed, and are then resolved by one collective per name.
    """
    if not any(p.direction.reductions for p in plans):
        return _NO_REDUCTIONS
    local: dict[str, Tensor] = {}
    sharded: dict[str, Tensor] = {}
    for p in plans:
        for bucket in p.buckets:
            target = sharded if type(bucket.params[0]) is not Tensor and hasattr(bucket.params[0], "placements") else local
            sums = dispatch.reduce(
                p.direction, p.group, p.step, bucket, p.beta_prev, fused=p.fused, foreach_flag=p.foreach
            )
            for name, value in sums.items():
                target[name] = target[name] + value if name in target else value
    for name, value in sharded.items():
        full = value.full_tensor()  # type: ignore[attr-defined]
        local[name] = local[name] + full.to(local[name].device) if name in local else full
    return local


def _schedule(p: GroupStep, lr: float) -> AveragingStep:
    return averaging(p.group, p.key, p.step, lr, p.beta)


def averaging(group: dict, key: Callable[[str], str], step: int, lr: float, beta: float) -> AveragingStep:
    """The averaging scalars of the group's 1-based ``step`` with learning rate ``lr`` and weight ``beta`` (changes nothing)."""
    sched = averaging_step(
        step, lr, group[key("lr_max")], group[key("weight_sum")], group[key("r")], group[key("weight_lr_power")],
        c_warmup=group.get(key("c_warmup"), 0),
    )  # fmt: skip
    return sched._replace(ckp1=refined_coefficient(sched.ckp1, beta, group.get(key("decoupling_c"))))


def _commit(p: GroupStep, sched: AveragingStep) -> None:
    group, key = p.group, p.key
    group[key("k")] = sched.step
    group[key("lr_max")] = sched.lr_max
    group[key("weight_sum")] = sched.weight_sum
    group[key("scheduled_lr")] = sched.lr
    if p.direction.varying_beta:
        group[key("y_beta")] = p.beta


def _decay_at_z(p: GroupStep) -> bool:
    """Whether the group's decay is taken at ``z`` (``decay_at="z"``) rather than at ``y`` (the default)."""
    return p.group.get(p.key("decay_at"), "y") == "z"


def _rebuild_inactive(p: GroupStep) -> None:
    r"""Moves the ``y`` of the group's parameters without a gradient to the step's new :math:`\beta`.

    A parameter that was not stepped keeps its ``x`` and ``z`` and gets
    :math:`y = \beta x + (1-\beta) z`, i.e. ``lerp(y, z, 1 - beta/beta_prev)``.
    """
    ys, zs, params, masters = p.inactive  # type: ignore[misc]
    if ys:
        lerp_to_z(ys, zs, 1 - p.beta / p.beta_prev)
        precision.write_params(params, masters, p.stochastic)


def lerp_to_z(ys: list[Tensor], zs: list[Tensor], weight: float) -> None:
    """``y = lerp(y, z, weight)`` in place; a ``z`` kept narrower (low-bit state) is widened one tensor at a time."""
    if all(y.dtype == z.dtype for y, z in zip(ys, zs)):
        torch._foreach_lerp_(ys, zs, weight)
        return
    for y, z in zip(ys, zs):
        y.lerp_(z if z.dtype == y.dtype else z.to(y.dtype), weight)


def real(t: Tensor) -> Tensor:
    """Complex tensors as pairs of reals, as torch.optim does."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


def swap(a: Tensor, b: Tensor) -> None:
    """Exchanges the contents of two same-shaped tensors."""
    if type(a.data) is Tensor and type(b.data) is Tensor:
        # Exchanging storages is free and leaves ``a.grad`` and object identity alone.
        tmp = a.data
        a.data = b.data
        b.data = tmp
    else:
        tmp = a.detach().clone()
        a.copy_(b)
        b.copy_(tmp)
