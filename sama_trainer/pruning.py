"""Data pruning: a score for every training example, and the fraction of examples to keep.

Every score here ranks examples so that **high = keep, low = prune** (:func:`keep_indices` keeps the highest):

* ``"sama"`` — meta-learned importance (SAMA, §4.3 of the paper): a :class:`~sama_trainer.SAMATrainer` trains the
  model with a Meta-Weight-Net that sees each example's loss and the uncertainty of its prediction (the entropy of the
  softmax, ``meta_use_uncertainty=True``), and whose meta loss is computed on batches of the *same training set*
  (``meta_dataset=train_dataset``, no clean set). An example's score is the mean of the weights it received over the
  last ``E`` epochs (:func:`meta_importance_scores`): a low weight means the meta net judged the example harmful or
  useless for the loss on the rest of the data, so it is pruned first. Or, as the authors' pruning code does
  (Betty, ``examples/imagenet_pruning/filter.py``), the mean over a few checkpoints of the weight the meta net gives
  every example in eval mode (:class:`MetaWeightSnapshots`): every example is then scored by the same model at the
  same points, not at whatever point of the epoch it was drawn.
* ``"el2n"`` — EL2N (Paul et al., 2021): ‖softmax(f(x)) − onehot(y)‖₂, averaged over a few checkpoints early in
  plain training (:class:`TrainingDynamics`). Hard examples score high and are kept; easy ones are pruned.
* ``"loss"`` — the mean cross-entropy over the same checkpoints (kept high, as EL2N).
* ``"random"`` — uniform random scores (:func:`random_scores`).

The uncertainty input: the authors' ImageNet pruning code (Betty, ``examples/imagenet_pruning``) feeds the
cross-entropy between the prediction and the prediction of an EMA copy of the classifier head; its EMA update
(``α·fc + (1 − α)·fc``) copies the head, so that input equals the entropy of the prediction, which is what
``MetaWeightNet(use_uncertainty=True)`` computes.

Typical use (the training set needs an ``example_id`` column: :func:`with_example_ids`)::

    train = with_example_ids(train)
    args = SAMAConfig(output_dir="scores", num_train_epochs=1, meta_use_uncertainty=True)
    trainer = SAMATrainer(model, args, train_dataset=train, meta_dataset=train)
    steps = len(trainer.get_train_dataloader())
    snapshots = MetaWeightSnapshots(train, at_steps=[steps // 2, steps]).attach(trainer)
    trainer.train()
    kept = train.select(keep_indices(snapshots.scores(), fraction=0.7, labels=train["label"]))

Score from a run short enough not to fit the pool: once most losses are near zero, the weights rank little but noise
(RESULTS.md, "Data pruning").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import atomic_save
from .meta_data import example_lengths, longest_first


__all__ = [
    "KEEP_RULES",
    "PRUNING_SCORES",
    "MetaWeightSnapshots",
    "TrainingDynamics",
    "el2n",
    "keep_indices",
    "meta_importance_scores",
    "predict_in_order",
    "random_scores",
    "read_scores",
    "with_example_ids",
    "write_scores",
]

PRUNING_SCORES = ("sama", "el2n", "loss", "random")


def with_example_ids(dataset: Any, column: str = "example_id") -> Any:
    """``dataset`` (a ``datasets.Dataset``) with ``column`` set to the row index 0..n-1 (replaced if present): the
    key under which :class:`~sama_trainer.SAMATrainer` records the weight of every example it draws."""
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, list(range(len(dataset))))


def meta_importance_scores(trainer: Any, last_epochs: int = 1) -> np.ndarray:
    """The meta-learned importance of every training example: the mean weight it received over the last
    ``last_epochs`` epochs of ``trainer``'s run (a trained :class:`~sama_trainer.SAMATrainer` whose training set has
    the ``example_id`` column). Under DDP call it on every rank (the ranks' records are summed).

    Raises ``ValueError`` naming the fix when no weight was recorded or some example was never drawn in those
    epochs (e.g. ``max_steps`` stopped the run mid-epoch).
    """
    history = trainer.weight_history
    if not history.epochs:
        raise ValueError(
            "no example weights were recorded: the training set needs an "
            f"'{trainer.args.example_id_column}' column (with_example_ids(train)) and meta_objective must reweight"
        )
    scores = trainer.example_weight_means(last_epochs).numpy()
    missing = int(np.isnan(scores).sum())
    if missing:
        raise ValueError(
            f"{missing} of {len(scores)} examples were never drawn in the last {last_epochs} recorded epoch(s) "
            f"(epochs with records: {history.epochs}); train whole epochs (num_train_epochs, no max_steps) or "
            "average over more epochs"
        )
    return scores


def el2n(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N of each example: ‖p − onehot(y)‖₂ for predicted class probabilities ``p`` [N, C] and labels ``y`` [N]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels, dtype=np.int64)]
    return np.linalg.norm(probabilities - onehot, axis=1)


def random_scores(num_examples: int, seed: int) -> np.ndarray:
    """Uniform random scores in [0, 1) (random pruning), reproducible from ``seed``."""
    return np.random.default_rng(seed).random(num_examples)


def _num_kept(n: int, fraction: float) -> int:
    return min(n, math.floor(fraction * n + 0.5))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores (ties: the lower index first)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


KEEP_RULES = ("highest", "lowest", "coverage")


def _coverage(scores: np.ndarray, k: int, prune_top: float, strata: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``k`` examples by coverage-centric selection: drop the ``prune_top`` share with the highest
    scores, cut the rest into ``strata`` equal-width score bins, then fill the budget from the emptiest bin up, each
    bin giving at most an equal share of what is left, drawn at random."""
    n = len(scores)
    drop = min(math.floor(prune_top * n), n - k)
    rest = np.sort(_top(-scores, n - drop))  # all but the `drop` highest
    edges = np.linspace(scores[rest].min(), scores[rest].max(), strata + 1)
    bins = np.clip(np.searchsorted(edges, scores[rest], side="right") - 1, 0, strata - 1)
    groups = sorted((rest[bins == b] for b in np.unique(bins)), key=len)
    chosen, budget = [], k
    for i, group in enumerate(groups):
        take = min(len(group), budget // (len(groups) - i))
        chosen.append(rng.choice(group, size=take, replace=False))
        budget -= take
    return np.concatenate(chosen).astype(np.int64)


def keep_indices(
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    fraction: float,
    *,
    keep: str = "highest",
    labels: Sequence[int] | np.ndarray | None = None,
    prune_top: float = 0.1,
    strata: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Indices (ascending) of the ``round(fraction · n)`` examples to keep.

    Args:
        scores: one score per example.
        fraction: the share of examples kept, in (0, 1].
        keep: ``"highest"`` keeps the highest scores and prunes the lowest (every score of this module: low meta
            weight, low EL2N, low loss = prune); ``"lowest"`` keeps the lowest; ``"coverage"`` keeps examples from
            the whole range of scores (coverage-centric selection, Zheng et al., ICLR 2023): the ``prune_top``
            share with the highest scores (the hardest, e.g. mislabelled) goes first, then equal numbers are drawn
            at random (``seed``) from ``strata`` equal-width score bins, the sparse bins kept whole.
        labels: class of each example: keep ``fraction`` of every class (largest remainders fill the total), so
            pruning cannot shift the class balance.

    Ties are broken by index (the lower index is kept).
    """
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    if not 0.0 <= prune_top < 1.0 or strata < 1:
        raise ValueError(f"prune_top must be in [0, 1) and strata >= 1, got {prune_top}, {strata}")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN; score every example before pruning")
    signed = scores if keep == "highest" else -scores
    rng = np.random.default_rng(seed)

    def select(positions: np.ndarray, k: int) -> np.ndarray:
        if keep == "coverage":
            return positions[_coverage(scores[positions], k, prune_top, strata, rng)] if k else positions[:0]
        return positions[_top(signed[positions], k)]

    total = _num_kept(len(scores), fraction)
    if labels is None:
        return np.sort(select(np.arange(len(scores)), total))
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(scores):
        raise ValueError(f"got {len(labels)} labels for {len(scores)} scores")
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    quota = np.array([fraction * len(m) for m in members])
    counts = np.floor(quota).astype(int)
    # hand the rest of the total to the largest remainders (ties: the lower class)
    for i in np.lexsort((np.arange(len(classes)), -(quota - counts)))[: total - counts.sum()]:
        counts[i] += 1
    kept = [select(m, k) for m, k in zip(members, counts)]
    return np.sort(np.concatenate(kept))


def predict_in_order(
    trainer: Trainer, dataset: Any, batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits [N, C] and labels [N] (float32, int64, on the CPU) of every row of ``dataset``, in its order.

    ``Trainer.predict`` returns rows in its evaluation sampler's order, which with
    ``train_sampling_strategy="group_by_length"`` is a seeded length-grouped shuffle: fine for a metric over
    (prediction, label) pairs, wrong for a score per example. Here the forward passes run over length-sorted batches
    (when the rows have ``input_ids``) through ``trainer.prediction_step`` and the rows are put back in place.
    """
    from torch.utils.data import DataLoader

    if trainer.args.remove_unused_columns and hasattr(dataset, "remove_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="prediction")
    order, position = longest_first(example_lengths(dataset) or [0] * len(dataset))  # no input_ids: dataset order
    loader = DataLoader(
        dataset,
        batch_size=batch_size or trainer.args.per_device_eval_batch_size,
        sampler=order,
        collate_fn=trainer.data_collator,
    )
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            _, batch_logits, batch_labels = trainer.prediction_step(model, batch, prediction_loss_only=False)
            if isinstance(batch_logits, tuple):
                batch_logits = batch_logits[0]
            if batch_labels is None:
                raise ValueError("predict_in_order needs a label column in the dataset")
            logits.append(batch_logits.detach().float().cpu())
            labels.append(batch_labels.detach().long().cpu().reshape(-1))
    finally:
        model.train(was_training)
    return torch.cat(logits)[position], torch.cat(labels)[position]


class _Snapshots(TrainerCallback):
    """Records one array per example at chosen global optimizer steps (or at the end of every epoch).

    The records travel with the trainer's checkpoints: every checkpoint of ``output_dir`` gets a
    ``<ClassName>.pt`` with the records made up to its step, and a run resumed from a checkpoint of ``output_dir``
    starts from them, so a resumed run ends with the records of an uninterrupted one.
    """

    record_names: tuple[str, ...] = ()  # the lists of per-example arrays that the subclass fills

    def __init__(self, at_steps: Sequence[int] | None = None):
        self.at_steps = None if at_steps is None else sorted(set(int(s) for s in at_steps))
        self.trainer: Trainer | None = None
        self.steps: list[int] = []

    def attach(self, trainer: Trainer):
        """Record during ``trainer``'s training; returns ``self``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def record(self, step: int) -> None:
        """Record now (after global optimizer step ``step``)."""
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a trainer: call attach(trainer) first")
        self._record()
        self.steps.append(step)

    def _record(self) -> None:
        raise NotImplementedError

    def _file(self, args, step: int) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / f"{type(self).__name__}.pt"

    def on_train_begin(self, args, state, control, **kwargs):
        path = self._file(args, state.global_step)
        if state.global_step > 0 and not self.steps and path.is_file():  # resumed from a checkpoint of output_dir
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.steps = list(saved["steps"])
            for name in self.record_names:
                setattr(self, name, [t.numpy() for t in saved[name]])

    def on_save(self, args, state, control, **kwargs):
        path = self._file(args, state.global_step)
        if state.is_world_process_zero and path.parent.is_dir():
            records = {name: [torch.from_numpy(a) for a in getattr(self, name)] for name in self.record_names}
            atomic_save({"steps": list(self.steps), **records}, str(path))

    def on_step_end(self, args, state, control, **kwargs):
        if self.at_steps is not None and state.global_step in self.at_steps and state.global_step not in self.steps:
            self.record(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.at_steps is None:
            self.record(state.global_step)

    @staticmethod
    def _mean(values: list[np.ndarray]) -> np.ndarray:
        if not values:
            raise ValueError("nothing recorded yet: train with the callback attached (see at_steps)")
        return np.stack(values).mean(0)


class TrainingDynamics(_Snapshots):
    """Predictions of a trainer's model on a dataset at chosen points of training, for EL2N and loss scores.

    At the end of every epoch (or after each optimizer step in ``at_steps``) it computes the eval-mode logits of
    every example of ``dataset`` (:func:`predict_in_order`; every DDP rank scores the whole dataset) and keeps
    per-example EL2N and cross-entropy. Attach it with :meth:`attach`; the records are saved with the trainer's
    checkpoints and restored on resume.

    Args:
        dataset: the examples to score (tokenised, with a label column), usually the training set.
        at_steps: global optimizer steps after which to record; None records at the end of every epoch.
    """

    record_names = ("el2n_records", "loss_records")

    def __init__(self, dataset: Any, at_steps: Sequence[int] | None = None):
        super().__init__(at_steps)
        self.dataset = dataset
        self.el2n_records: list[np.ndarray] = []
        self.loss_records: list[np.ndarray] = []

    def attach(self, trainer: Trainer) -> TrainingDynamics:
        return super().attach(trainer)

    def _record(self) -> None:
        logits, labels = predict_in_order(self.trainer, self.dataset)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError("TrainingDynamics needs class logits [N, C] and class-id labels [N] from the model")
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        self.el2n_records.append(el2n(log_probs.exp().numpy(), labels.numpy()))
        self.loss_records.append(-log_probs[torch.arange(len(labels)), labels].numpy())

    def el2n_scores(self) -> np.ndarray:
        """Mean EL2N of every example over the recorded points (high = hard = keep)."""
        return self._mean(self.el2n_records)

    def loss_scores(self) -> np.ndarray:
        """Mean cross-entropy of every example over the recorded points (high = keep)."""
        return self._mean(self.loss_records)


class MetaWeightSnapshots(_Snapshots):
    """The meta net's weight for every example of a dataset at chosen points of a SAMA run (eval mode, no dropout),
    for the authors' pruning score: the mean weight over a few checkpoints (their ``filter.py``).

    At the end of every epoch (or after each optimizer step in ``at_steps``) it calls
    :meth:`~sama_trainer.SAMATrainer.compute_example_weights` on ``dataset`` (every rank scores the whole dataset);
    :meth:`scores` is the mean over the records (high = keep). The records are saved with the trainer's checkpoints
    and restored on resume.

    Args:
        dataset: the examples to score (tokenised, with a label column), usually the training set.
        at_steps: global optimizer steps after which to record; None records at the end of every epoch.
        batch_size: evaluation batch size (default: the trainer's ``per_device_eval_batch_size``).
    """

    record_names = ("weight_records", "loss_records")

    def __init__(self, dataset: Any, at_steps: Sequence[int] | None = None, batch_size: int | None = None):
        super().__init__(at_steps)
        self.dataset, self.batch_size = dataset, batch_size
        self.weight_records: list[np.ndarray] = []
        self.loss_records: list[np.ndarray] = []

    def attach(self, trainer: Trainer) -> MetaWeightSnapshots:
        if not hasattr(trainer, "compute_example_weights"):
            raise TypeError("MetaWeightSnapshots needs a SAMATrainer (it reads the meta net's weights)")
        return super().attach(trainer)

    def _record(self) -> None:
        out = self.trainer.compute_example_weights(self.dataset, self.batch_size)
        if "weight" not in out:
            raise ValueError("MetaWeightSnapshots needs a meta objective that reweights (meta_objective='reweight')")
        self.weight_records.append(np.asarray(out["weight"], dtype=np.float64))
        self.loss_records.append(np.asarray(out["loss"], dtype=np.float64))

    def scores(self) -> np.ndarray:
        """Mean weight of every example over the recorded points (high = keep)."""
        return self._mean(self.weight_records)

    def loss_scores(self) -> np.ndarray:
        """Mean loss of every example over the same points (the SAMA-trained model's own loss score)."""
        return self._mean(self.loss_records)


def write_scores(
    path: str | Path, scores: Sequence[float] | np.ndarray, columns: dict[str, Sequence[Any]] | None = None
) -> None:
    """Write one JSON line per example, highest score first: ``rank`` (0 = kept first), ``example_id`` (position in
    ``scores``), ``score`` and the given ``columns`` (e.g. ``{"text": ..., "label": ...}``), so the most and least
    important examples sit at the top and bottom of the file."""
    scores = np.asarray(scores, dtype=np.float64)
    columns = columns or {}
    for name, values in columns.items():
        if len(values) != len(scores):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(scores)} scores")
    order = _top(scores, len(scores))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rank, i in enumerate(order):
            row = {"rank": rank, "example_id": int(i), "score": float(scores[i])}
            row.update({name: _plain(values[i]) for name, values in columns.items()})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a reader never sees a half-written file


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_scores(path: str | Path) -> np.ndarray:
    """The scores of a :func:`write_scores` file, indexed by ``example_id``."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [row["example_id"] for row in rows]
    if sorted(ids) != list(range(len(rows))):
        raise ValueError(f"{path}: the example ids are not 0..{len(rows) - 1}, each once")
    scores = np.empty(len(rows))
    scores[ids] = [row["score"] for row in rows]
    return scores
