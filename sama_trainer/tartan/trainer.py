"""Trainers for the TARTAN multitask model: a fixed auxiliary weight (:class:`TartanMTTrainer`) or SAMA-learned
weights per auxiliary example (:class:`TartanTrainer`, a :class:`~sama_trainer.SAMATrainer` with a
:class:`~sama_trainer.tartan.objective.TartanObjective`).

Both save the multitask model with its own ``save_pretrained`` (the classifier as a plain Hugging Face folder plus
``tartan_mlm_head.pt``; ``Trainer`` would save a non-``PreTrainedModel`` as one state dict, which safetensors refuses
because the MLM decoder shares the input embeddings), load it back on resume, evaluate the end task only and write a
Hub model card.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..meta_nets import save_meta_model
from ..model_card import sama_card_section, save_trainer_card
from ..sama_trainer import META_MODEL_DIR, SAMATrainer
from .model import MLM_HEAD_NAME
from .objective import END_TASK_KEYS, MLM_KEYS, TartanObjective


__all__ = ["TartanMTTrainer", "TartanTrainer"]

TARTAN_TAGS = ["tartan", "masked-lm-auxiliary"]


def _num_sources(train_dataset: Any) -> int:
    """Number of auxiliary corpora in a :class:`~sama_trainer.tartan.data.PairedDataset` (1 without ``aux_source``)."""
    aux = getattr(train_dataset, "aux_dataset", None)
    if aux is None or "aux_source" not in (getattr(aux, "column_names", None) or []):
        return 1
    return max(aux["aux_source"]) + 1


class _MultitaskTrainerMixin:
    """Saving, loading and the model card of a :class:`~sama_trainer.tartan.model.TartanMultitaskModel`."""

    card_summary = "An end-task classifier trained together with a masked-LM auxiliary task (TARTAN)."
    cite_sama = False

    def _use_end_task_labels(self) -> None:
        # the model's forward also takes mlm_labels, which evaluation batches lack: only "labels" are the labels
        if self.args.label_names is None:
            self.label_names = ["labels"]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The classifier as a plain HF model folder, the MLM head, the tokenizer and the training arguments."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # no public hook: Trainer reads one state dict, the multitask model is saved as classifier + MLM head
        self.accelerator.unwrap_model(model or self.model).load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # no public hook (load_best_model_at_end): as _load_from_checkpoint
        self.model.load_weights(self.state.best_model_checkpoint)

    def method_description(self) -> str:
        """One sentence on how the model was trained (the model card's TARTAN section)."""
        raise NotImplementedError

    def card_sections(self) -> list[str]:
        """Markdown sections this trainer adds to the model card: what TARTAN training did and how to load it."""
        aux = getattr(self.train_dataset, "aux_dataset", None)
        data = "" if aux is None else f" Auxiliary masked-LM data: {len(aux)} examples."
        return [
            f"""## End-task-aware training (TARTAN)

{self.method_description()} (SAMA paper §4.2).{data} One encoder, two heads: the sequence classifier in this folder
loads with `AutoModelForSequenceClassification`, the MLM head is in `{MLM_HEAD_NAME}`
(`sama_trainer.tartan.TartanMultitaskModel.from_pretrained` loads both)."""
        ]

    def create_model_card(self, summary: str | None = None, sections: list[str] | None = None, **card: Any) -> None:
        """Write ``README.md``: a Hub model card (``base_model``, ``datasets``, ``tags``, a ``model-index`` of
        ``metrics``), the training hyperparameters, ``sections`` and this trainer's own sections."""
        save_trainer_card(
            self,
            summary=summary or self.card_summary,
            sections=[*(sections or []), *self.card_sections()],
            cite_sama=self.cite_sama,
            **card,
        )


class TartanMTTrainer(_MultitaskTrainerMixin, Trainer):
    """Fixed-weight multitask training: L_ft + ``aux_weight`` · mean_i L_mlm(x_i) (TARTAN-MT for ``aux_weight=1``).

    Batches without the auxiliary part (a plain end-task ``train_dataset``) give ordinary fine-tuning.
    """

    _tag_names = TARTAN_TAGS
    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

    def __init__(self, *args: Any, aux_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aux_weight = aux_weight
        self.model_accepts_loss_kwargs = False
        self._use_end_task_labels()

    def method_description(self) -> str:
        if self.aux_weight and hasattr(self.train_dataset, "aux_dataset"):
            return f"End task + masked-LM auxiliary task with the fixed weight {self.aux_weight} (TARTAN-MT)"
        return "Fine-tuning on the end task only"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        end_task = {k: inputs[k] for k in END_TASK_KEYS if k in inputs}
        if not model.training:
            out = model(**end_task, labels=inputs.get("labels"))
            return (out.loss, out) if return_outputs else out.loss
        out = model(**end_task, labels=inputs["labels"], **{k: inputs[k] for k in MLM_KEYS if k in inputs})
        loss = out.loss
        if out.mlm_losses is not None and self.aux_weight:
            loss = loss + self.aux_weight * out.mlm_losses.mean()
        return (loss, out) if return_outputs else loss


class TartanTrainer(_MultitaskTrainerMixin, SAMATrainer):
    """SAMA-learned weights for auxiliary MLM examples (SAMA paper §4.2): a :class:`~sama_trainer.SAMATrainer` whose
    objective is a :class:`~sama_trainer.tartan.objective.TartanObjective` (default:
    ``TartanObjective.for_model(model)`` with as many sources as the training set's auxiliary part has
    ``aux_source`` values).

    Base batches come from :class:`~sama_trainer.tartan.data.PairedDataset` +
    :class:`~sama_trainer.tartan.data.TartanCollator`; ``meta_dataset`` is an end-task dataset (e.g. the end-task
    training split). The weight every auxiliary example received in training is kept by ``aux_index``:
    ``trainer.example_weight_means()`` and ``trainer.weight_history``. ``save_model`` also writes the weighting net
    to ``sama_meta_model/`` (``sama_trainer.load_meta_model`` loads it back).
    """

    _tag_names = SAMATrainer._tag_names + TARTAN_TAGS
    card_summary = (
        "An end-task classifier trained together with a masked-LM auxiliary task (TARTAN), with a weight for every "
        "auxiliary example learned by SAMA meta learning."
    )
    cite_sama = True

    def __init__(self, model: nn.Module | None = None, args: Any = None, *pargs: Any, **kwargs: Any):
        if args is not None and getattr(args, "meta_objective", "reweight") != "reweight":
            raise ValueError("TartanTrainer learns example weights only: use meta_objective='reweight'")
        if args is not None and getattr(args, "meta_weight_normalize_by_class", False):
            raise ValueError(
                "meta_weight_normalize_by_class has no classes to use in TartanTrainer (the weighted loss is the "
                "auxiliary MLM loss): set it to False"
            )
        if kwargs.get("objective") is None and model is not None:
            train_dataset = kwargs.get("train_dataset", pargs[0] if pargs else None)
            kwargs["objective"] = TartanObjective.for_model(model, num_sources=_num_sources(train_dataset))
        super().__init__(model, args, *pargs, **kwargs)
        self._use_end_task_labels()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The multitask model (as :class:`TartanMTTrainer` saves it) and the weighting net in ``sama_meta_model/``."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_meta_model(self.meta_model, os.path.join(output_dir or self.args.output_dir, META_MODEL_DIR))

    def method_description(self) -> str:
        return "End task + masked-LM auxiliary task with a SAMA-learned weight for every auxiliary example"

    def card_sections(self) -> list[str]:
        return [*super().card_sections(), sama_card_section(self)]

    @torch.no_grad()
    def compute_aux_weights(self, aux_dataset: Any, batch_size: int | None = None, seed: int = 0) -> dict[str, list]:
        """Per auxiliary example (in order): ``aux_index``, MLM loss, masked-token count and the weight the trained
        net gives it, in eval mode with the masking seeded by ``seed`` (the data collator must be a
        :class:`~sama_trainer.tartan.data.TartanCollator`)."""
        collator = self.data_collator.with_seed(seed)
        bs = batch_size or self.args.per_device_eval_batch_size
        model, out = self.model, {"aux_index": [], "loss": [], "num_masked": [], "weight": []}
        was_training, meta_was_training = model.training, self.meta_model.training
        model.eval()
        self.meta_model.eval()
        try:
            for start in range(0, len(aux_dataset), bs):
                batch = collator([aux_dataset[i] for i in range(start, min(start + bs, len(aux_dataset)))])
                batch = self._prepare_inputs(batch)
                res = model(**{k: batch[k] for k in MLM_KEYS})
                weights = self.meta_model(res.mlm_losses, self.objective.source_features(batch))
                ids = batch["aux_index"].tolist() if "aux_index" in batch else range(start, start + len(weights))
                out["aux_index"] += list(ids)
                out["loss"] += res.mlm_losses.float().tolist()
                out["num_masked"] += res.mlm_num_masked.long().tolist()
                out["weight"] += weights.float().tolist()
        finally:
            model.train(was_training)
            self.meta_model.train(meta_was_training)
        return out

    def aux_weight_report(self, aux_dataset: Any, seed: int = 0) -> list[dict[str, Any]]:
        """One row per auxiliary example (in ``aux_dataset``'s order): ``aux_index``, the mean weight it received in
        training (``train_mean_weight``, None if never drawn) and how often it was drawn (``times_drawn``), and its
        ``final_loss`` / ``final_weight`` (:meth:`compute_aux_weights`). Under DDP, call it on every rank."""
        final = self.compute_aux_weights(aux_dataset, seed=seed)
        means = self.example_weight_means()
        drawn = self.weight_history.totals()[1]
        rows = []
        for i, loss, weight in zip(final["aux_index"], final["loss"], final["weight"]):
            seen = i < len(drawn) and drawn[i] > 0
            mean = means[i].item() if seen else None
            rows.append(
                {"aux_index": i, "train_mean_weight": mean, "times_drawn": int(drawn[i]) if seen else 0,
                 "final_loss": loss, "final_weight": weight}
            )  # fmt: skip
        return rows
