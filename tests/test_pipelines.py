"""Training pipelines over a noisy training set and a clean set: which data each phase sees, in which order."""

import pytest
from helpers import sama_args, tiny_bert, train_and_meta
from transformers import Trainer

from sama_trainer import SAMATrainer
from sama_trainer.pipelines import default_continue_steps, fit_with_clean_set


def run(tmp_path, mode, meta=True, **options):
    train, clean = train_and_meta(n_train=48, n_meta=16)
    train = train.add_column("example_id", list(range(len(train))))
    seen = []
    phases = fit_with_clean_set(
        tiny_bert(),
        sama_args(tmp_path / mode, max_steps=4, unroll_steps=2),
        train,
        meta_dataset=clean if meta else None,
        clean_dataset=clean,
        mode=mode,
        after_main=lambda trainer: seen.append(("after_main", trainer)),
        **options,
    )
    return phases, seen, train, clean


@pytest.mark.parametrize("mode", ["continue", "warm_start"])
def test_clean_phase_before_or_after_the_main_phase(tmp_path, mode):
    phases, seen, train, clean = run(tmp_path, mode, clean_steps=3)
    order = ["main", "clean"] if mode == "continue" else ["clean", "main"]
    assert [p.name for p in phases] == order
    main = next(p.trainer for p in phases if p.name == "main")
    clean_phase = next(p.trainer for p in phases if p.name == "clean")
    assert isinstance(main, SAMATrainer) and main.train_dataset is train and main.meta_dataset is clean
    assert main.meta_step_count == 2
    assert type(clean_phase) is Trainer and clean_phase.train_dataset is clean and clean_phase.state.global_step == 3
    assert clean_phase.model is main.model  # one model, trained in place
    assert seen == [("after_main", main)]  # called right after the main phase, before a following clean phase
    assert all(p.seconds > 0 and p.cpu_seconds > 0 for p in phases)


def test_mix_puts_the_clean_rows_into_the_training_set(tmp_path):
    phases, _, train, clean = run(tmp_path, "mix", clean_upsample=2)
    (main,) = [p.trainer for p in phases]
    mixed = main.train_dataset
    assert len(mixed) == len(train) + 2 * len(clean)
    rows = mixed.to_dict()
    assert rows["input_ids"] == list(train["input_ids"]) + list(clean["input_ids"]) * 2
    assert rows["example_id"] == list(range(len(mixed)))  # the clean copies continue the training rows' ids
    assert main.meta_dataset is clean
    drawn = main.weight_history.totals()[1]
    assert drawn.sum() == 4 * 8 and drawn[len(train) :].sum() > 0  # weights recorded for clean rows too


def test_without_meta_data_the_main_phase_is_plain_fine_tuning(tmp_path):
    phases, _, train, _ = run(tmp_path, "continue", meta=False)
    main, clean_phase = (p.trainer for p in phases)
    assert type(main) is Trainer and main.train_dataset is train
    per_step = 8  # sama_args: batch 8, one process, no accumulation
    assert clean_phase.state.global_step == default_continue_steps(16, main.args) == max(10, -(-3 * 16 // per_step))


def test_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        run(tmp_path, "before")
