"""Meta networks (λ): plain ``nn.Module``s that reweight examples or correct their labels.

Call contracts (a user module with the same contract can be passed to ``SAMATrainer(meta_model=...)``):

* reweighting: ``weight_net(losses: Tensor[B], logits: Tensor[B, C] | None) -> Tensor[B]`` (non-negative weights),
  called with a third argument ``features: Tensor[B, F]`` when the trainer has a ``meta_feature_column``;
* label correction: ``correction_net(logits: Tensor[B, C], labels: Tensor[B] (class ids) or Tensor[B, C] (soft))
  -> Tensor[B, C]`` (a distribution over classes per example).

Inputs are detached by the trainer: the meta nets see values of the base model, never its graph.
Every net saves and loads with ``save_pretrained(dir)`` / ``from_pretrained(dir)``; :func:`save_meta_model` and
:func:`load_meta_model` also handle an ``nn.ModuleDict`` of nets (reweighting and correction together).
:func:`build_weight_net` and :func:`build_correction_net` build the nets a :class:`~sama_trainer.SAMAConfig` asks for.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


__all__ = [
    "BootstrapCorrectionNet",
    "LabelCorrectionNet",
    "MetaWeightNet",
    "build_correction_net",
    "build_weight_net",
    "load_meta_model",
    "normalize_weights_per_class",
    "register_meta_net",
    "save_meta_model",
]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _work_dtype(module: nn.Module) -> torch.dtype:
    """The meta net's parameter dtype, at least float32 (inputs may come from a half-precision base model)."""
    return torch.promote_types(next(module.parameters()).dtype, torch.float32)


def _label_distribution(labels: torch.Tensor, num_labels: int, dtype: torch.dtype) -> torch.Tensor:
    """Class ids [B] as one-hot rows, soft labels [B, C] as they are."""
    return labels.to(dtype) if labels.dim() == 2 else F.one_hot(labels.long(), num_labels).to(dtype)


