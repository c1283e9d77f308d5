"""From a weak-supervision dataset to what training needs: weak training labels, a clean set, tokenised splits.

:func:`prepare_task` applies the majority vote to the training split (WRENCH's protocol: ties broken as WRENCH,
rows no labeling function covers dropped), takes the valid split (optionally ``K`` examples per class) as the clean
set, and tokenises train, clean and test. :func:`hold_out_valid_half` turns the valid split into a tuning protocol
(one half clean set, the other half scored in place of test), so settings can be chosen without reading test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Value

from .vote_prior import VOTE_PRIOR_COLUMN, fit_vote_prior
from .weak_supervision import (
    WeakSupervisionData,
    add_lf_agreement,
    apply_label_model,
    lf_agreement,
    load_wrench,
    subsample_per_class,
)


__all__ = [
    "WeakSupervisionTask",
    "carve_train_from_valid",
    "hold_out_valid_half",
    "load_wrench_from_hub",
    "metric_name_for",
    "prepare_task",
    "stratified_part",
]

# WRENCH's metric per dataset (its README / benchmark tables): binary F1 (positive class 1) for sms and the relation
# sets spouse / cdr; accuracy for youtube, trec, chemprot, agnews, imdb, yelp, semeval and the rest.
F1_DATASETS = ("sms", "spouse", "cdr", "basketball", "tennis")


def metric_name_for(dataset: str, num_classes: int) -> str:
    """``"f1"`` (F1 of class 1) for WRENCH's binary F1 datasets, else ``"accuracy"``."""
    return "f1" if num_classes == 2 and dataset.lower() in F1_DATASETS else "accuracy"


@dataclass
class WeakSupervisionTask:
    """A prepared weak-supervision task.

    ``train`` has the columns ``id``, ``text``, ``label`` (gold, for diagnostics only), ``weak_label`` (the majority
    vote) [and ``weak_label_probs``]; ``clean`` and ``test`` have gold ``label``s. The ``*_tok`` datasets are tokenised
    with a ``labels`` column: the weak labels for ``train_tok`` (with an ``example_id`` column, the row index), the
    gold labels for ``clean_tok`` / ``test_tok``; ``clean_as_train_tok`` is the clean set with labels in the training
    label format (soft one-hot rows when training on soft labels).
    """

    name: str
    label_names: list[str]
    metric_name: str
    train: Dataset
    clean: Dataset
    test: Dataset
    train_tok: Dataset
    clean_tok: Dataset
    test_tok: Dataset
    clean_as_train_tok: Dataset

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def weak_label_accuracy(self) -> float:
        """Share of training rows whose majority-vote label is the gold label."""
        return float(np.mean(np.asarray(self.train["weak_label"]) == np.asarray(self.train["label"])))


def _tokenize(ds: Dataset, tokenizer: Any, max_length: int, labels: list, with_ids: bool = False) -> Dataset:
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    columns = {**{k: list(v) for k, v in enc.items()}, "labels": labels}
    if with_ids:
        columns["example_id"] = list(range(len(ds)))
    return Dataset.from_dict(columns)


def carve_train_from_valid(data: WeakSupervisionData, fraction: float, seed: int) -> None:
    """Use a seeded ``fraction`` of valid as the weakly labelled train split and the rest as valid (in place), for
    folders without a train split (e.g. the COSINE copies of AGNews / IMDB / Yelp)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the fraction of valid used for training must be in (0, 1), got {fraction}")
    valid = data["valid"].shuffle(seed=seed)
    n = int(round(fraction * len(valid)))
    data.splits["train"], data.splits["valid"] = valid.select(range(n)), valid.select(range(n, len(valid)))


def _first_of_each_class(labels: Any, count: Callable[[int], int], seed: int) -> np.ndarray:
    """A boolean row mask: within each class (in sorted order) a seeded permutation of its rows, the first
    ``count(n_c)`` of them."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        picked[rows[: count(len(rows))]] = True
    return picked


