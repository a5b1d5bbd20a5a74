"""The direction contract, for direction modules: :mod:`sfoptim.engine.direction` defines it.

It lives in the engine, which composes directions and knows nothing of any
algorithm; every module of :mod:`sfoptim.directions` builds on it.
"""

from ..backends.abi import KERNEL_SCALARS, KIND_SLOTS, Bucket, BucketSum, KernelSpec, Kind, SumInputs
from ..engine.direction import DelegatedDirection, Direction, group_reduction, warmup_lr

__all__ = [
    "KERNEL_SCALARS", "KIND_SLOTS", "Bucket", "BucketSum", "DelegatedDirection", "Direction", "KernelSpec", "Kind",
    "SumInputs", "group_reduction", "warmup_lr",
]
