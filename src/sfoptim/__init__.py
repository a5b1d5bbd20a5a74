"""sfoptim: schedule-free optimizers for PyTorch.

Drop-in replacements for the published ``schedulefree`` package (same class
names, arguments and defaults) built on one engine (:mod:`sfoptim.engine`);
each algorithm contributes only its base direction (:mod:`sfoptim.directions`),
and :mod:`sfoptim.backends` runs the update.
"""

from .batchnorm import recalibrate_batchnorm
from .directions.adamc_plus import AdamCScheduleFreePlus, AdamCScheduleFreePlusClosure, AdamCScheduleFreePlusPaper
from .directions.adamw import AdamWScheduleFree, AdamWScheduleFreeClosure, AdamWScheduleFreePaper
from .directions.muon import MuonScheduleFree
from .directions.prodigy import ProdigyScheduleFree, ProdigyScheduleFreeClosure
from .directions.radam import RAdamScheduleFree, RAdamScheduleFreeClosure
from .directions.sgd import SGDScheduleFree, SGDScheduleFreeClosure
from .directions.wrapper import ScheduleFreeWrapper
from .engine import ModeError, ScheduleFreeOptimizer
from .modes import TiedMode, averaged_state_dict, eval_mode, eval_optimizer_state_dict, tie_mode, unwrap_optimizer
from .reference import (
    AdamCScheduleFreePlusReference,
    AdamWScheduleFreeReference,
    MuonScheduleFreeReference,
    ProdigyScheduleFreeReference,
    RAdamScheduleFreeReference,
    ScheduleFreeWrapperReference,
    SGDScheduleFreeReference,
)

__version__ = "0.1.0"

__all__ = [
    "AdamCScheduleFreePlus",
    "AdamCScheduleFreePlusClosure",
    "AdamCScheduleFreePlusPaper",
    "AdamCScheduleFreePlusReference",
    "AdamWScheduleFree",
    "AdamWScheduleFreeClosure",
    "AdamWScheduleFreePaper",
    "AdamWScheduleFreeReference",
    "ModeError",
    "MuonScheduleFree",
    "MuonScheduleFreeReference",
    "ProdigyScheduleFree",
    "ProdigyScheduleFreeClosure",
    "ProdigyScheduleFreeReference",
    "RAdamScheduleFree",
    "RAdamScheduleFreeClosure",
    "RAdamScheduleFreeReference",
    "SGDScheduleFree",
    "SGDScheduleFreeClosure",
    "SGDScheduleFreeReference",
    "ScheduleFreeOptimizer",
    "ScheduleFreeWrapper",
    "ScheduleFreeWrapperReference",
    "TiedMode",
    "averaged_state_dict",
    "eval_mode",
    "eval_optimizer_state_dict",
    "recalibrate_batchnorm",
    "tie_mode",
    "unwrap_optimizer",
]
