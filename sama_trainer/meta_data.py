"""An endless, resumable, rank-sharded stream of meta (clean) batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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
