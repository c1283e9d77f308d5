"""Worker for the fault tests (tests/test_faults.py): faults on one rank, killed runs, interrupted checkpoints.

Run with ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU) or as one plain process. Commands:

* ``faults``: one meta step goes wrong on rank 1 only (NaN meta loss, Inf base loss in the perturbed passes,
  ‖u‖ = 0, a skipped fp16 base step), with and without the base update; writes ``faults_rank<r>.json``.
* ``errors``: an exception in rank 1's meta step, first from the meta collator (caught and recorded), then from
  the meta network (left to end the job); each rank writes ``errors_rank<r>.json`` before it exits.
* ``hang``: rank 1 stops answering outside the meta step; ``ddp_timeout`` must end the job.
* ``train``: the checkpointed run, optionally killed with SIGKILL after a step or while writing a checkpoint.
* ``resume``: the uninterrupted reference run, then the resumes of the killed runs; writes ``resume_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch
import torch.distributed as dist


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import sama_args, tiny_bert, token_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import sama_trainer.sama_trainer as trainer_module  # noqa: E402
from sama_trainer import ClassificationObjective, SAMACallback, SAMAConfig, SAMATrainer, end_process_group  # noqa: E402
from sama_trainer.checkpoint import IncompleteCheckpointError  # noqa: E402


FAULT_RANK = 1
FAULT_STEP = 4  # the optimizer step whose meta step goes wrong (meta steps run after steps 2, 4 and 6)
KILL_STEP = 10  # SIGKILL after this step: checkpoints are written at steps 4, 8 and 12, meta steps every 2 steps
BROKEN_SAVE_STEP = 8  # the checkpoint whose writing is interrupted


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def digest(value) -> str:
    """sha256 of tensors (their bytes) and plain values (their repr), walking dicts and lists in order."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                feed(x)
        elif isinstance(v, np.ndarray):
            h.update(v.tobytes())
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def datasets():
    train = token_dataset(64, noise=0.3, seed=1).remove_columns(["clean_labels"])
    train = train.add_column("example_id", list(range(len(train))))
    meta = token_dataset(12, seed=2).remove_columns(["clean_labels"])  # cycles: a new meta epoch every 1-3 steps
    return train, meta


def config(output_dir, **overrides) -> SAMAConfig:
    """The tests' CPU defaults with 6 steps, a meta step every 2, a log line per step."""
    batch = 4 if distributed() else 8  # the same 8 examples per optimizer step with 1 or 2 processes
    defaults = dict(per_device_train_batch_size=batch, meta_batch_size=4, max_steps=6, logging_steps=1)
    return sama_args(output_dir, disable_tqdm=True, **{**defaults, **overrides})


class Injector(SAMACallback):
    """Knows whether the meta step of ``FAULT_STEP`` on ``FAULT_RANK`` is running; snapshots θ around it."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.active = False
        self.theta_before: list[torch.Tensor] | None = None
        self.theta_after: list[torch.Tensor] | None = None

    def _theta(self):
        return [p.detach().clone() for p in self.trainer_ref[0]._base_params()]

    def on_meta_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == FAULT_STEP:
            self.active = rank() == FAULT_RANK
            self.theta_before = self._theta()

    def on_meta_step(self, args, state, control, metrics=None, **kwargs):
        if state.global_step + 1 == FAULT_STEP:
            self.active = False
            self.theta_after = self._theta()


class FaultyObjective(ClassificationObjective):
    """The classification objective with one fault switched on while ``injector.active``."""

    fault: str = "none"
    injector: Injector

    def meta_loss(self, model, inputs):
        loss = super().meta_loss(model, inputs)
        if self.injector.active and self.fault == "nan_meta":
            return loss * float("nan")
        if self.injector.active and self.fault == "zero_u":
            return loss.detach()  # a meta loss that does not depend on θ: v = u = 0
        return loss

    def example_losses(self, model, inputs):
        examples = super().example_losses(model, inputs)
        # the perturbed passes of first-order methods run without a graph; the base step's forward has one
        if self.injector.active and self.fault == "inf_perturbed" and not torch.is_grad_enabled():
            examples = dataclasses.replace(examples, losses=examples.losses * float("inf"))
        return examples

    def weighted_loss(self, meta_model, examples):
        if self.injector.active and self.fault == "meta_net_error":  # in the meta step: a perturbed pass
            raise RuntimeError(f"injected meta-net failure on rank {rank()}")
        return super().weighted_loss(meta_model, examples)


class SkipBaseStep(TrainerCallback):
    """Tells the meta step of ``FAULT_STEP`` on ``FAULT_RANK`` that the base step was skipped (as after an fp16
    grad-scaler overflow on that rank alone), and takes it back before the Trainer's scheduler reads it."""

    def __init__(self, trainer_ref: list, mark: bool):
        self.trainer_ref, self.mark = trainer_ref, mark

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == FAULT_STEP and rank() == FAULT_RANK:
            self.trainer_ref[0].optimizer._is_overflow = self.mark


