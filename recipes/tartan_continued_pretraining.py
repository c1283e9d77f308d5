"""End-task-aware continued pretraining (TARTAN) with SAMA-learned auxiliary-example weights (SAMA §4.2, Table 3).

One model is trained on the end task plus a masked-LM auxiliary task on task (TAPT) and domain text; with
``--method sama`` the weight of every auxiliary example is learned by SAMA so that the end-task training loss (the
meta objective, paper Table 5) goes down.

Methods: ``finetune`` (end task only), ``tartan_mt`` (end task + MLM, w ≡ 1), ``sama`` (end task + MLM, learned w).

Data: dont-stop-pretraining jsonl files (``text``, ``label``) ``{train,dev,test}.jsonl`` in ``--task_dir``, auxiliary
MLM text from ``--aux_files`` (one document per line; default ``train.txt`` and ``domain.1xTAPT.txt``, missing files
are skipped). Long documents are truncated for the end task (``--truncation head|head_tail``) and cut into
``max_seq_length`` windows for the MLM task.

Outputs in ``--output_dir``: ``results.json`` (method, task, seed, metric, dev/test scores), ``aux_weights.jsonl``
(sama: per auxiliary example, the mean weight it got during training and its final loss/weight), ``README.md`` (model
card) and, with ``--save_final_model`` (default), the classifier (an ordinary HF model folder) and MLM head.

Examples::

    # the paper's setting (RoBERTa-base, Table 5 hyperparameters)
    python recipes/tartan_continued_pretraining.py --config recipes/configs/tartan_citation_intent.yaml \\
        --method sama --seed 0

    # offline CPU protocol (MiniLM encoder, short runs; see recipes/configs/tartan_cpu.yaml)
    python recipes/tartan_continued_pretraining.py --config recipes/configs/tartan_sciie.yaml \\
        --config recipes/configs/tartan_cpu.yaml --model_name_or_path /path/to/all-MiniLM-L6-v2 --method sama

Several ``--config`` files are merged in order; command-line flags override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import yaml
from datasets import Dataset
from sklearn.metrics import accuracy_score, f1_score
from transformers import HfArgumentParser, PreTrainedTokenizerFast, RobertaConfig, set_seed


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sama_trainer import SAMAConfig  # noqa: E402
from sama_trainer.pretrained import load_pretrained_tokenizer  # noqa: E402
from sama_trainer.tartan import (  # noqa: E402
    AuxWeightNet,
    PairedDataset,
    TartanCollator,
    TartanMTTrainer,
    TartanMultitaskModel,
    TartanTrainer,
)


logger = logging.getLogger("tartan")

METHODS = ("finetune", "tartan_mt", "sama")
TASKS = ("chemprot", "citation_intent", "hyperpartisan_news", "sciie")
MICRO_F1_TASKS = ("chemprot",)  # paper (and dont-stop-pretraining): micro-F1 for ChemProt, macro-F1 otherwise
TINY_ROBERTA = "tiny-roberta"
DEFAULT_DATA_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@dataclass
class TartanArguments:
    """Task, data and method options (training options are :class:`SAMAConfig` / ``TrainingArguments`` fields)."""

    task: str = field(default="citation_intent", metadata={"help": f"Task name ({', '.join(TASKS)})."})
    task_dir: str | None = field(
        default=None, metadata={"help": "Folder with {train,dev,test}.jsonl (default ../shared/data/tartan/<task>)."}
    )
    method: str = field(default="sama", metadata={"help": "finetune | tartan_mt | sama", "choices": METHODS})
    model_name_or_path: str = field(
        default="roberta-base", metadata={"help": f"Encoder checkpoint, or '{TINY_ROBERTA}' (built from a config)."}
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Keep only the first N encoder layers of the checkpoint (a cheaper model)."}
    )
    max_seq_length: int = field(default=256, metadata={"help": "Max tokens per end-task input and MLM window."})
    truncation: str = field(
        default="head", metadata={"help": "End-task truncation: head | head_tail", "choices": ("head", "head_tail")}
    )
    aux_files: list[str] = field(
        default_factory=lambda: ["train.txt", "domain.1xTAPT.txt"],
        metadata={"help": "Auxiliary MLM text files in task_dir (TAPT, DAPT); missing ones are skipped."},
    )
    max_windows_per_document: int | None = field(
        default=None, metadata={"help": "Keep at most this many MLM windows per auxiliary document."}
    )
    max_aux_examples: int | None = field(
        default=None, metadata={"help": "Subsample the auxiliary corpus to this many windows (seeded by data_seed)."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the end-task train split."})
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Subsample dev and test (fixed data_seed: the same subset for every run)."}
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed of the data subsamples (not the training seed)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate of the auxiliary MLM task."})
    aux_weight: float = field(default=1.0, metadata={"help": "tartan_mt: fixed weight of the MLM loss."})
    aux_init_weight: float = field(
        default=1.0,
        metadata={"help": "sama: weight of every auxiliary example at the start, in (0, 2) (1 = start at tartan_mt)."},
    )
    aux_loss_scale: float | None = field(
        default=None,
        metadata={
            "help": "sama: the weighting net reads the MLM loss divided by this (default: ln(vocabulary size), the "
            "loss of a uniform guess; 1 = the raw loss)."
        },
    )
    mlm_head_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "tartan_mt/sama: first train only the MLM head (encoder frozen) for this many steps; for "
            "checkpoints without a pretrained MLM head."
        },
    )
    mlm_head_warmup_learning_rate: float = field(default=1e-3, metadata={"help": "Adam lr of the MLM head warm-up."})
    save_final_model: bool = field(default=True, metadata={"help": "Save the trained classifier and MLM head."})
    tiny_vocab_size: int = field(default=600, metadata={"help": f"{TINY_ROBERTA}: BPE vocabulary size."})
    tiny_hidden_size: int = field(default=32, metadata={"help": f"{TINY_ROBERTA}: hidden size."})

    def __post_init__(self):
        if self.task_dir is None:
            self.task_dir = os.path.normpath(os.path.join(DEFAULT_DATA_ROOT, "tartan", self.task))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.max_seq_length < 8:
            raise ValueError("max_seq_length must be >= 8")
        AuxWeightNet.init_bias_for(self.aux_init_weight)  # raises on a weight outside (0, 2)
        if self.aux_loss_scale is not None and not self.aux_loss_scale > 0:
            raise ValueError(
                f"aux_loss_scale must be > 0 (or unset for ln(vocabulary size)), got {self.aux_loss_scale}"
            )
        if self.mlm_head_warmup_steps < 0:
            raise ValueError("mlm_head_warmup_steps must be >= 0")

    @property
    def metric_name(self) -> str:
        return "micro_f1" if self.task in MICRO_F1_TASKS else "macro_f1"


# --------------------------------------------------------------------------------------------------------------------
# data


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_task(task_dir: str) -> dict[str, list[dict[str, Any]]]:
    """The train/dev/test jsonl splits of a dont-stop-pretraining task folder."""
    splits = {s: os.path.join(task_dir, f"{s}.jsonl") for s in ("train", "dev", "test")}
    missing = [p for p in splits.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"task files missing: {missing}")
    return {s: read_jsonl(p) for s, p in splits.items()}


def label_vocabulary(splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Sorted union of the labels of all splits (ChemProt has labels that occur in some splits only)."""
    return sorted({str(ex["label"]) for rows in splits.values() for ex in rows})


