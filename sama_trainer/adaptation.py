"""Algorithmic adaptation: the diagonal Jacobian du/dg of a base optimizer's update u with respect to the gradient g.

SAMA replaces the inverse base Hessian of the implicit-function theorem by du/dg, the (diagonal) Jacobian of the
step the base optimizer just took. Here ``u = θ_before - θ_after`` is the descent step, so for plain SGD
``du/dg = lr``. Everything is elementwise, so it works per parameter shard (DDP, FSDP) as well.

Supported out of the box: ``torch.optim.SGD`` (momentum, nesterov, weight decay), ``torch.optim.Adam`` and
``torch.optim.AdamW`` (L2 or decoupled weight decay, amsgrad, bias correction; foreach/fused variants share the
state layout) and any subclass of them. Other optimizers raise :class:`UnsupportedOptimizerError` unless a rule is
registered with :func:`register_adaptation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


__all__ = [
    "UnsupportedOptimizerError",
    "adaptation_diagonal",
    "adaptation_diagonal_into_",
    "adaptation_diagonal_rows",
    "apply_adaptation_",
    "check_adaptation_supported",
    "register_adaptation",
    "supported_optimizers",
]

# rule(param, grad, group, state, bias_correction) -> diag tensor (or a Python float for constant diagonals)
AdaptationRule = Callable[[torch.Tensor, torch.Tensor | None, dict, dict, bool], "torch.Tensor | float"]

_RULES: dict[type, AdaptationRule] = {}


class UnsupportedOptimizerError(TypeError):
    """Raised when no du/dg rule is known for an optimizer."""


def register_adaptation(optimizer_cls: type) -> Callable[[AdaptationRule], AdaptationRule]:
    """Register a du/dg rule for ``optimizer_cls`` (and its subclasses).

    The rule is called as ``rule(param, grad, param_group, state, bias_correction)`` right after
    ``optimizer.step()`` and returns the diagonal of du/dg for ``param`` (a tensor shaped like it, or a float).
    """

    def decorator(rule: AdaptationRule) -> AdaptationRule:
        _RULES[optimizer_cls] = rule
        return rule

    return decorator


def supported_optimizers() -> list[str]:
    """Names of the optimizer classes with a registered du/dg rule."""
    return sorted(cls.__name__ for cls in _RULES)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`.
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def _find_rule(optimizer: torch.optim.Optimizer) -> AdaptationRule:
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    raise UnsupportedOptimizerError(
        f"SAMA has no adaptation rule (du/dg) for {type(optimizer).__name__}. Supported: "
        f"{', '.join(supported_optimizers())} (and subclasses). Use one of them (e.g. TrainingArguments "
        "optim='adamw_torch'), choose meta_gradient='sama-na' (identity adaptation), or register a rule with "
        "sama_trainer.adaptation.register_adaptation."
    )


def check_adaptation_supported(optimizer: Any) -> None:
    """Raise :class:`UnsupportedOptimizerError` (naming the supported optimizers) if ``optimizer`` has no rule."""
    opt = unwrap_optimizer(optimizer)
    _find_rule(opt)
    for group in opt.param_groups:
        if group.get("maximize", False):
            raise UnsupportedOptimizerError("SAMA adaptation does not support maximize=True optimizers.")


# Rules are elementwise, so large tensors are processed in chunks: a rule's float32 temporaries then stay small
# instead of several copies of the largest parameter (e.g. a word embedding). Rules with a foreach form (Adam) process
# a bucket of chunks with a few multi-tensor kernels. On a CPU, chunks of 2^17 elements keep a bucket's temporaries
# in cache (measured fastest on BERT-sized models); on a GPU a per-tensor rule is bound by kernel launches, so there
# buckets are larger. The adaptation runs while no activations are alive, so its temporaries stay far below the
# training step's peak memory.
CHUNK_ELEMENTS = 1 << 17
CUDA_CHUNK_ELEMENTS = 1 << 22


def _chunk_elements(p: torch.Tensor) -> int:
    return CUDA_CHUNK_ELEMENTS if p.device.type == "cuda" else CHUNK_ELEMENTS


def _parts(p: torch.Tensor, g: torch.Tensor | None, state: dict, chunk: int | None):
    """(flat slice or None, param, grad, state) over consecutive flat chunks of ``p`` (the whole tensors if small)."""
    n = p.numel()
    if chunk is None or n <= chunk or not p.is_contiguous():
        yield None, p, g, state
        return
    flat = {k: v.reshape(-1) for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() == n}
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        part = {**state, **{k: v[start:end] for k, v in flat.items()}}
        yield slice(start, end), p.reshape(-1)[start:end], None if g is None else g.reshape(-1)[start:end], part


def _checked_groups(opt: torch.optim.Optimizer, params, grads) -> tuple[dict[int, dict], list]:
    group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    if grads is None:
        grads = [None] * len(params)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for p in params:
        if id(p) not in group_of:
            raise ValueError("a base parameter is not managed by the optimizer; pass only the optimizer's parameters")
    return group_of, list(grads)


def _iter_diagonals(
    optimizer: Any,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None] | None,
    bias_correction: bool,
):
    """Yields (parameter index, diagonal) for each parameter, the rule applied to whole tensors."""
    opt = unwrap_optimizer(optimizer)
    rule = _find_rule(opt)
    group_of, grads = _checked_groups(opt, params, grads)
    for i, (p, g) in enumerate(zip(params, grads)):
        yield i, rule(p, g, group_of[id(p)], opt.state.get(p, {}), bias_correction)


@torch.no_grad()
def adaptation_diagonal(
    optimizer: Any,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None] | None,
    *,
    bias_correction: bool = True,
) -> list[torch.Tensor]:
    """Diagonal of du/dg for the step ``optimizer`` just took, one tensor per parameter.

    Args:
        optimizer: the base optimizer, called right after its ``step()`` (wrappers with ``.optimizer`` are unwrapped).
        params: the parameters to adapt (all must belong to the optimizer).
        grads: the gradients the optimizer used in that step (after clipping/unscaling). Adam needs them;
            SGD ignores them.
        bias_correction: include Adam's bias correction (exact for torch). ``False`` drops it, as the authors'
            reference implementation does (it then matches that implementation up to where Adam's eps sits).
    """
    out = []
    for i, diag in _iter_diagonals(optimizer, params, grads, bias_correction):
        out.append(diag if isinstance(diag, torch.Tensor) else torch.full_like(params[i], float(diag)))
    return out


def _step_counts(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[float | None]:
    """Each parameter's optimizer step count (None where it has none), read with one host copy per device.

    Fused and capturable optimizers keep ``step`` on the parameter's device: reading it parameter by parameter would
    wait on the device once per tensor.
    """
    steps = [opt.state.get(p, {}).get("step") for p in params]
    out = [None if s is None or isinstance(s, torch.Tensor) else float(s) for s in steps]
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(steps):
        if isinstance(s, torch.Tensor):
            by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([steps[i].detach().reshape(()) for i in idx]).to(torch.float64).tolist()  # one cast
        for i, v in zip(idx, values):
            out[i] = v
    return out


class _Bucket:
    """Chunks that one foreach call adapts together (same param group, step count, device and dtype)."""

    def __init__(self, group: dict, step: float) -> None:
        self.group, self.step = group, step
        self.targets, self.params, self.grads, self.states, self.numel = [], [], [], [], 0

    def add(self, target: torch.Tensor, p: torch.Tensor, g: torch.Tensor | None, state: dict) -> None:
        self.targets.append(target)
        self.params.append(p)
        self.grads.append(g)
        self.states.append(state)
        self.numel += p.numel()


def _rows_of(p: torch.Tensor, state: dict, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The values of ``p`` and of its per-element optimizer state on the rows ``rows`` of dim 0 (copies)."""
    n = p.numel()
    part = {k: v.index_select(0, rows) if torch.is_tensor(v) and v.numel() == n else v for k, v in state.items()}
    return p.detach().index_select(0, rows), part


def _bucketed_diagonals(optimizer, params, grads, tensors, bias_correction, rows=None):
    """Yields (views of ``tensors``, du/dg of those views) over every parameter chunk, a bucket at a time.

    ``rows`` (one index tensor per parameter) restricts each parameter to those rows of dim 0: ``grads`` and
    ``tensors`` then hold those rows only.
    """
    opt = unwrap_optimizer(optimizer)
    rule = _find_rule(opt)
    foreach_rule = _FOREACH_RULES.get(rule)
    group_of, grads = _checked_groups(opt, params, grads)
    groups = [group_of[id(p)] for p in params]
    states = [opt.state.get(p, {}) for p in params]
    steps = _step_counts(opt, params) if foreach_rule is not None else [None] * len(params)
    if rows is not None:
        params, states = zip(*(_rows_of(p, state, r) for p, state, r in zip(params, states, rows)))
    open_buckets: dict[tuple, _Bucket] = {}
    for p, g, target, group, state, step in zip(params, grads, tensors, groups, states, steps):
        chunk = _chunk_elements(p)
        eligible = step is not None and foreach_rule is not None and foreach_rule.accepts(p, g, group, state)
        key = (id(group), step, p.device, p.dtype) if eligible else None
        for part, part_p, part_g, part_state in _parts(p, g, state, chunk):
            view = target if part is None else target.view(-1)[part]
            if key is None:
                yield [view], [rule(part_p, part_g, group, part_state, bias_correction)]
                continue
            bucket = open_buckets.setdefault(key, _Bucket(group, step))
            bucket.add(view, part_p, part_g, part_state)
            if bucket.numel >= chunk:
                del open_buckets[key]
                yield bucket.targets, foreach_rule(bucket, bias_correction)
    for bucket in open_buckets.values():
        yield bucket.targets, foreach_rule(bucket, bias_correction)


def _write_diagonals(diagonals) -> None:
    for views, diags in diagonals:
        if len(views) == 1 and not isinstance(diags[0], torch.Tensor):
            views[0].fill_(float(diags[0]))
        else:
            torch._foreach_copy_(views, diags)


@torch.no_grad()
def apply_adaptation_(
    optimizer: Any,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None] | None,
    vectors: Sequence[torch.Tensor],
    *,
    bias_correction: bool = True,
) -> list[torch.Tensor]:
    """Multiply ``vectors`` in place by du/dg, chunk by chunk (no full-size diagonal is kept). Returns them."""
    for views, diags in _bucketed_diagonals(optimizer, params, grads, vectors, bias_correction):
        if len(views) == 1 and not isinstance(diags[0], torch.Tensor):
            views[0].mul_(diags[0])
        else:
            torch._foreach_mul_(views, [d.to(v.dtype) for v, d in zip(views, diags)])
    return list(vectors)


