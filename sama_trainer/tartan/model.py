"""The multitask model of TARTAN: an end-task classifier and a masked-LM head on one shared encoder.

:class:`TartanMultitaskModel` is a standard ``XForSequenceClassification`` plus the MLM head of ``XForMaskedLM`` on
the *same* encoder object (the MLM decoder is tied to the shared input embeddings). One ``forward`` runs either task
or both, so DDP sees one forward per step, and returns the end-task loss and the per-example MLM losses
(:func:`per_example_mlm_loss`). ``save_pretrained`` writes the classifier as a plain Hugging Face model folder
(loadable with ``AutoModelForSequenceClassification``) plus the MLM head in ``tartan_mlm_head.pt``.
:func:`build_multitask_model` loads one from a checkpoint, or builds a tiny randomly initialised one in-process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
)
from transformers.utils import ModelOutput

from ..pretrained import load_pretrained_tokenizer


__all__ = [
    "MLM_HEAD_NAME",
    "TINY_ROBERTA",
    "TartanMultitaskModel",
    "TartanOutput",
    "build_multitask_model",
    "per_example_mlm_loss",
]

MLM_HEAD_NAME = "tartan_mlm_head.pt"
TINY_ROBERTA = "tiny-roberta"  # build_multitask_model's in-process model (a BPE tokenizer trained on the texts)


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
        sentence encoder) gets a freshly initialised head; a folder written by :meth:`save_pretrained` gets its own.
        """
        classifier = AutoModelForSequenceClassification.from_pretrained(name_or_path, **classifier_kwargs)
        mlm = AutoModelForMaskedLM.from_pretrained(name_or_path, **(mlm_kwargs or {}))
        model = cls._build(classifier, mlm)
        if os.path.isfile(os.path.join(name_or_path, MLM_HEAD_NAME)):
            model._load_mlm_head(name_or_path)
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

    def uniform_mlm_loss(self) -> float:
        """ln(vocabulary size): the MLM loss of a uniform guess (a natural scale for the MLM loss)."""
        vocab = self.classifier_model.get_input_embeddings().num_embeddings
        return math.log(vocab) if vocab > 1 else 1.0

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> TartanOutput:
        """End task on ``input_ids`` (if given), then auxiliary MLM on ``mlm_input_ids`` with targets ``mlm_labels``
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
        collator: Any,
        steps: int,
        batch_size: int = 16,
        learning_rate: float = 1e-3,
        seed: int = 0,
    ) -> list[float]:
        """Train only the MLM head (:meth:`mlm_head_parameters`) for ``steps`` Adam steps on ``aux_dataset`` (batched
        by ``collator``, a :class:`~sama_trainer.tartan.data.TartanCollator`) with the encoder frozen; returns the
        mean MLM loss of every step.

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
        self._load_mlm_head(directory)

    def _load_mlm_head(self, directory: str) -> None:
        head = torch.load(os.path.join(directory, MLM_HEAD_NAME), map_location="cpu", weights_only=True)
        missing, unexpected = self.lm_head.load_state_dict(head, strict=False)
        if unexpected or any("decoder.weight" not in k for k in missing):
            raise ValueError(f"{directory}: MLM head mismatch: missing {missing}, unexpected {unexpected}")


def _train_tiny_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (RoBERTa special tokens) trained in-process on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def _label_maps(label_names: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def build_multitask_model(
    name_or_path: str,
    label_names: list[str],
    max_length: int,
    num_hidden_layers: int | None = None,
    tiny_texts: list[str] | None = None,
    tiny_vocab_size: int = 600,
    tiny_hidden_size: int = 32,
) -> tuple[TartanMultitaskModel, Any]:
    """(multitask model, tokenizer) for an end task with classes ``label_names``.

    ``name_or_path`` is a checkpoint (folder or Hub id; ``num_hidden_layers`` keeps only its first layers) or
    ``"tiny-roberta"``: a randomly initialised 2-layer RoBERTa (hidden size ``tiny_hidden_size``) with a BPE tokenizer
    trained on ``tiny_texts``, which runs anywhere offline. The tokenizer must have a mask token.
    """
    if name_or_path == TINY_ROBERTA:
        if not tiny_texts:
            raise ValueError(f"'{TINY_ROBERTA}' needs tiny_texts to train its tokenizer on")
        tokenizer = _train_tiny_tokenizer(tiny_texts, tiny_vocab_size)
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * tiny_hidden_size,
            max_position_embeddings=max_length + tokenizer.pad_token_id + 2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_label_maps(label_names),
        )
        return TartanMultitaskModel.from_config(config), tokenizer
    tokenizer = load_pretrained_tokenizer(name_or_path, builtin=(TINY_ROBERTA,))
    if tokenizer.mask_token is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no mask token (needed for the MLM task)")
    layers = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    model = TartanMultitaskModel.from_pretrained(name_or_path, mlm_kwargs=layers, **layers, **_label_maps(label_names))
    return model, tokenizer
