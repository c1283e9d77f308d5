"""Collectives of the meta step under DDP: one agreement per meta step folded into the meta-gradient all-reduce.

Each rank computes its meta-gradient locally (its own meta shard and base batch). Whether a rank must skip (a
non-finite value, a skipped base step, an exception) changes which collectives it would issue next, so every rank
first sends its meta-gradient together with one flag per skip reason in a single all-reduce: all ranks then see the
same flags and take the same branch, and on the good path this costs no extra round trip.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from .meta_gradient import SKIP_REASONS


__all__ = [
    "MetaStepFailedOnAnotherRank",
    "RankAgreement",
    "all_reduce_mean_",
    "apply_ddp_timeout",
    "end_process_group",
]


class MetaStepFailedOnAnotherRank(RuntimeError):
    """Raised on the ranks whose meta step went fine when another rank's meta step raised an exception."""


def apply_ddp_timeout(seconds: float) -> None:
    """Make ``seconds`` the collective timeout of a gloo (CPU) process group.

    ``TrainingArguments`` hands ``ddp_timeout`` to the process group on GPUs only; a CPU job would otherwise wait
    torch's default of 30 minutes for a rank that stopped answering.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))


def end_process_group() -> None:
    """Destroy the default process group, if there is one, at the end of a finished multi-process run.

    ``Trainer`` leaves the group alive; a gloo process that exits with it can abort in torch's teardown ("terminate
    called without an active exception", SIGABRT), so the launcher reports a failure for a run that wrote every
    output. Call this once after the last collective; a no-op in a single process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat buffer for a single collective, in float32 or wider (float64 tensors are not rounded)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _copy_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the consecutive slices of ``flat`` into ``tensors`` (the inverse of :func:`_flat`)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_mean_(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` across ranks in place with one collective (no-op for one process)."""
    if world_size <= 1 or not tensors:
        return
    flat = _flat(tensors)
    dist.all_reduce(flat)
    flat /= world_size
    _copy_into(tensors, flat)


class RankAgreement:
    """The :data:`~sama_trainer.meta_gradient.Agreement` of a DDP job: sums ``[meta-gradients, skip flags]``.

    If no rank flags a reason, the meta-gradients become their mean over ranks; otherwise every rank skips the step
    with the reasons of all ranks. A rank whose meta step raised re-raises its own exception after the collective;
    the other ranks raise :class:`MetaStepFailedOnAnotherRank`, so the whole job ends instead of waiting for a rank
    that is gone.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size

    def __call__(self, grads: list[torch.Tensor], reason: str | None) -> tuple[bool, list[str]]:
        device = grads[0].device if grads else torch.device("cpu")
        flags = torch.zeros(len(SKIP_REASONS), device=device)
        if reason is not None:
            flags[SKIP_REASONS.index(reason)] = 1.0
        flat = _flat([*grads, flags])
        dist.all_reduce(flat)
        counts = flat[-len(SKIP_REASONS) :].tolist()
        seen = {r: int(c) for r, c in zip(SKIP_REASONS, counts) if c > 0}
        if seen.get("error") and reason != "error":
            raise MetaStepFailedOnAnotherRank(
                f"the meta step raised an exception on {seen['error']} other rank(s) of {self.world_size}; "
                "its traceback is in that rank's output"
            )
        if seen:
            return False, list(seen)
        flat /= self.world_size
        _copy_into(grads, flat)
        return True, []
