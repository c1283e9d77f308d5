"""SAMATrainer on a tiny BERT built from a config: training, logging, checkpoints, saving, errors."""

import os
import warnings

import pytest
import torch
from helpers import StopAt, count_draw_recorders, pad_batch, sama_args, tiny_bert, train_and_meta
from transformers import TrainerCallback

from sama_trainer import (
    BootstrapCorrectionNet,
    ClassificationObjective,
    LabelCorrectionNet,
    MetaWeightNet,
    SAMACallback,
    SAMATrainer,
    UnsupportedOptimizerError,
    load_meta_model,
)
from sama_trainer.meta_nets import normalize_weights_per_class


def make_args(tmp_path, **overrides):
    return sama_args(overrides.pop("output_dir", tmp_path / "out"), data_seed=0, **overrides)


def datasets():
    return train_and_meta()


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("objective", ["reweight", "correct", "reweight+correct"])
def test_trains_updates_base_and_meta_and_logs_meta_metrics(tmp_path, objective):
    train, meta = datasets()
    trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, meta_objective=objective), train, meta)
    base_before, meta_before = params_of(trainer.model), params_of(trainer.meta_model)
    trainer.train()
    assert all(not torch.equal(base_before[n], p) for n, p in trainer.model.named_parameters() if "pooler" not in n)
    assert all(not torch.equal(meta_before[n], p) for n, p in trainer.meta_model.named_parameters())
    assert trainer.meta_step_count == 12 // 2 and trainer.meta_steps_skipped == 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ("meta/meta_loss", "meta/v_norm", "meta/eps", "meta/steps", "meta/skipped_steps"):
        assert all(key in h and h[key] == h[key] for h in logs), key  # present and not NaN
    if "reweight" in objective:
        assert all(0 <= h["meta/weight_min"] <= h["meta/weight_mean"] <= h["meta/weight_max"] for h in logs)
    assert logs[-1]["meta/steps"] == 6


def test_meta_warmup_delays_meta_steps(tmp_path):
    train, meta = datasets()
    trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, meta_warmup_steps=8), train, meta)
    trainer.train()
    assert trainer.meta_step_count == 2  # steps 10 and 12


def _run(tmp_path, name, stop_at=None, resume=None):
    train, meta = datasets()
    args = make_args(
        tmp_path,
        output_dir=str(tmp_path / name),
        save_strategy="steps",
        save_steps=6,
        meta_objective="reweight+correct",
    )
    callbacks = [StopAt(stop_at)] if stop_at else None
    trainer = SAMATrainer(tiny_bert(), args, train, meta, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full = _run(tmp_path, "full")
    first = _run(tmp_path, "interrupted", stop_at=6)
    assert first.state.global_step == 6
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-6")
    assert os.path.isfile(os.path.join(checkpoint, "sama_meta_state.pt"))
    resumed = _run(tmp_path, "interrupted", resume=checkpoint)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(full.meta_model.named_parameters(), resumed.meta_model.parameters()):
        assert torch.equal(a, b), n
    assert resumed.meta_step_count == full.meta_step_count == 6
    assert resumed._meta_batches().state_dict() == full._meta_batches().state_dict()


def test_save_model_writes_loadable_meta_net_and_model_card(tmp_path):
    train, meta = datasets()
    trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, meta_objective="reweight+correct"), train, meta)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    loaded = load_meta_model(str(out / "sama_meta_model"))
    assert isinstance(loaded["reweight"], MetaWeightNet) and isinstance(loaded["correct"], LabelCorrectionNet)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(trainer.meta_model.state_dict())
    for n, a in trainer.meta_model.state_dict().items():
        assert torch.equal(a.cpu(), loaded_state[n]), n
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Training with SAMA" in card and "unroll_steps" in card and "2310.05674" in card
    assert "- sama" in card and "[](https://huggingface.co/)" not in card


