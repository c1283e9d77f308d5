"""Worker for the 2-process gloo DDP tests (run by tests/test_distributed.py through torchrun, CPU only).

Writes one JSON file per rank with parameter hashes, meta-gradients and communication counts.
"""

import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import RecordingObjective, sama_args, tiny_bert, token_dataset  # noqa: E402

from sama_trainer import HeldOutBaseUpdate, SAMATrainer, end_process_group  # noqa: E402
from sama_trainer.losses import per_example_cross_entropy  # noqa: E402
from sama_trainer.pruning import meta_importance_scores, with_example_ids  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class CommCounter:
    """Counts all_reduce calls/bytes issued by the meta step (monkeypatched torch.distributed.all_reduce)."""

    def __init__(self):
        self.calls, self.bytes, self.active = 0, 0, False
        self._orig = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        if self.active:
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
        return self._orig(tensor, *args, **kwargs)


class Probe(SAMATrainer):
    """Records, at each meta step, what is needed to recompute the per-rank estimator by hand."""

    counter: CommCounter

    def meta_step(self, base_batches):
        params = self._base_params()
        self.probe = {
            "theta": [p.detach().clone() for p in params],
            "batches": base_batches,
            "meta_state": {k: v.clone() for k, v in self.meta_model.state_dict().items()},
            "stream": dict(self._meta_batches().state_dict()),
        }
        self.counter.active = True
        try:
            super().meta_step(base_batches)
        finally:
            self.counter.active = False


def hand_estimator(trainer, alpha):
    """SAMA-NA on this rank's meta shard and base micro-batches, by explicit ±εv passes (no library FD code)."""
    probe, model, net = trainer.probe, trainer.model, trainer.meta_model
    net.load_state_dict(probe["meta_state"])
    params = [p for p in model.parameters() if p.requires_grad]
    stream = trainer._meta_batches()
    stream.load_state_dict(probe["stream"])
    meta = trainer._prepare_inputs(stream.next_batch())
    labels = meta.pop("labels")
    with torch.no_grad():
        for p, t in zip(params, probe["theta"]):
            p.copy_(t)
    v = torch.autograd.grad(per_example_cross_entropy(model(**meta).logits, labels).mean(), params)
    eps = alpha / math.sqrt(sum((x.double() ** 2).sum().item() for x in v))

    def grad_at(sign):
        with torch.no_grad():
            for p, t, vi in zip(params, probe["theta"], v):
                p.copy_(t + sign * eps * vi)
        total = 0.0
        for batch in probe["batches"]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                losses = per_example_cross_entropy(model(**inputs).logits, batch["labels"])
            total = total + (net(losses) * losses).mean()
        return torch.autograd.grad(total / len(probe["batches"]), list(net.parameters()))

    local = [-(a - b) / (2 * eps) for a, b in zip(grad_at(1), grad_at(-1))]
    flat = torch.cat([g.flatten() for g in local])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return torch.stack(gathered).mean(0), flat


def run(out_dir, name, counter, check_estimator=False, callbacks=None, **overrides):
    train = token_dataset(64, noise=0.3, seed=1).remove_columns(["clean_labels"])
    meta = token_dataset(32, seed=2).remove_columns(["clean_labels"])
    settings = dict(per_device_train_batch_size=4, meta_batch_size=4, max_steps=6, logging_steps=100)
    settings.update(meta_objective="reweight", meta_gradient="sama-na", sama_alpha=0.5)
    args = sama_args(os.path.join(out_dir, name), **{**settings, **overrides})
    trainer = Probe(tiny_bert(dropout=0.0), args, train, meta, callbacks=callbacks)
    trainer.counter = counter
    trainer.train()
    result = {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "theta": digest(trainer.model.parameters()),
        "lambda": digest(trainer.meta_model.parameters()),
        "meta_steps": trainer.meta_step_count,
        "params": [p.detach().flatten().tolist() for p in trainer.model.parameters()][-2:],
        "comm_calls_per_meta_step": counter.calls / max(trainer.meta_step_count, 1),
        "comm_bytes_per_meta_step": counter.bytes / max(trainer.meta_step_count, 1),
        "theta_bytes": sum(p.numel() * p.element_size() for p in trainer._base_params()),
        "lambda_bytes": sum(p.numel() * p.element_size() for p in trainer.meta_model.parameters()),
    }
    if check_estimator:
        expected, local = hand_estimator(trainer, args.sama_alpha)
        got = torch.cat([g.flatten() for g in trainer.last_meta_gradients])
        result["estimator_rel_err"] = ((got - expected).norm() / expected.norm()).item()
        result["local_vs_mean_rel"] = ((local - expected).norm() / expected.norm()).item()
    result["base_update_scale"] = trainer.base_update_scale
    counter.calls = counter.bytes = 0
    return result


def run_held_out(out_dir, counter):
    """The base update sized by held-out examples with wrong labels (fitting the meta set hurts them)."""
    held_out = token_dataset(12, seed=3).remove_columns(["clean_labels"])
    held_out = held_out.map(lambda row: {"labels": (row["labels"] + 1) % 3})
    sizer = HeldOutBaseUpdate(held_out, batch_size=3, max_scale=0.5)  # the scale moves: 1 → at most 0.5
    result = run(out_dir, "held_out", counter, callbacks=[sizer], sama_base_update=True, meta_gradient="sama")
    return {**result, "history": sizer.history}


def run_pruning(out_dir):
    """Pruning scores with the training set as meta set: 2 epochs, each rank drawing its shard of every epoch."""
    train = with_example_ids(token_dataset(32, noise=0.3, seed=1).remove_columns(["clean_labels"]))
    args = sama_args(
        os.path.join(out_dir, "pruning"), per_device_train_batch_size=4, max_steps=-1, num_train_epochs=2,
        meta_use_uncertainty=True, logging_steps=100,
    )  # fmt: skip
    objective = RecordingObjective()
    trainer = SAMATrainer(tiny_bert(dropout=0.0), args, train, meta_dataset=train, objective=objective)
    trainer.train()
    return {"draws": objective.calls, "scores": meta_importance_scores(trainer, last_epochs=1).tolist()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true", help="one process, batch 8, no meta steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counter = CommCounter()
    dist.all_reduce = counter
    if args.single:
        res = {"base_only": run(args.out, "single", counter, per_device_train_batch_size=8, meta_warmup_steps=100)}
        with open(os.path.join(args.out, "single.json"), "w") as f:
            json.dump(res, f)
        return
    results = {
        "base_update": run(args.out, "bu", counter, sama_base_update=True),
        "restore": run(args.out, "restore", counter, check_estimator=True, sama_base_update=False),
        "adaptive": run(args.out, "adaptive", counter, meta_gradient="sama", meta_objective="reweight+correct"),
        "scoped": run(
            args.out, "scoped", counter, meta_gradient="sama", meta_gradient_params=r"encoder\.layer\.1\.|classifier"
        ),
        "base_only": run(args.out, "base_only", counter, meta_warmup_steps=100),
        "pruning": run_pruning(args.out),
        "held_out": run_held_out(args.out, counter),
    }
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    end_process_group()


if __name__ == "__main__":
    main()
