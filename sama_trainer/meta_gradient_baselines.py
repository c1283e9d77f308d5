"""Baseline meta-gradient methods with the shared signature of :mod:`sama_trainer.meta_gradient`.

Registered names (v = ∂L_meta/∂θ, g = ∇_θ L_base(θ, λ), H = ∂g/∂θ, "direct" = ∂L_meta/∂λ)::

    t1t2      direct - [∇_λ L_base(θ + εv) - ∇_λ L_base(θ - εv)] / (2ε),  ‖εv‖ = α = 0.01   (DARTS / T1-T2)
    neumann   direct - ∂(g·p)/∂λ,  p = α Σ_{k=0..K} (I - αH)^k v                        (IFT, Neumann series)
    cg        direct - ∂(g·x)/∂λ,  x ≈ (H + δI)⁻¹ v by K conjugate-gradient steps from x₀ = 0  (IFT, CG)
    unrolled  dL_meta(θ')/dλ,  θ' = θ - α D ⊙ g,  D = du/dg of the base optimizer (or lr·I)  (one-step lookahead)

``t1t2`` only needs first-order backward passes; the others differentiate through g (double backward), so
``base_loss()`` must keep the graph to θ (they are registered ``second_order=True``). Every method leaves
``base_params`` bit-identical and returns zeros with ``skipped=True`` when it meets a non-finite quantity.

The options the trainer passes to every method (``restore``, ``workspace``, ``base_step_hook``, ``share_rng``,
``bias_correction``, ``loss_scale``, ``consume_grads``) are accepted by all of them; the second-order methods never
move θ, so they ignore ``restore``/``workspace``/``base_step_hook``/``share_rng``/``consume_grads`` and only scale
L_meta's backward by ``loss_scale`` (fp16). Any other unknown option raises ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adaptation import apply_adaptation_, check_adaptation_supported
from .meta_gradient import (
    LossClosure,
    MetaGradients,
    _finite_difference_method,
    _skipped,
    global_norm,
    grads_or_zeros,
    meta_loss_gradients,
    register_method,
)


__all__ = ["cg", "neumann", "t1t2", "unrolled"]

Vectors = list[torch.Tensor]

# options the trainer passes to every method; all but loss_scale are meaningless for methods that never perturb θ
_TRAINER_OPTIONS = frozenset(
    {"restore", "workspace", "base_step_hook", "share_rng", "bias_correction", "loss_scale", "consume_grads"}
)

# autograd's messages for kernels that cannot be differentiated twice
_NO_DOUBLE_BACKWARD = ("derivative for", "once_differentiable")


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def _check_options(method: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _TRAINER_OPTIONS)
    if unknown:
        raise TypeError(f"meta-gradient method {method!r} got unexpected option(s): {', '.join(unknown)}")


def _meta_loss_gradients(
    meta_loss: LossClosure, base_params: Sequence[torch.Tensor], meta_params: Sequence[torch.Tensor], options: dict
) -> tuple[torch.Tensor, Vectors, Vectors]:
    """(L_meta, v, direct) as in :func:`meta_loss_gradients`, with the trainer's fp16 ``loss_scale`` if given."""
    scale = options.get("loss_scale", 1.0)
    extra = {} if scale == 1.0 else {"loss_scale": scale}
    return meta_loss_gradients(meta_loss, base_params, meta_params, **extra)


def _finite(x: torch.Tensor | float) -> bool:
    return math.isfinite(float(x))