def test_bootstrap_correction_learns_saves_and_loads(tmp_path):
    train, meta = datasets()
    args = make_args(tmp_path, meta_objective="reweight+correct", correction_type="bootstrap")
    trainer = SAMATrainer(tiny_bert(), args, train, meta)
    correct = trainer.meta_model["correct"]
    assert isinstance(correct, BootstrapCorrectionNet)
    before = params_of(correct)
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in correct.named_parameters())  # meta-gradient reaches it
    trainer.save_model(str(tmp_path / "saved"))
    loaded = load_meta_model(str(tmp_path / "saved" / "sama_meta_model"))["correct"]
    assert isinstance(loaded, BootstrapCorrectionNet)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(loaded(logits, labels), correct.cpu()(logits, labels))


def test_load_meta_model_refuses_an_unknown_config(tmp_path):
    (tmp_path / "config.json").write_text('{"num_labels": 3, "temperature": 2.0}')
    with pytest.raises(ValueError, match="not a built-in meta net.*pass meta_model="):
        load_meta_model(str(tmp_path))


def test_example_weights_and_corrections_cover_the_dataset(tmp_path):
    train, meta = datasets()
    trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, meta_objective="reweight+correct"), train, meta)
    trainer.train()
    out = trainer.compute_example_weights(train)
    assert len(out["weight"]) == len(out["loss"]) == len(out["corrected_label"]) == len(train)
    assert all(w >= 0 for w in out["weight"])
    assert all(abs(sum(p) - 1) < 1e-5 for p in out["corrected_probs"])


def test_example_weights_from_length_sorted_passes_equal_the_plain_order(tmp_path):
    train, meta = datasets()
    ragged = train.map(lambda e, i: {"input_ids": e["input_ids"][: 2 + (i * 5) % 7]}, with_indices=True)
    widths = []

    def pad(examples):
        batch = pad_batch(examples)
        widths.append(batch["input_ids"].shape[1])
        return batch

    args = make_args(tmp_path, meta_objective="reweight+correct", meta_weight_normalize_by_class=True)
    trainer = SAMATrainer(tiny_bert(), args, train, meta)
    trainer.train()
    # the losses of a tiny model differ little: a steep weight net, z = 10 (loss - 1.1), makes the weights differ
    first, last = (m for m in trainer.meta_model["reweight"].modules() if isinstance(m, torch.nn.Linear))
    first.weight.data.fill_(1.0), first.bias.data.zero_(), last.weight.data.fill_(0.1), last.bias.data.fill_(-11.0)
    trainer.data_collator = pad
    plain = trainer.compute_example_weights(ragged, batch_size=5, group_by_length=False)
    plain_widths, widths[:] = list(widths), []
    grouped = trainer.compute_example_weights(ragged, batch_size=5)
    assert sum(widths) < sum(plain_widths)  # the sorted passes padded less
    assert plain.keys() == grouped.keys() == {"loss", "weight", "corrected_label", "corrected_probs"}
    for key in plain:
        torch.testing.assert_close(torch.tensor(grouped[key]), torch.tensor(plain[key]), rtol=1e-4, atol=1e-5)
    assert torch.tensor(plain["weight"]).std() > 0.01


def test_normalize_weights_per_class_matches_hand_computation():
    weights = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0])
    labels = torch.tensor([0, 0, 2, 2, 0])  # class 1 absent; class 0 mean 8/3, class 2 mean 4.5
    expected = torch.tensor([3 / 8, 6 / 8, 3 / 4.5, 6 / 4.5, 15 / 8])
    torch.testing.assert_close(normalize_weights_per_class(weights, labels), expected)
    for num_classes in (3, 5):  # sized from the model's classes (no host sync): same answer
        torch.testing.assert_close(normalize_weights_per_class(weights, labels, num_classes), expected)
    soft = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.2 / 3  # soft labels: their argmax is the class
    torch.testing.assert_close(normalize_weights_per_class(weights, soft), expected)
    scaled = weights * torch.tensor([2.0, 2.0, 7.0, 7.0, 2.0])  # a per-class factor changes nothing
    torch.testing.assert_close(normalize_weights_per_class(scaled, labels), expected)
    tiny = weights * torch.tensor([1e-30, 1e-30, 1.0, 1.0, 1e-30])  # a saturated class keeps its ratios
    torch.testing.assert_close(normalize_weights_per_class(tiny, labels), expected)
    silenced = weights * torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])  # all weights of class 0 underflowed to 0
    torch.testing.assert_close(
        normalize_weights_per_class(silenced, labels), torch.tensor([1.0, 1.0, 3 / 4.5, 6 / 4.5, 1.0])
    )


