"""The base update sized by held-out clean data: the scale it applies, the rule that sets it, the data each part of the
clean set reaches, and resume."""

import os

import pytest
import torch
from helpers import StopAt, sama_args, tiny_bert, token_dataset, train_and_meta

from sama_trainer import ClassificationObjective, HeldOutBaseUpdate, SAMACallback, SAMATrainer
from sama_trainer.pipelines import fit_with_clean_set, split_meta_set


def _rows(dataset) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in dataset["input_ids"]}


class FixedScale(SAMACallback):
    def __init__(self, scale):
        self.scale = scale

    def on_meta_step_begin(self, args, state, control, trainer=None, **kwargs):
        trainer.base_update_scale = self.scale


def _train(tmp_path, name, callbacks=(), **overrides):
    train, meta = train_and_meta(n_train=48, n_meta=16)
    args = sama_args(tmp_path / name, max_steps=2, unroll_steps=2, **overrides)  # one meta step, the last step
    trainer = SAMATrainer(tiny_bert(dropout=0.0), args, train, meta, callbacks=list(callbacks))
    trainer.train()
    return trainer


def test_the_scale_sizes_the_base_update(tmp_path):
    restored = _train(tmp_path, "restore", sama_base_update=False)  # θ
    default = _train(tmp_path, "default")  # θ - εu
    runs = {s: _train(tmp_path, f"scale{s}", [FixedScale(s)]) for s in (0.0, 0.5, 1.0)}
    for p0, p1, *scaled in zip(*(t.model.parameters() for t in (restored, default, *runs.values()))):
        for s, p in zip(runs, scaled):  # θ - s·εu (up to the rounding of θ ± εu)
            torch.testing.assert_close(p, p0 + s * (p1 - p0), rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(runs[1.0].model.parameters(), default.model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(restored.model.parameters(), default.model.parameters()))


class RowsOfMetaLosses(ClassificationObjective):
    """Records the input rows of every meta loss: with a graph (the meta step) or without (the held-out check)."""

    def __init__(self):
        super().__init__()
        self.meta_rows, self.held_out_rows = set(), set()

    def meta_loss(self, model, inputs):
        rows = {tuple(r[m.bool()].tolist()) for r, m in zip(inputs["input_ids"], inputs["attention_mask"])}
        (self.meta_rows if torch.is_grad_enabled() else self.held_out_rows).update(rows)
        return super().meta_loss(model, inputs)


def test_rule_and_data_of_the_held_out_check(tmp_path):
    train, meta = train_and_meta(n_train=48, n_meta=24)
    part, rest = split_meta_set(meta, 0.5, seed=3)
    objective = RowsOfMetaLosses()
    sizer = HeldOutBaseUpdate(rest, batch_size=4, grow=2.0, shrink=0.25, max_scale=1.0)
    args = sama_args(tmp_path / "run", max_steps=16, meta_batch_size=4)
    trainer = SAMATrainer(tiny_bert(), args, train, part, objective=objective, callbacks=[sizer])
    trainer.train()
    # every meta batch came from the meta part, every held-out batch from the rest, and the rest was all visited
    assert objective.meta_rows <= _rows(part) and objective.held_out_rows == _rows(rest)
    assert not _rows(part) & _rows(rest) and len(_rows(part) | _rows(rest)) == len(meta)
    # the rule: the next scale grows (capped) after a step that lowered the held-out loss, shrinks otherwise
    assert [h[0] for h in sizer.history] == list(range(8))
    assert sizer.history[0][1] == 1.0
    scales = [h[1] for h in sizer.history] + [trainer.base_update_scale]  # the scale each step used, then the last
    for (_, used, before, after), following in zip(sizer.history, scales[1:]):
        assert following == (min(used * 2.0, 1.0) if after < before else used * 0.25)


def test_held_out_loss_is_the_meta_loss_of_the_batch(tmp_path):
    train, meta = train_and_meta(n_train=16, n_meta=8)
    args = sama_args(tmp_path / "run", max_steps=1)
    trainer = SAMATrainer(tiny_bert(), args, train, meta)
    sizer = HeldOutBaseUpdate(token_dataset(10, seed=5).remove_columns(["clean_labels"]), batch_size=4, seed=1)
    batches = [sizer.held_out_batch(trainer, k) for k in range(5)]
    assert [len(b["labels"]) for b in batches] == [4] * 5
    first_epoch = torch.cat([b["labels"] for b in batches[:2]])
    assert len(first_epoch) == 8  # two whole batches of 10 rows per epoch; the order is a function of (seed, k)
    again = sizer.held_out_batch(trainer, 3)
    assert all(torch.equal(again[k], batches[3][k]) for k in again)
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(**{k: v for k, v in batches[0].items()})
    torch.testing.assert_close(trainer.meta_loss_of(batches[0]), out.loss.float())


def _sized_run(tmp_path, name, stop_at=None, resume=None):
    train, meta = train_and_meta(n_train=48, n_meta=16)
    part, rest = split_meta_set(meta, 0.5)
    rest = rest.map(lambda row: {"labels": (row["labels"] + 1) % 3})  # wrong labels: fitting the meta set hurts them
    args = sama_args(tmp_path / name, max_steps=12, save_strategy="steps", save_steps=6, meta_batch_size=4)
    callbacks = [HeldOutBaseUpdate(rest, batch_size=4, shrink=0.5)] + ([StopAt(stop_at)] if stop_at else [])
    trainer = SAMATrainer(tiny_bert(), args, train, part, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callbacks[0]


def test_resume_keeps_the_scale_and_the_held_out_batches(tmp_path):
    full, full_sizer = _sized_run(tmp_path, "full")
    first, _ = _sized_run(tmp_path, "cut", stop_at=6)
    resumed, resumed_sizer = _sized_run(tmp_path, "cut", resume=os.path.join(first.args.output_dir, "checkpoint-6"))
    assert resumed_sizer.history == full_sizer.history[3:]
    assert resumed.base_update_scale == full.base_update_scale
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert full.base_update_scale < 1.0  # the scale did shrink in this run


def test_split_meta_set_is_a_stratified_partition():
    meta = token_dataset(30, seed=4).remove_columns(["clean_labels"])
    part, rest = split_meta_set(meta, 0.5, seed=0)
    assert len(part) + len(rest) == 30 and not _rows(part) & _rows(rest)
    for c in set(meta["labels"]):
        n = meta["labels"].count(c)
        assert part["labels"].count(c) == max(1, round(0.5 * n))
    assert split_meta_set(meta, 1.0) == (meta, None)
    assert _rows(split_meta_set(meta, 0.5, seed=1)[0]) != _rows(part)
    with pytest.raises(ValueError, match="meta_fraction must be in"):
        split_meta_set(meta, 0.0)


def test_pipeline_sends_each_part_where_it_belongs(tmp_path):
    train, clean = train_and_meta(n_train=48, n_meta=16)
    phases = fit_with_clean_set(
        tiny_bert(),
        sama_args(tmp_path / "run", max_steps=4),
        train,
        meta_dataset=clean,
        clean_dataset=clean,
        meta_fraction=0.5,
        held_out_base_update=True,
        split_seed=2,
        clean_steps=2,
    )
    main, clean_phase = (p.trainer for p in phases)
    part, rest = split_meta_set(clean, 0.5, seed=2)
    assert _rows(main.meta_dataset) == _rows(part)
    (sizer,) = [c for c in main.callback_handler.callbacks if isinstance(c, HeldOutBaseUpdate)]
    assert _rows(sizer.held_out_dataset) == _rows(rest)
    assert clean_phase.train_dataset is clean  # the clean phase trains on every clean example
    assert len(sizer.history) == main.meta_step_count == 2


def test_bad_inputs(tmp_path):
    train, clean = train_and_meta(n_train=16, n_meta=8)
    args = sama_args(tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match="set meta_fraction < 1"):
        fit_with_clean_set(tiny_bert(), args, train, meta_dataset=clean, held_out_base_update=True)
    with pytest.raises(ValueError, match="pass meta_dataset"):
        fit_with_clean_set(tiny_bert(), args, train, meta_fraction=0.5)
    with pytest.raises(ValueError, match="held_out_dataset"):
        HeldOutBaseUpdate(clean.select([]))
    with pytest.raises(ValueError, match="need grow >= 1"):
        HeldOutBaseUpdate(clean, shrink=1.5)
    no_base_update = sama_args(tmp_path / "run2", max_steps=2, sama_base_update=False)
    trainer = SAMATrainer(tiny_bert(), no_base_update, train, clean, callbacks=[HeldOutBaseUpdate(clean)])
    with pytest.raises(ValueError, match="set sama_base_update=True"):
        trainer.train()
