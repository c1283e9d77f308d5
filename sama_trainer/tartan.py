"""TARTAN-style end-task-aware training (Dery et al., ICLR 2022) with SAMA-learned auxiliary-example weights.

One encoder is trained on an end task (sequence classification) and an auxiliary masked-LM task on task/domain text
at the same time (SAMA paper §4.2, Table 3). The base objective is::

    L_base(θ; λ) = L_ft(end-task batch) + mean_i w(x_i; λ) · L_mlm(x_i)

and the meta objective is L_ft on end-task batches, so the meta network learns which auxiliary MLM examples help the
end task. Pieces:

* :class:`TartanMultitaskModel`: a standard ``XForSequenceClassification`` plus the MLM head of ``XForMaskedLM`` on
  the *same* encoder object (the MLM decoder is tied to the shared input embeddings). One ``forward`` runs either or
  both tasks, so DDP sees one forward per step. ``save_pretrained`` writes the classifier as a plain Hugging Face
  model (loadable with ``AutoModelForSequenceClassification``) plus the MLM head in ``tartan_mlm_head.pt``.
* :class:`TartanCollator`: pads the end-task part (``input_ids``, ``attention_mask``, ``labels``) and the auxiliary
  part (``mlm_input_ids`` -> ``mlm_input_ids``, ``mlm_attention_mask``, ``mlm_labels``, with dynamic 80/10/10
  masking) of each feature; either part may be absent.
* :class:`PairedDataset`: zips an end-task dataset with an auxiliary dataset, so every base batch carries both parts.
* :class:`AuxWeightNet`: the meta network w(x; λ) from the per-example MLM loss and the example's source corpus.
* :class:`TartanTrainer` (SAMA, learned weights) and :class:`TartanMTTrainer` (fixed weight; TARTAN-MT with w ≡ 1,
  or plain fine-tuning when the batches carry no auxiliary part).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
)
from transformers.utils import ModelOutput

from .sama_trainer import SAMATrainer


__all__ = [
    "AuxWeightNet",
    "PairedDataset",
    "TartanCollator",
    "TartanMTTrainer",
    "TartanMultitaskModel",
    "TartanOutput",
    "TartanTrainer",
    "per_example_mlm_loss",
]

MLM_HEAD_NAME = "tartan_mlm_head.pt"
DEFAULT_AUX_WEIGHT_SCALE = 2.0  # AuxWeightNet's weights lie in (0, 2): w = 1 (TARTAN-MT) is the middle
AUX_COLUMNS = ("aux_index", "aux_source")


def per_example_mlm_loss(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy per example: (losses [B], masked-token counts [B]).

    ``logits`` [M, V] and ``targets`` [M] are the masked positions only, ``rows`` [M] their example index. An example
    with no masked token gets loss 0 (it then adds nothing to the base loss, whatever its weight).
    """
    token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
    sums = token_losses.new_zeros(batch_size).index_add(0, rows, token_losses)
    counts = token_losses.new_zeros(batch_size).index_add(0, rows, torch.ones_like(token_losses))
    return sums / counts.clamp_min(1.0), counts


