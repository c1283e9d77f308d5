"""The weight each training example received in each epoch, kept as per-epoch sums and counts by example index."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


__all__ = ["WeightHistory"]


class WeightHistory:
    """Per-epoch sums and counts of the weights given to each example (by its index in the training set).

    :meth:`record` adds a batch's weights on the device (no host sync); :meth:`mean` averages them over all epochs or
    the last ``E`` recorded ones, e.g. the pruning score of meta-learned data pruning. Under DDP every rank records the
    examples it drew; :meth:`synchronize` sums the ranks' records (call it on every rank).
    """

    def __init__(self, num_examples: int = 0):
        self.num_examples = num_examples
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, torch.Tensor] = {}

    @classmethod
    def for_dataset(cls, dataset: Any, id_column: str) -> WeightHistory:
        """A history sized for ``dataset``; raises ``ValueError`` naming the fix if its ``id_column`` holds an index
        outside ``[0, len(dataset))`` (e.g. ids of a larger table the dataset was selected from)."""
        size = len(dataset) if hasattr(dataset, "__len__") else 0
        if size and id_column in (getattr(dataset, "column_names", None) or []):
            ids = dataset[id_column]
            low, high = min(ids), max(ids)
            if low < 0 or high >= size:
                raise ValueError(
                    f"the training set's {id_column!r} column holds indices in [{low}, {high}], outside [0, {size}): "
                    f"set it to the row index (e.g. dataset.remove_columns({id_column!r}).add_column({id_column!r}, "
                    "list(range(len(dataset))))) or name another column with example_id_column"
                )
        return cls(size)

    @property
    def epochs(self) -> list[int]:
        """The epochs with records, in order."""
        return sorted(self._sums)

    def _grow(self, size: int) -> None:
        """Widen every table to ``size`` examples."""
        size = max(size, self.num_examples)
        for table in (self._sums, self._counts):
            for epoch, t in table.items():
                if t.numel() < size:
                    table[epoch] = torch.cat([t, t.new_zeros(size - t.numel())])
        self.num_examples = size

    @torch.no_grad()
    def record(self, epoch: int, example_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Add the weights [B] of the examples ``example_ids`` [B] (indices in ``[0, num_examples)``) drawn in
        ``epoch``. With ``num_examples`` unknown (0) the tables grow to the largest index seen (a host sync)."""
        ids = example_ids.reshape(-1).long().to(weights.device)
        if ids.numel() == 0:
            return
        if self.num_examples == 0:
            self._grow(int(ids.max()) + 1)
        if epoch not in self._sums:
            self._sums[epoch] = torch.zeros(self.num_examples, dtype=torch.float64, device=weights.device)
            self._counts[epoch] = torch.zeros(self.num_examples, dtype=torch.float64, device=weights.device)
        self._sums[epoch].index_add_(0, ids, weights.detach().reshape(-1).to(torch.float64))
        self._counts[epoch].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def _selected(self, last_epochs: int | None) -> list[int]:
        epochs = self.epochs
        if last_epochs is not None:
            if last_epochs < 1:
                raise ValueError(f"last_epochs must be >= 1 (got {last_epochs})")
            epochs = epochs[-last_epochs:]
        return epochs

    def totals(self, last_epochs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of weights, number of draws) per example over the selected epochs, float64 on the CPU."""
        sums = torch.zeros(self.num_examples, dtype=torch.float64)
        counts = torch.zeros(self.num_examples, dtype=torch.float64)
        for epoch in self._selected(last_epochs):
            sums += self._sums[epoch].cpu()
            counts += self._counts[epoch].cpu()
        return sums, counts

    def mean(self, last_epochs: int | None = None) -> torch.Tensor:
        """Mean weight per example over all epochs or the last ``last_epochs`` ones (NaN where never drawn)."""
        sums, counts = self.totals(last_epochs)
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))

    def synchronize(self) -> None:
        """Sum the records of all ranks (every rank must call it, with the same epochs recorded or not)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        sizes = torch.tensor([float(self.num_examples), float(max(self.epochs, default=-1))], device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        size, last = int(sizes[0]), int(sizes[1])
        self._grow(size)
        self._sums = {e: t.to(device) for e, t in self._sums.items()}
        self._counts = {e: t.to(device) for e, t in self._counts.items()}
        for epoch in range(last + 1):
            for table in (self._sums, self._counts):
                t = table.get(epoch)
                if t is None:
                    t = table[epoch] = torch.zeros(size, dtype=torch.float64, device=device)
                dist.all_reduce(t)
        for epoch in [e for e in self.epochs if not bool(self._counts[e].any())]:
            del self._sums[epoch], self._counts[epoch]

    def state_dict(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "sums": {e: t.cpu() for e, t in self._sums.items()},
            "counts": {e: t.cpu() for e, t in self._counts.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.num_examples = int(state["num_examples"])
        self._sums = {int(e): t.to(device) for e, t in state["sums"].items()}
        self._counts = {int(e): t.to(device) for e, t in state["counts"].items()}
