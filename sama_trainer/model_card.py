"""Hub model cards for models trained with ``SAMATrainer`` (and for the plain baselines of the recipes).

Cards are ``huggingface_hub.ModelCard``s: YAML metadata (``base_model``, ``datasets``, ``library_name``, ``tags`` and a
``model-index`` with the test metric when one is given) followed by a short text: what the model is, how it was
trained, the SAMA hyperparameters with the values actually used, and the citation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


__all__ = ["CardMetric", "base_model_id", "build_model_card", "sama_card_section", "save_trainer_card"]

SAMA_FIELDS = (
    "meta_gradient",
    "meta_objective",
    "unroll_steps",
    "sama_base_update",
    "meta_gradient_params",
    "meta_learning_rate",
    "correction_meta_learning_rate",
    "meta_weight_decay",
    "meta_batch_size",
    "meta_warmup_steps",
    "meta_weight_normalize",
    "meta_weight_normalize_by_class",
    "meta_weight_center",
    "meta_gradient_kwargs",
    "meta_dropout",
)
TRAINING_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "optim",
    "weight_decay",
    "seed",
)
PAPER_URL = "https://huggingface.co/papers/2310.05674"


@dataclass
class CardMetric:
    """One result for the card's ``model-index``: e.g. ``CardMetric("accuracy", 0.95, "WRENCH youtube", "test")``."""

    metric: str
    value: float
    dataset_name: str
    split: str = "test"
    dataset_type: str | None = None


def base_model_id(model: Any) -> str | None:
    """The name of the model ``model`` was fine-tuned from: its config's ``_name_or_path`` unless that is a local
    folder (a folder name says nothing on the Hub) or empty (a model built from a config). None otherwise."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not name or os.path.isabs(name) or os.path.isdir(name):
        return None
    return str(name)


def _value(x: Any) -> str:
    return "`" + str(x).replace("|", "\\|") + "`"  # a pipe would end the table cell, even in a code span


def sama_card_section(trainer: Any) -> str:
    """Markdown on how a ``SAMATrainer`` trained the model: method, meta network, meta set, hyperparameters."""
    args = trainer.args
    used = {  # the value in effect where the field says "default"
        "meta_batch_size": args.meta_batch_size or args.per_device_train_batch_size,
        "correction_meta_learning_rate": args.correction_meta_learning_rate or args.meta_learning_rate,
        "meta_gradient_params": args.meta_gradient_params or "all trainable parameters",
    }
    rows = [("sama_alpha (used)", args.meta_alpha)]
    rows += [(name, used.get(name, getattr(args, name))) for name in SAMA_FIELDS]
    table = "\n".join(f"| `{name}` | {_value(value)} |" for name, value in rows)
    size = sum(p.numel() for p in trainer.meta_model.parameters())
    net = f"`{type(trainer.meta_model).__name__}`, {size} parameters"
    return f"""## Training with SAMA

Trained with `SAMATrainer` (sama-trainer), which implements SAMA
([Making Scalable Meta Learning Practical]({PAPER_URL}), NeurIPS 2023): every `unroll_steps` base optimizer
steps, a meta network ({net}) takes a first-order meta-gradient step so that the model trained on the
reweighted / label-corrected training data does well on a meta set of {len(trainer.meta_dataset)} examples.
Meta steps: {trainer.meta_step_count}, of which {trainer.meta_steps_skipped} were skipped for non-finite values.

| SAMA setting | value |
|---|---|
{table}

