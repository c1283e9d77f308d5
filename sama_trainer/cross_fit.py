"""``CrossFitMetaSet``: SAMA's meta set taken in turns from disjoint parts of a clean set.

With one meta set SAMA's base update fits the same clean examples all run long. Cross-fitting splits the clean set
into parts and gives each part a span of the run as meta set: every clean example is a meta example for a while,
and each new part starts on examples the base update has not fitted yet. (At the end of the run none is new to the
model, unlike a part that is held out throughout; RESULTS.md compares the two.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .callbacks import SAMACallback


__all__ = ["CrossFitMetaSet"]


class CrossFitMetaSet(SAMACallback):
    """Draws :class:`~sama_trainer.SAMATrainer`'s meta batches from ``parts[i]`` during the ``i``-th of
    ``len(parts)`` equal spans of the run's meta steps (``parts``: two or more datasets, e.g. the two halves of
    :func:`~sama_trainer.pipelines.split_meta_set`).

    Build the trainer with ``parts[0]`` as its ``meta_dataset``. Each part starts a fresh stream of meta batches
    when its span begins (``SAMATrainer.set_meta_dataset``). The span is a function of the meta-step count, which
    checkpoints keep, so a resumed run takes back the part it was drawing from, at its position, and draws the meta
    batches an uninterrupted run would. ``history`` holds (meta step, part index) of every switch this process
    made.
    """

    def __init__(self, parts: Sequence[Any]):
        parts = list(parts)
        if len(parts) < 2:
            raise ValueError(f"CrossFitMetaSet needs two or more parts of the meta set (got {len(parts)})")
        if any(part is None or len(part) == 0 for part in parts):
            raise ValueError("every part of CrossFitMetaSet must hold examples")
        self.parts = parts
        self.history: list[tuple[int, int]] = []
        self._current: int | None = None

    @staticmethod
    def total_meta_steps(args: Any, max_steps: int) -> int:
        """Meta steps in a run of ``max_steps`` optimizer steps: one after each ``unroll_steps``-th step past
        ``meta_warmup_steps``."""
        unroll, warmup = args.unroll_steps, args.meta_warmup_steps
        return max(max_steps // unroll - warmup // unroll, 1)

    def part_of_meta_step(self, k: int, total: int) -> int:
        """Index of the part that meta step ``k`` (0-based) of ``total`` draws from."""
        return min(len(self.parts) - 1, max(k, 0) * len(self.parts) // total)

    def on_train_begin(self, args, state, control, **kwargs: Any):
        self._current = None

    def on_meta_step_begin(self, args, state, control, trainer=None, **kwargs: Any):
        k, total = trainer.meta_step_count, self.total_meta_steps(args, state.max_steps)
        if self._current is None:  # this process's first meta step: the part the run drew from so far
            self._current = self.part_of_meta_step(k - 1, total) if k else 0
            if trainer.meta_dataset is not self.parts[self._current]:
                trainer.set_meta_dataset(self.parts[self._current], keep_position=k > 0)
        part = self.part_of_meta_step(k, total)
        if part != self._current:
            trainer.set_meta_dataset(self.parts[part])
            self._current = part
            self.history.append((k, part))
