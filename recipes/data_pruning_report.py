"""The report of a data-pruning sweep (``recipes/data_pruning.py``): table, plot and scoring cost.

    python recipes/data_pruning_report.py outputs/pruning/agnews --dataset agnews

Reads every ``runs/**/results.json`` and ``scores/*/seed*/scoring.json`` under the folder and writes
``table.md`` (test accuracy, method × keep fraction, mean ± sample std over seeds, per budget; SAMA minus each
baseline; how alike the scores and kept sets are), ``accuracy_vs_keep.png`` and ``cost.md`` (time of each scoring
run, median over seeds), and returns the markdown.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sama_trainer.pruning import keep_indices


BUDGETS = {"epochs": "same epochs as the full pool", "steps": "same optimizer steps as the full pool"}


def collect(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/**/results.json"))]


def cells(rows: list[dict[str, Any]], budget: str) -> dict[tuple[str, float], list[float]]:
    """Test accuracies per (method, keep fraction) of one budget; the full-pool runs count for every method."""
    out: dict[tuple[str, float], list[float]] = defaultdict(list)
    methods = {r["method"] for r in rows if r["method"] != "full"}
    for r in rows:
        if r["method"] == "full":
            for m in methods:
                out[(m, 1.0)].append(r["test_accuracy"])
        elif r["budget"] == budget:
            out[(r["method"], r["keep_fraction"])].append(r["test_accuracy"])
    return out


def _mean_std(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    std = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
    return f"{v.mean():.1f}{std} (n={len(v)})"


def markdown_table(rows: list[dict[str, Any]], budget: str) -> str:
    acc = cells(rows, budget)
    methods = sorted({m for m, _ in acc})
    fractions = sorted({f for _, f in acc}, reverse=True)
    lines = ["| method | " + " | ".join(f"keep {f:g}" for f in fractions) + " |"]
    lines.append("|---|" + "---|" * len(fractions))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_mean_std(acc[(m, f)]) if acc.get((m, f)) else "–" for f in fractions))
        lines[-1] += " |"
    if "sama" in methods:
        for other in [m for m in methods if m != "sama"]:
            diffs = []
            for f in fractions:
                a, b = acc.get(("sama", f)), acc.get((other, f))
                if not a or not b or f == 1.0:
                    diffs.append("–")
                    continue
                spread = 100 * max(np.std(a, ddof=1) if len(a) > 1 else 0.0, np.std(b, ddof=1) if len(b) > 1 else 0.0)
                diffs.append(f"{100 * (np.mean(a) - np.mean(b)):+.1f} (spread {spread:.1f})")
            lines.append(f"| sama − {other} | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def cost_table(root: Path) -> str:
    timings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.glob("scores/*/seed*/scoring.json")):
        t = json.loads(path.read_text())
        if not t.get("resumed"):
            timings[t["method"]].append(t)
    if not timings:
        return "no scoring runs yet"
    ref = "el2n" if "el2n" in timings else sorted(timings)[0]
    ref_wall = np.median([t["train_wall_s"] for t in timings[ref]])
    ref_cpu = np.median([t["train_cpu_s"] for t in timings[ref]])
    lines = [
        f"| scores | runs | wall s (median) | CPU s (median) | wall / {ref} | CPU / {ref} |",
        "|---|---|---|---|---|---|",
    ]
    for method, ts in sorted(timings.items()):
        wall, cpu = np.median([t["train_wall_s"] for t in ts]), np.median([t["train_cpu_s"] for t in ts])
        lines.append(
            f"| {method} | {len(ts)} | {wall:.0f} | {cpu:.0f} | {wall / ref_wall:.2f} | {cpu / ref_cpu:.2f} |"
        )
    return "\n".join(lines) + "\n\n`loss` scores come from the EL2N run (same cost); `random` costs nothing."


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable")  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def _score_files(root: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Every score file's columns as arrays indexed by example id: ``{method: {seed: {column: values}}}``."""
    scored: dict[str, dict[str, dict[str, np.ndarray]]] = defaultdict(dict)
    for path in sorted(root.glob("scores/*/seed*/scores.jsonl")):
        rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["example_id"])
        columns = [c for c in rows[0] if c not in ("text", "rank", "example_id")]
        scored[path.parent.parent.name][path.parent.name] = {c: np.array([r[c] for r in rows]) for c in columns}
    return scored


