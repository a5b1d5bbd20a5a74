"""Base directions: the contract (:mod:`.base`) and one module per algorithm.

Each algorithm module holds its :class:`~.base.Direction` and the thin public
classes that declare it (constructor and validation only).
"""

from .base import Bucket, BucketSum, DelegatedDirection, Direction, KernelSpec, Kind

__all__ = ["Bucket", "BucketSum", "DelegatedDirection", "Direction", "KernelSpec", "Kind"]
