"""Callback events of the meta step, on top of the ``transformers`` ``TrainerCallback`` events."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


__all__ = ["SAMACallback"]


class SAMACallback(TrainerCallback):
    """A ``TrainerCallback`` that also receives the meta-step events of :class:`~sama_trainer.SAMATrainer`.

    Both events are called with ``args``, ``state``, ``control`` and the keyword arguments ``model``, ``meta_model``
    and ``trainer`` (the :class:`~sama_trainer.SAMATrainer`: e.g. ``trainer.base_update_scale`` sizes the next base
    update, ``trainer.record_meta_metric`` adds to the training log, ``trainer.meta_loss_of`` evaluates a batch):

    * ``on_meta_step_begin``: right after the base optimizer step of every ``unroll_steps``-th step, before the meta
      step (the gradients of that step are still in ``.grad``);
    * ``on_meta_step``: after the meta step, with ``metrics``: ``meta_loss``, ``v_norm``, ``u_norm``, ``eps``
      (those the method computed), ``skipped`` (1.0 or 0.0) and one ``skip_reason_<reason>`` entry per reason of a
      skipped step.

    Plain ``TrainerCallback``s passed to the trainer keep working; only callbacks that define these methods receive
    the events.
    """

    def on_meta_step_begin(self, args, state, control, **kwargs: Any):
        pass

    def on_meta_step(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs: Any):
        pass