def _subsample(n: int, k: int | None, seed: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def _with_specials(tokenizer: Any, ids: list[int]) -> list[int]:
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def encode_for_classification(tokenizer: Any, texts: list[str], max_length: int, truncation: str) -> list[list[int]]:
    """Token ids with [CLS]/[SEP] (<s>/</s>), truncated to ``max_length`` (head, or head+tail as Sun et al. 2019)."""
    body = max_length - 2
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) > body:
            head = body if truncation == "head" else body // 4
            ids = ids[:head] + (ids[len(ids) - (body - head) :] if body > head else [])
        out.append(_with_specials(tokenizer, ids))
    return out


def load_task_datasets(
    args: TartanArguments, tokenizer: Any, label2id: dict[str, int], splits: dict[str, list[dict]]
) -> dict[str, Dataset]:
    out = {}
    for name, rows in splits.items():
        k = args.max_train_examples if name == "train" else args.max_eval_examples
        rows = [rows[i] for i in _subsample(len(rows), k, args.subset_seed)]
        ids = encode_for_classification(tokenizer, [r["text"] for r in rows], args.max_seq_length, args.truncation)
        out[name] = Dataset.from_dict(
            {
                "input_ids": ids,
                "attention_mask": [[1] * len(x) for x in ids],
                "labels": [label2id[str(r["label"])] for r in rows],
            }
        )
    return out