@torch.no_grad()
def adaptation_diagonal_into_(
    optimizer: Any,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None] | None,
    out: Sequence[torch.Tensor],
    *,
    bias_correction: bool = True,
) -> list[torch.Tensor]:
    """Write the diagonal of du/dg into ``out`` chunk by chunk (``out`` may be ``grads`` itself: each chunk of the
    gradient is read before it is overwritten). Returns ``out``."""
    _write_diagonals(_bucketed_diagonals(optimizer, params, grads, out, bias_correction))
    return list(out)


@torch.no_grad()
def adaptation_diagonal_rows(
    optimizer: Any,
    param: torch.Tensor,
    grad_rows: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    bias_correction: bool = True,
) -> torch.Tensor:
    """The rows ``rows`` (indices into dim 0) of ``param``'s du/dg diagonal, from the last gradient's values on those
    rows (``grad_rows``).

    Rules are elementwise, so the result equals those rows of :func:`adaptation_diagonal` bit for bit; a direction
    that is zero outside a few rows (the embedding rows a meta batch touched) needs du/dg on those rows only.
    """
    out = torch.empty((len(rows),) + tuple(param.shape[1:]), dtype=param.dtype, device=param.device)
    _write_diagonals(_bucketed_diagonals(optimizer, [param], [grad_rows], [out], bias_correction, rows=[rows]))
    return out


