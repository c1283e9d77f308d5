"""Fixed per-example weights (``example_weight_column``) and the vote prior that supplies them for weak labels."""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import pad_batch, sama_args, tiny_bert, token_dataset

from sama_trainer import ClassificationObjective, MetaWeightNet, SAMATrainer
from sama_trainer.data import (
    VOTE_PRIOR_COLUMN,
    WeakSupervisionData,
    fit_logistic_regression,
    fit_vote_prior,
    lf_agreement,
    make_synthetic_weak_supervision,
)
from sama_trainer.data.preparation import prepare_task
from sama_trainer.objectives import ExampleLosses
from sama_trainer.pipelines import SoftLabelTrainer, fit_with_clean_set
from sama_trainer.pretrained import build_word_tokenizer


def test_logistic_regression_is_the_saturated_model_and_matches_scikit_learn():
    # one ±1 feature: with a vanishing penalty the fit reproduces the frequency of y = 1 at each feature value
    x = np.array([[1.0]] * 10 + [[-1.0]] * 10)
    y = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 7, dtype=float)
    coef, intercept = fit_logistic_regression(x, y, l2=1e-9)
    p = 1 / (1 + np.exp(-(x[:, 0] * coef[0] + intercept)))
    np.testing.assert_allclose(p[[0, 10]], [0.8, 0.3], atol=1e-6)
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.choice([-1.0, 0.0, 1.0], size=(200, 6))
    y = (rng.random(200) < 1 / (1 + np.exp(-(x[:, 0] - 2 * x[:, 1] + 0.3)))).astype(float)
    reference = sklearn.LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(x, y)
    coef, intercept = fit_logistic_regression(x, y, l2=2.0)
    np.testing.assert_allclose(coef, reference.coef_[0], atol=1e-6)
    assert abs(intercept - reference.intercept_[0]) < 1e-6
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_logistic_regression(x, y, l2=0.0)


def _split(rows: list[tuple[int, list[int]]]) -> Dataset:
    return Dataset.from_dict(
        {
            "id": [str(i) for i in range(len(rows))],
            "text": [f"t{i}" for i in range(len(rows))],
            "label": [y for y, _ in rows],
            "weak_labels": [votes for _, votes in rows],
        }
    )


def test_vote_prior_trusts_less_the_rows_where_a_labeling_function_that_is_right_dissents():
    # LF 0 votes the true class; LF 1 and LF 2 vote class 1 whatever it is: where LF 0 dissents, the vote is wrong
    rows = [(1, [1, 1, 1])] * 10 + [(0, [0, 1, 1])] * 6 + [(0, [0, -1, -1])] * 4 + [(1, [-1, 1, 1])] * 3
    prior = fit_vote_prior(_split(rows), num_classes=2)
    assert prior.num_clean == 23 and prior.clean_right == pytest.approx(17 / 23)
    agree, dissent = lf_agreement(np.array([[1, 1, 1], [0, 1, 1]]), np.array([1, 1]))
    p_agree, p_dissent = prior(np.stack([agree, dissent]))
    assert p_dissent < 0.5 < p_agree
    with pytest.raises(ValueError, match=r"expected vote features \[n, 3\]"):
        prior(np.zeros((2, 2)))
    all_right = [(1, [1, 1, 1])] * 5 + [(0, [0, 0, -1])] * 5
    with pytest.raises(ValueError, match="right on all 10 covered clean rows.*larger clean set"):
        fit_vote_prior(_split(all_right), num_classes=2)
    with pytest.raises(ValueError, match="no clean row is covered"):
        fit_vote_prior(_split([(0, [-1, -1, -1])] * 3), num_classes=2)
    with pytest.raises(ValueError, match="no clean row is covered"):  # an empty clean set: the same clear error
        fit_vote_prior(_split([(0, [0, 1, 1])]).select([]), num_classes=2)


def test_prepare_task_fits_the_prior_on_the_clean_set_and_puts_it_on_the_training_rows_only():
    data = make_synthetic_weak_supervision(num_train=80, num_valid=40, num_test=20, num_classes=3, seed=4)
    tokenizer = build_word_tokenizer(list(data["train"]["text"]) + list(data["valid"]["text"]))
    task = prepare_task(data, "syn", tokenizer, max_length=16, vote_prior=True, seed=0)
    prior = fit_vote_prior(task.clean, 3)
    expected = prior(lf_agreement(np.array(task.train["weak_labels"]), np.array(task.train["weak_label"])))
    np.testing.assert_allclose(task.train_tok[VOTE_PRIOR_COLUMN], expected, rtol=1e-6)
    assert task.clean_as_train_tok[VOTE_PRIOR_COLUMN] == [1.0] * len(task.clean)  # clean labels are right
    assert VOTE_PRIOR_COLUMN not in task.clean_tok.column_names + task.test_tok.column_names
    # the test split is never read: other test labels and votes leave the prior as it is
    test = data["test"]
    shuffled = test.map(lambda r: {"label": (r["label"] + 1) % 3, "weak_labels": [-1] * len(r["weak_labels"])})
    other = WeakSupervisionData(DatasetDict({**data.splits, "test": shuffled}), data.label_names)
    again = prepare_task(other, "syn", tokenizer, max_length=16, vote_prior=True, seed=0)
    assert again.train_tok[VOTE_PRIOR_COLUMN] == task.train_tok[VOTE_PRIOR_COLUMN]
    # ... while the clean set is what it learns from
    relabelled = data["valid"].map(lambda r, i: {"label": (r["label"] + i % 2) % 3}, with_indices=True)
    moved = WeakSupervisionData(DatasetDict({**data.splits, "valid": relabelled}), data.label_names)
    changed = prepare_task(moved, "syn", tokenizer, max_length=16, vote_prior=True, seed=0)
    assert changed.train_tok[VOTE_PRIOR_COLUMN] != task.train_tok[VOTE_PRIOR_COLUMN]
    plain = prepare_task(data, "syn", tokenizer, max_length=16, seed=0)
    assert VOTE_PRIOR_COLUMN not in plain.train_tok.column_names