def agreement_table(root: Path, fractions: list[float], stratify: bool) -> str:
    """How alike the scores are: Spearman rank correlation with the SAMA scores and the share of the SAMA-kept
    examples that a method keeps too, mean over the seeds both were scored with; and how the SAMA score relates to
    the loss and eval-mode weight of each example at the end of its scoring run."""
    scored = _score_files(root)
    if "sama" not in scored:
        return "no SAMA scores yet"
    sama = scored["sama"]
    fractions = sorted((f for f in fractions if f < 1.0), reverse=True)
    head = "| scores | seeds | Spearman with sama | " + " | ".join(f"kept with sama at {f:g}" for f in fractions)
    lines = [head + " |", "|---" * (3 + len(fractions)) + "|"]
    for method in sorted(m for m in scored if m != "sama"):
        seeds = sorted(set(scored[method]) & set(sama))
        if not seeds:
            continue
        corr = np.mean([_rank_correlation(sama[s]["score"], scored[method][s]["score"]) for s in seeds])
        shares = []
        for f in fractions:
            overlap = []
            for s in seeds:
                labels = sama[s]["label"] if stratify else None
                kept = set(keep_indices(sama[s]["score"], f, labels=labels).tolist())
                theirs = keep_indices(scored[method][s]["score"], f, labels=labels).tolist()
                overlap.append(len(kept & set(theirs)) / len(kept))
            shares.append(f"{np.mean(overlap):.3f}")
        lines.append(f"| {method} | {len(seeds)} | {corr:+.3f} | " + " | ".join(shares) + " |")
    text = "\n".join(lines) + "\n\nTwo independent random selections share the kept fraction itself on average."
    columns = (
        ("draw_weight", "mean weight when drawn"),
        ("final_loss", "loss at the end of its scoring run"),
        ("final_weight", "eval-mode weight at the end of its scoring run"),
    )
    for column, what in columns:
        seeds = [s for s in sama if column in sama[s]]
        if seeds:
            corr = np.mean([_rank_correlation(sama[s]["score"], sama[s][column]) for s in seeds])
            text += f" SAMA score vs each example's {what}: Spearman {corr:+.3f}"
            text += f" (mean over {len(seeds)} seed(s))."
    return text


def _within_class_correlation(a: np.ndarray, b: np.ndarray, labels: np.ndarray | None) -> float:
    if labels is None:
        return _rank_correlation(a, b)
    parts = [(labels == c) for c in np.unique(labels)]
    return float(np.mean([_rank_correlation(a[m], b[m]) for m in parts if m.sum() > 2]))


def reproducibility_table(root: Path, fractions: list[float], stratify: bool) -> str:
    """How much of each score's ranking another seed reproduces: the Spearman correlation of two seeds' scores
    (within each class when the kept sets are stratified) and the share of one seed's kept examples the other
    seed keeps too, mean over every pair of seeds."""
    fractions = sorted((f for f in fractions if f < 1.0), reverse=True)
    head = "| scores | seed pairs | Spearman between seeds | " + " | ".join(
        f"kept by both at {f:g}" for f in fractions
    )
    lines = [head + " |", "|---" * (3 + len(fractions)) + "|"]
    for method, by_seed in sorted(_score_files(root).items()):
        seeds = sorted(by_seed)
        pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
        if not pairs:
            continue
        corr, shares = [], {f: [] for f in fractions}
        for a, b in pairs:
            labels = by_seed[a]["label"] if stratify else None
            corr.append(_within_class_correlation(by_seed[a]["score"], by_seed[b]["score"], labels))
            for f in fractions:
                kept = set(keep_indices(by_seed[a]["score"], f, labels=labels).tolist())
                theirs = keep_indices(by_seed[b]["score"], f, labels=labels).tolist()
                shares[f].append(len(kept & set(theirs)) / len(kept))
        cells = " | ".join(f"{np.mean(shares[f]):.3f}" for f in fractions)
        lines.append(f"| {method} | {len(pairs)} | {np.mean(corr):+.3f} | {cells} |")
    if len(lines) == 2:
        return "one seed per score so far"
    note = "Random scores share the kept fraction itself; a score that ranks by a property of the example shares more."
    return "\n".join(lines) + "\n\n" + note


def plot(rows: list[dict[str, Any]], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rows)] or ["epochs"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.4), sharey=True, squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        acc = cells(rows, budget)
        for method in sorted({m for m, _ in acc}):
            fractions = sorted(f for m, f in acc if m == method)
            means = [100 * np.mean(acc[(method, f)]) for f in fractions]
            stds = [100 * np.std(acc[(method, f)], ddof=1) if len(acc[(method, f)]) > 1 else 0 for f in fractions]
            ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_title(f"{dataset}: {BUDGETS[budget]}", fontsize=9)
        ax.set_xlabel("fraction of training examples kept")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


def write_report(root: Path, dataset: str, fractions: list[float] | None = None, stratify: bool = True) -> str:
    rows = collect(root)
    if not rows:
        return f"no results under {root}"
    parts = [f"## {dataset}: test accuracy (%), mean ± std over seeds"]
    for budget in BUDGETS:
        if any(r["budget"] == budget for r in rows) or budget == "epochs":
            parts += [f"### {BUDGETS[budget]}", markdown_table(rows, budget)]
    parts += ["### scoring cost", cost_table(root)]
    fractions = fractions or sorted({r["keep_fraction"] for r in rows})
    parts += ["### agreement of the scores", agreement_table(root, fractions, stratify)]
    parts += ["### the same score from another seed", reproducibility_table(root, fractions, stratify)]
    text = "\n\n".join(parts) + "\n"
    (root / "table.md").write_text(text)
    (root / "cost.md").write_text(cost_table(root) + "\n")
    plot(rows, root / "accuracy_vs_keep.png", dataset)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--dataset", default="")
    parser.add_argument("--no_stratify", action="store_true", help="kept sets were chosen without per-class quotas")
    cli = parser.parse_args()
    print(write_report(cli.root, cli.dataset or cli.root.name, stratify=not cli.no_stratify))
