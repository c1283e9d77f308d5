"""``SAMATrainer``: a ``transformers.Trainer`` that learns example weights and/or label corrections with SAMA.

The trainer only orchestrates; the math lives in :mod:`sama_trainer.meta_gradient` and
:mod:`sama_trainer.adaptation`. Per base step, ``compute_loss`` returns the meta-weighted (and/or label-corrected)
per-example loss. Right after every ``unroll_steps``-th base optimizer step (a callback on ``on_optimizer_step``, so
the gradients the optimizer used are still in ``.grad`` and its learning rate is the one it used), one meta step runs
on a fresh meta batch and the last base batch, and the meta optimizer (a plain ``torch.optim.Adam`` owned by the
trainer) updates the meta network.
"""

from __future__ import annotations

import inspect
import os
import textwrap
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .adaptation import check_adaptation_supported, unwrap_optimizer
from .losses import per_example_cross_entropy, soft_cross_entropy
from .meta_data import MetaBatchStream
from .meta_gradient import ADAPTIVE_METHODS, SECOND_ORDER_METHODS, meta_gradient
from .meta_nets import BootstrapCorrectionNet, LabelCorrectionNet, MetaWeightNet, normalize_weights_per_class
from .sama_config import SAMAConfig


META_STATE_NAME = "sama_meta_state.pt"
META_MODEL_DIR = "sama_meta_model"
LABEL_KEYS = ("labels", "label", "label_ids")


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
        meta_dataset: the clean (meta) set, tokenised like ``train_dataset`` with a label column.
        meta_model: the meta network; default: built from ``args.meta_objective`` (``MetaWeightNet``,
            ``LabelCorrectionNet`` or an ``nn.ModuleDict`` with keys ``"reweight"`` and ``"correct"``).
        meta_data_collator: collator for meta batches (default: the trainer's ``data_collator``).
        meta_optimizer: an optimizer over ``meta_model``'s parameters (e.g. one parameter group per part of the
            meta net, each with its own learning rate); needs ``meta_model``. Default: ``Adam`` with
            ``args.meta_learning_rate`` and ``args.meta_weight_decay``.
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model`` and only adapter parameters
            form θ.
        **kwargs: every other ``Trainer`` argument (``data_collator``, ``eval_dataset``, ``processing_class``,
            ``compute_metrics``, ``callbacks``, ``optimizers``, ...).

    Subclasses change the base objective by overriding :meth:`compute_per_example_loss` (e.g. masked-LM),
    :meth:`compute_meta_loss` and :meth:`extra_base_loss`.
    """

    _tag_names = ["sama", "meta-learning", "data-reweighting"]
    _name = "SAMA"
    _paper = {
        "title": "Making Scalable Meta Learning Practical",
        "id": "2310.05674",
        "citation": textwrap.dedent(
            """\
            @inproceedings{choe2023sama,
                title     = {{Making Scalable Meta Learning Practical}},
                author    = {Sang Keun Choe and Sanket Vaibhav Mehta and Hwijeen Ahn and Willie Neiswanger and
                             Pengtao Xie and Emma Strubell and Eric Xing},
                booktitle = {Advances in Neural Information Processing Systems},
                year      = 2023
            }"""
        ),
    }
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
        model = self._wrap_peft(model, peft_config)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        # Our loss is a plain per-micro-batch mean: keep the Trainer from multiplying it by GA x world size.
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

        num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
        self.meta_model = (meta_model or self._default_meta_model(args, num_labels)).to(args.device)
        self._check_meta_model(self.meta_model, args.meta_objective)
        if meta_optimizer is None:
            meta_optimizer = torch.optim.Adam(
                [p for p in self.meta_model.parameters() if p.requires_grad],
                lr=args.meta_learning_rate,
                weight_decay=args.meta_weight_decay,
            )
        else:
            self._check_meta_optimizer(meta_optimizer, self.meta_model)
        self.meta_optimizer = meta_optimizer
        self.meta_dataset = meta_dataset
        self.meta_data_collator = meta_data_collator
        self._meta_stream: MetaBatchStream | None = None
        self._pending_meta_stream_state: dict | None = None
        # the micro-batches of the current optimizer step (references only): the finite difference uses all of them
        self._step_micro_batches: list[tuple[dict, Any]] = []
        self.last_meta_gradients: list[torch.Tensor] | None = None
        self._meta_metrics: dict[str, list] = defaultdict(list)
        self.meta_step_count = 0
        self.meta_steps_skipped = 0
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

    @staticmethod
    def _check_meta_dataset(meta_dataset: Any, args: SAMAConfig) -> None:
        if meta_dataset is None:
            raise ValueError(
                "SAMATrainer needs meta_dataset=...: a small clean (correctly labelled) dataset, tokenised like the "
                "training set, that the meta network is trained to do well on."
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

    @staticmethod
    def _default_meta_model(args: SAMAConfig, num_labels: int | None) -> nn.Module:
        def reweight() -> nn.Module:
            return MetaWeightNet(hidden_size=args.meta_hidden_size, normalize=args.meta_weight_normalize)

        def correct() -> nn.Module:
            if not num_labels or num_labels < 2:
                raise ValueError("label correction needs model.config.num_labels >= 2 or an explicit meta_model")
            return default_correction_net(args, num_labels)

        if args.meta_objective == "reweight":
            return reweight()
        if args.meta_objective == "correct":
            return correct()
        return nn.ModuleDict({"reweight": reweight(), "correct": correct()})

    @staticmethod
    def _check_meta_model(meta_model: nn.Module, objective: str) -> None:
        if objective == "reweight+correct" and not (
            isinstance(meta_model, nn.ModuleDict) and {"reweight", "correct"} <= set(meta_model.keys())
        ):
            raise ValueError(
                "meta_objective='reweight+correct' needs meta_model=nn.ModuleDict(reweight=..., correct=...)"
            )
        if not any(p.requires_grad for p in meta_model.parameters()):
            raise ValueError("the meta model has no trainable parameters")

    def _check_optimizer(self, optimizer: Any) -> None:
        if self.args.meta_gradient in ADAPTIVE_METHODS:
            check_adaptation_supported(optimizer)
        elif self.args.meta_gradient == "sama-na" and self.args.sama_base_update:
            # for SGD du/dg is constant and SAMA-NA's base step is SAMA's; for adaptive optimizers it is not
            base = unwrap_optimizer(optimizer)
            if not isinstance(base, torch.optim.SGD):
                warnings.warn(
                    f"meta_gradient='sama-na' with sama_base_update=True under {type(base).__name__}: "
                    "after each meta step θ moves by a step of norm sama_alpha along the raw meta-gradient, which "
                    "puts far more on a few coordinates than the optimizer's own steps do (in this project's WRENCH "
                    "runs it broke training on every dataset). Set sama_base_update=False (or a much smaller "
                    "sama_alpha) unless you are reproducing the paper's SAMA-NA ablation.",
                    UserWarning,
                    stacklevel=2,
                )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self._check_optimizer(optimizer)
        return optimizer

    # ------------------------------------------------------------------------------------------------------------
    # objectives (override these in subclasses)

    def _meta_part(self, name: str) -> nn.Module:
        return self.meta_model[name] if isinstance(self.meta_model, nn.ModuleDict) else self.meta_model

    def compute_per_example_loss(self, model: nn.Module, inputs: dict, labels: Any) -> tuple[torch.Tensor, Any]:
        """Per-example base loss [B] and the logits [B, C] (or None when the objective has no class logits)."""
        logits = model(**inputs).logits
        return per_example_cross_entropy(logits, labels), logits

    def extra_base_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor | None:
        """A λ-independent term added to the base loss (e.g. a second task); not evaluated in perturbed passes."""
        return None

    def compute_meta_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The meta (clean-set) loss on one meta batch: the unweighted mean per-example loss."""
        inputs = dict(inputs)
        labels = self._pop_labels(inputs)
        losses, _ = self.compute_per_example_loss(model, inputs, labels)
        return losses.mean()

    def meta_objective(
        self, losses: torch.Tensor, logits: torch.Tensor | None, labels: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Combine detached base-model values with the meta network: returns (base loss, weights or None)."""
        objective = self.args.meta_objective
        if "correct" in objective:
            if logits is None or labels is None:
                raise ValueError("label correction needs class logits and labels from compute_per_example_loss")
            corrected = self._meta_part("correct")(logits.detach(), labels)
            losses = soft_cross_entropy(logits, corrected)
        weights = None
        if "reweight" in objective:
            weights = self._example_weights(losses.detach(), None if logits is None else logits.detach(), labels)
            return (weights * losses).mean(), weights
        return losses.mean(), weights

    def _example_weights(self, losses: torch.Tensor, logits: torch.Tensor | None, labels: Any) -> torch.Tensor:
        weights = self._meta_part("reweight")(losses, logits)
        if self.args.meta_weight_normalize_by_class:
            if not isinstance(labels, torch.Tensor):
                raise ValueError("meta_weight_normalize_by_class needs class labels (a tensor) in the batch")
            weights = normalize_weights_per_class(weights, labels, None if logits is None else logits.shape[-1])
        return weights

    @staticmethod
    def _pop_labels(inputs: dict) -> Any:
        for key in LABEL_KEYS:
            if key in inputs:
                return inputs.pop(key)
        raise ValueError(f"batch has no labels (keys: {sorted(inputs)})")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain (unweighted) loss
            inputs = dict(inputs)
            labels = self._pop_labels(inputs)
            outputs = model(**inputs)
            loss = per_example_cross_entropy(outputs.logits, labels).mean()
            return (loss, outputs) if return_outputs else loss
        inputs = dict(inputs)
        labels = self._pop_labels(inputs)
        self._step_micro_batches.append((inputs, labels))
        losses, logits = self.compute_per_example_loss(model, inputs, labels)
        loss, weights = self.meta_objective(losses, logits, labels)
        extra = self.extra_base_loss(model, inputs)
        if extra is not None:
            loss = loss + extra
        if weights is not None:
            w = weights.detach().float()
            self._meta_metrics["_weights"].append(torch.stack([w.mean(), w.std(unbiased=False), w.min(), w.max()]))
        return (loss, {"logits": logits}) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------------------
    # the meta step

    def _meta_batches(self) -> MetaBatchStream:
        if self._meta_stream is None:
            dataset = self.meta_dataset
            if self.args.remove_unused_columns and hasattr(dataset, "remove_columns"):
                dataset = self._remove_unused_columns(dataset, description="meta")
            self._meta_stream = MetaBatchStream(
                dataset,
                self.args.meta_batch_size or self.args.per_device_train_batch_size,
                self.meta_data_collator or self.data_collator,
                seed=self.args.seed,
                rank=self.args.process_index,
                world_size=self.args.world_size,
            )
            if self._pending_meta_stream_state is not None:
                self._meta_stream.load_state_dict(self._pending_meta_stream_state)
                self._pending_meta_stream_state = None
        return self._meta_stream

    def _maybe_meta_step(self) -> None:
        step = self.state.global_step + 1  # the optimizer step that just ran
        micro_batches, self._step_micro_batches = self._step_micro_batches, []
        if step <= self.args.meta_warmup_steps or step % self.args.unroll_steps != 0:
            return
        if self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the base step did not happen
            self.meta_steps_skipped += 1
            self._meta_metrics["meta_skipped"].append(1.0)
            return
        self.meta_step(micro_batches)

    def _loss_scale_option(self) -> dict[str, float]:
        """fp16 with a grad scaler: scale the meta loss's backward as the base step's is scaled."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return {}
        return {"loss_scale": float(scaler.get_scale())}

    def _base_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average a list of tensors across ranks in place with one collective."""
        if self.args.world_size <= 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.args.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def meta_step(self, base_batches: list[tuple[dict, Any]]) -> None:
        """One meta step on a fresh meta batch and the base step's micro-batches; updates the meta network.

        The base loss of the perturbed passes is the mean over ``base_batches`` (all micro-batches of the optimizer
        step that just ran), so gradient accumulation does not change the meta-gradient.
        """
        if not base_batches:
            return
        args = self.args
        model = self.model  # unwrapped: no DDP hooks fire, autocast (if any) is patched onto its forward
        base_params = self._base_params()
        meta_params = [p for p in self.meta_model.parameters() if p.requires_grad]
        last_grads = [p.grad for p in base_params]
        meta_inputs = self._prepare_inputs(self._meta_batches().next_batch())

        # first-order methods only need base-model values: no graph through the base model in perturbed passes
        base_grad = torch.enable_grad if args.meta_gradient in SECOND_ORDER_METHODS else torch.no_grad

        def base_loss() -> torch.Tensor:
            total = 0.0
            for inputs, labels in base_batches:
                with base_grad():
                    losses, logits = self.compute_per_example_loss(model, dict(inputs), labels)
                total = total + self.meta_objective(losses, logits, labels)[0]
            return total / len(base_batches)

        def meta_loss() -> torch.Tensor:
            return self.compute_meta_loss(model, meta_inputs)

        # The step's gradients are consumed: the method forms u in their buffers (no θ-sized v) or, where it cannot,
        # keeps the saved θ there (the core checks that they fit).
        was_training = model.training
        model.train()
        try:
            options = dict(
                restore=not args.sama_base_update,
                workspace=last_grads,
                consume_grads=True,
                base_step_hook=self._all_reduce_mean_ if args.world_size > 1 else None,
                bias_correction=args.sama_bias_correction,
                **self._loss_scale_option(),
            )
            options.update(args.meta_gradient_kwargs or {})  # the user's options win (e.g. consume_grads=False)
            grads = meta_gradient(
                args.meta_gradient,
                base_params,
                meta_params,
                base_loss,
                meta_loss,
                optimizer=self.optimizer if args.meta_gradient in ADAPTIVE_METHODS else None,
                last_grads=last_grads,
                alpha=args.sama_alpha,
                **options,
            )
        finally:
            model.train(was_training)
        self.meta_step_count += 1
        for key, value in grads.stats.items():
            if not key.startswith("skip_reason"):
                self._meta_metrics[key].append(value)
        if grads.skipped:
            self.meta_steps_skipped += 1
            return
        self._all_reduce_mean_(grads)
        self.last_meta_gradients = [g.detach().clone() for g in grads]
        for p, g in zip(meta_params, grads):
            p.grad = g.to(p.dtype)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------------------
    # analysis helpers

    @torch.no_grad()
    def compute_example_weights(self, dataset: Any, batch_size: int | None = None) -> dict[str, list]:
        """Per-example base loss, meta weight and corrected label (argmax/probabilities) on ``dataset`` (eval mode)."""
        from torch.utils.data import DataLoader

        if self.args.remove_unused_columns and hasattr(dataset, "remove_columns"):
            dataset = self._remove_unused_columns(dataset, description="weights")
        loader = DataLoader(
            dataset,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        model, out = self.model, defaultdict(list)
        was_training, meta_was_training = model.training, self.meta_model.training
        model.eval()
        self.meta_model.eval()
        try:
            for batch in loader:
                inputs = self._prepare_inputs(batch)
                labels = self._pop_labels(inputs)
                losses, logits = self.compute_per_example_loss(model, inputs, labels)
                if "correct" in self.args.meta_objective:
                    corrected = self._meta_part("correct")(logits, labels)
                    out["corrected_label"] += corrected.argmax(-1).tolist()
                    out["corrected_probs"] += corrected.float().tolist()
                    losses = soft_cross_entropy(logits, corrected)
                out["loss"] += losses.float().tolist()
                if "reweight" in self.args.meta_objective:
                    out["weight"] += self._example_weights(losses, logits, labels).float().tolist()
        finally:
            model.train(was_training)
            self.meta_model.train(meta_was_training)
        return dict(out)

    # ------------------------------------------------------------------------------------------------------------
    # logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._meta_metrics:
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
            if key in ("skipped", "meta_skipped"):
                continue
            out[f"meta/{key}"] = sum(values) / len(values)
        out["meta/steps"] = float(self.meta_step_count)
        out["meta/skipped_steps"] = float(self.meta_steps_skipped)
        self._meta_metrics = defaultdict(list)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints, saving, model card

    def meta_state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the meta side bit-identically."""
        return {
            "meta_model": self.meta_model.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_step_count": self.meta_step_count,
            "meta_steps_skipped": self.meta_steps_skipped,
            "meta_stream": self._meta_batches().state_dict(),
        }

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        self.meta_model.load_state_dict(state["meta_model"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_step_count = int(state["meta_step_count"])
        self.meta_steps_skipped = int(state["meta_steps_skipped"])
        if self._meta_stream is not None:
            self._meta_stream.load_state_dict(state["meta_stream"])
        else:
            self._pending_meta_stream_state = state["meta_stream"]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.meta_state_dict(), os.path.join(output_dir, META_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, META_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by SAMATrainer")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_meta_state_dict(state)
        self.meta_model.to(self.args.device)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the base model as ``Trainer`` does, plus the meta network under ``sama_meta_model/``."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_meta_model(self.meta_model, os.path.join(output_dir, META_MODEL_DIR))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The ``Trainer`` model card plus a SAMA section (method, key hyperparameters, citation)."""
        tags = kwargs.get("tags") or []
        kwargs["tags"] = list(dict.fromkeys(([tags] if isinstance(tags, str) else list(tags)) + self._tag_names))
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        from .model_card import sama_card_section

        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        # a model built from a config has no name to be "fine-tuned from"
        card = card.replace(
            "This model is a fine-tuned version of [](https://huggingface.co/)", "This model was trained"
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(card.rstrip() + "\n\n" + sama_card_section(self) + "\n")


def default_correction_net(args: SAMAConfig, num_labels: int) -> nn.Module:
    """The label-correction net the config asks for (``correction_type``, ``correction_*`` fields)."""
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
    """Load a meta network saved by :class:`SAMATrainer` (pass ``meta_model`` for user modules without a config)."""
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
    subdirs = {"reweight", "correct"} & set(os.listdir(path))
    if subdirs:
        return nn.ModuleDict({key: load_meta_model(os.path.join(path, key)) for key in sorted(subdirs)})
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    # the built-in net whose constructor takes exactly the saved arguments
    for cls in (MetaWeightNet, LabelCorrectionNet, BootstrapCorrectionNet):
        if set(config) == set(inspect.signature(cls.__init__).parameters) - {"self"}:
            return cls.from_pretrained(path)
    raise ValueError(f"{path}: not a built-in meta net (config keys {sorted(config)}); pass meta_model= to load it")
