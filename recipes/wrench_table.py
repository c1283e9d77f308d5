"""Run the WRENCH recipe over methods x datasets x seeds x clean-set sizes and write a markdown results table.

Every run is its own ``recipes/wrench_noisy_finetune.py`` process with
``--config recipes/configs/wrench_<dataset>.yaml``, writing
``<output_root>/<dataset>/k<K>/<method>/seed<seed>/results.json``; finished runs are skipped, so an interrupted
sweep resumes. The table (mean ± std over seeds of each dataset's WRENCH metric on test, plus mean training wall
time and the noise AUROC of SAMA's weights) is built from whatever ``results.json`` files exist.

Examples::

    python recipes/wrench_table.py --datasets youtube,trec --methods finetune,cft,sama_r,sama_rc --seeds 0 \
        --clean_per_class 10,all --output_root outputs/wrench_table --markdown outputs/wrench_table/table.md
    python recipes/wrench_table.py --collect_only --output_root outputs/wrench_table   # table only
    python recipes/wrench_table.py --datasets sms --methods sama_r --seeds 0,1 -- --max_steps 100  # extra flags
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, NamedTuple

from sama_trainer.reporting import replace_marked_block


RECIPES = Path(__file__).resolve().parent
RESULTS_MARKER = "wrench-table"  # default block of --results_md: <!-- wrench-table --> ... <!-- /wrench-table -->
RECIPE = RECIPES / "wrench_noisy_finetune.py"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEFAULT_DATASETS = "youtube,sms,trec,chemprot"
DEFAULT_METHODS = "finetune,finetune_clean,clean_only,cft,sama_na_r,sama_r,sama_rc,sama_rc_clean"


def _k_name(k: str) -> str:
    return "all" if k in ("all", "None", "") else str(int(k))


def run_dir(root: Path, dataset: str, k: str, method: str, seed: int) -> Path:
    return root / dataset / f"k{_k_name(k)}" / method / f"seed{seed}"


def command(args: argparse.Namespace, dataset: str, k: str, method: str, seed: int, out: Path) -> list[str]:
    cmd = [args.python, str(RECIPE), "--config", str(Path(args.configs_dir) / f"wrench_{dataset}.yaml")]
    cmd += ["--method", method, "--seed", str(seed), "--output_dir", str(out), "--save_model", "false"]
    if _k_name(k) != "all":
        cmd += ["--clean_per_class", _k_name(k)]
    return cmd + list(args.extra)


class _Run(NamedTuple):
    proc: subprocess.Popen
    out: Path
    started: float
    log: IO[str]
    device: str | None


def run_all(args: argparse.Namespace) -> None:
    """Run every missing (dataset, K, method, seed), up to ``args.jobs`` at a time, in the order of the flags.

    With ``args.devices`` each run sees one GPU (``CUDA_VISIBLE_DEVICES``), the one with the fewest runs in flight.
    No run starts once ``args.time_budget`` seconds have passed (runs already started finish), so a time-boxed
    sweep (a lent GPU, a CI slot) ends with whole runs only and a later call resumes it.
    """
    root = Path(args.output_root)
    combos = [
        (d, k, m, int(s))
        for d in args.datasets.split(",")
        for k in args.clean_per_class.split(",")
        for m in args.methods.split(",")
        for s in args.seeds.split(",")
    ]
    devices = [d for d in (args.devices or "").split(",") if d]
    start = time.perf_counter()
    running: list[_Run] = []

    def wait_until(at_most: int) -> None:  # reap finished runs until at most `at_most` are left running
        while len(running) > at_most:
            for run in [run for run in running if run.proc.poll() is not None]:
                run.log.close()
                running.remove(run)
                rc = run.proc.returncode
                status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {run.out / 'log.txt'})"
                print(f"    {run.out}: {status} in {time.perf_counter() - run.started:.0f}s", flush=True)
            if len(running) > at_most:
                time.sleep(0.2)

    try:
        for i, (dataset, k, method, seed) in enumerate(combos, 1):
            out = run_dir(root, dataset, k, method, seed)
            if (out / "results.json").is_file() and not args.rerun:
                continue
            wait_until(max(args.jobs, 1) - 1)
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                print(f"time budget of {args.time_budget:.0f}s spent: runs {i}..{len(combos)} not started", flush=True)
                break
            cmd = command(args, dataset, k, method, seed, out)
            print(f"[{i}/{len(combos)}] {' '.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            env = {**os.environ, **ENV}
            device = min(devices, key=lambda d: sum(r.device == d for r in running)) if devices else None
            if device is not None:  # the device with the fewest runs in flight
                env["CUDA_VISIBLE_DEVICES"] = device
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "log.txt", "w", encoding="utf-8")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append(_Run(proc, out, time.perf_counter(), log, device))
        wait_until(0)
    finally:  # interrupted: stop the runs in flight (finished runs keep their results.json)
        for run in running:
            run.proc.kill()
            run.proc.wait()
            run.log.close()


def collect(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.glob("*/k*/*/seed*/results.json")):
        with open(path, encoding="utf-8") as f:
            rows.append(json.load(f))
    return rows


def collect_roots(roots: list[Path]) -> list[dict[str, Any]]:
    """The runs under every root; a run (dataset, K, method, seed) found under an earlier root hides the same run
    under a later one."""
    rows, seen = [], set()
    for root in roots:
        for row in collect(root):
            key = (row["dataset"], row.get("clean_per_class"), row["method"], row["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def _mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f} (n={len(values)})"


AUROC_KEYS = ("noise_auroc", "noise_auroc_within_class")


def _auroc_cell(rows: list[dict[str, Any]]) -> str:
    """'overall / within-class' mean noise AUROC over seeds; '–' where a run has neither."""
    means = [[r[key] for r in rows if r.get(key) is not None] for key in AUROC_KEYS]
    if not any(means):
        return "–"
    return " / ".join(f"{statistics.fmean(vals):.3f}" if vals else "–" for vals in means)


def _on_accelerator(row: dict[str, Any]) -> bool:
    """The run's results.json names a device other than 'cpu' (runs that record none count as CPU)."""
    return row.get("device", "cpu") != "cpu"


