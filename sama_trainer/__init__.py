"""sama-trainer: SAMA scalable meta learning (data reweighting, label correction) as a Hugging Face Trainer."""

from .adaptation import UnsupportedOptimizerError, adaptation_diagonal, register_adaptation
from .meta_gradient import MetaGradients, available_methods, meta_gradient, register_method
from .meta_nets import BootstrapCorrectionNet, LabelCorrectionNet, MetaWeightNet
from .sama_config import SAMAConfig
from .sama_trainer import SAMATrainer, load_meta_model, save_meta_model


__version__ = "0.1.0"

__all__ = [
    "BootstrapCorrectionNet",
    "LabelCorrectionNet",
    "MetaGradients",
    "MetaWeightNet",
    "SAMAConfig",
    "SAMATrainer",
    "UnsupportedOptimizerError",
    "adaptation_diagonal",
    "available_methods",
    "load_meta_model",
    "meta_gradient",
    "register_adaptation",
    "register_method",
    "save_meta_model",
]
