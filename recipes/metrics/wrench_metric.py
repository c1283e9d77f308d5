"""WRENCH's test metrics as an `evaluate` metric: accuracy, or the F1 of class 1 (WRENCH's ``f1_binary``).

A local metric script, so ``evaluate.load`` works offline (``evaluate.load("accuracy")`` fetches its script from the
Hub)::

    metric = evaluate.load("recipes/metrics/wrench_metric.py")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], name="f1")  # {'f1': 0.666...}
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score


NAMES = ("accuracy", "f1")


class WrenchMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Zhang et al., WRENCH: A Comprehensive Benchmark for Weak Supervision, NeurIPS 2021 (D&B).",
            inputs_description="predictions, references: class ids; name: 'accuracy' or 'f1' (positive class 1)",
            features=datasets.Features({key: datasets.Value("int64") for key in ("predictions", "references")}),
        )

    def _compute(self, predictions, references, name: str = "accuracy") -> dict[str, float]:
        if name not in NAMES:
            raise ValueError(f"name must be one of {NAMES}, got {name!r}")
        if name == "f1":
            return {"f1": float(f1_score(references, predictions, average="binary", pos_label=1, zero_division=0))}
        return {"accuracy": float(accuracy_score(references, predictions))}
