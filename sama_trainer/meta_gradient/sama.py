"""SAMA and its first-order relatives: meta-gradients from one central finite difference.

SAMA (Choe et al., NeurIPS 2023, Eq. 4-5) with v = ∂L_meta/∂θ, u = (du/dg) ⊙ v and ε = α/‖u‖₂::

    dL_meta/dλ ≈ ∂L_meta/∂λ - [∇_λ L_base(θ + εu, λ) - ∇_λ L_base(θ - εu, λ)] / (2ε)

``sama-na`` (the paper's ablation) and ``t1t2`` (DARTS / T1-T2, the reference library's small step) take u = v.
Only first-order backward passes are used, and the two perturbed passes see the same RNG state (dropout masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..adaptation import apply_adaptation_, check_adaptation_supported
from .core import Perturbation, adapted_meta_loss_gradients, global_norm, meta_loss_gradients, meta_loss_stats
from .registry import Agreement, LossClosure, MetaGradients, all_finite, local_agreement, register_method


__all__ = ["sama", "sama_na", "t1t2"]


def _shaped_like(tensors: Sequence[torch.Tensor | None] | None, params: Sequence[torch.Tensor]) -> bool:
    """One tensor per parameter with its shape and dtype (so it can hold a copy of it)."""
    if tensors is None or len(tensors) != len(params):
        return False
    return all(t is not None and t.shape == p.shape and t.dtype == p.dtype for t, p in zip(tensors, params))


def _can_consume(
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    last_grads: Sequence[torch.Tensor | None] | None,
) -> bool:
    """Whether ``last_grads`` can hold u: one contiguous gradient per base parameter, shaped and typed like it."""
    if {id(p) for p in base_params} & {id(p) for p in meta_params}:
        return False
    return _shaped_like(last_grads, base_params) and all(
        g.is_contiguous() and p.is_contiguous() for g, p in zip(last_grads, base_params)
    )


def _all_wide_floats(params: Sequence[torch.Tensor]) -> bool:
    return all(p.dtype in (torch.float32, torch.float64) for p in params)


def _finite_difference(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any,
    last_grads: Sequence[torch.Tensor | None] | None,
    alpha: float,
    agree: Agreement = local_agreement,
    bias_correction: bool = True,
    restore: bool = True,
    workspace: Sequence[torch.Tensor] | None = None,
    base_step_hook: Callable[[list[torch.Tensor]], None] | None = None,
    share_rng: bool = True,
    loss_scale: float = 1.0,
    consume_grads: bool = False,
    base_update_scale: float = 1.0,
    pass_cache: Any = None,
    replay_draws: bool = True,
) -> MetaGradients:
    """direct - [∇_λ L_base(θ + εu) - ∇_λ L_base(θ - εu)] / (2ε), u = D ⊙ v (D = du/dg, or 1 if ``optimizer`` is
    None), ‖εu‖ = α; ``agree`` is called once, before θ is restored or updated (``restore=False``: to θ -
    ``base_update_scale``·εu)."""
    lean = consume_grads and _can_consume(base_params, meta_params, last_grads)
    if workspace is not None and not _shaped_like(workspace, base_params):
        workspace = None  # e.g. gradients that are None for some parameters: save θ into a copy instead
    stats: dict[str, float] = {}
    reason: str | None = None
    grads: list[torch.Tensor] | None = None
    perturbation: Perturbation | None = None
    error: Exception | None = None
    try:
        if lean:
            loss, v_norm, u, direct = adapted_meta_loss_gradients(
                meta_loss,
                base_params,
                meta_params,
                last_grads,
                optimizer=optimizer,
                last_grads=last_grads,
                bias_correction=bias_correction,
                loss_scale=loss_scale,
            )
            stats = meta_loss_stats(loss, v_norm)
            workspace = None
        else:
            loss, u, direct = meta_loss_gradients(meta_loss, base_params, meta_params, loss_scale)
            stats = meta_loss_stats(loss, global_norm(u))
        if not all_finite(stats["meta_loss"], stats["v_norm"]):
            reason = "nonfinite_v"
        else:
            if not lean and optimizer is not None:
                # u overwrites v in place, except where autograd returned one tensor for a parameter in both θ and λ
                direct_ids = {id(d) for d in direct}
                u = [t.clone() if id(t) in direct_ids else t for t in u]
                u = apply_adaptation_(optimizer, base_params, last_grads, u, bias_correction=bias_correction)
            u_norm = stats["u_norm"] = float(global_norm(u).item())
            if not all_finite(u_norm):
                reason = "nonfinite_u"
            elif u_norm == 0.0:  # nothing to perturb along (e.g. LoRA B = 0 at init): the implicit part is zero
                stats["eps"] = 0.0
                grads = direct
            else:
                eps = stats["eps"] = alpha / u_norm
                copy_free = lean and not restore and base_step_hook is None and _all_wide_floats(base_params)
                perturbation = Perturbation(base_params, u, eps, save=not copy_free, workspace=workspace)
                implicit = perturbation.difference(meta_params, base_loss, share_rng, pass_cache, replay_draws)
                if not all_finite(float(global_norm(implicit).item())):
                    reason = "nonfinite_fd"
                else:
                    with torch.no_grad():
                        grads = torch._foreach_sub(direct, implicit)
            if grads is not None and not all_finite(float(global_norm(grads).item())):
                reason = "nonfinite_meta_grad"  # e.g. a non-finite ∂L_meta/∂λ: λ must not take it
    except Exception as err:  # agree first, so that no other rank waits for this one
        error, reason = err, "error"
    if reason is not None:
        grads = [torch.zeros_like(p) for p in meta_params]
    try:
        ok, reasons = agree(grads, reason)
    except BaseException:
        if perturbation is not None:
            perturbation.restore()
        raise
    if error is not None or not ok:
        if perturbation is not None:
            perturbation.restore()
        if error is not None:
            raise error
        return MetaGradients.skip(meta_params, stats, reasons)
    if not restore:
        if perturbation is not None:
            perturbation.base_update(base_step_hook, base_update_scale)
        elif base_step_hook is not None:  # ‖u‖ = 0 here, but the other ranks' steps are averaged in
            with torch.no_grad():
                step = [torch.zeros_like(p) for p in base_params]
                base_step_hook(step)
                torch._foreach_sub_(base_params, step)
    elif perturbation is not None:
        perturbation.restore()
    return MetaGradients(grads, stats)


@register_method("sama", adaptive=True, agrees=True)
def sama(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 1.0,
    **options: Any,
) -> MetaGradients:
    """SAMA: identity base Jacobian, u = (du/dg) ⊙ v from the base optimizer, central difference with ‖εu‖ = α.

    ``optimizer=None`` uses identity adaptation (plain SGD semantics without the learning rate).
    Options: ``bias_correction`` (True; Adam's bias correction in du/dg, False reproduces the authors' library),
    ``restore`` (True; False leaves θ at θ - εu), ``workspace``, ``base_step_hook`` (averages the step εu across
    ranks), ``share_rng`` (True), ``loss_scale`` (1.0; scales L_meta's backward, e.g. for fp16), ``consume_grads``
    (False; True lets the method overwrite ``last_grads``: u is formed in them as the backward produces v, so no
    θ-sized v is allocated, and with ``restore=False``, no ``base_step_hook`` and float32/64 parameters no copy of θ
    is kept either — θ ends at θ - εu up to rounding), ``base_update_scale`` (1.0; with ``restore=False`` θ ends at
    θ - scale·εu), ``pass_cache`` (None; a :class:`~.prefix_cache.PrefixCache` lets the second perturbed pass reuse
    what the first computed below the perturbed parameters), ``replay_draws`` (True; with ``share_rng`` on a CPU the
    second pass replays the first pass's random draws; False for passes that draw nothing, e.g. a model in eval mode,
    saves recording them), ``agree`` (see :func:`~.registry.meta_gradient`).
    """
    if optimizer is not None:
        check_adaptation_supported(optimizer)
    return _finite_difference(
        base_params,
        meta_params,
        base_loss,
        meta_loss,
        optimizer=optimizer,
        last_grads=last_grads,
        alpha=alpha,
        **options,
    )


@register_method("sama-na", agrees=True)
def sama_na(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float = 1.0,
    **options: Any,
) -> MetaGradients:
    """SAMA without algorithmic adaptation: :func:`sama` with u = v whatever the base optimizer (the paper's SAMA-NA
    ablation).

    Options as for :func:`sama` (``bias_correction`` has no effect); ``last_grads`` only serve as buffers with
    ``consume_grads=True``.
    """
    return sama(base_params, meta_params, base_loss, meta_loss, last_grads=last_grads, alpha=alpha, **options)


@register_method("t1t2", agrees=True)
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
    """T1-T2 / DARTS: :func:`sama_na` with the reference library's small step ‖εv‖₂ = α = 0.01."""
    return sama_na(base_params, meta_params, base_loss, meta_loss, last_grads=last_grads, alpha=alpha, **options)
