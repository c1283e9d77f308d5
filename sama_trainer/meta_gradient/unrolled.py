"""The exact gradient of a one-step lookahead (Meta-Weight-Net / L2RW), differentiating through ∇_θ L_base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..adaptation import apply_adaptation_, check_adaptation_supported
from .core import global_norm, meta_loss_stats
from .registry import LossClosure, MetaGradients, all_finite, register_method
from .second_order import (
    Vectors,
    base_gradient,
    check_options,
    finite,
    meta_loss_gradients,
    subtract_mixed_product,
)


__all__ = ["unrolled"]


def _precondition_(
    vectors: Vectors,
    optimizer: Any,
    base_params: Sequence[torch.Tensor],
    last_grads: Sequence[torch.Tensor | None] | None,
    lr: float,
    bias_correction: bool,
) -> Vectors:
    """vectors ← D ⊙ vectors in place, D = du/dg of ``optimizer`` (or lr·I without one)."""
    if optimizer is None:
        torch._foreach_mul_(vectors, lr)
        return vectors
    return apply_adaptation_(optimizer, base_params, last_grads, vectors, bias_correction=bias_correction)


@register_method("unrolled", adaptive=True, second_order=True)
def unrolled(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 1.0,
    lr: float = 1.0,
    bias_correction: bool = True,
    **options: Any,
) -> MetaGradients:
    """Exact gradient of a one-step lookahead (Meta-Weight-Net / L2RW): dL_meta(θ')/dλ with θ' = θ - α D ⊙ g.

    dL_meta(θ')/dλ = ∂L_meta/∂λ(θ') - α (∂²L_base/∂λ∂θ)(θ)·(D ⊙ ∇_θ L_meta(θ')), D held fixed: du/dg of the base
    optimizer's last step (``last_grads`` as for ``sama``) or ``lr``·I when ``optimizer`` is None. θ is moved to θ'
    through ``.data`` (no autograd version bump) and restored bit-for-bit before g is differentiated.

    Options: ``alpha`` (1.0) scales the lookahead step, ``lr`` (1.0; used only without an optimizer),
    ``bias_correction`` (True; Adam's du/dg). Registered adaptive, so the trainer hands it its optimizer (which
    must have a du/dg rule). Stats: ``meta_loss`` and ``v_norm`` are taken at θ', ``step_norm`` = ‖θ - θ'‖.
    """
    check_options("unrolled", options)
    if optimizer is not None:
        check_adaptation_supported(optimizer)
    stats: dict[str, float] = {}
    g = base_gradient(base_loss, base_params)
    with torch.no_grad():
        step = _precondition_([t.detach().clone() for t in g], optimizer, base_params, last_grads, lr, bias_correction)
        torch._foreach_mul_(step, alpha)
    stats["step_norm"] = float(global_norm(step).item())
    if not finite(stats["step_norm"]):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_step"])
    saved = [p.detach().clone() for p in base_params]
    try:
        for p, s in zip(base_params, step):
            p.data.sub_(s)
        loss, v, direct = meta_loss_gradients(meta_loss, base_params, meta_params, options)
    finally:
        for p, s in zip(base_params, saved):
            p.data.copy_(s)
    stats.update(meta_loss_stats(loss, global_norm(v)))
    if not all_finite(stats["meta_loss"], stats["v_norm"]):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_v"])
    with torch.no_grad():  # on a copy: autograd may hand out one tensor for ∂/∂θ and ∂/∂λ (e.g. L(θ + λ))
        u = _precondition_([t.clone() for t in v], optimizer, base_params, last_grads, lr, bias_correction)
        torch._foreach_mul_(u, alpha)
    return subtract_mixed_product(direct, g, meta_params, u, stats)