class RecordingObjective(ClassificationObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def weighted_loss(self, meta_model, examples):
        loss, weights = super().weighted_loss(meta_model, examples)
        self.seen.append((weights.detach(), examples.labels))
        return loss, weights


@pytest.mark.parametrize("objective", ["reweight", "reweight+correct"])
def test_weights_normalized_by_class_in_every_pass_and_in_the_export(tmp_path, objective):
    train, meta = datasets()
    args = make_args(tmp_path, meta_objective=objective, meta_weight_normalize_by_class=True)
    recording = RecordingObjective.from_config(args)
    trainer = SAMATrainer(tiny_bert(), args, train, meta, objective=recording)
    meta_before = params_of(trainer.meta_model["reweight"] if "+" in objective else trainer.meta_model)
    trainer.train()
    assert len(recording.seen) == 12 + 2 * 6  # every base step and both perturbed passes of each meta step
    for weights, labels in recording.seen:
        for c in labels.unique():
            assert weights[labels == c].mean().item() == pytest.approx(1.0, abs=1e-5)
    after = trainer.meta_model["reweight"] if "+" in objective else trainer.meta_model
    assert any(not torch.equal(meta_before[n], p) for n, p in after.named_parameters())  # meta-gradient flows
    out = trainer.compute_example_weights(train, batch_size=len(train))
    weights, labels = torch.tensor(out["weight"]), torch.tensor(train["labels"])
    for c in labels.unique():
        assert weights[labels == c].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.std() > 0  # not the trivial all-ones answer


# ------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors before training starts


def test_missing_meta_dataset(tmp_path):
    train, _ = datasets()
    with pytest.raises(ValueError, match="needs meta_dataset"):
        SAMATrainer(tiny_bert(), make_args(tmp_path), train, None)


def test_meta_dataset_without_labels(tmp_path):
    train, meta = datasets()
    with pytest.raises(ValueError, match="no label column"):
        SAMATrainer(tiny_bert(), make_args(tmp_path), train, meta.remove_columns(["labels"]))


def test_sama_na_base_update_under_adam_warns_and_names_the_fix(tmp_path):
    train, meta = datasets()

    def warnings_of(**overrides) -> list[str]:
        trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, **overrides), train, meta)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.create_optimizer()
        return [str(w.message) for w in caught if "sama_base_update" in str(w.message)]

    assert any("AdamW" in m and "sama_base_update=False" in m for m in warnings_of(meta_gradient="sama-na"))
    assert not warnings_of(meta_gradient="sama-na", sama_base_update=False)
    assert not warnings_of(meta_gradient="sama-na", optim="sgd")  # du/dg is constant: SAMA-NA = SAMA
    assert not warnings_of(meta_gradient="sama")
    sgd = torch.optim.SGD(tiny_bert().parameters(), lr=0.1)  # an optimizer passed in is checked as it is
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SAMATrainer(tiny_bert(), make_args(tmp_path, meta_gradient="sama-na"), train, meta, optimizers=(sgd, None))
    assert not [w for w in caught if "sama_base_update" in str(w.message)]


