"""Per-example features for the weighting net (``meta_feature_column``), e.g. the labeling functions' votes."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import pad_batch, sama_args, tiny_bert, token_dataset

from sama_trainer import MetaWeightNet, SAMATrainer, load_meta_model
from sama_trainer.data import (
    LF_AGREEMENT_COLUMN,
    add_lf_agreement,
    lf_agreement,
    make_synthetic_weak_supervision,
)
from sama_trainer.data.preparation import prepare_task
from sama_trainer.pretrained import build_word_tokenizer


def test_lf_agreement_is_plus_one_minus_one_or_zero_per_vote():
    weak = np.array([[0, 1, -1], [2, 2, 2], [-1, -1, 1]])
    labels = np.array([0, 1, 1])
    expected = np.array([[1, -1, 0], [-1, -1, -1], [0, 0, 1]], dtype=np.float32)
    np.testing.assert_array_equal(lf_agreement(weak, labels), expected)
    with pytest.raises(ValueError, match=r"\[n, m\]"):
        lf_agreement(weak, labels[:2])


def test_add_lf_agreement_reads_soft_labels_by_their_argmax_and_replaces_the_column():
    ds = Dataset.from_dict({"labels": [[0.9, 0.1], [0.2, 0.8]], LF_AGREEMENT_COLUMN: [[5.0], [5.0]]})
    out = add_lf_agreement(ds, [[0, -1], [0, 1]])
    assert out[LF_AGREEMENT_COLUMN] == [[1.0, 0.0], [-1.0, 1.0]]


def _plain_and_featured(num_features: int, seed: int = 0) -> tuple[MetaWeightNet, MetaWeightNet]:
    torch.manual_seed(seed)
    plain = MetaWeightNet(hidden_size=8, normalize=True, center=True)
    featured = MetaWeightNet(hidden_size=8, normalize=True, center=True, num_features=num_features)
    with torch.no_grad():
        featured.net[0].weight.zero_()
        featured.net[0].weight[:, :1] = plain.net[0].weight
        featured.net[0].bias.copy_(plain.net[0].bias)
        featured.net[2].load_state_dict(plain.net[2].state_dict())
    return plain, featured


def test_weight_net_with_silent_feature_inputs_is_the_plain_net_and_otherwise_reads_them():
    plain, featured = _plain_and_featured(num_features=3)
    losses = torch.rand(10) * 3
    features = torch.randint(-1, 2, (10, 3)).float()
    torch.testing.assert_close(featured(losses, None, features), plain(losses))
    with torch.no_grad():
        featured.net[0].weight[:, 1:].normal_()
    moved = featured(losses, None, features)
    assert not torch.allclose(moved, plain(losses))
    # the weights of examples with equal losses differ only through their features
    same_loss = torch.full((4,), 0.7)
    rows = torch.tensor([[1.0, 1, 1], [1, 1, 1], [-1, -1, 0], [0, 0, 1]])
    weights = featured(same_loss, None, rows)
    assert weights[0] == weights[1] and not torch.isclose(weights[0], weights[2])
    with pytest.raises(ValueError, match="meta_feature_column"):
        featured(losses)
    with pytest.raises(ValueError, match="width 2"):
        featured(losses, None, features[:, :2])


def test_weight_net_with_features_saves_and_loads_and_an_older_saved_net_still_loads(tmp_path):
    _, featured = _plain_and_featured(num_features=4)
    featured.save_pretrained(tmp_path / "new")
    loaded = load_meta_model(str(tmp_path / "new"))
    assert isinstance(loaded, MetaWeightNet) and loaded.num_features == 4
    losses, features = torch.rand(6), torch.randn(6, 4)
    torch.testing.assert_close(loaded(losses, None, features), featured(losses, None, features))
    plain = MetaWeightNet(hidden_size=8)
    plain.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("num_features")  # as saved before the argument existed
    config_path.write_text(json.dumps(config))
    old = load_meta_model(str(tmp_path / "old"))
    assert isinstance(old, MetaWeightNet) and old.num_features == 0
    torch.testing.assert_close(old(losses), plain(losses))


class RecordingWeightNet(MetaWeightNet):
    """Records the per-example features it is given."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[torch.Tensor] = []

    def forward(self, losses, logits=None, features=None):
        self.seen.append(features)
        return super().forward(losses, logits, features)


def _train_with_features(n: int = 48, width: int = 3) -> Dataset:
    train = token_dataset(n, noise=0.3, seed=1)
    g = torch.Generator().manual_seed(5)
    flipped = torch.tensor(train["labels"]) != torch.tensor(train["clean_labels"])
    features = torch.randn(n, width, generator=g)
    features[:, 0] = torch.where(flipped, -1.0, 1.0)  # the first feature tells a wrong label
    train = train.remove_columns(["clean_labels"]).add_column("example_id", list(range(n)))
    return train.add_column("votes", features.tolist())


def _collate(examples: list[dict]) -> dict:
    batch = pad_batch(examples)
    for key in ("example_id", "votes"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples])
    return batch


