"""Data pruning: score bookkeeping, the training set as meta set, baseline scores, selection, and the recipe."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RecordingObjective, pad_batch, sama_args, tiny_bert, token_dataset
from transformers import Trainer, TrainerCallback

from sama_trainer import SAMATrainer
from sama_trainer.data import make_synthetic_weak_supervision, write_wrench_format
from sama_trainer.pruning import (
    MetaWeightSnapshots,
    TrainingDynamics,
    el2n,
    keep_indices,
    meta_importance_scores,
    random_scores,
    read_scores,
    with_example_ids,
    write_scores,
)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_scores_are_the_mean_weight_over_the_last_epochs(tmp_path, accumulation):
    n, batch, epochs, last = 40, 8, 3, 2
    train = with_example_ids(token_dataset(n, noise=0.3, seed=1))
    objective = RecordingObjective()
    args = sama_args(
        tmp_path, max_steps=-1, num_train_epochs=epochs, per_device_train_batch_size=batch // accumulation,
        gradient_accumulation_steps=accumulation, meta_use_uncertainty=True,
    )  # fmt: skip
    trainer = SAMATrainer(tiny_bert(), args, train, meta_dataset=train, objective=objective)
    trainer.train()
    assert trainer.meta_step_count > 0

    # by hand: micro-batch k belongs to epoch k // (micro-batches per epoch); mean over the last `last` epochs
    per_epoch = math.ceil(n / (batch // accumulation))
    assert len(objective.calls) == epochs * per_epoch
    sums, counts = defaultdict(float), defaultdict(int)
    for k, (ids, weights) in enumerate(objective.calls):
        if k // per_epoch >= epochs - last:
            for i, w in zip(ids, weights):
                sums[i] += w
                counts[i] += 1
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {last}  # drawn once per epoch
    expected = np.array([sums[i] / counts[i] for i in range(n)])
    np.testing.assert_allclose(meta_importance_scores(trainer, last_epochs=last), expected, rtol=1e-12)
    everything = np.array(
        [np.mean([w for ids, ws in objective.calls for i, w in zip(ids, ws) if i == j]) for j in range(n)]
    )
    np.testing.assert_allclose(trainer.example_weight_means().numpy(), everything, rtol=1e-12)
    assert not np.allclose(expected, everything)  # the window matters: the weights changed between epochs


def test_scores_name_the_fix_when_an_example_was_never_drawn(tmp_path):
    train = with_example_ids(token_dataset(40, seed=1))
    trainer = SAMATrainer(tiny_bert(), sama_args(tmp_path, max_steps=3), train, meta_dataset=train)
    trainer.train()  # 3 steps of 8: 16 examples never drawn
    with pytest.raises(ValueError, match="never drawn.*train whole epochs"):
        meta_importance_scores(trainer, last_epochs=1)
    no_ids = SAMATrainer(tiny_bert(), sama_args(tmp_path, max_steps=2), token_dataset(16), meta_dataset=train)
    no_ids.train()
    with pytest.raises(ValueError, match="with_example_ids"):
        meta_importance_scores(no_ids)


def test_ids_outside_the_training_set_name_the_fix(tmp_path):
    pool = with_example_ids(token_dataset(16, seed=1))
    kept = pool.select([3, 9, 12, 15])  # ids of the pool, not of the kept subset
    with pytest.raises(ValueError, match=r"indices in \[3, 15\], outside \[0, 4\).*row index"):
        SAMATrainer(tiny_bert(), sama_args(tmp_path), kept, meta_dataset=kept)
    trainer = SAMATrainer(tiny_bert(), sama_args(tmp_path, max_steps=1), with_example_ids(kept), meta_dataset=kept)
    trainer.train()
    assert trainer.weight_history.totals()[1].tolist() == [1.0, 1.0, 1.0, 1.0]


def _trained_meta_net(tmp_path, train, meta):
    trainer = SAMATrainer(
        tiny_bert(), sama_args(tmp_path, max_steps=8, meta_use_uncertainty=True), train, meta_dataset=meta
    )
    trainer.train()
    return trainer


def test_training_set_as_meta_set(tmp_path):
    """``meta_dataset=train_dataset`` (same object, ``example_id`` in both) meta-learns exactly as a copy of the
    training set without the id column: the ids reach neither the model nor the meta loss."""
    train = with_example_ids(token_dataset(32, noise=0.3, seed=1).remove_columns(["clean_labels"]))
    same = _trained_meta_net(tmp_path / "same", train, train)
    copy = _trained_meta_net(tmp_path / "copy", train, train.remove_columns(["example_id"]))
    assert same.meta_step_count == copy.meta_step_count == 4 and same.meta_steps_skipped == 0
    for a, b in zip(same.meta_model.parameters(), copy.meta_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(same.model.parameters(), copy.model.parameters()):
        assert torch.equal(a, b)
    initial = tiny_bert().state_dict()  # the meta steps moved θ and λ: the equality is not vacuous
    assert not all(torch.equal(initial[k], v) for k, v in same.model.state_dict().items())
    assert same.weight_history.totals()[1].sum() == 8 * 8  # every base example's weight was recorded
    meta_batch = same._meta_batches().next_batch()
    assert set(meta_batch["example_id"].tolist()) <= set(range(32))  # meta batches are training examples


# ---------------------------------------------------------------------------------------------------------------
# baselines and selection


def test_el2n_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    labels = np.array([0, 2, 1])
    expected = [math.sqrt(0.3**2 + 0.2**2 + 0.1**2), math.sqrt(0.1**2 + 0.8**2 + 0.9**2), math.sqrt(2 / 9 + 4 / 9)]
    np.testing.assert_allclose(el2n(probs, labels), expected, rtol=1e-12)


def test_random_scores_are_seeded():
    np.testing.assert_array_equal(random_scores(5, seed=3), np.random.default_rng(3).random(5))
    assert not np.array_equal(random_scores(5, seed=3), random_scores(5, seed=4))


def test_keep_indices_by_hand():
    scores = [0.3, 0.9, 0.1, 0.9, 0.5]
    assert keep_indices(scores, 0.4).tolist() == [1, 3]  # the two highest
    assert keep_indices(scores, 0.6).tolist() == [1, 3, 4]
    assert keep_indices(scores, 0.4, keep="lowest").tolist() == [0, 2]
    assert keep_indices(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert keep_indices([1.0, 1.0, 1.0, 1.0], 0.5).tolist() == [0, 1]  # ties: the lower index
    assert keep_indices(torch.tensor(scores), 0.4).tolist() == [1, 3]
    # per class: quotas 0.6·3 = 1.8 and 0.6·2 = 1.2 -> 1 + 1, the largest remainder (class 0) gets the third
    assert keep_indices(scores, 0.6, labels=[0, 0, 0, 1, 1]).tolist() == [0, 1, 3]
    # class 0 keeps two rows even where class 1 holds the three highest scores
    assert keep_indices([0.1, 0.2, 0.3, 0.9, 0.8], 0.6, labels=[0, 0, 0, 1, 1]).tolist() == [1, 2, 3]
    assert keep_indices([0.1, 0.2, 0.3, 0.9, 0.8], 0.6).tolist() == [2, 3, 4]
    assert keep_indices([0.1, 0.2, 0.3, 0.9, 0.8], 0.4, labels=[0, 0, 0, 1, 1]).tolist() == [2, 3]
    with pytest.raises(ValueError, match="NaN"):
        keep_indices([0.1, float("nan")], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        keep_indices(scores, 0.0)
    with pytest.raises(ValueError, match="keep must be"):
        keep_indices(scores, 0.5, keep="top")


def test_coverage_selection_by_hand():
    scores = np.arange(10.0)  # 9 (the top 10%) goes; bins of width 8/3 over 0..8: {0, 1, 2}, {3, 4, 5}, {6, 7, 8}
    for seed in range(5):
        kept = keep_indices(scores, 0.5, keep="coverage", strata=3, seed=seed)
        # the budget of 5 from the (equally full) bins in order: 5 // 3 = 1, then 4 // 2 = 2, then 2
        assert [sum(k in b for k in kept) for b in ({0, 1, 2}, {3, 4, 5}, {6, 7, 8})] == [1, 2, 2]
        assert 9 not in kept
    # a sparse bin is kept whole; the dense one gives the rest
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 10.0, 100.0])  # 100 goes, bins over 0..10: [0, 5), [5, 10]
    kept = keep_indices(scores, 0.5, keep="coverage", strata=2, prune_top=0.125, seed=0)
    assert 6 in kept and 7 not in kept and len(kept) == 4
    # seeded; the class quotas hold; prune_top 0 and one bin = a uniform draw of the budget
    a, b = (keep_indices(np.arange(40.0), 0.3, keep="coverage", seed=1, labels=[0, 1] * 20) for _ in range(2))
    assert a.tolist() == b.tolist() and sum(i % 2 == 0 for i in a) == 6 and len(a) == 12
    assert len(keep_indices(np.arange(20.0), 0.95, keep="coverage", prune_top=0.0, strata=1)) == 19
    with pytest.raises(ValueError, match="prune_top"):
        keep_indices(scores, 0.5, keep="coverage", prune_top=1.0)


class ManualScores(TrainerCallback):
    """EL2N and cross-entropy of every example by a forward pass of that example alone (no padding) at the given
    steps (the oracle)."""

    def __init__(self, dataset, at_steps):
        self.dataset, self.at_steps, self.el2n, self.loss = dataset, at_steps, [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at_steps:
            model.eval()
            with torch.no_grad():
                probs = torch.cat(
                    [
                        model(input_ids=torch.tensor([ids])).logits.double().softmax(-1)
                        for ids in self.dataset["input_ids"]
                    ]
                )
            model.train()
            labels = torch.tensor(self.dataset["labels"])
            onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
            self.el2n.append((probs - onehot).norm(dim=1).numpy())
            self.loss.append(-probs[torch.arange(len(labels)), labels].log().numpy())


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_training_dynamics_against_a_manual_forward(tmp_path, sampling):
    train = with_example_ids(token_dataset(24, seed=1).remove_columns(["clean_labels", "attention_mask"]))
    train = train.map(lambda e, i: {"input_ids": e["input_ids"][: 2 + (i * 5) % 7]}, with_indices=True)
    args = sama_args(tmp_path, max_steps=6, per_device_eval_batch_size=5, train_sampling_strategy=sampling)
    trainer = Trainer(tiny_bert(dropout=0.1), args, train_dataset=train, data_collator=pad_batch)
    manual = ManualScores(train, at_steps=[3, 6])
    trainer.add_callback(manual)
    dynamics = TrainingDynamics(train, at_steps=[3, 6]).attach(trainer)
    trainer.train()
    assert dynamics.steps == [3, 6]
    assert not np.allclose(manual.el2n[0], manual.el2n[1])  # the model changed between the checkpoints
    np.testing.assert_allclose(dynamics.el2n_scores(), np.mean(manual.el2n, axis=0), rtol=1e-4)
    np.testing.assert_allclose(dynamics.loss_scores(), np.mean(manual.loss, axis=0), rtol=1e-4)
    if sampling == "group_by_length":  # the case the scores must not follow: Trainer.predict's rows are reordered
        assert trainer.predict(train).label_ids.tolist() != train["labels"]


class ManualMetaWeights(TrainerCallback):
    """The meta net's weight of every example by hand at the given steps: eval-mode logits, cross-entropy and
    entropy, then sigmoid(MLP([loss, entropy])) (the oracle for MetaWeightSnapshots)."""

    def __init__(self, dataset, at_steps, meta_model):
        self.dataset, self.at_steps, self.meta_model, self.weights = dataset, at_steps, meta_model, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at_steps:
            model.eval()
            with torch.no_grad():
                ids = torch.tensor(self.dataset["input_ids"])
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
                labels = torch.tensor(self.dataset["labels"])
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                p = logits.softmax(-1)
                entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
                z = self.meta_model.net(torch.stack([loss, entropy], dim=-1)).squeeze(-1)
            model.train()
            self.weights.append(torch.sigmoid(z).double().numpy())


def test_meta_weight_snapshots_against_a_manual_forward(tmp_path):
    train = with_example_ids(token_dataset(24, noise=0.3, seed=1).remove_columns(["clean_labels"]))
    args = sama_args(tmp_path, max_steps=6, per_device_eval_batch_size=5, meta_use_uncertainty=True)
    trainer = SAMATrainer(tiny_bert(dropout=0.1), args, train, meta_dataset=train)
    manual = ManualMetaWeights(train, [3, 6], trainer.meta_model)
    trainer.add_callback(manual)
    snapshots = MetaWeightSnapshots(train, at_steps=[3, 6]).attach(trainer)
    trainer.train()
    assert snapshots.steps == [3, 6] and trainer.meta_step_count == 3
    assert not np.allclose(manual.weights[0], manual.weights[1])  # θ and λ changed between the snapshots
    np.testing.assert_allclose(snapshots.scores(), np.mean(manual.weights, axis=0), rtol=1e-5)
    assert snapshots.loss_scores().shape == (24,)
    with pytest.raises(TypeError, match="SAMATrainer"):
        MetaWeightSnapshots(train).attach(Trainer(tiny_bert(), args, train_dataset=train))
    with pytest.raises(ValueError, match="nothing recorded"):
        MetaWeightSnapshots(train).scores()


class StopAt(TrainerCallback):
    """Raises after the given step (a run killed mid-way)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_meta_weight_snapshots_resume_with_the_records_of_the_checkpoint(tmp_path):
    train = with_example_ids(token_dataset(24, noise=0.3, seed=1).remove_columns(["clean_labels"]))

    def run(out, callbacks=(), resume=None):
        args = sama_args(out, max_steps=6, save_strategy="steps", save_steps=3, meta_use_uncertainty=True)
        trainer = SAMATrainer(tiny_bert(dropout=0.0), args, train, meta_dataset=train)
        snapshots = MetaWeightSnapshots(train, at_steps=[2, 5]).attach(trainer)
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return snapshots

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", [StopAt(4)])
    assert (tmp_path / "killed" / "checkpoint-3" / "MetaWeightSnapshots.pt").is_file()
    resumed = run(tmp_path / "killed", resume=True)
    assert whole.steps == resumed.steps == [2, 5]
    np.testing.assert_allclose(resumed.scores(), whole.scores(), rtol=1e-5)
    np.testing.assert_allclose(resumed.loss_scores(), whole.loss_scores(), rtol=1e-5)
    # without the saved records the resumed run has only the later point
    (tmp_path / "killed" / "checkpoint-3" / "MetaWeightSnapshots.pt").unlink()
    for later in (tmp_path / "killed").glob("checkpoint-6"):
        shutil.rmtree(later)
    assert run(tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-3")).steps == [5]


def test_score_file_round_trip(tmp_path):
    scores = np.array([0.2, 0.7, 0.1])
    write_scores(tmp_path / "s.jsonl", scores, {"text": ["a", "b", "c"], "label": np.array([0, 1, 0])})
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["example_id"] for r in rows] == [1, 0, 2] and [r["rank"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"rank": 0, "example_id": 1, "score": 0.7, "text": "b", "label": 1}
    np.testing.assert_array_equal(read_scores(tmp_path / "s.jsonl"), scores)
    with pytest.raises(ValueError, match="column 'text'"):
        write_scores(tmp_path / "t.jsonl", scores, {"text": ["a"]})


# ---------------------------------------------------------------------------------------------------------------
# the recipe, end to end on a tiny model


def _run_recipe(data_dir: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(ROOT / "recipes" / "data_pruning.py"), "--dataset_dir", str(data_dir),
        "--dataset_name", "synthetic", "--model_name_or_path", "tiny-bert", "--max_seq_length", "16",
        "--methods", "sama,el2n,random,sama_easy,el2n_coverage", "--fractions", "1.0,0.5", "--seeds", "0,1",
        "--budgets", "epochs,steps",
        "--score_epochs", "2", "--score_last_epochs", "1", "--num_train_epochs", "1", "--el2n_checkpoints", "2",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--unroll_steps", "2",
        "--meta_use_uncertainty", "true", "--card_fraction", "0.5", "--card_dataset", "synthetic/topics",
        "--output_root", str(out), "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_recipe_end_to_end(tmp_path):
    data = make_synthetic_weak_supervision(num_train=48, num_valid=8, num_test=24, num_classes=3, seed=0)
    write_wrench_format(data, tmp_path / "data")
    out = tmp_path / "out"
    proc = _run_recipe(tmp_path / "data", out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/**/results.json"))]
    assert len(results) == 2 + 5 * 2 * 2  # full pool per seed; 5 methods x 2 budgets x 2 seeds at keep 0.5
    by = {(r["method"], r["budget"], r["seed"]): r for r in results}
    for seed in (0, 1):
        full = by[("full", "both", seed)]
        assert full["num_train"] == 48 and full["num_test"] == 24
        for method in ("sama", "el2n", "random"):
            assert by[(method, "epochs", seed)]["num_train"] == 24
            assert by[(method, "epochs", seed)]["optimizer_steps"] == 3  # one epoch of 24 at batch 8
            assert by[(method, "steps", seed)]["optimizer_steps"] == full["optimizer_steps"] == 6
    # the kept examples are the top half of each class by score
    rows = [json.loads(line) for line in (out / "scores/sama/seed0/scores.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {r["text"] for r in rows} == set(data["train"]["text"]) and len(rows) == 48
    scores = read_scores(out / "scores/sama/seed0/scores.jsonl")  # keep_indices itself is tested by hand above
    labels = np.array([r["label"] for r in sorted(rows, key=lambda r: r["example_id"])])
    top, bottom = keep_indices(scores, 0.5, labels=labels), keep_indices(-scores, 0.5, labels=labels)
    assert by[("sama", "epochs", 0)]["kept_example_ids"] == top.tolist()
    assert by[("sama_easy", "epochs", 0)]["kept_example_ids"] == bottom.tolist()  # the other half of each class
    el2n_scores = read_scores(out / "scores/el2n/seed1/scores.jsonl")
    coverage = keep_indices(el2n_scores, 0.5, keep="coverage", labels=labels, prune_top=0.1, strata=50, seed=1)
    assert by[("el2n_coverage", "steps", 1)]["kept_example_ids"] == coverage.tolist()
    for method in ("sama", "el2n", "loss"):
        timing = json.loads((out / f"scores/{method}/seed1/scoring.json").read_text())
        assert timing["train_wall_s"] > 0 and timing["train_cpu_s"] > 0
    assert not list(out.glob("scores/sama/seed*/checkpoint-*"))  # scoring checkpoints are removed once scored
    assert [r["score"] for r in rows] == [r["snapshot_weight"] for r in rows]  # the default score source
    timing = json.loads((out / "scores/sama/seed0/scoring.json").read_text())
    assert timing["snapshot_steps"] == [9, 12]  # half-way through and at the end of the last of 2 epochs of 6 steps
    assert {"draw_weight", "final_loss", "final_weight", "label"} <= set(rows[0]) and (
        out / "scores/sama/seed0/sama_meta_model"
    ).is_dir()

    table = (out / "table.md").read_text()
    assert "| sama | " in table and "| sama − random |" in table and "same optimizer steps" in table
    assert "| sama | 2 |" in (out / "cost.md").read_text()
    assert "| el2n | 2 | " in table.split("agreement of the scores")[1]
    assert "| sama | 1 | " in table.split("from another seed")[1]
    assert (out / "accuracy_vs_keep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "runs/epochs/sama/keep0.5/seed0/model/README.md").read_text()
    accuracy = by[("sama", "epochs", 0)]["test_accuracy"]
    assert "- synthetic/topics" in card and f"value: {accuracy}" in card and "data-pruning" in card
    assert "base_model" not in card  # a tiny model built in-process has no base model

    # a second call finds every run finished and trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/results.json")}
    proc = _run_recipe(tmp_path / "data", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/results.json")}
    assert "train_runtime" not in proc.stdout + proc.stderr  # no training run was started


def test_recipe_names_the_fix_for_a_bad_score_source(tmp_path):
    data = make_synthetic_weak_supervision(num_train=16, num_valid=4, num_test=8, num_classes=2, seed=0)
    write_wrench_format(data, tmp_path / "data")
    cmd = [
        sys.executable, str(ROOT / "recipes" / "data_pruning.py"), "--dataset_dir", str(tmp_path / "data"),
        "--model_name_or_path", "tiny-bert", "--score_source", "final", "--output_root", str(tmp_path / "out"),
        "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "--score_source must be 'snapshots' or 'draws'" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()
    cmd[cmd.index("--score_source") : cmd.index("--score_source") + 2] = ["--methods", "sama,hard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "unknown --methods ['hard']" in proc.stderr


def test_reproducibility_table_by_hand(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    from data_pruning_report import reproducibility_table

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.3, 0.2, 0.9, 0.5, 0.7, 0.6])
    write_scores(tmp_path / "scores/same/seed0/scores.jsonl", scores, {"label": labels})
    write_scores(tmp_path / "scores/same/seed1/scores.jsonl", scores * 2, {"label": labels})
    write_scores(tmp_path / "scores/flipped/seed0/scores.jsonl", scores, {"label": labels})
    write_scores(tmp_path / "scores/flipped/seed1/scores.jsonl", -scores, {"label": labels})
    table = reproducibility_table(tmp_path, [1.0, 0.5], stratify=True)
    assert "| same | 1 | +1.000 | 1.000 |" in table  # a monotone rescaling ranks alike
    assert "| flipped | 1 | -1.000 | 0.000 |" in table  # the reversed ranking keeps the other half of each class