@dataclass
class TartanOutput(ModelOutput):
    """``loss``: end-task CE (mean, when ``labels`` are given); ``logits``: end-task logits [B, C];
    ``mlm_losses`` / ``mlm_num_masked``: per auxiliary example [B_aux]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mlm_losses: torch.Tensor | None = None
    mlm_num_masked: torch.Tensor | None = None


def _mlm_head_of(mlm_model: PreTrainedModel) -> nn.Module:
    heads = [m for name, m in mlm_model.named_children() if name != mlm_model.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"cannot find the MLM head of {type(mlm_model).__name__} (children: {heads})")
    return heads[0]


class TartanMultitaskModel(nn.Module):
    """An end-task classifier and an MLM head sharing one encoder.

    ``classifier_model`` is a standard ``XForSequenceClassification``; ``encoder`` is its base model (the *same*
    object the MLM branch runs), ``lm_head`` the head of ``XForMaskedLM`` with its decoder tied to the encoder's input
    embeddings. Build with :meth:`from_pretrained` or :meth:`from_config`.
    """

    main_input_name = "input_ids"

    def __init__(self, classifier_model: PreTrainedModel, lm_head: nn.Module, output_embeddings: nn.Module):
        super().__init__()
        self.classifier_model = classifier_model
        self.lm_head = lm_head
        output_embeddings.weight = classifier_model.get_input_embeddings().weight  # tie to the shared encoder

    @classmethod
    def _build(cls, classifier: PreTrainedModel, mlm: PreTrainedModel) -> TartanMultitaskModel:
        return cls(classifier, _mlm_head_of(mlm), mlm.get_output_embeddings())

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, mlm_kwargs: dict[str, Any] | None = None, **classifier_kwargs: Any
    ) -> TartanMultitaskModel:
        """Encoder (and MLM head, when the checkpoint has one) from ``name_or_path``; a fresh classification head.

        ``classifier_kwargs`` go to ``AutoModelForSequenceClassification.from_pretrained`` (``num_labels``,
        ``id2label``, ``label2id``, ...), ``mlm_kwargs`` to ``AutoModelForMaskedLM.from_pretrained`` (config
        overrides such as ``num_hidden_layers`` must be given to both). A checkpoint without MLM head weights (e.g. a
        sentence encoder) gets a freshly initialised head.
        """
        classifier = AutoModelForSequenceClassification.from_pretrained(name_or_path, **classifier_kwargs)
        mlm = AutoModelForMaskedLM.from_pretrained(name_or_path, **(mlm_kwargs or {}))
        model = cls._build(classifier, mlm)
        head_file = os.path.join(name_or_path, MLM_HEAD_NAME)
        if os.path.isfile(head_file):  # a directory written by save_pretrained
            model.lm_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True), strict=False)
        return model

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> TartanMultitaskModel:
        """Randomly initialised model (``config.num_labels`` classes), e.g. a tiny test model."""
        return cls._build(
            AutoModelForSequenceClassification.from_config(config), AutoModelForMaskedLM.from_config(config)
        )

    @property
    def encoder(self) -> nn.Module:
        return self.classifier_model.base_model

    @property
    def config(self) -> PretrainedConfig:
        return self.classifier_model.config

    @property
    def name_or_path(self) -> str:
        return self.classifier_model.name_or_path

    def add_model_tags(self, tags: list[str] | str) -> None:
        self.classifier_model.add_model_tags(tags)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> TartanOutput:
        """End task on ``input_ids`` (if given), auxiliary MLM on ``mlm_input_ids`` with targets ``mlm_labels``
        (-100 = not masked; if given). The MLM head only runs on masked positions."""
        out = TartanOutput()
        if input_ids is not None:
            logits = self.classifier_model(input_ids=input_ids, attention_mask=attention_mask).logits
            out.logits = logits
            if labels is not None:
                out.loss = F.cross_entropy(logits.float(), labels.long())
        if mlm_input_ids is not None:
            if mlm_labels is None:
                raise ValueError("mlm_input_ids needs mlm_labels (-100 where a token is not masked)")
            hidden = self.encoder(input_ids=mlm_input_ids, attention_mask=mlm_attention_mask).last_hidden_state
            masked = mlm_labels != -100
            rows = masked.nonzero(as_tuple=True)[0]
            logits = self.lm_head(hidden[masked])
            out.mlm_losses, out.mlm_num_masked = per_example_mlm_loss(
                logits, mlm_labels[masked], rows, mlm_input_ids.shape[0]
            )
        return out

    def mlm_head_parameters(self) -> list[nn.Parameter]:
        """The MLM head's own parameters (not the decoder weight it shares with the input embeddings)."""
        tied = self.classifier_model.get_input_embeddings().weight
        return [p for p in self.lm_head.parameters() if p is not tied]

    def warm_up_mlm_head(
        self,
        aux_dataset: Any,
        collator: TartanCollator,
        steps: int,
        batch_size: int = 16,
        learning_rate: float = 1e-3,
        seed: int = 0,
    ) -> list[float]:
        """Train only the MLM head (:meth:`mlm_head_parameters`) for ``steps`` Adam steps on ``aux_dataset`` with
        the encoder frozen; returns the mean MLM loss of every step.

        A checkpoint without MLM head weights (a sentence encoder) starts with a random head whose large, noisy
        gradients flow into the shared encoder as soon as multitask training starts; a pretrained MLM model does not
        have that problem. Warming the head up first gives the auxiliary task the starting point it would have with
        a pretrained head, and leaves the encoder, embeddings and classifier bit-identical.
        """
        if steps <= 0:
            return []
        if len(aux_dataset) == 0:
            raise ValueError("warm_up_mlm_head needs a non-empty auxiliary dataset")
        params = self.mlm_head_parameters()
        device = params[0].device
        optimizer = torch.optim.Adam(params, lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        head = {id(p) for p in params}
        frozen = [p for p in self.parameters() if id(p) not in head and p.requires_grad]
        was_training = self.training
        self.train()
        losses: list[torch.Tensor] = []
        try:
            for p in frozen:  # the encoder builds no graph; the tied decoder weight gets no gradient
                p.requires_grad_(False)
            for _ in range(steps):
                idx = torch.randint(len(aux_dataset), (batch_size,), generator=generator).tolist()
                batch = collator([aux_dataset[i] for i in idx])
                out = self(**{k: v.to(device) for k, v in batch.items() if k.startswith("mlm_")})
                counts = out.mlm_num_masked
                loss = (out.mlm_losses * counts).sum() / counts.sum()  # mean over the batch's masked tokens
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.train(was_training)
        return torch.stack(losses).tolist()

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The classifier as a plain HF model folder plus the MLM head (without the tied decoder weight)."""
        self.classifier_model.save_pretrained(save_directory, **kwargs)
        tied = self.classifier_model.get_input_embeddings().weight
        head = {k: v for k, v in self.lm_head.state_dict().items() if v.data_ptr() != tied.data_ptr()}
        torch.save(head, os.path.join(save_directory, MLM_HEAD_NAME))

    def load_weights(self, directory: str) -> None:
        """Load weights written by :meth:`save_pretrained` in place (keeps the sharing and the tie)."""
        loaded = type(self.classifier_model).from_pretrained(directory)
        self.classifier_model.load_state_dict(loaded.state_dict())
        head = torch.load(os.path.join(directory, MLM_HEAD_NAME), map_location="cpu", weights_only=True)
        missing, unexpected = self.lm_head.load_state_dict(head, strict=False)
        if unexpected or any("decoder.weight" not in k for k in missing):
            raise ValueError(f"MLM head mismatch: missing {missing}, unexpected {unexpected}")


# ----------------------------------------------------------------------------------------------------------------
# data


class PairedDataset(torch.utils.data.Dataset):
    """Item i = end-task example ``i mod N_task`` plus auxiliary example ``i mod N_aux`` (under the ``mlm_`` keys).

    The length is the larger of the two, so one pass covers both; the Trainer's sampler shuffles i, so every batch
    pairs a random end-task batch with a random auxiliary batch.
    """

    def __init__(self, task_dataset: Any, aux_dataset: Any):
        if len(task_dataset) == 0 or len(aux_dataset) == 0:
            raise ValueError("PairedDataset needs non-empty end-task and auxiliary datasets")
        self.task_dataset, self.aux_dataset = task_dataset, aux_dataset

    def __len__(self) -> int:
        return max(len(self.task_dataset), len(self.aux_dataset))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.task_dataset[i % len(self.task_dataset)], **self.aux_dataset[i % len(self.aux_dataset)]}


@dataclass
class TartanCollator:
    """Pads the end-task and auxiliary parts of each feature and masks the auxiliary part (BERT 80/10/10).

    End-task keys: ``input_ids``, (``attention_mask``), ``labels``. Auxiliary keys: ``mlm_input_ids`` (unmasked,
    with special tokens), optional ``aux_index``/``aux_source``. ``ensure_masked`` masks one random non-special token
    of any example that drew none, so every auxiliary example has a defined per-example loss. ``seed`` makes the
    masking deterministic (own generator); otherwise the global torch RNG is used.
    """

    tokenizer: Any
    mlm_probability: float = 0.15
    ensure_masked: bool = True
    seed: int | None = None

    def __post_init__(self):
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("TartanCollator needs a tokenizer with mask and pad tokens")
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))

    def _pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masked input ids, MLM targets with -100 at unmasked positions)."""
        g = self._generator
        labels = input_ids.clone()
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self._special_ids)
        masked = (torch.rand(input_ids.shape, generator=g) < self.mlm_probability) & candidates
        if self.ensure_masked:
            none = ~masked.any(-1) & candidates.any(-1)
            if none.any():  # one random candidate position per such row
                scores = torch.rand(input_ids.shape, generator=g).masked_fill(~candidates, -1.0)
                masked[none, scores[none].argmax(-1)] = True
        labels[~masked] = -100
        inputs = input_ids.clone()
        replace = (torch.rand(input_ids.shape, generator=g) < 0.8) & masked
        inputs[replace] = self.tokenizer.mask_token_id
        randomize = (torch.rand(input_ids.shape, generator=g) < 0.5) & masked & ~replace
        inputs[randomize] = torch.randint(len(self.tokenizer), input_ids.shape, generator=g)[randomize]
        return inputs, labels

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if "input_ids" in features[0]:
            batch["input_ids"], batch["attention_mask"] = self._pad([f["input_ids"] for f in features])
            for key in ("labels", "label"):
                if key in features[0]:
                    batch["labels"] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "mlm_input_ids" in features[0]:
            ids, mask = self._pad([f["mlm_input_ids"] for f in features])
            batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(ids, mask)
            batch["mlm_attention_mask"] = mask
            for key in AUX_COLUMNS:
                if key in features[0]:
                    batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# meta network


