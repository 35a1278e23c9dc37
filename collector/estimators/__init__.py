"""The estimators of DESIGN section 4, streaming over sliding windows per EP group."""

from collector.estimators.config import EstimatorConfig
from collector.estimators.group import GroupEstimator
from collector.estimators.report import GroupReport, PhaseReport, StragglerReport, SuspectLink

__all__ = [
    "EstimatorConfig",
    "GroupEstimator",
    "GroupReport",
    "PhaseReport",
    "StragglerReport",
    "SuspectLink",
]
