"""Backends of the schedule-free update: :mod:`.dispatch` picks one of
:mod:`.foreach` (and its per-tensor form), :mod:`.cpu_kernel` (a C kernel
built on first use) and :mod:`.compiled` (``torch.compile``, for GPUs)."""
