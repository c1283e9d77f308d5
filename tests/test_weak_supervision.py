"""Tests for the weak-supervision data layer (loaders, majority vote, subsampling, synthetic data)."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from sama_trainer.data import (
    WeakSupervisionFormatError,
    apply_label_model,
    load_cosine,
    load_wrench,
    majority_vote,
    make_synthetic_weak_supervision,
    subsample_per_class,
    write_wrench_format,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_WRENCH = REPO_ROOT.parent / "shared" / "data" / "wrench"
REAL_COSINE = REPO_ROOT.parent / "shared" / "data" / "cosine"

LABELS = {"0": "alpha", "1": "beta", "2": "gamma"}
# id -> (gold, weak labels); 3 classes, 3 LFs.
TRAIN_ROWS = {
    "0": (0, [0, 0, -1]),  # clear majority: 0
    "1": (1, [1, -1, 2]),  # tie between 1 and 2
    "2": (2, [-1, -1, -1]),  # uncovered
    "3": (2, [2, 2, 1]),  # majority 2 despite a conflict
    "4": (0, [0, 1, 2]),  # three-way tie
    "5": (1, [-1, 1, -1]),  # single vote: 1
    "6": (0, [-1, -1, -1]),  # uncovered
}
TRAIN_L = np.array([wl for _, wl in TRAIN_ROWS.values()])
TIED = {1: {1, 2}, 4: {0, 1, 2}}  # row index -> tied classes


def _split(rows: dict, extra: dict | None = None) -> dict:
    return {
        i: {"label": y, "weak_labels": wl, "data": {"text": f"text {i}", **(extra or {})}}
        for i, (y, wl) in rows.items()
    }


def write_fixture(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "label.json").write_text(json.dumps(LABELS))
    (root / "train.json").write_text(json.dumps(_split(TRAIN_ROWS)))
    valid = _split({"10": (1, [1, 1, -1]), "11": (2, [-1, -1, -1])}, extra={"entity1": "e1", "span1": [0, 3]})
    (root / "valid.json").write_text(json.dumps(valid))
    (root / "test.json").write_text(json.dumps(_split({"20": (0, [0, -1, -1])})))
    (root / "labeled_ids.json").write_text(json.dumps({"labeled_ids": ["3", "5"], "lf_exemplar_ids": []}))
    return root


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "tiny")


# ---------------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------------


def test_load_wrench_fixture(fixture_dir: Path) -> None:
    data = load_wrench(fixture_dir)
    assert list(data.splits) == ["train", "valid", "test"]
    assert data.label_names == ["alpha", "beta", "gamma"]
    assert data.num_classes == 3 and data.num_lfs == 3
    assert data.labeled_ids == ["3", "5"]
    train = data["train"]
    assert train["id"] == list(TRAIN_ROWS)
    assert train["label"] == [y for y, _ in TRAIN_ROWS.values()]
    assert train["weak_labels"] == [wl for _, wl in TRAIN_ROWS.values()]
    assert train["text"] == [f"text {i}" for i in TRAIN_ROWS]
    # extra `data` fields become columns
    assert data["valid"]["entity1"] == ["e1", "e1"]
    assert data["valid"]["span1"] == [[0, 3], [0, 3]]
    assert "entity1" not in train.column_names


def test_load_wrench_missing_splits_are_skipped(fixture_dir: Path) -> None:
    (fixture_dir / "test.json").unlink()
    assert list(load_wrench(fixture_dir).splits) == ["train", "valid"]


def test_wrench_round_trip(fixture_dir: Path, tmp_path: Path) -> None:
    data = load_wrench(fixture_dir)
    again = load_wrench(write_wrench_format(data, tmp_path / "copy"))
    assert again.label_names == data.label_names
    assert again.labeled_ids == data.labeled_ids
    for split in data.splits:
        assert again[split].to_dict() == data[split].to_dict()


def test_missing_directory_and_files(tmp_path: Path, fixture_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*label.json"):
        load_wrench(missing)
    (fixture_dir / "label.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"label\.json"):
        load_wrench(fixture_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "label.json").write_text(json.dumps(LABELS))
    with pytest.raises(FileNotFoundError, match=r"train\.json"):
        load_wrench(empty)


def test_malformed_json_names_file(fixture_dir: Path) -> None:
    text = (fixture_dir / "valid.json").read_text()
    (fixture_dir / "valid.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"valid\.json") as err:
        load_wrench(fixture_dir)
    assert "Malformed JSON" in str(err.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((3, [0, 0, 0]), r"train\.json.*'5'.*gold label 3"),
        ((-1, [0, 0, 0]), r"train\.json.*'5'.*gold label -1"),
        ((1, [0, 3, 0]), r"train\.json.*'5'.*weak label 3"),
        ((1, [0, -2, 0]), r"train\.json.*'5'.*weak label -2"),
        ((1, [0, 0]), r"train\.json.*'5'.*2 weak labels.*3"),
    ],
)
def test_bad_rows_raise_with_file_id_value(fixture_dir: Path, row: tuple, message: str) -> None:
    rows = dict(TRAIN_ROWS, **{"5": row})
    (fixture_dir / "train.json").write_text(json.dumps(_split(rows)))
    with pytest.raises(WeakSupervisionFormatError, match=message):
        load_wrench(fixture_dir)


def test_lf_count_must_match_across_splits(fixture_dir: Path) -> None:
    (fixture_dir / "test.json").write_text(json.dumps(_split({"20": (0, [0, -1])})))
    with pytest.raises(ValueError, match=r"test\.json.*'20'.*2 weak labels.*3"):
        load_wrench(fixture_dir)


def test_bad_label_json(fixture_dir: Path) -> None:
    (fixture_dir / "label.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ValueError, match=r"label\.json.*without gaps"):
        load_wrench(fixture_dir)


# ---------------------------------------------------------------------------------------------------------------
# Majority vote
# ---------------------------------------------------------------------------------------------------------------


def test_majority_vote_abstain_ties() -> None:
    labels, covered = majority_vote(TRAIN_L, 3, tie_break="abstain")
    assert labels.tolist() == [0, -1, -1, 2, -1, 1, -1]
    assert covered.tolist() == [True, True, False, True, True, True, False]


def test_majority_vote_random_ties_seeded_within_tied_set() -> None:
    seen = {row: set() for row in TIED}
    for seed in range(40):
        labels, _ = majority_vote(TRAIN_L, 3, tie_break="random", seed=seed)
        # non-tied rows never change; uncovered rows stay -1
        assert labels[[0, 2, 3, 5, 6]].tolist() == [0, -1, 2, 1, -1]
        for row, classes in TIED.items():
            assert labels[row] in classes
            seen[row].add(int(labels[row]))
        # documented rule: one uniform draw per row, pick the floor(u * n_tied)-th tied class
        draws = np.random.default_rng(seed).random(len(TRAIN_L))
        for row, classes in TIED.items():
            assert labels[row] == sorted(classes)[int(draws[row] * len(classes))]
        again, _ = majority_vote(TRAIN_L, 3, tie_break="random", seed=seed)
        assert np.array_equal(labels, again)
    assert seen == TIED  # every tied class is reachable, nothing else is


def test_majority_vote_wrench_hash_tie_break() -> None:
    labels, _ = majority_vote(TRAIN_L, 3, tie_break="wrench")
    for row, classes in TIED.items():  # snorkel probs_to_preds(tie_break_policy="random")
        assert labels[row] == sorted(classes)[int(hashlib.sha1(str(row).encode()).hexdigest(), 16) % len(classes)]
    assert labels[[0, 2, 3, 5, 6]].tolist() == [0, -1, 2, 1, -1]


def test_majority_vote_soft() -> None:
    probs, covered = majority_vote(TRAIN_L, 3, soft=True)
    assert probs.shape == (7, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [1, 0, 0])
    np.testing.assert_allclose(probs[1], [0, 0.5, 0.5])
    np.testing.assert_allclose(probs[2], [1 / 3] * 3)  # uncovered -> uniform, as WRENCH
    np.testing.assert_allclose(probs[3], [0, 1 / 3, 2 / 3])
    assert covered.tolist() == [True, True, False, True, True, True, False]


def test_majority_vote_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outside"):
        majority_vote(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match="2-D"):
        majority_vote(np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="tie_break"):
        majority_vote(TRAIN_L, 3, tie_break="first")


def test_apply_label_model(fixture_dir: Path) -> None:
    train = load_wrench(fixture_dir)["train"]
    kept = apply_label_model(train, 3, tie_break="abstain")
    assert kept["id"] == ["0", "3", "5"] and kept["weak_label"] == [0, 2, 1]

    soft = apply_label_model(train, 3, soft=True, seed=3)
    assert soft["id"] == ["0", "1", "3", "4", "5"]  # uncovered rows dropped, ties resolved
    expected, _ = majority_vote(TRAIN_L[[0, 1, 3, 4, 5]], 3, seed=3)
    assert soft["weak_label"] == expected.tolist()
    np.testing.assert_allclose(np.array(soft["weak_label_probs"]).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(soft["weak_label_probs"][1], [0, 0.5, 0.5])

    full = apply_label_model(train, 3, drop_uncovered=False)
    assert len(full) == 7 and full["weak_label"][2] == -1 and full["weak_label"][6] == -1
    assert "weak_label_probs" not in full.column_names
    with pytest.raises(ValueError, match="label model"):
        apply_label_model(train, 3, method="snorkel")


# ---------------------------------------------------------------------------------------------------------------
# Subsampling
# ---------------------------------------------------------------------------------------------------------------


def test_subsample_per_class() -> None:
    labels = [0] * 10 + [1] * 6 + [2] * 2 + [-1] * 3
    ds = Dataset.from_dict({"id": [str(i) for i in range(len(labels))], "label": labels})
    sub = subsample_per_class(ds, k=3, seed=0)
    assert Counter(sub["label"]) == {0: 3, 1: 3, 2: 2}  # class 2 has fewer than k: all kept; -1 never
    assert sub["id"] == subsample_per_class(ds, k=3, seed=0)["id"]
    assert sub["id"] != subsample_per_class(ds, k=3, seed=1)["id"]
    assert [int(i) for i in sub["id"]] == sorted(int(i) for i in sub["id"])  # original order kept
    assert Counter(subsample_per_class(ds, k=100, seed=0)["label"]) == {0: 10, 1: 6, 2: 2}
    assert len(subsample_per_class(ds, k=0, seed=0)) == 0


# ---------------------------------------------------------------------------------------------------------------
# COSINE and synthetic data
# ---------------------------------------------------------------------------------------------------------------


def test_load_cosine_single_lf(tmp_path: Path) -> None:
    root = tmp_path / "IMDB"
    root.mkdir()
    items = [{"text": f"t{i}", "label": i % 2, "major": m, "len": 1} for i, m in enumerate([1, -1, 0, 0])]
    (root / "dev_data.json").write_text(json.dumps(items))
    data = load_cosine(root)
    assert list(data.splits) == ["valid"] and data.label_names == ["Negative", "Positive"]
    valid = data["valid"]
    assert valid["weak_labels"] == [[1], [-1], [0], [0]] and valid["label"] == [0, 1, 0, 1]
    labels, covered = majority_vote(np.array(valid["weak_labels"]), 2)
    assert labels.tolist() == [1, -1, 0, 0] and covered.tolist() == [True, False, True, True]
    items[2]["major"] = 2
    (root / "dev_data.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"dev_data\.json.*'2'.*major\) 2"):
        load_cosine(root)


def test_synthetic_deterministic_and_noisy(tmp_path: Path) -> None:
    a = make_synthetic_weak_supervision(num_train=1000, num_valid=50, num_test=300, num_classes=3, seed=0)
    b = make_synthetic_weak_supervision(num_train=1000, num_valid=50, num_test=300, num_classes=3, seed=0)
    c = make_synthetic_weak_supervision(num_train=1000, num_valid=50, num_test=300, num_classes=3, seed=1)
    assert a["train"].to_dict() == b["train"].to_dict()
    assert a["train"]["text"] != c["train"]["text"]
    assert [len(a[s]) for s in ("train", "valid", "test")] == [1000, 50, 300]
    assert a.num_classes == 3 and a.num_lfs == len(a.lf_names) == 8

    train = a["train"]
    y = np.array(train["label"])
    labels, covered = majority_vote(np.array(train["weak_labels"]), 3, seed=0)
    mv_acc = (labels[covered] == y[covered]).mean()
    assert 0.65 <= mv_acc <= 0.85, mv_acc
    assert 0.75 <= covered.mean() <= 0.95

    # The real signal is learnable from the noisy labels: naive Bayes on words, trained on MV labels.
    noisy = apply_label_model(train, 3)
    vocab = {w: j for j, w in enumerate(sorted({w for t in a["train"]["text"] for w in t.split()}))}
    counts = np.ones((3, len(vocab)))
    for text, lab in zip(noisy["text"], noisy["weak_label"]):
        for w in text.split():
            counts[lab, vocab[w]] += 1
    log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
    test = a["test"]
    preds = [int(np.argmax(sum(log_p[:, vocab[w]] for w in t.split() if w in vocab))) for t in test["text"]]
    nb_acc = (np.array(preds) == np.array(test["label"])).mean()
    assert nb_acc > mv_acc + 0.05 and nb_acc > 0.85, (nb_acc, mv_acc)

    # WRENCH-format writer round trip through the loader.
    back = load_wrench(write_wrench_format(a, tmp_path / "synth"))
    assert back.label_names == a.label_names
    for split in a.splits:
        assert back[split].to_dict() == a[split].to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Real data smoke tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (REAL_WRENCH / "youtube").is_dir(), reason="real WRENCH youtube data not available")
def test_real_youtube() -> None:
    data = load_wrench(REAL_WRENCH / "youtube")
    assert {s: len(d) for s, d in data.splits.items()} == {"train": 1686, "valid": 120, "test": 250}
    assert data.label_names == ["HAM", "SPAM"] and data.num_lfs == 10
    L = np.array(data["train"]["weak_labels"])
    labels, covered = majority_vote(L, 2, tie_break="wrench")
    coverage = covered.mean()
    assert 0.8 <= coverage <= 0.95, coverage
    # SOURCES.md: coverage of the 1586 WRENCH entries (without the 100 labeled examples) is 0.889
    assert round(covered[:1586].mean(), 3) == 0.889
    y = np.array(data["train"]["label"])
    assert 0.75 <= (labels[covered] == y[covered]).mean() <= 0.95
    assert len(apply_label_model(data["train"], 2)) == covered.sum()
    assert set(data.labeled_ids) == {str(i) for i in range(1586, 1686)}


@pytest.mark.skipif(not (REAL_COSINE / "IMDB").is_dir(), reason="real COSINE IMDB data not available")
def test_real_cosine_imdb() -> None:
    data = load_cosine(REAL_COSINE / "IMDB")
    assert {s: len(d) for s, d in data.splits.items()} == {"valid": 2500, "test": 2500, "unlabeled": 2485}
    _, covered = majority_vote(np.array(data["valid"]["weak_labels"]), 2)
    assert round(covered.mean(), 3) == 0.881  # SOURCES.md
