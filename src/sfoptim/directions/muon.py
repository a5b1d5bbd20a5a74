r"""Schedule-free Muon: orthogonalized momentum for matrices, schedule-free AdamW for the rest.

For a matrix parameter (2-D, or a convolution kernel seen as a matrix of
``shape[0]`` rows) the base direction is Muon's (Jordan et al., 2024; as
``torch.optim.Muon``):

.. math::

    B_t &= \operatorname{lerp}(B_{t-1}, g_t, 1-\mu), \qquad
    \tilde B_t = \begin{cases} \operatorname{lerp}(g_t, B_t, \mu) & \text{nesterov} \\ B_t \end{cases} \\
    O_t &= \mathrm{NS}^{(a,b,c)}_k(\tilde B_t), \qquad d_t = s(A, B)\, O_t

where :math:`\mathrm{NS}` is ``ns_steps`` quintic Newton-Schulz iterations
:math:`X \leftarrow aX + (bXX^\top + c(XX^\top)^2)X` from
:math:`X_0 = \tilde B / \max(\lVert\tilde B\rVert_F, \epsilon)` (on the
transpose when the matrix has more rows than columns), computed in
``ns_dtype``, and :math:`s` the shape adjustment of the ``A x B`` matrix:
:math:`0.2\sqrt{\max(A, B)}` (``adjust_lr_fn="match_rms_adamw"``, the
default: an entry RMS of 0.2, about an AdamW update's, so that one learning
rate serves both parts) or :math:`\sqrt{\max(1, A/B)}` (``None`` or
``"original"``, Jordan et al.'s). A matrix without elements gets the empty
direction.

With ``normuon=True`` (NorMuon, Li et al., 2025) the orthogonalized update is
normalized per row (neuron) by a second moment of its entries, and rescaled
to keep its Frobenius norm:

.. math::

    v_t = \operatorname{lerp}(v_{t-1}, \operatorname{mean}_j O_{t,ij}^2, 1-\beta_2), \qquad
    \hat O_t = O_t / (\sqrt{v_t} + 10^{-10}), \qquad
    O_t \leftarrow \hat O_t \, \lVert O_t\rVert_F / (\lVert\hat O_t\rVert_F + 10^{-10})

Every other parameter gets schedule-free AdamW's direction
(:math:`g / (\sqrt{v/(1-\beta_2^t)} + \epsilon)`). The engine then moves
:math:`z_{t+1} = z_t - \gamma_t (d_t + \lambda p_t)` with :math:`p_t = z_t`
(``decay_at="z"``, the default, as in schedule-free spectral training) or
:math:`p_t = y_t`, and averages as usual.

The interpolation weight is ``beta`` or, with ``beta_horizon`` =
:math:`T_0`, the time-varying weight of AMUSE (Kim et al., 2026): the
gradient of step :math:`s` is taken at :math:`y = (1-\beta_s) z + \beta_s x`
with :math:`\beta_s = \beta` for :math:`s \le T_0` and
:math:`\beta_s = 1 - ((T_0 - 1)/(s - 1))^{\rho} (1 - \beta)` after
(:math:`\rho` = ``beta_power``). ``beta_horizon="warmup"`` takes
:math:`T_0` = ``warmup_steps``, as AMUSE does: the weight rises from the end
of the learning-rate warmup, with no horizon to choose. The rise follows the
averaging weights :math:`c_s = 1/s` of a run without warmup,
:math:`(T_0 - 1)/(s - 1) = (c_s/(1-c_s)) / (c_{T_0}/(1-c_{T_0}))`. AMUSE
starts below the constant default (:math:`\beta` from 0.4 to 0.8 and
:math:`\rho` from 0.3 to 0.8 in its published runs): early gradients are taken
near ``z``, later ones ever nearer ``x``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any

import torch
from torch import Size, Tensor, nn

from .. import _validation
from ..distributed import assign_owners, compute_on_owners, row_sharded, shard_like
from ..engine import ScheduleFreeOptimizer, with_backend_args
from .adamw import adam_direction
from .base import Bucket, Direction, KernelSpec, Kind

__all__ = [
    "AdamWPart",
    "MuonDirection",
    "MuonScheduleFree",
    "adamw_lr_of",
    "adjusted_lr_ratio",
    "assign_owners",
    "has_native_bf16",
    "is_muon_param",
    "module_roles",
    "name_role",
    "newton_schulz",
    "orthogonalization_cost",
    "param_role",
]

#: Newton-Schulz coefficients, steps and epsilon of ``torch.optim.Muon``.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
_NORMUON_EPS = 1e-10
_log = logging.getLogger(__name__)

#: Words of a parameter's name (its dotted parts split at ``_``) that mark an
#: embedding, besides every word starting with ``emb``.
EMBEDDING_WORDS = frozenset({"wte", "wpe", "pos", "position", "positional"})
#: Module names that mark an output head anywhere on the parameter's path
#: (``output`` only as the module that owns the parameter: ``attention.output.dense`` is no head).
HEAD_NAMES = frozenset({"lm_head", "head", "classifier"})
#: Further names that mark the last ``nn.Linear`` of a model as its head.
LAST_LINEAR_HEAD_NAMES = frozenset({"output", "out", "fc", "fc_out", "logits", "decoder", "readout", "proj_out"})


def name_role(name: str) -> str | None:
    """``"embedding"``, ``"head"`` or None: what a parameter's name alone says it is.

    An embedding: a word of the name (its dotted parts split at ``_``) starts
    with ``emb`` or is one of :data:`EMBEDDING_WORDS` (``tok_emb.weight``,
    ``transformer.wpe.weight``, a learned ``pos``). A head: a module on its
    path is one of :data:`HEAD_NAMES`, or the module owning it is ``output``.
    """
    parts = name.split(".")
    if any(w.startswith("emb") or w in EMBEDDING_WORDS for part in parts for w in part.split("_")):
        return "embedding"
    owners = parts[:-1] if len(parts) > 1 else parts
    if any(part in HEAD_NAMES for part in owners) or owners[-1] == "output":
        return "head"
    return None


def module_roles(model: nn.Module) -> dict[int, str]:
    """The parameters a model's module types mark as embedding or head, by ``id``.

    Every weight of an ``nn.Embedding`` or ``nn.EmbeddingBag`` (an output
    layer tied to one shares that weight), and the weight of the model's last
    ``nn.Linear`` when its name marks a head (:func:`name_role`, or one of
    :data:`LAST_LINEAR_HEAD_NAMES` such as ResNet's ``fc``).
    """
    roles: dict[int, str] = {}
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            roles[id(module.weight)] = "embedding"
        elif isinstance(module, nn.Linear):
            linears.append((name, module))
    if linears:
        name, last = linears[-1]
        if id(last.weight) not in roles and (
            name.rsplit(".", 1)[-1] in LAST_LINEAR_HEAD_NAMES or name_role(f"{name}.weight") == "head"
        ):
            roles[id(last.weight)] = "head"
    return roles


def param_role(p: Tensor, name: str | None = None, roles: Mapping[int, str] | None = None) -> str:
    """Where the automatic split sends ``p``: ``"muon"``, or ``"embedding"``, ``"head"``, ``"other"`` (AdamW).

    ``"other"``: not a real matrix (``ndim < 2`` or complex). Embeddings and
    heads are told by module type (``roles`` from :func:`module_roles`, when
    the model itself is given) and by ``name`` (:func:`name_role`, when the
    parameters carry names); a matrix neither tells apart goes to Muon.
    """
    if p.ndim < 2 or p.is_complex():
        return "other"
    role = (roles or {}).get(id(p)) or (name_role(name) if name is not None else None)
    return role or "muon"


def is_muon_param(p: Tensor, name: str | None = None) -> bool:
    """Whether the automatic split orthogonalizes ``p`` (:func:`param_role` without a model)."""
    return param_role(p, name) == "muon"


def _split_summary(names: list[str | None], roles: list[str]) -> str:
    """One line saying which parameters went where (names, or positions when there are none)."""
    label = [n if n is not None else f"#{i}" for i, n in enumerate(names)]
    listed = {r: [label[i] for i, x in enumerate(roles) if x == r] for r in ("muon", "embedding", "head", "other")}
    return (
        f"MuonScheduleFree: {len(listed['muon'])} matrices to Muon; to AdamW: embeddings {listed['embedding']}, "
        f"heads {listed['head']}, {len(listed['other'])} other parameters (ndim < 2)"
    )


def _outside_caller() -> int:
    """The ``stacklevel`` of the first frame outside sfoptim and ``torch.optim`` (the user's call)."""
    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.optim.__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


#: Entries of ``torch.cpu.get_capabilities()`` that report bfloat16 arithmetic
#: in hardware: x86's AVX512-BF16 and AMX-BF16, ARM's BF16 and SVE-BF16.
BF16_CPU_CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (not emulated).

    CPU: one of :data:`BF16_CPU_CAPABILITIES` is set in
    ``torch.cpu.get_capabilities()`` (False for a torch without it); CUDA:
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` for that
    device (compute capability 8.0 and up, or ROCm); any other device: False.
    """
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", None)
        if capabilities is None:
            return False
        found = capabilities()
        return any(bool(found.get(name, False)) for name in BF16_CPU_CAPABILITIES)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_ns_dtype(ns_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """The dtype Newton-Schulz runs in: ``"auto"`` is bfloat16 where the hardware has it, else float32.

    ``torch.optim.Muon`` always uses bfloat16. Where bfloat16 is emulated (a
    CPU without AVX512-BF16/AMX or ARM BF16, a GPU before compute capability
    8.0) its products are many times slower than float32's, so ``"auto"``
    takes float32 there (:func:`has_native_bf16`); other devices (MPS, XPU)
    get float32 as well.
    """
    if ns_dtype == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    return ns_dtype  # type: ignore[return-value]


def newton_schulz(
    g: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
    eps: float = NS_EPS, dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    r"""The approximate orthogonal factor of the matrix ``g`` (a new tensor in ``dtype``).

    ``steps`` iterations of :math:`X \leftarrow aX + (bA + cA^2)X`,
    :math:`A = XX^\top`, from :math:`X_0 = g / \max(\lVert g\rVert_F, \epsilon)`,
    on :math:`g^\top` when ``g`` has more rows than columns, with the same
    operations as ``torch.optim.Muon`` (which computes in bfloat16). ``dtype``
    None computes in ``g``'s dtype. Into a dtype of narrower exponent range
    than ``g``'s (float16 from float32), ``g`` is normalized before the cast,
    so that large or tiny entries neither overflow nor vanish. ``g`` is not changed.
    """
    a, b, c = coefficients
    target = g.dtype if dtype is None else dtype
    tall = g.size(0) > g.size(1)
    if _narrower_range(target, g.dtype):
        x = (g / g.norm().clamp(min=eps)).to(target)
        if tall:
            x = x.T
    else:
        x = g.to(target)
        if tall:
            x = x.T
        x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def _narrower_range(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether ``dtype`` has fewer exponent bits than ``than`` (bfloat16 has float32's)."""
    return math.frexp(torch.finfo(dtype).max)[1] < math.frexp(torch.finfo(than).max)[1]


def adjusted_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """``torch.optim.Muon``'s learning-rate factor for a ``rows x cols`` matrix."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r} (expected None, 'original' or 'match_rms_adamw')")


def adamw_lr_of(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """The learning rate of an AdamW group that does not set ``lr``: ``adamw_lr``, or ``lr`` when that is None."""
    adamw_lr = group.get("adamw_lr", defaults["adamw_lr"])
    return group.get("lr", defaults["lr"]) if adamw_lr is None else adamw_lr


def beta_horizon_of(group: Mapping[str, Any]) -> int | None:
    """:math:`T_0` of the group's rising interpolation weight: ``beta_horizon``, ``warmup_steps`` for ``"warmup"``."""
    horizon = group["beta_horizon"]
    return int(group["warmup_steps"]) if horizon == "warmup" else horizon


def varying_beta(group: dict, step: int) -> float:
    """The interpolation weight of the ``y`` built by the 1-based ``step`` (module docstring)."""
    beta, horizon = group["beta"], beta_horizon_of(group)
    s = step + 1  # that y is where the gradient of step s = step + 1 is taken
    if horizon is None or s <= horizon:
        return beta
    return 1 - ((horizon - 1) / (s - 1)) ** group["beta_power"] * (1 - beta)


def _orthogonalized(
    group: dict, whole: Tensor, v: Tensor | None, ns_dtype: torch.dtype | None, dtype: torch.dtype,
    scratch: Tensor | None = None,
) -> Tensor:
    """The direction of one whole matrix (module docstring), contiguous, in ``dtype``; updates NorMuon's ``v`` in place.

    ``ns_dtype`` is the resolved Newton-Schulz dtype (:func:`resolve_ns_dtype`)
    and ``dtype`` the parameter's.
    ``scratch``, a contiguous tensor of ``whole``'s shape in ``dtype`` that
    is free once the iterations have read ``whole``, may receive the result.
    A matrix without elements (``nn.Linear(4, 0)``) has the empty direction
    and leaves ``v`` as it is.
    """
    if whole.numel() == 0:
        return torch.zeros(whole.shape, dtype=dtype, device=whole.device)
    matrix = whole.reshape(whole.shape[0], math.prod(whole.shape[1:]))
    o = newton_schulz(matrix, group["ns_coefficients"], group["ns_steps"], group["ns_eps"], ns_dtype)
    if v is not None:
        o = _normuon(o.to(dtype), v, group["normuon_beta2"])
    # A tall matrix's result is a transposed view. The engine's passes read the direction beside the
    # contiguous y and z, many times slower across layouts, so it is laid out once here (a narrow
    # result transposed in its own dtype); NorMuon's sums, whose rounding depends on the layout, came first.
    if o.dtype != dtype or not o.is_contiguous():
        laid_out = o.contiguous() if o.dtype != dtype or scratch is None else o
        o = scratch.view(matrix.shape).copy_(laid_out) if scratch is not None else laid_out.to(dtype)
    o.mul_(adjusted_lr_ratio(group["adjust_lr_fn"], *matrix.shape))
    return o.view(whole.shape)


def orthogonalization_cost(shape: Size) -> int:
    r"""The work of orthogonalizing a matrix of ``shape``, up to a constant factor.

    A Newton-Schulz iteration on an ``m x n`` matrix with ``m <= n`` costs
    about :math:`2m^2n + m^3` multiply-adds, of the order of :math:`m \cdot mn`.
    """
    rows, cols = shape[0], math.prod(shape[1:])
    return min(rows, cols) * rows * cols


class MuonDirection(Direction):
    """Muon's orthogonalized momentum (module docstring); state ``momentum_buffer``, NorMuon's ``normuon_v``."""

    varying_beta = True

    def beta(self, group: dict, step: int) -> float:
        return varying_beta(group, step)

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        names: tuple[str, ...] = ("momentum_buffer",) if group["momentum"] > 0 else ()
        return (*names, "normuon_v") if group["normuon"] else names

    def new_buffer(self, group: dict, name: str, like: Tensor) -> Tensor:
        rows = Size((like.shape[0], 1))
        if name != "normuon_v" or like.shape == rows:
            return super().new_buffer(group, name, like)
        # One number per row, whole on every rank, also for a shard.
        return torch.zeros(rows, dtype=like.dtype, device=like.device)

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        """The directions of the bucket's matrices.

        The new momentum and NorMuon's ``v`` are formed beside the old ones and
        written into the state only once every direction has been computed, so
        a step that raises (a failed collective, memory) leaves them as they were.
        """
        mu = group["momentum"]
        grads = bucket.grads
        buf = bucket.buffers.get("momentum_buffer") if mu > 0 else None
        ns_dtype = resolve_ns_dtype(group["ns_dtype"], grads[0].device) if grads else None
        # The new momentum, beside the old; with Nesterov it is then mixed with the gradient, and it is
        # formed again in place at the end (same bits). Each direction is written over its temporary.
        moved = None if buf is None else list(torch._foreach_lerp(buf, grads, 1 - mu))
        nesterov = group["nesterov"]

        def update(i: int) -> Tensor:
            """What Newton-Schulz orthogonalizes for matrix ``i``; formed one matrix at a time."""
            if moved is None:
                return grads[i]
            m = moved[i]
            if not nesterov:
                return m
            # Over the new momentum's temporary: a new tensor for the mix (or one in the Newton-Schulz
            # dtype, which torch forms through a full-width temporary) costs more.
            return torch.lerp(grads[i], m, mu, out=m) if type(m) is Tensor else torch.lerp(grads[i], m, mu)

        def scratch(i: int) -> Tensor | None:
            """The full-width temporary of matrix ``i`` that its direction may be written into."""
            m = None if moved is None else moved[i]
            return m if type(m) is Tensor and m.is_contiguous() else None

        vs = bucket.buffers.get("normuon_v")
        new_vs = None if vs is None else [v.clone() for v in vs]
        # FSDP2's row shards: each matrix orthogonalized whole on one rank. Under NorMuon a
        # single-column matrix's v has the parameter's shape, so it is sharded too: gathered below.
        split = row_sharded(grads, vs) if any(type(g) is not Tensor for g in grads) else []
        shared: dict[int, Tensor] = {}
        if split:
            split_vs = None if new_vs is None else [new_vs[i] for i in split]
            directions = compute_on_owners(
                [update(i) for i in split],
                lambda j, whole: _orthogonalized(
                    group, whole, None if split_vs is None else split_vs[j], ns_dtype, whole.dtype
                ),
                orthogonalization_cost,
                split_vs,
            )
            shared = dict(zip(split, directions))
        out = []
        for i, g in enumerate(grads):
            if i in shared:
                out.append(shared[i])
                continue
            u = update(i)
            sharded = type(u) is not Tensor and hasattr(u, "full_tensor")
            whole = u.full_tensor() if sharded else u  # type: ignore[attr-defined]
            v = None if new_vs is None else new_vs[i]
            # A single-column matrix's v has the parameter's shape, so it is sharded like the parameter.
            v_sharded = v is not None and type(v) is not Tensor and hasattr(v, "full_tensor")
            v_whole = v.full_tensor() if v_sharded else v  # type: ignore[union-attr]
            dtype = g.dtype if moved is None else moved[i].dtype
            d = _orthogonalized(group, whole, v_whole, ns_dtype, dtype, None if sharded else scratch(i))
            if v_sharded:
                new_vs[i] = shard_like(v_whole, v)  # type: ignore[index, arg-type]
            out.append(shard_like(d, u) if sharded else d)
        if buf is not None:
            torch._foreach_lerp_(buf, grads, 1 - mu)
        for v, new_v in zip(vs or (), new_vs or ()):
            v.copy_(new_v)
        return out, True


def _normuon(o: Tensor, v: Tensor, beta2: float) -> Tensor:
    """NorMuon's per-row normalization of ``o``, keeping its Frobenius norm; updates ``v`` in place."""
    norm = o.norm()
    v.lerp_(o.square().mean(dim=1, keepdim=True), 1 - beta2)
    o = o / (v.sqrt() + _NORMUON_EPS)
    return o.mul_(norm / (o.norm() + _NORMUON_EPS))


class AdamWPart(Direction):
    """Schedule-free AdamW's direction for the parameters Muon does not take; state ``exp_avg_sq``."""

    varying_beta = True

    def beta(self, group: dict, step: int) -> float:
        return varying_beta(group, step)

    def state_buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg_sq",)

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]:
        d = adam_direction(
            bucket.grads, bucket.buffers["exp_avg_sq"], step=step, beta2=group["adamw_beta2"], eps=group["adamw_eps"]
        )
        return d, True

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None:
        beta2 = group["adamw_beta2"]
        return KernelSpec(Kind.ADAM, ("exp_avg_sq",), {"beta2": beta2, "bc2": 1 - beta2**step, "eps": group["adamw_eps"]})


@with_backend_args
class MuonScheduleFree(ScheduleFreeOptimizer):
    r"""Schedule-free Muon: Muon's orthogonalized direction on matrices, AdamW's on the rest.

    See :mod:`sfoptim.directions.muon` for the math. Each parameter group is
    either a Muon group or an AdamW group (``use_muon`` in the group). A group
    without ``use_muon`` is split in two when it is added
    (:func:`param_role`): the real matrices (``ndim >= 2``) that are neither
    an embedding nor an output head form a Muon group with learning rate
    ``lr``; the others an AdamW group with learning rate ``adamw_lr`` (by
    default ``lr`` too). Embeddings and heads are told by module type when the model itself is
    passed (``nn.Embedding`` weights, the last ``nn.Linear`` named as a head)
    and by name when the parameters carry names
    (``model.named_parameters()``); bare parameters leave only the shape, so
    every matrix goes to Muon and a ``UserWarning`` says so. One log record
    (logger ``sfoptim.directions.muon``, level INFO) names the split. Set
    ``use_muon=True`` or ``False`` in a group to choose yourself; an AdamW
    group without its own ``lr`` takes ``adamw_lr`` (or ``lr``). Convolution kernels are
    orthogonalized as ``shape[0] x (the rest)`` matrices.

    Args:
        params: the model (``nn.Module``), parameters, named parameters or
            parameter groups.
        lr: learning rate of every group, Muon's and AdamW's (default 0.032).
        beta: interpolation weight :math:`\beta \in (0, 1]` (default 0.9).
        momentum: Muon's momentum :math:`\mu \in [0, 1)` (default 0.95;
            0 keeps no buffer).
        nesterov: Nesterov-style momentum, as ``torch.optim.Muon`` (default True).
        weight_decay: :math:`\lambda` (default 0.1, as ``torch.optim.Muon``).
        decay_at: ``"z"`` (default) or ``"y"``: the point the decay is taken at.
        warmup_steps: linear warmup length in steps (default 20).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the maximal learning rate in the averaging
            weights (default 2).
        ns_coefficients: Newton-Schulz coefficients (default torch's).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_eps: floor of the norm the input is divided by (default 1e-7).
        ns_dtype: dtype of the Newton-Schulz iterations: ``"auto"`` (default)
            is bfloat16, as ``torch.optim.Muon`` always uses, where the
            hardware multiplies it natively (:func:`has_native_bf16`: a CPU
            with AVX512-BF16, AMX or ARM BF16, a CUDA GPU of compute
            capability 8.0 or more), and float32 elsewhere (emulated bfloat16
            is many times slower), where the steps differ slightly from
            torch's; None: the parameter's dtype.
        adjust_lr_fn: ``"match_rms_adamw"`` (default) or ``None``/``"original"``,
            as ``torch.optim.Muon``'s.
        normuon: NorMuon's per-row normalization (default False).
        normuon_beta2: its second-moment decay in [0, 1) (default 0.95).
        beta_horizon: :math:`T_0 \ge 1`, after which the interpolation weight
            rises towards 1 (AMUSE); ``"warmup"``: :math:`T_0` =
            ``warmup_steps`` (then at least 1), AMUSE's choice; None (default)
            keeps ``beta``.
        beta_power: :math:`\rho \ge 0` of that rise (default 1).
        adamw_lr: learning rate of the AdamW groups that set none (default
            None: ``lr``).
        adamw_beta2: AdamW's second-moment decay (default 0.999).
        adamw_eps: AdamW's epsilon (default 1e-8).
        {backend_args}

    The Muon groups have no fused kernel (their direction runs foreach); the
    AdamW groups use the fused CPU kernel where it runs.

    Under FSDP2 (parameters sharded by rows over a one-dimensional mesh) each
    matrix is orthogonalized by one rank, its owner: the matrices of a group
    are dealt out by decreasing size, each to the rank with the least work so
    far, so with ``N`` ranks each does about ``1/N`` of the Newton-Schulz
    work. Per group and step that costs two ``all_to_all`` exchanges: the
    rows of each matrix go to its owner, and the rows of the result (with
    NorMuon also its per-row second moment, one number per row, which every
    rank keeps whole) come back. For matrices of ``M`` elements in all, a
    rank sends and receives about ``2 (M/N) (N-1)/N`` elements, against the
    ``M (N-1)/N`` an all-gather of every matrix would receive. Each matrix
    is orthogonalized whole, as by a single process. The balance is
    per group: a group holding a single matrix always gives it to the first
    rank, so keep the matrices together in few groups. Other layouts
    (several mesh dimensions, sharding along another dimension) are gathered
    whole on every rank, and every rank orthogonalizes them.

    Defaults: one learning rate for both parts. ``"match_rms_adamw"`` scales
    the orthogonalized update to an entry RMS of :math:`0.2\,\gamma`, about
    that of an AdamW update, so the matrices and the AdamW part take the same
    ``lr`` (as Moonlight and ``torch.optim.Muon`` with that option). 0.032 did
    best, with 0.064, on the ConvNet and MLP tasks of ``docs/results.md``
    (0.016 and 0.128 worse); ``torch.optim.Muon`` defaults to 1e-3 for scheduled training of large
    models, and since with this adjustment the update RMS does not shrink with the width, wide
    models usually want a smaller ``lr``. Weight decay 0.1 at ``z`` and a
    20-step warmup: schedule-free spectral training (Apte et al., 2026) and
    AMUSE (Kim et al., 2026) find both essential on long runs.
    Plain Muon's published form (Jordan et al.) is ``lr=0.02,
    adjust_lr_fn="original", weight_decay=0, warmup_steps=0`` with its own
    ``adamw_lr``; schedule-free NorMuon (Apte et al.) is ``normuon=True`` on
    top of the defaults.

    Example::

        opt = sfoptim.MuonScheduleFree(model)   # the model: embeddings and head told by type
        opt.train(); model.train()
        ...
        opt.eval(); model.eval()
    """

    _muon_direction = MuonDirection()
    _adamw_direction = AdamWPart()
    direction = _muon_direction

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        lr: float | Tensor = 0.032,
        beta: float = 0.9,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        decay_at: str = "z",
        warmup_steps: int = 20,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = NS_STEPS,
        ns_eps: float = NS_EPS,
        ns_dtype: torch.dtype | str | None = "auto",
        adjust_lr_fn: str | None = "match_rms_adamw",
        normuon: bool = False,
        normuon_beta2: float = 0.95,
        beta_horizon: int | str | None = None,
        beta_power: float = 1.0,
        adamw_lr: float | None = None,
        adamw_beta2: float = 0.999,
        adamw_eps: float = 1e-8,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, beta=beta, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, decay_at=decay_at,
            warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, ns_coefficients=ns_coefficients,
            ns_steps=ns_steps, ns_eps=ns_eps, ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn, normuon=normuon,
            normuon_beta2=normuon_beta2, beta_horizon=beta_horizon, beta_power=beta_power, adamw_lr=adamw_lr,
            adamw_beta2=adamw_beta2, adamw_eps=adamw_eps, use_muon=None, foreach=foreach, fused=fused,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
        )  # fmt: skip
        if isinstance(params, nn.Module):
            self._module_roles = module_roles(params)
            params = list(params.named_parameters())
        super().__init__(params, defaults)

    def direction_for(self, group: dict) -> Direction:
        return self._muon_direction if group["use_muon"] else self._adamw_direction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; one without ``use_muon`` becomes a Muon group and an AdamW group (class docstring)."""
        use_muon = param_group.get("use_muon")
        if use_muon is not None:
            if not isinstance(use_muon, bool):
                raise ValueError(f"Invalid use_muon: {use_muon!r} (expected True, False or None)")
            group = dict(param_group)
            if not use_muon and "lr" not in group:
                group["lr"] = adamw_lr_of(group, self.defaults)
            super().add_param_group(group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        names = param_group.get("param_names")
        if params and isinstance(params[0], tuple):
            names, params = [n for n, _ in params], [p for _, p in params]
        module_roles = getattr(self, "_module_roles", None)
        roles = [param_role(p, names[i] if names else None, module_roles) for i, p in enumerate(params)]
        parts: dict[bool, list[int]] = {True: [], False: []}
        for i, role in enumerate(roles):
            parts[role == "muon"].append(i)
        if not names and parts[True]:
            warnings.warn(
                f"MuonScheduleFree: {len(parts[True])} matrices without names go to Muon, embeddings and output "
                "heads among them if any; pass the model itself or model.named_parameters() to keep those with "
                "AdamW, or set use_muon in the param groups",
                UserWarning,
                stacklevel=_outside_caller(),
            )
        _log.info(_split_summary(list(names) if names else [None] * len(params), roles))
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        for muon in (True, False):
            if not parts[muon] and (parts[not muon] or not muon):
                continue
            group = dict(rest, use_muon=muon, params=[params[i] for i in parts[muon]])
            if names:
                group["param_names"] = [names[i] for i in parts[muon]]
            if not muon:
                group["lr"] = adamw_lr_of(rest, self.defaults)
            super().add_param_group(group)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validation.check_interpolation("beta", group["beta"])
        _validation.check_in_range("momentum", group["momentum"], 0.0, 1.0, low_open=False, high_open=True)
        _validation.check_warmup_steps(group["warmup_steps"])
        if group["decay_at"] not in ("z", "y"):
            raise ValueError(f"Invalid decay_at: {group['decay_at']!r} (expected 'z' or 'y')")
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"Invalid nesterov: {group['nesterov']!r} (expected True or False)")
        if not isinstance(group["normuon"], bool):
            raise ValueError(f"Invalid normuon: {group['normuon']!r} (expected True or False)")
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r} (expected three numbers (a, b, c))")
        for value in coefficients:
            _validation.check_in_range("ns_coefficients", value, -math.inf, math.inf, low_open=True, high_open=True)
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"Invalid ns_steps: {steps!r} (expected a whole number in [1, 100))")
        _validation.check_nonnegative("ns_eps", group["ns_eps"])
        ns_dtype = group["ns_dtype"]
        if ns_dtype is not None and ns_dtype != "auto" and not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
            raise ValueError(f"Invalid ns_dtype: {ns_dtype!r} (expected \"auto\", a floating-point torch.dtype or None)")
        adjusted_lr_ratio(group["adjust_lr_fn"], 1, 1)
        _validation.check_in_range("normuon_beta2", group["normuon_beta2"], 0.0, 1.0, low_open=False, high_open=True)
        horizon = group["beta_horizon"]
        if horizon == "warmup":
            if group["warmup_steps"] < 1:
                raise ValueError(
                    f"Invalid beta_horizon: 'warmup' with warmup_steps={group['warmup_steps']!r} "
                    "(the rise starts after warmup_steps >= 1; give beta_horizon as a number of steps)"
                )
        elif isinstance(horizon, str):
            raise ValueError(f"Invalid beta_horizon: {horizon!r} (expected None, 'warmup' or a whole number >= 1)")
        elif horizon is not None:
            _validation.check_steps("beta_horizon", horizon, 1)
        _validation.check_nonnegative("beta_power", group["beta_power"])
        if group["adamw_lr"] is not None:
            _validation.check_nonnegative("adamw_lr", group["adamw_lr"])
        _validation.check_in_range("adamw_beta2", group["adamw_beta2"], 0.0, 1.0, low_open=False, high_open=True)
        _validation.check_nonnegative("adamw_eps", group["adamw_eps"])
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                if p.ndim < 2 or p.is_complex():
                    raise ValueError(
                        f"Invalid use_muon: True for param {i} of shape {tuple(p.shape)} and dtype {p.dtype}; "
                        "Muon orthogonalizes real matrices (ndim >= 2): put it in a group with use_muon=False"
                    )
