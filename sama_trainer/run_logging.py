"""Console and log file of a command-line run: the console shows progress bars and the final report, everything
else (library warnings, model loading reports, the Trainer's per-step logs) goes to a log file."""

from __future__ import annotations

import json
import logging
import os

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback


__all__ = ["LoggingCallback", "QuietProgressCallback", "log_to_file", "quiet_console"]


def log_to_file(path: str) -> None:
    """Send Python logging (this package, ``transformers``, ``datasets``, warnings) to ``path`` instead of the
    console (info level and above)."""
    import transformers

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    transformers.utils.logging.set_verbosity_info()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bars stay
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    for name in ("datasets", "accelerate", "py.warnings"):
        lib = logging.getLogger(name)
        lib.handlers, lib.propagate = [], True
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


class QuietProgressCallback(ProgressCallback):
    """The progress bars of ``ProgressCallback`` without printing the log dictionaries under them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class LoggingCallback(TrainerCallback):
    """Writes every ``Trainer.log`` call (loss, learning rate, meta metrics, ...) to Python logging as JSON, so it
    lands in the file of :func:`log_to_file`."""

    logger = logging.getLogger("sama_trainer.train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.logger.info(json.dumps({"step": state.global_step, **logs}))


def quiet_console(trainer: Trainer) -> Trainer:
    """Keep ``trainer``'s per-step logs off the console (they go to Python logging, e.g. :func:`log_to_file`'s file);
    progress bars stay unless ``disable_tqdm``."""
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback())
    trainer.add_callback(LoggingCallback())
    return trainer
