"""How much the labeling functions' votes tell about wrong majority-vote labels, learned from the clean set alone.

For each WRENCH folder and clean-set size K, a logistic regression is fit on the clean examples' vote features
(``sama_trainer.data.lf_agreement``: +1 / -1 / 0 per labeling function, against the row's majority vote) to predict
whether the majority vote is right (the clean examples' gold labels say), and scored on the training split by the
noise AUROC (gold training labels, as in the WRENCH recipe's diagnostics). It is a reference for what the weighting
net could learn from ``--lf_features`` with the same clean set, without meta learning::

    python recipes/lf_vote_probe.py --datasets youtube,sms,trec --clean_per_class 10,all --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from sama_trainer.data import lf_agreement, load_wrench, majority_vote, subsample_per_class
from sama_trainer.diagnostics import auroc


DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wrench"


def vote_features(split, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, m], majority vote right [n]) of the covered rows of ``split``, ties broken as WRENCH does."""
    votes = np.asarray(split["weak_labels"])
    mv, covered = majority_vote(votes, num_classes, tie_break="wrench")
    votes, mv, gold = votes[covered], mv[covered], np.asarray(split["label"])[covered]
    return lf_agreement(votes, mv), mv == gold


def probe(folder: Path, k: str, seed: int) -> float | None:
    """Noise AUROC on the training split of a logistic regression fit on the clean set (None: one outcome only)."""
    data = load_wrench(folder)
    clean = data["valid"] if k == "all" else subsample_per_class(data["valid"], int(k), seed=seed)
    x_clean, right_clean = vote_features(clean, data.num_classes)
    if right_clean.all() or not right_clean.any():
        return None
    model = LogisticRegression(max_iter=1000).fit(x_clean, right_clean)
    x_train, right_train = vote_features(data["train"], data.num_classes)
    return auroc(~right_train, -model.predict_proba(x_train)[:, 1])  # a low P(right) ranks a wrong label first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=str(DATA_ROOT), help="Folder holding the WRENCH dataset folders.")
    parser.add_argument("--datasets", default="youtube,sms,trec")
    parser.add_argument("--clean_per_class", default="10,all", help="Comma list of K (or 'all').")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of the clean-set draw (as the WRENCH recipe's).")
    args = parser.parse_args()
    print("| dataset | K | noise AUROC of the vote probe, per seed | mean |\n|---|---|---|---:|")
    for name in args.datasets.split(","):
        for k in args.clean_per_class.split(","):
            seeds = [0] if k == "all" else [int(s) for s in args.seeds.split(",")]
            scores = [probe(Path(args.data_root) / name, k, seed) for seed in seeds]
            shown = " / ".join("–" if s is None else f"{s:.3f}" for s in scores)
            valid = [s for s in scores if s is not None]
            print(f"| {name} | {k} | {shown} | {np.mean(valid):.3f} |" if valid else f"| {name} | {k} | {shown} | – |")


if __name__ == "__main__":
    main()