def _lr(group: dict) -> float:
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


@register_adaptation(torch.optim.SGD)
def _sgd_rule(p, g, group, state, bias_correction) -> float:
    """θ ← θ - lr·d, d = buf (or g + μ·buf with nesterov), buf = μ·buf + (1 - dampening)·(g + wd·θ).

    torch's first momentum step sets buf = g without dampening; SGD keeps no step count, so with dampening > 0 the
    rule is exact from the second step on (with the default dampening = 0 it is exact on every step).
    """
    lr, momentum = _lr(group), group.get("momentum", 0.0)
    if group.get("maximize", False):
        raise UnsupportedOptimizerError("SAMA adaptation does not support maximize=True optimizers.")
    if momentum == 0:
        return lr
    dampening = float(group.get("dampening", 0.0))
    if group.get("nesterov", False):
        return lr * (1.0 + momentum * (1.0 - dampening))
    return lr * (1.0 - dampening)


@register_adaptation(torch.optim.Adam)
def _adam_rule(p, g, group, state, bias_correction) -> torch.Tensor | float:
    """Exact du/dg of torch Adam/AdamW (L2 or decoupled weight decay, amsgrad, optional bias correction).

    With m, s the moments after the step, c1 = 1 - β1^t, c2 = sqrt(1 - β2^t), D = sqrt(ŝ)/c2 + eps:
    u = lr/c1 · m/D  ⇒  du/dg = lr/c1 · [(1-β1)/D - (1-β2)·g_eff·m / (c2·sqrt(ŝ)·D²)·[ŝ is s]]
    where g_eff = g + wd·θ_before for L2 decay (reconstructed from θ_after) and ŝ = s (or max_exp_avg_sq with amsgrad,
    whose derivative w.r.t. g vanishes where the running max did not come from this step).
    """
    if group.get("maximize", False):
        raise UnsupportedOptimizerError("SAMA adaptation does not support maximize=True optimizers.")
    if "exp_avg" not in state:  # the optimizer has not stepped this parameter yet: u did not depend on g
        return 0.0
    if g is None:
        raise ValueError("Adam adaptation needs the gradients of the last optimizer step (last_grads)")
    beta1, beta2 = group["betas"]
    beta1, beta2 = float(beta1), float(beta2)
    eps, lr, wd = float(group["eps"]), _lr(group), float(group.get("weight_decay", 0.0))
    step = state["step"]
    t = float(step.item() if isinstance(step, torch.Tensor) else step)
    work = torch.promote_types(p.dtype, torch.float32)  # at least fp32 (du/dg cancels strongly early in training)
    m = state["exp_avg"].to(work)
    s = state["exp_avg_sq"].to(work)
    g = g.to(work)
    true_c1, true_c2 = 1.0 - beta1**t, (1.0 - beta2**t) ** 0.5
    c1, c2 = (true_c1, true_c2) if bias_correction else (1.0, 1.0)
    amsgrad = group.get("amsgrad", False)
    s_hat = state["max_exp_avg_sq"].to(work) if amsgrad else s
    sqrt_s = s_hat.sqrt()
    if wd != 0.0 and not group.get("decoupled_weight_decay", False):
        # torch Adam adds wd·θ_before to g; θ_before = θ_after + lr/c1·m/D is the exact inverse of the step taken.
        theta_before = p.detach().to(work) + (lr / true_c1) * m / (sqrt_s / true_c2 + eps)
        g = g + wd * theta_before
    denom = sqrt_s / c2 + eps
    # s ≥ (1-β2)·g², so where s = 0 the gradient is 0 as well and the second term vanishes
    positive = sqrt_s > 0
    second = (1.0 - beta2) * g * m / torch.where(positive, c2 * sqrt_s * denom.square(), torch.ones_like(sqrt_s))
    second = torch.where(positive, second, torch.zeros_like(second))
    if amsgrad:
        second = torch.where(s_hat == s, second, torch.zeros_like(second))
    diag = (lr / c1) * ((1.0 - beta1) / denom - second)
    return diag.to(p.dtype)


