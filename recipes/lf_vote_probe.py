"""How much the labeling functions' votes tell about wrong majority-vote labels, learned from the clean set alone.

For each WRENCH folder and clean-set size K, the vote prior (``sama_trainer.data.fit_vote_prior``: a logistic
regression fit on the clean examples' vote features, +1 / -1 / 0 per labeling function against the row's majority
vote, to predict whether the majority vote is right) is scored on the training split by the noise AUROC (gold
training labels, as in the WRENCH recipe's diagnostics). It is a reference for what the weighting net could learn
from ``--lf_features`` with the same clean set, without meta learning, and what ``--vote_prior`` weights by::

    python recipes/lf_vote_probe.py --datasets youtube,sms,trec --clean_per_class 10,all --seeds 0,1,2

With ``--weights`` it reads the ``example_weights.jsonl`` of WRENCH recipe runs instead and says what their weighting
nets learned about the votes: the mean weight of the training rows on which some labeling function voted against
the majority vote, and of the others, next to how often each group's majority vote is wrong (for ``--vote_prior`` runs
also the noise AUROC of the net's own factor of the weight, and its correlation with the prior)::

    python recipes/lf_vote_probe.py --dataset trec \\
        --weights outputs/wrench_fold0_lf/trec/kall/sama_rc_clean/seed*/example_weights.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sama_trainer.data import fit_vote_prior, load_wrench, subsample_per_class, vote_features
from sama_trainer.diagnostics import auroc


DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wrench"


def probe(folder: Path, k: str, seed: int) -> float | None:
    """Noise AUROC on the training split of the vote prior fit on the clean set (None: the clean set's majority votes
    are all right or all wrong)."""
    data = load_wrench(folder)
    clean = data["valid"] if k == "all" else subsample_per_class(data["valid"], int(k), seed=seed)
    try:
        prior = fit_vote_prior(clean, data.num_classes)
    except ValueError:
        return None
    x_train, right_train, _ = vote_features(data["train"], data.num_classes)
    return auroc(~right_train, -prior(x_train))  # a low P(right) ranks a wrong label first


def weights_by_vote_conflict(folder: Path, weights_files: list[str]) -> list[str]:
    """Table rows: each run's noise AUROC and its mean weight on training rows with and without a dissenting vote."""
    data = load_wrench(folder)
    features, right, ids = vote_features(data["train"], data.num_classes)
    wrong, dissent = ~right, (features < 0).any(axis=1)
    return [_conflict_row(path, list(ids), wrong, dissent) for path in weights_files]


def _conflict_row(weights_file: str, ids: list[str], wrong: np.ndarray, dissent: np.ndarray) -> str:
    with open(weights_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if [r["id"] for r in rows] != ids:
        raise ValueError(f"{weights_file}: its rows are not the covered training rows of the dataset")
    w = np.array([r["weight"] for r in rows])
    noise_auroc = auroc(wrong, -w)
    learned = "– | –"
    if "learned_weight" in rows[0]:  # a --vote_prior run: the weighting net's own factor of the weight
        net, given = np.array([r["learned_weight"] for r in rows]), np.array([r["given_weight"] for r in rows])
        learned = f"{auroc(wrong, -net):.3f} | {np.corrcoef(net, given)[0, 1]:+.2f}"
    return (
        f"| {weights_file} | {noise_auroc:.3f} | {w[dissent].mean():.2f} ({wrong[dissent].mean():.0%} wrong) | "
        f"{w[~dissent].mean():.2f} ({wrong[~dissent].mean():.0%} wrong) | {learned} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=str(DATA_ROOT), help="Folder holding the WRENCH dataset folders.")
    parser.add_argument("--datasets", default="youtube,sms,trec")
    parser.add_argument("--clean_per_class", default="10,all", help="Comma list of K (or 'all').")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of the clean-set draw (as the WRENCH recipe's).")
    parser.add_argument("--dataset", default=None, help="With --weights: the dataset the runs trained on.")
    parser.add_argument("--weights", nargs="*", default=None, help="example_weights.jsonl files of recipe runs.")
    args = parser.parse_args()
    if args.weights:
        if not args.dataset:
            parser.error("--weights needs --dataset (the WRENCH folder name the runs trained on)")
        print(
            "| run | noise AUROC | mean weight, rows with a dissenting vote | the other rows | the net's factor alone "
            "(--vote_prior runs): noise AUROC | its correlation with the prior |\n|---|---:|---:|---:|---:|---:|"
        )
        print("\n".join(weights_by_vote_conflict(Path(args.data_root) / args.dataset, args.weights)))
        return
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
