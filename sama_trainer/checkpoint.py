"""The meta side of a checkpoint: what is saved, written atomically, and which checkpoint a resumed run may use.

A checkpoint folder of :class:`~sama_trainer.SAMATrainer` holds, besides what ``Trainer`` writes:

* ``sama_meta_state.pt`` (written by the main process): meta network, meta optimizer, counters, world size;
* ``sama_rank_state_<rank>.pt`` (one per rank): that rank's position in its meta-data shard and the weight history
  it recorded.

Every file is written to a temporary name and renamed, so a file is either complete or absent. A folder is complete
when ``trainer_state.json`` (the last file ``Trainer`` writes) parses and the meta files are there; a resumed run
never starts from an incomplete one (:func:`resolve_resume_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch


__all__ = [
    "META_STATE_NAME",
    "IncompleteCheckpointError",
    "atomic_save",
    "checkpoint_problem",
    "rank_state_name",
    "resolve_resume_checkpoint",
]

META_STATE_NAME = "sama_meta_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder that was not completely written (e.g. the process was killed while saving it)."""


def rank_state_name(rank: int) -> str:
    return f"sama_rank_state_{rank}.pt"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it to ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_problem(folder: str, rank: int = 0) -> str | None:
    """Why ``folder`` cannot be resumed from by ``rank`` (None if it can)."""
    state = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE_NAME} is unreadable ({err})"
    for name in (META_STATE_NAME, rank_state_name(rank)):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing (the checkpoint was not written by SAMATrainer, or not completely)"
    return None


def _agreed(ok: bool) -> bool:
    """``ok`` on every rank (one all-reduce under DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` folders of ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return [
        os.path.join(output_dir, d)
        for _, d in sorted(steps, reverse=True)
        if os.path.isdir(os.path.join(output_dir, d))
    ]


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str, rank: int = 0) -> str | bool | None:
    """The checkpoint folder a run resumes from.

    ``True``: the newest *complete* checkpoint in ``output_dir`` (a warning names each newer, incomplete one; no
    complete one raises :class:`IncompleteCheckpointError` naming them). A folder: itself if complete, else
    :class:`IncompleteCheckpointError` naming it and what is missing. Under DDP the ranks agree on the folder.
    """
    if resume is None or resume is False:
        return resume
    if resume is True:
        broken = []
        for folder in _checkpoints(output_dir):
            problem = checkpoint_problem(folder, rank)
            if _agreed(problem is None):
                for name, why in broken:
                    warnings.warn(f"not resuming from {name}: {why}; using {folder}", UserWarning, stacklevel=3)
                return folder
            broken.append((folder, problem or "incomplete on another rank"))
        if broken:
            listing = "; ".join(f"{name}: {why}" for name, why in broken)
            raise IncompleteCheckpointError(f"no complete checkpoint in {output_dir} to resume from ({listing})")
        return True  # no checkpoint at all: Trainer raises its own error
    problem = checkpoint_problem(resume, rank)
    if not _agreed(problem is None):
        raise IncompleteCheckpointError(
            f"cannot resume from {resume}: {problem or 'incomplete on another rank'}. Resume from an earlier "
            "checkpoint, or pass resume_from_checkpoint=True to take the newest complete one."
        )
    return resume