def load_aux_corpus(args: TartanArguments, tokenizer: Any) -> tuple[Dataset, list[dict[str, Any]], list[str]]:
    """MLM windows from the auxiliary files: (dataset with mlm_input_ids/aux_index/aux_source, records, sources).

    Each non-empty line is a document, cut into windows of ``max_seq_length - 2`` tokens (plus special tokens).
    """
    sources = [f for f in args.aux_files if os.path.isfile(os.path.join(args.task_dir, f))]
    for f in args.aux_files:
        if f not in sources:
            logger.warning("auxiliary file %s not found in %s: skipped", f, args.task_dir)
    if not sources:
        raise FileNotFoundError(f"none of the auxiliary files {args.aux_files} exists in {args.task_dir}")
    body = args.max_seq_length - 2
    windows, records = [], []
    for source_id, name in enumerate(sources):
        with open(os.path.join(args.task_dir, name), encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f) if line.strip()]
        encoded = tokenizer([t for _, t in lines], add_special_tokens=False)["input_ids"]
        for (line_no, text), ids in zip(lines, encoded):
            starts = list(range(0, max(len(ids), 1), body))[: args.max_windows_per_document]
            for w, start in enumerate(starts):
                windows.append(_with_specials(tokenizer, ids[start : start + body]))
                records.append({"source": name, "line": line_no, "window": w, "text": text[:120]})
                records[-1]["aux_source"] = source_id
    keep = _subsample(len(windows), args.max_aux_examples, args.subset_seed + 1)
    windows, records = [windows[i] for i in keep], [records[i] for i in keep]
    for i, r in enumerate(records):
        r["aux_index"] = i
    dataset = Dataset.from_dict(
        {
            "mlm_input_ids": windows,
            "aux_index": list(range(len(windows))),
            "aux_source": [r["aux_source"] for r in records],
        }
    )
    return dataset, records, sources


def train_tiny_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
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


def tiny_roberta_config(tokenizer: Any, args: TartanArguments, label_names: list[str]) -> RobertaConfig:
    h = args.tiny_hidden_size
    return RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * h,
        max_position_embeddings=args.max_seq_length + tokenizer.pad_token_id + 2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )


def build_model_and_tokenizer(
    args: TartanArguments, label_names: list[str], splits: dict[str, list[dict]]
) -> tuple[TartanMultitaskModel, Any]:
    if args.model_name_or_path == TINY_ROBERTA:
        tokenizer = train_tiny_tokenizer([r["text"] for r in splits["train"]], args.tiny_vocab_size)
        return TartanMultitaskModel.from_config(tiny_roberta_config(tokenizer, args, label_names)), tokenizer
    tokenizer = load_pretrained_tokenizer(args.model_name_or_path, builtin=(TINY_ROBERTA,))
    if tokenizer.mask_token is None:
        raise ValueError(f"{args.model_name_or_path}: the tokenizer has no mask token (needed for the MLM task)")
    layers = {} if args.num_hidden_layers is None else {"num_hidden_layers": args.num_hidden_layers}
    model = TartanMultitaskModel.from_pretrained(
        args.model_name_or_path,
        mlm_kwargs=layers,
        **layers,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# metrics, outputs


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """micro/macro F1 and accuracy (scikit-learn: ``evaluate.load('f1')`` needs the Hub, which is offline here)."""
    preds = np.asarray(logits).argmax(-1)
    return {
        "micro_f1": float(f1_score(labels, preds, average="micro")),
        "macro_f1": float(f1_score(labels, preds, average="macro")),
        "accuracy": float(accuracy_score(labels, preds)),
    }


def _compute_metrics(eval_pred: Any) -> dict[str, float]:
    return classification_scores(eval_pred.predictions, eval_pred.label_ids)


def tartan_card_section(args: TartanArguments, results: dict[str, Any]) -> str:
    method = {
        "finetune": "fine-tuning on the end task only (baseline)",
        "tartan_mt": f"TARTAN-MT: end task + masked-LM auxiliary task with a fixed weight {args.aux_weight}",
        "sama": "end task + masked-LM auxiliary task, with a SAMA-learned weight for every auxiliary example",
    }[args.method]
    rows = "\n".join(f"| {split} | {results[split][args.metric_name]:.4f} |" for split in ("dev", "test"))
    return f"""## End-task-aware training (TARTAN) on `{args.task}`

Method: {method} (SAMA paper §4.2). One encoder, two heads (sequence classification and masked LM); the
classifier in this folder loads with `AutoModelForSequenceClassification`, the MLM head is in `tartan_mlm_head.pt`.
Auxiliary text: {", ".join(results["aux_sources"]) or "none"} ({results["n_aux"]} MLM windows of at most
{args.max_seq_length} tokens). Meta objective (sama): end-task loss on the training split; the weighting network
(sama) is in `sama_meta_model/` and loads with `sama_trainer.tartan.AuxWeightNet.from_pretrained(path)`.

| split | {args.metric_name} |
|---|---|
{rows}
"""


# --------------------------------------------------------------------------------------------------------------------
# main


def main(args: TartanArguments, training_args: SAMAConfig) -> dict[str, Any]:
    """Train one (task, method, seed) run, evaluate on dev and test, write results.json, weights and a model card."""
    start, cpu_start = time.time(), time.process_time()
    set_seed(training_args.seed)
    splits = read_task(args.task_dir)
    label_names = label_vocabulary(splits)
    label2id = {name: i for i, name in enumerate(label_names)}
    model, tokenizer = build_model_and_tokenizer(args, label_names, splits)
    data = load_task_datasets(args, tokenizer, label2id, splits)
    collator = TartanCollator(tokenizer, mlm_probability=args.mlm_probability)
    common = dict(
        model=model,
        args=training_args,
        eval_dataset=data["dev"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_compute_metrics,
    )
    aux, records, sources, warmup_losses = None, [], [], []
    if args.method != "finetune":
        aux, records, sources = load_aux_corpus(args, tokenizer)
        train_dataset = PairedDataset(data["train"], aux)
        if args.mlm_head_warmup_steps:
            model.to(training_args.device)
        warmup_losses = model.warm_up_mlm_head(
            aux,
            collator,
            args.mlm_head_warmup_steps,
            batch_size=training_args.per_device_train_batch_size,
            learning_rate=args.mlm_head_warmup_learning_rate,
            seed=training_args.seed,
        )
    else:
        train_dataset = data["train"]
    if args.method == "sama":
        trainer = TartanTrainer(
            train_dataset=train_dataset,
            meta_dataset=data["train"],
            num_sources=len(sources),
            aux_init_weight=args.aux_init_weight,
            aux_loss_scale=args.aux_loss_scale,
            **common,
        )
    else:
        trainer = TartanMTTrainer(
            train_dataset=train_dataset, aux_weight=args.aux_weight if aux is not None else 0.0, **common
        )
    logger.info(
        "task %s, method %s: %d train / %d dev / %d test, %d aux windows, labels %s",
        args.task,
        args.method,
        len(data["train"]),
        len(data["dev"]),
        len(data["test"]),
        0 if aux is None else len(aux),
        label_names,
    )
    train_out = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results: dict[str, Any] = {
        "task": args.task,
        "method": args.method,
        "seed": training_args.seed,
        "metric": args.metric_name,
        "model": args.model_name_or_path,
        "labels": label_names,
        "n_train": len(data["train"]),
        "n_aux": 0 if aux is None else len(aux),
        "aux_sources": sources,
        "global_steps": trainer.state.global_step,
        "world_size": training_args.world_size,
        "train_loss": train_out.training_loss,
    }
    if warmup_losses:
        tail = warmup_losses[-min(10, len(warmup_losses)) :]
        results["mlm_head_warmup"] = {
            "steps": len(warmup_losses),
            "first_loss": warmup_losses[0],
            "last_loss_mean10": sum(tail) / len(tail),
        }
    for split in ("dev", "test"):
        pred = trainer.predict(data[split], metric_key_prefix=split)
        results[split] = classification_scores(pred.predictions, pred.label_ids)
        results[f"n_{split}"] = len(data[split])
    results["dev_score"] = results["dev"][args.metric_name]
    results["test_score"] = results["test"][args.metric_name]
    if args.method == "sama":
        results["meta_steps"] = trainer.meta_step_count
        results["aux_loss_scale"] = trainer.meta_model.loss_scale
        logged = ("weight_mean", "weight_min", "weight_max")  # the batch weights of each logging window
        results["weight_trajectory"] = [  # do they saturate?
            {"step": e["step"], **{k: e[f"meta/{k}"] for k in logged}}
            for e in trainer.state.log_history
            if "meta/weight_mean" in e
        ]
        results["aux_weights"] = write_aux_weights(trainer, aux, records, sources, training_args.output_dir)
    results["train_runtime_s"] = round(train_out.metrics["train_runtime"], 1)
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    results["args"] = {k: v for k, v in asdict(args).items()}
    results["training_args"] = {
        k: getattr(training_args, k)
        for k in (
            "learning_rate",
            "per_device_train_batch_size",
            "max_steps",
            "num_train_epochs",
            "warmup_steps",
            "lr_scheduler_type",
            "optim",
            "weight_decay",
            "meta_learning_rate",
            "unroll_steps",
            "sama_alpha",
            "meta_batch_size",
        )
    }
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if args.save_final_model:
        trainer.save_model()
    write_model_card(trainer, args, results)
    logger.info("%s %s seed %d: dev %.4f test %.4f", args.task, args.method, training_args.seed, *_scores(results))
    return results


def _scores(results: dict[str, Any]) -> tuple[float, float]:
    return results["dev_score"], results["test_score"]


def write_aux_weights(
    trainer: TartanTrainer, aux: Dataset, records: list[dict], sources: list[str], output_dir: str
) -> dict[str, Any]:
    """aux_weights.jsonl (one line per auxiliary window) and a per-source summary for results.json."""
    final = trainer.compute_aux_weights(aux)
    during = trainer.training_weight_stats()
    by_index = {i: (loss, w) for i, loss, w in zip(final["aux_index"], final["loss"], final["weight"])}
    os.makedirs(output_dir, exist_ok=True)
    summary: dict[str, Any] = {}
    with open(os.path.join(output_dir, "aux_weights.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            i = r["aux_index"]
            mean_w, drawn = during.get(i, (None, 0))
            loss, w = by_index[i]
            row = {**r, "train_mean_weight": mean_w, "times_drawn": drawn, "final_loss": loss, "final_weight": w}
            f.write(json.dumps(row) + "\n")
            s = summary.setdefault(r["source"], {"n": 0, "final_weight_sum": 0.0})
            s["n"] += 1
            s["final_weight_sum"] += w
    for s in summary.values():
        s["final_weight_mean"] = s.pop("final_weight_sum") / s["n"]
    w = np.array(final["weight"])
    summary["all"] = {"final_weight_mean": float(w.mean()), "final_weight_std": float(w.std())}
    summary["all"]["corr_loss_weight"] = float(np.corrcoef(final["loss"], w)[0, 1]) if w.std() > 0 else 0.0
    return summary


def write_model_card(trainer: Any, args: TartanArguments, results: dict[str, Any]) -> None:
    local = args.model_name_or_path == TINY_ROBERTA or os.path.isdir(args.model_name_or_path)
    trainer.create_model_card(
        model_name=f"{os.path.basename(args.model_name_or_path.rstrip('/'))}-tartan-{args.method}-{args.task}",
        finetuned_from=None if local else args.model_name_or_path,
        tasks="text-classification",
        dataset=args.task,
        license="apache-2.0",
    )
    path = os.path.join(trainer.args.output_dir, "README.md")
    with open(path, encoding="utf-8") as f:
        card = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(card.rstrip() + "\n\n" + tartan_card_section(args, results) + "\n")


def load_config_files(paths: list[str]) -> dict[str, Any]:
    """Merge YAML files (later ones win); the top-level ``env`` dict is exported to the environment."""
    merged: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            merged.update(yaml.safe_load(f) or {})
    for key, value in (merged.pop("env", None) or {}).items():
        os.environ.setdefault(key, str(value))
    return merged


def parse_args(argv: list[str] | None = None) -> tuple[TartanArguments, SAMAConfig]:
    """``--config a.yaml [--config b.yaml]`` give defaults; every other flag is a dataclass field."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser((TartanArguments, SAMAConfig))
    defaults = load_config_files(known.config)
    unknown = set(defaults) - {a.dest for a in parser._actions}
    if unknown:
        raise ValueError(f"unknown keys in {known.config}: {sorted(unknown)}")
    defaults.setdefault("output_dir", os.path.join("outputs", "tartan", "{task}", "{method}", "seed{seed}"))
    parser.set_defaults(**defaults)
    args, training_args = parser.parse_args_into_dataclasses(rest)
    # placeholders {task} {method} {seed} in output_dir
    training_args.output_dir = training_args.output_dir.format(
        task=args.task, method=args.method, seed=training_args.seed
    )
    return args, training_args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(*parse_args())
