"""Diagnostics of learned weights and corrected labels, for data whose true labels are known.

With gold labels for the training set (kept aside, never used for training), these say how well the meta network
found the wrong labels: the noise AUROC of the weights (a low weight should flag a wrong label), overall and within
each given class (a weighting net fed the loss alone can learn per-class weights, which the overall AUROC mixes in),
the mean weight per given class (a silenced class shows here), and for label correction how many labels it changed,
how accurate the corrected labels are, and whether it relabelled a whole class.
"""

from __future__ import annotations

from typing import Any

import numpy as np


__all__ = ["auroc", "weight_diagnostics", "whole_class_relabels", "within_class_auroc"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties getting the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (Mann–Whitney U; ties count half).

    None when every row is positive or none is.
    """
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def within_class_auroc(positive: np.ndarray, score: np.ndarray, classes: np.ndarray) -> float | None:
    """AUROC of ``score`` for ``positive`` within each class, averaged with the class sizes as weights.

    Classes whose rows are all positive or all negative are left out; None if no class has both.
    """
    positive, score, classes = np.asarray(positive, dtype=bool), np.asarray(score), np.asarray(classes)
    parts = [
        (int(mask.sum()), value)
        for c in np.unique(classes)
        if (value := auroc(positive[mask := classes == c], score[mask])) is not None
    ]
    if not parts:
        return None
    return float(sum(n * value for n, value in parts) / sum(n for n, _ in parts))


def whole_class_relabels(
    given: np.ndarray, corrected: np.ndarray, label_names: list[str], share: float = 0.9
) -> dict[str, str]:
    """Given classes whose rows the correction net mapped (``share`` or more of them) to one other class.

    A class-level relabelling ("class A means class B", learned from the given label alone) is a failure mode of
    label correction, not a correction of single examples.
    """
    given, corrected = np.asarray(given), np.asarray(corrected)
    out = {}
    for c, name in enumerate(label_names):
        rows = corrected[given == c]
        if rows.size:
            top = int(np.bincount(rows, minlength=len(label_names)).argmax())
            if top != c and (rows == top).mean() >= share:
                out[name] = label_names[top]
    return out


def weight_diagnostics(
    outputs: dict[str, list], given: np.ndarray, gold: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """Diagnostics of ``SAMATrainer.compute_example_weights`` outputs on a training set.

    Args:
        outputs: ``weight`` (and/or ``corrected_label``, ``corrected_probs``; ``learned_weight`` with given
            weights) per example.
        given: the labels the model was trained on (class ids).
        gold: the true labels (diagnostics only).
        label_names: class names.
    """
    given, gold = np.asarray(given), np.asarray(gold)
    wrong = given != gold
    out: dict[str, Any] = {}
    if "weight" in outputs:
        w = np.asarray(outputs["weight"], dtype=np.float64)
        out["noise_auroc"] = auroc(wrong, -w)
        out["noise_auroc_within_class"] = within_class_auroc(wrong, -w, given)
        out["weight_mean_by_given_class"] = {
            name: float(w[given == c].mean()) for c, name in enumerate(label_names) if (given == c).any()
        }
        out["weight_mean_correct"] = float(w[~wrong].mean()) if (~wrong).any() else None
        out["weight_mean_wrong"] = float(w[wrong].mean()) if wrong.any() else None
    if "learned_weight" in outputs:  # the weighting net's factor alone, without the given weights
        learned = -np.asarray(outputs["learned_weight"], dtype=np.float64)
        out["learned_weight_noise_auroc"] = auroc(wrong, learned)
        out["learned_weight_noise_auroc_within_class"] = within_class_auroc(wrong, learned, given)
    if "corrected_label" in outputs:
        corrected = np.asarray(outputs["corrected_label"])
        probs = np.asarray(outputs["corrected_probs"])
        out["correction_auroc"] = auroc(wrong, -probs[np.arange(len(given)), given])
        out["corrected_accuracy"] = float((corrected == gold).mean())
        out["corrected_changed"] = float((corrected != given).mean())
        out["relabelled_classes"] = whole_class_relabels(given, corrected, label_names)
    return out
