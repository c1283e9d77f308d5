"""The benchmark recipes: short runs write valid JSON and markdown, and the measurements they rest on.

Nothing here asserts a speed or a memory figure: those are what the recipes measure (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
if str(RECIPES) not in sys.path:  # the recipes import their shared module as `benchmark`
    sys.path.insert(0, str(RECIPES))

import benchmark as bench  # noqa: E402
import benchmark_betty  # noqa: E402


TINY = ["--model_config", "tiny", "--seq_len", "16", "--batch_size", "4", "--threads", "1"]
TINY_SPEC = {"model_config": "tiny", "seq_len": 16, "batch_size": 4, "threads": 1, "learning_rate": 1e-3, "seed": 0}


def run_cli(tmp_path, script: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    cmd = [sys.executable, str(RECIPES / script), *TINY, *args, "--output", str(out), "--markdown", str(md)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_benchmark_writes_json_and_markdown_with_meta_steps_timed(tmp_path):
    report, md = run_cli(
        tmp_path, "benchmark.py", "--methods", "finetune,sama", "--steps", "2", "--unroll_steps", "2",
        "--warmup_steps", "0", "--repeats", "1", env={"MALLOC_TRIM_THRESHOLD_": "1073741824"},
    )  # fmt: skip
    assert report["environment"]["malloc_env"]["MALLOC_TRIM_THRESHOLD_"] == "1073741824"  # recorded with the numbers
    cfg = report["config"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["seq_len"], cfg["batch_size"]) == (2, 32, 16, 4)
    assert (cfg["steps"], cfg["unroll_steps"], cfg["warmup_steps"]) == (2, 2, 0)
    assert report["environment"]["torch_threads"] == 1
    for method in ("finetune", "sama"):
        run = report["runs"][method][0]
        assert run["timed_steps"] == 2 and run["samples_per_s"] > 0 and run["samples_per_cpu_s"] > 0
        assert report["peak_memory_mb"][method] > 0  # from the separate live-memory run
        assert f"| {method} |" in md
    assert report["runs"]["sama"][0]["meta_steps_timed"] == 1  # step 2's meta step lies in the window
    assert report["runs"]["finetune"][0]["meta_steps_timed"] == 0
    assert report["ratios"]["finetune"]["throughput"] == 1.0 and report["ratios"]["sama"]["throughput_cpu"] > 0
    assert 0 < report["cost_model"]["ceiling"] < 1


def test_a_run_times_its_window_and_the_meta_steps_in_it():
    spec = {**TINY_SPEC, "method": "sama", "unroll_steps": 2, "warmup_steps": 2, "steps": 4, "cost_model": True}
    result = bench.run(spec)
    assert result["timed_steps"] == 4 and result["meta_steps_timed"] == 2  # steps 4 and 6; step 2's is before
    assert result["meta_steps_skipped"] == 0
    assert 0 < result["meta_step_cpu_ms"] and 0 < result["base_step_ms"] < result["step_ms"]
    assert min(result["fwd_bwd_ms"], result["fwd_ms"], result["theta_pass_ms"]) > 0


def test_step_clock_separates_meta_steps_from_base_steps(monkeypatch):
    import torch

    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench.time, "process_time", lambda: now[0] / 2)  # half the wall time on the CPU
    clock = bench.StepClock(warmup=1, steps=2, device=torch.device("cpu"))

    def step(number: int, base: float, meta: float | None = None) -> None:
        clock.step_begin(number)
        now[0] += base
        if meta is not None:
            clock.meta_begin()
            now[0] += meta
            clock.meta_end()
        clock.step_end(number)

    step(1, 5.0, meta=9.0)  # warm-up: neither it nor its meta step is timed
    step(2, 1.0)
    step(3, 1.0, meta=3.0)
    step(4, 7.0, meta=7.0)  # after the window
    result = clock.result(samples_per_step=8)
    assert result["timed_steps"] == 2 and result["meta_steps_timed"] == 1
    assert result["samples_per_s"] == pytest.approx(16 / 5.0) and result["samples_per_cpu_s"] == pytest.approx(6.4)
    assert result["meta_step_ms"] == pytest.approx(3000.0) and result["base_step_ms"] == pytest.approx(1000.0)
    assert result["base_step_cpu_ms"] == pytest.approx(500.0)


def test_ratios_are_medians_of_side_by_side_ratios():
    # repeat 1 ran under load (everything 2x slower): paired ratios stay 0.8, while a ratio of medians would not
    def result(sps, mem):
        return {"samples_per_s": sps, "peak_mem_mb": mem}

    runs = {
        "finetune": [result(10, 100), result(5, 100), result(10, 100)],
        "sama": [result(8, 105), result(4, 105), result(8, 115)],
        "cg": [result(2, 300), {"error": "boom"}, result(2, 300)],
    }
    assert bench.paired_ratio(runs, "sama", "finetune", "samples_per_s") == pytest.approx(0.8)
    assert bench.paired_ratio(runs, "sama", "cg", "samples_per_s") == pytest.approx(4.0)
    assert bench.paired_ratio(runs, "sama", "neumann", "samples_per_s") is None
    ratios = bench.method_ratios(runs, {"finetune": 200.0, "sama": 210.0, "cg": None})
    assert ratios["sama"]["memory"] == pytest.approx(1.05) and ratios["cg"]["memory"] is None
    assert ratios["sama"]["rss_default_malloc"] == pytest.approx(1.05)
    summary = bench.summarize(runs, ("samples_per_s",))
    assert summary["sama"]["samples_per_s"] == 8 and summary["cg"]["repeats_ok"] == 2
    assert summary["cg"]["error"] == "boom"


def test_model_config_presets_and_overrides():
    cfg = bench.build_model_config({"model_config": "bert-mini", "seq_len": 700, "num_labels": 3})
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
    assert shape == (4, 256, 4, 1024)
    assert cfg.max_position_embeddings == 700 and cfg.num_labels == 3
    cfg = bench.build_model_config({"model_config": "bert-base", "hidden_size": 200, "seq_len": 128})
    assert cfg.hidden_size == 200 and 200 % cfg.num_attention_heads == 0 and cfg.intermediate_size == 800


def test_betty_comparison_sama_trainer_side_uses_the_shared_settings(monkeypatch):
    """Without Betty installed: the SAMATrainer side of the comparison runs with Betty's settings."""
    import torch

    import sama_trainer
    from sama_trainer.adaptation import unwrap_optimizer

    seen = {}
    train = sama_trainer.SAMATrainer.train

    def spy(self, *args, **kwargs):
        seen["trainer"] = self
        return train(self, *args, **kwargs)

    monkeypatch.setattr(sama_trainer.SAMATrainer, "train", spy)
    spec = {**TINY_SPEC, "unroll_steps": 1, "warmup_steps": 1, "steps": 2}
    result = benchmark_betty.run(benchmark_betty.trainer_spec(spec, "sama_trainer"))
    assert result["timed_steps"] == 2 and result["meta_steps_timed"] == 2
    trainer = seen["trainer"]
    assert type(unwrap_optimizer(trainer.optimizer)) is torch.optim.Adam
    args = trainer.args
    assert (args.lr_scheduler_type, args.max_grad_norm, args.meta_gradient) == ("constant", 0.0, "sama")
    assert args.meta_gradient_kwargs == {"bias_correction": False} and args.sama_base_update
    assert args.meta_learning_rate == benchmark_betty.META_LEARNING_RATE and args.meta_objective == "reweight"


