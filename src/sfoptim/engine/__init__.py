"""The schedule-free machinery, once: the optimizer base class (:mod:`.optimizer`),
the averaging schedule as pure functions (:mod:`.schedule`), the one step
skeleton (:mod:`.step`) and the contract a base direction fills in
(:mod:`.direction`)."""

from .optimizer import ClosureForm, ModeError, ScheduleFreeOptimizer, with_backend_args

__all__ = ["ClosureForm", "ModeError", "ScheduleFreeOptimizer", "with_backend_args"]
