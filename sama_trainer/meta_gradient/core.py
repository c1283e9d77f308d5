"""Building blocks shared by the meta-gradient methods: gradients of the meta loss, the adapted direction u formed in
place, norms, and the ±εd perturbation of θ behind every finite difference."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..adaptation import adaptation_diagonal_into_, adaptation_diagonal_rows
from .registry import LossClosure


__all__ = [
    "Perturbation",
    "adapted_meta_loss_gradients",
    "central_difference",
    "global_norm",
    "grads_or_zeros",
    "meta_loss_gradients",
    "meta_loss_stats",
]


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


def meta_loss_stats(loss: torch.Tensor, v_norm: torch.Tensor) -> dict[str, float]:
    """The stats every method logs of its meta loss: ``meta_loss`` = L_meta and ``v_norm`` = ‖∂L_meta/∂θ‖₂."""
    return {"meta_loss": float(loss.float().item()), "v_norm": float(v_norm.item())}


# A gradient with at least this many rows is taken for a lookup table (a vocabulary embedding): after a step its
# gradient is usually non-zero on the rows the batch touched only.
TABLE_MIN_ROWS = 8192


def _nonzero_rows(t: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``t`` with a non-zero (or NaN) entry (two max/min reductions: the fastest exact test)."""
    t = t.flatten(1)
    return (t.amax(dim=1).ne(0) | t.amin(dim=1).ne(0)).nonzero().squeeze(1)


def _sparse_table_rows(g: torch.Tensor | None) -> torch.Tensor | None:
    """The non-zero rows of ``g`` if it is a table gradient with at most half of its rows non-zero, else None."""
    if g is None or g.dim() < 2 or g.shape[0] < TABLE_MIN_ROWS:
        return None
    rows = _nonzero_rows(g)
    return rows if 2 * rows.numel() <= g.shape[0] else None


def _owns_storage(t: torch.Tensor) -> bool:
    storage = t.untyped_storage()
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and storage.resizable()
        and storage.nbytes() == t.numel() * t.element_size()
    )


def _select_rows(rows: torch.Tensor, stored_rows: torch.Tensor, stored: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows ``rows`` of a tensor that is zero except for the rows ``stored_rows`` (which hold ``stored``)."""
    out = stored.new_zeros((len(rows),) + tuple(stored.shape[1:]))
    position = torch.full((num_rows,), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(len(rows), device=rows.device)
    hit = position[stored_rows]
    keep = hit >= 0
    out[hit[keep]] = stored[keep]
    return out


def _compact_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views shaped like ``tensors`` into one new contiguous block per dtype and device.

    Gradients are allocated one by one during a backward, between activations; buffers that must stay alive through
    the meta forward fragment the host heap less as one block (measured on CPU with glibc: peak RSS of the meta step
    at batch 16 is ~40 MB lower than with the buffers left in place).
    """
    blocks: dict[tuple, int] = {}
    for t in tensors:
        blocks[(t.dtype, t.device)] = blocks.get((t.dtype, t.device), 0) + t.numel()
    storage = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in blocks.items()}
    offset = dict.fromkeys(blocks, 0)
    views = []
    for t in tensors:
        key = (t.dtype, t.device)
        views.append(storage[key][offset[key] : offset[key] + t.numel()].view(t.shape))
        offset[key] += t.numel()
    return views


class _DeferredBuffers:
    """Buffers whose u is formed in the hook, from v, instead of holding du/dg through the meta forward.

    * With an optimizer: table parameters whose last gradient is non-zero on few rows (an embedding after a step).
      Only those rows of the gradient are kept; du/dg is computed in the hook on the rows the meta batch touched
      (where v is non-zero), which gives the same u as the whole-table du/dg for a fraction of the work.
    * Without one (u = v): every buffer; the hook copies v into it.

    While deferred, a buffer that owns its storage gives it up, so during the meta forward (the step's memory peak)
    it holds no memory; it gets it back (zeroed) when its hook runs, or in :meth:`close`.
    """

    def __init__(self, optimizer, base_params, buffers, last_grads, bias_correction):
        self.optimizer, self.bias_correction = optimizer, bias_correction
        self.params, self.buffers = base_params, buffers
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # i -> (non-zero rows of g, g on them)
        if optimizer is None:
            self.indices = set(range(len(buffers)))
        else:
            for i, g in enumerate(last_grads or []):
                rows = _sparse_table_rows(g)
                if rows is not None:
                    self.tables[i] = (rows, g.index_select(0, rows))
            self.indices = set(self.tables)
        self.released = {i for i in self.indices if _owns_storage(buffers[i])}
        for i in self.released:
            buffers[i].untyped_storage().resize_(0)

    def _zeroed(self, i: int) -> torch.Tensor:
        buffer = self.buffers[i]
        if i in self.released:
            buffer.untyped_storage().resize_(buffer.numel() * buffer.element_size())
            self.released.discard(i)
        return buffer.zero_()

    def form_u(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """Write u = (du/dg) ⊙ v into buffer ``i`` and return it."""
        buffer = self._zeroed(i)
        if self.optimizer is None:
            return buffer.copy_(v)
        rows = _nonzero_rows(v)
        stored_rows, stored = self.tables[i]
        g = _select_rows(rows, stored_rows, stored, v.shape[0])
        diag = adaptation_diagonal_rows(self.optimizer, self.params[i], g, rows, bias_correction=self.bias_correction)
        return buffer.index_copy_(0, rows, diag.mul_(v.index_select(0, rows)))

    def close(self) -> None:
        """Give every buffer still without storage its memory back (zeroed)."""
        for i in list(self.released):
            self._zeroed(i)


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
    slice of v into its buffer as soon as the backward produces it, and v's slice is freed at once. Buffers that
    need no du/dg before the backward (identity; embedding tables whose last gradient touched few rows) hold no
    memory during the meta forward and are formed in their hook (see :class:`_DeferredBuffers`).
    Returns (L_meta detached, ‖v‖₂, u = ``buffers``, direct = ∂L_meta/∂λ).
    """
    base_params, buffers = list(base_params), list(buffers)
    with torch.no_grad():
        deferred = _DeferredBuffers(optimizer, base_params, buffers, last_grads, bias_correction)
        if optimizer is not None:
            now = [i for i in range(len(base_params)) if i not in deferred.indices]
            compact = _compact_views([buffers[i] for i in now])
            adaptation_diagonal_into_(
                optimizer,
                [base_params[i] for i in now],
                [last_grads[i] for i in now] if last_grads is not None else None,
                compact,
                bias_correction=bias_correction,
            )
            for i, view in zip(now, compact):  # the buffers move into the block; their old storage is freed
                buffers[i].set_(view)
    norms: list[torch.Tensor] = []
    reached = [False] * len(base_params)

    def hook_for(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if loss_scale != 1.0:
                    grad = grad / loss_scale
                norms.append(torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)))
                if i in deferred.indices:
                    deferred.form_u(i, grad)
                else:
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
            deferred.close()
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


class _ReplayMismatch(RuntimeError):
    """The second pass asked for other random draws than the first one made."""


# random ops whose result depends only on the RNG state and on scalar arguments and shapes, not on tensor values
_REPLAYABLE = {
    torch.ops.aten.bernoulli_.float,
    torch.ops.aten.uniform_.default,
    torch.ops.aten.normal_.default,
    torch.ops.aten.exponential_.default,
    torch.ops.aten.random_.default,
    torch.ops.aten.random_.to,
}


class _RandomDraws(TorchDispatchMode):
    """Records the random draws of a pass (CPU dropout masks are ``bernoulli_`` draws) to replay them in a second pass
    that starts from the same RNG state: that pass would draw exactly the same values, so replaying them gives the
    same results without the cost of drawing (on a CPU, dropout masks take ~15% of a forward).

    A pass with any other random op (whose values could depend on θ) is not replayed; a replaying pass whose draws do
    not match the recording raises :class:`_ReplayMismatch`, and the caller draws again from the same state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[Any, torch.Tensor]] = []
        self.replayable = True
        self._replay: list[tuple[Any, torch.Tensor]] | None = None

    def skip(self, count: int) -> None:
        """Drop the next ``count`` draws of the replay (made by a call the replaying pass does not run again)."""
        if self._replay is not None:
            if count > len(self._replay):
                raise _ReplayMismatch("skipped more draws than were recorded")
            del self._replay[len(self._replay) - count :]

    def replaying(self) -> Any:
        """This mode, set to replay the recorded draws in order (a null context if the pass is not replayable)."""
        if not (self.replayable and self.draws):
            return contextlib.nullcontext()
        self._replay = list(reversed(self.draws))
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        if self._replay is None:
            out = func(*args, **kwargs)
            if func in _REPLAYABLE:
                self.draws.append((func, out.clone()))
            else:
                self.replayable = False
            return out
        target = args[0]
        if not self._replay:
            raise _ReplayMismatch(str(func))
        recorded_func, value = self._replay.pop()
        if recorded_func is not func or value.shape != target.shape or value.dtype != target.dtype:
            raise _ReplayMismatch(str(func))
        return target.copy_(value)


