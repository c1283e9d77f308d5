"""Meta-gradient methods: small functions with one signature over closures and parameter lists.

Every method is called as::

    method(base_params, meta_params, base_loss, meta_loss, *, optimizer=None, last_grads=None, alpha=..., **options)

and returns :class:`MetaGradients`, a list of tensors shaped like ``meta_params`` holding dL_meta/dλ (direct plus
implicit part), with a ``stats`` dict for logging. ``base_loss()`` must evaluate the base (training) loss at the
*current* values of ``base_params`` and ``meta_params``; ``meta_loss()`` the meta (validation) loss at the current
base parameters. Unless a method says otherwise, ``base_params`` are bit-identical on return.

SAMA (Choe et al., NeurIPS 2023, Eq. 4-5) with v = ∂L_meta/∂θ, u = (du/dg) ⊙ v and ε = α/‖u‖₂::

    dL_meta/dλ ≈ ∂L_meta/∂λ - [∇_λ L_base(θ + εu, λ) - ∇_λ L_base(θ - εu, λ)] / (2ε)

Only first-order backward passes are used, and the two perturbed passes see the same RNG state (dropout masks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adaptation import adaptation_diagonal_into_, apply_adaptation_, check_adaptation_supported


__all__ = [
    "MetaGradients",
    "available_methods",
    "meta_gradient",
    "register_method",
    "sama",
    "sama_na",
]

LossClosure = Callable[[], torch.Tensor]
MetaGradientMethod = Callable[..., "MetaGradients"]

_METHODS: dict[str, MetaGradientMethod] = {}
# methods whose result depends on the base optimizer's adaptation (they need a supported optimizer)
ADAPTIVE_METHODS: set[str] = set()
# methods that differentiate through ∇_θ L_base (double backward): base_loss() must keep the graph to θ
SECOND_ORDER_METHODS: set[str] = set()


class MetaGradients(list):
    """Meta-gradients (one tensor per meta parameter) plus ``stats`` for logging.

    ``skipped`` is True when a non-finite quantity was met: the tensors are then zeros, θ was left untouched and the
    caller must not step the meta optimizer.
    """

    def __init__(self, grads: Sequence[torch.Tensor], stats: dict[str, float] | None = None, skipped: bool = False):
        super().__init__(grads)
        self.stats = dict(stats or {})
        self.skipped = skipped
        self.stats["skipped"] = float(skipped)


def register_method(
    name: str, *, adaptive: bool = False, second_order: bool = False
) -> Callable[[MetaGradientMethod], MetaGradientMethod]:
    """Register a meta-gradient method under ``name`` (usable as ``SAMAConfig.meta_gradient``).

    ``adaptive``: the method reads the base optimizer (it must have a du/dg rule). ``second_order``: the method
    differentiates through ∇_θ L_base, so ``base_loss()`` must be differentiable w.r.t. θ (first-order methods get a
    base loss whose base-model forward runs without a graph).
    """

    def decorator(fn: MetaGradientMethod) -> MetaGradientMethod:
        _METHODS[name] = fn
        if adaptive:
            ADAPTIVE_METHODS.add(name)
        if second_order:
            SECOND_ORDER_METHODS.add(name)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names accepted by :func:`meta_gradient`."""
    return sorted(_METHODS)


