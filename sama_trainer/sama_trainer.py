"""``SAMATrainer``: a ``transformers.Trainer`` that learns example weights and/or label corrections with SAMA.

The trainer only orchestrates: what the losses are is a :class:`~sama_trainer.objectives.MetaObjective`, the
meta-gradient math lives in :mod:`sama_trainer.meta_gradient` and :mod:`sama_trainer.adaptation`, the DDP agreement
in :mod:`sama_trainer.distributed` and the meta side of checkpoints in :mod:`sama_trainer.checkpoint`. Per base step,
``compute_loss`` returns the objective's meta-weighted (and/or label-corrected) loss. Right after every
``unroll_steps``-th base optimizer step (a callback on ``on_optimizer_step``, so the gradients the optimizer used are
still in ``.grad`` and its learning rate is the one it used), one meta step runs on a fresh meta batch and the
micro-batches of that step, and the meta optimizer (a plain ``torch.optim.Adam`` owned by the trainer) updates the
meta network.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .adaptation import check_adaptation_supported, unwrap_optimizer
from .checkpoint import META_STATE_NAME, atomic_save, rank_state_name, resolve_resume_checkpoint
from .distributed import RankAgreement, all_reduce_mean_, apply_ddp_timeout
from .losses import soft_cross_entropy
from .meta_data import MetaBatchStream, example_lengths, length_chunks, longest_first, mean_over_chunks
from .meta_gradient import MetaGradients, is_adaptive, is_second_order, meta_gradient
from .meta_gradient.prefix_cache import PrefixCache
from .meta_nets import save_meta_model
from .model_card import sama_card_section, save_trainer_card
from .objectives import LABEL_KEYS, ClassificationObjective, ExampleLosses, MetaObjective
from .sama_config import SAMAConfig
from .weight_history import WeightHistory


__all__ = ["META_MODEL_DIR", "SAMATrainer"]

META_MODEL_DIR = "sama_meta_model"


def _flushes_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (1e-30 · 1e-10 is subnormal in float32)."""
    return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0


