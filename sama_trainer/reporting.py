"""Writing results: generated tables into a hand-written markdown document (between markers), per-example outputs as
JSON lines, and weight histograms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def replace_marked_block(path: str | Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` in ``path`` with ``text``.

    The markers stay, so the document can be regenerated any number of times; everything else is left as it is.
    """
    path = Path(path)
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (create it with the lines {start!r} and {end!r})")
    document = path.read_text(encoding="utf-8")
    i, j = document.find(start), document.find(end)
    if i < 0 or j < i or document.count(start) != 1 or document.count(end) != 1:
        raise ValueError(f"{path}: needs exactly one {start!r} line followed by one {end!r} line around the table")
    path.write_text(document[: i + len(start)] + "\n" + text.strip() + "\n" + document[j:], encoding="utf-8")


def write_jsonl(path: str | Path, columns: dict[str, list]) -> None:
    """Write equally long ``columns`` as JSON lines (one object per row; loadable with ``load_dataset("json")``)."""
    from datasets import Dataset

    Dataset.from_dict(columns).to_json(str(path))


def plot_weight_histogram(
    path: str | Path, values: Sequence[float], label_correct: Sequence[bool], xlabel: str, title: str
) -> None:
    """Histograms of ``values`` for examples whose given label is right and wrong (needs ``matplotlib``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values, correct = np.asarray(values, dtype=float), np.asarray(label_correct, dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 40)
    ax.hist(values[correct], bins=bins, alpha=0.6, label=f"given label correct ({correct.sum()})")
    ax.hist(values[~correct], bins=bins, alpha=0.6, label=f"given label wrong ({(~correct).sum()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
