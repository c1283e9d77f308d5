"""An endless, resumable, rank-sharded stream of meta (clean) batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def example_lengths(dataset: Any) -> list[int] | None:
    """The number of tokens of every example (its ``input_ids``), or None when the dataset has no such column."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return [len(ids) for ids in dataset["input_ids"]] if "input_ids" in names else None
    try:
        return [len(e["input_ids"]) for e in dataset]
    except (KeyError, TypeError, IndexError):
        return None


def longest_first(lengths: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """``(order, position)``: the row indices sorted by length, longest first (to run forward passes over batches of
    similar length), and the position of every row in that order, so ``torch.cat(outputs)[position]`` puts outputs
    computed in ``order`` back in the rows' order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return order, position


class MetaBatchStream:
    """Cycles through ``dataset`` in shuffled epochs, each rank taking its own shard (as ``DistributedSampler``).

    The order depends only on (``seed``, epoch), and the position is saved by :meth:`state_dict`, so a resumed run
    draws exactly the batches an uninterrupted run would. Every batch has ``batch_size`` examples (the tail of an
    epoch that does not fill a batch is left out of it: with shuffling, a different few each epoch).

    With ``lengths`` (one per example) batches hold examples of similar length, as ``transformers``'
    ``LengthGroupedSampler``: each rank's shard is cut into mega-batches of up to 50 batches, each mega-batch is
    sorted by length, cut into batches, and the batches are shuffled. A padded batch is then about as long as its
    examples instead of as its longest one.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        lengths: list[int] | None = None,
    ):
        n = len(dataset)
        if n == 0:
            raise ValueError("the meta dataset is empty")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"got {len(lengths)} lengths for {n} meta examples")
        self.lengths = lengths
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.per_rank = -(-n // world_size)  # ceil: pad by wrapping around, as DistributedSampler
        self.batch_size = min(batch_size, self.per_rank)
        self.epoch = 0
        self.position = 0
        self._indices: list[int] | None = None

    def _epoch_indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.per_rank * self.world_size
        order = (order * (-(-total // n)))[:total]
        shard = order[self.rank : total : self.world_size]
        return shard if self.lengths is None else self._grouped_by_length(shard)

    def _grouped_by_length(self, shard: list[int]) -> list[int]:
        size = self.batch_size
        # the examples that do not fill a batch are the last of the shuffled shard, as without grouping, so which
        # ones sit out an epoch changes with the epoch (sorting first would leave out the shortest every epoch)
        kept = len(shard) - len(shard) % size
        shard, tail = shard[:kept], shard[kept:]
        mega = size * 50
        batches = []
        for start in range(0, len(shard), mega):
            part = sorted(shard[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 500_009)
        order = torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches))
        return [i for j in order for i in batches[j]] + tail

    def next_batch(self) -> Any:
        """The next batch (collated)."""
        if self._indices is None:
            self._indices = self._epoch_indices()
        if self.position + self.batch_size > len(self._indices):
            self.epoch, self.position = self.epoch + 1, 0
            self._indices = self._epoch_indices()
        idx = self._indices[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate_fn([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, int]:
        """The position in the stream (epoch, examples drawn in it)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._indices = None


def split_points(lengths: Sequence[int], size: int | None = None, pass_overhead: float | None = None) -> list[int]:
    """Where to cut examples sorted by decreasing length into micro-batches: the end index of each micro-batch.

    Each micro-batch costs ``pass_overhead + n * longest`` token positions (its ``n`` examples padded to its longest,
    plus a fixed cost per forward/backward pass in token positions); the cuts minimise the total cost, with at most
    ``size`` examples per micro-batch. Without ``pass_overhead``, micro-batches of ``size`` examples; with neither,
    one micro-batch.
    """
    n = len(lengths)
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("split_points needs lengths sorted in decreasing order")
    cap = n if size is None else max(1, min(size, n))
    if pass_overhead is None:
        return list(range(cap, n, cap)) + [n] if n else []
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - cap), j):  # the last micro-batch is examples i..j-1, its longest is lengths[i]
            cost = best[i] + pass_overhead + (j - i) * lengths[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def length_chunks(
    batch: dict[str, Any], size: int | None = None, pass_overhead: float | None = None
) -> list[tuple[dict[str, Any], int]]:
    """``batch`` cut into micro-batches of examples of similar length, each trimmed to its longest example:
    ``[(micro_batch, num_examples), ...]``.

    The examples are sorted by ``attention_mask.sum(-1)`` and cut by :func:`split_points` (micro-batches of up to
    ``size`` examples; with ``pass_overhead``, only where the padding saved outweighs the cost of another pass). The
    tokenizer's ``[B, T]`` columns and integer ``[B, T]`` tensors (token labels) are cut to the micro-batch's longest
    example, other ``[B, ...]`` tensors are indexed. A batch without ``input_ids`` and ``attention_mask``, with
    padding that is not on the right, or with values that are not tensors is returned whole, as is a batch that
    stays one micro-batch.
    """
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor) or mask.dim() != 2:
        return [(batch, _batch_len(batch))]
    n, width = mask.shape
    if (size is None or n <= size) and pass_overhead is None:
        return [(batch, n)]
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n for v in batch.values()):
        return [(batch, n)]
    lengths = mask.ne(0).sum(-1)
    right_padded = torch.equal(mask.ne(0), torch.arange(width, device=mask.device)[None, :] < lengths[:, None])
    if not right_padded:
        return [(batch, n)]
    order = torch.argsort(lengths, descending=True, stable=True)
    ends = split_points(lengths[order].tolist(), size, pass_overhead)
    if len(ends) == 1:  # one micro-batch: the examples in their order, trimmed to the longest
        if int(lengths.max()) == width:
            return [(batch, n)]
        order = torch.arange(n, device=lengths.device)
    chunks, start = [], 0
    for end in ends:
        index = order[start:end]
        start = end
        keep = int(lengths[index].max())
        chunk = {}
        for key, value in batch.items():
            value = value.index_select(0, index.to(value.device))
            if _per_token(key, value, width):
                value = value[:, :keep]
            chunk[key] = value
        chunks.append((chunk, len(index)))
    return chunks


def mean_over_chunks(loss: Callable[[dict[str, Any]], torch.Tensor], chunks: list[tuple[dict[str, Any], int]]):
    """The mean of a per-example loss over the whole batch from its micro-batches ``[(micro_batch, n), ...]`` (as
    :func:`length_chunks` returns them): the sum of ``loss(micro_batch)`` (a mean) weighted by ``n / total``."""
    if len(chunks) == 1:
        return loss(chunks[0][0])
    total = sum(n for _, n in chunks)
    return sum(loss(chunk) * (n / total) for chunk, n in chunks)


_TOKEN_KEYS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "special_tokens_mask"}


def _per_token(key: str, value: torch.Tensor, width: int) -> bool:
    """A ``[B, T, ...]`` value with one entry per token: the tokenizer's columns, and integer tensors of that shape
    (token labels); a float ``[B, C]`` (e.g. soft labels) is per example even when ``C == T``."""
    if value.dim() < 2 or value.shape[1] != width:
        return False
    return key in _TOKEN_KEYS or not (value.is_floating_point() or value.is_complex())


def _batch_len(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1
