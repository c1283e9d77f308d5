"""TARTAN data: end-task splits and auxiliary masked-LM text, paired into base batches.

* :func:`read_task`, :func:`label_vocabulary`, :func:`task_datasets`: a dont-stop-pretraining task folder
  (``{train,dev,test}.jsonl`` with ``text`` and ``label``) as tokenised classification datasets.
* :func:`load_aux_corpus`: auxiliary text files (one document per line) cut into MLM windows, with the columns
  ``mlm_input_ids``, ``aux_index`` (the window's row) and ``aux_source`` (which file it came from).
* :class:`PairedDataset`: every item is an end-task example plus an auxiliary window, so each base batch has both.
* :class:`TartanCollator`: pads both parts and masks the auxiliary part (BERT's 80/10/10).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset


__all__ = [
    "AUX_COLUMNS",
    "AuxCorpus",
    "PairedDataset",
    "TartanCollator",
    "encode_for_classification",
    "label_vocabulary",
    "load_aux_corpus",
    "read_task",
    "task_datasets",
]

logger = logging.getLogger(__name__)

AUX_COLUMNS = ("aux_index", "aux_source")
SPLITS = ("train", "dev", "test")


def read_task(task_dir: str) -> dict[str, list[dict[str, Any]]]:
    """The train/dev/test jsonl splits of a dont-stop-pretraining task folder."""
    paths = {s: os.path.join(task_dir, f"{s}.jsonl") for s in SPLITS}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"task files missing: {missing} (a task folder holds {', '.join(paths)}.jsonl)")
    splits = {}
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            splits[name] = [json.loads(line) for line in f if line.strip()]
    return splits


def label_vocabulary(splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Sorted union of the labels of all splits (ChemProt has labels that occur in some splits only)."""
    return sorted({str(ex["label"]) for rows in splits.values() for ex in rows})


def _subsample(n: int, k: int | None, seed: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def _with_specials(tokenizer: Any, ids: list[int]) -> list[int]:
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def encode_for_classification(tokenizer: Any, texts: list[str], max_length: int, truncation: str) -> list[list[int]]:
    """Token ids with [CLS]/[SEP] (<s>/</s>), truncated to ``max_length``: ``"head"``, or ``"head_tail"`` (the first
    quarter and the last three quarters of the budget, as Sun et al. 2019)."""
    if truncation not in ("head", "head_tail"):
        raise ValueError(f"truncation must be 'head' or 'head_tail', got {truncation!r}")
    body = max_length - 2
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) > body:
            head = body if truncation == "head" else body // 4
            ids = ids[:head] + (ids[len(ids) - (body - head) :] if body > head else [])
        out.append(_with_specials(tokenizer, ids))
    return out


def task_datasets(
    splits: dict[str, list[dict[str, Any]]],
    tokenizer: Any,
    label_names: list[str],
    max_length: int,
    truncation: str = "head",
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    subset_seed: int = 0,
) -> dict[str, Dataset]:
    """Tokenised splits (``input_ids``, ``attention_mask``, ``labels``), optionally subsampled (the same subset for
    every run with the same ``subset_seed``)."""
    label2id = {name: i for i, name in enumerate(label_names)}
    out = {}
    for name, rows in splits.items():
        k = max_train_examples if name == "train" else max_eval_examples
        rows = [rows[i] for i in _subsample(len(rows), k, subset_seed)]
        ids = encode_for_classification(tokenizer, [r["text"] for r in rows], max_length, truncation)
        out[name] = Dataset.from_dict(
            {
                "input_ids": ids,
                "attention_mask": [[1] * len(x) for x in ids],
                "labels": [label2id[str(r["label"])] for r in rows],
            }
        )
    return out


@dataclass
class AuxCorpus:
    """MLM windows (``dataset``), what each came from (``records``: source file, line, window, text start, and its
    ``aux_source`` / ``aux_index``) and the source files found (``sources``, indexed by ``aux_source``)."""

    dataset: Dataset
    records: list[dict[str, Any]]
    sources: list[str]