class StepRecorder:
    """Wraps the base-update all-reduce of the trainer: records this rank's step and the mean at ``FAULT_STEP``."""

    def __init__(self, injector: Injector):
        self.injector, self.local, self.mean = injector, None, None
        self._orig = trainer_module.all_reduce_mean_

    def __call__(self, tensors, world_size):
        recording = self.injector.theta_before is not None and self.injector.theta_after is None
        if recording:
            self.local = [t.clone() for t in tensors]
        self._orig(tensors, world_size)
        if recording:
            self.mean = [t.clone() for t in tensors]


def gathered(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run_fault(out_dir: str, fault: str, base_update: bool) -> dict:
    train, meta = datasets()
    ref: list = []
    injector = Injector(ref)
    args = config(os.path.join(out_dir, f"{fault}-{base_update}"), sama_base_update=base_update)
    objective = FaultyObjective.from_config(args)
    objective.fault, objective.injector = fault, injector
    callbacks = [injector] + ([SkipBaseStep(ref, mark=True)] if fault == "base_step_skipped" else [])
    trainer = SAMATrainer(tiny_bert(dropout=0.1), args, train, meta, objective=objective, callbacks=callbacks)
    if fault == "base_step_skipped":
        trainer.add_callback(SkipBaseStep(ref, mark=False))  # runs after the trainer's meta step
    ref.append(trainer)
    recorder = trainer_module.all_reduce_mean_ = StepRecorder(injector)
    try:
        trainer.train()
    finally:
        trainer_module.all_reduce_mean_ = recorder._orig
    theta, lam = trainer._base_params(), list(trainer.meta_model.parameters())
    before, after = injector.theta_before, injector.theta_after
    result = {
        "theta": digest(theta),
        "lambda": digest(lam),
        "finite": finite(theta) and finite(lam),
        "meta_steps": trainer.meta_step_count,
        "skipped": trainer.meta_steps_skipped,
        "reasons": dict(trainer.skip_reasons),
        "theta_restored_at_fault": all(torch.equal(a, b) for a, b in zip(before, after)),
        "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
        "logs": [
            {k: v for k, v in h.items() if k == "step" or k.startswith("meta/")}
            for h in trainer.state.log_history
            if "loss" in h
        ],
    }
    if recorder.local is not None:  # the agreed base update: θ_after = θ_before - mean over ranks of ε_r·u_r
        result["theta_moved_by_mean_step"] = all(
            torch.equal(a, b - m) for a, b, m in zip(after, before, recorder.mean)
        )
        steps = gathered(recorder.local)
        mean = torch.cat([m.reshape(-1) for m in recorder.mean])
        result["mean_step_rel_err"] = ((torch.stack(steps).mean(0) - mean).norm() / mean.norm()).item()
        result["local_step_norms"] = [s.norm().item() for s in steps]
    return result


def cmd_faults(out_dir: str) -> None:
    results = {}
    for base_update in (True, False):
        for fault in ("nan_meta", "inf_perturbed", "zero_u", "base_step_skipped"):
            results[f"{fault}/{base_update}"] = run_fault(out_dir, fault, base_update)
    # control: the warning the tests look for does appear when DDP is told to search for unused parameters
    dist.barrier()
    print("CONTROL RUN WITH ddp_find_unused_parameters=True", file=sys.stderr, flush=True)
    train, meta = datasets()
    args = config(os.path.join(out_dir, "control"), max_steps=2, ddp_find_unused_parameters=True)
    SAMATrainer(tiny_bert(), args, train, meta).train()
    with open(os.path.join(out_dir, f"faults_rank{rank()}.json"), "w") as f:
        json.dump(results, f)


class FailingCollator:
    """The meta collator, raising on ``FAULT_RANK`` at its second call (the second meta step)."""

    def __init__(self, collate):
        self.collate, self.calls = collate, 0

    def __call__(self, features):
        self.calls += 1
        if self.calls == 2 and rank() == FAULT_RANK:
            raise ValueError(f"injected meta-collator failure on rank {rank()}")
        return self.collate(features)


def cmd_errors(out_dir: str) -> None:
    from transformers import default_data_collator

    record: dict = {}
    path = os.path.join(out_dir, f"errors_rank{rank()}.json")
    train, meta = datasets()
    trainer = SAMATrainer(
        tiny_bert(), config(os.path.join(out_dir, "collator")), train, meta,
        meta_data_collator=FailingCollator(default_data_collator),
    )  # fmt: skip
    try:
        trainer.train()
        record["collator"] = None
    except Exception as err:
        record["collator"] = {"type": type(err).__name__, "message": str(err), "step": trainer.state.global_step}
    ref: list = []
    injector = Injector(ref)
    args = config(os.path.join(out_dir, "meta_net"))
    objective = FaultyObjective.from_config(args)
    objective.fault, objective.injector = "meta_net_error", injector
    trainer = SAMATrainer(tiny_bert(), args, train, meta, objective=objective, callbacks=[injector])
    ref.append(trainer)
    try:
        trainer.train()
        record["meta_net"] = None
    except Exception as err:
        record["meta_net"] = {"type": type(err).__name__, "message": str(err), "step": trainer.state.global_step}
        raise  # ends this process with the error, as an uncaught exception in a user's script does
    finally:
        with open(path, "w") as f:
            json.dump(record, f)


class HangOutsideMetaStep(TrainerCallback):
    """Rank 1 stops answering (a stuck data source, say) before step 3's forward pass."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2 and rank() == FAULT_RANK:
            time.sleep(600)


def cmd_hang(out_dir: str, timeout: int) -> None:
    train, meta = datasets()
    args = config(os.path.join(out_dir, "hang"), ddp_timeout=timeout)
    _ = args.device  # sets up the process group
    dist.barrier()  # start together: a slow start must not look like a hang
    trainer = SAMATrainer(tiny_bert(), args, train, meta, callbacks=[HangOutsideMetaStep()])
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as err:
        with open(os.path.join(out_dir, f"hang_rank{rank()}.json"), "w") as f:
            json.dump({"type": type(err).__name__, "message": str(err), "waited_s": time.monotonic() - start}, f)
        raise


# ------------------------------------------------------------------------------------------------------------
# killed runs and resumes


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(name: str, step: int, wait_for: str | None = None) -> None:
    """Replace ``torch.save``: writing ``name`` into ``checkpoint-<step>`` writes half the bytes, then SIGKILL
    (once ``wait_for`` exists, if given: another process's file of the same checkpoint, and 2 s later, time enough
    for that process to go on to the next files if nothing held it back)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        path = str(f)
        if name in os.path.basename(path) and f"checkpoint-{step}" in path:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            deadline = time.monotonic() + 120
            while wait_for and not os.path.exists(wait_for) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.0 if wait_for else 0.0)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


