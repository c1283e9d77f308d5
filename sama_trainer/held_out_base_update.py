"""``HeldOutBaseUpdate``: SAMA's base update θ ← θ - s·εu sized by the loss of held-out clean examples.

The base update moves θ along the meta-gradient direction u, so it fits the meta set. Whether that helps the model
is a question the meta set cannot answer (it is what is being fitted), but clean examples the meta step never sees
can: before each meta step this callback takes the loss of one held-out batch at θ, after it the loss of the same
batch at θ - s·εu, and sizes the next base update by the answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .callbacks import SAMACallback
from .distributed import all_reduce_mean_


__all__ = ["HeldOutBaseUpdate"]


class HeldOutBaseUpdate(SAMACallback):
    """Sizes :class:`~sama_trainer.SAMATrainer`'s base update by the loss of ``held_out_dataset`` (clean examples,
    tokenised like the meta set, that are not in it).

    Around every meta step the loss of one held-out batch is taken at θ and again at θ - s·εu (the same batch, no
    dropout): if the base update lowered it, the scale s of the next base update grows by ``grow`` (at most
    ``max_scale``), otherwise it shrinks by ``shrink``. The scale is ``trainer.base_update_scale`` (saved with the
    trainer's checkpoints), so the base update's size is ``s · sama_alpha``. Batches cycle through the held-out set
    in seeded shuffled epochs indexed by the meta-step count, so a resumed run draws the batches an uninterrupted
    one would; under DDP each rank takes its own shard and the losses are averaged, so every rank takes the same s.

    ``history`` holds (meta step, scale used, loss before, loss after) of every meta step this process ran.
    Cost: two no-grad forwards of one held-out batch per meta step. Logged as ``meta/base_update_scale`` (the scale
    each step used) and ``meta/held_out_loss_change`` (loss after minus before). Needs ``sama_base_update=True``.
    """

    def __init__(
        self,
        held_out_dataset: Any,
        *,
        batch_size: int | None = None,
        grow: float = 1.5,
        shrink: float = 0.5,
        max_scale: float = 1.0,
        data_collator: Any = None,
        seed: int = 0,
    ):
        if held_out_dataset is None or len(held_out_dataset) == 0:
            raise ValueError("HeldOutBaseUpdate needs held_out_dataset=...: clean examples that are not meta examples")
        if not (grow >= 1.0 and 0.0 < shrink < 1.0 and max_scale > 0.0):
            raise ValueError(f"need grow >= 1, 0 < shrink < 1 and max_scale > 0 (got {grow}, {shrink}, {max_scale})")
        self.held_out_dataset = held_out_dataset
        self.batch_size, self.data_collator, self.seed = batch_size, data_collator, seed
        self.grow, self.shrink, self.max_scale = grow, shrink, max_scale
        # (meta step, scale used, held-out loss before, after) of every meta step this process ran
        self.history: list[tuple[int, float, float, float]] = []
        self._rows: list[dict] | None = None
        self._batch: dict | None = None
        self._before: torch.Tensor | None = None

    def _held_out_rows(self, trainer: Any) -> list[dict]:
        if self._rows is None:
            dataset = self.held_out_dataset
            if trainer.args.remove_unused_columns and hasattr(dataset, "remove_columns"):
                dataset = trainer._remove_unused_columns(dataset, description="held-out")
            self._rows = [dataset[i] for i in range(len(dataset))]
        return self._rows

    def held_out_batch(self, trainer: Any, k: int) -> dict:
        """The ``k``-th held-out batch of this rank (a function of ``k``, the seed and the rank only)."""
        rows, args = self._held_out_rows(trainer), trainer.args
        world, rank = max(args.world_size, 1), args.process_index
        per_rank = -(-len(rows) // world)
        size = min(self.batch_size or args.meta_batch_size or args.per_device_train_batch_size, per_rank)
        epoch, j = divmod(k, max(per_rank // size, 1))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(rows))
        shard = np.resize(order, per_rank * world)[rank::world]  # wrap around to equal shards, as DistributedSampler
        collate = self.data_collator or trainer.meta_data_collator or trainer.data_collator
        return collate([rows[i] for i in shard[j * size : (j + 1) * size]])

    def _loss(self, trainer: Any) -> torch.Tensor:
        loss = trainer.meta_loss_of(self._batch).reshape(1)
        if trainer.args.world_size > 1:
            all_reduce_mean_([loss], trainer.args.world_size)
        return loss

    def on_train_begin(self, args, state, control, **kwargs: Any):
        if not getattr(args, "sama_base_update", False):
            raise ValueError("HeldOutBaseUpdate sizes the base update: set sama_base_update=True")

    def on_meta_step_begin(self, args, state, control, trainer=None, **kwargs: Any):
        self._batch = self.held_out_batch(trainer, trainer.meta_step_count)
        self._before = self._loss(trainer)

    def on_meta_step(self, args, state, control, trainer=None, metrics=None, **kwargs: Any):
        if self._before is None:
            return
        used = trainer.base_update_scale
        if not (metrics or {}).get("skipped"):
            before, after = float(self._before.item()), float(self._loss(trainer).item())
            self.history.append((trainer.meta_step_count - 1, used, before, after))
            trainer.record_meta_metric("held_out_loss_change", after - before)
            better = after < before
            trainer.base_update_scale = min(used * self.grow, self.max_scale) if better else used * self.shrink
        trainer.record_meta_metric("base_update_scale", used)
        self._batch = self._before = None