def load_aux_corpus(
    directory: str,
    files: Sequence[str],
    tokenizer: Any,
    max_length: int,
    max_windows_per_document: int | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> AuxCorpus:
    """MLM windows from the auxiliary ``files`` in ``directory`` (missing ones are skipped with a warning).

    Each non-empty line is a document, cut into windows of ``max_length - 2`` tokens (plus special tokens); at most
    ``max_windows_per_document`` per document, and ``max_examples`` windows in all (a subsample drawn with ``seed``).
    """
    sources = [f for f in files if os.path.isfile(os.path.join(directory, f))]
    for f in files:
        if f not in sources:
            logger.warning("auxiliary file %s not found in %s: skipped", f, directory)
    if not sources:
        raise FileNotFoundError(f"none of the auxiliary files {list(files)} exists in {directory}")
    body = max_length - 2
    windows, records = [], []
    for source_id, name in enumerate(sources):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f) if line.strip()]
        encoded = tokenizer([t for _, t in lines], add_special_tokens=False)["input_ids"]
        for (line_no, text), ids in zip(lines, encoded):
            starts = list(range(0, max(len(ids), 1), body))[:max_windows_per_document]
            for w, start in enumerate(starts):
                windows.append(_with_specials(tokenizer, ids[start : start + body]))
                records.append(
                    {"source": name, "line": line_no, "window": w, "text": text[:120], "aux_source": source_id}
                )
    keep = _subsample(len(windows), max_examples, seed)
    windows, records = [windows[i] for i in keep], [records[i] for i in keep]
    for i, r in enumerate(records):
        r["aux_index"] = i
    dataset = Dataset.from_dict(
        {
            "mlm_input_ids": windows,
            "aux_index": list(range(len(windows))),
            "aux_source": [r["aux_source"] for r in records],
        }
    )
    return AuxCorpus(dataset, records, sources)


class PairedDataset(torch.utils.data.Dataset):
    """Item i = end-task example ``i mod N_task`` plus auxiliary example ``i mod N_aux`` (under the ``mlm_`` keys).

    The length is the larger of the two, so one pass covers both; the Trainer's sampler shuffles i, so every batch
    pairs a random end-task batch with a random auxiliary batch.
    """

    def __init__(self, task_dataset: Any, aux_dataset: Any):
        if len(task_dataset) == 0 or len(aux_dataset) == 0:
            raise ValueError("PairedDataset needs non-empty end-task and auxiliary datasets")
        self.task_dataset, self.aux_dataset = task_dataset, aux_dataset

    def __len__(self) -> int:
        return max(len(self.task_dataset), len(self.aux_dataset))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.task_dataset[i % len(self.task_dataset)], **self.aux_dataset[i % len(self.aux_dataset)]}


@dataclass
class TartanCollator:
    """Pads the end-task and auxiliary parts of each feature and masks the auxiliary part (BERT 80/10/10).

    End-task keys: ``input_ids``, (``attention_mask``), ``labels``. Auxiliary keys: ``mlm_input_ids`` (unmasked,
    with special tokens), optional ``aux_index``/``aux_source``. ``ensure_masked`` masks one random non-special token
    of any example that drew none, so every auxiliary example has a defined per-example loss. ``seed`` makes the
    masking deterministic (own generator); otherwise the global torch RNG is used (then a run resumed from a checkpoint
    masks its first batch differently from an uninterrupted run: ``Trainer`` restores the RNG state only after
    fetching that batch).
    """

    tokenizer: Any
    mlm_probability: float = 0.15
    ensure_masked: bool = True
    seed: int | None = None

    def __post_init__(self):
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("TartanCollator needs a tokenizer with mask and pad tokens")
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))

    def with_seed(self, seed: int) -> TartanCollator:
        """The same collator with its own masking generator seeded by ``seed`` (reproducible masks)."""
        return TartanCollator(self.tokenizer, self.mlm_probability, self.ensure_masked, seed)

    def _pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masked input ids, MLM targets with -100 at unmasked positions)."""
        g = self._generator
        labels = input_ids.clone()
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self._special_ids)
        masked = (torch.rand(input_ids.shape, generator=g) < self.mlm_probability) & candidates
        if self.ensure_masked:
            none = ~masked.any(-1) & candidates.any(-1)
            if none.any():  # one random candidate position per such row
                scores = torch.rand(input_ids.shape, generator=g).masked_fill(~candidates, -1.0)
                masked[none, scores[none].argmax(-1)] = True
        labels[~masked] = -100
        inputs = input_ids.clone()
        replace = (torch.rand(input_ids.shape, generator=g) < 0.8) & masked
        inputs[replace] = self.tokenizer.mask_token_id
        randomize = (torch.rand(input_ids.shape, generator=g) < 0.5) & masked & ~replace
        inputs[randomize] = torch.randint(len(self.tokenizer), input_ids.shape, generator=g)[randomize]
        return inputs, labels

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if "input_ids" in features[0]:
            batch["input_ids"], batch["attention_mask"] = self._pad([f["input_ids"] for f in features])
            for key in ("labels", "label"):
                if key in features[0]:
                    batch["labels"] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "mlm_input_ids" in features[0]:
            ids, mask = self._pad([f["mlm_input_ids"] for f in features])
            batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(ids, mask)
            batch["mlm_attention_mask"] = mask
            for key in AUX_COLUMNS:
                if key in features[0]:
                    batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch
