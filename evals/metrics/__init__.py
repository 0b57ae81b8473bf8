"""Metrics as local `evaluate` modules (one folder each), loaded by path: no hub at run time.

``compute(name, predictions, references=..., passages=...)`` returns per-example scores.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
METRICS = ("rouge_l", "bleu", "chrf", "token_f1", "exact_match", "semantic_similarity", "answer_length", "groundedness")
DEFAULT_METRICS = ("rouge_l", "token_f1", "exact_match", "chrf", "semantic_similarity", "answer_length", "groundedness")
RAG_ONLY = ("groundedness",)
_LOADED: dict = {}


def load(name: str):
    import evaluate
    from sft_core import StudioError
    if name not in METRICS:
        raise StudioError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}", "metrics")
    if name not in _LOADED:
        _LOADED[name] = evaluate.load(str(HERE / name))
    return _LOADED[name]


def compute(name: str, predictions: list[str], references: list[str] | None = None,
            passages: list[str] | None = None) -> list[float]:
    if not predictions:
        return []
    second = {"passages": passages} if name == "groundedness" else {"references": references}
    return list(load(name).compute(predictions=predictions, **second)["scores"])