def normalize_weights_per_class(
    weights: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """Rescale ``weights`` [B] to mean 1 within each class of ``labels`` (ids [B], or soft labels [B, C]: argmax).

    Reweighting then only moves weight between examples of the same given class: the class balance of the
    training labels is kept, whatever the weight net learns (a class whose weights are all 0, e.g. a saturated
    sigmoid, gets weight 1 per row: no class can be silenced). ``num_classes`` (default: the width of soft labels,
    else read from the ids, which costs a device-to-host sync) sizes the per-class sums.
    """
    if labels.dim() == 2:
        num_classes = num_classes or labels.shape[-1]
        labels = labels.argmax(-1)
    classes = labels.reshape(-1).long().to(weights.device)
    if num_classes is None:
        num_classes = int(classes.max()) + 1 if classes.numel() else 0
    sums = weights.new_zeros(num_classes).index_add(0, classes, weights)
    counts = weights.new_zeros(num_classes).index_add(0, classes, torch.ones_like(weights))
    means = (sums / counts.clamp_min(1))[classes]
    # a class whose weights all underflowed to 0 has no ratios left to keep: its rows get weight 1, never 0
    alive = means > 0
    return torch.where(alive, weights / torch.where(alive, means, torch.ones_like(means)), torch.ones_like(weights))


class MetaWeightNet(nn.Module, PyTorchModelHubMixin):
    """Meta-Weight-Net: per-example weight = sigmoid(MLP(features)) from the detached per-example loss.

    Its input is the loss, [the prediction's entropy,] [``num_features`` features of the example from the dataset,
    e.g. how each labeling function voted relative to the given label (``sama_trainer.data.lf_agreement``)].

    Args:
        hidden_size: width of the hidden layer (100 as in Meta-Weight-Net).
        use_uncertainty: also feed the prediction's uncertainty: the entropy of the softmax of the base model's
            logits (the second input).
        normalize: rescale the weights of each batch to mean 1 (keeps the base learning rate meaningful).
        weight_scale: output range is (0, weight_scale); 1 as in Meta-Weight-Net, 2 in the authors' BERT example.
        init_bias: initial output-layer bias; 0 gives weights ≈ weight_scale/2 at the start.
        center: subtract the batch mean of the MLP's outputs before the sigmoid (the output bias is then frozen: it
            cancels). Use it with ``normalize``: with batch-normalised weights the bias is a direction the meta loss
            does not depend on, yet Adam turns its tiny noisy gradients into full-size steps, so the bias drifts until
            the sigmoid saturates and the weights stop learning. Centring removes that direction.
        num_features: width F of the per-example features passed as ``forward``'s third argument (0: none).
    """

    def __init__(
        self,
        hidden_size: int = 100,
        use_uncertainty: bool = False,
        normalize: bool = False,
        weight_scale: float = 1.0,
        init_bias: float = 0.0,
        center: bool = False,
        num_features: int = 0,
    ):
        super().__init__()
        if num_features < 0:
            raise ValueError(f"num_features must be >= 0, got {num_features}")
        self.use_uncertainty = use_uncertainty
        self.normalize = normalize
        self.weight_scale = weight_scale
        self.center = center
        self.num_features = num_features
        in_features = (2 if use_uncertainty else 1) + num_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        nn.init.constant_(self.net[2].bias, init_bias)
        if center:
            self.net[2].bias.requires_grad_(False)  # cancelled by the centring: keep Adam from drifting it

    def forward(
        self, losses: torch.Tensor, logits: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = _work_dtype(self)
        inputs = [losses.to(dtype).reshape(-1, 1)]
        if self.use_uncertainty:
            if logits is None:
                raise ValueError("MetaWeightNet(use_uncertainty=True) needs the base model's logits")
            inputs.append(_entropy(logits.to(dtype)).reshape(-1, 1))
        if self.num_features:
            if features is None or features.shape[-1] != self.num_features:
                got = "none" if features is None else f"width {features.shape[-1]}"
                raise ValueError(
                    f"MetaWeightNet(num_features={self.num_features}) needs per-example features of that width "
                    f"(got {got}): set meta_feature_column to the dataset column that holds them"
                )
            inputs.append(features.to(dtype).reshape(-1, self.num_features))
        z = self.net(torch.cat(inputs, dim=-1)).squeeze(-1)
        if self.center:
            z = z - z.mean()
        weights = self.weight_scale * torch.sigmoid(z)
        if self.normalize:
            weights = weights / weights.mean().clamp_min(1e-8)
        return weights


class LabelCorrectionNet(nn.Module, PyTorchModelHubMixin):
    """Label correction: a soft label from the base model's detached logits and the (noisy) label.

    ``softmax(MLP([features(logits), onehot(label)]) + skip · onehot(label))``: the skip connection, initialised to
    ``label_prior``, makes the initial output close to the noisy label so training starts from the weak labels.

    Args:
        num_labels: number of classes C.
        hidden_size: hidden width of the MLP.
        use_probabilities: feed softmax probabilities instead of raw logits.
        label_prior: initial logit bonus for the given label (learnable).
        mix_noisy: MLC-style mixing with the noisy label: output = mix·onehot + (1 - mix)·correction (0 disables).
    """

    def __init__(
        self,
        num_labels: int,
        hidden_size: int = 64,
        use_probabilities: bool = True,
        label_prior: float = 3.0,
        mix_noisy: float = 0.0,
    ):
        super().__init__()
        if num_labels < 2:
            raise ValueError("LabelCorrectionNet needs num_labels >= 2")
        self.num_labels = num_labels
        self.use_probabilities = use_probabilities
        self.mix_noisy = mix_noisy
        self.net = nn.Sequential(nn.Linear(2 * num_labels, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_labels))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.label_logit = nn.Parameter(torch.tensor(float(label_prior)))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = _work_dtype(self)
        noisy = _label_distribution(labels, self.num_labels, dtype)
        logits = logits.to(dtype)
        features = F.softmax(logits, dim=-1) if self.use_probabilities else logits
        out = self.net(torch.cat([features, noisy], dim=-1)) + self.label_logit * noisy
        corrected = F.softmax(out, dim=-1)
        if self.mix_noisy:
            corrected = self.mix_noisy * noisy + (1.0 - self.mix_noisy) * corrected
        return corrected


class BootstrapCorrectionNet(nn.Module, PyTorchModelHubMixin):
    """Label correction towards the base model's own prediction (meta-learned bootstrapping).

    ``corrected = (1 - β)·onehot(label) + β·prediction`` with ``prediction = softmax(logits)`` (or its one-hot argmax
    with ``hard_prediction``) and a per-example ``β = sigmoid(MLP([prediction, onehot(label), p_label]) -
    label_prior)``, where ``p_label`` is the probability the model gives the label. The corrected label always lies
    between the given label and what the model predicts for that example: it can correct single examples but cannot
    map a whole given class to a class the model does not predict, which the free :class:`LabelCorrectionNet` can.

    Args:
        num_labels: number of classes C.
        hidden_size: hidden width of the MLP.
        label_prior: initial trust in the given label: β starts at ``sigmoid(-label_prior)``.
        hard_prediction: mix in the model's argmax class (hard bootstrapping) instead of its probabilities.
    """

    def __init__(
        self, num_labels: int, hidden_size: int = 64, label_prior: float = 3.0, hard_prediction: bool = False
    ):
        super().__init__()
        if num_labels < 2:
            raise ValueError("BootstrapCorrectionNet needs num_labels >= 2")
        self.num_labels = num_labels
        self.hard_prediction = hard_prediction
        self.net = nn.Sequential(nn.Linear(2 * num_labels + 1, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.label_prior = nn.Parameter(torch.tensor(float(label_prior)))

    def mixing(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """β [B]: the share of the model's prediction in the corrected label."""
        noisy = self._noisy(labels)
        return self._beta(F.softmax(logits.to(noisy.dtype), dim=-1), noisy)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        noisy = self._noisy(labels)
        probs = F.softmax(logits.to(noisy.dtype), dim=-1)
        prediction = F.one_hot(probs.argmax(-1), self.num_labels).to(noisy.dtype) if self.hard_prediction else probs
        beta = self._beta(probs, noisy).unsqueeze(-1)
        return (1.0 - beta) * noisy + beta * prediction

    def _beta(self, probs: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        agreement = (probs * noisy).sum(-1, keepdim=True)
        return torch.sigmoid(self.net(torch.cat([probs, noisy, agreement], dim=-1)).squeeze(-1) - self.label_prior)

    def _noisy(self, labels: torch.Tensor) -> torch.Tensor:
        return _label_distribution(labels, self.num_labels, _work_dtype(self))


# ----------------------------------------------------------------------------------------------------------------
# building from a config, saving and loading

_META_NETS: list[type] = [MetaWeightNet, LabelCorrectionNet, BootstrapCorrectionNet]


def register_meta_net(cls: type) -> type:
    """Let :func:`load_meta_model` recognise a ``PyTorchModelHubMixin`` meta net class by its constructor arguments."""
    if cls not in _META_NETS:
        _META_NETS.append(cls)
    return cls


def build_weight_net(args: Any, num_features: int = 0) -> MetaWeightNet:
    """The weighting network a :class:`~sama_trainer.SAMAConfig` describes (``meta_hidden_size``, ``meta_weight_*``,
    ``meta_init_bias``, ``meta_use_uncertainty``), reading ``num_features`` per-example features besides the loss."""
    return MetaWeightNet(
        hidden_size=args.meta_hidden_size,
        use_uncertainty=args.meta_use_uncertainty,
        normalize=args.meta_weight_normalize,
        weight_scale=args.meta_weight_scale,
        init_bias=args.meta_init_bias,
        center=args.meta_weight_center,
        num_features=num_features,
    )


def build_correction_net(args: Any, num_labels: int) -> nn.Module:
    """The label-correction network a :class:`~sama_trainer.SAMAConfig` describes (``correction_*`` fields)."""
    if args.correction_type == "bootstrap":
        return BootstrapCorrectionNet(
            num_labels, hidden_size=args.meta_hidden_size, label_prior=args.correction_label_prior
        )
    return LabelCorrectionNet(
        num_labels,
        hidden_size=args.meta_hidden_size,
        label_prior=args.correction_label_prior,
        mix_noisy=args.correction_mix_noisy,
    )


def save_meta_model(meta_model: nn.Module, path: str) -> None:
    """Save a meta network so that :func:`load_meta_model` (or ``Class.from_pretrained``) can load it back."""
    if isinstance(meta_model, nn.ModuleDict):
        for key, module in meta_model.items():
            save_meta_model(module, os.path.join(path, key))
        return
    if hasattr(meta_model, "save_pretrained"):
        meta_model.save_pretrained(path)
    else:
        os.makedirs(path, exist_ok=True)
        torch.save(meta_model.state_dict(), os.path.join(path, "meta_model.pt"))


def load_meta_model(path: str, meta_model: nn.Module | None = None) -> nn.Module:
    """Load a meta network saved by :func:`save_meta_model` (pass ``meta_model`` for modules without a config)."""
    if meta_model is not None:
        if isinstance(meta_model, nn.ModuleDict):
            for key in meta_model:
                load_meta_model(os.path.join(path, key), meta_model[key])
            return meta_model
        weights = os.path.join(path, "meta_model.pt")
        if os.path.isfile(weights):
            meta_model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        else:
            loaded = type(meta_model).from_pretrained(path)
            meta_model.load_state_dict(loaded.state_dict())
        return meta_model
    subdirs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json")))
    if subdirs and not os.path.isfile(os.path.join(path, "config.json")):
        return nn.ModuleDict({key: load_meta_model(os.path.join(path, key)) for key in subdirs})
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    # the registered net whose constructor takes exactly the saved arguments, else the only one that takes them all
    # (a net saved before its class gained an argument with a default)
    saved, fits = set(config), []
    for cls in _META_NETS:
        params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        if saved == set(params):
            return cls.from_pretrained(path)
        required = {k for k, v in params.items() if v.default is inspect.Parameter.empty}
        if required <= saved <= set(params):
            fits.append(cls)
    if len(fits) == 1:
        return fits[0].from_pretrained(path)
    raise ValueError(f"{path}: not a built-in meta net (config keys {sorted(config)}); pass meta_model= to load it")