def _vjp(
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


def _base_gradient(base_loss: LossClosure, base_params: Sequence[torch.Tensor]) -> Vectors:
    """g = ∇_θ L_base(θ, λ) with its graph (create_graph) so that it can be differentiated again."""
    return grads_or_zeros(base_loss(), base_params, create_graph=True)


def _hvp(g: Sequence[torch.Tensor], base_params: Sequence[torch.Tensor], vec: Sequence[torch.Tensor]) -> Vectors:
    """H·vec = ∂(g·vec)/∂θ (H is symmetric), keeping g's graph for further products."""
    return _vjp(g, base_params, vec, retain=True)


def _mixed_product(
    g: Sequence[torch.Tensor], meta_params: Sequence[torch.Tensor], vec: Sequence[torch.Tensor]
) -> Vectors:
    """∂(g·vec)/∂λ = (∂²L_base/∂λ∂θ)·vec; releases g's graph (always the last use)."""
    return _vjp(g, meta_params, vec, retain=False)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        work = torch.promote_types(x.dtype, torch.float32)
        total += float(torch.sum(x.to(work) * y.to(work)).item())
    return total


def _neumann_solve(hvp: Callable[[Vectors], Vectors], v: Vectors, alpha: float, iterations: int) -> Vectors:
    """p = α Σ_{k=0..K} (I - αH)^k v (K + 1 terms, K Hessian-vector products)."""
    term = [t.clone() for t in v]
    total = [t.clone() for t in v]
    for _ in range(iterations):
        torch._foreach_add_(term, hvp(term), alpha=-alpha)
        torch._foreach_add_(total, term)
    torch._foreach_mul_(total, alpha)
    return total


def _cg_solve(
    hvp: Callable[[Vectors], Vectors], v: Vectors, iterations: int, damping: float, tol: float, stats: dict[str, float]
) -> Vectors:
    """At most K conjugate-gradient steps on (H + δI) x = v from x₀ = 0 (direction update with r_{k+1})."""
    x = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    p = [t.clone() for t in v]
    rr0 = rr = _dot(r, r)
    done = negative = 0
    while done < iterations and rr > 0.0 and rr > tol * tol * rr0:
        hp = hvp(p)
        if damping:
            torch._foreach_add_(hp, p, alpha=damping)
        p_hp = _dot(p, hp)
        if p_hp == 0.0 or not math.isfinite(p_hp):
            stats["cg_breakdown"] = 1.0
            break
        negative += p_hp < 0.0  # H + δI is not positive definite along p: plain CG goes on (damping helps)
        step = rr / p_hp
        torch._foreach_add_(x, p, alpha=step)
        torch._foreach_add_(r, hp, alpha=-step)
        rr_next = _dot(r, r)
        torch._foreach_mul_(p, rr_next / rr)
        torch._foreach_add_(p, r)  # p_{k+1} = r_{k+1} + β p_k,  β = ‖r_{k+1}‖²/‖r_k‖²
        rr = rr_next
        done += 1
    stats["cg_iterations"] = float(done)
    stats["cg_negative_curvature"] = float(negative)
    stats["cg_residual"] = math.sqrt(rr / rr0) if rr0 > 0.0 else 0.0
    return x


def _implicit_method(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    solve: Callable[[Callable[[Vectors], Vectors], Vectors, dict[str, float]], Vectors],
    options: dict[str, Any],
) -> MetaGradients:
    """IFT hypergradient direct - ∂(g·p)/∂λ with p = solve(hvp, v) ≈ H⁻¹v."""
    loss, v, direct = _meta_loss_gradients(meta_loss, base_params, meta_params, options)
    stats = {"meta_loss": float(loss.float().item()), "v_norm": float(global_norm(v).item())}
    if not (_finite(stats["meta_loss"]) and _finite(stats["v_norm"])):
        return _skipped(meta_params, stats, "nonfinite_v")
    if stats["v_norm"] == 0.0:  # the meta loss does not see θ: no implicit part
        return MetaGradients(direct, stats)
    g = _base_gradient(base_loss, base_params)
    if not _finite(global_norm([t.detach() for t in g])):
        return _skipped(meta_params, stats, "nonfinite_base_grad")
    p = solve(lambda vec: _hvp(g, base_params, vec), v, stats)
    stats["ihvp_norm"] = float(global_norm(p).item())
    if not _finite(stats["ihvp_norm"]):
        return _skipped(meta_params, stats, "nonfinite_ihvp")
    implicit = _mixed_product(g, meta_params, p)
    with torch.no_grad():
        grads = torch._foreach_sub(direct, implicit)
    if not _finite(global_norm(grads)):
        return _skipped(meta_params, stats, "nonfinite_meta_grad")
    return MetaGradients(grads, stats)


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


# ----------------------------------------------------------------------------------------------------------------
# methods


@register_method("t1t2")
def t1t2(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 0.01,
    **options: Any,
) -> MetaGradients:
    """T1-T2 / DARTS: direct - [∇_λ L_base(θ + εv) - ∇_λ L_base(θ - εv)] / (2ε) with ‖εv‖₂ = α (default 0.01).

    Identity adaptation (H⁻¹ ≈ I, u = v) whatever the base optimizer: SAMA-NA with the reference library's small
    ``darts`` step. Options as for ``sama-na`` (``restore``, ``workspace``, ``base_step_hook``, ``share_rng``).
    """
    options.pop("bias_correction", None)
    return _finite_difference_method(
        base_params,
        meta_params,
        base_loss,
        meta_loss,
        optimizer=None,
        last_grads=last_grads,  # only used as buffers with consume_grads=True
        alpha=alpha,
        adapt=False,
        **options,
    )


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
    _check_options("neumann", options)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (got {iterations})")
    return _implicit_method(
        base_params,
        meta_params,
        base_loss,
        meta_loss,
        lambda hvp, v, stats: _neumann_solve(hvp, v, alpha, iterations),
        options,
    )


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
    _check_options("cg", options)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (got {iterations})")
    return _implicit_method(
        base_params,
        meta_params,
        base_loss,
        meta_loss,
        lambda hvp, v, stats: _cg_solve(hvp, v, iterations, damping, tol, stats),
        options,
    )


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
    _check_options("unrolled", options)
    if optimizer is not None:
        check_adaptation_supported(optimizer)
    stats: dict[str, float] = {}
    g = _base_gradient(base_loss, base_params)
    with torch.no_grad():
        step = _precondition_([t.detach().clone() for t in g], optimizer, base_params, last_grads, lr, bias_correction)
        torch._foreach_mul_(step, alpha)
    stats["step_norm"] = float(global_norm(step).item())
    if not _finite(stats["step_norm"]):
        return _skipped(meta_params, stats, "nonfinite_step")
    saved = [p.detach().clone() for p in base_params]
    try:
        for p, s in zip(base_params, step):
            p.data.sub_(s)
        loss, v, direct = _meta_loss_gradients(meta_loss, base_params, meta_params, options)
    finally:
        for p, s in zip(base_params, saved):
            p.data.copy_(s)
    stats["meta_loss"] = float(loss.float().item())
    stats["v_norm"] = float(global_norm(v).item())
    if not (_finite(stats["meta_loss"]) and _finite(stats["v_norm"])):
        return _skipped(meta_params, stats, "nonfinite_v")
    with torch.no_grad():  # on a copy: autograd may hand out one tensor for ∂/∂θ and ∂/∂λ (e.g. L(θ + λ))
        u = _precondition_([t.clone() for t in v], optimizer, base_params, last_grads, lr, bias_correction)
        torch._foreach_mul_(u, alpha)
    implicit = _mixed_product(g, meta_params, u)
    with torch.no_grad():
        grads = torch._foreach_sub(direct, implicit)
    if not _finite(global_norm(grads)):
        return _skipped(meta_params, stats, "nonfinite_meta_grad")
    return MetaGradients(grads, stats)
