"""End-task-aware continued pretraining (TARTAN) with SAMA-learned auxiliary-example weights (SAMA §4.2, Table 3).

One model is trained on the end task plus a masked-LM auxiliary task on task (TAPT) and domain text; with
``--method sama`` the weight of every auxiliary example is learned by SAMA so that the end-task training loss (the
meta objective, paper Table 5) goes down. Methods: ``finetune`` (end task only), ``tartan_mt`` (end task + MLM,
w ≡ 1), ``sama`` (end task + MLM, learned w). The pieces are in :mod:`sama_trainer.tartan`.

Data: a dont-stop-pretraining task folder (``--task_dir``: ``{train,dev,test}.jsonl`` with ``text`` and ``label``),
auxiliary MLM text from ``--aux_files`` in it (one document per line; missing files are skipped).

Outputs in ``--output_dir``: ``results.json`` (method, task, seed, metric, dev/test scores), ``aux_weights.jsonl``
(sama: per auxiliary window, the mean weight it got in training and its final loss and weight), ``README.md`` (model
card) and, with ``--save_final_model`` (default), the classifier (a plain Hugging Face model folder) and MLM head.

Examples::

    # the paper's setting (RoBERTa-base, Table 5 hyperparameters)
    python recipes/tartan_continued_pretraining.py --config recipes/configs/tartan_citation_intent.yaml \\
        --method sama --seed 0

    # the CPU protocol (MiniLM encoder, short runs; see recipes/configs/tartan_cpu.yaml)
    python recipes/tartan_continued_pretraining.py --config recipes/configs/tartan_sciie.yaml \\
        --config recipes/configs/tartan_cpu.yaml --model_name_or_path path/to/all-MiniLM-L6-v2 --method sama

Several ``--config`` files merge in order; flags override them. ``--output_dir`` may hold ``{task}``, ``{method}``
and ``{seed}``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from sama_trainer import SAMAConfig, SAMAParser, end_process_group
from sama_trainer.model_card import CardMetric
from sama_trainer.tartan import (
    TASKS,
    TINY_ROBERTA,
    AuxCorpus,
    PairedDataset,
    TartanCollator,
    TartanMTTrainer,
    TartanObjective,
    TartanTrainer,
    build_multitask_model,
    classification_scores,
    compute_metrics,
    label_vocabulary,
    load_aux_corpus,
    read_task,
    task_datasets,
    task_metric,
)


logger = logging.getLogger("tartan")

METHODS = ("finetune", "tartan_mt", "sama")
DATA_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
TRAINING_FIELDS = ("learning_rate", "per_device_train_batch_size", "max_steps", "num_train_epochs", "warmup_steps",
                   "lr_scheduler_type", "optim", "weight_decay", "meta_learning_rate", "unroll_steps", "sama_alpha",
                   "meta_batch_size")  # fmt: skip


@dataclass
class TartanArguments:
    """Task, data and method options (training options are :class:`SAMAConfig` / ``TrainingArguments`` fields)."""

    task: str = field(default="citation_intent", metadata={"help": f"Task name ({', '.join(TASKS)})."})
    task_dir: str | None = field(
        default=None, metadata={"help": "Task folder (default ../shared/data/tartan/<task>)."}
    )
    method: str = field(default="sama", metadata={"help": " | ".join(METHODS), "choices": METHODS})
    model_name_or_path: str = field(
        default="roberta-base", metadata={"help": f"Encoder checkpoint, or '{TINY_ROBERTA}' (built in-process)."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the checkpoint, for the model card (needed for a local folder)."}
    )
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Keep only the first N encoder layers."})
    max_seq_length: int = field(default=256, metadata={"help": "Max tokens per end-task input and MLM window."})
    truncation: str = field(default="head", metadata={"help": "End-task truncation", "choices": ("head", "head_tail")})
    aux_files: list[str] = field(
        default_factory=lambda: ["train.txt", "domain.1xTAPT.txt"],
        metadata={"help": "Auxiliary MLM text files in task_dir (TAPT, DAPT); missing ones are skipped."},
    )
    max_windows_per_document: int | None = field(default=None, metadata={"help": "MLM windows kept per document."})
    max_aux_examples: int | None = field(default=None, metadata={"help": "Subsample the MLM windows to this many."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the end-task train split."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Subsample dev and test to this many."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the data subsamples (not the training seed)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate of the auxiliary MLM task."})
    aux_weight: float = field(default=1.0, metadata={"help": "tartan_mt: fixed weight of the MLM loss."})
    aux_init_weight: float = field(
        default=1.0, metadata={"help": "sama: initial weight of every auxiliary example, in (0, 2) (1 = tartan_mt)."}
    )
    aux_loss_scale: float | None = field(
        default=None, metadata={"help": "sama: the weighting net reads MLM loss / this (default ln(vocab size))."}
    )
    mlm_head_warmup_steps: int = field(
        default=0, metadata={"help": "tartan_mt/sama: first train only the MLM head (encoder frozen) this many steps."}
    )
    mlm_head_warmup_learning_rate: float = field(default=1e-3, metadata={"help": "Adam lr of the MLM head warm-up."})
    save_final_model: bool = field(default=True, metadata={"help": "Save the trained classifier and MLM head."})
    tiny_vocab_size: int = field(default=600, metadata={"help": f"{TINY_ROBERTA}: BPE vocabulary size."})
    tiny_hidden_size: int = field(default=32, metadata={"help": f"{TINY_ROBERTA}: hidden size."})

    def __post_init__(self):
        self.task_dir = self.task_dir or os.path.normpath(os.path.join(DATA_ROOT, "tartan", self.task))
        if self.max_seq_length < 8:
            raise ValueError("max_seq_length must be >= 8")
        TartanObjective(1, self.aux_init_weight, 1.0 if self.aux_loss_scale is None else self.aux_loss_scale)  # checks
        if self.mlm_head_warmup_steps < 0:
            raise ValueError("mlm_head_warmup_steps must be >= 0")
        if self.base_model is None and os.path.isdir(self.model_name_or_path):
            raise ValueError(
                f"--model_name_or_path {self.model_name_or_path!r} is a local folder: pass --base_model <Hub id it "
                "was copied from> (e.g. sentence-transformers/all-MiniLM-L6-v2) for the model card"
            )
        if self.base_model is None and self.model_name_or_path != TINY_ROBERTA:
            self.base_model = self.model_name_or_path

    @property
    def metric(self) -> str:
        return task_metric(self.task)


def main(args: TartanArguments, training_args: SAMAConfig) -> dict[str, Any]:
    """Train one (task, method, seed) run, evaluate on dev and test, write results.json, weights and a model card."""
    start, cpu_start = time.time(), time.process_time()
    if training_args.flush_denormal:  # before any parallel op: intra-op threads started later inherit it
        torch.set_flush_denormal(True)
    set_seed(training_args.seed)
    splits = read_task(args.task_dir)
    label_names = label_vocabulary(splits)
    model, tokenizer = build_multitask_model(
        args.model_name_or_path, label_names, args.max_seq_length, args.num_hidden_layers,
        tiny_texts=[r["text"] for r in splits["train"]], tiny_vocab_size=args.tiny_vocab_size,
        tiny_hidden_size=args.tiny_hidden_size,
    )  # fmt: skip
    data = task_datasets(
        splits, tokenizer, label_names, args.max_seq_length, args.truncation, args.max_train_examples,
        args.max_eval_examples, args.subset_seed,
    )  # fmt: skip
    collator = TartanCollator(tokenizer, mlm_probability=args.mlm_probability)
    common = dict(model=model, args=training_args, eval_dataset=data["dev"], data_collator=collator)
    common.update(processing_class=tokenizer, compute_metrics=compute_metrics)
    aux, warmup_losses = None, []
    if args.method == "finetune":
        trainer = TartanMTTrainer(train_dataset=data["train"], aux_weight=0.0, **common)
    else:
        aux = load_aux_corpus(
            args.task_dir, args.aux_files, tokenizer, args.max_seq_length, args.max_windows_per_document,
            args.max_aux_examples, seed=args.subset_seed + 1,
        )  # fmt: skip
        if args.mlm_head_warmup_steps:
            model.to(training_args.device)
            warmup_losses = model.warm_up_mlm_head(
                aux.dataset, collator, args.mlm_head_warmup_steps, training_args.per_device_train_batch_size,
                args.mlm_head_warmup_learning_rate, seed=training_args.seed,
            )  # fmt: skip
        train_dataset = PairedDataset(data["train"], aux.dataset)
        if args.method == "tartan_mt":
            trainer = TartanMTTrainer(train_dataset=train_dataset, aux_weight=args.aux_weight, **common)
        else:
            objective = TartanObjective.for_model(model, len(aux.sources), args.aux_init_weight, args.aux_loss_scale)
            trainer = TartanTrainer(
                train_dataset=train_dataset, meta_dataset=data["train"], objective=objective, **common
            )
    n_aux = 0 if aux is None else len(aux.dataset)
    logger.info("%s %s: %d train examples, %d aux windows", args.task, args.method, len(data["train"]), n_aux)
    train_cpu_start = time.process_time()
    train_out = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_cpu_s = time.process_time() - train_cpu_start  # all threads of this process

    results: dict[str, Any] = {
        "task": args.task, "method": args.method, "seed": training_args.seed, "metric": args.metric,
        "model": args.model_name_or_path, "base_model": args.base_model, "labels": label_names,
        "n_train": len(data["train"]), "n_aux": n_aux, "aux_sources": [] if aux is None else aux.sources,
        "global_steps": trainer.state.global_step, "world_size": training_args.world_size,
        "train_loss": train_out.training_loss,
    }  # fmt: skip
    if warmup_losses:
        tail = warmup_losses[-10:]
        results["mlm_head_warmup"] = {
            "steps": len(warmup_losses), "first_loss": warmup_losses[0], "last_loss_mean10": sum(tail) / len(tail)
        }  # fmt: skip
    for split in ("dev", "test"):
        pred = trainer.predict(data[split], metric_key_prefix=split)
        results[split] = classification_scores(pred.predictions, pred.label_ids)
        results[f"n_{split}"] = len(data[split])
    results["dev_score"], results["test_score"] = results["dev"][args.metric], results["test"][args.metric]
    if args.method == "sama":
        results["meta_steps"] = trainer.meta_step_count
        results["aux_loss_scale"] = trainer.meta_model.loss_scale
        logged = ("weight_mean", "weight_min", "weight_max")  # the batch weights of each logging window
        results["weight_trajectory"] = [
            {"step": e["step"], **{k: e[f"meta/{k}"] for k in logged}}
            for e in trainer.state.log_history
            if "meta/weight_mean" in e
        ]
        results["aux_weights"] = write_aux_weights(trainer, aux, training_args.output_dir)
    results["train_runtime_s"] = round(train_out.metrics["train_runtime"], 1)
    results["train_cpu_s"] = round(train_cpu_s, 1)
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    results["args"] = asdict(args)
    results["training_args"] = {k: getattr(training_args, k) for k in TRAINING_FIELDS}
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if args.save_final_model:
        trainer.save_model()
    name = os.path.basename((args.base_model or args.model_name_or_path).rstrip("/"))
    trainer.create_model_card(
        model_name=f"{name}-tartan-{args.method}-{args.task}",
        base_model=args.base_model,
        dataset=args.task,
        tags=[args.task, args.method],
        metrics=[CardMetric(args.metric, results[f"{s}_score"], args.task, s) for s in ("dev", "test")],
    )
    logger.info("%s %s seed %d: dev %.4f test %.4f", args.task, args.method, training_args.seed,
                results["dev_score"], results["test_score"])  # fmt: skip
    return results


def write_aux_weights(trainer: TartanTrainer, aux: AuxCorpus, output_dir: str) -> dict[str, Any]:
    """aux_weights.jsonl (one line per auxiliary window) and a per-source summary of the final weights."""
    rows = trainer.aux_weight_report(aux.dataset)
    by_source: dict[str, list[float]] = {}
    with open(os.path.join(output_dir, "aux_weights.jsonl"), "w", encoding="utf-8") as f:
        for record, row in zip(aux.records, rows):
            f.write(json.dumps({**record, **row}) + "\n")
            by_source.setdefault(record["source"], []).append(row["final_weight"])
    summary: dict[str, Any] = {s: {"n": len(w), "final_weight_mean": sum(w) / len(w)} for s, w in by_source.items()}
    w, losses = np.array([r["final_weight"] for r in rows]), [r["final_loss"] for r in rows]
    summary["all"] = {"final_weight_mean": float(w.mean()), "final_weight_std": float(w.std())}
    summary["all"]["corr_loss_weight"] = float(np.corrcoef(losses, w)[0, 1]) if w.std() > 0 else 0.0
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[TartanArguments, SAMAConfig]:
    parser = SAMAParser((TartanArguments, SAMAConfig))
    parser.set_defaults(output_dir=os.path.join("outputs", "tartan", "{task}", "{method}", "seed{seed}"))
    args, training_args = parser.parse_args_and_config(argv)
    training_args.output_dir = training_args.output_dir.format(
        task=args.task, method=args.method, seed=training_args.seed
    )
    return args, training_args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(*parse_args())
    end_process_group()