class Recorder(SAMATrainer):
    """Records the checkpoint the run resumed from."""

    resumed_from: str | None = None

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self.resumed_from = checkpoint


def checkpointed_trainer(output_dir: str, callbacks=None) -> Recorder:
    train, meta = datasets()
    args = config(output_dir, max_steps=12, save_strategy="steps", save_steps=4, save_total_limit=1, logging_steps=4)
    return Recorder(tiny_bert(dropout=0.1), args, train, meta, callbacks=callbacks)


def final_state(trainer: Recorder) -> dict:
    return {
        "theta": digest(trainer._base_params()),
        "lambda": digest(list(trainer.meta_model.parameters())),
        "meta_optimizer": digest(trainer.meta_optimizer.state_dict()),
        "meta_stream": trainer._meta_batches().state_dict(),
        "weight_history": digest(trainer.weight_history.state_dict()),
        "rng": digest([torch.get_rng_state(), random.getstate(), np.random.get_state()[1]]),
        "meta_steps": trainer.meta_step_count,
        "global_step": trainer.state.global_step,
        "resumed_from": trainer.resumed_from and os.path.basename(trainer.resumed_from),
    }


def cmd_train(out_dir: str, kill_after: int | None, kill_while_writing: str | None) -> None:
    callbacks = [KillAfterStep(kill_after)] if kill_after else None
    if kill_while_writing:
        name = kill_while_writing.format(rank=rank())
        if distributed() and rank() == 0:
            name = None  # only the other rank is stopped; the main process completes its part of the checkpoint
        if name:
            done = os.path.join(out_dir, f"checkpoint-{BROKEN_SAVE_STEP}", "sama_rank_state_0.pt")
            kill_while_saving(name, BROKEN_SAVE_STEP, wait_for=done if distributed() else None)
    checkpointed_trainer(out_dir, callbacks).train()


