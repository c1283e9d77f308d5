"""Weak-supervision datasets (WRENCH / COSINE), label aggregation and synthetic data."""

from .synthetic import make_synthetic_weak_supervision, write_wrench_format
from .vote_prior import VOTE_PRIOR_COLUMN, VotePrior, fit_logistic_regression, fit_vote_prior, vote_features
from .weak_supervision import (
    ABSTAIN,
    LF_AGREEMENT_COLUMN,
    WeakSupervisionData,
    WeakSupervisionFormatError,
    add_lf_agreement,
    apply_label_model,
    lf_agreement,
    load_cosine,
    load_wrench,
    majority_vote,
    subsample_per_class,
    vote_counts,
)


__all__ = [
    "ABSTAIN",
    "LF_AGREEMENT_COLUMN",
    "VOTE_PRIOR_COLUMN",
    "VotePrior",
    "WeakSupervisionData",
    "WeakSupervisionFormatError",
    "add_lf_agreement",
    "apply_label_model",
    "fit_logistic_regression",
    "fit_vote_prior",
    "lf_agreement",
    "load_cosine",
    "load_wrench",
    "majority_vote",
    "make_synthetic_weak_supervision",
    "subsample_per_class",
    "vote_counts",
    "vote_features",
    "write_wrench_format",
]