def test_unknown_method_and_bad_unroll(tmp_path):
    with pytest.raises(ValueError, match="unknown meta_gradient 'darts2'.*sama"):
        make_args(tmp_path, meta_gradient="darts2")
    with pytest.raises(ValueError, match="unroll_steps must be >= 1"):
        make_args(tmp_path, unroll_steps=0)
    with pytest.raises(ValueError, match="meta_objective"):
        make_args(tmp_path, meta_objective="relabel")
    with pytest.raises(ValueError, match="correction_type must be one of"):
        make_args(tmp_path, correction_type="oracle")
    with pytest.raises(ValueError, match="correction_mix_noisy applies to correction_type='free' only"):
        make_args(tmp_path, correction_type="bootstrap", correction_mix_noisy=0.5)


def test_plain_training_arguments_rejected(tmp_path):
    from transformers import TrainingArguments

    train, meta = datasets()
    with pytest.raises(TypeError, match="SAMAConfig"):
        SAMATrainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path)), train, meta)


def test_unsupported_optimizer_fails_before_training(tmp_path):
    train, meta = datasets()
    trainer = SAMATrainer(tiny_bert(), make_args(tmp_path, optim="rmsprop"), train, meta)
    before = params_of(trainer.model)
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop.*Supported: Adam, SGD"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    with pytest.raises(UnsupportedOptimizerError):
        opt = torch.optim.RMSprop(tiny_bert().parameters())
        SAMATrainer(tiny_bert(), make_args(tmp_path), train, meta, optimizers=(opt, None))
    # SAMA-NA needs no adaptation rule, so any optimizer works
    SAMATrainer(tiny_bert(), make_args(tmp_path, optim="rmsprop", meta_gradient="sama-na", max_steps=2), train, meta)


def test_reentrant_checkpointing_rejected(tmp_path):
    train, meta = datasets()
    args = make_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        SAMATrainer(tiny_bert(), args, train, meta)


def test_custom_meta_optimizer_with_parameter_groups(tmp_path):
    """A user-built meta optimizer is the one stepped: plain SGD moves λ by exactly -lr × the meta-gradient."""
    train, meta = datasets()
    torch.manual_seed(0)
    meta_model = torch.nn.ModuleDict({"reweight": MetaWeightNet(), "correct": LabelCorrectionNet(3)})
    groups = [
        {"params": list(meta_model["reweight"].parameters()), "lr": 0.5},
        {"params": list(meta_model["correct"].parameters()), "lr": 0.05},
    ]
    args = make_args(tmp_path, meta_objective="reweight+correct", max_steps=2, unroll_steps=2)
    trainer = SAMATrainer(
        tiny_bert(), args, train, meta, meta_model=meta_model, meta_optimizer=torch.optim.SGD(groups, lr=1.0)
    )
    before = [p.detach().clone() for p in meta_model.parameters()]
    trainer.train()
    assert trainer.meta_step_count == 1
    n_reweight = len(list(meta_model["reweight"].parameters()))
    for i, (b, p, g) in enumerate(zip(before, meta_model.parameters(), trainer.last_meta_gradients)):
        lr = 0.5 if i < n_reweight else 0.05
        torch.testing.assert_close(p.detach(), b - lr * g, rtol=1e-6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in trainer.last_meta_gradients[n_reweight:])


def test_meta_optimizer_errors(tmp_path):
    train, meta = datasets()
    stray = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs meta_model"):
        SAMATrainer(tiny_bert(), make_args(tmp_path), train, meta, meta_optimizer=torch.optim.SGD(stray.parameters()))
    with pytest.raises(ValueError, match="not parameters of the meta model"):
        SAMATrainer(
            tiny_bert(),
            make_args(tmp_path),
            train,
            meta,
            meta_model=MetaWeightNet(),
            meta_optimizer=torch.optim.SGD(stray.parameters(), lr=0.1),
        )


