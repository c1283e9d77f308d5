"""How likely each weak training label is right, judged from the labeling functions' votes by the clean set.

A logistic regression is fit on the clean examples: their votes relative to their own majority vote
(:func:`~sama_trainer.data.lf_agreement`: +1 / −1 / 0 per labeling function) against whether that majority vote is
their gold label. Applied to the training rows it gives P(training label right | votes), a fixed per-example weight
for ``SAMAConfig.example_weight_column``: alone it is a weighted fine-tuning without meta learning, with SAMA it
multiplies the learned weights. The clean set is the only labelled data it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .weak_supervision import apply_label_model, lf_agreement


__all__ = ["VOTE_PRIOR_COLUMN", "VotePrior", "fit_logistic_regression", "fit_vote_prior", "vote_features"]

VOTE_PRIOR_COLUMN = "vote_prior"


def fit_logistic_regression(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """(coefficients [d], intercept) minimising Σ log-loss + ``l2``/2 ‖coefficients‖² (the intercept is not
    penalised; scikit-learn's ``LogisticRegression(C=1/l2)``), by Newton's method."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [n, d] and y [n]; got {x.shape} and {y.shape}")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (got {l2}): the votes of a small clean set separate it easily")
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], float(l2))
    penalty[-1] = 0.0
    w = np.zeros(design.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        grad = design.T @ (p - y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-12 * np.eye(len(w))
        step = np.linalg.solve(hessian, grad)
        w -= step
        if np.abs(step).max() < tol:
            break
    return w[:-1], float(w[-1])


@dataclass
class VotePrior:
    """A fitted vote prior: P(label right) = sigmoid(features · coef + intercept)."""

    coef: np.ndarray
    intercept: float
    num_clean: int  # clean examples it was fit on
    clean_right: float  # the fraction of them whose majority vote is right

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """P(label right) [n] for vote features [n, m] (:func:`~sama_trainer.data.lf_agreement`), float32."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.coef):
            raise ValueError(f"expected vote features [n, {len(self.coef)}], got {features.shape}")
        return (1.0 / (1.0 + np.exp(-(features @ self.coef + self.intercept)))).astype(np.float32)


def vote_features(split: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(vote features [n, m], majority vote right [n], ids [n]) of the rows of a WRENCH ``split`` (``id``,
    ``weak_labels`` and gold ``label`` columns) that some labeling function covers, with the training split's label
    model (majority vote, WRENCH's tie rule)."""
    covered = apply_label_model(split, num_classes, drop_uncovered=True, tie_break="wrench")
    mv = np.asarray(covered["weak_label"], dtype=np.int64)
    right = mv == np.asarray(covered["label"])
    num_lfs = len(split[0]["weak_labels"]) if len(split) else 0
    weak = np.asarray(covered["weak_labels"], dtype=np.int64).reshape(len(mv), num_lfs)
    return lf_agreement(weak, mv), right, list(covered["id"])


def fit_vote_prior(clean: Any, num_classes: int, l2: float = 1.0) -> VotePrior:
    """Fit the vote prior on the clean set (``weak_labels`` and gold ``label`` columns; rows no labeling function
    covers are left out)."""
    features, right, _ = vote_features(clean, num_classes)
    if len(right) == 0 or right.all() or not right.any():
        what = "no clean row is covered by a labeling function" if len(right) == 0 else (
            f"the majority vote is {'right' if right.all() else 'wrong'} on all {len(right)} covered clean rows"
        )  # fmt: skip
        raise ValueError(
            f"the vote prior learns from clean rows whose majority vote is right and from rows where it is wrong, "
            f"but {what}: use a larger clean set (more clean examples per class), or no vote prior"
        )
    coef, intercept = fit_logistic_regression(features, right.astype(np.float64), l2=l2)
    return VotePrior(coef, intercept, num_clean=len(right), clean_right=float(right.mean()))
