"""Weight diagnostics: AUROC against sklearn and hand computations, within-class AUROC, class-level relabelling."""

import numpy as np
import pytest

from sama_trainer.diagnostics import auroc, weight_diagnostics, whole_class_relabels, within_class_auroc


def test_auroc_matches_hand_computation_and_sklearn():
    # positives score 3, 2 and negatives 2, 1: pairs (3>2), (3>1), (2=2 counts half), (2>1) -> 3.5 / 4
    assert auroc(np.array([1, 1, 0, 0], bool), np.array([3.0, 2.0, 2.0, 1.0])) == pytest.approx(3.5 / 4)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        positive = rng.random(300) < 0.3
        score = np.round(rng.normal(size=300) + positive, 1)  # rounded: many ties
        assert auroc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    assert auroc(np.ones(3, bool), np.arange(3.0)) is None and auroc(np.zeros(3, bool), np.arange(3.0)) is None


def test_within_class_auroc_separates_flagging_from_class_weights():
    # class 0 (4 rows): scores rank its one wrong row first (AUROC 1); class 1 (3 rows): ranked last (AUROC 0);
    # class 2: all right, left out. Size-weighted mean 4/7 (an unweighted mean would give 1/2).
    wrong = np.array([1, 0, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
    score = np.array([0.9, 0.8, 0.1, 0.3, 0.9, 0.95, 0.2, 0.0, 0.5])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    assert within_class_auroc(wrong, score, classes) == pytest.approx((4 * 1.0 + 3 * 0.0) / 7)
    # a per-class score offset moves the overall AUROC but not the within-class one
    shifted = score + 10.0 * (classes == 1)
    assert within_class_auroc(wrong, shifted, classes) == within_class_auroc(wrong, score, classes)
    assert auroc(wrong, shifted) != auroc(wrong, score)
    assert within_class_auroc(wrong[7:], score[7:], classes[7:]) is None


def test_whole_class_relabels_names_only_class_level_relabelling():
    names = ["a", "b", "c"]
    weak = np.array([0] * 10 + [1] * 10 + [2] * 4)
    corrected = np.array([2] * 10 + [1] * 5 + [0] * 5 + [2] * 4)  # a -> c entirely; half of b moved: not class-level
    assert whole_class_relabels(weak, corrected, names) == {"a": "c"}
    corrected[0] = 0  # 90% of a still goes to c
    assert whole_class_relabels(weak, corrected, names) == {"a": "c"}
    corrected[1] = 1  # 80%: below the share
    assert whole_class_relabels(weak, corrected, names) == {}
    assert whole_class_relabels(weak, weak.copy(), names) == {}


def test_weight_diagnostics_by_hand():
    given = np.array([0, 0, 1, 1, 1])
    gold = np.array([0, 1, 1, 1, 0])  # rows 1 and 4 carry wrong labels
    outputs = {
        "weight": [1.0, 0.2, 0.9, 0.8, 0.1],
        "corrected_label": [0, 1, 1, 1, 1],
        "corrected_probs": [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55]],
    }
    out = weight_diagnostics(outputs, given, gold, ["neg", "pos"])
    assert out["noise_auroc"] == 1.0  # both wrong rows have the lowest weights
    assert out["weight_mean_by_given_class"] == pytest.approx({"neg": 0.6, "pos": 0.6})
    assert out["weight_mean_wrong"] == pytest.approx(0.15) and out["weight_mean_correct"] == pytest.approx(0.9)
    assert out["corrected_changed"] == pytest.approx(1 / 5)  # row 1: 0 -> 1
    assert out["corrected_accuracy"] == pytest.approx(4 / 5)  # row 4 stays wrong
    # probability kept on the given label: rows 1 (0.4) and 4 (0.55) lowest of their classes -> flagged
    assert out["correction_auroc"] == pytest.approx(auroc(gold != given, -np.array([0.9, 0.4, 0.8, 0.7, 0.55])))
    assert out["relabelled_classes"] == {}
    assert "learned_weight_noise_auroc" not in out
    # with fixed given weights, the net's own factor is scored apart: here it ranks the wrong rows highest
    outputs["learned_weight"] = [0.5, 2.0, 0.6, 0.7, 1.5]
    out = weight_diagnostics(outputs, given, gold, ["neg", "pos"])
    assert out["learned_weight_noise_auroc"] == 0.0 and out["noise_auroc"] == 1.0
    assert out["learned_weight_noise_auroc_within_class"] == 0.0
