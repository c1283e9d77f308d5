"""Meta objectives: what the meta network sees, what the base loss is made of, and what the meta loss is.

A :class:`MetaObjective` is the extension point of :class:`~sama_trainer.SAMATrainer`. The base loss of a batch is::

    L_base = weighted_loss(meta_model, example_losses(model, batch))  +  independent_loss     (λ-independent terms)

* :meth:`MetaObjective.example_losses` runs the base model on a batch and returns :class:`ExampleLosses`: the
  per-example loss of the term the meta network acts on, with what the meta network sees (labels, logits,
  features) and the examples' ids. The two perturbed passes of each meta step call only this (under
  ``torch.no_grad`` for first-order meta-gradients).
* :meth:`MetaObjective.base_losses` is what a base step calls: the same, plus the λ-independent part of the base
  loss, from one forward pass (default: no such part).
* :meth:`MetaObjective.weighted_loss` combines them with the meta network (reweighting, label correction).
* :meth:`MetaObjective.meta_loss` is the loss on a meta batch that the meta network is trained to lower.
* :meth:`MetaObjective.evaluation_loss` is the plain loss used by ``evaluate``/``predict``.

:class:`ClassificationObjective` (the default) covers sequence classification with reweighting, label correction or
both; ``sama_trainer.tartan.TartanObjective`` reweights auxiliary masked-LM examples for an end task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import per_example_cross_entropy, soft_cross_entropy
from .meta_nets import normalize_weights_per_class


__all__ = ["LABEL_KEYS", "ClassificationObjective", "ExampleLosses", "MetaObjective", "feature_width", "pop_labels"]

LABEL_KEYS = ("labels", "label", "label_ids")


def pop_labels(inputs: dict) -> Any:
    """Remove and return the labels of a batch (``labels``, ``label`` or ``label_ids``)."""
    for key in LABEL_KEYS:
        if key in inputs:
            return inputs.pop(key)
    raise ValueError(f"batch has no labels (keys: {sorted(inputs)})")


@dataclass
class ExampleLosses:
    """The per-example part of a base batch that the meta network acts on.

    Attributes:
        losses: per-example loss [B] of the term the meta network reweights or corrects (with a graph to θ in base
            steps; the meta network always receives it detached).
        labels: the given (possibly noisy) labels, class ids [B] or soft labels [B, C], if the objective has any.
        logits: class logits [B, C] when the loss is a classification loss (label correction needs them).
        features: what the weighting network receives besides the loss, [B, F] (classification: the logits, from
            which ``MetaWeightNet`` derives the prediction's uncertainty).
        example_ids: dataset indices [B] of the examples, when the batch carries them (weight statistics).
        example_features: per-example features [B, F] read from the dataset (``meta_feature_column``), the
            weighting network's third input.
        given_weights: fixed per-example weights [B] read from the dataset (``example_weight_column``), multiplying
            the learned weights.
    """

    losses: torch.Tensor
    labels: Any = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None
    example_features: torch.Tensor | None = None
    given_weights: torch.Tensor | None = None


class MetaObjective:
    """Base class of meta objectives; subclass it and pass it as ``SAMATrainer(..., objective=...)``.

    Subclasses implement :meth:`example_losses` and :meth:`meta_loss`, and override the other methods where the
    defaults (no λ-independent base-loss term, per-example weights from the meta network, plain evaluation loss)
    do not fit. ``input_columns`` names dataset columns the objective reads besides the model's inputs (the
    trainer keeps them; the objective must remove them before calling the model).
    """

    input_columns: tuple[str, ...] = ()

    def example_losses(self, model: nn.Module, inputs: dict) -> ExampleLosses:
        """Run ``model`` on a base batch (a copy the method may change) and return the λ-dependent part."""
        raise NotImplementedError

    def base_losses(self, model: nn.Module, inputs: dict) -> tuple[ExampleLosses, torch.Tensor | None]:
        """One forward for a base step: the λ-dependent part and the λ-independent base-loss term (or None)."""
        return self.example_losses(model, inputs), None

    def weighted_loss(
        self, meta_model: nn.Module, examples: ExampleLosses
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The λ-dependent base-loss term and the example weights (None if the objective does not reweight).

        Default: ``mean(meta_model(losses, features) · losses)``.
        """
        weights = meta_model(examples.losses.detach(), _detached(examples.features))
        return (weights * examples.losses).mean(), weights

    def meta_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The scalar meta loss on a meta batch (a copy the method may change)."""
        raise NotImplementedError

    def evaluation_loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        """(plain loss, model outputs) on an evaluation batch. Default: the model's own loss."""
        outputs = model(**inputs)
        return outputs.loss, outputs

    def default_meta_model(self, args: Any, num_labels: int | None) -> nn.Module:
        """The meta network built when ``SAMATrainer`` is given none."""
        raise NotImplementedError(f"{type(self).__name__} has no default meta network: pass meta_model=...")

    def check_meta_model(self, meta_model: nn.Module) -> None:
        """Raise a ``ValueError`` naming the fix if ``meta_model`` cannot serve this objective."""


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _column(inputs: dict, column: str | None, option: str) -> torch.Tensor | None:
    """The batch's ``column`` (None if no column is configured); a clear error if the batch lacks it."""
    if not column:
        return None
    if inputs.get(column) is None:
        raise ValueError(
            f"the batch has no {column!r} ({option}): add the column to the training dataset, or unset {option}"
        )
    return inputs[column]


