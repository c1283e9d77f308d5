"""Scores of the TARTAN end tasks: micro-F1 for ChemProt, macro-F1 for the others (as the paper and
dont-stop-pretraining report them), computed with scikit-learn so they need no download."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


__all__ = ["TASKS", "classification_scores", "compute_metrics", "task_metric"]

TASKS = ("chemprot", "citation_intent", "hyperpartisan_news", "sciie")
MICRO_F1_TASKS = ("chemprot",)


def task_metric(task: str) -> str:
    """The metric a task is reported with: ``"micro_f1"`` for ChemProt, ``"macro_f1"`` otherwise."""
    return "micro_f1" if task in MICRO_F1_TASKS else "macro_f1"


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """micro-F1, macro-F1 and accuracy of the argmax predictions of ``logits`` [N, C] against ``labels`` [N]."""
    preds = np.asarray(logits).argmax(-1)
    return {
        "micro_f1": float(f1_score(labels, preds, average="micro")),
        "macro_f1": float(f1_score(labels, preds, average="macro")),
        "accuracy": float(accuracy_score(labels, preds)),
    }


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer(compute_metrics=...)``: :func:`classification_scores` of an ``EvalPrediction``."""
    return classification_scores(eval_pred.predictions, eval_pred.label_ids)
