"""sama-trainer: SAMA scalable meta learning (data reweighting, label correction) as a Hugging Face Trainer."""

from .adaptation import UnsupportedOptimizerError, adaptation_diagonal, register_adaptation
from .callbacks import SAMACallback
from .checkpoint import IncompleteCheckpointError
from .cross_fit import CrossFitMetaSet
from .distributed import MetaStepFailedOnAnotherRank, end_process_group
from .held_out_base_update import HeldOutBaseUpdate
from .meta_gradient import MetaGradients, available_methods, meta_gradient, register_method
from .meta_nets import (
    BootstrapCorrectionNet,
    LabelCorrectionNet,
    MetaWeightNet,
    load_meta_model,
    register_meta_net,
    save_meta_model,
)
from .objectives import ClassificationObjective, ExampleLosses, MetaObjective
from .parser import SAMAParser
from .sama_config import SAMAConfig
from .sama_trainer import SAMATrainer
from .weight_history import WeightHistory


__version__ = "0.2.0"

__all__ = [
    "BootstrapCorrectionNet",
    "ClassificationObjective",
    "CrossFitMetaSet",
    "ExampleLosses",
    "HeldOutBaseUpdate",
    "IncompleteCheckpointError",
    "LabelCorrectionNet",
    "MetaGradients",
    "MetaStepFailedOnAnotherRank",
    "MetaObjective",
    "MetaWeightNet",
    "SAMACallback",
    "SAMAConfig",
    "SAMAParser",
    "SAMATrainer",
    "UnsupportedOptimizerError",
    "WeightHistory",
    "adaptation_diagonal",
    "available_methods",
    "end_process_group",
    "load_meta_model",
    "meta_gradient",
    "register_adaptation",
    "register_meta_net",
    "register_method",
    "save_meta_model",
]
