"""Scores of the TARTAN end tasks: micro-F1 for ChemProt, macro-F1 for the others (as the paper and
dont-stop-pretraining report them), with scikit-learn's definitions (macro: mean over the classes in the labels or
the predictions)."""

from __future__ import annotations

from typing import Any

import numpy as np


__all__ = ["TASKS", "classification_scores", "compute_metrics", "task_metric"]

TASKS = ("chemprot", "citation_intent", "hyperpartisan_news", "sciie")
MICRO_F1_TASKS = ("chemprot",)


def task_metric(task: str) -> str:
    """The metric a task is reported with: ``"micro_f1"`` for ChemProt, ``"macro_f1"`` otherwise."""
    return "micro_f1" if task in MICRO_F1_TASKS else "macro_f1"


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """micro-F1, macro-F1 and accuracy of the argmax predictions of ``logits`` [N, C] against ``labels`` [N]."""
    preds, labels = np.asarray(logits).argmax(-1), np.asarray(labels)
    per_class = []
    for c in np.union1d(labels, preds):
        tp = int(np.sum((preds == c) & (labels == c)))
        wrong = int(np.sum((preds == c) != (labels == c)))  # false positives + false negatives
        per_class.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    accuracy = float(np.mean(preds == labels)) if len(labels) else 0.0
    # single-label classification: micro-F1 = accuracy
    return {"micro_f1": accuracy, "macro_f1": float(np.mean(per_class)) if per_class else 0.0, "accuracy": accuracy}


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer(compute_metrics=...)``: :func:`classification_scores` of an ``EvalPrediction``."""
    return classification_scores(eval_pred.predictions, eval_pred.label_ids)
