"""Meta-gradient methods: small functions with one signature over closures and parameter lists.

``registry`` (the common call and result type), ``core`` (building blocks), one module per family: ``sama``
(sama, sama-na, t1t2: one finite difference), ``implicit`` (neumann, cg) and ``unrolled`` (one-step lookahead), the
last two on the helpers of ``second_order``. Importing the package registers every method.
"""

from . import implicit, sama, unrolled  # noqa: F401  (register the methods)
from .core import (
    Perturbation,
    adapted_meta_loss_gradients,
    central_difference,
    global_norm,
    grads_or_zeros,
    meta_loss_gradients,
    meta_loss_stats,
)
from .prefix_cache import PrefixCache
from .registry import (
    SKIP_REASONS,
    Agreement,
    LossClosure,
    MetaGradients,
    available_methods,
    default_alpha,
    get_method,
    is_adaptive,
    is_second_order,
    local_agreement,
    meta_gradient,
    register_method,
)


__all__ = [
    "SKIP_REASONS",
    "Agreement",
    "LossClosure",
    "MetaGradients",
    "Perturbation",
    "PrefixCache",
    "adapted_meta_loss_gradients",
    "available_methods",
    "central_difference",
    "default_alpha",
    "get_method",
    "global_norm",
    "grads_or_zeros",
    "is_adaptive",
    "is_second_order",
    "local_agreement",
    "meta_gradient",
    "meta_loss_gradients",
    "meta_loss_stats",
    "register_method",
]
