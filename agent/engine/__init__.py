"""ML health computation: pure numpy, no I/O, clock passed in."""

from agent.engine.columns import OutcomeColumns, PredictionColumns
from agent.engine.drift import DriftBaseline, DriftResult, dataset_drift
from agent.engine.engine import Engine, ModelLimitError
from agent.engine.health import HealthAssessment, HealthPolicy, score_health
from agent.engine.histogram import Exemplar, FixedHistogram
from agent.engine.model import ModelConfig, ModelSnapshot, ModelState
from agent.engine.monitor import ModelMonitor, MonitorConfig
from agent.engine.performance import JoinedPairs, PerformanceTally
from agent.engine.reference import ReferenceBuilder, ReferenceProfile

__all__ = [
    "DriftBaseline",
    "DriftResult",
    "Engine",
    "Exemplar",
    "FixedHistogram",
    "HealthAssessment",
    "HealthPolicy",
    "JoinedPairs",
    "ModelConfig",
    "ModelLimitError",
    "ModelMonitor",
    "ModelSnapshot",
    "ModelState",
    "MonitorConfig",
    "OutcomeColumns",
    "PerformanceTally",
    "PredictionColumns",
    "ReferenceBuilder",
    "ReferenceProfile",
    "dataset_drift",
    "score_health",
]