class _MetaStepCallback(TrainerCallback):
    """Runs the trainer's meta step right after the base optimizer step (before the scheduler and zero_grad)."""

    def __init__(self, trainer: SAMATrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._maybe_meta_step()


def _dataset_columns(dataset: Any) -> set[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return set(names)
    try:
        first = dataset[0]
    except Exception:
        return None
    return set(first) if isinstance(first, dict) else None


class SAMATrainer(Trainer):
    """Trainer with SAMA data reweighting / label correction learned from a small clean ``meta_dataset``.

    Args:
        model, args, train_dataset: as for ``Trainer`` (``args`` must be a :class:`SAMAConfig`).
        meta_dataset: the meta set, tokenised like ``train_dataset`` with a label column: a small clean set, or the
            training set itself (meta-learned data pruning: the weights say which examples the model needs).
        meta_model: the meta network; default: the objective's (for classification, from ``args.meta_objective``:
            ``MetaWeightNet``, a correction net or an ``nn.ModuleDict`` with keys ``"reweight"`` and ``"correct"``).
        objective: a :class:`~sama_trainer.objectives.MetaObjective` (what the meta net sees, the base and meta
            losses); default: :class:`~sama_trainer.objectives.ClassificationObjective` from ``args``.
        meta_data_collator: collator for meta batches (default: the trainer's ``data_collator``).
        meta_optimizer: an optimizer over ``meta_model``'s parameters (e.g. one parameter group per part of the
            meta net, each with its own learning rate); needs ``meta_model``. Default: ``Adam`` with
            ``args.meta_learning_rate`` (``args.correction_meta_learning_rate`` for a correction net learned next to
            a weighting net) and ``args.meta_weight_decay``.
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model`` and only adapter parameters
            form θ.
        **kwargs: every other ``Trainer`` argument (``data_collator``, ``eval_dataset``, ``processing_class``,
            ``compute_metrics``, ``callbacks``, ``optimizers``, ...). Callbacks deriving from
            :class:`~sama_trainer.callbacks.SAMACallback` also receive the meta-step events.
    """

    _tag_names = ["sama", "meta-learning", "data-reweighting"]
    _name = "SAMA"
    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: SAMAConfig | None = None,
        train_dataset: Any = None,
        meta_dataset: Any = None,
        meta_model: nn.Module | None = None,
        *,
        objective: MetaObjective | None = None,
        meta_data_collator: Any = None,
        meta_optimizer: torch.optim.Optimizer | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = SAMAConfig(output_dir="sama-trainer-output")
        if not isinstance(args, SAMAConfig):
            raise TypeError(
                f"SAMATrainer needs args=SAMAConfig(...), got {type(args).__name__}; SAMAConfig accepts every "
                "TrainingArguments field plus the SAMA ones."
            )
        self._check_meta_dataset(meta_dataset, args)
        if meta_optimizer is not None and meta_model is None:
            raise ValueError("meta_optimizer=... needs meta_model=...: build the optimizer over its parameters")
        if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "SAMA needs non-reentrant gradient checkpointing: set gradient_checkpointing_kwargs="
                "{'use_reentrant': False} (the default)."
            )
        if args.fsdp or args.deepspeed:
            raise NotImplementedError(
                "SAMATrainer supports DDP (single and multi node) but not FSDP/DeepSpeed ZeRO yet: the perturbed "
                "passes run through the unwrapped module and take ∂L_meta/∂θ with autograd.grad, which sharded "
                "parameters do not support (no all-gather, no reduce-scatter outside .grad). See README, "
                "'Distributed training'."
            )
        if getattr(args, "ddp_static_graph", False):
            raise ValueError("ddp_static_graph=True is incompatible with SAMA's periodic meta step; leave it False.")
        self.objective = objective or ClassificationObjective.from_config(args, train_dataset)
        model = self._wrap_peft(model, peft_config)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if args.world_size > 1:
            apply_ddp_timeout(args.ddp_timeout)  # Trainer passes it to the process group on GPUs only
        # Our loss is a plain per-micro-batch mean: keep the Trainer from multiplying it by GA x world size.
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        if args.meta_gradient_params is not None:
            self._base_params()  # a pattern that selects nothing fails here, not at the first meta step

        if meta_model is None:
            num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
            with torch.random.fork_rng(devices=[]):  # the same net for a seed, whatever ran before
                torch.manual_seed(args.seed)
                meta_model = self.objective.default_meta_model(args, num_labels)
        self.objective.check_meta_model(meta_model)
        if not any(p.requires_grad for p in meta_model.parameters()):
            raise ValueError("the meta model has no trainable parameters")
        self.meta_model = meta_model.to(args.device)
        if meta_optimizer is None:
            meta_optimizer = self._default_meta_optimizer()
        else:
            self._check_meta_optimizer(meta_optimizer, self.meta_model)
        self.meta_optimizer = meta_optimizer
        self.meta_dataset = meta_dataset
        self.meta_data_collator = meta_data_collator
        self._meta_stream: MetaBatchStream | None = None
        self._pending_meta_stream_state: dict | None = None
        # the micro-batches of the current optimizer step (references only): the finite difference uses all of them
        self._step_micro_batches: list[dict] = []
        self.last_meta_gradients: list[torch.Tensor] | None = None
        self._meta_metrics: dict[str, list] = defaultdict(list)
        self.meta_step_count = 0
        self.meta_steps_skipped = 0
        self.skip_reasons: dict[str, int] = defaultdict(int)
        # multiplies the base update θ ← θ - scale·εu of every meta step (sama_base_update); callbacks may set it
        self.base_update_scale = 1.0
        self.weight_history = WeightHistory.for_dataset(train_dataset, args.example_id_column)
        opt = kwargs.get("optimizers", (None, None))[0]
        if opt is not None:
            self._check_optimizer(opt)
        self.add_callback(_MetaStepCallback(self))

    # ------------------------------------------------------------------------------------------------------------
    # validation and construction

    @staticmethod
    def _check_meta_optimizer(optimizer: Any, meta_model: nn.Module) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"meta_optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for p in meta_model.parameters()}
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
        if foreign:
            raise ValueError(
                f"meta_optimizer holds {len(foreign)} tensor(s) that are not parameters of the meta model; build it "
                "over meta_model.parameters() (e.g. one parameter group per meta-net part, each with its own lr)."
            )

    def _default_meta_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the meta net; a correction net next to a weighting net gets its own learning rate if set."""
        args, params = self.args, [p for p in self.meta_model.parameters() if p.requires_grad]
        groups: list[dict] = [{"params": params}]
        correction_lr = args.correction_meta_learning_rate
        if correction_lr is not None and isinstance(self.meta_model, nn.ModuleDict) and "correct" in self.meta_model:
            correct = {id(p) for p in self.meta_model["correct"].parameters()}
            groups = [
                {"params": [p for p in params if id(p) not in correct]},
                {"params": [p for p in params if id(p) in correct], "lr": correction_lr},
            ]
        return torch.optim.Adam(groups, lr=args.meta_learning_rate, weight_decay=args.meta_weight_decay)

    @staticmethod
    def _check_meta_dataset(meta_dataset: Any, args: SAMAConfig) -> None:
        if meta_dataset is None:
            raise ValueError(
                "SAMATrainer needs meta_dataset=...: a small clean (correctly labelled) dataset, tokenised like the "
                "training set, that the meta network is trained to do well on (or the training set itself)."
            )
        try:
            n = len(meta_dataset)
        except TypeError:
            raise ValueError("meta_dataset must be a map-style dataset with a length") from None
        if n == 0:
            raise ValueError("meta_dataset is empty")
        columns = _dataset_columns(meta_dataset)
        label_keys = set(LABEL_KEYS) | set(args.label_names or [])
        if columns is not None and not columns & label_keys:
            raise ValueError(
                f"meta_dataset has no label column (columns: {sorted(columns)}); the meta loss needs clean "
                "labels in a 'labels' or 'label' column."
            )

    @staticmethod
    def _wrap_peft(model: Any, peft_config: Any) -> Any:
        if peft_config is None:
            return model
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise ValueError("the model is already a PeftModel; pass either a PeftModel or peft_config, not both")
        return get_peft_model(model, peft_config)

    def _check_optimizer(self, optimizer: Any) -> None:
        if is_adaptive(self.args.meta_gradient):
            check_adaptation_supported(optimizer)
        elif self.args.meta_gradient == "sama-na" and self.args.sama_base_update:
            # for SGD du/dg is constant and SAMA-NA's base step is SAMA's; for adaptive optimizers it is not
            base = unwrap_optimizer(optimizer)
            if not isinstance(base, torch.optim.SGD):
                warnings.warn(
                    f"meta_gradient='sama-na' with sama_base_update=True under {type(base).__name__}: after each "
                    "meta step θ moves by a step of norm sama_alpha along the raw meta-gradient, which puts far more "
                    "on a few coordinates than the optimizer's own steps do and can wreck training. Set "
                    "sama_base_update=False (or a much smaller sama_alpha) unless you are reproducing the paper's "
                    "SAMA-NA ablation.",
                    UserWarning,
                    stacklevel=2,
                )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self._check_optimizer(optimizer)
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        # the objective's extra columns (e.g. example ids) must reach compute_loss (TRL's DPO/GRPO do the same)
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self.objective.input_columns if c not in self._signature_columns]

    # ------------------------------------------------------------------------------------------------------------
    # the base step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the objective's plain (unweighted) loss
            loss, outputs = self.objective.evaluation_loss(model, dict(inputs))
            return (loss, outputs) if return_outputs else loss
        self._step_micro_batches.append(inputs)
        examples, independent = self.objective.base_losses(model, dict(inputs))
        loss, weights = self.objective.weighted_loss(self.meta_model, examples)
        if independent is not None:
            loss = loss + independent
        if weights is not None:
            self._record_weights(examples, weights.detach())
        outputs = {"logits": examples.logits}
        return (loss, outputs) if return_outputs else loss

    def _record_weights(self, examples: ExampleLosses, weights: torch.Tensor) -> None:
        w = weights.float()
        self._meta_metrics["_weights"].append(torch.stack([w.mean(), w.std(unbiased=False), w.min(), w.max()]))
        if examples.example_ids is not None:
            self.weight_history.record(int(self.state.epoch or 0), examples.example_ids, w)

    # ------------------------------------------------------------------------------------------------------------
    # the meta step

    def _meta_batches(self) -> MetaBatchStream:
        if self._meta_stream is None:
            args, dataset = self.args, self.meta_dataset
            if args.remove_unused_columns and hasattr(dataset, "remove_columns"):
                dataset = self._remove_unused_columns(dataset, description="meta")
            lengths = example_lengths(dataset) if args.meta_batches_grouped_by_length else None
            if args.meta_batches_grouped_by_length and lengths is None:
                raise ValueError(
                    "meta batches grouped by length need an 'input_ids' column in meta_dataset; "
                    "set meta_group_by_length=False to draw them in random order"
                )
            self._meta_stream = MetaBatchStream(
                dataset,
                args.meta_batch_size or args.per_device_train_batch_size,
                self.meta_data_collator or self.data_collator,
                seed=args.seed,
                rank=args.process_index,
                world_size=args.world_size,
                lengths=lengths,
            )
            if self._pending_meta_stream_state is not None:
                self._meta_stream.load_state_dict(self._pending_meta_stream_state)
                self._pending_meta_stream_state = None
        return self._meta_stream

    def _agreement(self) -> RankAgreement | None:
        return RankAgreement(self.args.world_size) if self.args.world_size > 1 else None

    def _maybe_meta_step(self) -> None:
        step = self.state.global_step + 1  # the optimizer step that just ran
        micro_batches, self._step_micro_batches = self._step_micro_batches, []
        if step <= self.args.meta_warmup_steps or step % self.args.unroll_steps != 0:
            return
        if self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the base step did not happen
            self._skip_meta_step("base_step_skipped")
            return
        self.meta_step(micro_batches)

    def _meta_params(self) -> list[torch.Tensor]:
        return [p for p in self.meta_model.parameters() if p.requires_grad]

    @contextmanager
    def _agreeing_on_error(self, agree: RankAgreement | None, meta_params: list[torch.Tensor]):
        """Code of the meta step that runs before the agreement: if it raises (a user's callback or meta collator),
        this rank answers the agreement with ``error`` first, so that no other rank waits for it."""
        try:
            yield
        except Exception:
            if agree is not None:
                agree([torch.zeros_like(p) for p in meta_params], "error")
            raise

    def _skip_meta_step(self, reason: str) -> MetaGradients:
        """A meta step this rank does not run: it still answers the other ranks' agreement (they may be running
        theirs) and counts the step as skipped, so counters and collectives stay the same on every rank."""
        meta_params, agree = self._meta_params(), self._agreement()
        with self._agreeing_on_error(agree, meta_params):
            self._call_meta_event("on_meta_step_begin")
        reasons = [reason]
        if agree is not None:
            reasons = agree([torch.zeros_like(p) for p in meta_params], reason)[1]
        grads = MetaGradients.skip(meta_params, {}, reasons)
        self._finish_meta_step(grads, meta_params)
        return grads

    def _loss_scale_option(self) -> dict[str, float]:
        """fp16 with a grad scaler: scale the meta loss's backward as the base step's is scaled."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return {}
        return {"loss_scale": float(scaler.get_scale())}

    def _lr_ratio(self) -> float:
        """The learning rate of the step just taken over the schedule's initial one (1 without a schedule)."""
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        return lr / float(group.get("initial_lr", lr) or 1.0) if lr else 0.0

    def _base_params(self) -> list[torch.Tensor]:
        """The base parameters the meta-gradient goes through: the trainable ones, or those ``meta_gradient_params``
        selects by name."""
        pattern = self.args.meta_gradient_params
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if pattern is None:
            return [p for _, p in named]
        chosen = [p for name, p in named if re.search(pattern, name)]
        if not chosen:
            examples = ", ".join(name for name, _ in named[-3:])
            raise ValueError(
                f"meta_gradient_params={pattern!r} matches none of the model's trainable parameters (the last ones "
                f"are named {examples}); give a pattern that matches some, or leave it unset for all of them"
            )
        return chosen

    def _call_meta_event(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(
                    self.args,
                    self.state,
                    self.control,
                    model=self.model,
                    meta_model=self.meta_model,
                    trainer=self,
                    **kwargs,
                )

    def meta_step(self, base_batches: list[dict]) -> MetaGradients:
        """One meta step on a fresh meta batch and the base step's micro-batches; updates the meta network.

        The base loss of the perturbed passes is the mean over ``base_batches`` (all micro-batches of the optimizer
        step that just ran), so gradient accumulation does not change the meta-gradient.
        """
        args, objective, meta_model = self.args, self.objective, self.meta_model
        model = self.model  # unwrapped: no DDP hooks fire, autocast (if any) is patched onto its forward
        base_params = self._base_params()
        meta_params = self._meta_params()
        last_grads = [p.grad for p in base_params]
        agree = self._agreement()
        with self._agreeing_on_error(agree, meta_params):  # the method agrees on everything after this
            self._call_meta_event("on_meta_step_begin")
            batch = self._meta_batches().next_batch()
            # cut on the host, before the batch moves to the device: no device syncs for the lengths
            parts = length_chunks(batch, args.meta_micro_batch_size, args.meta_pass_overhead_tokens)
            chunks = [(self._prepare_inputs(part), n) for part, n in parts]

        # first-order methods only need base-model values: no graph through the base model in perturbed passes
        base_grad = torch.enable_grad if is_second_order(args.meta_gradient) else torch.no_grad

        def base_loss() -> torch.Tensor:
            total = 0.0
            for inputs in base_batches:
                with base_grad():
                    examples = objective.example_losses(model, dict(inputs))
                total = total + objective.weighted_loss(meta_model, examples)[0]
            return total / len(base_batches)

        def meta_loss() -> torch.Tensor:
            return mean_over_chunks(lambda chunk: objective.meta_loss(model, dict(chunk)), chunks)

        # The step's gradients are consumed: the method forms u in their buffers (no θ-sized v) or, where it cannot,
        # keeps the saved θ there (the core checks that they fit).
        options: dict[str, Any] = dict(
            restore=not args.sama_base_update,
            workspace=last_grads,
            consume_grads=True,
            base_step_hook=(lambda step: all_reduce_mean_(step, args.world_size)) if args.world_size > 1 else None,
            **self._loss_scale_option(),
        )
        if args.sama_base_update:
            follows_lr = self._lr_ratio() if args.sama_base_update_follows_lr else 1.0
            options["base_update_scale"] = self.base_update_scale * follows_lr
        if args.meta_gradient_params is not None and not is_second_order(args.meta_gradient):
            options["pass_cache"] = PrefixCache(model, base_params)  # the layers below the scope run once
        if not args.meta_dropout:
            options["replay_draws"] = False  # eval-mode passes draw no dropout masks: nothing to record
        options.update(args.meta_gradient_kwargs or {})  # the user's options win (e.g. consume_grads=False)
        was_training = model.training
        model.train(args.meta_dropout)
        try:
            grads = meta_gradient(
                args.meta_gradient,
                base_params,
                meta_params,
                base_loss,
                meta_loss,
                optimizer=self.optimizer if is_adaptive(args.meta_gradient) else None,
                last_grads=last_grads,
                alpha=args.sama_alpha,
                agree=agree,
                **options,
            )
        finally:
            model.train(was_training)
        self._finish_meta_step(grads, meta_params)
        return grads

    def _finish_meta_step(self, grads: MetaGradients, meta_params: list[torch.Tensor]) -> None:
        """Step the meta optimizer (unless the step was skipped), count the step and record its statistics.

        Every rank reaches this with the same ``grads.skipped`` and reasons (the agreement), so the counters agree
        across ranks. The statistics of a skipped step (possibly non-finite) are not averaged into the logs; its
        reasons are counted in ``meta/skipped/<reason>``.
        """
        self.meta_step_count += 1
        if grads.skipped:
            self.meta_steps_skipped += 1
            for reason in grads.skip_reasons:
                self.skip_reasons[reason] += 1
        else:
            for key, value in grads.stats.items():
                if key != "skipped":
                    self._meta_metrics[key].append(value)
            self.last_meta_gradients = [g.detach().clone() for g in grads]
            for p, g in zip(meta_params, grads):
                p.grad = g.to(p.dtype)
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
        self._call_meta_event("on_meta_step", metrics=dict(grads.stats))

    @torch.no_grad()
    def meta_loss_of(self, batch: dict[str, Any]) -> torch.Tensor:
        """The objective's meta loss (on clean labels) of one collated ``batch`` at the current θ, without dropout and
        without a graph: e.g. the loss of held-out clean examples before and after a meta step."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self.objective.meta_loss(model, dict(self._prepare_inputs(batch))).detach().float()
        finally:
            model.train(was_training)

    def set_meta_dataset(self, meta_dataset: Any, *, keep_position: bool = False) -> None:
        """Draw the following meta batches from ``meta_dataset`` (checked as the constructor's ``meta_dataset``).

        The batches start a fresh stream (shuffled epochs from the first, as a new run's). ``keep_position=True``
        keeps instead the stream position restored from a checkpoint, for a callback that puts back, when a run
        resumes, the meta set the checkpointed run was drawing from (e.g. :class:`~sama_trainer.CrossFitMetaSet`).
        """
        self._check_meta_dataset(meta_dataset, self.args)
        if keep_position and self._meta_stream is not None:
            self._pending_meta_stream_state = self._meta_stream.state_dict()
        elif not keep_position:
            self._pending_meta_stream_state = None
        self.meta_dataset = meta_dataset
        self._meta_stream = None

    def record_meta_metric(self, name: str, value: float) -> None:
        """Average ``value`` into the next training log as ``meta/<name>`` (as the meta step's own statistics)."""
        self._meta_metrics[name].append(float(value))

    # ------------------------------------------------------------------------------------------------------------
    # analysis helpers

    @torch.no_grad()
    def compute_example_weights(
        self, dataset: Any, batch_size: int | None = None, group_by_length: bool = True
    ) -> dict[str, list]:
        """Per-example base loss, meta weight and corrected label (argmax/probabilities) on ``dataset`` (eval mode).
        With ``example_weight_column`` the weight is the learned weight times the given one, and ``learned_weight``
        and ``given_weight`` are the two factors.

        Needs a :class:`~sama_trainer.objectives.ClassificationObjective` (the default). With ``group_by_length``
        and an ``input_ids`` column, the model's forward passes run over examples of similar length (less padding);
        the meta network still sees batches of ``batch_size`` examples in the dataset's order, so weights normalised
        within a batch are those of the plain order.
        """
        objective = self.objective
        if not isinstance(objective, ClassificationObjective):
            raise TypeError("compute_example_weights needs a ClassificationObjective")
        if self.args.remove_unused_columns and hasattr(dataset, "remove_columns"):
            dataset = self._remove_unused_columns(dataset, description="weights")
        batch_size = batch_size or self.args.per_device_eval_batch_size
        model, out = self.model, defaultdict(list)
        was_training, meta_was_training = model.training, self.meta_model.training
        model.eval()
        self.meta_model.eval()
        try:
            for examples in self._example_losses_in_order(dataset, batch_size, group_by_length):
                losses = examples.losses
                if objective.correct:
                    corrected = objective.corrected_labels(self.meta_model, examples)
                    out["corrected_label"] += corrected.argmax(-1).tolist()
                    out["corrected_probs"] += corrected.float().tolist()
                    losses = soft_cross_entropy(examples.logits, corrected)
                out["loss"] += losses.float().tolist()
                if objective.reweight:
                    out["weight"] += objective.example_weights(self.meta_model, losses, examples).float().tolist()
                    if examples.given_weights is not None:  # the net's own share, before the fixed weights
                        learned = objective.example_weights(
                            self.meta_model, losses, dataclasses.replace(examples, given_weights=None)
                        )
                        out["learned_weight"] += learned.float().tolist()
                        out["given_weight"] += examples.given_weights.float().tolist()
        finally:
            model.train(was_training)
            self.meta_model.train(meta_was_training)
        return dict(out)

    def _example_losses_in_order(self, dataset: Any, batch_size: int, group_by_length: bool):
        """The objective's :class:`ExampleLosses` on ``dataset``, in batches of ``batch_size`` in its order; the
        forward passes over length-sorted batches when ``group_by_length`` and the examples have ``input_ids``."""
        from torch.utils.data import DataLoader

        def loader(order=None):
            return DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, sampler=order)

        def plain():
            for batch in loader():
                yield self.objective.example_losses(self.model, self._prepare_inputs(batch))

        lengths = example_lengths(dataset) if group_by_length else None
        if lengths is None:
            yield from plain()
            return
        order, position = longest_first(lengths)
        parts = [self.objective.example_losses(self.model, self._prepare_inputs(b)) for b in loader(order)]
        fields = {}
        for name in (f.name for f in dataclasses.fields(ExampleLosses)):
            values = [getattr(part, name) for part in parts]
            if all(v is None for v in values):
                fields[name] = None
            elif all(isinstance(v, torch.Tensor) for v in values):
                fields[name] = torch.cat(values)[position.to(values[0].device)]  # back to the dataset's order
            else:  # a field that cannot be put back in order: the plain passes
                yield from plain()
                return
        for start in range(0, len(order), batch_size):
            yield ExampleLosses(**{k: None if v is None else v[start : start + batch_size] for k, v in fields.items()})

    def example_weight_means(self, last_epochs: int | None = None) -> torch.Tensor:
        """Mean weight each training example received while drawn (all epochs, or the last ``last_epochs``), by
        its ``example_id``; NaN for examples never drawn. Under DDP, call it on every rank (it sums their records).
        """
        self.weight_history.synchronize()
        return self.weight_history.mean(last_epochs)

    # ------------------------------------------------------------------------------------------------------------
    # logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self._pop_meta_metrics()}
        super().log(logs, start_time)

    def _pop_meta_metrics(self) -> dict[str, float]:
        metrics, out = self._meta_metrics, {}
        weights = metrics.pop("_weights", None)
        if weights:
            stats = torch.stack(weights)
            mean, std, lo, hi = stats[:, 0].mean(), stats[:, 1].mean(), stats[:, 2].min(), stats[:, 3].max()
            out.update({"meta/weight_mean": mean.item(), "meta/weight_std": std.item(), "meta/weight_min": lo.item()})
            out["meta/weight_max"] = hi.item()
        for key, values in metrics.items():
            out[f"meta/{key}"] = sum(values) / len(values)
        out["meta/steps"] = float(self.meta_step_count)
        out["meta/skipped_steps"] = float(self.meta_steps_skipped)
        for reason, count in self.skip_reasons.items():
            out[f"meta/skipped/{reason}"] = float(count)
        self._meta_metrics = defaultdict(list)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints, saving, model card

    def meta_state_dict(self) -> dict[str, Any]:
        """What every rank shares: the meta network, its optimizer and the counters."""
        return {
            "meta_model": self.meta_model.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_step_count": self.meta_step_count,
            "meta_steps_skipped": self.meta_steps_skipped,
            "skip_reasons": dict(self.skip_reasons),
            "base_update_scale": self.base_update_scale,
            "world_size": self.args.world_size,
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """What is this rank's own: its position in its meta-data shard and the weights it recorded."""
        return {"meta_stream": self._meta_batches().state_dict(), "weight_history": self.weight_history.state_dict()}

    def load_meta_state_dict(self, state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        self.meta_model.load_state_dict(state["meta_model"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_step_count = int(state["meta_step_count"])
        self.meta_steps_skipped = int(state["meta_steps_skipped"])
        self.skip_reasons = defaultdict(int, state.get("skip_reasons", {}))
        self.base_update_scale = float(state.get("base_update_scale", 1.0))
        if rank_state is None:
            return
        self.weight_history.load_state_dict(rank_state["weight_history"], self.args.device)
        if self._meta_stream is not None:
            self._meta_stream.load_state_dict(rank_state["meta_stream"])
        else:
            self._pending_meta_stream_state = rank_state["meta_stream"]

    def _save_rng_state(self, output_dir: str) -> None:
        """``Trainer`` writes a rank's RNG state last of that rank's files: the meta files follow it, so a rank's
        ``sama_rank_state_<rank>.pt`` (written atomically) proves that the rank's part of the checkpoint is on disk.
        Then the ranks wait for each other, so the main process writes ``trainer_state.json`` (which marks the
        checkpoint complete) and deletes older checkpoints (``save_total_limit``) only once every rank's part is
        written: a rank killed while saving never costs the previous checkpoint."""
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            atomic_save(self.meta_state_dict(), os.path.join(output_dir, META_STATE_NAME))
        atomic_save(self.rank_state_dict(), os.path.join(output_dir, rank_state_name(self.args.process_index)))
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by SAMATrainer")
        state = torch.load(path, map_location="cpu", weights_only=True)
        rank_path = os.path.join(checkpoint, rank_state_name(self.args.process_index))
        rank_state = None
        if state.get("world_size", 1) == self.args.world_size and os.path.isfile(rank_path):
            rank_state = torch.load(rank_path, map_location="cpu", weights_only=True)
        else:
            warnings.warn(
                f"{checkpoint} was written by {state.get('world_size')} process(es), this run has "
                f"{self.args.world_size}: the meta network and its optimizer are restored, the meta data starts from "
                "the beginning and earlier example weights are not kept.",
                UserWarning,
                stacklevel=2,
            )
        self.load_meta_state_dict(state, rank_state)
        self.meta_model.to(self.args.device)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; a run resumed with ``resume_from_checkpoint=True`` takes the newest *complete*
        checkpoint (one whose writing was interrupted is never used; see :mod:`sama_trainer.checkpoint`)."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, self.args.process_index)
        # turn flushing on for this thread unless it already is (torch has no getter: a subnormal product tells)
        flush = self.args.flush_denormal and self.args.device.type == "cpu" and not _flushes_denormals()
        flush = flush and torch.set_flush_denormal(True)
        try:
            return super().train(resume, *args, **kwargs)
        finally:
            if flush:
                torch.set_flush_denormal(False)  # back to how this thread was before training

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the base model as ``Trainer`` does, plus the meta network under ``sama_meta_model/``."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_meta_model(self.meta_model, os.path.join(output_dir, META_MODEL_DIR))

    def create_model_card(self, summary: str | None = None, sections: list[str] | None = None, **card: Any) -> None:
        """Write ``README.md``: a Hub model card with metadata (``base_model``, ``datasets``, ``tags``, a
        ``model-index`` of ``metrics``), the training hyperparameters, a SAMA section with the settings used and
        ``sections``.

        ``base_model`` defaults to the name in the model's config (None for a local folder or a model built from a
        config: pass it then). Other ``Trainer.create_model_card`` keywords (e.g. ``finetuned_from``) are accepted.
        """
        save_trainer_card(
            self,
            summary=summary or "A text classifier trained on noisy labels with SAMA meta learning.",
            sections=[sama_card_section(self), *(sections or [])],
            cite_sama=True,
            **card,
        )
