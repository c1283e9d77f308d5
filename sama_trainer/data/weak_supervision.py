"""Weak-supervision data layer: WRENCH / COSINE loaders, majority vote, per-class subsampling.

All loaders return a :class:`WeakSupervisionData`: a ``datasets.DatasetDict`` of splits plus the class names.
Every split has at least the columns

- ``id`` (str): the example id (the JSON key for WRENCH files, the list position for COSINE files),
- ``text`` (str): the input text, unchanged (chemprot's text already contains its entity markers),
- ``label`` (int): the gold label, in ``[0, num_classes)``,
- ``weak_labels`` (list[int]): one vote per labeling function (LF), ``-1`` = abstain.

Extra fields of WRENCH's ``data`` dict (e.g. chemprot's ``entity1``/``entity2``/``span1``/``span2``) are kept as
extra columns when every row of the split has them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Value


try:
    from datasets import List
except ImportError:  # datasets < 4
    from datasets import Sequence as List

ABSTAIN = -1


class WeakSupervisionFormatError(ValueError):
    """A data file has the wrong structure or out-of-range labels; the message names the file (and id)."""


WRENCH_SPLITS = ("train", "valid", "test")
CORE_COLUMNS = ("id", "text", "label", "weak_labels")
CORE_FEATURES = Features(
    {"id": Value("string"), "text": Value("string"), "label": Value("int64"), "weak_labels": List(Value("int64"))}
)
# Columns derived by `apply_label_model`; never written back as WRENCH ``data`` fields.
DERIVED_COLUMNS = ("weak_label", "weak_label_probs")

TieBreak = Literal["random", "abstain", "wrench"]

# COSINE file name -> split name.
COSINE_FILES = {
    "train_data.json": "train",
    "dev_data.json": "valid",
    "test_data.json": "test",
    "unlabeled_data.json": "unlabeled",
}
# Class names of the COSINE tasks (the standard AG News / IMDB / Yelp order; consistent with the example texts).
COSINE_LABEL_NAMES = {
    "agnews": ["World", "Sports", "Business", "Sci/Tech"],
    "imdb": ["Negative", "Positive"],
    "yelp": ["Negative", "Positive"],
}


@dataclass
class WeakSupervisionData:
    """A weakly supervised text-classification dataset.

    Attributes:
        splits: ``DatasetDict`` with the splits found (WRENCH: train/valid/test; COSINE may add ``unlabeled``).
        label_names: class names; class id ``i`` is ``label_names[i]``.
        lf_names: optional names of the labeling functions (``weak_labels[j]`` is LF ``lf_names[j]``).
        labeled_ids: optional ids (into ``splits["train"]``) of WRENCH's small clean labeled set
            (``labeled_ids.json``), or ``None`` when the folder has none.
    """

    splits: DatasetDict
    label_names: list[str]
    lf_names: list[str] | None = None
    labeled_ids: list[str] | None = field(default=None)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def num_lfs(self) -> int | None:
        """Number of labeling functions (``None`` if every split is empty)."""
        for ds in self.splits.values():
            if len(ds):
                return len(ds[0]["weak_labels"])
        return None

    def __getitem__(self, split: str) -> Dataset:
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"Missing file {path}: expected {what}.")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeakSupervisionFormatError(f"Malformed JSON in {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise WeakSupervisionFormatError(f"{path} is not UTF-8 text: {e}") from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_label_names(path: Path) -> list[str]:
    raw = _read_json(path, 'a JSON object mapping class id to class name, e.g. {"0": "ham", "1": "spam"}')
    if not isinstance(raw, dict) or not raw:
        raise WeakSupervisionFormatError(f"{path}: expected a non-empty JSON object mapping class id to class name.")
    try:
        ids = sorted(int(k) for k in raw)
    except ValueError as e:
        raise WeakSupervisionFormatError(f"{path}: class ids must be integers, got keys {list(raw)}") from e
    if ids != list(range(len(ids))):
        raise WeakSupervisionFormatError(f"{path}: class ids must be 0..{len(ids) - 1} without gaps, got {ids}")
    names = {int(k): str(v) for k, v in raw.items()}
    return [names[i] for i in range(len(ids))]


def _check_weak_label_range(wl: np.ndarray, ids: list[str], path: Path, num_classes: int) -> None:
    bad = (wl != ABSTAIN) & ((wl < 0) | (wl >= num_classes))
    if bad.any():
        row, lf = np.argwhere(bad)[0]
        raise WeakSupervisionFormatError(
            f"{path}: id {ids[row]!r} has weak label {int(wl[row, lf])} (LF index {lf}) outside "
            f"[0, {num_classes - 1}] and not {ABSTAIN} (abstain); label.json defines {num_classes} classes."
        )


def _build_split(columns: dict[str, list[Any]], extra: dict[str, list[Any]]) -> Dataset:
    if not columns["id"]:
        return Dataset.from_dict({k: [] for k in CORE_COLUMNS}, features=CORE_FEATURES)
    ds = Dataset.from_dict({**{k: columns[k] for k in CORE_COLUMNS}, **extra})
    for name, feat in CORE_FEATURES.items():
        if ds.features[name] != feat:
            ds = ds.cast_column(name, feat)
    return ds


def _load_wrench_split(path: Path, num_classes: int, num_lfs: int | None) -> tuple[Dataset, int | None]:
    raw = _read_json(
        path, 'a WRENCH split: {"<id>": {"label": int, "weak_labels": [int, ...], "data": {"text": str}}}'
    )
    if not isinstance(raw, dict):
        raise WeakSupervisionFormatError(
            f"{path}: expected a JSON object mapping id -> example, got {type(raw).__name__}."
        )
    columns: dict[str, list[Any]] = {k: [] for k in CORE_COLUMNS}
    data_dicts: list[dict[str, Any]] = []
    for ex_id, item in raw.items():
        if not isinstance(item, dict) or not {"label", "weak_labels", "data"} <= item.keys():
            raise WeakSupervisionFormatError(
                f"{path}: id {ex_id!r} must be an object with keys 'label', 'weak_labels' and 'data'."
            )
        label, wl, data = item["label"], item["weak_labels"], item["data"]
        if not _is_int(label) or not 0 <= label < num_classes:
            raise WeakSupervisionFormatError(
                f"{path}: id {ex_id!r} has gold label {label!r}, expected an int in [0, {num_classes - 1}] "
                f"(label.json defines {num_classes} classes)."
            )
        if not isinstance(wl, list) or not all(_is_int(v) for v in wl):
            raise WeakSupervisionFormatError(f"{path}: id {ex_id!r} has weak_labels {wl!r}, expected a list of ints.")
        if num_lfs is None:
            num_lfs = len(wl)
        elif len(wl) != num_lfs:
            raise WeakSupervisionFormatError(
                f"{path}: id {ex_id!r} has {len(wl)} weak labels but earlier rows have {num_lfs}; "
                "every row must have one vote (or -1) per labeling function."
            )
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise WeakSupervisionFormatError(
                f"{path}: id {ex_id!r} must have a 'data' object with a string 'text' field."
            )
        columns["id"].append(str(ex_id))
        columns["text"].append(data["text"])
        columns["label"].append(label)
        columns["weak_labels"].append(wl)
        data_dicts.append(data)

    if columns["id"] and num_lfs:
        _check_weak_label_range(np.asarray(columns["weak_labels"], dtype=np.int64), columns["id"], path, num_classes)

    # Extra `data` fields present in every row become columns (prefixed if they clash with a core column).
    extra: dict[str, list[Any]] = {}
    if data_dicts:
        keys = [k for k in data_dicts[0] if k != "text" and all(k in d for d in data_dicts)]
        for k in keys:
            name = f"data_{k}" if k in CORE_COLUMNS or k in DERIVED_COLUMNS else k
            extra[name] = [d[k] for d in data_dicts]
    try:
        ds = _build_split(columns, extra)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):  # mixed-type extras: keep core columns
        ds = _build_split(columns, {})
    return ds, num_lfs


def load_wrench(dataset_dir: str | Path, splits: tuple[str, ...] = WRENCH_SPLITS) -> WeakSupervisionData:
    """Load a WRENCH-format folder (``label.json`` + ``{train,valid,test}.json``).

    Splits whose file is absent are skipped, but at least one must exist. ``labeled_ids.json`` (if present) is
    read into ``labeled_ids``. Raises ``FileNotFoundError`` for a missing folder/``label.json``/all split files,
    ``ValueError`` for malformed JSON, out-of-range gold or weak labels, or rows with differing numbers of LFs.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"WRENCH dataset directory not found: {root} (expected a folder with label.json and "
            f"{'/'.join(f'{s}.json' for s in splits)})."
        )
    label_names = _read_label_names(root / "label.json")
    present = [s for s in splits if (root / f"{s}.json").is_file()]
    if not present:
        raise FileNotFoundError(
            f"No split files in {root}: expected at least one of {', '.join(f'{s}.json' for s in splits)}."
        )
    out: dict[str, Dataset] = {}
    num_lfs: int | None = None
    for split in present:
        out[split], num_lfs = _load_wrench_split(root / f"{split}.json", len(label_names), num_lfs)

    labeled_ids = None
    lid_path = root / "labeled_ids.json"
    if lid_path.is_file():
        raw = _read_json(lid_path, 'an object {"labeled_ids": [...], "lf_exemplar_ids": [...]}')
        if not isinstance(raw, dict) or not isinstance(raw.get("labeled_ids", []), list):
            raise WeakSupervisionFormatError(f"{lid_path}: expected an object with a 'labeled_ids' list.")
        labeled_ids = [str(i) for i in raw.get("labeled_ids", [])]
        if "train" in out:
            train_ids = set(out["train"]["id"])
            missing = [i for i in labeled_ids if i not in train_ids]
            if missing:
                raise WeakSupervisionFormatError(f"{lid_path}: labeled id {missing[0]!r} is not an id of train.json.")
    return WeakSupervisionData(splits=DatasetDict(out), label_names=label_names, labeled_ids=labeled_ids)


