r"""The kernel ABI: what a backend needs to know about a bucket and a kernel call.

Everything the backends and the C kernel agree on is declared here once:
the tensors of a :class:`Bucket`, the kernel families (:class:`Kind`) with
their buffer slots, the order of the scalars every kernel call receives
(:data:`KERNEL_SCALARS`), the generic sums one pass can take
(:class:`BucketSum`) and what they read besides the gradients
(:class:`SumInputs`), a direction's :class:`KernelSpec`, and the version of
the C entry points (:data:`ABI_VERSION`). The C source receives all of them as
preprocessor definitions at build time (:mod:`sfoptim.backends.cpu_kernel`)
and restates none. Directions import them from here; this module imports
nothing from sfoptim.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from torch import Tensor

__all__ = [
    "ABI_VERSION", "BUFFER_SUMS", "KERNEL_SCALARS", "KIND_SLOTS", "Bucket", "BucketSum", "DirectionHooks", "KernelSpec",
    "Kind", "SumInputs",
]  # fmt: skip

#: The version of the C kernel's entry points (``sf_abi_version``); a cached
#: library that reports another is not used.
ABI_VERSION = 6


class Bucket(NamedTuple):
    """Tensors of one device and dtype that one backend call updates together.

    ``params`` hold ``y`` (or its wide master), ``grads`` the gradients at
    ``y`` (never to be written), ``z`` the base iterates, ``buffers`` the
    direction's own state by the names it declared.
    """

    params: list[Tensor]
    grads: list[Tensor]
    z: list[Tensor]
    buffers: dict[str, list[Tensor]]


class Kind(enum.IntEnum):
    r"""The direction families the one-pass kernels implement.

    * ``SGD``: :math:`d = g`.
    * ``ADAM``: :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
      :math:`d = \hat m / (\sqrt{v / bc_2} + \epsilon)` with :math:`\hat m = g`,
      or with a second slot :math:`m \leftarrow \operatorname{lerp}(m, g, 1-\mu)`,
      :math:`\hat m = m / bc_1`.
    * ``SGD_V``: :math:`d = g` while :math:`v` is updated as for ``ADAM``
      (RAdam's phase before the rectifier exists).
    * ``PRODIGY``: Prodigy's direction, slots ``v`` and ``s`` (their dtype
      may differ from the parameter's):
      :math:`v \leftarrow \beta_2 v + (1-\beta_2) d^2 g^2`,
      :math:`s \leftarrow \rho s + a g`,
      :math:`u = d' g / (\sqrt v + d'\epsilon)`, divided by
      :math:`\max(1, \mathrm{RMS}(u)/c)` over each tensor when ``clip`` =
      :math:`c > 0` (a read of ``g`` and ``v`` before the step, in the same
      call).
    """

    SGD = 0
    ADAM = 1
    SGD_V = 2
    PRODIGY = 3


#: The buffer slots each family reads and writes, as (fewest, most).
KIND_SLOTS: dict[Kind, tuple[int, int]] = {Kind.SGD: (0, 0), Kind.ADAM: (1, 2), Kind.SGD_V: (1, 1), Kind.PRODIGY: (2, 2)}

#: The scalars every kernel call and every bucket-sums call receive, in slot
#: order. The engine fills ``lr``, ``ckp1``, ``beta`` and the weight decay:
#: ``wd``, taken at ``y`` (:math:`d + \lambda y`), or, for a group that decays
#: at ``z``, ``wdz`` (:math:`d + \lambda z`; when nonzero the kernels take it
#: in place of ``wd``; the low-bit step has no decay at ``z``); a
#: :class:`KernelSpec` or :class:`SumInputs` the others (unset ones are 0,
#: except the bias corrections, which are 1). Prodigy's: ``d`` (the estimate
#: :math:`v` is accumulated with), ``d_new`` (:math:`d'`, the one the
#: direction is scaled by), ``accum`` (:math:`a = d^2\gamma`), ``rho``
#: (:math:`\sqrt{\beta_2}`) and ``clip`` (:math:`c`; 0: no clipping).
KERNEL_SCALARS: tuple[str, ...] = (
    "lr", "ckp1", "beta", "wd", "beta2", "bc2", "eps", "mu", "bc1", "d", "d_new", "accum", "rho", "clip", "wdz",
)  # fmt: skip


class BucketSum(enum.IntEnum):
    r"""Sums over every element of a bucket that a backend can take in one fused pass.

    The CPU kernel computes the ones asked for in one read of the tensors,
    accumulating in float64 in an order fixed by the data (not by the thread
    count); the values are the slots of its output.

    * ``GRAD_L1``: :math:`\sum |g|`.
    * ``GRAD_Z_MINUS_Y``: :math:`\sum g\,(z - y)`, i.e. :math:`\langle g, z - y\rangle`.
    * ``GRAD_P0_MINUS_Z``: :math:`\sum g\,(p_0 - z)`, :math:`p_0` the first
      buffer of :class:`SumInputs`.
    * ``DECAYED_L1``: :math:`\sum |\rho s + a g|`, :math:`s` the second
      buffer, with the scalars ``rho`` and ``accum``.

    The last two (:data:`BUFFER_SUMS`) read the direction's buffers, whose
    dtype may differ from the parameter's, and are taken together; a call
    asks for sums of one of the two sets.
    """

    GRAD_L1 = 0
    GRAD_Z_MINUS_Y = 1
    GRAD_P0_MINUS_Z = 2
    DECAYED_L1 = 3


#: The bucket sums that read a direction's buffers (Prodigy's), taken in one pass over ``g``, ``z``, ``p0``, ``s``.
BUFFER_SUMS = frozenset({BucketSum.GRAD_P0_MINUS_Z, BucketSum.DECAYED_L1})


class SumInputs(NamedTuple):
    """What a direction's bucket sums read besides ``g``, ``z`` and ``y``, for one step.

    Attributes:
        buffers: the direction's state buffers in the sums' slots, in order
            (for :data:`BUFFER_SUMS`: ``p0``, then ``s``).
        scalars: values of entries of :data:`KERNEL_SCALARS` (for
            :data:`BUFFER_SUMS`: ``rho`` and ``accum``).
    """

    buffers: tuple[str, ...] = ()
    scalars: Mapping[str, float] = {}


class KernelSpec(NamedTuple):
    r"""A direction's description of its one-pass kernel for one step.

    Attributes:
        kind: the kernel family.
        buffers: the direction's state buffers that fill the kernel's slots, in
            order: the second moment ``v``, then the first moment ``m`` (a
            family that needs fewer slots gets a shorter tuple).
        scalars: values of the family's entries of :data:`KERNEL_SCALARS`.
        state_precision: ``"full"`` (the buffers and ``z`` in the parameter's
            dtype), or the low-bit formats of :mod:`sfoptim.backends.lowbit`
            (``ADAM``/``SGD_V`` without ``m``): ``"bf16"`` (buffers: ``v`` in
            bfloat16) or ``"8bit"`` (buffers: the codes of :math:`\sqrt v`, then
            their block exponents); ``z`` is bfloat16 in both.
    """

    kind: Kind
    buffers: tuple[str, ...] = ()
    scalars: Mapping[str, float] = {}
    state_precision: str = "full"


class DirectionHooks(Protocol):
    """What the backends call on a direction (:class:`sfoptim.engine.direction.Direction` has them all)."""

    @property
    def bucket_sums(self) -> Sequence[BucketSum]: ...

    def foreach(self, group: dict, step: int, bucket: Bucket, reduced: Mapping[str, Tensor]) -> tuple[list[Tensor], bool]: ...

    def kernel(self, group: dict, step: int, reduced: Mapping[str, Tensor]) -> KernelSpec | None: ...

    def reduce(self, group: dict, step: int, bucket: Bucket, beta: float) -> dict[str, Tensor]: ...

    def reduce_sums(self, group: dict, step: int, beta: float, sums: Mapping[BucketSum, Tensor]) -> dict[str, Tensor]: ...

    def sum_inputs(self, group: dict, step: int) -> SumInputs: ...


def build_defines() -> tuple[str, ...]:
    """The C preprocessor definitions that carry this ABI into ``cpu_kernel.c``."""
    return (
        (f"-DSF_ABI_VERSION={ABI_VERSION}",)
        + tuple(f"-DSF_{kind.name}={kind.value}" for kind in Kind)
        + tuple(f"-DSF_{name.upper()}={slot}" for slot, name in enumerate(KERNEL_SCALARS))
        + tuple(f"-DSF_SUM_{s.name}={s.value}" for s in BucketSum)
    )