@pytest.mark.parametrize("follows_lr", [False, True])
def test_base_update_follows_the_learning_rate_schedule(tmp_path, monkeypatch, follows_lr):
    from sama_trainer.meta_gradient.core import Perturbation

    scales = []
    original = Perturbation.base_update

    def spy(self, step_hook=None, scale=1.0):
        scales.append(scale)
        return original(self, step_hook, scale)

    monkeypatch.setattr(Perturbation, "base_update", spy)
    train, meta = datasets()
    args = make_args(tmp_path, max_steps=8, lr_scheduler_type="linear", sama_base_update_follows_lr=follows_lr)
    SAMATrainer(tiny_bert(), args, train, meta).train()
    # meta steps after optimizer steps 2, 4, 6, 8; linear decay: step k used lr0 · (1 - (k - 1) / 8)
    expected = [1 - (k - 1) / 8 for k in (2, 4, 6, 8)] if follows_lr else [1.0] * 4
    assert scales == pytest.approx(expected)


def test_meta_batches_grouped_by_length_without_input_ids_name_the_fix(tmp_path):
    train, meta = datasets()
    args = make_args(tmp_path, meta_group_by_length=True)
    trainer = SAMATrainer(tiny_bert(), args, train, meta.rename_column("input_ids", "tokens"))
    with pytest.raises(ValueError, match="meta_group_by_length=False"):
        trainer._meta_batches()


def _subnormal_product() -> float:
    return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()  # 1e-40: subnormal in float32


@pytest.mark.parametrize("flush", [True, False])
def test_subnormal_floats_flushed_to_zero_while_training_on_a_cpu(tmp_path, flush):
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(_subnormal_product())

    train, meta = datasets()
    args = make_args(tmp_path, max_steps=2, flush_denormal=flush)
    assert _subnormal_product() > 0
    SAMATrainer(tiny_bert(), args, train, meta, callbacks=[Probe()]).train()
    assert len(seen) == 2 and all((value == 0.0) == flush for value in seen)
    assert _subnormal_product() > 0  # torch's default again after training


def test_flushing_that_was_on_before_training_stays_on_after(tmp_path):
    train, meta = datasets()
    torch.set_flush_denormal(True)
    try:
        SAMATrainer(tiny_bert(), make_args(tmp_path, max_steps=2), train, meta).train()
        assert _subnormal_product() == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert _subnormal_product() > 0


class ReseedBeforeMetaStep(SAMACallback):
    """Sets the RNG to ``seed`` before each meta step: runs that differ only in it see other dropout masks there."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_meta_step_begin(self, args, state, control, **kwargs):
        torch.manual_seed(self.seed)


@pytest.mark.parametrize("meta_dropout", [True, False])
def test_meta_dropout_false_runs_the_meta_passes_in_eval_mode_and_frees_them_of_the_rng(
    tmp_path, meta_dropout, monkeypatch
):
    modes: dict[str, set[bool]] = {"base": set(), "meta": set()}
    recorders = count_draw_recorders(monkeypatch)  # only needed where the perturbed passes draw dropout masks

    class Phases(SAMATrainer):
        in_meta = False

        def meta_step(self, base_batches):
            self.in_meta = True
            try:
                return super().meta_step(base_batches)
            finally:
                self.in_meta = False

    def meta_gradient(seed: int) -> list[torch.Tensor]:
        train, meta = datasets()
        args = make_args(tmp_path, max_steps=2, meta_dropout=meta_dropout, sama_base_update=False)
        trainer = Phases(tiny_bert(dropout=0.3), args, train, meta, callbacks=[ReseedBeforeMetaStep(seed)])
        trainer.model.register_forward_pre_hook(
            lambda module, inputs: modes["meta" if trainer.in_meta else "base"].add(module.training)
        )
        trainer.train()
        assert trainer.meta_step_count == 1 and trainer.model.training
        return trainer.last_meta_gradients

    first, other = meta_gradient(seed=1), meta_gradient(seed=2)
    assert modes == {"base": {True}, "meta": {meta_dropout}}
    same = all(torch.equal(a, b) for a, b in zip(first, other))
    assert same != meta_dropout  # without dropout the meta step draws nothing: its result does not depend on the RNG
    assert len(recorders) == (2 if meta_dropout else 0)  # one per meta step (two runs of one) if the passes draw
