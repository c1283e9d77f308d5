"""Run the TARTAN table (tasks × methods × seeds) with ``tartan_continued_pretraining.py`` and write it as markdown.

Each run is a separate process (``OMP_NUM_THREADS=--threads``), ``--jobs`` of them at a time, writing to
``<output_root>/<task>/<method>/seed<seed>/``; runs whose ``results.json`` exists are skipped, so an interrupted table
resumes. The table (``table.md``, ``table.json`` in ``output_root``) gives mean ± sample std over seeds of the test
score (micro-F1 for ChemProt, macro-F1 otherwise) and the 4-task average (mean of the task means; its ± is the std
over seeds of the per-seed average, over the seeds that ran on every task, shown when there are at least two).

Examples::

    # the paper's protocol (RoBERTa-base, Table 5 hyperparameters; needs a GPU)
    python recipes/tartan_table.py --output_root outputs/tartan_table

    # the scaled-down offline CPU protocol (see recipes/configs/tartan_cpu.yaml)
    python recipes/tartan_table.py --output_root outputs/tartan_cpu --config recipes/configs/tartan_cpu.yaml \\
        --jobs 2 --threads 1 -- --model_name_or_path path/to/all-MiniLM-L6-v2

    python recipes/tartan_table.py --output_root outputs/tartan_cpu --aggregate_only

Arguments after ``--`` are passed to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sama_trainer.reporting import replace_marked_block


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MARKER = "tartan-table"  # --results_md writes between <!-- tartan-table --> and <!-- /tartan-table -->
RECIPE = os.path.join(HERE, "tartan_continued_pretraining.py")
TASKS = ("chemprot", "citation_intent", "hyperpartisan_news", "sciie")
METHODS = ("finetune", "tartan_mt", "sama")
METHOD_NAMES = {"finetune": "Fine-tune (baseline)", "tartan_mt": "TARTAN-MT (w ≡ 1)", "sama": "SAMA (learned w)"}
PAPER_AVERAGE = {"finetune": 79.93, "tartan_mt": 83.02, "sama": 83.29}  # SAMA paper Table 3, RoBERTa-base


def run_dir(root: str, task: str, method: str, seed: int) -> str:
    return os.path.join(root, task, method, f"seed{seed}")


def run_one(root: str, task: str, method: str, seed: int, configs: list[str], extra: list[str], threads: int) -> str:
    """Run one (task, method, seed) in a subprocess; returns a one-line status."""
    out = run_dir(root, task, method, seed)
    if os.path.isfile(os.path.join(out, "results.json")):
        return f"skip {task} {method} {seed} (results.json exists)"
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, RECIPE, "--config", os.path.join(HERE, "configs", f"tartan_{task}.yaml")]
    for config in configs:
        cmd += ["--config", config]
    cmd += ["--method", method, "--seed", str(seed), "--output_dir", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    with open(os.path.join(out, "run.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    status = "ok" if rc == 0 else f"FAILED rc={rc} (see {out}/run.log)"
    return f"{status} {task} {method} seed {seed} in {time.time() - start:.0f} s"


def collect(root: str) -> list[dict[str, Any]]:
    rows = []
    for dirpath, _, files in os.walk(root):
        if "results.json" in files:
            with open(os.path.join(dirpath, "results.json"), encoding="utf-8") as f:
                rows.append(json.load(f))
    return rows


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" + (f" (n={len(values)})" if len(values) != 3 else "")


def make_table(rows: list[dict[str, Any]], split: str = "test") -> tuple[str, dict[str, Any]]:
    """Markdown table (methods × tasks + average) of ``split`` scores, and the numbers behind it."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)] + sorted({r["task"] for r in rows} - set(TASKS))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    score: dict[tuple[str, str, int], float] = {(r["task"], r["method"], r["seed"]): r[f"{split}_score"] for r in rows}
    metric = {r["task"]: r["metric"] for r in rows}
    data: dict[str, Any] = {}
    header = "| method | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | average |"
    lines = [header, "|---" * (len(tasks) + 2) + "|"]
    for m in methods:
        cells, means = [], []
        for t in tasks:
            values = [v for (tt, mm, _), v in sorted(score.items()) if tt == t and mm == m]
            data[f"{m}/{t}"] = values
            cells.append(_fmt(values))
            if values:
                means.append(statistics.mean(values))
        seeds = sorted({s for (tt, mm, s) in score if mm == m})
        per_seed = [
            statistics.mean(score[(t, m, s)] for t in tasks) for s in seeds if all((t, m, s) in score for t in tasks)
        ]
        avg = "–"
        if len(means) == len(tasks):
            avg = f"**{100 * statistics.mean(means):.2f}**"
            if len(per_seed) > 1:  # std over the seeds that ran on every task
                avg += f" ± {100 * statistics.stdev(per_seed):.2f}" + (
                    f" ({len(per_seed)} seeds)" if len(per_seed) != 3 else ""
                )
            data[f"{m}/average"] = statistics.mean(means)
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines), data


def model_label(result: dict[str, Any]) -> str:
    """The encoder a run used, by its Hub id (a local folder by its name only) and the layers kept."""
    name = result.get("base_model") or os.path.basename(str(result["model"]).rstrip("/"))
    layers = (result.get("args") or {}).get("num_hidden_layers")
    return f"`{name}`" + (f" (first {layers} layers)" if layers else "")


def write_table(root: str) -> str:
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no results.json under {root}")
    test_table, test_data = make_table(rows, "test")
    dev_table, dev_data = make_table(rows, "dev")
    cpu = sum(r.get("cpu_time_s", 0.0) for r in rows)
    wall = sum(r.get("runtime_s", 0.0) for r in rows)
    paper = ", ".join(f"{METHOD_NAMES[m]} {v}" for m, v in PAPER_AVERAGE.items())
    text = f"""# TARTAN table ({len(rows)} runs in `{root}`)

Test scores ×100, mean ± sample std over seeds (n=3 unless shown). Model: {model_label(rows[0])}.

{test_table}

Dev scores:

{dev_table}

Total CPU time of the runs: {cpu / 60:.1f} min (process time), total wall time {wall / 60:.1f} min.
Paper (RoBERTa-base, full protocol) 4-task averages for reference: {paper}.
"""
    with open(os.path.join(root, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "table.json"), "w", encoding="utf-8") as f:
        json.dump({"test": test_data, "dev": dev_data, "cpu_time_s": cpu, "runs": len(rows)}, f, indent=2)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_root", default="outputs/tartan_table")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--config", action="append", default=[], help="extra YAML applied after the task config")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument(
        "--results_md", default=None, help=f"also put the tables between the {RESULTS_MARKER!r} markers of this file"
    )
    args = parser.parse_args(argv)
    if not args.aggregate_only:
        # seed-major order: a partial table still has every task and method
        todo = [(t, m, s) for s in args.seeds for t in args.tasks for m in args.methods]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(run_one, args.output_root, t, m, s, args.config, extra, args.threads) for t, m, s in todo
            ]
            for future in futures:
                print(future.result(), flush=True)
    text = write_table(args.output_root)
    print(text)
    if args.results_md:
        replace_marked_block(args.results_md, RESULTS_MARKER, text.split("\n", 1)[1])  # without the "# ..." title


if __name__ == "__main__":
    main()
