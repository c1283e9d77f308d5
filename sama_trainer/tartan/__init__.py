"""TARTAN-style end-task-aware training (Dery et al., ICLR 2022) with SAMA-learned auxiliary-example weights.

One encoder is trained on an end task (sequence classification) and an auxiliary masked-LM task on task/domain text
at the same time (SAMA paper §4.2, Table 3); SAMA learns a weight for every auxiliary example so that the end task
gains. Modules:

* :mod:`~sama_trainer.tartan.model`: :class:`TartanMultitaskModel` (classifier + MLM head on one encoder) and
  :func:`build_multitask_model`.
* :mod:`~sama_trainer.tartan.data`: dont-stop-pretraining task folders, auxiliary MLM windows,
  :class:`PairedDataset` and :class:`TartanCollator`.
* :mod:`~sama_trainer.tartan.objective`: :class:`TartanObjective` (the meta objective) and :class:`AuxWeightNet`.
* :mod:`~sama_trainer.tartan.trainer`: :class:`TartanTrainer` (SAMA) and :class:`TartanMTTrainer` (fixed weight).
* :mod:`~sama_trainer.tartan.metrics`: the tasks' F1 scores.

Example::

    model, tokenizer = build_multitask_model("roberta-base", label_names, max_length=256)
    aux = load_aux_corpus(task_dir, ["train.txt"], tokenizer, max_length=256)
    trainer = TartanTrainer(model, SAMAConfig(...), train_dataset=PairedDataset(train, aux.dataset),
                            meta_dataset=train, data_collator=TartanCollator(tokenizer))
    trainer.train()
"""

from .data import (
    AuxCorpus,
    PairedDataset,
    TartanCollator,
    encode_for_classification,
    label_vocabulary,
    load_aux_corpus,
    read_task,
    task_datasets,
)
from .metrics import TASKS, classification_scores, compute_metrics, task_metric
from .model import TINY_ROBERTA, TartanMultitaskModel, TartanOutput, build_multitask_model, per_example_mlm_loss
from .objective import AuxWeightNet, TartanObjective
from .trainer import TartanMTTrainer, TartanTrainer


__all__ = [
    "TASKS",
    "TINY_ROBERTA",
    "AuxCorpus",
    "AuxWeightNet",
    "PairedDataset",
    "TartanCollator",
    "TartanMTTrainer",
    "TartanMultitaskModel",
    "TartanObjective",
    "TartanOutput",
    "TartanTrainer",
    "build_multitask_model",
    "classification_scores",
    "compute_metrics",
    "encode_for_classification",
    "label_vocabulary",
    "load_aux_corpus",
    "per_example_mlm_loss",
    "read_task",
    "task_datasets",
    "task_metric",
]
