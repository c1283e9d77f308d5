"""Meta micro-batches: cutting the meta batch by length and trimming its padding leaves the meta step unchanged."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import sama_args, tiny_bert, token_dataset

from sama_trainer import SAMATrainer
from sama_trainer.meta_data import length_chunks


def _pad(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` with 0 to the longest example; mask 1 on real tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def _ragged(n: int, seed: int) -> Dataset:
    """Meta examples of 2 to 12 tokens, the first token encoding the class, as ``token_dataset``."""
    g = torch.Generator().manual_seed(seed)
    base = token_dataset(n, seq_len=12, seed=seed)
    lengths = torch.randint(2, 13, (n,), generator=g).tolist()
    ids = [row[:k] for row, k in zip(base["input_ids"], lengths)]
    return Dataset.from_dict({"input_ids": ids, "labels": base["labels"]})


def test_length_chunks_sort_trim_and_keep_every_example():
    batch = _pad([{"input_ids": list(range(1, k + 1)), "labels": k} for k in (3, 7, 1, 5, 6, 2)])
    batch["soft"] = torch.rand(6, 7)  # per example, as wide as the padded batch: indexed, not trimmed
    chunks = length_chunks(batch, 4)
    assert [n for _, n in chunks] == [4, 2]
    first, second = chunks[0][0], chunks[1][0]
    assert first["labels"].tolist() == [7, 6, 5, 3] and first["input_ids"].shape == (4, 7)
    assert second["labels"].tolist() == [2, 1] and second["input_ids"].shape == (2, 2)
    assert second["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert second["soft"].shape == (2, 7) and torch.equal(second["soft"], batch["soft"][[5, 2]])
    assert len(length_chunks(batch, 6)) == 1  # fits in one micro-batch
    left = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    assert length_chunks(left, 2) == [(left, 6)]  # left padding: not trimmed, not cut
    listed = dict(batch, text=["a"] * 6)
    assert length_chunks(listed, 2) == [(listed, 6)]  # a value that cannot be cut


@pytest.mark.parametrize("micro", [1, 3])
def test_meta_steps_with_micro_batches_equal_the_whole_batch(tmp_path, micro):
    train, meta = token_dataset(32, noise=0.3, seed=1), _ragged(12, seed=2)

    def run(out, **extra):
        args = sama_args(tmp_path / out, max_steps=6, meta_batch_size=8, **extra)
        trainer = SAMATrainer(tiny_bert(dropout=0.0), args, train, meta_dataset=meta, meta_data_collator=_pad)
        trainer.train()
        return trainer

    whole, cut = run("whole"), run("cut", meta_micro_batch_size=micro)
    assert whole.meta_step_count == cut.meta_step_count == 3
    for a, b in zip(whole.meta_model.parameters(), cut.meta_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(whole.model.parameters(), cut.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    initial = tiny_bert(dropout=0.0).state_dict()  # the runs trained: the equality is not vacuous
    assert not all(torch.equal(initial[k], v) for k, v in whole.model.state_dict().items())


def test_meta_micro_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="meta_micro_batch_size must be >= 1"):
        sama_args(tmp_path, meta_micro_batch_size=0)