class Perturbation:
    """θ moved to θ + t·ε·d for the passes of a finite difference, then back to θ or on to θ - εd.

    With a saved copy of θ (into ``workspace`` if given, e.g. gradient buffers that are no longer needed) every move
    starts from the copy, so returning to θ is bit-exact. Without one (``save=False``, float32/64 parameters only) θ
    is moved arithmetically: θ + εd, then (θ + εd) - 2εd, which equals θ - εd up to rounding and keeps no θ-sized
    copy.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        direction: Sequence[torch.Tensor],
        eps: float,
        *,
        save: bool = True,
        workspace: Sequence[torch.Tensor] | None = None,
    ):
        self.params, self.direction, self.eps = list(params), list(direction), eps
        self.saved: list[torch.Tensor] | None = None
        if save:
            with torch.no_grad():
                if workspace is None:
                    self.saved = [p.detach().clone() for p in self.params]
                else:
                    self.saved = list(workspace)
                    torch._foreach_copy_(self.saved, [p.detach() for p in self.params])
        self.position = 0.0  # θ currently sits at θ + position·d

    @torch.no_grad()
    def move_to(self, target: float) -> None:
        """Put θ at θ + target·d."""
        if target == self.position:
            return
        if self.saved is None:  # arithmetic move: exact up to rounding
            torch._foreach_add_(self.params, self.direction, alpha=target - self.position)
        else:  # from the saved copy: bit-exact
            if self.position != 0.0:
                torch._foreach_copy_(self.params, self.saved)
            if target != 0.0:
                torch._foreach_add_(self.params, self.direction, alpha=target)
        self.position = target

    def difference(
        self,
        meta_params: Sequence[torch.Tensor],
        base_loss: LossClosure,
        share_rng: bool = True,
        pass_cache: Any = None,
        replay_draws: bool = True,
    ) -> list[torch.Tensor]:
        """[∇_λ L_base(θ + εd) - ∇_λ L_base(θ - εd)] / (2ε) by two first-order passes; θ is left at θ - εd.

        With ``share_rng`` both passes see the same RNG state (the same dropout masks) and the global RNG is left as
        it was; on a CPU the second pass then replays the first pass's random draws instead of drawing them again.
        ``replay_draws=False`` leaves the draws to the RNG (the same values, drawn twice) and skips the recorder,
        which intercepts every op of the first pass: for passes that draw nothing, e.g. a model in eval mode.
        ``pass_cache`` (e.g. a :class:`~.prefix_cache.PrefixCache`) records in the first pass what does not depend
        on the perturbed parameters and returns it in the second. On an exception θ is put back first.
        """
        devices = _rng_devices(self.params) if share_rng else None
        on_cpu = all(p.device.type == "cpu" for p in self.params)
        draws = _RandomDraws() if share_rng and replay_draws and on_cpu else None

        def grads_at(target: float, mode: Any = None, cache: Any = None) -> list[torch.Tensor]:
            self.move_to(target)
            with contextlib.ExitStack() as stack:
                if devices is not None:
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    stack.enter_context(mode or contextlib.nullcontext())
                if cache is not None:
                    stack.enter_context(cache)
                return grads_or_zeros(base_loss(), meta_params)

        def cached(recording: bool, replay: Any = None) -> Any:
            if pass_cache is None:
                return None
            if recording:
                return pass_cache.recording(draws, devices)
            return pass_cache.replaying(replay, devices)

        try:
            if draws is None:
                grad_plus = grads_at(self.eps, cache=cached(True))
                grad_minus = grads_at(-self.eps, cache=cached(False))
            else:  # the second pass starts from the same RNG state: it replays the first pass's draws
                grad_plus = grads_at(self.eps, draws, cached(True))
                try:
                    replay = draws.replaying()
                    grad_minus = grads_at(-self.eps, replay, cached(False, draws if replay is draws else None))
                except _ReplayMismatch:  # e.g. a draw that depends on θ: draw again, from the same state
                    grad_minus = grads_at(-self.eps, cache=cached(False))
        except BaseException:
            self.restore()
            raise
        with torch.no_grad():
            diff = torch._foreach_sub(grad_plus, grad_minus)
            torch._foreach_div_(diff, 2.0 * self.eps)
        return diff

    def restore(self) -> None:
        """Put θ back (bit-exact with a saved copy)."""
        self.move_to(0.0)

    @torch.no_grad()
    def base_update(self, step_hook: Callable[[list[torch.Tensor]], None] | None = None, scale: float = 1.0) -> None:
        """Leave θ at θ - scale·εd; ``step_hook`` may change the step in place first (e.g. average it across ranks)."""
        if self.saved is None:
            if step_hook is not None:
                raise ValueError("a step hook needs a saved copy of θ (save=True)")
            self.move_to(-scale * self.eps)  # scale 1: where difference() left θ, nothing to do
            return
        self.move_to(0.0)
        step = torch._foreach_mul(self.direction, scale * self.eps)
        if step_hook is not None:
            step_hook(step)
        torch._foreach_sub_(self.params, step)
        self.position = float("nan")  # θ - mean step: not on the line any more


def central_difference(
    base_params: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    base_loss: LossClosure,
    direction: Sequence[torch.Tensor],
    eps: float,
    *,
    restore: bool = True,
    workspace: Sequence[torch.Tensor] | None = None,
    share_rng: bool = True,
) -> tuple[list[torch.Tensor], bool]:
    """[∇_λ L_base(θ + εd) - ∇_λ L_base(θ - εd)] / (2ε) ≈ (∂²L_base/∂λ∂θ)·d, by two first-order passes.

    θ is restored bit-for-bit, or with ``restore=False`` left at θ - εd (the paper's extra base update). Returns (the
    difference quotient, whether it is finite); a non-finite result always restores θ.
    """
    perturbation = Perturbation(base_params, direction, eps, workspace=workspace)
    diff = perturbation.difference(meta_params, base_loss, share_rng)
    finite = bool(torch.isfinite(global_norm(diff)).item()) if diff else True
    if restore or not finite:
        perturbation.restore()
    else:
        perturbation.base_update()
    return diff, finite
