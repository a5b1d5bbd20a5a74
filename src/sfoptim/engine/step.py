r"""The one schedule-free step, shared by the plain, closure and wrapper forms.

:meth:`ScheduleFreeOptimizer.step` puts the parameters at ``y`` (the closure
form moves them there, the plain form checks they are), evaluates the
closure, and calls :func:`update`, which runs these phases over all groups:

1. **plan**: per group, its direction, the parameters with a gradient
   (checked: dense, right shape) and the step index. Nothing has changed
   yet, so a bad gradient in the last group leaves every group untouched.
2. **state**: buckets of tensors of one device and dtype (state created on
   first use); a direction that moves ``z`` through another optimizer gets
   its parameters instead.
3. **reductions**: if any direction declares some, its per-bucket partial
   sums are added over all groups and, for sharded parameters, all ranks.
4. **delegated move**: for the wrapper, a copy of ``z`` goes into the
   parameters, the base optimizer steps all of them at once, and the
   parameters get ``y`` back (also when the base optimizer raises).
5. **update**: per group, the learning rate and averaging scalars
   (:mod:`.schedule`), then the update of ``y`` and ``z`` on the backend
   :mod:`sfoptim.backends.dispatch` picks (or, after a delegated move, the
   average and the new ``y``), the master copies written back, and the
   group's schedule committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..backends import dispatch
from ..directions.base import Bucket, Direction
from .schedule import AveragingStep, decay_coefficient, interpolation_step, refined_coefficient

_dynamo_callback: Callable[[], object] | None
try:  # the frame callback dynamo installs while a compiled function runs (None or False otherwise)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:  # pragma: no cover - a torch without dynamo
    _dynamo_callback = None

if TYPE_CHECKING:
    from .optimizer import ScheduleFreeOptimizer

__all__ = ["GroupStep", "prepare_traced", "update"]

_NO_REDUCTIONS: Mapping[str, Tensor] = {}


class GroupStep:
    """What one step needs to know about one param group."""

    __slots__ = ("group", "direction", "active", "step", "beta_prev", "beta", "buckets", "moved")

    def __init__(self, group: dict, direction: Direction, active: list[Tensor], step: int, beta_prev: float, beta: float):
        self.group = group
        self.direction = direction
        self.active = active
        #: The 1-based index of this step.
        self.step = step
        #: The interpolation weight the current ``y`` was built with, and the new one.
        self.beta_prev = beta_prev
        self.beta = beta
        self.buckets: list[Bucket] = []
        #: For a delegated move: the tensors the base optimizer stepped, the
        #: z buffers created by this step, and the learning rate times the decay at y.
        self.moved: tuple[list[Tensor], list[Tensor], float] = ([], [], 0.0)


def plan(opt: ScheduleFreeOptimizer) -> list[GroupStep]:
    """Phase 1: validates every group's gradients; changes nothing."""
    plans = []
    k = opt.group_key("k")
    for gi, group in enumerate(opt.param_groups):
        direction = opt.direction_for(group)
        active = opt._active_params(gi, group)
        if direction.needs_full_param and not direction.gathers_shards:
            _check_whole(opt, gi, group, active, direction)
        step = group[k] + 1
        beta = direction.beta(group, step)
        beta_prev = opt.y_beta(group) if direction.varying_beta else beta
        plans.append(GroupStep(group, direction, active, step, beta_prev, beta))
    return plans


def _check_whole(opt: ScheduleFreeOptimizer, gi: int, group: dict, active: list[Tensor], direction: Direction) -> None:
    for p in active:
        if any(getattr(pl, "dim", None) is not None for pl in getattr(p, "placements", ())):
            i = next(j for j, q in enumerate(group["params"]) if q is p)
            raise NotImplementedError(
                f"{type(opt).__name__} needs whole matrices, but {opt._param_label(gi, i, p)} is sharded "
                "(FSDP2); gathering shards for it is not supported yet."
            )


