"""Implicit-function-theorem meta-gradients with an explicit inverse-Hessian solve (second order)::

    neumann   direct - ∂(g·p)/∂λ,  p = α Σ_{k=0..K} (I - αH)^k v      (truncated Neumann series)
    cg        direct - ∂(g·x)/∂λ,  x ≈ (H + δI)⁻¹ v by K conjugate-gradient steps from x₀ = 0

with v = ∂L_meta/∂θ, g = ∇_θ L_base(θ, λ), H = ∂g/∂θ and direct = ∂L_meta/∂λ. θ is never moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from .core import global_norm, meta_loss_stats
from .registry import LossClosure, MetaGradients, all_finite, register_method
from .second_order import (
    Vectors,
    base_gradient,
    check_options,
    dot,
    finite,
    hvp,
    meta_loss_gradients,
    subtract_mixed_product,
)


__all__ = ["cg", "neumann"]

# solve(hvp, v, stats) ≈ H⁻¹v, from Hessian-vector products hvp(x) = H·x; may add its own entries to ``stats``
Solver = Callable[[Callable[[Vectors], Vectors], Vectors, dict[str, float]], Vectors]


def _neumann_solve(
    hvp: Callable[[Vectors], Vectors], v: Vectors, stats: dict[str, float], *, alpha: float, iterations: int
) -> Vectors:
    """p = α Σ_{k=0..K} (I - αH)^k v (K + 1 terms, K Hessian-vector products)."""
    term = [t.clone() for t in v]
    total = [t.clone() for t in v]
    for _ in range(iterations):
        torch._foreach_add_(term, hvp(term), alpha=-alpha)
        torch._foreach_add_(total, term)
    torch._foreach_mul_(total, alpha)
    return total


def _cg_solve(
    hvp: Callable[[Vectors], Vectors],
    v: Vectors,
    stats: dict[str, float],
    *,
    iterations: int,
    damping: float,
    tol: float,
) -> Vectors:
    """At most K conjugate-gradient steps on (H + δI) x = v from x₀ = 0 (direction update with r_{k+1})."""
    x = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    p = [t.clone() for t in v]
    rr0 = rr = dot(r, r)
    done = negative = 0
    while done < iterations and rr > 0.0 and rr > tol * tol * rr0:
        hp = hvp(p)
        if damping:
            torch._foreach_add_(hp, p, alpha=damping)
        p_hp = dot(p, hp)
        if p_hp == 0.0 or not math.isfinite(p_hp):
            stats["cg_breakdown"] = 1.0
            break
        negative += p_hp < 0.0  # H + δI is not positive definite along p: plain CG goes on (damping helps)
        step = rr / p_hp
        torch._foreach_add_(x, p, alpha=step)
        torch._foreach_add_(r, hp, alpha=-step)
        rr_next = dot(r, r)
        torch._foreach_mul_(p, rr_next / rr)
        torch._foreach_add_(p, r)  # p_{k+1} = r_{k+1} + β p_k,  β = ‖r_{k+1}‖²/‖r_k‖²
        rr = rr_next
        done += 1
    stats["cg_iterations"] = float(done)
    stats["cg_negative_curvature"] = float(negative)
    stats["cg_residual"] = math.sqrt(rr / rr0) if rr0 > 0.0 else 0.0
    return x


def _implicit_method(
    name: str,
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    iterations: int,
    solve: Solver,
    options: dict[str, Any],
) -> MetaGradients:
    """IFT hypergradient direct - ∂(g·p)/∂λ with p = solve(hvp, v, stats) ≈ H⁻¹v in ``iterations`` (checked first)."""
    check_options(name, options)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (got {iterations})")
    loss, v, direct = meta_loss_gradients(meta_loss, base_params, meta_params, options)
    stats = meta_loss_stats(loss, global_norm(v))
    if not all_finite(stats["meta_loss"], stats["v_norm"]):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_v"])
    if stats["v_norm"] == 0.0:  # the meta loss does not see θ: no implicit part
        return MetaGradients(direct, stats)
    g = base_gradient(base_loss, base_params)
    if not finite(global_norm([t.detach() for t in g])):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_base_grad"])
    p = solve(lambda vec: hvp(g, base_params, vec), v, stats)
    stats["ihvp_norm"] = float(global_norm(p).item())
    if not finite(stats["ihvp_norm"]):
        return MetaGradients.skip(meta_params, stats, ["nonfinite_ihvp"])
    return subtract_mixed_product(direct, g, meta_params, p, stats)


@register_method("neumann", second_order=True)
def neumann(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 1.0,
    iterations: int = 5,
    **options: Any,
) -> MetaGradients:
    """IFT with a truncated Neumann series: direct - ∂(g·p)/∂λ, p = α Σ_{k=0..K} (I - αH)^k v.

    Options: ``alpha`` (1.0), the series step; it converges to H⁻¹v only for 0 < α < 2/λ_max(H) and a positive
    definite H. ``iterations`` K (5; the reference library defaults to 1): K Hessian-vector products (double
    backward through the base model). The optimizer is not used.
    """
    solve = partial(_neumann_solve, alpha=alpha, iterations=iterations)
    return _implicit_method("neumann", base_params, meta_params, base_loss, meta_loss, iterations, solve, options)


@register_method("cg", second_order=True)
def cg(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 1.0,
    iterations: int = 5,
    damping: float = 0.0,
    tol: float = 0.0,
    **options: Any,
) -> MetaGradients:
    """IFT with conjugate gradients: direct - ∂(g·x)/∂λ, x = K CG steps on (H + δI) x = v from x₀ = 0.

    Options: ``iterations`` K (5; one Hessian-vector product each; the reference library defaults to 1),
    ``damping`` δ (0.0), ``tol`` (0.0: stop early once ‖r‖ ≤ tol·‖v‖; 0 runs all K steps unless r = 0).
    ``alpha`` is accepted for the shared signature and not used (CG has no step size). Stats: ``cg_iterations``,
    ``cg_residual`` (‖r‖/‖v‖), ``cg_negative_curvature`` (steps with pᵀ(H + δI)p < 0; H is indefinite there).
    """
    solve = partial(_cg_solve, iterations=iterations, damping=damping, tol=tol)
    return _implicit_method("cg", base_params, meta_params, base_loss, meta_loss, iterations, solve, options)