def feature_width(dataset: Any, column: str) -> int:
    """The width F of the per-example feature vectors in ``dataset``'s ``column`` (read from its first row)."""
    names = getattr(dataset, "column_names", None)
    if dataset is None or (names is not None and column not in names):
        raise ValueError(
            f"meta_feature_column={column!r} is not a column of the training dataset (columns: {names}); add it "
            "(for weak labels: sama_trainer.data.add_lf_agreement) or unset meta_feature_column"
        )
    try:
        row = dataset[0][column]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"meta_feature_column={column!r}: the first training row has no such value ({e})") from e
    width = len(row) if hasattr(row, "__len__") else 0
    if width < 1:
        raise ValueError(f"meta_feature_column={column!r} must hold a non-empty list of numbers per row, got {row!r}")
    return width


class ClassificationObjective(MetaObjective):
    """Sequence classification with example reweighting, label correction or both (the default objective).

    Base term: cross-entropy of each example against its given label, or with ``correct`` against the soft label
    ``correction_net(logits, label)``; with ``reweight`` the mean is weighted by ``weight_net(loss, logits)``.
    Meta loss: the unweighted mean cross-entropy on the meta batch. The meta network is the weighting network, the
    correction network, or an ``nn.ModuleDict`` with keys ``"reweight"`` and ``"correct"`` for both.

    Args:
        reweight: learn a weight per example.
        correct: learn a corrected (soft) label per example.
        normalize_by_class: rescale the weights to mean 1 within each given class of the batch.
        id_column: batch key holding the examples' dataset indices (kept away from the model; used for weight
            statistics when present).
        feature_column: batch key holding per-example features [F] for the weighting network (kept away from the
            model), e.g. the labeling functions' votes relative to the given label (``data.lf_agreement``).
        num_features: their width F (the default weighting network's extra inputs).
        weight_column: batch key holding fixed per-example weights [B] (kept away from the model) that multiply each
            example's loss: times the learned weights with ``reweight`` (after ``normalize_by_class``), alone
            otherwise.
    """

    def __init__(
        self,
        reweight: bool = True,
        correct: bool = False,
        normalize_by_class: bool = False,
        id_column: str | None = "example_id",
        feature_column: str | None = None,
        num_features: int = 0,
        weight_column: str | None = None,
    ):
        if not (reweight or correct):
            raise ValueError("ClassificationObjective needs reweight=True, correct=True or both")
        if feature_column and not reweight:
            raise ValueError("per-example features (meta_feature_column) feed the weighting net: reweight=True")
        self.reweight, self.correct = reweight, correct
        self.normalize_by_class = normalize_by_class
        self.id_column = id_column
        self.feature_column = feature_column
        self.num_features = num_features if feature_column else 0
        self.weight_column = weight_column
        self.input_columns = tuple(c for c in (id_column, feature_column, weight_column) if c)

    @classmethod
    def from_config(cls, args: Any, train_dataset: Any = None) -> ClassificationObjective:
        """The objective a :class:`~sama_trainer.SAMAConfig` describes (``meta_objective`` and friends); the width
        of ``meta_feature_column`` is read from the first row of ``train_dataset``."""
        column = getattr(args, "meta_feature_column", None)
        return cls(
            reweight="reweight" in args.meta_objective,
            correct="correct" in args.meta_objective,
            normalize_by_class=args.meta_weight_normalize_by_class,
            id_column=args.example_id_column,
            feature_column=column,
            num_features=feature_width(train_dataset, column) if column else 0,
            weight_column=getattr(args, "example_weight_column", None),
        )

    def _split(self, inputs: dict) -> tuple[dict, Any, torch.Tensor | None]:
        inputs = dict(inputs)
        ids = inputs.pop(self.id_column, None) if self.id_column else None
        for column in (self.feature_column, self.weight_column):
            if column:
                inputs.pop(column, None)
        return inputs, pop_labels(inputs), ids

    def example_losses(self, model: nn.Module, inputs: dict) -> ExampleLosses:
        extra = _column(inputs, self.feature_column, "meta_feature_column")
        given = _column(inputs, self.weight_column, "example_weight_column")
        inputs, labels, ids = self._split(inputs)
        logits = model(**inputs).logits
        losses = per_example_cross_entropy(logits, labels)
        return ExampleLosses(
            losses, labels, logits, features=logits, example_ids=ids, example_features=extra, given_weights=given
        )

    def _part(self, meta_model: nn.Module, name: str) -> nn.Module:
        both = self.reweight and self.correct
        return meta_model[name] if both else meta_model

    def corrected_labels(self, meta_model: nn.Module, examples: ExampleLosses) -> torch.Tensor:
        """The correction network's soft labels [B, C] for ``examples``."""
        return self._part(meta_model, "correct")(examples.logits.detach(), examples.labels)

    def example_weights(self, meta_model: nn.Module, losses: torch.Tensor, examples: ExampleLosses) -> torch.Tensor:
        """The weighting network's weights [B] for the (detached) per-example ``losses``."""
        inputs = (losses.detach(), _detached(examples.features))
        if examples.example_features is not None:
            inputs += (examples.example_features.detach(),)
        weights = self._part(meta_model, "reweight")(*inputs)
        if self.normalize_by_class:
            if not isinstance(examples.labels, torch.Tensor):
                raise ValueError("meta_weight_normalize_by_class needs class labels (a tensor) in the batch")
            num_classes = None if examples.logits is None else examples.logits.shape[-1]
            weights = normalize_weights_per_class(weights, examples.labels, num_classes)
        if examples.given_weights is not None:
            weights = weights * examples.given_weights.to(weights.dtype)
        return weights

    def weighted_loss(
        self, meta_model: nn.Module, examples: ExampleLosses
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        losses = examples.losses
        if self.correct:
            if examples.logits is None or examples.labels is None:
                raise ValueError("label correction needs class logits and labels from example_losses")
            losses = soft_cross_entropy(examples.logits, self.corrected_labels(meta_model, examples))
        if not self.reweight:
            given = examples.given_weights
            return (losses if given is None else given.to(losses.dtype) * losses).mean(), None
        weights = self.example_weights(meta_model, losses, examples)
        return (weights * losses).mean(), weights

    def meta_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        inputs, labels, _ = self._split(inputs)
        return per_example_cross_entropy(model(**inputs).logits, labels).mean()

    def evaluation_loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
        inputs, labels, _ = self._split(inputs)
        outputs = model(**inputs)
        return per_example_cross_entropy(outputs.logits, labels).mean(), outputs

    def default_meta_model(self, args: Any, num_labels: int | None) -> nn.Module:
        from .meta_nets import build_correction_net, build_weight_net

        if self.correct and (not num_labels or num_labels < 2):
            raise ValueError("label correction needs model.config.num_labels >= 2 or an explicit meta_model")
        weight_net = build_weight_net(args, self.num_features) if self.reweight else None
        if not self.correct:
            return weight_net
        if not self.reweight:
            return build_correction_net(args, num_labels)
        return nn.ModuleDict({"reweight": weight_net, "correct": build_correction_net(args, num_labels)})

    def check_meta_model(self, meta_model: nn.Module) -> None:
        if (
            self.reweight
            and self.correct
            and not (isinstance(meta_model, nn.ModuleDict) and {"reweight", "correct"} <= set(meta_model.keys()))
        ):
            raise ValueError(
                "meta_objective='reweight+correct' needs meta_model=nn.ModuleDict(reweight=..., correct=...)"
            )
