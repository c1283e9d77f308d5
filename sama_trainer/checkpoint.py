"""The meta side of a checkpoint: what is saved, written atomically, and which checkpoint a resumed run may use.

A checkpoint folder of :class:`~sama_trainer.SAMATrainer` holds, besides what ``Trainer`` writes:

* ``sama_meta_state.pt`` (written by the main process): meta network, meta optimizer, counters, world size;
* ``sama_rank_state_<rank>.pt`` (one per rank): that rank's position in its meta-data shard and the weight history
  it recorded.

Every file is written to a temporary name and renamed, so a file is either complete or absent. Each rank writes its
state file after all its other files; the main process writes ``trainer_state.json`` after all of its own and after
every rank has written its part (:class:`~sama_trainer.SAMATrainer` makes the ranks wait for each other there). A
folder is complete for a rank when ``trainer_state.json`` parses, the meta state is there and so is the rank's state
file (unless the checkpoint was written by fewer processes; on storage that is not shared between nodes a rank sees
only its own node's files). A resumed run never starts from an incomplete folder (:func:`resolve_resume_checkpoint`);
under DDP the ranks agree on the folder.
"""

from __future__ import annotations

import json
import math
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
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename it to ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(path) or ".")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _written_by(folder: str) -> int:
    """The number of processes that wrote the checkpoint (from its meta state)."""
    state = torch.load(os.path.join(folder, META_STATE_NAME), map_location="cpu", weights_only=True)
    return int(state.get("world_size", 1))


def checkpoint_problem(folder: str, rank: int = 0) -> str | None:
    """Why ``folder`` cannot be resumed from by ``rank`` (None if it can)."""
    if not os.path.isdir(folder):
        return "no such folder"
    state = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE_NAME} is unreadable ({err})"
    if not os.path.isfile(os.path.join(folder, META_STATE_NAME)):
        return f"{META_STATE_NAME} is missing (the checkpoint was not written by SAMATrainer, or not completely)"
    name = rank_state_name(rank)
    if not os.path.isfile(os.path.join(folder, name)) and rank < _written_by(folder):
        return f"{name} is missing (process {rank} did not finish writing its part)"
    return None


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed() -> bool:
    return _world_size() > 1


def _all_reduce(values: list[float], op: str) -> list[float]:
    """``values`` reduced over the ranks with ``op`` ("sum" or "max"); themselves in a single process."""
    if not _distributed():
        return values
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def _problem_on_any_rank(problem: str | None, rank: int) -> str | None:
    """This rank's ``problem``, or which other ranks have one (one all-reduce under DDP); None if no rank has."""
    world_size = _world_size()
    flags = [0.0] * world_size
    flags[rank] = float(problem is not None)
    failing = [r for r, flag in enumerate(_all_reduce(flags, "sum")) if flag > 0]
    if problem is not None or not failing:
        return problem
    return f"incomplete for process(es) {', '.join(map(str, failing))} (see their warnings)"


def _checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the ``checkpoint-<step>`` folders of ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [
        int(m.group(1))
        for d in os.listdir(output_dir)
        if (m := re.fullmatch(r"checkpoint-(\d+)", d)) and os.path.isdir(os.path.join(output_dir, d))
    ]
    return sorted(steps, reverse=True)


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str, rank: int = 0) -> str | bool | None:
    """The checkpoint folder a run resumes from.

    ``True``: the newest *complete* checkpoint in ``output_dir`` (a warning names each newer, incomplete one; no
    complete one raises :class:`IncompleteCheckpointError` naming them). A folder: itself if complete, else
    :class:`IncompleteCheckpointError` naming it and what is missing. Under DDP every rank must call it: the ranks
    walk the candidates together, newest first (the same number of collectives even where their folders differ),
    and take the first that is complete on all of them.
    """
    if resume is None or resume is False:
        return resume
    if resume is True:
        broken: list[tuple[str, str]] = []
        local = _checkpoint_steps(output_dir)
        below = math.inf
        while True:
            step = int(_all_reduce([max((s for s in local if s < below), default=-1)], "max")[0])
            if step < 0:
                break
            below = step
            folder = os.path.join(output_dir, f"checkpoint-{step}")
            problem = _problem_on_any_rank(checkpoint_problem(folder, rank), rank)
            if problem is None:
                for name, why in broken:
                    warnings.warn(f"not resuming from {name}: {why}; using {folder}", UserWarning, stacklevel=3)
                return folder
            broken.append((folder, problem))
        if broken:
            listing = "; ".join(f"{name}: {why}" for name, why in broken)
            raise IncompleteCheckpointError(f"no complete checkpoint in {output_dir} to resume from ({listing})")
        return True  # no checkpoint at all: Trainer raises its own error
    problem = _problem_on_any_rank(checkpoint_problem(resume, rank), rank)
    if problem is not None:
        raise IncompleteCheckpointError(
            f"cannot resume from {resume}: {problem}. Resume from an earlier checkpoint, or pass "
            "resume_from_checkpoint=True to take the newest complete one."
        )
    return resume
