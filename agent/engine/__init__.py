"""ML health computation: pure numpy, no I/O, clock passed in."""

from agent.engine.columns import OutcomeColumns, PredictionColumns
from agent.engine.engine import Engine, ModelLimitError
from agent.engine.histogram import Exemplar, FixedHistogram
from agent.engine.model import ModelConfig, ModelSnapshot, ModelState

__all__ = [
    "Engine",
    "Exemplar",
    "FixedHistogram",
    "ModelConfig",
    "ModelLimitError",
    "ModelSnapshot",
    "ModelState",
    "OutcomeColumns",
    "PredictionColumns",
]