class AuxWeightNet(nn.Module, PyTorchModelHubMixin):
    """w(x; λ) = weight_scale · sigmoid(MLP([L_mlm(x) / loss_scale, onehot(source(x))])).

    The per-example MLM loss (Meta-Weight-Net's feature) says how hard/atypical an example is; the source corpus
    (e.g. 0 = task text/TAPT, 1 = domain text) is a free feature that lets the net also learn a per-corpus weight, the
    quantity META-TARTAN learns. ``weight_scale=2`` with ``init_bias=0`` starts near w ≈ 1, i.e. at TARTAN-MT;
    :meth:`init_bias_for` gives the bias for another starting weight. ``loss_scale`` puts the loss feature on a
    fixed scale (:class:`TartanTrainer` uses ln(vocabulary size), the MLM loss of a uniform guess, so the feature is
    about 0..1): the hidden activations grow with the feature, and with them how far one Adam meta step moves the
    output logit (a raw MLM loss of 6-11 moved it by tens of logits, so weights saturated at 0 or ``weight_scale``
    and stayed there).
    Call contract of the reweighting nets: ``net(losses [B], features [B, num_sources] | None) -> weights [B]``.
    """

    def __init__(
        self,
        num_sources: int = 1,
        hidden_size: int = 100,
        weight_scale: float = DEFAULT_AUX_WEIGHT_SCALE,
        init_bias: float = 0.0,
        loss_scale: float = 1.0,
    ):
        super().__init__()
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        self.num_sources = num_sources
        self.weight_scale = weight_scale
        self.loss_scale = float(loss_scale)
        in_features = 1 + (num_sources if num_sources > 1 else 0)
        self.net = nn.Sequential(nn.Linear(in_features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[2].weight)  # start exactly at w = weight_scale · sigmoid(init_bias) for every example
        nn.init.constant_(self.net[2].bias, init_bias)

    @staticmethod
    def init_bias_for(init_weight: float, weight_scale: float = DEFAULT_AUX_WEIGHT_SCALE) -> float:
        """The ``init_bias`` that starts every example at weight ``init_weight`` (in (0, weight_scale))."""
        if not 0.0 < init_weight < weight_scale:
            raise ValueError(f"aux_init_weight must be in (0, {weight_scale}), got {init_weight}")
        return math.log(init_weight / (weight_scale - init_weight))

    def forward(self, losses: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        x = [losses.float().reshape(-1, 1) / self.loss_scale]
        if self.num_sources > 1:
            if features is None:
                features = F.one_hot(torch.zeros_like(losses, dtype=torch.long), self.num_sources)
            x.append(features.float().reshape(-1, self.num_sources))
        dtype = self.net[0].weight.dtype
        return self.weight_scale * torch.sigmoid(self.net(torch.cat(x, dim=-1).to(dtype))).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# trainers


def _uniform_mlm_loss(model: Any) -> float:
    """ln(vocabulary size) of a multitask model (the MLM loss of a uniform guess); 1.0 where it has no embeddings."""
    get = getattr(getattr(model, "classifier_model", model), "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    vocab = getattr(embeddings, "num_embeddings", 0)
    return math.log(vocab) if vocab > 1 else 1.0


def _ft_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}


def _mlm_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("mlm_input_ids", "mlm_attention_mask", "mlm_labels") if k in inputs}


class _TartanTrainerMixin:
    """Shared by both trainers: label names, extra columns, eval loss, saving/loading the multitask model."""

    def _tartan_setup(self) -> None:
        self.label_names = ["labels"]  # not "mlm_labels": eval batches carry only the end task
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in AUX_COLUMNS if c not in self._signature_columns]

    def _eval_loss(self, model: nn.Module, inputs: dict, return_outputs: bool):
        out = model(**_ft_inputs(inputs), labels=inputs.get("labels"))
        return (out.loss, out) if return_outputs else out.loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        (model or self.model).load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.model.load_weights(self.state.best_model_checkpoint)


