"""Tiny in-process models and datasets for tests (no Hub access)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, TrainerCallback

from sama_trainer import ClassificationObjective, SAMAConfig
from sama_trainer.meta_gradient import core
from sama_trainer.pretrained import tiny_bert_classifier


VOCAB = 64


def tiny_bert(num_labels: int = 3, dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    """The library's tiny BERT classifier, smaller still (hidden size 16), seeded."""
    torch.manual_seed(seed)
    return tiny_bert_classifier(VOCAB, num_labels, max_positions=32, hidden_size=16, num_heads=4, dropout=dropout)


def token_dataset(n: int, num_labels: int = 3, seq_len: int = 8, seed: int = 0, noise: float = 0.0) -> Dataset:
    """Sequences whose first token encodes the class (learnable), with a fraction `noise` of flipped labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    ids = torch.randint(num_labels + 2, VOCAB, (n, seq_len), generator=g)
    ids[:, 0] = 2 + labels  # class token
    flip = torch.rand(n, generator=g) < noise
    noisy = torch.where(flip, (labels + 1) % num_labels, labels)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones(n, seq_len, dtype=torch.long).tolist(),
            "labels": noisy.tolist(),
            "clean_labels": labels.tolist(),
        }
    )


def pad_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Collate examples of different lengths: ``input_ids`` zero-padded to the longest (no real token is 0), the
    attention mask marking the real tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def sama_args(output_dir, **overrides) -> SAMAConfig:
    """Small, fast, deterministic CPU defaults for trainer tests."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=12,
        unroll_steps=2,
        logging_steps=4,
        learning_rate=1e-3,
        meta_learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    kwargs.update(overrides)
    return SAMAConfig(**kwargs)


def train_and_meta(n_train: int = 64, n_meta: int = 16) -> tuple[Dataset, Dataset]:
    """A noisy training set (30% flipped labels) and a clean meta set."""
    train = token_dataset(n_train, noise=0.3, seed=1).remove_columns(["clean_labels"])
    meta = token_dataset(n_meta, seed=2).remove_columns(["clean_labels"])
    return train, meta


class RecordingObjective(ClassificationObjective):
    """Logs the ids and weights of every base step (not of the meta step's perturbed passes) in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[int], list[float]]] = []
        self._base = False

    def base_losses(self, model, inputs):
        self._base = True
        return super().base_losses(model, inputs)

    def weighted_loss(self, meta_model, examples):
        loss, weights = super().weighted_loss(meta_model, examples)
        if self._base:
            self.calls.append((examples.example_ids.tolist(), weights.detach().double().tolist()))
            self._base = False
        return loss, weights


class StopAt(TrainerCallback):
    """Simulates an interruption: stop after ``step`` optimizer steps (a checkpoint due at that step is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def count_draw_recorders(monkeypatch) -> list:
    """Patch the perturbed passes' recorder of random draws so that each one built is appended to the returned list."""
    recorders: list = []

    class Counted(core._RandomDraws):
        def __init__(self):
            super().__init__()
            recorders.append(self)

    monkeypatch.setattr(core, "_RandomDraws", Counted)
    return recorders