def load_cosine(dataset_dir: str | Path, label_names: list[str] | None = None) -> WeakSupervisionData:
    """Load a COSINE-format folder (``{train,dev,test,unlabeled}_data.json``, each a list of
    ``{"text", "label", "major", ...}``).

    Splits: ``train_data`` -> ``train``, ``dev_data`` -> ``valid``, ``test_data`` -> ``test``,
    ``unlabeled_data`` -> ``unlabeled`` (whichever exist). COSINE ships no per-LF votes, only ``major`` (the
    majority vote of its keyword rules, -1 = no rule fired), so ``weak_labels`` is the single-LF list
    ``[major]``: majority vote over it gives back ``major`` exactly, and rows with ``major == -1`` are uncovered.
    ``id`` is the position in the file (as a string). Class names default to the known task names (AGNews, IMDB,
    Yelp, matched on the folder name) or to ``"0", "1", ...`` inferred from the gold labels.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"COSINE dataset directory not found: {root} (expected a folder with {', '.join(COSINE_FILES)})."
        )
    present = {fname: split for fname, split in COSINE_FILES.items() if (root / fname).is_file()}
    if not present:
        raise FileNotFoundError(
            f"No COSINE split files in {root}: expected at least one of {', '.join(COSINE_FILES)}."
        )
    raw_splits: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for fname, split in present.items():
        path = root / fname
        raw = _read_json(path, 'a JSON list of {"text": str, "label": int, "major": int}')
        if not isinstance(raw, list):
            raise WeakSupervisionFormatError(f"{path}: expected a JSON list of examples, got {type(raw).__name__}.")
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise WeakSupervisionFormatError(f"{path}: item {i} must be an object with a string 'text'.")
            for key in ("label", "major"):
                if not _is_int(item.get(key)):
                    raise WeakSupervisionFormatError(f"{path}: item {i} has {key}={item.get(key)!r}, expected an int.")
        raw_splits[split] = (path, raw)

    if label_names is None:
        label_names = COSINE_LABEL_NAMES.get(root.name.lower())
    if label_names is None:
        max_label = max((item["label"] for _, raw in raw_splits.values() for item in raw), default=0)
        label_names = [str(i) for i in range(max(max_label + 1, 2))]
    num_classes = len(label_names)

    out: dict[str, Dataset] = {}
    for split, (path, raw) in raw_splits.items():
        for i, item in enumerate(raw):
            if not 0 <= item["label"] < num_classes:
                raise WeakSupervisionFormatError(
                    f"{path}: id '{i}' has gold label {item['label']}, expected [0, {num_classes - 1}]."
                )
            if item["major"] != ABSTAIN and not 0 <= item["major"] < num_classes:
                raise WeakSupervisionFormatError(
                    f"{path}: id '{i}' has weak label (major) {item['major']}, expected -1 or [0, {num_classes - 1}]."
                )
        columns = {
            "id": [str(i) for i in range(len(raw))],
            "text": [item["text"] for item in raw],
            "label": [item["label"] for item in raw],
            "weak_labels": [[item["major"]] for item in raw],
        }
        out[split] = _build_split(columns, {})
    return WeakSupervisionData(splits=DatasetDict(out), label_names=list(label_names), lf_names=["major"])


# ----------------------------------------------------------------------------------------------------------------
# Label model
# ----------------------------------------------------------------------------------------------------------------


def _snorkel_hash(i: int) -> int:
    return int(hashlib.sha1(str(i).encode("utf-8")).hexdigest(), 16)


def vote_counts(weak_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class vote counts ``[n, num_classes]`` of a weak-label matrix ``[n, m]`` (``-1`` = abstain)."""
    L = np.asarray(weak_labels)
    if L.ndim != 2:
        raise ValueError(f"weak_labels must be a 2-D [n_examples, n_lfs] array, got shape {L.shape}.")
    if L.size and not np.issubdtype(L.dtype, np.integer):
        if not np.all(np.equal(np.mod(L, 1), 0)):
            raise ValueError("weak_labels must contain integers.")
        L = L.astype(np.int64)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    bad = (L != ABSTAIN) & ((L < 0) | (L >= num_classes))
    if bad.any():
        row, lf = np.argwhere(bad)[0]
        raise ValueError(f"weak_labels[{row}, {lf}] = {L[row, lf]} is outside [0, {num_classes - 1}] and not -1.")
    counts = np.zeros((L.shape[0], num_classes), dtype=np.int64)
    for c in range(num_classes):
        counts[:, c] = (L == c).sum(axis=1)
    return counts