def reduce(opt: ScheduleFreeOptimizer, plans: list[GroupStep]) -> Mapping[str, Tensor]:
    """Phase 3: the global sums the directions asked for (empty when none did).

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
        group = p.group
        flags = dict(
            decay_at_z=_decay_at_z(opt, group) and group[opt.group_key("weight_decay")] != 0,
            fused=opt.option(group, "fused"),
            foreach_flag=opt.option(group, "foreach"),
        )
        for bucket in p.buckets:
            target = sharded if type(bucket.params[0]) is not Tensor and hasattr(bucket.params[0], "placements") else local
            for name, value in dispatch.reduce(p.direction, group, bucket, p.beta_prev, **flags).items():
                target[name] = target[name] + value if name in target else value
    for name, value in sharded.items():
        full = value.full_tensor()  # type: ignore[attr-defined]
        local[name] = local[name] + full.to(local[name].device) if name in local else full
    return local


@torch.compiler.disable(recursive=False)
def update(opt: ScheduleFreeOptimizer) -> None:
    """One step of every group; the parameters hold ``y`` before and after.

    Inside a ``torch.compile``-d region the step is split in two: the Python
    part (:func:`prepare_traced`: plan, state, schedule, kernel scalars) runs
    eagerly, and the arithmetic (:func:`.dispatch.traced_update`) is traced
    as a frame of its own, one graph whose inputs are tensors only, so no
    number that changes between steps reaches the guards. This frame itself
    is never traced (``recursive=False`` leaves the functions it calls to
    dynamo): calling the eager part from a traced frame would cost a graph
    break of its own, on top of the one every enclosing traced frame takes
    at ``optimizer.step()`` (as with ``torch.optim``).
    """
    if _in_compiled_region():
        calls, synced = prepare_traced(opt)
        if calls:
            dispatch.traced_update(calls)
        if synced:
            _sync_traced(opt, synced)
        return
    _update(opt, plan(opt))


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
def prepare_traced(opt: ScheduleFreeOptimizer) -> tuple[list[dispatch.TracedCall], list[GroupStep]]:
    """Everything of a compiled step but the arithmetic, outside the graph.

    The schedule lives in Python numbers in the param groups (as the published
    package stores it); reading them inside the compiled region would make
    every new value a new graph. So planning, state creation, the schedule and
    the kernel scalars run here, eagerly, and the graph receives only tensors:
    the buckets and one tensor of scalars per bucket (:func:`.dispatch.prepare_traced`).
    Returns those calls and the groups whose master copies (``state_dtype``)
    must be written into their parameters after the graph has run.

    The schedule is committed here, before the graph updates the tensors;
    every check that can refuse a step (gradients, state shapes) has run by
    then. A delegated move (the wrapper) runs here entirely, as in eager
    mode: its base optimizer's step is arbitrary Python.
    """
    plans = plan(opt)
    if any(p.direction.delegates_move for p in plans):
        _update(opt, plans)
        return [], []
    for p in plans:
        if p.active:
            p.buckets = opt._buckets(p.group, p.active, p.direction.state_buffers(p.group))
    reduced = reduce(opt, plans)
    key = opt.group_key
    calls: list[dispatch.TracedCall] = []
    synced: list[GroupStep] = []
    for p in plans:
        group, direction = p.group, p.direction
        sched = opt._schedule(group, direction.lr(group, p.step, reduced))
        sched = sched._replace(ckp1=refined_coefficient(sched.ckp1, p.beta, group.get(key("decoupling_c"))))
        ckp1, beta = interpolation_step(sched.ckp1, p.beta_prev, p.beta)
        fused, foreach_flag = opt.option(group, "fused"), opt.option(group, "foreach")
        decay = _decay(opt, group, direction, sched)
        for bucket in p.buckets:
            call = dispatch.prepare_traced(
                direction, group, p.step, bucket, reduced,
                lr=sched.lr, ckp1=ckp1, beta=beta, weight_decay=decay, decay_at_z=_decay_at_z(opt, group),
                fused=fused, foreach_flag=foreach_flag, owner=type(opt).__name__,
            )  # fmt: skip
            if call is not None:
                calls.append(call)
        if p.active and opt.option(group, "state_dtype") is not None:
            synced.append(p)
        _rebuild_inactive(opt, p)
        opt._commit(group, sched, p.beta)
        direction.commit(group, p.step, reduced)
    return calls, synced


@torch.compiler.disable
def _sync_traced(opt: ScheduleFreeOptimizer, plans: list[GroupStep]) -> None:
    """After the graph: the updated master copies rounded into their parameters."""
    for p in plans:
        opt._sync_params(p.group, p.active)


def _update(opt: ScheduleFreeOptimizer, plans: list[GroupStep]) -> None:
    delegated = []
    for p in plans:
        if p.direction.delegates_move:
            delegated.append(p)
        elif p.active:
            p.buckets = opt._buckets(p.group, p.active, p.direction.state_buffers(p.group))
    reduced = reduce(opt, plans)
    if delegated:
        _delegated_move(opt, delegated, reduced)
    key = opt.group_key
    for p in plans:
        group, direction = p.group, p.direction
        sched = opt._schedule(group, direction.lr(group, p.step, reduced))
        sched = sched._replace(ckp1=refined_coefficient(sched.ckp1, p.beta, group.get(key("decoupling_c"))))
        ckp1, beta = interpolation_step(sched.ckp1, p.beta_prev, p.beta)
        if p.direction.delegates_move:
            _finish_delegated(opt, p, sched.ckp1)
        elif p.active:
            fused, foreach_flag = opt.option(group, "fused"), opt.option(group, "foreach")
            decay, at_z = _decay(opt, group, direction, sched), _decay_at_z(opt, group)
            for bucket in p.buckets:
                dispatch.step(
                    direction, group, p.step, bucket, reduced,
                    lr=sched.lr, ckp1=ckp1, beta=beta, weight_decay=decay, decay_at_z=at_z,
                    fused=fused, foreach_flag=foreach_flag, owner=type(opt).__name__,
                )  # fmt: skip
            opt._sync_params(group, p.active)
        _rebuild_inactive(opt, p)
        opt._commit(group, sched, p.beta)
        direction.commit(group, p.step, reduced)


def _decay(opt: ScheduleFreeOptimizer, group: dict, direction: Direction, sched: AveragingStep) -> float:
    """The decay the engine adds to the direction this step (AdamC-corrected when the group asks)."""
    key = opt.group_key
    decay = direction.weight_decay_at_y(group, sched.lr, group[key("weight_decay")])
    return decay_coefficient(decay, sched.lr, sched.lr_max, bool(group.get(key("adamc"), False)))


def _decay_at_z(opt: ScheduleFreeOptimizer, group: dict) -> bool:
    """Whether the group's decay is taken at ``z`` (``decay_at="z"``) rather than at ``y`` (the default)."""
    return group.get(opt.group_key("decay_at"), "y") == "z"


