"""Evaluation: one ``evaluate(EvalConfig)`` for every kind of model (its head found through the
backend registry), one ``EvalReport``; benchmark tasks (LAMBADA, ARC, CBT) in ``tasks.runner``."""
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import evaluate
from arfuse.tasks.report import EvalReport

__all__ = ["EvalConfig", "EvalReport", "evaluate"]
