"""How SAMA's meta step grows with model size, sequence length, unroll steps and world size, against a cost model.

Cost model of one meta step (first-order SAMA)::

    T_meta ≈ T_fwd+bwd(meta batch) + 2·T_fwd(base batch) + K·T_θ

with the passes timed in the same process after training (train mode, CPU time on a CPU) and T_θ the time of one
multi-tensor add over all parameters; K = 12 counts the lean meta step's elementwise passes over θ (du/dg's ten
passes over the parameters outside embedding tables, the hooks' norm and product, ‖u‖, the moves θ ± εu). At
unroll U the throughput relative to plain training is predicted as U·T_step / (U·T_step + T_meta), with T_step
the plain Trainer's step time. Under DDP the meta step also sends 4·(|θ| + |λ| + reasons) bytes (the averaged base
update θ − εu and the meta-gradient with one skip flag per reason); the recipe counts what the meta step actually
passes to ``torch.distributed`` and predicts that count; communication time is not in the time model.

Each row is one run of ``sama`` (and, for the unroll rows, one of the plain Trainer) in its own process, on the
workload of ``recipes/benchmark.py`` (BERT from its config, synthetic tokens, batch 16 unless changed)::

    python recipes/benchmark_scale.py --threads 1 --rows hidden,seq_len,unroll,world_size --output scale.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmark import (
    FINETUNE,
    _fmt,
    add_common_arguments,
    environment,
    launch,
    run,
    served_as_worker,
    workload_spec,
    write_report,
)


THETA_PASSES = 12
ROWS = {
    "hidden": [128, 256, 384, 512, 768],
    "seq_len": [64, 128, 256],
    "unroll": [1, 5, 10, 20],
    "world_size": [1, 2],
}
META_NET_PARAMS = 301  # the default MetaWeightNet: Linear(1, 100), ReLU, Linear(100, 1)


def predicted_meta_ms(result: dict[str, Any]) -> float:
    return result["fwd_bwd_ms"] + 2 * result["fwd_ms"] + THETA_PASSES * result["theta_pass_ms"]


def row_specs(kind: str, value: int, shared: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The runs of one row: ``sama`` with the varied setting (and the plain Trainer for unroll rows)."""
    spec = {**shared, "method": "sama", "cost_model": True}
    if kind == "hidden":
        spec["hidden_size"] = value
    elif kind == "seq_len":
        spec["seq_len"] = value
    elif kind == "world_size":
        spec["world_size"] = value
    if kind == "unroll":
        spec.update(unroll_steps=value, warmup_steps=value, steps=value * max(2, -(-6 // value)))
    else:  # the meta step's cost does not depend on the unroll: 2 timed meta steps at unroll 2
        spec.update(unroll_steps=2, warmup_steps=2, steps=4)
    specs = {"sama": spec}
    if kind == "unroll":
        specs[FINETUNE] = {**spec, "method": FINETUNE, "cost_model": False}
    return specs


def measure_row(script: str, kind: str, value: int, shared: dict[str, Any], timeout: float) -> dict[str, Any]:
    results = {name: launch(script, spec, timeout) for name, spec in row_specs(kind, value, shared).items()}
    sama = results["sama"]
    row: dict[str, Any] = {"kind": kind, "value": value, "runs": results}
    if "error" in sama:
        row["error"] = sama["error"]
        return row
    cpu = sama["device"] == "cpu"
    row.update(
        num_params=sama["num_params"],
        fwd_bwd_ms=sama["fwd_bwd_ms"],
        fwd_ms=sama["fwd_ms"],
        theta_pass_ms=sama["theta_pass_ms"],
        predicted_meta_ms=predicted_meta_ms(sama),
        measured_meta_ms=sama["meta_step_cpu_ms"] if cpu else sama["meta_step_ms"],
        measured_meta_wall_ms=sama["meta_step_ms"],
    )
    row["measured_over_predicted"] = row["measured_meta_ms"] / row["predicted_meta_ms"]
    if kind == "unroll" and "error" not in results[FINETUNE]:
        plain = results[FINETUNE]
        step = plain["step_cpu_ms"] if cpu else plain["step_ms"]
        row["predicted_vs_plain"] = value * step / (value * step + row["predicted_meta_ms"])
        field = "samples_per_cpu_s" if cpu else "samples_per_s"
        row["measured_vs_plain"] = sama[field] / plain[field]
    if kind == "world_size":
        world = value
        row["collective_bytes"] = int(sama.get("collective_bytes_per_meta_step", 0))
        row["predicted_bytes"] = 0 if world == 1 else 4 * (sama["num_params"] + META_NET_PARAMS + _reasons())
    return row


def _reasons() -> int:
    from sama_trainer.meta_gradient import SKIP_REASONS

    return len(SKIP_REASONS)


def render_markdown(report: dict[str, Any]) -> str:
    unit = "CPU time" if report["config"]["device"] == "cpu" else "wall clock"
    lines = [
        f"Meta-step time of `sama` in ms ({unit}); predicted = T_fwd+bwd + 2·T_fwd + {THETA_PASSES}·T_θ.",
        "",
        "| varied | value | params (M) | T_fwd+bwd | T_fwd | T_θ | predicted | measured | measured / predicted "
        "| vs plain: predicted | vs plain: measured | bytes sent per meta step: counted | predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['kind']} | {row['value']} | failed: {row['error'].splitlines()[-1][:80]} |")
            continue
        bytes_cells = [f"{row[k]:,}" if k in row else "" for k in ("collective_bytes", "predicted_bytes")]
        lines.append(
            f"| {row['kind']} | {row['value']} | {row['num_params'] / 1e6:.1f} | {row['fwd_bwd_ms']:.0f} "
            f"| {row['fwd_ms']:.0f} | {row['theta_pass_ms']:.1f} | {row['predicted_meta_ms']:.0f} "
            f"| {row['measured_meta_ms']:.0f} | {row['measured_over_predicted']:.2f} "
            f"| {_fmt(row.get('predicted_vs_plain'), 3) if 'predicted_vs_plain' in row else ''} "
            f"| {_fmt(row.get('measured_vs_plain'), 3) if 'measured_vs_plain' in row else ''} "
            f"| {bytes_cells[0]} | {bytes_cells[1]} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--hidden", default=None, help="override the hidden sizes, e.g. 128,256")
    p.add_argument("--seq_lens", default=None, help="override the sequence lengths")
    p.add_argument("--unrolls", default=None, help="override the unroll steps")
    p.add_argument("--model_config", default="bert-mini", help="preset of recipes/benchmark.py (4 layers x 256)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    add_common_arguments(p, memory_runs=False)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if served_as_worker(args, run):
        return 0
    values = dict(ROWS)
    for kind, override in (("hidden", args.hidden), ("seq_len", args.seq_lens), ("unroll", args.unrolls)):
        if override:
            values[kind] = [int(v) for v in override.split(",")]
    shared = workload_spec(args)
    script = str(Path(__file__).resolve())
    rows = []
    for kind in args.rows.split(","):
        for value in values[kind]:
            print(f"scale: {kind} = {value}", flush=True)
            rows.append(measure_row(script, kind, value, shared, args.worker_timeout))
    first_ok = next((r["runs"]["sama"] for r in rows if "error" not in r), {})
    report = {
        "config": {
            **shared,
            "device": first_ok.get("device"),
            "theta_passes": THETA_PASSES,
            "command": " ".join(["python", "recipes/benchmark_scale.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "environment": environment(args.threads),
        "rows": rows,
    }
    write_report(report, render_markdown(report), args.output, args.markdown)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
