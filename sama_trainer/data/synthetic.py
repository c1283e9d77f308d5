"""Offline, deterministic synthetic weak-supervision data (and a WRENCH-format writer).

Each text is a short templated bag of words: one *hidden* keyword of its class (never used by any labeling
function, so a model can learn the true signal from every example), often an *LF* keyword of its class, sometimes
an LF keyword of another class (a confuser), and shared filler words. The labeling functions are real functions of
the text: two keyword LFs per class (abstain unless one of their keywords occurs), plus two LFs with systematic
errors (``short_text`` votes class 0 for any short text; ``swap`` maps a class-0 keyword to class 1). With the
defaults, majority-vote accuracy on covered training rows is about 0.78 and coverage about 0.85.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

from .weak_supervision import ABSTAIN, CORE_FEATURES, DERIVED_COLUMNS, WeakSupervisionData


# (class name, LF keywords, hidden keywords)
_SENTIMENT = [
    ("negative", ["terrible", "awful", "boring", "waste"], ["disappointing", "bland", "mediocre", "dull"]),
    ("positive", ["great", "excellent", "wonderful", "love"], ["delightful", "superb", "charming", "fantastic"]),
]
_TOPICS = [
    ("sports", ["match", "goal", "coach", "league"], ["stadium", "playoff", "striker", "referee"]),
    ("business", ["market", "stocks", "profit", "shares"], ["merger", "investor", "revenue", "quarterly"]),
    ("science", ["research", "scientists", "study", "physics"], ["telescope", "molecule", "laboratory", "genome"]),
    ("politics", ["election", "senate", "minister", "vote"], ["parliament", "campaign", "ballot", "diplomat"]),
    ("music", ["album", "concert", "band", "guitar"], ["melody", "chorus", "drummer", "vinyl"]),
    ("food", ["recipe", "chef", "dinner", "flavor"], ["oven", "pastry", "spices", "bakery"]),
]
# fmt: off
_FILLER = [
    "the", "a", "this", "that", "today", "really", "very", "we", "they", "it", "was", "is", "some", "new", "about",
    "people", "said", "just", "also", "week", "after", "more", "time", "one", "year",
]
# fmt: on
_TEMPLATES = ["{}.", "news: {}.", "i think {}!", "they said {}.", "{}, honestly."]
_SHORT_MAX_TOKENS = 4


def _class_vocab(num_classes: int) -> list[tuple[str, list[str], list[str]]]:
    if num_classes == 2:
        return list(_SENTIMENT)
    vocab = list(_TOPICS[:num_classes])
    for c in range(len(vocab), num_classes):
        vocab.append((f"class_{c}", [f"lfword{c}x{j}" for j in range(4)], [f"cueword{c}x{j}" for j in range(4)]))
    return vocab


LabelingFunction = Callable[[list[str]], int]


def _lfs(vocab: list[tuple[str, list[str], list[str]]]) -> tuple[list[str], list[LabelingFunction]]:
    """LF names and functions ``tokens -> class id or -1``."""
    names: list[str] = []
    fns: list[LabelingFunction] = []
    for c, (name, lf_kw, _) in enumerate(vocab):
        for suffix, words in (("a", set(lf_kw[:2])), ("b", set(lf_kw[2:]))):
            names.append(f"keyword_{name}_{suffix}")
            fns.append(lambda toks, c=c, words=words: c if words.intersection(toks) else ABSTAIN)
    names.append("short_text")  # systematic bias: every short text is class 0
    fns.append(lambda toks: 0 if len(toks) <= _SHORT_MAX_TOKENS else ABSTAIN)
    swap_word = vocab[0][1][0]
    names.append(f"swap_{swap_word}")  # systematic error: a class-0 keyword mapped to class 1
    fns.append(lambda toks: 1 if swap_word in toks else ABSTAIN)
    return names, fns


def _make_split(
    n: int,
    rng: np.random.Generator,
    vocab: list[tuple[str, list[str], list[str]]],
    lf_fns: list[LabelingFunction],
    p_lf_keyword: float,
    p_confuser: float,
) -> Dataset:
    k = len(vocab)
    ids, texts, labels, weak = [], [], [], []
    for i in range(n):
        y = int(rng.integers(k))
        tokens = [vocab[y][2][rng.integers(4)]]
        if rng.random() < p_lf_keyword:
            tokens.append(vocab[y][1][rng.integers(4)])
        if rng.random() < p_confuser:
            other = (y + 1 + int(rng.integers(k - 1))) % k
            tokens.append(vocab[other][1][rng.integers(4)])
        tokens += [_FILLER[j] for j in rng.integers(len(_FILLER), size=int(rng.integers(3, 7)))]
        tokens = [tokens[j] for j in rng.permutation(len(tokens))]
        text = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(" ".join(tokens))
        votes = [fn(tokens) for fn in lf_fns]
        ids.append(str(i))
        texts.append(text)
        labels.append(y)
        weak.append(votes)
    return Dataset.from_dict({"id": ids, "text": texts, "label": labels, "weak_labels": weak}, features=CORE_FEATURES)


def make_synthetic_weak_supervision(
    num_train: int = 1000,
    num_valid: int = 200,
    num_test: int = 200,
    num_classes: int = 2,
    seed: int = 0,
    p_lf_keyword: float = 0.75,
    p_confuser: float = 0.2,
) -> WeakSupervisionData:
    """Build a synthetic weakly supervised text-classification dataset (same type as :func:`load_wrench`).

    Classes are balanced in expectation. ``p_lf_keyword`` is the chance a text contains an LF keyword of its own
    class, ``p_confuser`` the chance it contains an LF keyword of another class. Each split draws from its own
    child of ``np.random.SeedSequence(seed)``, so e.g. ``num_valid`` does not change the train split.
    ``lf_names`` names the LFs (``2 * num_classes`` keyword LFs, then ``short_text`` and ``swap_<word>``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if min(num_train, num_valid, num_test) < 0:
        raise ValueError("split sizes must be >= 0.")
    vocab = _class_vocab(num_classes)
    lf_names, lf_fns = _lfs(vocab)
    sizes = {"train": num_train, "valid": num_valid, "test": num_test}
    children = np.random.SeedSequence(seed).spawn(len(sizes))
    splits = {
        split: _make_split(n, np.random.default_rng(child), vocab, lf_fns, p_lf_keyword, p_confuser)
        for (split, n), child in zip(sizes.items(), children)
    }
    return WeakSupervisionData(
        splits=DatasetDict(splits), label_names=[name for name, _, _ in vocab], lf_names=lf_names
    )


def write_wrench_format(data: WeakSupervisionData, out_dir: str | Path) -> Path:
    """Write ``data`` as a WRENCH folder readable by :func:`load_wrench`; returns ``out_dir``.

    Writes ``label.json``, one ``<split>.json`` per split (``{id: {"label", "weak_labels", "data": {"text", ...}}}``,
    every non-core column goes into ``data``; ``weak_label``/``weak_label_probs`` are dropped), ``labeled_ids.json``
    if ``data.labeled_ids`` is set and ``readme.txt`` listing ``data.lf_names`` if set.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "label.json").open("w", encoding="utf-8") as f:
        json.dump({str(i): name for i, name in enumerate(data.label_names)}, f, indent=1)
    for split, ds in data.splits.items():
        extra = [c for c in ds.column_names if c not in CORE_FEATURES and c not in DERIVED_COLUMNS]
        items: dict[str, dict] = {}
        for row in ds:
            if row["id"] in items:
                raise ValueError(f"split {split!r} has duplicate id {row['id']!r}; WRENCH ids must be unique.")
            items[row["id"]] = {
                "label": int(row["label"]),
                "weak_labels": [int(v) for v in row["weak_labels"]],
                "data": {"text": row["text"], **{c: row[c] for c in extra}},
            }
        with (out / f"{split}.json").open("w", encoding="utf-8") as f:
            json.dump(items, f, ensure_ascii=False)
    if data.labeled_ids is not None:
        with (out / "labeled_ids.json").open("w", encoding="utf-8") as f:
            json.dump({"labeled_ids": list(data.labeled_ids), "lf_exemplar_ids": []}, f)
    if data.lf_names is not None:
        lines = [f"{j}: {name}" for j, name in enumerate(data.lf_names)]
        (out / "readme.txt").write_text("Labeling functions (index: name), -1 = abstain\n" + "\n".join(lines) + "\n")
    return out
