"""Shared pieces of the second-order meta-gradient methods (they differentiate through g = ∇_θ L_base).

These methods never move θ, so of the options the trainer passes to every method (``restore``, ``workspace``,
``base_step_hook``, ``share_rng``, ``replay_draws``, ``bias_correction``, ``loss_scale``, ``consume_grads``) they only
use ``loss_scale`` (fp16: scales L_meta's backward); any other unknown option raises ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import core
from .core import global_norm, grads_or_zeros
from .registry import LossClosure, MetaGradients


Vectors = list[torch.Tensor]

# options the trainer passes to every method; all but loss_scale are meaningless for methods that never perturb θ
TRAINER_OPTIONS = frozenset(
    {
        "restore",
        "workspace",
        "base_step_hook",
        "share_rng",
        "replay_draws",
        "bias_correction",
        "loss_scale",
        "consume_grads",
        "base_update_scale",
    }
)

# autograd's messages for kernels that cannot be differentiated twice
_NO_DOUBLE_BACKWARD = ("derivative for", "once_differentiable")


def check_options(method: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - TRAINER_OPTIONS)
    if unknown:
        raise TypeError(f"meta-gradient method {method!r} got unexpected option(s): {', '.join(unknown)}")


def meta_loss_gradients(
    meta_loss: LossClosure, base_params: Sequence[torch.Tensor], meta_params: Sequence[torch.Tensor], options: dict
) -> tuple[torch.Tensor, Vectors, Vectors]:
    """(L_meta, v, direct) as in :func:`meta_loss_gradients`, with the trainer's fp16 ``loss_scale`` if given."""
    scale = options.get("loss_scale", 1.0)
    extra = {} if scale == 1.0 else {"loss_scale": scale}
    return core.meta_loss_gradients(meta_loss, base_params, meta_params, **extra)


def finite(x: torch.Tensor | float) -> bool:
    return math.isfinite(float(x))


def vjp(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], retain: bool
) -> Vectors:
    """Σ_j cotangent_j · ∂output_j/∂inputs, zeros where nothing depends on an input."""
    inputs = list(inputs)
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(p) for p in inputs]
    outs, cots = zip(*pairs)
    try:
        grads = torch.autograd.grad(outs, inputs, grad_outputs=cots, retain_graph=retain, allow_unused=True)
    except RuntimeError as err:
        if not any(m in str(err) for m in _NO_DOUBLE_BACKWARD):
            raise
        raise RuntimeError(
            f"{err}\nneumann, cg and unrolled differentiate twice through the base model, and one of its kernels has "
            "no double backward (e.g. SDPA/flash attention: load the model with attn_implementation='eager'). "
            "sama, sama-na and t1t2 need first-order backward passes only."
        ) from err
    return [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, inputs)]


def base_gradient(base_loss: LossClosure, base_params: Sequence[torch.Tensor]) -> Vectors:
    """g = ∇_θ L_base(θ, λ) with its graph (create_graph) so that it can be differentiated again."""
    return grads_or_zeros(base_loss(), base_params, create_graph=True)


def hvp(g: Sequence[torch.Tensor], base_params: Sequence[torch.Tensor], vec: Sequence[torch.Tensor]) -> Vectors:
    """H·vec = ∂(g·vec)/∂θ (H is symmetric), keeping g's graph for further products."""
    return vjp(g, base_params, vec, retain=True)


def mixed_product(
    g: Sequence[torch.Tensor], meta_params: Sequence[torch.Tensor], vec: Sequence[torch.Tensor]
) -> Vectors:
    """∂(g·vec)/∂λ = (∂²L_base/∂λ∂θ)·vec; releases g's graph (always the last use)."""
    return vjp(g, meta_params, vec, retain=False)


def subtract_mixed_product(
    direct: Vectors,
    g: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    vec: Sequence[torch.Tensor],
    stats: dict[str, float],
) -> MetaGradients:
    """The meta-gradient direct - ∂(g·vec)/∂λ, skipped as ``nonfinite_meta_grad`` if not finite; frees g's graph."""
    implicit = mixed_product(g, meta_params, vec)
    with torch.no_grad():
        grads = torch._foreach_sub(direct, implicit)
    if not finite(global_norm(grads)):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_meta_grad"])
    return MetaGradients(grads, stats)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        work = torch.promote_types(x.dtype, torch.float32)
        total += float(torch.sum(x.to(work) * y.to(work)).item())
    return total