def _weighted(n: int = 32, seed: int = 1) -> Dataset:
    """A noisy training set whose ``w`` column is 0 on every third row and between 0.2 and 1 elsewhere."""
    train = token_dataset(n, noise=0.3, seed=seed).remove_columns(["clean_labels"])
    g = torch.Generator().manual_seed(seed)
    w = 0.2 + 0.8 * torch.rand(n, generator=g)
    w[::3] = 0.0
    return train.add_column("example_id", list(range(n))).add_column("w", w.tolist())


def _relabel_zero_weight_rows(train: Dataset) -> Dataset:
    return train.map(lambda r: {"labels": (r["labels"] + 1) % 3 if r["w"] == 0 else r["labels"]})


def _collate(examples: list[dict]) -> dict:
    batch = pad_batch(examples)
    for key, dtype in (("example_id", torch.long), ("w", torch.float32)):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
    return batch


def test_plain_training_multiplies_each_examples_loss_by_its_fixed_weight(tmp_path):
    train = _weighted()
    model = tiny_bert(dropout=0.0)
    trainer = SoftLabelTrainer(model=model, args=sama_args(tmp_path), train_dataset=train, example_weight_column="w")
    batch = _collate([train[i] for i in range(8)])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = (batch["w"] * torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")).mean()
    torch.testing.assert_close(trainer.compute_loss(model, batch), by_hand)
    with pytest.raises(ValueError, match="unset example_weight_column"):
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "w"})

    # the labels of the rows weighted 0 do not matter: two runs that differ only there end bit-identical
    def fit(dataset: Dataset) -> dict:
        model = tiny_bert(dropout=0.0)
        args = sama_args(tmp_path, example_weight_column="w", max_steps=6)
        fit_with_clean_set(model, args, dataset, data_collator=_collate)
        return model.state_dict()

    first, second = fit(train), fit(_relabel_zero_weight_rows(train))
    assert all(torch.equal(first[k], second[k]) for k in first)
    unweighted = fit(train.map(lambda r: {"w": 1.0}))  # and the weights do act
    assert not all(torch.equal(first[k], unweighted[k]) for k in first)


def test_with_sama_the_fixed_weights_multiply_the_learned_ones_everywhere(tmp_path):
    objective = ClassificationObjective(reweight=True, normalize_by_class=True, weight_column="w")
    net = MetaWeightNet(hidden_size=8, normalize=True)
    losses, labels, logits = torch.rand(6) * 2, torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 3)
    given = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 0.75])
    plain = objective.example_weights(net, losses, ExampleLosses(losses, labels, logits, features=logits))
    weighted = objective.example_weights(
        net, losses, ExampleLosses(losses, labels, logits, features=logits, given_weights=given)
    )
    torch.testing.assert_close(weighted, plain * given)

    # no class normalisation: a row weighted 0 reaches neither the base steps nor the perturbed passes, so its label
    # changes neither θ nor the weighting net
    def fit(dataset: Dataset) -> SAMATrainer:
        args = sama_args(tmp_path, example_weight_column="w", max_steps=6, meta_weight_normalize=False)
        meta = token_dataset(16, seed=2).remove_columns(["clean_labels"])
        trainer = SAMATrainer(tiny_bert(dropout=0.0), args, dataset, meta_dataset=meta, data_collator=_collate)
        trainer.train()
        return trainer

    train = _weighted()
    first, second = fit(train), fit(_relabel_zero_weight_rows(train))
    assert first.meta_step_count == 3
    for a, b in ((first.model, second.model), (first.meta_model, second.meta_model)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    out = first.compute_example_weights(train, batch_size=8)
    weights, learned = np.asarray(out["weight"]), np.asarray(out["learned_weight"])
    assert np.all(weights[::3] == 0.0) and np.all(weights[1::3] > 0.0)
    # the two factors are reported apart: the given column and the net's own weights, whose product is the weight
    np.testing.assert_allclose(out["given_weight"], train["w"])
    np.testing.assert_allclose(weights, learned * np.asarray(train["w"]), rtol=1e-6)
    assert np.all(learned > 0.0) and np.ptp(learned) > 0.0
    untrained = SAMATrainer(tiny_bert(), sama_args(tmp_path), train, meta_dataset=train, data_collator=_collate)
    assert set(untrained.compute_example_weights(train, batch_size=8)) == {"loss", "weight"}  # no given weights
    unweighted = fit(train.map(lambda r: {"w": 1.0}))
    assert not torch.equal(
        next(iter(first.meta_model.state_dict().values())), next(iter(unweighted.meta_model.state_dict().values()))
    )
    with pytest.raises(ValueError, match="unset example_weight_column"):
        fit(train.remove_columns(["w"]))
