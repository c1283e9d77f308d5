"""The registry of meta-gradient methods, their result type and the call that dispatches to them.

Every method is called as::

    method(base_params, meta_params, base_loss, meta_loss, *, optimizer=None, last_grads=None, alpha=..., **options)

and returns :class:`MetaGradients`: one tensor per meta parameter holding dL_meta/dλ (direct plus implicit part) and
a ``stats`` dict for logging. ``base_loss()`` evaluates the base (training) loss at the *current* values of
``base_params`` and ``meta_params``; ``meta_loss()`` the meta (validation) loss at the current base parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


__all__ = [
    "SKIP_REASONS",
    "Agreement",
    "LossClosure",
    "MetaGradients",
    "available_methods",
    "default_alpha",
    "get_method",
    "is_adaptive",
    "is_second_order",
    "local_agreement",
    "meta_gradient",
    "register_method",
]

LossClosure = Callable[[], torch.Tensor]
MetaGradientMethod = Callable[..., "MetaGradients"]

# Why a meta step can be skipped. The order is part of the distributed protocol: every rank sends one flag per reason.
SKIP_REASONS = (
    "nonfinite_v",  # L_meta or ∂L_meta/∂θ not finite
    "nonfinite_u",  # the adapted direction u not finite
    "nonfinite_fd",  # the finite difference not finite
    "nonfinite_base_grad",  # ∇_θ L_base not finite (second-order methods)
    "nonfinite_ihvp",  # the inverse-Hessian-vector product not finite
    "nonfinite_step",  # the lookahead step not finite
    "nonfinite_meta_grad",  # the meta-gradient not finite
    "base_step_skipped",  # the base optimizer skipped its step (fp16 grad-scaler overflow)
    "error",  # an exception was raised in the meta step
)

# agree(local meta-gradients, local skip reason or None) -> (every rank ok, skip reasons seen on any rank). On success
# the meta-gradients are replaced in place by their mean over ranks.
Agreement = Callable[[list[torch.Tensor], "str | None"], "tuple[bool, list[str]]"]


def local_agreement(grads: list[torch.Tensor], reason: str | None) -> tuple[bool, list[str]]:
    """The single-process agreement: ok unless this process has a skip reason."""
    return reason is None, [] if reason is None else [reason]


class MetaGradients(list):
    """Meta-gradients (one tensor per meta parameter) plus ``stats`` for logging.

    ``skipped`` is True when a non-finite quantity (or, in distributed training, a skip on another rank) stopped the
    step: the tensors are then zeros, θ is back where it was and the caller must not step the meta optimizer.
    ``stats`` holds ``skip_reason_<reason>`` = 1.0 for each reason (see :data:`SKIP_REASONS`).
    """

    def __init__(self, grads: Sequence[torch.Tensor], stats: dict[str, float] | None = None, skipped: bool = False):
        super().__init__(grads)
        self.stats = dict(stats or {})
        self.skipped = skipped
        self.stats["skipped"] = float(skipped)

    @classmethod
    def skip(cls, meta_params: Sequence[torch.Tensor], stats: dict[str, float], reasons: Sequence[str]):
        """Zeros shaped like ``meta_params``, marked skipped with ``reasons``."""
        for reason in reasons:
            stats["skip_reason_" + reason] = 1.0
        return cls([torch.zeros_like(p) for p in meta_params], stats, skipped=True)

    @property
    def skip_reasons(self) -> list[str]:
        return [k[len("skip_reason_") :] for k in self.stats if k.startswith("skip_reason_")]


@dataclass(frozen=True)
class _Method:
    fn: MetaGradientMethod
    adaptive: bool  # reads the base optimizer (needs a du/dg rule)
    second_order: bool  # differentiates through ∇_θ L_base: base_loss() must keep the graph to θ
    agrees: bool  # calls the ``agree`` option itself, exactly once (methods that move θ before the agreement)


_METHODS: dict[str, _Method] = {}


def register_method(
    name: str, *, adaptive: bool = False, second_order: bool = False, agrees: bool = False
) -> Callable[[MetaGradientMethod], MetaGradientMethod]:
    """Register a meta-gradient method under ``name`` (usable as ``SAMAConfig.meta_gradient``).

    ``adaptive``: the method reads the base optimizer (it must have a du/dg rule). ``second_order``: the method
    differentiates through ∇_θ L_base, so ``base_loss()`` must be differentiable w.r.t. θ (first-order methods get a
    base loss whose base-model forward runs without a graph). ``agrees``: the method takes the ``agree`` option and
    calls it exactly once on every path (methods that leave θ moved must agree across ranks before they do);
    for other methods :func:`meta_gradient` agrees on their result.
    """

    def decorator(fn: MetaGradientMethod) -> MetaGradientMethod:
        _METHODS[name] = _Method(fn, adaptive, second_order, agrees)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names accepted by :func:`meta_gradient`."""
    return sorted(_METHODS)


def _info(name: str) -> _Method:
    try:
        return _METHODS[name]
    except KeyError:
        available = ", ".join(available_methods())
        raise ValueError(f"unknown meta-gradient method {name!r}; available: {available}") from None


def get_method(name: str) -> MetaGradientMethod:
    """The method registered as ``name``; a ``ValueError`` naming the available ones otherwise."""
    return _info(name).fn


def is_adaptive(name: str) -> bool:
    """Whether the method reads the base optimizer's du/dg."""
    return _info(name).adaptive


def is_second_order(name: str) -> bool:
    """Whether the method differentiates through ∇_θ L_base (its base loss needs a graph to θ)."""
    return _info(name).second_order


def default_alpha(name: str) -> float | None:
    """The method's default step size ``alpha`` (None if it takes none)."""
    import inspect

    parameter = inspect.signature(get_method(name)).parameters.get("alpha")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def meta_gradient(
    method: str,
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    base_loss: LossClosure,
    meta_loss: LossClosure,
    optimizer: Any = None,
    last_grads: Sequence[torch.Tensor | None] | None = None,
    alpha: float | None = None,
    agree: Agreement | None = None,
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
        agree: distributed training: how ranks agree on skipping and average the meta-gradients (see
            :data:`Agreement`); called exactly once per call, also when the method raises, so that every rank
            issues the same collectives. Default: this process alone.
        **options: method-specific options (for SAMA: ``bias_correction``, ``restore``, ``workspace``,
            ``base_step_hook``, ``share_rng``, ``replay_draws``, ``loss_scale``, ``consume_grads``; see
            :func:`~.sama.sama`).
    """
    info = _info(method)
    kwargs = dict(optimizer=optimizer, last_grads=last_grads, **options)
    if alpha is not None:
        kwargs["alpha"] = alpha
    base_params, meta_params = list(base_params), list(meta_params)
    if info.agrees:
        return info.fn(base_params, meta_params, base_loss, meta_loss, agree=agree or local_agreement, **kwargs)
    if agree is None:
        return info.fn(base_params, meta_params, base_loss, meta_loss, **kwargs)
    try:
        grads = info.fn(base_params, meta_params, base_loss, meta_loss, **kwargs)
    except Exception:
        agree([torch.zeros_like(p) for p in meta_params], "error")
        raise
    reasons = grads.skip_reasons
    ok, seen = agree(grads, reasons[0] if reasons else None)
    if ok:
        return grads
    return MetaGradients.skip(meta_params, dict(grads.stats), seen)


def all_finite(*values: float) -> bool:
    """Whether every value is a finite number."""
    return all(math.isfinite(v) for v in values)
