"""Weak-supervision datasets (WRENCH / COSINE), label aggregation and synthetic data."""

from .synthetic import make_synthetic_weak_supervision, write_wrench_format
from .weak_supervision import (
    ABSTAIN,
    WeakSupervisionData,
    WeakSupervisionFormatError,
    apply_label_model,
    load_cosine,
    load_wrench,
    majority_vote,
    subsample_per_class,
    vote_counts,
)


__all__ = [
    "ABSTAIN",
    "WeakSupervisionData",
    "WeakSupervisionFormatError",
    "apply_label_model",
    "load_cosine",
    "load_wrench",
    "majority_vote",
    "make_synthetic_weak_supervision",
    "subsample_per_class",
    "vote_counts",
    "write_wrench_format",
]
