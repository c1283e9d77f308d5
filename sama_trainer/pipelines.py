"""Training phases that several methods share: plain fine-tuning (hard or soft labels) and continuing a trained
model on another dataset (e.g. the clean set after training on weak labels)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from .losses import per_example_cross_entropy


__all__ = ["SoftLabelTrainer", "continuation_trainer", "default_continue_steps", "plain_trainer"]


class SoftLabelTrainer(Trainer):
    """``Trainer`` with cross-entropy against soft (probability) labels [B, C]; class ids work too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = per_example_cross_entropy(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss


def plain_trainer(
    model: nn.Module, args: TrainingArguments, train_dataset: Any, soft_labels: bool = False, **kwargs: Any
) -> Trainer:
    """A ``Trainer`` for plain fine-tuning: the model's own loss for class ids, :class:`SoftLabelTrainer` for soft
    labels."""
    cls = SoftLabelTrainer if soft_labels else Trainer
    return cls(model=model, args=args, train_dataset=train_dataset, **kwargs)


def default_continue_steps(num_examples: int, args: TrainingArguments, epochs: float = 3.0, minimum: int = 10) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_examples`` at ``args``' global batch size (at least
    ``minimum``)."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return max(minimum, math.ceil(epochs * num_examples / per_step))


def continuation_trainer(
    model: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    *,
    steps: int,
    learning_rate: float | None = None,
    soft_labels: bool = False,
    **kwargs: Any,
) -> Trainer:
    """A trainer that continues ``model`` (in place) for ``steps`` optimizer steps on ``train_dataset`` with plain
    fine-tuning; call ``.train()`` on it.

    The phase uses a copy of ``args`` (any ``TrainingArguments``, e.g. the ``SAMAConfig`` of the phase before) with a
    fresh optimizer and schedule, no warm-up, no evaluation and no checkpoints; ``learning_rate`` defaults to
    ``args.learning_rate``. ``kwargs`` go to the ``Trainer`` (``data_collator``, ``processing_class``, ...).
    """
    phase_args = dataclasses.replace(
        args,
        max_steps=steps,
        learning_rate=learning_rate or args.learning_rate,
        warmup_steps=0,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    return plain_trainer(model, phase_args, train_dataset, soft_labels, **kwargs)
