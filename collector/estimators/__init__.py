"""The estimators of docs/design.md §4, streaming over sliding windows per EP group."""

from epwatch.collector.estimators.config import EstimatorConfig
from epwatch.collector.estimators.group import GroupEstimator
from epwatch.collector.estimators.report import (
    GroupReport,
    PhaseReport,
    StragglerReport,
    SuspectLink,
)

__all__ = [
    "EstimatorConfig",
    "GroupEstimator",
    "GroupReport",
    "PhaseReport",
    "StragglerReport",
    "SuspectLink",
]