def majority_vote(
    weak_labels: np.ndarray,
    num_classes: int,
    *,
    soft: bool = False,
    tie_break: TieBreak = "random",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote over labeling functions, following WRENCH's ``MajorityVoting``.

    Args:
        weak_labels: int array ``[n, m]``; ``-1`` = abstain, else a class id in ``[0, num_classes)``.
        num_classes: number of classes.
        soft: return normalised vote distributions ``[n, num_classes]`` (float) instead of hard labels.
        tie_break: how hard labels resolve ties between the top classes:
            ``"random"``: uniformly among the tied classes with ``np.random.default_rng(seed)`` (one uniform draw per
            row, so a row's result depends only on its position and the seed);
            ``"abstain"``: ``-1``;
            ``"wrench"``: bit-for-bit WRENCH/snorkel: tied class number ``sha1(str(i)) % n_tied`` for row ``i``.
        seed: seed for ``tie_break="random"``.

    Returns:
        ``(labels_or_probs, covered)``; ``covered[i]`` is True iff at least one LF voted on row ``i``. Hard labels
        are ``int64`` with ``-1`` for uncovered rows (and for ties when ``tie_break="abstain"``). Soft rows sum to 1;
        uncovered rows get the uniform distribution.

    WRENCH (``wrench/labelmodel/majority_voting.py``, ``MajorityVoting.predict_proba``) counts the non-abstain votes
    per class, gives all-abstain rows a count of 1 for every class (uniform distribution) and normalises. Its
    ``predict`` is ``snorkel.utils.probs_to_preds(probs)`` with the default ``tie_break_policy="random"``: classes
    within ``tol=1e-5`` of the row maximum are tied and the pick is ``max_idxs[sha1(str(i)) % len(max_idxs)]`` -- a
    deterministic hash of the row index, not an RNG. Uncovered rows are therefore a pure tie over all classes, but
    WRENCH's pipeline removes them first (``train_data.get_covered_subset()``) before computing training labels. Soft
    outputs match WRENCH exactly; hard labels of covered rows match exactly with ``tie_break="wrench"`` applied to the
    covered rows (what :func:`apply_label_model` does with ``drop_uncovered=True``), and have the same distribution
    (uniform among tied classes) with ``"random"``. Uncovered rows get ``-1`` here instead of a hashed class.
    """
    counts = vote_counts(weak_labels, num_classes)
    n = counts.shape[0]
    totals = counts.sum(axis=1)
    covered = totals > 0
    if soft:
        probs = np.full((n, num_classes), 1.0 / num_classes)
        probs[covered] = counts[covered] / totals[covered, None]
        return probs, covered

    if tie_break not in ("random", "abstain", "wrench"):
        raise ValueError(f"tie_break must be 'random', 'abstain' or 'wrench', got {tie_break!r}.")
    top = counts.max(axis=1, initial=0)
    tied = counts == top[:, None]
    n_tied = tied.sum(axis=1)
    labels = np.argmax(counts, axis=1).astype(np.int64)  # first maximum; correct where there is no tie
    is_tie = covered & (n_tied > 1)
    if is_tie.any():
        if tie_break == "abstain":
            labels[is_tie] = ABSTAIN
        else:
            if tie_break == "random":
                draws = np.random.default_rng(seed).random(n)
                pick = np.minimum((draws * n_tied).astype(np.int64), n_tied - 1)
            else:
                pick = np.array(
                    [_snorkel_hash(i) % int(k) if t else 0 for i, (k, t) in enumerate(zip(n_tied, is_tie))]
                )
            # index of the (pick+1)-th tied class in each row
            rank = np.cumsum(tied, axis=1)
            chosen = np.argmax(rank == (pick + 1)[:, None], axis=1)
            labels[is_tie] = chosen[is_tie]
    labels[~covered] = ABSTAIN
    return labels, covered


def apply_label_model(
    dataset: Dataset,
    num_classes: int,
    method: str = "majority_vote",
    soft: bool = False,
    drop_uncovered: bool = True,
    seed: int = 0,
    tie_break: TieBreak = "random",
) -> Dataset:
    """Aggregate ``weak_labels`` into a ``weak_label`` column (int, ``-1`` = no label).

    With ``soft=True`` a ``weak_label_probs`` column (list[float], sums to 1) is added as well. With
    ``drop_uncovered=True`` (WRENCH's ``get_covered_subset()`` before training the end model), rows on which no LF
    voted are removed *before* aggregating, so ``tie_break="wrench"`` reproduces WRENCH's hard labels exactly; rows
    left at ``-1`` by ``tie_break="abstain"`` ties are removed too, so every kept row has a usable ``weak_label``.
    Without dropping, uncovered rows keep ``weak_label == -1`` (and uniform ``weak_label_probs``).
    """
    if method != "majority_vote":
        raise ValueError(f"Unknown label model {method!r}; supported: 'majority_vote'.")
    if "weak_labels" not in dataset.column_names:
        raise ValueError(f"dataset has no 'weak_labels' column (columns: {dataset.column_names}).")
    L = np.asarray(dataset["weak_labels"], dtype=np.int64)
    if L.ndim != 2:  # empty dataset
        L = L.reshape(len(dataset), 0)
    ds = dataset.remove_columns([c for c in DERIVED_COLUMNS if c in dataset.column_names])
    if drop_uncovered:
        keep = np.flatnonzero((L != ABSTAIN).any(axis=1))
        if len(keep) != len(ds):
            ds = ds.select(keep)
            L = L[keep]
    labels, _ = majority_vote(L, num_classes, tie_break=tie_break, seed=seed)
    if drop_uncovered and (labels == ABSTAIN).any():
        keep = np.flatnonzero(labels != ABSTAIN)
        ds, L, labels = ds.select(keep), L[keep], labels[keep]
    ds = ds.add_column("weak_label", labels.tolist(), feature=Value("int64"))
    if soft:
        probs, _ = majority_vote(L, num_classes, soft=True)
        ds = ds.add_column("weak_label_probs", probs.tolist(), feature=List(Value("float32")))
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Features of the labeling functions' votes
# ----------------------------------------------------------------------------------------------------------------

LF_AGREEMENT_COLUMN = "lf_agreement"


def lf_agreement(weak_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How each labeling function voted relative to each row's label: ``[n, m]`` float32, ``+1`` where LF ``j`` voted
    the label, ``-1`` where it voted another class, ``0`` where it abstained.

    As per-example features of the weighting net (``SAMAConfig.meta_feature_column``) they let the meta net learn,
    from the clean set, which labeling functions and which patterns of agreement to trust.
    """
    L = np.asarray(weak_labels, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
    if L.ndim != 2 or L.shape[0] != y.shape[0]:
        raise ValueError(f"weak_labels must be [n, m] and labels [n]; got {L.shape} and {y.shape[0]} labels")
    voted = L != ABSTAIN
    return np.where(voted, np.where(L == y, 1.0, -1.0), 0.0).astype(np.float32)


def add_lf_agreement(
    dataset: Dataset, weak_labels: Any, label_column: str = "labels", column: str = LF_AGREEMENT_COLUMN
) -> Dataset:
    """``dataset`` with a ``column`` of :func:`lf_agreement` features: the votes ``weak_labels`` (``[n, m]``, one
    row per row of ``dataset``) against its ``label_column`` (class ids, or soft labels: their argmax)."""
    labels = np.asarray(dataset[label_column])
    if labels.ndim == 2:
        labels = labels.argmax(-1)
    features = lf_agreement(np.asarray(weak_labels), labels)
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, features.tolist(), feature=List(Value("float32")))


# ----------------------------------------------------------------------------------------------------------------
# Subsampling
# ----------------------------------------------------------------------------------------------------------------


def subsample_per_class(dataset: Dataset, k: int, seed: int, label_column: str = "label") -> Dataset:
    """Stratified sample of ``k`` rows per class (all rows of a class with fewer than ``k``).

    Rows whose label is negative (``-1`` = abstain/unlabeled) are never selected. Classes are visited in sorted order
    with one ``np.random.default_rng(seed)``, so the result is deterministic for a seed. Kept rows stay in their
    original order.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}.")
    if label_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {label_column!r} (columns: {dataset.column_names}).")
    labels = np.asarray(dataset[label_column], dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        chosen.append(idx if len(idx) <= k else rng.choice(idx, size=k, replace=False))
    keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return dataset.select(keep)