class _AdamForeach:
    """:func:`_adam_rule` over a bucket of tensors with torch's multi-tensor (foreach) kernels.

    Covers the common case (float32/64, no amsgrad, decoupled or no weight decay); other parameters take the
    per-tensor rule. Same formula, rearranged into ten elementwise passes with three temporaries: with q = √ŝ/c2 and
    D = q + eps, du/dg = [a - b·g·m/(q·D)] / D, a = lr·(1-β1)/c1, b = lr·(1-β2)/(c1·c2²). Where s = 0 every past
    (1-β2)·g² underflowed, so |g|, |m| < ~1e-21 and g·m is 0 or subnormal: q·D clamped at the smallest normal float
    keeps the second term at 0 (at most a few 1e-6, against a first term of (1-β1)/eps) without the per-tensor
    rule's explicit mask.
    """

    @staticmethod
    def accepts(p, g, group, state) -> bool:
        if "exp_avg" not in state or g is None or group.get("maximize", False) or group.get("amsgrad", False):
            return False
        if float(group.get("weight_decay", 0.0)) != 0.0 and not group.get("decoupled_weight_decay", False):
            return False
        dtypes = {g.dtype, state["exp_avg"].dtype, state["exp_avg_sq"].dtype}
        return p.dtype in (torch.float32, torch.float64) and dtypes == {p.dtype}

    def __call__(self, bucket: _Bucket, bias_correction: bool) -> list[torch.Tensor]:
        group, t = bucket.group, bucket.step
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, lr = float(group["eps"]), _lr(group)
        c1, c2 = (1.0 - beta1**t, (1.0 - beta2**t) ** 0.5) if bias_correction else (1.0, 1.0)
        q = torch._foreach_sqrt([s["exp_avg_sq"] for s in bucket.states])
        if c2 != 1.0:
            torch._foreach_div_(q, c2)
        denom = torch._foreach_add(q, eps)
        torch._foreach_mul_(q, denom)
        torch._foreach_clamp_min_(q, torch.finfo(bucket.params[0].dtype).tiny)
        diag = torch._foreach_mul(bucket.grads, [s["exp_avg"] for s in bucket.states])
        torch._foreach_div_(diag, q)
        del q
        torch._foreach_mul_(diag, -lr * (1.0 - beta2) / (c1 * c2 * c2))
        torch._foreach_add_(diag, lr * (1.0 - beta1) / c1)
        torch._foreach_div_(diag, denom)
        return diag


_FOREACH_RULES: dict[AdaptationRule, Any] = {_adam_rule: _AdamForeach()}


# torch < 2.6 AdamW did not subclass Adam; it shares Adam's state layout and always decays decoupled.
if not issubclass(torch.optim.AdamW, torch.optim.Adam):  # pragma: no cover - old torch only
    register_adaptation(torch.optim.AdamW)(
        lambda p, g, group, state, bc: _adam_rule(p, g, {**group, "decoupled_weight_decay": True}, state, bc)
    )