class TartanMTTrainer(_TartanTrainerMixin, Trainer):
    """Fixed-weight multitask training: L_ft + ``aux_weight`` · mean_i L_mlm(x_i) (TARTAN-MT for ``aux_weight=1``).

    Batches without the auxiliary part (a plain end-task ``train_dataset``) give ordinary fine-tuning.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, aux_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aux_weight = aux_weight
        self._tartan_setup()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return self._eval_loss(model, inputs, return_outputs)
        out = model(**_ft_inputs(inputs), labels=inputs["labels"], **_mlm_inputs(inputs))
        loss = out.loss
        if out.mlm_losses is not None and self.aux_weight:
            loss = loss + self.aux_weight * out.mlm_losses.mean()
        return (loss, out) if return_outputs else loss


class TartanTrainer(_TartanTrainerMixin, SAMATrainer):
    """SAMA-learned weights for auxiliary MLM examples (SAMA paper §4.2).

    Base batches (from :class:`PairedDataset` + :class:`TartanCollator`) carry an end-task part and an auxiliary MLM
    part: the per-example MLM loss is the reweighted loss (:meth:`compute_per_example_loss`), L_ft the λ-independent
    :meth:`extra_base_loss`; both come from one forward pass. Meta batches are end-task batches (``meta_dataset``, e.g.
    the end-task training split) and the meta loss is their CE (:meth:`compute_meta_loss`). The meta network is
    called as ``meta_model(mlm_losses, onehot(aux_source))`` (default: :class:`AuxWeightNet` with ``num_sources``,
    every weight starting at ``aux_init_weight``, the loss feature divided by ``aux_loss_scale``; default
    ln(vocabulary size) of ``model``). During training the weight every auxiliary example received is accumulated
    per ``aux_index`` (:meth:`training_weight_stats`).
    """

    _tag_names = SAMATrainer._tag_names + ["tartan", "masked-lm-auxiliary"]

    def __init__(
        self,
        *args: Any,
        meta_model: nn.Module | None = None,
        num_sources: int = 1,
        aux_init_weight: float = 1.0,
        aux_loss_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_sources = num_sources
        self.aux_init_bias = AuxWeightNet.init_bias_for(aux_init_weight)
        model = kwargs.get("model", args[0] if args else None)
        self.aux_loss_scale = _uniform_mlm_loss(model) if aux_loss_scale is None else aux_loss_scale
        self._base_step = False
        self._ft_loss: torch.Tensor | None = None
        self._step_weights: torch.Tensor | None = None
        self._weight_sum: dict[int, float] = {}
        self._weight_count: dict[int, int] = {}
        super().__init__(*args, meta_model=meta_model, **kwargs)
        self._tartan_setup()
        if self.args.meta_objective != "reweight":
            raise ValueError("TartanTrainer learns example weights only: use meta_objective='reweight'")
        if self.args.meta_weight_normalize_by_class:
            raise ValueError(
                "meta_weight_normalize_by_class has no classes to use in TartanTrainer (the weighted loss is the "
                "auxiliary MLM loss): set it to False"
            )

    def _default_meta_model(self, args, num_labels):  # SAMATrainer calls it on the instance
        return AuxWeightNet(
            num_sources=self.num_sources,
            hidden_size=args.meta_hidden_size,
            init_bias=self.aux_init_bias,
            loss_scale=self.aux_loss_scale,
        )

    def _features(self, inputs: dict) -> torch.Tensor | None:
        source = inputs.get("aux_source")
        if self.num_sources <= 1:
            return None
        if source is None:
            ids = inputs["mlm_input_ids"]
            source = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return F.one_hot(source.long(), self.num_sources).float()

    def compute_per_example_loss(self, model: nn.Module, inputs: dict, labels: Any) -> tuple[torch.Tensor, Any]:
        """Per-example MLM losses [B_aux] and the meta features (source one-hot) in the logits slot."""
        if "mlm_input_ids" not in inputs:
            raise ValueError("TartanTrainer base batches need an auxiliary part (mlm_input_ids): use PairedDataset")
        if self._base_step:  # one forward for both tasks; L_ft is kept for extra_base_loss
            out = model(**_ft_inputs(inputs), labels=labels, **_mlm_inputs(inputs))
            self._ft_loss = out.loss
        else:  # perturbed passes of the meta step: the MLM part only
            out = model(**_mlm_inputs(inputs))
        return out.mlm_losses, self._features(inputs)

    def extra_base_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor | None:
        loss, self._ft_loss = self._ft_loss, None
        return loss

    def meta_objective(self, losses, logits, labels):
        weights = self.meta_model(losses.detach(), None if logits is None else logits.detach())
        if self._base_step:
            self._step_weights = weights.detach()
        return (weights * losses).mean(), weights

    def compute_meta_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(**_ft_inputs(inputs), labels=inputs["labels"]).loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return self._eval_loss(model, inputs, return_outputs)
        self._base_step = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._base_step = False
        if self._step_weights is not None and "aux_index" in inputs:
            for i, w in zip(inputs["aux_index"].tolist(), self._step_weights.float().tolist()):
                self._weight_sum[i] = self._weight_sum.get(i, 0.0) + w
                self._weight_count[i] = self._weight_count.get(i, 0) + 1
        self._step_weights = None
        return result

    def training_weight_stats(self) -> dict[int, tuple[float, int]]:
        """aux_index -> (mean weight the example got in the base steps it was drawn in, times drawn)."""
        return {i: (self._weight_sum[i] / n, n) for i, n in self._weight_count.items()}

    @torch.no_grad()
    def compute_aux_weights(self, aux_dataset: Any, batch_size: int | None = None, seed: int = 0) -> dict[str, list]:
        """Final per-example MLM loss and weight on ``aux_dataset`` (eval mode, masking seeded by ``seed``)."""
        collator = TartanCollator(
            self.data_collator.tokenizer, self.data_collator.mlm_probability, self.data_collator.ensure_masked, seed
        )
        bs = batch_size or self.args.per_device_eval_batch_size
        model, out = self.model, {"aux_index": [], "loss": [], "num_masked": [], "weight": []}
        was_training = model.training
        model.eval()
        self.meta_model.eval()
        try:
            for start in range(0, len(aux_dataset), bs):
                batch = collator([aux_dataset[i] for i in range(start, min(start + bs, len(aux_dataset)))])
                batch = self._prepare_inputs(batch)
                res = model(**_mlm_inputs(batch))
                weights = self.meta_model(res.mlm_losses, self._features(batch))
                out["aux_index"] += (
                    batch["aux_index"].tolist() if "aux_index" in batch else list(range(start, start + len(weights)))
                )
                out["loss"] += res.mlm_losses.float().tolist()
                out["num_masked"] += res.mlm_num_masked.long().tolist()
                out["weight"] += weights.float().tolist()
        finally:
            model.train(was_training)
            self.meta_model.train()
        return out
