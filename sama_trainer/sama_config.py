"""``SAMAConfig``: ``TrainingArguments`` plus the SAMA meta-learning fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .meta_gradient import available_methods, default_alpha


META_OBJECTIVES = ("reweight", "correct", "reweight+correct")
CORRECTION_TYPES = ("free", "bootstrap")


@dataclass
class SAMAConfig(TrainingArguments):
    r"""Configuration for [`SAMATrainer`]: every ``TrainingArguments`` field plus the ones below.

    Parameters:
        meta_gradient (`str`, defaults to `"sama"`):
            Meta-gradient method (`sama`, `sama-na`, or any name in `sama_trainer.meta_gradient.available_methods()`).
        meta_gradient_kwargs (`dict`, *optional*):
            Extra options for the method (e.g. `{"bias_correction": False}`; iterations for `neumann`/`cg`).
        unroll_steps (`int`, defaults to `10`):
            One meta step every `unroll_steps` base optimizer steps (gradient accumulation counted as one step).
        sama_alpha (`float`, *optional*):
            Step size of the method: for the finite-difference methods the base parameters are perturbed by ±εu
            with ‖εu‖₂ = `sama_alpha`. `None` takes the method's default (1.0 for `sama`/`sama-na`, 0.01 for
            `t1t2`).
        sama_base_update (`bool`, defaults to `True`):
            After each meta step leave θ at θ - εu (a step that lowers the meta loss to first order), as in the
            paper's experiments; `False` restores θ bit-for-bit. Applies to the finite-difference methods
            (`sama`, `sama-na`, `t1t2`); the other methods always restore θ.
        meta_gradient_params (`str`, *optional*):
            A regular expression over the base model's parameter names (`re.search`): only the trainable parameters
            that match enter the meta-gradient, i.e. v = ∂L_meta/∂θ, u, the ±εu perturbation and the base update
            (first-order methods). The meta loss's backward then stops at the lowest of them, so restricting it to
            the top of the network (e.g. `"encoder\.layer\.5\.|classifier"`: a 6-layer BERT's last layer and
            head) makes the meta step cheaper; the meta-gradient is then the one through those parameters only
            (a last-layers approximation), and the second perturbed pass reuses the first one's outputs of the
            layers below ([`meta_gradient.PrefixCache`]). With `sama_base_update` the whole step ‖εu‖ = `sama_alpha`
            then falls on these parameters: in the WRENCH recipe that hurt, the last layer without the base update
            did not (RESULTS.md). `None`: every trainable parameter, as in the paper.
        sama_base_update_follows_lr (`bool`, defaults to `False`):
            Scale the base update by the learning-rate schedule: θ ← θ - (lr_t / lr_0)·εu. The update's size ‖εu‖ =
            `sama_alpha` does not shrink with the learning rate, so late in a decaying schedule it dominates the base
            steps and the model ends up fitting the meta set; following the schedule keeps their ratio.
        meta_learning_rate (`float`, defaults to `1e-3`):
            Learning rate of the meta optimizer (Adam) that updates the meta network.
        correction_meta_learning_rate (`float`, *optional*):
            Learning rate of the label-correction network when both nets are learned (`reweight+correct`); default:
            `meta_learning_rate`.
        meta_weight_decay (`float`, defaults to `0.0`):
            Weight decay of the meta optimizer.
        meta_batch_size (`int`, *optional*):
            Per-device batch size of meta (clean) batches; defaults to `per_device_train_batch_size`.
        meta_warmup_steps (`int`, defaults to `0`):
            Base optimizer steps before the first meta step (the meta net still weights/corrects the base loss).
        meta_objective (`str`, defaults to `"reweight"`):
            `"reweight"` (per-example weights), `"correct"` (label correction) or `"reweight+correct"`.
        meta_hidden_size (`int`, defaults to `100`):
            Hidden width of the default meta networks.
        meta_weight_normalize (`bool`, defaults to `False`):
            Normalise the weights of each batch to mean 1 (default `MetaWeightNet` only).
        meta_weight_center (`bool`, defaults to `False`):
            Centre the weighting net's outputs per batch before the sigmoid (its output bias is frozen); use it with
            `meta_weight_normalize`, where the bias would otherwise drift until the weights saturate.
        meta_weight_scale (`float`, defaults to `1.0`):
            The default weighting net's weights lie in (0, `meta_weight_scale`).
        meta_init_bias (`float`, defaults to `0.0`):
            Initial output bias of the default weighting net (0: weights start at `meta_weight_scale` / 2).
        meta_use_uncertainty (`bool`, defaults to `False`):
            The default weighting net also sees the prediction's uncertainty (entropy of the softmax).
        meta_weight_normalize_by_class (`bool`, defaults to `False`):
            Rescale the weights to mean 1 within each given class of the batch (any weight net): weights then only
            move trust between examples of the same class and cannot shift the class balance of the training labels
            (a loss-fed weight net otherwise tends to learn per-class weights, and can silence a minority class).
        meta_feature_column (`str`, *optional*):
            A training-set column of per-example number lists (all of one width F) that the weighting net reads
            besides the loss, e.g. how each labeling function voted relative to the given label
            ([`data.add_lf_agreement`]): the meta net can then learn which sources of labels to trust. The trainer
            keeps the column away from the model; the default weighting net gets F more inputs.
        example_weight_column (`str`, *optional*):
            A training-set column of fixed per-example weights (one number per row), each multiplying its example's
            loss: with SAMA it multiplies the learned weights (after `meta_weight_normalize_by_class`), in the base
            steps and in both perturbed passes; without a meta set ([`fit_with_clean_set`]) it is a weighted
            fine-tuning. E.g. P(label right | votes) from the clean set ([`data.fit_vote_prior`]).
        correction_type (`str`, defaults to `"free"`):
            Default label-correction net: `"free"` ([`LabelCorrectionNet`]: any soft label from the model's logits and
            the given label) or `"bootstrap"` ([`BootstrapCorrectionNet`]: a per-example mix of the given label and
            the model's own prediction, which cannot relabel a whole class to a class the model does not predict).
        correction_mix_noisy (`float`, defaults to `0.0`):
            MLC-style mixing of the corrected label with the noisy label (default `LabelCorrectionNet` only).
        correction_label_prior (`float`, defaults to `3.0`):
            Initial trust in the given label of the default correction net (logit bonus of the given label for
            `"free"`; the mix starts at sigmoid(-prior) for `"bootstrap"`).
        meta_group_by_length (`bool`, *optional*):
            Draw meta batches of similar length (less padding). Default: as the base batches
            (`train_sampling_strategy="group_by_length"`).
        meta_micro_batch_size (`int`, *optional*):
            Compute the meta loss's gradient over micro-batches of this many examples of similar length, each
            trimmed to its longest example: the same gradient (the loss is the mean over the meta batch) with less
            padding, for a meta batch whose lengths differ widely (e.g. a small clean set drawn whole). Needs a
            meta loss that is a mean over examples, as the default objective's.
        meta_pass_overhead_tokens (`float`, *optional*):
            Cut the meta batch into length-sorted micro-batches only where the padding it saves outweighs the cost of
            another forward/backward pass, this cost given in token positions (each micro-batch costs this plus its
            examples times its longest). It depends on the model and the hardware (`recipes/pass_overhead.py`
            measures it): about 60 for a 6-layer MiniLM on one CPU thread; on a GPU, where a small pass costs as much
            as a large one, leave it unset.
            Combines with `meta_micro_batch_size` (then an upper bound on the micro-batch size).
        meta_dropout (`bool`, defaults to `True`):
            Run the meta step's passes (the meta loss and the ±εu passes) in train mode, with dropout, as the base
            steps and the paper do. `False` runs them in eval mode: no dropout masks to draw (nor to record for the
            second ±εu pass), and attention can take the fused kernel, so the meta step is cheaper (18–20% less CPU
            time on the CPU benchmark), and the meta objective is the deterministic loss of the model as it will be
            evaluated. The base steps keep their dropout either way.
        flush_denormal (`bool`, defaults to `True`):
            On a CPU, treat subnormal floats (below 1.2e-38 in float32) as zero while training
            (`torch.set_flush_denormal`): example weights near 0 make gradients subnormal, which CPUs process many
            times slower (a WRENCH recipe run trained 1.9× faster with it, to the same result). Turned off again when
            training ends, unless it was on before. It is set in the training thread: intra-op threads that already
            exist keep their own setting (half of a two-thread op stayed subnormal), so with several torch threads
            also call `torch.set_flush_denormal(True)` before the first torch op, as the recipe does. No effect on
            GPUs.
        example_id_column (`str`, defaults to `"example_id"`):
            A training-set column with each example's index in `[0, len(train_dataset))`. When present, the trainer
            keeps it away from the model and records the weight every example receives in each epoch
            (`SAMATrainer.weight_history`).

    Defaults that differ from `TrainingArguments`: `ddp_find_unused_parameters=False` (every parameter of a
    classifier is used in every step; set it to `True` for a model with branches that some batches skip).
    """

    meta_gradient: str = field(default="sama", metadata={"help": "Meta-gradient method: sama, sama-na, ..."})
    meta_gradient_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra options of the meta-gradient method (JSON dict)."}
    )
    unroll_steps: int = field(default=10, metadata={"help": "Base optimizer steps between two meta steps."})
    sama_alpha: float | None = field(
        default=None, metadata={"help": "Finite-difference size ‖εu‖ (None: the method's default, 1.0 for SAMA)."}
    )
    sama_base_update: bool = field(
        default=True, metadata={"help": "Leave θ at θ-εu after each meta step (as the paper); False restores θ."}
    )
    meta_gradient_params: str | None = field(
        default=None,
        metadata={"help": "Regex over parameter names: only these enter the meta-gradient (None: all trainable)."},
    )
    sama_base_update_follows_lr: bool = field(
        default=False,
        metadata={"help": "Scale the base update by the learning-rate schedule (lr_t / lr_0)."},
    )
    meta_learning_rate: float = field(default=1e-3, metadata={"help": "Meta optimizer (Adam) learning rate."})
    correction_meta_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Meta learning rate of the label-correction net (default: meta_learning_rate)."},
    )
    meta_weight_decay: float = field(default=0.0, metadata={"help": "Meta optimizer weight decay."})
    meta_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device meta batch size (default: per_device_train_batch_size)."}
    )
    meta_warmup_steps: int = field(default=0, metadata={"help": "Base steps before the first meta step."})
    meta_objective: str = field(
        default="reweight", metadata={"help": "reweight | correct | reweight+correct", "choices": META_OBJECTIVES}
    )
    meta_hidden_size: int = field(default=100, metadata={"help": "Hidden width of the default meta networks."})
    meta_weight_normalize: bool = field(default=False, metadata={"help": "Normalise weights to batch mean 1."})
    meta_weight_center: bool = field(
        default=False, metadata={"help": "Centre the weighting net's outputs per batch (use with normalisation)."}
    )
    meta_weight_scale: float = field(default=1.0, metadata={"help": "Weights lie in (0, meta_weight_scale)."})
    meta_init_bias: float = field(default=0.0, metadata={"help": "Initial output bias of the weighting net."})
    meta_use_uncertainty: bool = field(
        default=False, metadata={"help": "The weighting net also sees the prediction's entropy."}
    )
    meta_weight_normalize_by_class: bool = field(
        default=False, metadata={"help": "Normalise weights to mean 1 within each given class of the batch."}
    )
    meta_feature_column: str | None = field(
        default=None,
        metadata={"help": "Training-set column of per-example features the weighting net reads besides the loss."},
    )
    example_weight_column: str | None = field(
        default=None,
        metadata={"help": "Training-set column of fixed per-example weights multiplying each example's loss."},
    )
    correction_type: str = field(
        default="free",
        metadata={"help": "Default label-correction net: free | bootstrap", "choices": CORRECTION_TYPES},
    )
    correction_mix_noisy: float = field(
        default=0.0, metadata={"help": "Mix corrected labels with the noisy label (MLC skip connection)."}
    )
    correction_label_prior: float = field(
        default=3.0, metadata={"help": "Initial logit bonus of the given label in the default correction net."}
    )

    meta_group_by_length: bool | None = field(
        default=None, metadata={"help": "Meta batches of similar length (default: as the base batches)."}
    )
    meta_micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Meta loss over length-sorted micro-batches of this size (less padding; same gradient)."},
    )
    meta_pass_overhead_tokens: float | None = field(
        default=None,
        metadata={
            "help": "Cut the meta batch by length where the padding saved exceeds this many positions per pass."
        },
    )
    meta_dropout: bool = field(
        default=True,
        metadata={"help": "Meta step's passes with dropout (train mode); False: eval mode (cheaper, deterministic)."},
    )
    flush_denormal: bool = field(
        default=True, metadata={"help": "On a CPU, flush subnormal floats to zero while training (speed)."}
    )
    example_id_column: str = field(
        default="example_id", metadata={"help": "Training-set column with example indices (weight statistics)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP find_unused_parameters (False: every parameter gets a gradient in every step)."},
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["meta_gradient_kwargs"]

    def __post_init__(self):
        if self.unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1 (got {self.unroll_steps}): one meta step every N base steps")
        if self.meta_gradient not in available_methods():
            raise ValueError(
                f"unknown meta_gradient {self.meta_gradient!r}; choose one of: {', '.join(available_methods())}"
            )
        if self.meta_objective not in META_OBJECTIVES:
            raise ValueError(f"meta_objective must be one of {META_OBJECTIVES}, got {self.meta_objective!r}")
        if self.sama_alpha is not None and not self.sama_alpha > 0:
            raise ValueError(f"sama_alpha must be > 0 (got {self.sama_alpha})")
        if self.meta_gradient_params is not None:
            try:
                re.compile(self.meta_gradient_params)
            except re.error as err:
                raise ValueError(
                    f"meta_gradient_params={self.meta_gradient_params!r} is not a regular expression ({err}); "
                    "give a pattern over parameter names such as 'encoder\\.layer\\.5\\.|classifier'"
                ) from None
        if self.meta_learning_rate < 0 or self.meta_weight_decay < 0:
            raise ValueError("meta_learning_rate and meta_weight_decay must be >= 0")
        if self.correction_meta_learning_rate is not None and self.correction_meta_learning_rate < 0:
            raise ValueError("correction_meta_learning_rate must be >= 0")
        if not self.meta_weight_scale > 0:
            raise ValueError(f"meta_weight_scale must be > 0 (got {self.meta_weight_scale})")
        if self.meta_batch_size is not None and self.meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1 (got {self.meta_batch_size})")
        if self.meta_micro_batch_size is not None and self.meta_micro_batch_size < 1:
            raise ValueError(f"meta_micro_batch_size must be >= 1 (got {self.meta_micro_batch_size})")
        if self.meta_pass_overhead_tokens is not None and not self.meta_pass_overhead_tokens >= 0:
            raise ValueError(
                f"meta_pass_overhead_tokens must be >= 0 (got {self.meta_pass_overhead_tokens}); leave it unset to "
                "keep the meta batch whole"
            )
        if self.meta_warmup_steps < 0:
            raise ValueError("meta_warmup_steps must be >= 0")
        if self.meta_feature_column and "reweight" not in self.meta_objective:
            raise ValueError(
                f"meta_feature_column feeds the weighting net, but meta_objective={self.meta_objective!r} does not "
                "reweight: use 'reweight' or 'reweight+correct', or unset meta_feature_column"
            )
        if self.correction_type not in CORRECTION_TYPES:
            raise ValueError(f"correction_type must be one of {CORRECTION_TYPES}, got {self.correction_type!r}")
        if self.correction_mix_noisy and self.correction_type != "free":
            raise ValueError("correction_mix_noisy applies to correction_type='free' only; set it to 0")
        if not 0.0 <= self.correction_mix_noisy <= 1.0:
            raise ValueError("correction_mix_noisy must be in [0, 1]")
        super().__post_init__()
        if self.meta_gradient_kwargs is None:
            self.meta_gradient_kwargs = {}

    @property
    def meta_alpha(self) -> float | None:
        """The step size the meta-gradient method uses: ``sama_alpha``, or the method's default."""
        return self.sama_alpha if self.sama_alpha is not None else default_alpha(self.meta_gradient)

    @property
    def meta_batches_grouped_by_length(self) -> bool:
        """Whether meta batches are drawn grouped by length (``meta_group_by_length``, else as the base batches)."""
        if self.meta_group_by_length is not None:
            return self.meta_group_by_length
        return getattr(self, "train_sampling_strategy", None) == "group_by_length"