def _device_mark(rows: list[dict[str, Any]]) -> str:
    """' †' when a run of the cell ran on an accelerator."""
    return " †" if any(_on_accelerator(r) for r in rows) else ""


# the method whose training (same data, same steps) a method's training time is compared with
TIME_REFERENCE = {"cft": "finetune", "sama_rc_clean": "cft"}


def _time_ratio_cell(by_method: dict[str, list[dict]], method: str) -> str:
    """'wall / CPU' time of ``method`` over its reference's, mean over the seeds both ran ('–' if none)."""
    reference = TIME_REFERENCE.get(method, "finetune")
    ref = {r["seed"]: r for r in by_method.get(reference, [])}
    pairs = [(r, ref[r["seed"]]) for r in by_method.get(method, []) if r["seed"] in ref]
    if method == reference or not pairs:
        return "–"
    wall = statistics.fmean(a["train_seconds"] / b["train_seconds"] for a, b in pairs)
    cpu = [
        a["train_cpu_seconds"] / b["train_cpu_seconds"]
        for a, b in pairs
        if "train_cpu_seconds" in a and "train_cpu_seconds" in b
    ]
    return f"{wall:.2f}" + (f" / {statistics.fmean(cpu):.2f}" if cpu else "")


def _dataset_then_k(item: tuple[tuple[str, str], Any]) -> tuple[str, float]:
    """Sort key of a (dataset, K) row: by dataset, then K in increasing order, 'all' last."""
    (dataset, k), _ = item
    return dataset, float("inf") if k == "all" else float(k)


