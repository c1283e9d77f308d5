"""Tiny in-process models and datasets for tests (no Hub access)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification


VOCAB = 64


def tiny_bert(num_labels: int = 3, dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


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