def test_betty_comparison_without_betty_writes_its_report(tmp_path):
    report, md = run_cli(
        tmp_path, "benchmark_betty.py", "--trainers", "plain,sama_trainer", "--unroll_steps", "1",
        "--meta_steps", "1", "--min_steps", "2", "--repeats", "1", "--no_memory_runs",
    )  # fmt: skip
    assert set(report["summary"]) == {"plain", "sama_trainer@1"}
    assert report["summary"]["sama_trainer@1"]["samples_per_cpu_s"] > 0
    assert report["comparison"]["1"]["throughput"] is None  # nothing to compare with
    assert report["comparison"]["1"]["sama_trainer_vs_plain_cpu"] > 0
    assert "| 1 | sama_trainer |" in md and "| any | plain |" in md


@pytest.mark.skipif(importlib.util.find_spec("betty") is None, reason="betty-ml is not installed (optional extra)")
def test_betty_comparison_with_betty(tmp_path):
    report, md = run_cli(
        tmp_path, "benchmark_betty.py", "--unroll_steps", "1", "--meta_steps", "2", "--min_steps", "2",
        "--repeats", "1", "--no_memory_runs",
    )  # fmt: skip
    betty = report["runs"]["betty@1"][0]
    assert betty["timed_steps"] == 2 and betty["meta_steps_timed"] == 2  # Betty's meta steps are timed too
    assert report["comparison"]["1"]["throughput_cpu"] > 0 and report["comparison"]["1"]["betty_vs_plain_cpu"] > 0
    assert "| 1 | betty |" in md