def _rebuild_inactive(opt: ScheduleFreeOptimizer, p: GroupStep) -> None:
    r"""Moves the ``y`` of the group's parameters without a gradient to the step's new :math:`\beta`.

    The group records one interpolation weight for all its ``y``; when it
    changes, a parameter that was not stepped keeps its ``x`` and ``z`` and
    gets :math:`y = \beta x + (1-\beta) z`, i.e. ``lerp(y, z, 1 - beta/beta_prev)``.
    """
    if p.beta == p.beta_prev or p.direction.delegates_move:
        return
    stepped = {id(q) for q in p.active}
    params, ys, zs = [], [], []
    for q in p.group["params"]:
        state = opt.state.get(q)
        if id(q) in stepped or not state or "z" not in state:
            continue
        master = state.get("master")
        params.append(q)
        ys.append(real(q.data if master is None else master))
        zs.append(real(state["z"]))
    if ys:
        torch._foreach_lerp_(ys, zs, 1 - p.beta / p.beta_prev)
        opt._sync_params(p.group, params)


def _delegated_move(opt: ScheduleFreeOptimizer, plans: list[GroupStep], reduced: Mapping[str, Tensor]) -> None:
    r"""Phase 4: the base optimizer moves a copy of ``z`` held in the parameters.

    Each parameter lends its storage to a new tensor holding ``z`` (minus
    :math:`\gamma\lambda y` for weight decay at ``y``, or :math:`\gamma\lambda z`
    with ``sf_decay_at="z"``, with this step's learning
    rate, read before the base optimizer may change it); ``y`` and the stored
    ``z`` are not touched. If the base optimizer raises, the parameters get
    their ``y`` back and the ``z`` buffers this step created are removed, so
    everything is bit for bit as before and the step can be retried.
    """
    key = opt.group_key
    for p in plans:
        created = [q for q in p.active if "z" not in opt.state[q]]
        for q in created:
            opt.state[q]["z"] = q.detach().clone()
        decay = p.group[key("weight_decay")]
        if decay != 0 and p.group.get(key("adamc"), False):
            lr = p.direction.lr(p.group, p.step, reduced)
            decay = decay_coefficient(decay, lr, max(lr, p.group[key("lr_max")]), True)
        lr_decay = p.direction.decay_lr(p.group) * decay if decay != 0 else 0.0  # type: ignore[attr-defined]
        at_z = _decay_at_z(opt, p.group)
        zs = [opt.state[q]["z"] for q in p.active]
        if not zs:
            iterates: list[Tensor] = []
        elif lr_decay != 0:
            iterates = list(torch._foreach_sub(zs, zs if at_z else [q.data for q in p.active], alpha=lr_decay))
        else:
            iterates = [torch.clone(z, memory_format=torch.preserve_format) for z in zs]
        # Decay at z moves only the base optimizer's iterate: x comes from y and the old z as they are.
        p.moved = (iterates, created, 0.0 if at_z else lr_decay)
    for p in plans:
        for q, t in zip(p.active, p.moved[0]):
            _swap(q, t)
    movers = {id(p.direction): p.direction for p in plans}
    try:
        for direction in movers.values():
            direction.move(opt)  # type: ignore[attr-defined]  # a DelegatedDirection
    except BaseException:
        for p in plans:
            iterates, created, _ = p.moved
            for q, t in zip(p.active, iterates):
                _swap(q, t)
            for q in created:
                del opt.state[q]["z"]
        raise


def _finish_delegated(opt: ScheduleFreeOptimizer, p: GroupStep, ckp1: float) -> None:
    """Phase 5 after a delegated move: ``x`` from ``y`` and the old ``z``, then the new ``x``, ``y`` and ``z``."""
    if not p.active:
        return
    iterates, _, lr_decay = p.moved
    for q, t in zip(p.active, iterates):
        _swap(q, t)
    fused = opt.option(p.group, "fused")
    ys = [real(q.data) for q in p.active]
    # The decay moves the old z by -lr*decay*y and y by (1-beta) of that, so x
    # stays put; the old z is replaced by the base optimizer's iterate below.
    dispatch.wrap_before(ys, [real(opt.state[q]["z"]) for q in p.active], lr_decay, p.beta_prev, fused)
    dispatch.wrap_after(ys, [real(t) for t in iterates], ckp1, p.beta, fused)
    for q, t in zip(p.active, iterates):
        opt.state[q]["z"] = t


def real(t: Tensor) -> Tensor:
    """Complex tensors as pairs of reals, as torch.optim does."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


def _swap(a: Tensor, b: Tensor) -> None:
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

