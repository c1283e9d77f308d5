"""Cross-fitting the meta set: which part each meta step draws from, the clean phase seeing every clean example,
resume, and bad inputs."""

import os

import pytest
import torch
from helpers import StopAt, sama_args, tiny_bert, train_and_meta

from sama_trainer import ClassificationObjective, CrossFitMetaSet, SAMATrainer
from sama_trainer.pipelines import fit_with_clean_set, split_meta_set


def _rows(dataset) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in dataset["input_ids"]}


class MetaRowsPerStep(ClassificationObjective):
    """Records the input rows of every meta step's meta loss, one set per meta step."""

    def __init__(self):
        super().__init__()
        self.steps: list[set[tuple[int, ...]]] = []

    def meta_loss(self, model, inputs):
        self.steps.append({tuple(r[m.bool()].tolist()) for r, m in zip(inputs["input_ids"], inputs["attention_mask"])})
        return super().meta_loss(model, inputs)


def test_each_half_of_the_meta_steps_draws_from_its_part(tmp_path):
    train, meta = train_and_meta(n_train=48, n_meta=24)
    part, rest = split_meta_set(meta, 0.5, seed=1)
    objective, swap = MetaRowsPerStep(), CrossFitMetaSet([part, rest])
    args = sama_args(tmp_path / "run", max_steps=12, meta_batch_size=4)  # 6 meta steps: 3 on each part
    trainer = SAMATrainer(tiny_bert(), args, train, part, objective=objective, callbacks=[swap])
    trainer.train()
    assert len(objective.steps) == trainer.meta_step_count == 6
    assert all(rows <= _rows(part) for rows in objective.steps[:3])
    assert all(rows <= _rows(rest) for rows in objective.steps[3:])
    assert swap.history == [(3, 1)] and trainer.meta_dataset is rest
    # the second part starts a fresh stream: its first epoch (3 batches of 4 of its 12 rows) visits every row
    assert set().union(*objective.steps[3:]) == _rows(rest)


def test_meta_warmup_and_unroll_set_the_spans(tmp_path):
    args = sama_args(tmp_path / "args", max_steps=100, unroll_steps=5, meta_warmup_steps=20)
    swap = CrossFitMetaSet([[1], [2], [3]])
    total = swap.total_meta_steps(args, 100)
    assert total == 16  # after steps 25, 30, ..., 100
    assert [swap.part_of_meta_step(k, total) for k in range(total)] == [0] * 6 + [1] * 5 + [2] * 5


def _cross_fit_run(tmp_path, name, stop_at=None, resume=None):
    train, meta = train_and_meta(n_train=48, n_meta=24)
    part, rest = split_meta_set(meta, 0.5, seed=1)
    objective = MetaRowsPerStep()
    args = sama_args(tmp_path / name, max_steps=12, save_strategy="steps", save_steps=2, meta_batch_size=4)
    callbacks = [CrossFitMetaSet([part, rest])] + ([StopAt(stop_at)] if stop_at else [])
    trainer = SAMATrainer(tiny_bert(), args, train, part, objective=objective, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, objective


@pytest.mark.parametrize("stop_at", [4, 6, 10])  # within the first part, at its last step, within the second
def test_resume_draws_the_meta_batches_of_an_uninterrupted_run(tmp_path, stop_at):
    full, full_rows = _cross_fit_run(tmp_path, "full")
    first, first_rows = _cross_fit_run(tmp_path, "cut", stop_at=stop_at)
    checkpoint = os.path.join(first.args.output_dir, f"checkpoint-{stop_at}")
    resumed, resumed_rows = _cross_fit_run(tmp_path, "cut", resume=checkpoint)
    assert first_rows.steps + resumed_rows.steps == full_rows.steps
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.meta_model.parameters(), resumed.meta_model.parameters()):
        assert torch.equal(a, b)


def test_pipeline_cross_fits_and_trains_on_all_of_the_clean_set(tmp_path):
    train, clean = train_and_meta(n_train=48, n_meta=16)
    objective = MetaRowsPerStep()
    phases = fit_with_clean_set(
        tiny_bert(),
        sama_args(tmp_path / "run", max_steps=8, meta_batch_size=8),
        train,
        meta_dataset=clean,
        clean_dataset=clean,
        meta_fraction=0.5,
        cross_fit=True,
        split_seed=2,
        clean_steps=2,
        objective=objective,
    )
    main, clean_phase = (p.trainer for p in phases)
    part, rest = split_meta_set(clean, 0.5, seed=2)
    assert objective.steps[0] == _rows(part) and objective.steps[-1] == _rows(rest)
    assert clean_phase.train_dataset is clean  # the clean phase trains on every clean example


def test_bad_inputs(tmp_path):
    train, clean = train_and_meta(n_train=16, n_meta=8)
    args = sama_args(tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match="set meta_fraction < 1"):
        fit_with_clean_set(tiny_bert(), args, train, meta_dataset=clean, cross_fit=True)
    with pytest.raises(ValueError, match="choose one"):
        fit_with_clean_set(
            tiny_bert(), args, train, meta_dataset=clean, meta_fraction=0.5, cross_fit=True, held_out_base_update=True
        )
    with pytest.raises(ValueError, match="pass meta_dataset"):
        fit_with_clean_set(tiny_bert(), args, train, cross_fit=True)
    with pytest.raises(ValueError, match="two or more parts"):
        CrossFitMetaSet([clean])
    with pytest.raises(ValueError, match="must hold examples"):
        CrossFitMetaSet([clean, clean.select([])])
    trainer = SAMATrainer(tiny_bert(), args, train, clean)
    with pytest.raises(ValueError, match="no label column"):
        trainer.set_meta_dataset(clean.remove_columns(["labels"]))