def explicit_resume_error(output_dir: str, checkpoint: str) -> str | None:
    """The error of ``train(resume_from_checkpoint=checkpoint)`` (None if it trained)."""
    try:
        checkpointed_trainer(output_dir).train(resume_from_checkpoint=checkpoint)
    except IncompleteCheckpointError as err:
        return str(err)
    return None


def cmd_resume(root: str) -> None:
    result: dict = {}
    reference = checkpointed_trainer(os.path.join(root, "reference"))
    reference.train()
    result["reference"] = final_state(reference)

    broken = os.path.join(root, "interrupted_save", f"checkpoint-{BROKEN_SAVE_STEP}")
    result["explicit_broken"] = explicit_resume_error(os.path.join(root, "interrupted_save"), broken)
    if distributed():  # a complete checkpoint whose part of rank 1 is gone (e.g. storage not shared between nodes)
        lost = os.path.join(root, "lost_part", "checkpoint-12")
        if rank() == 0:
            shutil.copytree(os.path.join(root, "reference", "checkpoint-12"), lost)
            os.remove(os.path.join(lost, "sama_rank_state_1.pt"))
        dist.barrier()
        result["explicit_lost_part"] = explicit_resume_error(os.path.dirname(lost), lost)

    for name in ("interrupted_save", "killed"):
        trainer = checkpointed_trainer(os.path.join(root, name))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=True)
        result[name] = final_state(trainer)
        result[name]["warnings"] = [str(w.message) for w in caught if "not resuming from" in str(w.message)]
    with open(os.path.join(root, f"resume_rank{rank()}.json"), "w") as f:
        json.dump(result, f)


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its launcher dies, so a test that kills a hung launch leaves no orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["faults", "errors", "hang", "train", "resume"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill_after_step", type=int, default=None)
    parser.add_argument("--kill_while_writing", default=None, help="file name, e.g. sama_rank_state_{rank}.pt")
    parser.add_argument("--timeout", type=int, default=10, help="ddp_timeout of the hang command")
    args = parser.parse_args()
    die_with_parent()
    torch.set_num_threads(1)
    try:
        if args.command == "faults":
            cmd_faults(args.out)
        elif args.command == "errors":
            cmd_errors(args.out)
        elif args.command == "hang":
            cmd_hang(args.out, args.timeout)
        elif args.command == "train":
            cmd_train(args.out, args.kill_after_step, args.kill_while_writing)
        else:
            cmd_resume(args.out)
        if args.command in ("faults", "train", "resume"):
            end_process_group()  # no c10d thread left running at exit ("terminate called", SIGABRT)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