def test_trainer_gives_the_feature_column_to_the_weight_net_and_not_to_the_model(tmp_path):
    train, meta = _train_with_features(), token_dataset(16, seed=2).remove_columns(["clean_labels"])
    args = sama_args(tmp_path, meta_feature_column="votes", max_steps=8, meta_weight_normalize=True)
    net = RecordingWeightNet(hidden_size=8, normalize=True, num_features=3)
    first_layer = net.net[0].weight.detach().clone()
    # the model (a BERT) would raise on a 'votes' argument: the objective keeps the column away from it
    trainer = SAMATrainer(
        model=tiny_bert(), args=args, train_dataset=train, meta_dataset=meta, meta_model=net, data_collator=_collate
    )
    trainer.train()
    assert trainer.meta_step_count == 4
    votes = torch.tensor(train["votes"])
    base_calls = [f for f in net.seen if f is not None]
    assert len(base_calls) == len(net.seen) >= 8 + 2 * 4  # every base step and both perturbed passes of each meta step
    for features in base_calls:  # each row is a training example's own feature row
        assert features.shape[-1] == 3 and all((row == votes).all(-1).any() for row in features)
    # the features' input weights receive meta-gradients
    assert not torch.equal(net.net[0].weight[:, 1:], first_layer[:, 1:])
    weights = trainer.compute_example_weights(train, batch_size=16)["weight"]
    assert len(weights) == len(train) and np.isfinite(weights).all()


def test_default_weight_net_gets_the_column_width_and_bad_settings_name_the_fix(tmp_path):
    train, meta = _train_with_features(width=5), token_dataset(16, seed=2).remove_columns(["clean_labels"])
    args = sama_args(tmp_path, meta_feature_column="votes")
    trainer = SAMATrainer(model=tiny_bert(), args=args, train_dataset=train, meta_dataset=meta, data_collator=_collate)
    assert isinstance(trainer.meta_model, MetaWeightNet) and trainer.meta_model.num_features == 5
    assert trainer.meta_model.net[0].in_features == 6
    with pytest.raises(ValueError, match="add_lf_agreement"):
        SAMATrainer(
            model=tiny_bert(),
            args=sama_args(tmp_path, meta_feature_column="lf_votes"),
            train_dataset=train,
            meta_dataset=meta,
        )
    with pytest.raises(ValueError, match="does not reweight"):
        sama_args(tmp_path, meta_feature_column="votes", meta_objective="correct")
    both = SAMATrainer(
        model=tiny_bert(),
        args=sama_args(tmp_path, meta_feature_column="votes", meta_objective="reweight+correct"),
        train_dataset=train,
        meta_dataset=meta,
        data_collator=_collate,
    )
    assert both.meta_model["reweight"].num_features == 5


def test_prepare_task_adds_the_votes_against_each_rows_training_label():
    data = make_synthetic_weak_supervision(num_train=60, num_valid=20, num_test=10, num_classes=3, seed=4)
    tokenizer = build_word_tokenizer(list(data["train"]["text"]) + list(data["valid"]["text"]))
    plain = prepare_task(data, "syn", tokenizer, max_length=16, seed=0)
    assert LF_AGREEMENT_COLUMN not in plain.train_tok.column_names
    task = prepare_task(data, "syn", tokenizer, max_length=16, lf_features=True, seed=0)
    expected_train = lf_agreement(np.array(task.train["weak_labels"]), np.array(task.train["weak_label"]))
    np.testing.assert_array_equal(np.array(task.train_tok[LF_AGREEMENT_COLUMN]), expected_train)
    assert (expected_train.max(axis=1) == 1).all()  # the majority vote agrees with at least one LF on every row
    expected_clean = lf_agreement(np.array(task.clean["weak_labels"]), np.array(task.clean["label"]))
    np.testing.assert_array_equal(np.array(task.clean_as_train_tok[LF_AGREEMENT_COLUMN]), expected_clean)
    assert (
        LF_AGREEMENT_COLUMN not in task.clean_tok.column_names
        and LF_AGREEMENT_COLUMN not in task.test_tok.column_names
    )


def _write_split(path, rows: list[tuple[int, list[int]]]) -> None:
    split = {
        str(i): {"label": y, "weak_labels": votes, "data": {"text": f"t{i}"}} for i, (y, votes) in enumerate(rows)
    }
    path.write_text(json.dumps(split))


def test_vote_probe_finds_a_labeling_function_that_is_always_wrong(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "lf_vote_probe", Path(__file__).resolve().parents[1] / "recipes" / "lf_vote_probe.py"
    )
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    # LF 0 votes the true class, LF 1 the other class; a row that only LF 1 covers gets a wrong majority vote
    rows = [(y, [y, -1]) for y in (0, 1)] * 6 + [(y, [-1, 1 - y]) for y in (0, 1)] * 4
    folder = tmp_path / "one_bad_lf"
    folder.mkdir()
    (folder / "label.json").write_text(json.dumps({"0": "a", "1": "b"}))
    for split in ("train", "valid", "test"):
        _write_split(folder / f"{split}.json", rows)
    assert probe.probe(folder, "all", seed=0) == 1.0
    # a clean set whose gold labels say the opposite teaches the opposite ranking
    _write_split(folder / "valid.json", [(1 - y, votes) for y, votes in rows])
    assert probe.probe(folder, "all", seed=0) == 0.0
    _write_split(folder / "valid.json", rows[:12])  # every clean majority vote right: nothing to learn
    assert probe.probe(folder, "all", seed=0) is None
    # --weights: a --vote_prior run's weight file; the net's own factor is scored apart from the prior's
    _write_split(folder / "valid.json", rows)
    wrong = np.array([False] * 12 + [True] * 8)  # the rows only the bad labeling function covers
    learned, given = np.where(wrong, 2.0, 0.5), np.where(wrong, 0.1, 0.9)
    run = tmp_path / "example_weights.jsonl"
    lines = [
        {"id": str(i), "weight": n * g, "learned_weight": n, "given_weight": g}
        for i, (n, g) in enumerate(zip(learned, given))
    ]
    run.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cells = [c.strip() for c in probe.weights_by_vote_conflict(folder, [str(run)])[0].strip("|").split("|")]
    assert cells[1] == "1.000"  # the product ranks the wrong rows last (the prior's 0.1 outweighs the net's 2.0)
    assert cells[4:] == ["0.000", "-1.00"]  # the net alone ranks them first, against the prior