@pytest.mark.distributed
def test_scale_rows_predict_and_count_the_bytes_of_a_ddp_meta_step(tmp_path):
    report, md = run_cli(tmp_path, "benchmark_scale.py", "--rows", "world_size")
    single, double = report["rows"]
    assert (single["value"], double["value"]) == (1, 2)
    assert single["collective_bytes"] == single["predicted_bytes"] == 0
    from sama_trainer import MetaWeightNet
    from sama_trainer.meta_gradient import SKIP_REASONS

    # the averaged base update (|θ| floats) and the meta-gradient with its skip flags, counted as sent
    meta_params = sum(p.numel() for p in MetaWeightNet().parameters())
    expected = 4 * (double["num_params"] + meta_params + len(SKIP_REASONS))
    assert double["collective_bytes"] == double["predicted_bytes"] == expected
    for row in (single, double):
        assert row["measured_meta_ms"] > 0 and row["predicted_meta_ms"] > 0
    assert "| world_size | 2 |" in md


def test_pass_overhead_fit_recovers_a_linear_cost_and_the_cli_writes_it(tmp_path):
    import pass_overhead

    rows = [{"positions": p, "seconds": 0.07 + 0.001 * p} for p in (16, 64, 256, 1024)]
    fit = pass_overhead.fit_overhead(rows)
    assert fit["overhead_tokens"] == pytest.approx(70.0) and fit["position_seconds"] == pytest.approx(0.001)
    with pytest.raises(RuntimeError, match="did not grow"):
        pass_overhead.fit_overhead([{"positions": 16, "seconds": 0.2}, {"positions": 64, "seconds": 0.1}])
    with pytest.raises(SystemExit, match="two different sizes"):
        pass_overhead.parse_shapes("4x4,2x8")
    out = tmp_path / "overhead.json"
    report = pass_overhead.main(
        ["--model_name_or_path", "tiny-bert", "--shapes", "1x4,8x64,32x128", "--repeats", "1", "--output", str(out)]
    )
    assert json.loads(out.read_text()) == report
    assert [r["positions"] for r in report["rows"]] == [4, 512, 4096] and all(r["seconds"] > 0 for r in report["rows"])


def test_meta_split_benchmark_times_every_way_on_the_same_draws(tmp_path):
    import benchmark_meta_split

    from sama_trainer.data import make_synthetic_weak_supervision, write_wrench_format

    folder = write_wrench_format(make_synthetic_weak_supervision(40, 20, 10, seed=0), tmp_path / "tinyws")
    out = tmp_path / "split.json"
    report = benchmark_meta_split.main(
        [
            "--dataset_dir",
            str(folder),
            "--model_name_or_path",
            "tiny-bert",
            "--clean_per_class",
            "4",
            "--meta_batch_size",
            "6",
            "--micro_batch_size",
            "2",
            "--pass_overhead_tokens",
            "0",
            "--draws",
            "3",
            "--output",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    ways = report["ways"]
    assert set(ways) == {"whole", "micro2", "overhead0"}
    assert ways["whole"]["mean_passes"] == 1 and ways["micro2"]["mean_passes"] == 3
    assert ways["whole"]["ratio_to_whole"] == 1.0 and all(w["median_cpu_s"] > 0 for w in ways.values())


def test_variants_run_a_method_with_other_sama_config_fields(monkeypatch):
    import sama_trainer

    spec = {**TINY_SPEC, "unroll_steps": 2, "warmup_steps": 0, "steps": 2}
    variants = {"sama-eval": {"method": "sama", "meta_dropout": False}}
    specs = bench.variant_specs(variants, spec, {"sama": {"bias_correction": False}}, {"finetune", "sama"})
    assert specs["sama-eval"]["method"] == "sama" and specs["sama-eval"]["sama_overrides"] == {"meta_dropout": False}
    assert specs["sama-eval"]["method_kwargs"] == {"bias_correction": False}  # the method's kwargs, unless its own
    for bad in ({"sama": {"method": "sama"}}, {"x": {"method": "finetune"}}, {"x": {"method": "sama", "nope": 1}}):
        with pytest.raises(SystemExit, match="variant"):
            bench.variant_specs(bad, spec, {}, {"finetune", "sama"})

    seen = {}
    train = sama_trainer.SAMATrainer.train

    def spy(self, *args, **kwargs):
        seen["args"] = self.args
        return train(self, *args, **kwargs)

    monkeypatch.setattr(sama_trainer.SAMATrainer, "train", spy)
    result = bench.run(specs["sama-eval"])
    assert result["meta_steps_timed"] == 1
    assert seen["args"].meta_dropout is False and seen["args"].meta_gradient_kwargs == {"bias_correction": False}
