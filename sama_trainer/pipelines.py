"""Training pipelines over noisy data and a clean set: plain fine-tuning (hard or soft labels), continuing a trained
model on another dataset, and :func:`fit_with_clean_set`, which uses the clean set both as SAMA's meta set and for
training (after, before or mixed into the main phase), optionally holding part of it out of the meta set or
swapping the parts halfway."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from transformers import Trainer, TrainingArguments

from .losses import per_example_cross_entropy


__all__ = [
    "CLEAN_SET_MODES",
    "Phase",
    "SoftLabelTrainer",
    "continuation_trainer",
    "default_continue_steps",
    "fit_with_clean_set",
    "plain_trainer",
    "split_meta_set",
]


class SoftLabelTrainer(Trainer):
    """``Trainer`` with cross-entropy against soft (probability) labels [B, C]; class ids work too. With
    ``example_weight_column`` each example's loss is multiplied by that training-set column's value (fixed weights,
    e.g. :func:`~sama_trainer.data.fit_vote_prior`'s), the batch loss being the mean of the weighted losses (an
    evaluation set without the column is scored unweighted)."""

    def __init__(self, *args: Any, example_weight_column: str | None = None, **kwargs: Any):
        self.example_weight_column = example_weight_column
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.example_weight_column and self.example_weight_column not in self._signature_columns:
            self._signature_columns.append(self.example_weight_column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        weights = inputs.pop(self.example_weight_column, None) if self.example_weight_column else None
        if self.example_weight_column and weights is None and model.training:  # evaluation sets need no weights
            raise ValueError(
                f"the batch has no {self.example_weight_column!r} (example_weight_column): add the column to the "
                "training dataset, or unset example_weight_column"
            )
        outputs = model(**inputs)
        losses = per_example_cross_entropy(outputs.logits, labels)
        loss = (losses if weights is None else weights.to(losses.dtype) * losses).mean()
        return (loss, outputs) if return_outputs else loss


def plain_trainer(
    model: nn.Module,
    args: TrainingArguments,
    train_dataset: Any,
    soft_labels: bool = False,
    example_weight_column: str | None = None,
    **kwargs: Any,
) -> Trainer:
    """A ``Trainer`` for plain fine-tuning: the model's own loss for class ids, :class:`SoftLabelTrainer` for soft
    labels or fixed per-example weights (``example_weight_column``)."""
    if soft_labels or example_weight_column:
        return SoftLabelTrainer(
            model=model, args=args, train_dataset=train_dataset, example_weight_column=example_weight_column, **kwargs
        )
    return Trainer(model=model, args=args, train_dataset=train_dataset, **kwargs)


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


CLEAN_SET_MODES = ("continue", "warm_start", "mix")


@dataclass
class Phase:
    """One training phase of :func:`fit_with_clean_set`: its trainer and what it cost."""

    name: str  # "clean" (plain fine-tuning on the clean set) or "main" (the training set, with SAMA if meta data)
    trainer: Trainer
    seconds: float
    cpu_seconds: float  # process CPU time (all threads)


def _mixed(train_dataset: Any, clean_dataset: Any, copies: int, id_column: str | None) -> Any:
    """The training rows followed by ``copies`` copies of the clean rows; if the training rows carry example ids (row
    indices), the clean rows get the ids that continue them."""
    from datasets import concatenate_datasets

    parts = [train_dataset] + [clean_dataset] * copies
    if id_column and id_column in train_dataset.column_names and id_column not in clean_dataset.column_names:
        n, m = len(train_dataset), len(clean_dataset)
        parts[1:] = [clean_dataset.add_column(id_column, list(range(n + j * m, n + j * m + m))) for j in range(copies)]
    return concatenate_datasets(parts)


def split_meta_set(meta_dataset: Any, fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """(meta part, held-out rest) of ``meta_dataset``: within each class (its ``labels`` or ``label`` column) a
    seeded ``round(fraction · n_c)`` of the class's rows, at least one, and the other rows; ``(meta_dataset, None)``
    for ``fraction`` 1."""
    from .data.preparation import stratified_part

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"meta_fraction must be in (0, 1] (got {fraction}); 1 uses the whole meta set")
    if fraction == 1.0:
        return meta_dataset, None
    column = next((c for c in ("labels", "label") if c in meta_dataset.column_names), None)
    if column is None:
        raise ValueError("meta_fraction < 1 stratifies by class: the meta set needs a 'labels' or 'label' column")
    part = stratified_part(meta_dataset[column], fraction, seed)
    rest = np.setdiff1d(np.arange(len(meta_dataset)), part)
    if len(rest) == 0:
        raise ValueError(f"meta_fraction {fraction} leaves no example of the {len(meta_dataset)} out of the meta set")
    return meta_dataset.select(part.tolist()), meta_dataset.select(rest.tolist())


def fit_with_clean_set(
    model: nn.Module,
    args: TrainingArguments,
    train_dataset: Any,
    *,
    meta_dataset: Any = None,
    clean_dataset: Any = None,
    mode: str = "continue",
    clean_steps: int | None = None,
    clean_learning_rate: float | None = None,
    clean_upsample: int = 1,
    meta_fraction: float = 1.0,
    held_out_base_update: bool = False,
    cross_fit: bool = False,
    split_seed: int = 0,
    soft_labels: bool = False,
    prepare: Callable[[Trainer], Any] | None = None,
    after_main: Callable[[Trainer], Any] | None = None,
    **trainer_kwargs: Any,
) -> list[Phase]:
    """Train ``model`` on ``train_dataset`` (with SAMA when ``meta_dataset`` is given) and on a clean set, without
    spending the clean set on one use only.

    With ``clean_dataset`` (the clean examples with labels in the training format) the clean set is also trained on,
    by ``mode``: ``"continue"`` (fine-tune on it after the main phase, ``clean_steps`` steps, default 3 epochs),
    ``"warm_start"`` (before it) or ``"mix"`` (its rows, repeated ``clean_upsample`` times, join the training set).
    ``meta_dataset`` (usually the same clean examples with their labels) makes the main phase a
    :class:`~sama_trainer.SAMATrainer` run (``args`` must then be a ``SAMAConfig``). With ``meta_fraction`` below 1
    SAMA's meta set is a class-stratified part of ``meta_dataset`` (seeded by ``split_seed``); the rest is held out
    of the main phase, so the clean phase still has examples the model has not fitted, and with
    ``held_out_base_update`` it sizes SAMA's base update (:class:`~sama_trainer.HeldOutBaseUpdate`); with
    ``cross_fit`` the two parts swap halfway through the main phase (:class:`~sama_trainer.CrossFitMetaSet`: the
    part is the meta set for the first half of the meta steps, the rest for the second). With
    ``args.example_weight_column`` (a ``SAMAConfig`` field) the main phase multiplies each example's loss by that
    column, with or without SAMA; the clean phase never does. ``prepare``
    is called on each trainer before it trains (e.g. to change its callbacks), ``after_main`` on the main phase's
    trainer right after it (e.g. to read the learned weights before the clean phase changes the model). Returns the
    phases in order.
    """
    if mode not in CLEAN_SET_MODES:
        raise ValueError(f"mode must be one of {CLEAN_SET_MODES}, got {mode!r}")
    if meta_dataset is not None:
        meta_dataset, held_out = split_meta_set(meta_dataset, meta_fraction, split_seed)
        for option, wanted in (("held_out_base_update", held_out_base_update), ("cross_fit", cross_fit)):
            if wanted and held_out is None:
                raise ValueError(f"{option}=True needs clean examples held out of the meta set: set meta_fraction < 1")
        if held_out_base_update and cross_fit:
            raise ValueError("held_out_base_update and cross_fit both use the held-out part: choose one")
        if held_out_base_update:
            from .held_out_base_update import HeldOutBaseUpdate

            sizer = HeldOutBaseUpdate(held_out, seed=split_seed)
            trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), sizer]
        if cross_fit:
            from .cross_fit import CrossFitMetaSet

            swap = CrossFitMetaSet([meta_dataset, held_out])
            trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), swap]
    elif meta_fraction < 1.0 or held_out_base_update or cross_fit:
        raise ValueError("meta_fraction, held_out_base_update and cross_fit split the meta set: pass meta_dataset=...")
    phases: list[Phase] = []

    def run(name: str, trainer: Trainer) -> Trainer:
        if prepare is not None:
            prepare(trainer)
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        phases.append(Phase(name, trainer, time.perf_counter() - start, time.process_time() - cpu))
        return trainer

    def clean_phase() -> None:
        steps = clean_steps or default_continue_steps(len(clean_dataset), args)
        common = {k: v for k, v in trainer_kwargs.items() if k in ("data_collator", "processing_class")}
        options = dict(steps=steps, learning_rate=clean_learning_rate, soft_labels=soft_labels)
        run("clean", continuation_trainer(model, clean_dataset, args, **options, **common))

    if clean_dataset is not None and mode == "mix":
        train_dataset = _mixed(train_dataset, clean_dataset, clean_upsample, getattr(args, "example_id_column", None))
    if clean_dataset is not None and mode == "warm_start":
        clean_phase()
    if meta_dataset is not None:
        from .sama_trainer import SAMATrainer

        main_trainer = SAMATrainer(model, args, train_dataset, meta_dataset=meta_dataset, **trainer_kwargs)
    else:
        weight_column = getattr(args, "example_weight_column", None)
        main_trainer = plain_trainer(model, args, train_dataset, soft_labels, weight_column, **trainer_kwargs)
    main = run("main", main_trainer)
    if after_main is not None:
        after_main(main)
    if clean_dataset is not None and mode == "continue":
        clean_phase()
    return phases
