"""SAMATrainer next to Betty (the SAMA authors' library) and plain training, on one workload, side by side.

The workload of ``recipes/benchmark.py`` (a BERT built from its config, synthetic token data, base and meta batch
of the same size) with the same settings in all three trainers:

* ``plain``: the ``transformers`` ``Trainer``;
* ``sama_trainer``: ``SAMATrainer`` with Meta-Weight-Net reweighting (``meta_objective="reweight"``) and SAMA;
* ``betty``: Betty's ``Engine`` with an ``ImplicitProblem`` pair: the base problem (``Config(type="sama")``) and a
  meta problem holding the same ``MetaWeightNet``; its base loss is ``mean(w(ℓ)·ℓ)``, its meta loss the mean
  cross-entropy on a meta batch.

Shared settings: ``torch.optim.Adam`` (fused, constant learning rate) for the base model (Betty rebuilds the
optimizer from its defaults, which rejects AdamW's), Adam (lr 1e-3) for the meta network, no gradient clipping,
‖εu‖ = 1, and the same estimator on both SAMA sides: Adam's du/dg without bias correction (Betty's) and θ left at
θ − εu after each meta step (``SAMATrainer``'s default ``sama_base_update``; Betty's ``sama_multitask=True``).

Every (trainer, unroll) pair runs in its own process, interleaved over repeats; ratios are medians of per-repeat
ratios; peak memory comes from one short run each with live-memory accounting (see ``recipes/benchmark.py``).
Betty is an optional extra (``pip install -e .[betty]`` installs it; on Python >= 3.11 use ``pip install --no-deps
--ignore-requires-python betty-ml==0.2.1``, the release with SAMA):

    python recipes/benchmark_betty.py --threads 1 --unroll_steps 1,10 --repeats 3 --output betty.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmark import (
    FINETUNE,
    StepClock,
    _fmt,
    add_common_arguments,
    build_model_config,
    build_optimizer,
    describe_workload,
    environment,
    finish,
    measure_memory,
    paired_ratio,
    prepare_run,
    run_interleaved,
    served_as_worker,
    summarize,
    throughput_ratios,
    workload_spec,
)
from benchmark import run as run_trainer


TRAINERS = ("plain", "sama_trainer", "betty")
FIELDS = ("samples_per_s", "samples_per_cpu_s", "peak_mem_mb", "base_step_ms", "meta_step_ms", "meta_step_cpu_ms")
META_LEARNING_RATE = 1e-3


def trainer_spec(spec: dict[str, Any], trainer: str) -> dict[str, Any]:
    """The run settings of ``trainer`` on the shared workload (``spec``)."""
    out = {
        **spec,
        "trainer": trainer,
        "optimizer": "adam",
        "training_overrides": {"lr_scheduler_type": "constant", "max_grad_norm": 0.0},
    }
    if trainer == "plain":
        out["method"] = FINETUNE
    elif trainer == "sama_trainer":
        out["method"] = "sama"
        out["method_kwargs"] = {"bias_correction": False}
        out["sama_overrides"] = {
            "meta_objective": "reweight",
            "sama_base_update": True,
            "meta_learning_rate": META_LEARNING_RATE,
        }
    return out


def run_betty(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with Betty's engine and return the measurements of :func:`benchmark.run`."""
    import torch
    import torch.nn.functional as F
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    from sama_trainer import MetaWeightNet

    device, model, train_data, meta_data, memory = prepare_run(spec)
    meta_net = MetaWeightNet()

    def model_inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}

    class Base(ImplicitProblem):
        def training_step(self, batch):
            logits = self.module(**model_inputs(batch)).logits
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            return (self.meta(losses.detach(), logits.detach()) * losses).mean()

    class Meta(ImplicitProblem):
        def training_step(self, batch):
            return F.cross_entropy(self.base.module(**model_inputs(batch)).logits, batch["labels"])

    def loader(data):
        generator = torch.Generator().manual_seed(spec["seed"])
        return torch.utils.data.DataLoader(data, batch_size=spec["batch_size"], shuffle=True, generator=generator)

    base_config = Config(type="sama", unroll_steps=spec["unroll_steps"], sama_multitask=True)
    base = Base("base", base_config, model, build_optimizer(spec, model), train_data_loader=loader(train_data))
    meta_optimizer = torch.optim.Adam(meta_net.parameters(), lr=META_LEARNING_RATE)
    meta = Meta("meta", Config(), meta_net, meta_optimizer, train_data_loader=loader(meta_data))
    steps = spec["warmup_steps"] + spec["steps"]
    engine = Engine(
        [base, meta],
        EngineConfig(train_iters=steps, valid_step=steps + 1, strategy="cpu" if device.type == "cpu" else "gpu"),
        dependencies={"u2l": {meta: [base]}, "l2u": {base: [meta]}},
    )

    clock = StepClock(spec["warmup_steps"], spec["steps"], device)
    train_step, meta_step = engine.train_step, meta.step_normal

    def timed_train_step():
        clock.step_begin(engine.global_step)
        train_step()
        clock.step_end(engine.global_step)

    def timed_meta_step(*args, **kwargs):
        clock.meta_begin()
        meta_step(*args, **kwargs)
        clock.meta_end()

    engine.train_step, meta.step_normal = timed_train_step, timed_meta_step
    engine.run()
    return {
        **clock.result(spec["batch_size"]),
        "peak_mem_mb": memory.peak_mb(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "device": str(device),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return run_betty(spec) if spec["trainer"] == "betty" else run_trainer(spec)


def comparison(runs: dict[str, list[dict]], memory: dict[str, float | None], unrolls: list[int]) -> dict[str, Any]:
    """Per unroll: SAMATrainer / Betty throughput (wall, CPU time), peak memory and memory increase over plain."""
    out = {}
    for u in unrolls:
        ours, betty, plain = f"sama_trainer@{u}", f"betty@{u}", "plain"
        m_ours, m_betty, m_plain = memory.get(ours), memory.get(betty), memory.get(plain)
        known = None not in (m_ours, m_betty, m_plain)
        out[str(u)] = {
            **throughput_ratios(runs, ours, betty),
            "sama_trainer_vs_plain_cpu": paired_ratio(runs, ours, plain, "samples_per_cpu_s"),
            "betty_vs_plain_cpu": paired_ratio(runs, betty, plain, "samples_per_cpu_s"),
            "memory": m_ours / m_betty if known else None,
            "memory_increase": (m_ours - m_plain) / (m_betty - m_plain) if known and m_betty > m_plain else None,
        }
    return out


def render_markdown(report: dict[str, Any]) -> str:
    cfg, summary, memory, cmp = report["config"], report["summary"], report["peak_memory_mb"], report["comparison"]
    lines = [
        f"{describe_workload(cfg)}, {cfg['repeats']} interleaved repeats, "
        f"{cfg['device']}, torch threads {report['environment']['torch_threads']}; timed steps per unroll: "
        + ", ".join(f"{u}: {n} after {w}" for u, (n, w) in cfg["windows"].items())
        + ".",
        "",
        "| unroll | trainer | samples/s | samples/CPU-s | peak memory (MB) | meta step CPU (ms) "
        "| SAMATrainer / Betty: throughput (wall) | throughput (CPU time) | peak memory | memory above plain |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in summary.items():
        trainer, _, unroll = name.partition("@")
        c = cmp.get(unroll, {}) if trainer == "sama_trainer" else {}
        cells = [_fmt(c.get(k), 3) if c else "" for k in ("throughput", "throughput_cpu", "memory", "memory_increase")]
        lines.append(
            f"| {unroll or 'any'} | {trainer} | {_fmt(e.get('samples_per_s'))} | {_fmt(e.get('samples_per_cpu_s'))} "
            f"| {_fmt(memory.get(name), 0)} | {_fmt(e.get('meta_step_cpu_ms'), 0)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_config", default="bert-mini", help="a preset of recipes/benchmark.py or a config JSON")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--unroll_steps", default="1,10", help="comma-separated")
    p.add_argument("--meta_steps", type=int, default=3, help="meta steps in each timed window (and one before it)")
    p.add_argument("--min_steps", type=int, default=6, help="at least this many timed steps per window")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {', '.join(TRAINERS)}")
    p.add_argument("--repeats", type=int, default=3)
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if served_as_worker(args, run):
        return 0
    trainers = args.trainers.split(",")
    if set(trainers) - set(TRAINERS):
        raise SystemExit(f"--trainers: choose from {TRAINERS}")
    unrolls = [int(u) for u in args.unroll_steps.split(",")]
    shared = workload_spec(args)
    # a window of whole unrolls, with `meta_steps` meta steps and at least `min_steps` steps; plain training gets
    # the longest window
    windows = {u: (u * max(args.meta_steps, -(-args.min_steps // u)), u) for u in unrolls}

    def spec_at(u: int, trainer: str) -> dict[str, Any]:
        return trainer_spec({**shared, "unroll_steps": u, "steps": windows[u][0], "warmup_steps": u}, trainer)

    specs = {}
    if "plain" in trainers:
        specs["plain"] = spec_at(max(unrolls, key=lambda u: windows[u][0]), "plain")
    for u in unrolls:
        specs.update({f"{t}@{u}": spec_at(u, t) for t in trainers if t != "plain"})
    print(f"Betty comparison: {list(specs)} x {args.repeats} repeats", flush=True)
    script = str(Path(__file__).resolve())
    runs = run_interleaved(script, specs, args.repeats, args.worker_timeout)
    memory = {} if args.no_memory_runs else measure_memory(script, specs, args.worker_timeout)
    config = build_model_config({**shared, "unroll_steps": unrolls[0]})
    first_ok = next((r for rs in runs.values() for r in rs if "error" not in r), {})
    report = {
        "config": {
            **shared,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_params": first_ok.get("num_params", 0),
            "device": first_ok.get("device"),
            "unroll_steps": unrolls,
            "windows": {str(u): w for u, w in windows.items()},
            "repeats": args.repeats,
            "trainers": trainers,
            "settings": {name: spec for name, spec in specs.items()},
            "command": " ".join(["python", "recipes/benchmark_betty.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "environment": environment(args.threads),
        "summary": summarize(runs, FIELDS),
        "peak_memory_mb": memory,
        "comparison": comparison(runs, memory, unrolls),
        "runs": runs,
    }
    return finish(report, render_markdown(report), args)


if __name__ == "__main__":
    sys.exit(main())
