"""The benchmark recipe: a 2-step smoke run of every method (one process each) and its report helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sama_trainer import available_methods


ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "benchmark.py"
REQUIRED_RATIOS = (
    "sama_vs_finetune_throughput",
    "sama_vs_finetune_memory",
    "sama_vs_neumann_throughput",
    "sama_vs_cg_throughput",
    "sama_na_vs_sama_throughput",
)


def _load_recipe():
    spec = importlib.util.spec_from_file_location("benchmark_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_recipe()


def test_smoke_every_method_in_its_own_process(tmp_path):
    methods = ["finetune", "sama", "sama-na"] + [m for m in available_methods() if m not in ("sama", "sama-na")]
    out, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    cmd = [
        sys.executable,
        str(RECIPE),
        *("--model_config", "tiny", "--seq_len", "16", "--batch_size", "4"),
        *("--steps", "2", "--unroll_steps", "2", "--warmup_steps", "0", "--repeats", "1", "--threads", "1"),
        *("--methods", ",".join(methods), "--no_cost_model", "--attn_implementation", "eager"),
        *("--output", str(out), "--markdown", str(md), "--plot", str(png)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(out.read_text())
    assert set(report) >= {"config", "methods", "ratios"}
    cfg = report["config"]
    assert (cfg["model"]["num_hidden_layers"], cfg["model"]["hidden_size"]) == (2, 32)
    assert (cfg["seq_len"], cfg["batch_size"], cfg["steps"], cfg["unroll_steps"]) == (16, 4, 2, 2)
    assert cfg["attn_implementation"] == "eager" and "eager attention" in md.read_text()
    assert list(report["methods"]) == methods
    for m in methods:
        entry = report["methods"][m]
        assert entry["samples_per_s"] > 0 and entry["peak_mem_mb"] > 0, (m, entry)
        run = report["runs"][m][0]
        assert run["timed_steps"] == 2 and run["attn_implementation"] == "eager"
        if m != "finetune":  # the meta step of step 2 lies inside the timed window
            assert run["meta_steps_timed"] == 1, (m, run)
    for key in REQUIRED_RATIOS:
        assert key in report["ratios"]
    expected = {"sama_vs_finetune_throughput", "sama_vs_finetune_memory", "sama_na_vs_sama_throughput"}
    if "neumann" in methods:
        expected.add("sama_vs_neumann_throughput")
    if "cg" in methods:
        expected.add("sama_vs_cg_throughput")
    for key in expected:
        assert report["ratios"][key] > 0, key
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = md.read_text()
    for m in methods:
        assert f"| {m} |" in table


def _run(method: str, sps: float, mem: float, repeat: int) -> dict:
    return {"method": method, "samples_per_s": sps, "peak_mem_mb": mem, "repeat": repeat, "num_params": 1000}


def test_ratios_are_medians_of_side_by_side_ratios():
    # repeat 1 ran under load (everything 2x slower): paired ratios stay 0.8, while a ratio of medians would not
    runs = {
        "finetune": [_run("finetune", 10, 100, 0), _run("finetune", 5, 100, 1), _run("finetune", 10, 100, 2)],
        "sama": [_run("sama", 8, 105, 0), _run("sama", 4, 105, 1), _run("sama", 8, 115, 2)],
        "neumann": [_run("neumann", 2, 300, 0), {"method": "neumann", "error": "boom", "repeat": 1}],
    }
    ratios = bench.compute_ratios(runs)
    assert ratios["sama_vs_finetune_throughput"] == pytest.approx(0.8)
    assert ratios["sama_vs_finetune_memory"] == pytest.approx(1.05)
    assert ratios["sama_vs_neumann_throughput"] == pytest.approx(4.0)
    assert ratios["sama_vs_cg_throughput"] is None and ratios["sama_na_vs_sama_throughput"] is None
    summary = bench.summarize(runs)
    assert summary["sama"]["samples_per_s"] == 8 and summary["neumann"]["repeats_ok"] == 1
    assert "boom" in summary["neumann"]["error"]
    targets = {t["ratio"]: t["met"] for t in bench.check_targets(ratios)}
    assert targets["sama_vs_finetune_throughput"] is False and targets["sama_vs_finetune_memory"] is True
    assert targets["sama_vs_neumann_throughput"] is True and targets["sama_vs_cg_throughput"] is None


def test_markdown_and_plot_with_sweep(tmp_path):
    runs = {
        "finetune": [{**_run("finetune", 10, 100, 0), "samples_per_cpu_s": 5.0}],
        "sama": [{**_run("sama", 8.5, 108, 0), "samples_per_cpu_s": 4.0, "meta_step_ms_median": 50.0}],
    }
    ratios = bench.compute_ratios(runs)
    ratios_cpu = bench.compute_ratios(runs, "samples_per_cpu_s")
    report = {
        "config": {
            "model": {"name": "tiny", "num_hidden_layers": 2, "hidden_size": 32},
            "num_params": 1000,
            "device": "cpu",
            "bf16": False,
            "seq_len": 16,
            "batch_size": 4,
            "unroll_steps": 10,
            "steps": 20,
            "warmup_steps": 10,
            "repeats": 1,
            "threads": 2,
            "load_avg_min": 0.1,
            "load_avg_max": 0.3,
        },
        "methods": bench.summarize(runs),
        "ratios": ratios,
        "targets": bench.check_targets(ratios),
        "ratios_cpu_time": ratios_cpu,
        "targets_cpu_time": bench.check_targets(ratios_cpu),
        "sweep": {
            "hidden_sizes": [32, 64],
            "steps": 10,
            "num_params": [1000, 3000],
            "peak_mem_mb": {"finetune": [100, 250], "sama": [108, None]},
        },
    }
    md = bench.render_markdown(report)
    assert "| sama | 8.50 | 8.50..8.50 | 0.85 | 4.00 | 0.80 | 108 | 1.08 | n/a | 50 |" in md
    assert "| 0.850 | 0.800 | >= 0.82 | yes / **no** |" in md
    assert "| 64 | 0.00 | 250 | n/a |" in md
    png = tmp_path / "fig.png"
    bench.render_plot(report, str(png))
    assert png.stat().st_size > 1000


def test_model_config_presets_and_heads():
    spec = {"model_config": "bert-mini", "seq_len": 700, "num_labels": 3}
    cfg = bench.build_model_config(spec)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        4,
        256,
        4,
        1024,
    )
    assert cfg.max_position_embeddings == 700 and cfg.num_labels == 3
    cfg = bench.build_model_config({**spec, "model_config": "bert-base", "hidden_size": 200})
    assert cfg.hidden_size == 200 and 200 % cfg.num_attention_heads == 0 and cfg.intermediate_size == 800
    assert bench._round_up(25, 10) == 30 and bench._round_up(30, 10) == 30
