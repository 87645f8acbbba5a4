"""Evaluation of trained checkpoints: validation LM loss and scored greedy answers
(``tools/evaluate.py``; the engine is :func:`megatron_croc.evaluation.engine.evaluate`)."""

from megatron_croc.evaluation.engine import EvalConfig, EvalError, EvalResult, evaluate

__all__ = ["EvalConfig", "EvalError", "EvalResult", "evaluate"]