The meta network is saved next to the model in `sama_meta_model/` and loads with
`sama_trainer.load_meta_model(path)`."""


SAMA_CITATION = """@inproceedings{choe2023sama,
    title     = {{Making Scalable Meta Learning Practical}},
    author    = {Sang Keun Choe and Sanket Vaibhav Mehta and Hwijeen Ahn and Willie Neiswanger and
                 Pengtao Xie and Emma Strubell and Eric Xing},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = 2023
}"""


def build_model_card(
    *,
    model_name: str,
    summary: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metrics: list[CardMetric] | None = None,
    training_args: Any = None,
    sections: list[str] | None = None,
    task: str = "text-classification",
    cite_sama: bool = False,
) -> ModelCard:
    """A model card with metadata a Hub page can index and a short human-readable text.

    Args:
        model_name: the card's title and ``model-index`` name.
        summary: one or two sentences on what the model does and how it was trained.
        base_model: the model it was fine-tuned from (see :func:`base_model_id`); None for a model trained from
            randomly initialised weights.
        datasets: dataset names or Hub ids it was trained on.
        tags: extra tags (``generated_from_trainer`` and ``text-classification`` are always added).
        metrics: results for the ``model-index`` (e.g. the test metric).
        training_args: ``TrainingArguments`` whose main hyperparameters are listed.
        sections: further markdown sections (e.g. :func:`sama_card_section`).
        cite_sama: add the SAMA citation.
    """
    metrics = metrics or []
    data = ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag=task,
        tags=list(dict.fromkeys(["generated_from_trainer", task, *(tags or [])])),
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type=task,
                dataset_type=m.dataset_type or m.dataset_name,
                dataset_name=m.dataset_name,
                dataset_split=m.split,
                metric_type=m.metric,
                metric_value=float(m.value),
            )
            for m in metrics
        ]
        or None,
    )
    origin = (
        f"It was fine-tuned from [{base_model}](https://huggingface.co/{base_model})."
        if base_model
        else "It was trained from randomly initialised weights."
    )
    parts = [f"# {model_name}", f"{summary} {origin}"]
    if metrics:
        rows = "\n".join(f"| {m.dataset_name} | {m.split} | {m.metric} | {m.value:.4f} |" for m in metrics)
        parts.append(f"## Results\n\n| dataset | split | metric | value |\n|---|---|---|---|\n{rows}")
    if training_args is not None:
        rows = "\n".join(
            f"| `{name}` | {_value(getattr(training_args, name))} |"
            for name in TRAINING_FIELDS
            if hasattr(training_args, name)
        )
        parts.append(f"## Training hyperparameters\n\n| setting | value |\n|---|---|\n{rows}")
    parts += sections or []
    if cite_sama:
        parts.append(f"## Citation\n\n```bibtex\n{SAMA_CITATION}\n```")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


def save_trainer_card(
    trainer: Any,
    *,
    summary: str,
    sections: list[str] | None = None,
    cite_sama: bool = False,
    model_name: str | None = None,
    base_model: str | None = None,
    dataset: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    metrics: list[CardMetric] | None = None,
    output_dir: str | None = None,
    **trainer_keywords: Any,
) -> None:
    """Write the ``README.md`` card of ``trainer``'s model (world process zero only): :func:`build_model_card` with the
    trainer's arguments, its ``_tag_names``, and ``base_model`` from the model's config when not given.

    ``Trainer.create_model_card``'s keywords are accepted too: ``finetuned_from`` and ``dataset_tags`` stand for
    ``base_model`` and ``dataset``; ``language``, ``license``, ``tasks`` and ``dataset_args`` are not used.
    """
    unknown = set(trainer_keywords) - {"finetuned_from", "dataset_tags", "dataset", "language", "license", "tasks"}
    unknown -= {"dataset_args"}
    if unknown:
        raise TypeError(f"unexpected model card argument(s): {', '.join(sorted(unknown))}")
    if not trainer.is_world_process_zero():
        return
    base_model = base_model or trainer_keywords.get("finetuned_from")
    dataset = dataset if dataset is not None else trainer_keywords.get("dataset_tags")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    card = build_model_card(
        model_name=model_name or os.path.basename(os.path.abspath(trainer.args.output_dir)),
        summary=summary,
        base_model=base_model or base_model_id(trainer.model),
        datasets=[dataset] if isinstance(dataset, str) else list(dataset or []),
        tags=list(dict.fromkeys([*tags, *getattr(trainer, "_tag_names", [])])),
        metrics=metrics,
        training_args=trainer.args,
        sections=sections,
        cite_sama=cite_sama,
    )
    output_dir = output_dir or trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    card.save(os.path.join(output_dir, "README.md"))