def stratified_part(labels: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a class-stratified ``fraction`` of the rows with ``labels``: within each class a seeded
    random ``round(fraction · n_c)`` of its ``n_c`` rows, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the fraction must be in (0, 1], got {fraction}")
    return np.flatnonzero(_first_of_each_class(labels, lambda n: max(1, round(fraction * n)), seed))


def hold_out_valid_half(data: WeakSupervisionData, fold: int, split_seed: int = 123) -> None:
    """Replace ``valid`` by one stratified half of it and ``test`` by the other (in place): tune on the clean split
    only. ``fold`` 0 or 1 picks the half kept as the clean set; the test split is dropped unread."""
    if fold not in (0, 1):
        raise ValueError(f"the valid fold must be 0 or 1, got {fold}")
    valid = data["valid"]
    first = _first_of_each_class(valid["label"], lambda n: n // 2, split_seed)
    keep, score = np.flatnonzero(first), np.flatnonzero(~first)
    if fold == 1:
        keep, score = score, keep
    data.splits["valid"], data.splits["test"] = valid.select(keep), valid.select(score)


def prepare_task(
    data: WeakSupervisionData,
    name: str,
    tokenizer: Any,
    *,
    max_length: int = 128,
    clean_per_class: int | None = None,
    soft_labels: bool = False,
    exclude_labeled_ids: bool = False,
    lf_features: bool = False,
    vote_prior: bool = False,
    seed: int = 0,
) -> WeakSupervisionTask:
    """Majority-vote training labels, the (optionally subsampled: ``clean_per_class`` per class, seeded) valid split
    as the clean set, and the tokenised splits. ``exclude_labeled_ids`` drops WRENCH's ``labeled_ids.json`` rows from
    the training split. ``lf_features`` adds an ``lf_agreement`` column (:func:`~sama_trainer.data.lf_agreement`,
    the votes against each row's training label) to ``train_tok`` and ``clean_as_train_tok``, for
    ``SAMAConfig.meta_feature_column``. ``vote_prior`` adds a ``vote_prior`` column, P(training label right | votes)
    from a :func:`~sama_trainer.data.fit_vote_prior` fit on the clean set, to ``train_tok`` (and 1.0 to
    ``clean_as_train_tok``: clean labels are right), for ``SAMAConfig.example_weight_column``."""
    for split in ("train", "valid", "test"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"dataset {name!r} has no (or an empty) {split!r} split")
    train = data["train"]
    if exclude_labeled_ids and data.labeled_ids:
        drop = set(data.labeled_ids)
        train = train.select([i for i, x in enumerate(train["id"]) if x not in drop])
    train = apply_label_model(train, data.num_classes, soft=soft_labels, drop_uncovered=True, tie_break="wrench")
    if len(train) == 0:
        raise ValueError(f"dataset {name!r}: no training row is covered by any labeling function")
    clean = data["valid"]
    if clean_per_class is not None:
        clean = subsample_per_class(clean, clean_per_class, seed=seed)
    num_labels = data.num_classes
    if soft_labels:
        train_labels = [list(map(float, p)) for p in train["weak_label_probs"]]
        clean_as_train = np.eye(num_labels, dtype=np.float32)[clean["label"]].tolist()
    else:
        train_labels, clean_as_train = list(train["weak_label"]), list(clean["label"])
    train_tok = _tokenize(train, tokenizer, max_length, train_labels, with_ids=True)
    clean_as_train_tok = _tokenize(clean, tokenizer, max_length, clean_as_train)
    if lf_features:
        train_tok = add_lf_agreement(train_tok, train["weak_labels"])
        clean_as_train_tok = add_lf_agreement(clean_as_train_tok, clean["weak_labels"])
    if vote_prior:
        prior = fit_vote_prior(clean, num_labels)
        given = lf_agreement(np.asarray(train["weak_labels"]), np.asarray(train["weak_label"]))
        train_tok = train_tok.add_column(VOTE_PRIOR_COLUMN, prior(given).tolist(), feature=Value("float32"))
        ones = [1.0] * len(clean_as_train_tok)
        clean_as_train_tok = clean_as_train_tok.add_column(VOTE_PRIOR_COLUMN, ones, feature=Value("float32"))
    return WeakSupervisionTask(
        name=name,
        label_names=list(data.label_names),
        metric_name=metric_name_for(name, num_labels),
        train=train,
        clean=clean,
        test=data["test"],
        train_tok=train_tok,
        clean_tok=_tokenize(clean, tokenizer, max_length, list(clean["label"])),
        test_tok=_tokenize(data["test"], tokenizer, max_length, list(data["test"]["label"])),
        clean_as_train_tok=clean_as_train_tok,
    )


def load_wrench_from_hub(repo_id: str, config: str | None = None) -> tuple[WeakSupervisionData, str]:
    """A WRENCH folder from a Hub dataset repo (``config``: the folder name when the repo holds several).

    Returns the data and the folder name. Offline (``HF_HUB_OFFLINE=1``) the repo must already be cached.
    """
    from huggingface_hub import snapshot_download

    patterns = [f"*{config}/*", f"{config}/*"] if config else None
    try:
        root = Path(snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, no cached copy
        raise RuntimeError(
            f"could not get dataset {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline "
            "(HF_HUB_OFFLINE=1) it must already be cached; otherwise download the WRENCH folder and pass its path."
        ) from e
    folders = sorted(p.parent for p in root.rglob("label.json"))
    if config:
        folders = [p for p in folders if p.name == config]
    if len(folders) != 1:
        raise ValueError(
            f"{repo_id}: expected one WRENCH folder{f' named {config!r}' if config else ''} (with label.json), "
            f"found {[str(p.relative_to(root)) for p in folders]}; name the folder to use"
        )
    return load_wrench(folders[0]), folders[0].name
