"""TARTAN's meta objective: a SAMA-learned weight for every auxiliary masked-LM example (SAMA paper §4.2).

The base loss of a batch with an end-task part and an auxiliary part is::

    L_base(θ; λ) = L_ft(end-task part)  +  mean_i w(x_i; λ) · L_mlm(x_i)

and the meta loss is L_ft on end-task batches, so the weighting network w learns which auxiliary examples help the
end task. :class:`TartanObjective` is that objective for :class:`~sama_trainer.SAMATrainer`; :class:`AuxWeightNet`
is its default weighting network (registered with :func:`~sama_trainer.register_meta_net`, so
:func:`~sama_trainer.load_meta_model` loads it back once ``sama_trainer.tartan`` is imported).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..meta_nets import register_meta_net
from ..objectives import ExampleLosses, MetaObjective
from .data import AUX_COLUMNS


__all__ = ["DEFAULT_AUX_WEIGHT_SCALE", "AuxWeightNet", "TartanObjective"]

DEFAULT_AUX_WEIGHT_SCALE = 2.0  # AuxWeightNet's weights lie in (0, 2): w = 1 (TARTAN-MT) is the middle
END_TASK_KEYS = ("input_ids", "attention_mask")
MLM_KEYS = ("mlm_input_ids", "mlm_attention_mask", "mlm_labels")


@register_meta_net
class AuxWeightNet(nn.Module, PyTorchModelHubMixin):
    """w(x; λ) = weight_scale · sigmoid(MLP([L_mlm(x) / loss_scale, onehot(source(x))])).

    The per-example MLM loss (Meta-Weight-Net's feature) says how hard/atypical an example is; the source corpus
    (e.g. 0 = task text/TAPT, 1 = domain text) is a free feature that lets the net also learn a per-corpus weight, the
    quantity META-TARTAN learns. ``weight_scale=2`` with ``init_bias=0`` starts every weight at 1, i.e. at TARTAN-MT;
    :meth:`init_bias_for` gives the bias for another starting weight. ``loss_scale`` puts the loss feature on a
    fixed scale (ln(vocabulary size), the MLM loss of a uniform guess, makes it about 0..1): the hidden activations
    grow with the feature, and with them how far one Adam meta step moves the output logit (a raw MLM loss of 6-11
    moves it by tens of logits, so the weights saturate at 0 or ``weight_scale`` and stay there).
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


def _select(inputs: dict, keys: tuple[str, ...]) -> dict:
    return {k: inputs[k] for k in keys if k in inputs}


class TartanObjective(MetaObjective):
    """End task + auxiliary masked LM with a learned weight per auxiliary example, for a
    :class:`~sama_trainer.tartan.model.TartanMultitaskModel` and base batches from
    :class:`~sama_trainer.tartan.data.PairedDataset` + :class:`~sama_trainer.tartan.data.TartanCollator`.

    * :meth:`example_losses` (the perturbed passes of a meta step) runs only the MLM part: per-example MLM losses,
      the one-hot auxiliary source as the weighting net's features, ``aux_index`` as example ids (so the trainer's
      :class:`~sama_trainer.WeightHistory` keeps the weight every auxiliary example received).
    * :meth:`base_losses` runs both tasks in one forward and returns the end-task CE as the λ-independent term.
    * :meth:`meta_loss` and :meth:`evaluation_loss` are the end-task CE (meta batches are end-task batches).

    Args:
        num_sources: number of auxiliary corpora (``aux_source`` ids); with more than one the net sees the source.
        init_weight: the weight every auxiliary example starts at, in (0, 2) (1 = start at TARTAN-MT).
        loss_scale: the weighting net reads the MLM loss divided by this (``model.uniform_mlm_loss()`` is a good
            choice; :meth:`for_model` uses it).
    """

    input_columns = AUX_COLUMNS

    def __init__(self, num_sources: int = 1, init_weight: float = 1.0, loss_scale: float = 1.0):
        if not loss_scale > 0:
            raise ValueError(f"aux_loss_scale must be > 0, got {loss_scale}")
        self.num_sources = num_sources
        self.init_bias = AuxWeightNet.init_bias_for(init_weight)
        self.loss_scale = float(loss_scale)

    @classmethod
    def for_model(
        cls, model: Any, num_sources: int = 1, init_weight: float = 1.0, loss_scale: float | None = None
    ) -> TartanObjective:
        """The objective for ``model``; ``loss_scale`` defaults to its ``uniform_mlm_loss()`` (ln vocabulary size)."""
        return cls(num_sources, init_weight, model.uniform_mlm_loss() if loss_scale is None else loss_scale)

    def source_features(self, inputs: dict) -> torch.Tensor | None:
        """One-hot auxiliary source [B, num_sources] of a batch (source 0 if it has no ``aux_source``); None for a
        single source."""
        if self.num_sources <= 1:
            return None
        source = inputs.get("aux_source")
        if source is None:
            ids = inputs["mlm_input_ids"]
            source = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return F.one_hot(source.long(), self.num_sources).float()

    def _examples(self, mlm_losses: torch.Tensor, inputs: dict) -> ExampleLosses:
        return ExampleLosses(mlm_losses, features=self.source_features(inputs), example_ids=inputs.get("aux_index"))

    @staticmethod
    def _check_aux_part(inputs: dict) -> None:
        if "mlm_input_ids" not in inputs:
            raise ValueError(
                "TARTAN base batches need an auxiliary part (mlm_input_ids): build the training set with "
                "PairedDataset(task_dataset, aux_dataset) and batch it with TartanCollator"
            )

    def example_losses(self, model: nn.Module, inputs: dict) -> ExampleLosses:
        self._check_aux_part(inputs)
        return self._examples(model(**_select(inputs, MLM_KEYS)).mlm_losses, inputs)

    def base_losses(self, model: nn.Module, inputs: dict) -> tuple[ExampleLosses, torch.Tensor | None]:
        self._check_aux_part(inputs)
        out = model(**_select(inputs, END_TASK_KEYS), labels=inputs["labels"], **_select(inputs, MLM_KEYS))
        return self._examples(out.mlm_losses, inputs), out.loss

    def meta_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(**_select(inputs, END_TASK_KEYS), labels=inputs["labels"]).loss

    def evaluation_loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        outputs = model(**_select(inputs, END_TASK_KEYS), labels=inputs.get("labels"))
        return outputs.loss, outputs

    def default_meta_model(self, args: Any, num_labels: int | None) -> nn.Module:
        """:class:`AuxWeightNet` with ``args.meta_hidden_size`` hidden units and this objective's settings."""
        return AuxWeightNet(
            num_sources=self.num_sources,
            hidden_size=args.meta_hidden_size,
            init_bias=self.init_bias,
            loss_scale=self.loss_scale,
        )
