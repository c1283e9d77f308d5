"""The SAMA section appended to the ``Trainer`` model card."""

from __future__ import annotations

from typing import Any


_FIELDS = (
    "meta_gradient",
    "meta_objective",
    "unroll_steps",
    "sama_alpha",
    "sama_base_update",
    "sama_bias_correction",
    "meta_learning_rate",
    "meta_weight_decay",
    "meta_batch_size",
    "meta_warmup_steps",
    "meta_gradient_kwargs",
)


def sama_card_section(trainer: Any) -> str:
    """Markdown describing how the model was trained with SAMA: method, hyperparameters, meta data, citation."""
    args = trainer.args
    rows = "\n".join(f"| `{name}` | `{getattr(args, name)}` |" for name in _FIELDS)
    meta_size = len(trainer.meta_dataset) if trainer.meta_dataset is not None else 0
    meta_params = sum(p.numel() for p in trainer.meta_model.parameters())
    paper = trainer._paper
    return f"""## Trained with SAMA meta learning

This model was trained with [sama-trainer](https://github.com/) `SAMATrainer`, which implements SAMA
([{paper["title"]}](https://huggingface.co/papers/{paper["id"]})): every `unroll_steps` base optimizer steps, a
meta network (`{type(trainer.meta_model).__name__}`, {meta_params} parameters) is updated with a first-order
meta-gradient so that the base model trained on the reweighted / label-corrected training data does well on a clean
meta set of {meta_size} examples. Meta steps run: {trainer.meta_step_count} (skipped for non-finite values:
{trainer.meta_steps_skipped}).

| SAMA hyperparameter | value |
|---|---|
{rows}

The meta network is saved next to the model in `sama_meta_model/` and loads with
`sama_trainer.load_meta_model(path)`.

### Citation

```bibtex
{paper["citation"]}
```
"""
