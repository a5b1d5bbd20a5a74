"""The schedule-free machinery, once: the optimizer base class (:mod:`.optimizer`),
the averaging schedule as pure functions (:mod:`.schedule`) and the one step
skeleton (:mod:`.step`)."""

from .optimizer import ClosureForm, ModeError, ScheduleFreeOptimizer, with_backend_args

__all__ = ["ClosureForm", "ModeError", "ScheduleFreeOptimizer", "with_backend_args"]
