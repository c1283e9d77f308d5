"""Meta micro-batches: cutting the meta batch by length and trimming its padding leaves the meta step unchanged."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from datasets import Dataset
from helpers import sama_args, tiny_bert, token_dataset

from sama_trainer import SAMATrainer
from sama_trainer.meta_data import length_chunks, longest_first, split_points


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


def _partitions(items: list[int]):
    """Every partition of ``items`` into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1 :]
        yield [[first]] + part


@pytest.mark.parametrize("size", [None, 2, 3])
def test_split_points_minimise_padding_plus_pass_cost_over_every_partition(size):
    rng = random.Random(0)
    for _ in range(40):
        lengths = sorted((rng.randint(1, 40) for _i in range(rng.randint(1, 7))), reverse=True)
        overhead = rng.choice([0.0, 5.0, 20.0, 80.0])

        def cost(blocks, lengths=lengths, overhead=overhead):
            return sum(overhead + len(b) * max(lengths[i] for i in b) for b in blocks)

        # any grouping of the examples, not only runs of the sorted order
        feasible = [p for p in _partitions(list(range(len(lengths)))) if size is None or max(map(len, p)) <= size]
        ends = split_points(lengths, size, overhead)
        blocks = [list(range(a, b)) for a, b in itertools.pairwise([0] + ends)]
        assert ends[-1] == len(lengths) and (size is None or max(map(len, blocks)) <= size)
        assert cost(blocks) == pytest.approx(min(map(cost, feasible))), (lengths, overhead)


def test_split_points_limits():
    lengths = [30, 30, 12, 12, 12, 3]
    assert split_points(lengths) == [6]  # neither: one micro-batch
    assert split_points(lengths, 4) == [4, 6]  # fixed size
    assert split_points(lengths, None, 0.0) == [2, 5, 6]  # passes are free: every length its own micro-batch
    assert split_points(lengths, None, 1e9) == [6]  # passes are dear: one
    assert split_points(lengths, 1, 1e9) == [1, 2, 3, 4, 5, 6]  # the size bound wins
    with pytest.raises(ValueError, match="decreasing"):
        split_points([1, 2])


def test_length_chunks_by_pass_cost():
    batch = _pad([{"input_ids": list(range(1, k + 1)), "labels": k} for k in (30, 2, 29, 3, 2, 31)])
    chunks = length_chunks(batch, None, 10.0)  # 3 * 31 + 3 * 3 + 20 beats 6 * 31 + 10
    assert [c["labels"].tolist() for c, _ in chunks] == [[31, 30, 29], [3, 2, 2]]
    assert [c["input_ids"].shape[1] for c, _ in chunks] == [31, 3]
    one = length_chunks(batch, None, 1e6)  # one micro-batch: the examples in their order
    assert len(one) == 1 and one[0][0]["labels"].tolist() == [30, 2, 29, 3, 2, 31]
    short = dict(batch, input_ids=torch.cat([batch["input_ids"], torch.zeros(6, 5, dtype=torch.long)], 1))
    short["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(6, 5, dtype=torch.long)], 1)
    ((trimmed, n),) = length_chunks(short, None, 1e6)  # padded beyond its longest example: trimmed
    assert n == 6 and torch.equal(trimmed["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(
    "micro", [{"meta_micro_batch_size": 1}, {"meta_micro_batch_size": 3}, {"meta_pass_overhead_tokens": 4.0}]
)
def test_meta_steps_with_micro_batches_equal_the_whole_batch(tmp_path, micro):
    train, meta = token_dataset(32, noise=0.3, seed=1), _ragged(12, seed=2)

    def run(out, **extra):
        args = sama_args(tmp_path / out, max_steps=6, meta_batch_size=8, **extra)
        trainer = SAMATrainer(tiny_bert(dropout=0.0), args, train, meta_dataset=meta, meta_data_collator=_pad)
        trainer.train()
        return trainer

    whole, cut = run("whole"), run("cut", **micro)
    assert whole.meta_step_count == cut.meta_step_count == 3
    # Summing the meta loss in another order changes its gradient in the last bits, and Adam's normalisation can
    # turn that into a visible change of an element whose gradient is near zero: allow a thousandth of one Adam step
    # (each step moves an element by up to its learning rate); a wrongly combined meta-gradient moves whole steps.
    for a, b in zip(whole.meta_model.parameters(), cut.meta_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * whole.args.meta_learning_rate)
    for a, b in zip(whole.model.parameters(), cut.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * whole.args.learning_rate)
    initial = tiny_bert(dropout=0.0).state_dict()  # the runs trained: the equality is not vacuous
    assert not all(torch.equal(initial[k], v) for k, v in whole.model.state_dict().items())


def test_meta_micro_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="meta_micro_batch_size must be >= 1"):
        sama_args(tmp_path, meta_micro_batch_size=0)


def test_meta_pass_overhead_tokens_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="meta_pass_overhead_tokens must be >= 0"):
        sama_args(tmp_path, meta_pass_overhead_tokens=-1)


def test_longest_first_puts_outputs_back_in_row_order():
    lengths = [3, 7, 1, 7, 5]
    order, position = longest_first(lengths)
    assert order == [1, 3, 4, 0, 2]  # longest first, ties in row order
    outputs = torch.tensor([float(lengths[i] * 10 + i) for i in order])  # computed in `order`
    assert outputs[position].tolist() == [30.0, 71.0, 12.0, 73.0, 54.0]
    assert longest_first([0, 0, 0])[0] == [0, 1, 2]