def get_method(name: str) -> MetaGradientMethod:
    """The method registered as ``name``; a ``ValueError`` naming the available ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        available = ", ".join(available_methods())
        raise ValueError(f"unknown meta-gradient method {name!r}; available: {available}") from None


def meta_gradient(
    method: str,
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float | None = None,
    **options: Any,
) -> MetaGradients:
    """Compute dL_meta/dλ with the named method (see :func:`available_methods`).

    Args:
        method: e.g. ``"sama"`` or ``"sama-na"``.
        base_params: θ, the tensors the base optimizer updates (``requires_grad=True``).
        meta_params: λ.
        base_loss: closure returning the scalar base loss at the current θ, λ.
        meta_loss: closure returning the scalar meta loss at the current θ.
        optimizer: the base optimizer right after its step (for du/dg); ``None`` means identity adaptation.
        last_grads: the gradients that optimizer step used (Adam's du/dg needs them).
        alpha: the method's step size (SAMA: ‖εu‖₂); ``None`` takes the method's default.
        **options: method-specific options (for SAMA: ``bias_correction``, ``restore``, ``workspace``,
            ``base_step_hook``, ``share_rng``, ``loss_scale``, ``consume_grads``; see :func:`sama`).
    """
    fn = get_method(method)
    kwargs = dict(optimizer=optimizer, last_grads=last_grads, **options)
    if alpha is not None:
        kwargs["alpha"] = alpha
    return fn(list(base_params), list(meta_params), base_loss, meta_loss, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# shared building blocks


def _zeros_where_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def grads_or_zeros(loss: torch.Tensor, params: Sequence[torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
    """``autograd.grad`` that returns zeros for parameters the loss does not depend on."""
    params = list(params)
    if not params:
        return []
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return _zeros_where_none(torch.autograd.grad(loss, params, allow_unused=True, **kwargs), params)


def meta_loss_gradients(
    meta_loss: LossClosure,
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One backward of L_meta: returns (L_meta detached, v = ∂L_meta/∂θ, direct = ∂L_meta/∂λ).

    ``loss_scale`` multiplies L_meta before the backward and divides the gradients after it (fp16: keeps small
    gradients from underflowing, as a grad scaler does).
    """
    loss = meta_loss()
    grads = grads_or_zeros(loss * loss_scale if loss_scale != 1.0 else loss, list(base_params) + list(meta_params))
    if loss_scale != 1.0:
        with torch.no_grad():
            torch._foreach_div_(grads, loss_scale)
    n = len(base_params)
    return loss.detach(), grads[:n], grads[n:]


def adapted_meta_loss_gradients(
    meta_loss: LossClosure,
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    *,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor] | None = None,
    bias_correction: bool = True,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One backward of L_meta that forms u = (du/dg) ⊙ v in ``buffers`` without ever holding a θ-sized v.

    du/dg (identity when ``optimizer`` is None) is first written into ``buffers`` (which may be ``last_grads``: the
    gradients of a finished optimizer step are consumed here); a hook on each base parameter then multiplies its
    slice of v into its buffer as soon as the backward produces it, and v's slice is freed at once.
    Returns (L_meta detached, ‖v‖₂, u = ``buffers``, direct = ∂L_meta/∂λ).
    """
    base_params, buffers = list(base_params), list(buffers)
    with torch.no_grad():
        if optimizer is not None:
            adaptation_diagonal_into_(optimizer, base_params, last_grads, buffers, bias_correction=bias_correction)
        else:
            for b in buffers:
                b.fill_(1.0)
    norms: list[torch.Tensor] = []
    reached = [False] * len(base_params)

    def hook_for(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if loss_scale != 1.0:
                    grad = grad / loss_scale
                norms.append(torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)))
                buffers[i].mul_(grad)
            reached[i] = True
            return buffers[i]

        return hook

    handles = [p.register_hook(hook_for(i)) for i, p in enumerate(base_params)]
    try:
        loss = meta_loss()
        grads = grads_or_zeros(loss * loss_scale if loss_scale != 1.0 else loss, base_params + list(meta_params))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for i, hit in enumerate(reached):
            if not hit:  # L_meta does not depend on this parameter: v = 0 there
                buffers[i].zero_()
        direct = grads[len(base_params) :]
        if loss_scale != 1.0 and direct:
            torch._foreach_div_(direct, loss_scale)
        v_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return loss.detach(), v_norm, buffers, direct


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖concat(tensors)‖₂ in float32 (a 0-dim tensor)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _rng_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _meta_grads_at(base_loss: LossClosure, meta_params: Sequence[torch.Tensor], rng_devices: list[int] | None):
    if rng_devices is None:
        return grads_or_zeros(base_loss(), meta_params)
    with torch.random.fork_rng(devices=rng_devices):
        return grads_or_zeros(base_loss(), meta_params)


def central_difference(
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    base_loss: LossClosure,
    direction: Sequence[torch.Tensor],
    eps: float,
    *,
    restore: bool = True,
    workspace: Sequence[torch.Tensor] | None = None,
    base_step_hook: Callable[[list[torch.Tensor]], None] | None = None,
    share_rng: bool = True,
    save_theta: bool = True,
) -> tuple[list[torch.Tensor], bool]:
    """[∇_λ L_base(θ + εd) - ∇_λ L_base(θ - εd)] / (2ε) ≈ (∂²L_base/∂λ∂θ)·d, by two first-order passes.

    θ is saved (into ``workspace`` if given, e.g. gradient buffers that are no longer needed; else into a copy) and
    restored bit-for-bit. With ``restore=False`` θ is left at θ - εd instead (the paper's extra base update);
    ``base_step_hook`` may modify the step tensors εd in place first (e.g. average them across ranks).
    ``save_theta=False`` (only with ``restore=False`` and no hook) keeps no copy of θ: it moves θ to θ + εd, then to
    (θ + εd) - 2εd, which equals θ - εd up to rounding (use it for float32/64 parameters only).
    Returns (the difference quotient, whether it is finite). Non-finite results always restore θ.
    """
    params, direction = list(base_params), list(direction)
    if not save_theta and (restore or base_step_hook is not None):
        raise ValueError("save_theta=False needs restore=False and no base_step_hook")
    saved = None
    if save_theta:
        with torch.no_grad():
            if workspace is None:
                saved = [p.detach().clone() for p in params]
            else:
                saved = list(workspace)
                torch._foreach_copy_(saved, [p.detach() for p in params])
    position = 0.0  # θ currently sits at θ + position·d

    @torch.no_grad()
    def move_to(target: float) -> None:
        nonlocal position
        if saved is None:  # arithmetic move: exact up to rounding
            torch._foreach_add_(params, direction, alpha=target - position)
        else:  # from the saved copy: bit-exact
            if position != 0.0:
                torch._foreach_copy_(params, saved)
            if target != 0.0:
                torch._foreach_add_(params, direction, alpha=target)
        position = target

    devices = _rng_devices(params) if share_rng else None
    try:
        move_to(eps)
        grad_plus = _meta_grads_at(base_loss, meta_params, devices)
        move_to(-eps)
        grad_minus = _meta_grads_at(base_loss, meta_params, devices)
        with torch.no_grad():
            diff = torch._foreach_sub(grad_plus, grad_minus)
            torch._foreach_div_(diff, 2.0 * eps)
            finite = bool(torch.isfinite(global_norm(diff)).item()) if diff else True
    except BaseException:
        move_to(0.0)
        raise
    if restore or not finite:
        move_to(0.0)
    elif saved is not None:  # the base update θ - εd, with the step tensors offered to the hook first
        move_to(0.0)
        with torch.no_grad():
            step = torch._foreach_mul(direction, eps)
            if base_step_hook is not None:
                base_step_hook(step)
            torch._foreach_sub_(params, step)
    # else: copy-free, θ already sits at θ - εd
    return diff, finite


def _skipped(meta_params: Sequence[torch.Tensor], stats: dict[str, float], reason: str) -> MetaGradients:
    stats["skip_reason_" + reason] = 1.0
    return MetaGradients([torch.zeros_like(p) for p in meta_params], stats, skipped=True)


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


def _shaped_like(tensors: Sequence[torch.Tensor | None] | None, params: Sequence[torch.Tensor]) -> bool:
    """One tensor per parameter with its shape and dtype (so it can hold a copy of it)."""
    if tensors is None or len(tensors) != len(params):
        return False
    return all(t is not None and t.shape == p.shape and t.dtype == p.dtype for t, p in zip(tensors, params))


def _all_wide_floats(params: Sequence[torch.Tensor]) -> bool:
    return all(p.dtype in (torch.float32, torch.float64) for p in params)


def _finite_difference_method(
    base_params: list[torch.Tensor],
    meta_params: list[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    *,
    optimizer: Any,
    last_grads: Sequence[torch.Tensor | None] | None,
    alpha: float,
    adapt: bool,
    bias_correction: bool = True,
    restore: bool = True,
    workspace: Sequence[torch.Tensor] | None = None,
    base_step_hook: Callable[[list[torch.Tensor]], None] | None = None,
    share_rng: bool = True,
    loss_scale: float = 1.0,
    consume_grads: bool = False,
) -> MetaGradients:
    lean = consume_grads and _can_consume(base_params, meta_params, last_grads)
    if workspace is not None and not _shaped_like(workspace, base_params):
        workspace = None  # e.g. gradients that are None for some parameters: save θ into a copy instead
    if lean:
        loss, v_norm, u, direct = adapted_meta_loss_gradients(
            meta_loss,
            base_params,
            meta_params,
            last_grads,
            optimizer=optimizer if adapt else None,
            last_grads=last_grads,
            bias_correction=bias_correction,
            loss_scale=loss_scale,
        )
        stats = {"meta_loss": float(loss.float().item()), "v_norm": float(v_norm.item())}
        workspace = None
    else:
        loss, v, direct = meta_loss_gradients(meta_loss, base_params, meta_params, loss_scale)
        stats = {"meta_loss": float(loss.float().item()), "v_norm": float(global_norm(v).item())}
    if not (math.isfinite(stats["meta_loss"]) and math.isfinite(stats["v_norm"])):
        return _skipped(meta_params, stats, "nonfinite_v")
    if not lean:
        if adapt and optimizer is not None:
            # u overwrites v in place, except where autograd returned one tensor for a parameter in both θ and λ
            direct_ids = {id(d) for d in direct}
            v = [t.clone() if id(t) in direct_ids else t for t in v]
            u = apply_adaptation_(optimizer, base_params, last_grads, v, bias_correction=bias_correction)
        else:
            u = v
    u_norm = float(global_norm(u).item())
    stats["u_norm"] = u_norm
    if not math.isfinite(u_norm):
        return _skipped(meta_params, stats, "nonfinite_u")
    if u_norm == 0.0:  # nothing to perturb along (e.g. LoRA B = 0 at init): the implicit part is zero
        stats["eps"] = 0.0
        return MetaGradients(direct, stats)
    eps = alpha / u_norm
    stats["eps"] = eps
    implicit, finite = central_difference(
        base_params,
        meta_params,
        base_loss,
        u,
        eps,
        restore=restore,
        workspace=workspace,
        base_step_hook=base_step_hook,
        share_rng=share_rng,
        save_theta=not (lean and not restore and base_step_hook is None and _all_wide_floats(base_params)),
    )
    if not finite:
        return _skipped(meta_params, stats, "nonfinite_fd")
    with torch.no_grad():
        grads = torch._foreach_sub(direct, implicit)
    return MetaGradients(grads, stats)


# ----------------------------------------------------------------------------------------------------------------
# methods


@register_method("sama", adaptive=True)
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
    Options: ``bias_correction`` (True), ``restore`` (True; False leaves θ at θ - εu), ``workspace``,
    ``base_step_hook``, ``share_rng`` (True), ``loss_scale`` (1.0; scales L_meta's backward, e.g. for fp16),
    ``consume_grads`` (False; True lets the method overwrite ``last_grads``: u is formed in them as the backward
    produces v, so no θ-sized v is allocated, and with ``restore=False``, no ``base_step_hook`` and float32/64
    parameters no copy of θ is kept either — θ ends at θ - εu up to rounding).
    """
    if optimizer is not None:
        check_adaptation_supported(optimizer)
    return _finite_difference_method(
        base_params,
        meta_params,
        base_loss,
        meta_loss,
        optimizer=optimizer,
        last_grads=last_grads,
        alpha=alpha,
        adapt=True,
        **options,
    )


@register_method("sama-na")
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
    """SAMA without algorithmic adaptation: u = v whatever the base optimizer (the paper's SAMA-NA ablation)."""
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


from . import meta_gradient_baselines  # noqa: E402,F401  (registers t1t2, neumann, cg, unrolled)