def markdown_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """One row per (dataset, K), one column per method: test metric (x100) mean ± std over seeds."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    metric = {}
    for r in rows:
        k = "all" if r.get("clean_per_class") is None else str(r["clean_per_class"])
        groups[(r["dataset"], k)][r["method"]].append(r)
        metric[r["dataset"]] = r["metric_name"]
    order = methods or sorted({m for g in groups.values() for m in g}, key=lambda m: DEFAULT_METHODS.find(m))
    order = [m for m in order if any(m in g for g in groups.values())]
    head = "| dataset (metric) | clean/class | " + " | ".join(order) + " |"
    lines = [head, "|" + "---|" * (len(order) + 2)]
    times = ["| dataset | clean/class | " + " | ".join(order) + " |", "|" + "---|" * (len(order) + 2)]
    aurocs, ratios = list(times), list(times)
    for (dataset, k), by_method in sorted(groups.items(), key=_dataset_then_k):
        cells = [
            _mean_std([r["test_metric"] for r in by_method.get(m, [])]) + _device_mark(by_method.get(m, []))
            for m in order
        ]
        lines.append(f"| {dataset} ({metric[dataset]}) | {k} | " + " | ".join(cells) + " |")
        secs = [
            f"{statistics.fmean(r['train_seconds'] for r in by_method[m]):.0f}" if m in by_method else "–"
            for m in order
        ]
        times.append(f"| {dataset} | {k} | " + " | ".join(secs) + " |")
        auc = [_auroc_cell(by_method.get(m, [])) for m in order]
        aurocs.append(f"| {dataset} | {k} | " + " | ".join(auc) + " |")
        ratio = [_time_ratio_cell(by_method, m) for m in order]
        ratios.append(f"| {dataset} | {k} | " + " | ".join(ratio) + " |")
    accelerators = sorted({r["device"] for r in rows if _on_accelerator(r)})
    legend = (
        f"\n\n† runs on {', '.join(accelerators)}; unmarked cells: CPU (or device not recorded)"
        if accelerators
        else ""
    )
    return (
        "Test metric ×100 (accuracy; binary F1 for sms), mean ± std over seeds:\n\n"
        + "\n".join(lines)
        + legend
        + "\n\nTraining wall time (s, mean over seeds):\n\n"
        + "\n".join(times)
        + "\n\nTraining time relative to the same steps without meta learning (`finetune`; `cft` for `sama_rc_clean`),"
        + " wall / CPU time, mean over seeds:\n\n"
        + "\n".join(ratios)
        + "\n\nNoise AUROC of the learned weights, overall / within each given class (wrong majority-vote labels;"
        + " gold train labels, diagnostics):\n\n"
        + "\n".join(aurocs)
        + "\n"
    )


# methods that never read the clean set: their result does not depend on K
CLEAN_FREE_METHODS = ("finetune",)


def plot_k_curve(rows: list[dict[str, Any]], path: str, methods: list[str] | None = None) -> None:
    """Test metric (mean ± sample std over seeds, as the tables) against the clean examples per class K, one panel
    per dataset, one line per method; K = all (the whole clean split) is drawn at its mean number of examples per
    class, and a method that never reads the clean set as a level dashed line at its mean."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    order = [m for m in (methods or sorted({r["method"] for r in rows})) if any(r["method"] == m for r in rows)]
    colour = {method: f"C{i % 10}" for i, method in enumerate(order)}  # a method keeps its colour in every panel
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in mine:
            k = r["clean_per_class"] if r.get("clean_per_class") is not None else r["num_clean"] / r["num_labels"]
            by_method[r["method"]][float(k)].append(100 * r["test_metric"])
        for method in [m for m in order if m in by_method]:
            if method in CLEAN_FREE_METHODS:  # the same runs at every K: a level line
                level = statistics.fmean(v for vs in by_method[method].values() for v in vs)
                ax.axhline(level, linestyle="--", label=method, color=colour[method])
                continue
            ks = sorted(by_method[method])
            means = [statistics.fmean(by_method[method][k]) for k in ks]
            stds = [statistics.stdev(by_method[method][k]) if len(by_method[method][k]) > 1 else 0.0 for k in ks]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method, color=colour[method])
        ax.set_xscale("log")
        ticks = sorted({k for by_k in by_method.values() for k in by_k})
        ax.set_xticks(ticks, [f"{k:.0f}" for k in ticks])  # the Ks measured (K = all rounded), no minor labels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("clean examples per class (K; rightmost: all)")
        ax.set_ylabel(f"test {mine[0]['metric_name']} ×100")
        ax.set_title(dataset)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8)  # every method, from whichever panel has it
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    collected = "with --collect_only: all there are"
    parser.add_argument("--datasets", default=None, help=f"comma list (default {DEFAULT_DATASETS}; {collected})")
    parser.add_argument("--methods", default=None, help=f"comma list (default {DEFAULT_METHODS}; {collected})")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clean_per_class", default="10,all", help="comma list of K; 'all' = the whole valid split")
    parser.add_argument(
        "--output_root",
        default="outputs/wrench_table",
        help="where runs go; with --collect_only a comma list of roots (a run in an earlier root hides a later one's)",
    )
    parser.add_argument("--configs_dir", default=str(RECIPES / "configs"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument(
        "--results_md", default=None, help="also put the table between the --results_marker markers of this file"
    )
    parser.add_argument(
        "--results_marker",
        default=RESULTS_MARKER,
        help="<!-- NAME --> ... <!-- /NAME --> block that --results_md rewrites",
    )
    parser.add_argument("--collect_only", action="store_true", help="only build the table from existing results")
    parser.add_argument("--plot", default=None, help="also draw the test metric against K per dataset (a PNG)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    parser.add_argument("--rerun", action="store_true", help="rerun runs that already have results.json")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. several per GPU)")
    parser.add_argument(
        "--devices", default=None, help="comma list of GPU ids: each run gets the one with the fewest runs in flight"
    )
    parser.add_argument(
        "--time_budget", type=float, default=None, help="seconds after which no new run starts (running ones finish)"
    )
    parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    args = parser.parse_args(argv)
    # the table and plot show the datasets and methods asked for; with --collect_only and none asked, all there are
    wanted_datasets = None if args.collect_only and args.datasets is None else args.datasets or DEFAULT_DATASETS
    wanted_methods = None if args.collect_only and args.methods is None else args.methods or DEFAULT_METHODS
    args.datasets, args.methods = args.datasets or DEFAULT_DATASETS, args.methods or DEFAULT_METHODS
    roots = [Path(root) for root in args.output_root.split(",")]
    if len(roots) > 1 and not args.collect_only:
        raise SystemExit("several --output_root folders only with --collect_only: runs go to one root")
    if not args.collect_only:
        # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C: the runs in flight are stopped, finished ones are kept
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            run_all(args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    rows = collect_roots(roots)
    if wanted_datasets is not None:
        rows = [r for r in rows if r["dataset"] in wanted_datasets.split(",")]
    methods = None if wanted_methods is None else wanted_methods.split(",")
    rows = [r for r in rows if methods is None or r["method"] in methods]
    table = markdown_table(rows, methods)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table, encoding="utf-8")
    if args.results_md:
        replace_marked_block(args.results_md, args.results_marker, table)
    if args.plot:
        plot_k_curve(rows, args.plot, methods)
    return table


if __name__ == "__main__":
    main()
