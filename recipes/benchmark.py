"""Throughput and peak memory: plain ``Trainer`` finetuning vs ``SAMATrainer`` with each meta-gradient method.

Every (method, repeat) runs in its own process (this script with ``--worker``) on the same model config, synthetic
data, sequence length and batch size, for the same number of optimizer steps. Methods are interleaved across repeats
(each repeat rotates the order), per-method numbers are medians over repeats and ratios are medians of the per-repeat
(side-by-side) ratios, so slow drifts of machine load cancel out.

Measured per worker:

* throughput: samples/s over ``--steps`` optimizer steps after ``--warmup_steps`` (default: one unroll, so the first
  meta step with its one-time allocations is excluded); ``--steps`` is rounded up to a multiple of
  ``--unroll_steps`` so the timed window holds exactly ``steps / unroll_steps`` meta steps;
* peak memory: CPU: peak RSS above the RSS right after model and data construction (``VmHWM``/``VmRSS`` from
  ``/proc/self/status``, the high-water mark reset through ``/proc/self/clear_refs``); CUDA:
  ``torch.cuda.max_memory_allocated`` (which includes the model).

The finetune worker also times a no-grad forward and a forward+backward on one batch, which gives the cost-model
ceiling of SAMA's throughput: ``u·T_step / (u·T_step + T_fwd+bwd + 2·T_fwd)`` for unroll ``u``.

Examples::

    python recipes/benchmark.py --output bench.json --markdown bench.md --plot bench.png
    python recipes/benchmark.py --methods finetune,sama,sama-na --repeats 5 --hidden_sizes 128,256,384,512
    python recipes/benchmark.py --model_config bert-base --bf16 --batch_size 32 --output gpu.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

FINETUNE = "finetune"
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 32, "vocab_size": 1024},
    "bert-mini": {"num_hidden_layers": 4, "hidden_size": 256, "vocab_size": 30522},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "vocab_size": 30522},
}
# (name, ratio key, target, "min" = value must be >= target / "max" = <= target); CPU targets at unroll 10
TARGETS = [
    ("SAMA throughput vs plain Trainer", "sama_vs_finetune_throughput", 0.82, "min"),
    ("SAMA peak memory vs plain Trainer", "sama_vs_finetune_memory", 1.10, "max"),
    ("SAMA throughput vs Neumann", "sama_vs_neumann_throughput", 2.0, "min"),
    ("SAMA throughput vs CG", "sama_vs_cg_throughput", 2.0, "min"),
    ("SAMA-NA throughput vs SAMA", "sama_na_vs_sama_throughput", (0.97, 1.03), "range"),
]


# ----------------------------------------------------------------------------------------------------------------
# worker: one method, one model size, one process


def _proc_status_mb() -> dict[str, float]:
    """``VmRSS``/``VmHWM`` of this process in MB (empty where /proc is missing)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_fallback_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _set_mmap_threshold(nbytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD)``: allocations above ``nbytes`` get their own mapping, returned on free.

    With glibc's default (dynamic) threshold, freed tensors stay in the heap, so peak RSS also counts memory that was
    free at the peak; a fixed small threshold makes peak RSS track the peak of live tensors.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _num_heads(hidden_size: int) -> int:
    heads = max(1, hidden_size // 64)
    while hidden_size % heads:
        heads -= 1
    return heads


def build_model_config(spec: dict[str, Any]) -> Any:
    """A ``BertConfig`` for ``spec`` (a preset name or a JSON file in ``model_config``, plus overrides)."""
    from transformers import BertConfig

    name = spec["model_config"]
    if name in MODEL_CONFIGS:
        kwargs: dict[str, Any] = dict(MODEL_CONFIGS[name])
    else:
        with open(name, encoding="utf-8") as f:
            kwargs = json.load(f)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if spec.get(key):
            kwargs[key] = spec[key]
    hidden = kwargs.get("hidden_size", 768)
    kwargs.setdefault("num_attention_heads", _num_heads(hidden))
    if hidden % kwargs["num_attention_heads"]:
        kwargs["num_attention_heads"] = _num_heads(hidden)
    if spec.get("hidden_size") or name in MODEL_CONFIGS:
        kwargs["intermediate_size"] = 4 * hidden
    kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 512), spec["seq_len"])
    kwargs["num_labels"] = spec["num_labels"]
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    return BertConfig(**kwargs)


class TokenDataset:
    """Fixed-length random token sequences with labels (a map-style dataset of dicts of tensors)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, num_labels: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)
        self.labels = torch.randint(0, num_labels, (n,), generator=g)
        self.attention_mask = torch.ones(seq_len, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask, "labels": self.labels[i]}


def _time_passes(model: Any, batch: dict[str, Any], device: Any, reps: int, bf16: bool) -> dict[str, float]:
    """Median seconds of a no-grad forward and of a forward+backward (train mode) on ``batch``."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(backward: bool) -> float:
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            sync()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if backward:
                    model(**batch).loss.backward()
                else:
                    with torch.no_grad():
                        model(**batch)
            sync()
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        return statistics.median(times[1:])

    model.train()
    fwd_bwd = run(True)
    fwd = run(False)
    return {"fwd_s": fwd, "fwd_bwd_s": fwd_bwd}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method for ``warmup_steps + steps`` optimizer steps and measure throughput and peak memory."""
    import gc

    import torch
    from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from sama_trainer import SAMAConfig, SAMATrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    mmap_threshold_set = bool(spec.get("malloc_mmap_threshold")) and _set_mmap_threshold(spec["malloc_mmap_threshold"])
    method, batch_size, unroll = spec["method"], spec["batch_size"], spec["unroll_steps"]
    warmup, steps = spec["warmup_steps"], spec["steps"]
    cuda = torch.cuda.is_available() and not spec.get("cpu", False)
    device = torch.device("cuda" if cuda else "cpu")

    # same data for every method (the meta set is drawn from the same distribution, another seed)
    config = build_model_config(spec)
    n_train = (warmup + steps) * batch_size
    n_meta = max(batch_size, ((warmup + steps) // unroll + 1) * batch_size)
    train_data = TokenDataset(n_train, spec["seq_len"], config.vocab_size, spec["num_labels"], seed=spec["seed"])
    meta_data = TokenDataset(n_meta, spec["seq_len"], config.vocab_size, spec["num_labels"], seed=spec["seed"] + 1)
    torch.manual_seed(spec["seed"])
    model = BertForSequenceClassification(config).to(device)
    num_params = sum(p.numel() for p in model.parameters())

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline_mb = torch.cuda.memory_allocated(device) / 2**20
        hwm_reset = True
    else:
        hwm_reset = _reset_peak_rss()
        baseline_mb = _proc_status_mb().get("VmRSS", 0.0)
        if not baseline_mb:  # no /proc: the best available is the lifetime peak
            baseline_mb = _peak_rss_fallback_mb()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    class Timer(TrainerCallback):
        """Wall time between the end of step ``warmup`` and the end of step ``warmup + steps``."""

        def __init__(self) -> None:
            self.start = self.end = None
            self.active = False
            self.meta_times: list[float] = []
            self.meta_at: list[int] = []  # index (0-based) of the timed step that ran each meta step
            self.stamps: list[float] = []  # end of each timed step
            self.cpu_start = self.cpu_end = 0.0  # process CPU time (all threads) at the window's ends
            self.meta_cpu: list[float] = []

        @property
        def meta_s(self) -> float:
            return sum(self.meta_times)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                self.start, self.active = time.perf_counter(), True
                self.cpu_start = time.process_time()
            elif self.active:
                sync()
                self.stamps.append(time.perf_counter())
                if state.global_step == warmup + steps:
                    self.end, self.active = self.stamps[-1], False
                    self.cpu_end = time.process_time()

    timer = Timer()
    if warmup == 0:  # start at the first step instead

        class _Start(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 0 and timer.start is None:
                    sync()
                    timer.start, timer.active = time.perf_counter(), True
                    timer.cpu_start = time.process_time()

        callbacks = [_Start(), timer]
    else:
        callbacks = [timer]

    common: dict[str, Any] = dict(
        output_dir=spec["output_dir"],
        max_steps=warmup + steps,
        per_device_train_batch_size=batch_size,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        seed=spec["seed"],
        bf16=spec["bf16"],
        use_cpu=not cuda,
    )
    if method == FINETUNE:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train_data, callbacks=callbacks)
    else:
        args = SAMAConfig(
            **common,
            meta_gradient=method,
            meta_gradient_kwargs=spec.get("method_kwargs", {}).get(method) or None,
            unroll_steps=unroll,
            meta_batch_size=batch_size,
        )
        trainer = SAMATrainer(
            model=model, args=args, train_dataset=train_data, meta_dataset=meta_data, callbacks=callbacks
        )
        meta_step = trainer.meta_step

        def timed_meta_step(*a: Any, **kw: Any) -> None:
            if not timer.active:
                return meta_step(*a, **kw)
            sync()
            t, c = time.perf_counter(), time.process_time()
            meta_step(*a, **kw)
            sync()
            timer.meta_times.append(time.perf_counter() - t)
            timer.meta_cpu.append(time.process_time() - c)
            timer.meta_at.append(len(timer.stamps))

        trainer.meta_step = timed_meta_step

    profile_dir = spec.get("profile_dir")
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if method != FINETUNE:
            inner = trainer.meta_step

            def labelled_meta_step(*a: Any, **kw: Any) -> None:
                with record_function("sama::meta_step"):
                    inner(*a, **kw)

            trainer.meta_step = labelled_meta_step
        with profile(activities=activities, profile_memory=True) as prof:
            trainer.train()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        Path(profile_dir, f"profile_{method}_h{config.hidden_size}.txt").write_text(table + "\n", encoding="utf-8")
    else:
        trainer.train()

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        peak_above_mb = peak_mb - baseline_mb
    else:
        status = _proc_status_mb()
        hwm = status.get("VmHWM") or _peak_rss_fallback_mb()
        peak_above_mb = hwm - baseline_mb
        peak_mb = peak_above_mb
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"the timed window was not reached (global_step={trainer.state.global_step})")
    elapsed = timer.end - timer.start
    step_s = [b - a for a, b in zip([timer.start] + timer.stamps, timer.stamps)]
    meta_in_step = [0.0] * len(step_s)
    for i, t in zip(timer.meta_at, timer.meta_times):
        meta_in_step[i] += t
    # load-spike-robust estimate: median base-step time plus median meta-step time per meta step
    base_med = statistics.median(s - m for s, m in zip(step_s, meta_in_step))
    meta_med = statistics.median(timer.meta_times) if timer.meta_times else 0.0
    robust_s = steps * base_med + len(timer.meta_times) * meta_med
    cpu_s = timer.cpu_end - timer.cpu_start
    result: dict[str, Any] = {
        "method": method,
        "samples_per_s": steps * batch_size / elapsed,
        "peak_mem_mb": peak_mb,
        "peak_mem_above_model_mb": peak_above_mb,
        "baseline_mem_mb": baseline_mb,
        "hwm_reset": hwm_reset,
        "malloc_mmap_threshold_set": mmap_threshold_set,
        "step_time_ms": 1000.0 * elapsed / steps,
        "samples_per_s_robust": steps * batch_size / robust_s,
        # CPU: throughput per second of process CPU time, insensitive to time-sharing of the cores with other jobs
        # (with --threads 1; with more threads it also counts OpenMP spinning)
        "samples_per_cpu_s": steps * batch_size / cpu_s if not cuda and cpu_s > 0 else None,
        "step_cpu_ms": 1000.0 * cpu_s / steps,
        "base_step_ms_median": 1000.0 * base_med,
        "step_ms_each": [round(1000.0 * t, 1) for t in step_s],
        "timed_steps": steps,
        "num_params": num_params,
        "hidden_size": config.hidden_size,
        "attn_implementation": model.config._attn_implementation,  # what the model runs, not what was asked
        "device": str(device),
        "load_avg_1m": os.getloadavg()[0],
    }
    if method != FINETUNE:
        result["meta_steps_timed"] = len(timer.meta_times)
        result["meta_step_ms_each"] = [round(1000.0 * t, 1) for t in timer.meta_times]
        result["meta_step_ms_median"] = 1000.0 * meta_med
        result["meta_step_cpu_ms"] = 1000.0 * sum(timer.meta_cpu) / max(len(timer.meta_cpu), 1)
        result["base_step_cpu_ms"] = 1000.0 * (cpu_s - sum(timer.meta_cpu)) / steps
        result["meta_step_ms"] = 1000.0 * timer.meta_s / max(len(timer.meta_times), 1)
        result["base_step_ms"] = 1000.0 * (elapsed - timer.meta_s) / steps
        result["meta_steps_skipped"] = trainer.meta_steps_skipped
    elif spec.get("cost_model"):
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        passes = _time_passes(model, batch, device, reps=spec.get("cost_model_reps", 5), bf16=spec["bf16"])
        result.update(passes)
        result["fwd_over_fwd_bwd"] = passes["fwd_s"] / passes["fwd_bwd_s"]
        step_s = elapsed / steps
        result["sama_ceiling_vs_finetune"] = (
            unroll * step_s / (unroll * step_s + passes["fwd_bwd_s"] + 2 * passes["fwd_s"])
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# orchestration


def _resolve_methods(requested: str | None, available: list[str]) -> list[str]:
    if not requested or requested == "all":
        return [FINETUNE] + available
    methods = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in methods if m != FINETUNE and m not in available]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {[FINETUNE] + available}")
    return list(dict.fromkeys(methods))


class WorkerLauncher:
    """Runs each worker in its own process.

    Default: a "zygote" (this script with ``--worker server``) imports torch, transformers and sama_trainer once and
    forks a fresh child per job, so each job still has its own process (own memory high-water mark, own allocator)
    but skips the ~5 s of imports. ``fresh=True`` starts a new interpreter per job (this script with
    ``--worker SPEC``) instead. Neither the zygote nor the orchestrator touches CUDA before a fork.
    """

    def __init__(self, fresh: bool = False):
        self.fresh = fresh
        self._server: subprocess.Popen | None = None
        self._env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")])),
        }
        if not fresh:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "server"]
            self._server = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self._env, bufsize=1
            )

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one job; returns its result, or ``{"error": ...}``."""
        with tempfile.TemporaryDirectory(prefix="sama-bench-") as tmp:
            spec = {**spec, "output_dir": os.path.join(tmp, "out")}
            result_file, log_file = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
            if self._server is None:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
                cmd += ["--result_file", result_file]
                try:
                    with open(log_file, "w", encoding="utf-8") as log:
                        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=self._env)
                    rc, timed_out = rc.returncode, False
                except subprocess.TimeoutExpired:
                    rc, timed_out = -9, True
            else:
                job = {"spec": spec, "result_file": result_file, "log_file": log_file, "timeout": timeout}
                self._server.stdin.write(json.dumps(job) + "\n")
                self._server.stdin.flush()
                line = self._server.stdout.readline()
                if not line:
                    return {"method": spec["method"], "error": "the worker server died"}
                reply = json.loads(line)
                rc, timed_out = reply["rc"], reply["timed_out"]
            if timed_out:
                return {"method": spec["method"], "error": f"timed out after {timeout:.0f} s"}
            if rc != 0 or not os.path.isfile(result_file):
                tail = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
                return {"method": spec["method"], "error": f"exit code {rc}: " + "\n".join(tail)}
            with open(result_file, encoding="utf-8") as f:
                return json.load(f)

    def available_methods(self) -> list[str]:
        """``sama_trainer.available_methods()``, asked of the zygote (which has imported it already)."""
        if self._server is None:
            from sama_trainer import available_methods

            return available_methods()
        self._server.stdin.write(json.dumps({"cmd": "methods"}) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError("the worker server died while importing sama_trainer (run with --fresh_processes)")
        return json.loads(line)["methods"]

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait(timeout=60)
            self._server = None


def _run_job_in_child(job: dict[str, Any]) -> int:
    """In a forked child: send output to the job's log, run the worker, write the result. Returns the exit code."""
    import traceback

    fd = os.open(job["log_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        result = run_worker(job["spec"])
        with open(job["result_file"], "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve_workers() -> None:
    """The zygote: import the heavy modules once, then fork one child per job line read from stdin."""
    import signal

    # torch.cuda.is_available() (called by the imports below) must not initialize the CUDA driver in the zygote:
    # a child forked after that cannot use CUDA. The NVML-based check answers without initializing it.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments  # noqa: F401

    import sama_trainer  # noqa: F401

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialized before forking workers; run with --fresh_processes")
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("cmd") == "methods":
            sys.stdout.write(json.dumps({"methods": sama_trainer.available_methods()}) + "\n")
            sys.stdout.flush()
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_run_job_in_child(job))
        deadline = time.monotonic() + job["timeout"]
        timed_out, status = False, 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def run_suite(
    launcher: WorkerLauncher,
    base_spec: dict[str, Any],
    methods: list[str],
    repeats: int,
    timeout: float,
    log: Any = print,
) -> dict[str, list[dict[str, Any]]]:
    """Run every method ``repeats`` times, rotating the order each repeat. Returns method -> per-repeat results."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(repeats):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            t = time.perf_counter()
            result = launcher.run({**base_spec, "method": method}, timeout)
            result["repeat"] = r
            runs[method].append(result)
            if "error" in result:
                log(f"  [repeat {r + 1}/{repeats}] {method}: FAILED ({result['error'].splitlines()[-1]})")
            else:
                log(
                    f"  [repeat {r + 1}/{repeats}] {method}: {result['samples_per_s']:.2f} samples/s, "
                    f"peak {result['peak_mem_mb']:.0f} MB, load {result['load_avg_1m']:.2f} "
                    f"({time.perf_counter() - t:.0f} s)"
                )
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-method medians (and the per-repeat values) of the worker results."""
    out: dict[str, dict[str, Any]] = {}
    for method, results in runs.items():
        ok = [r for r in results if "error" not in r]
        entry: dict[str, Any] = {
            "samples_per_s": _median([r["samples_per_s"] for r in ok]),
            "peak_mem_mb": _median([r["peak_mem_mb"] for r in ok]),
            "samples_per_s_robust": _median([r.get("samples_per_s_robust") for r in ok]),
            "samples_per_cpu_s": _median([r.get("samples_per_cpu_s") for r in ok]),
            "samples_per_s_runs": [r.get("samples_per_s") for r in results],
            "peak_mem_mb_runs": [r.get("peak_mem_mb") for r in results],
            "repeats_ok": len(ok),
        }
        medians = ("step_time_ms", "base_step_ms", "meta_step_ms", "base_step_ms_median", "meta_step_ms_median")
        medians += ("step_cpu_ms", "base_step_cpu_ms", "meta_step_cpu_ms")
        for key in medians + ("fwd_s", "fwd_bwd_s", "fwd_over_fwd_bwd"):
            if any(key in r for r in ok):
                entry[key] = _median([r[key] for r in ok if key in r])
        if any("sama_ceiling_vs_finetune" in r for r in ok):
            entry["sama_ceiling_vs_finetune"] = _median([r["sama_ceiling_vs_finetune"] for r in ok])
        for key in ("num_params", "baseline_mem_mb", "meta_steps_timed", "hwm_reset", "device"):
            if ok and key in ok[0]:
                entry[key] = ok[0][key]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            entry["error"] = errors[0]
        out[method] = entry
    return out


def _key(method: str) -> str:
    return method.replace("-", "_")


def compute_ratios(
    runs: dict[str, list[dict[str, Any]]], throughput: str = "samples_per_s"
) -> dict[str, float | None]:
    """Medians over repeats of side-by-side ratios (each repeat's runs ran back to back).

    ``throughput``: the per-run field to compare (``samples_per_s``, or ``samples_per_s_robust``).
    """

    def paired(a: str, b: str, field: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        values = []
        for ra, rb in zip(runs[a], runs[b]):
            x, y = ra.get(field), rb.get(field)
            if x is not None and y:
                values.append(x / y)
        return _median(values)

    ratios: dict[str, float | None] = {
        "sama_vs_finetune_throughput": paired("sama", FINETUNE, throughput),
        "sama_vs_finetune_memory": paired("sama", FINETUNE, "peak_mem_mb"),
        "sama_vs_neumann_throughput": paired("sama", "neumann", throughput),
        "sama_vs_cg_throughput": paired("sama", "cg", throughput),
        "sama_na_vs_sama_throughput": paired("sama-na", "sama", throughput),
    }
    for m in runs:
        if m == FINETUNE:
            continue
        ratios.setdefault(f"{_key(m)}_vs_finetune_throughput", paired(m, FINETUNE, throughput))
        ratios.setdefault(f"{_key(m)}_vs_finetune_memory", paired(m, FINETUNE, "peak_mem_mb"))
        if m != "sama":
            ratios.setdefault(f"sama_vs_{_key(m)}_throughput", paired("sama", m, throughput))
            ratios.setdefault(f"sama_vs_{_key(m)}_memory", paired("sama", m, "peak_mem_mb"))
    return ratios


def check_targets(ratios: dict[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for name, key, target, kind in TARGETS:
        value = ratios.get(key)
        if value is None:
            met = None
        elif kind == "min":
            met = value >= target
        elif kind == "max":
            met = value <= target
        else:
            met = target[0] <= value <= target[1]
        out.append({"name": name, "ratio": key, "value": value, "target": target, "kind": kind, "met": met})
    return out


# ----------------------------------------------------------------------------------------------------------------
# reporting


def _fmt(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _target_text(t: dict[str, Any]) -> str:
    if t["kind"] == "min":
        return f">= {t['target']}"
    if t["kind"] == "max":
        return f"<= {t['target']}"
    return f"{t['target'][0]}..{t['target'][1]}"


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def render_markdown(report: dict[str, Any]) -> str:
    cfg, methods, ratios = report["config"], report["methods"], report["ratios"]
    device = cfg["device"]
    mem_desc = (
        "peak RSS above the RSS after model construction" if device == "cpu" else "torch.cuda.max_memory_allocated"
    )
    if device == "cpu":
        threshold = cfg.get("malloc_mmap_threshold", "glibc default")
        mem_desc += f" (malloc mmap threshold: {threshold})"
    lines = [
        f"### {cfg['model']['name']} ({cfg['model']['num_hidden_layers']} layers x {cfg['model']['hidden_size']} "
        f"hidden, {cfg['num_params'] / 1e6:.1f}M params) on {device}, {'bf16' if cfg['bf16'] else 'fp32'}, "
        f"{cfg.get('attn_implementation') or 'default'} attention",
        "",
        f"seq_len {cfg['seq_len']}, batch {cfg['batch_size']} (meta batch = base batch), "
        f"unroll {cfg['unroll_steps']}, "
        f"{cfg['steps']} timed steps after {cfg['warmup_steps']} warm-up steps, {cfg['repeats']} interleaved repeats "
        f"(median), torch threads {cfg['threads']}. Memory: {mem_desc}. Load average (1 min) during the run: "
        f"{_fmt(cfg['load_avg_min'])}..{_fmt(cfg['load_avg_max'])}.",
        "",
        "| method | samples/s | min..max | vs finetune | samples/CPU-s | vs finetune | peak mem (MB) | vs finetune "
        "| base step (ms) | meta step (ms) | meta step CPU (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cpu_ratios = report.get("ratios_cpu_time") or {}
    for m, e in methods.items():
        if e.get("samples_per_s") is None:
            lines.append(f"| {m} | failed |" + " |" * 10)
            continue
        runs = [v for v in e["samples_per_s_runs"] if v is not None]
        key = _key(m)
        vs_t = 1.0 if m == FINETUNE else ratios.get(f"{key}_vs_finetune_throughput")
        vs_m = 1.0 if m == FINETUNE else ratios.get(f"{key}_vs_finetune_memory")
        vs_c = 1.0 if m == FINETUNE else cpu_ratios.get(f"{key}_vs_finetune_throughput")
        cpu = e.get("samples_per_cpu_s")
        lines.append(
            f"| {m} | {e['samples_per_s']:.2f} | {min(runs):.2f}..{max(runs):.2f} | {_fmt(vs_t)} "
            f"| {_fmt(cpu)} | {_fmt(vs_c if cpu is not None else None)} | {e['peak_mem_mb']:.0f} | {_fmt(vs_m)} "
            f"| {_fmt(e.get('base_step_ms_median'), 0)} | {_fmt(e.get('meta_step_ms_median'), 0)} "
            f"| {_fmt(e.get('meta_step_cpu_ms'), 0)} |"
        )
    lines += [
        "",
        "samples/s: wall clock over the timed window. samples/CPU-s: per second of the worker's process CPU time "
        "(CPU runs; insensitive to other jobs sharing the cores when torch threads = 1). base/meta step: median wall "
        "times (base step excludes the meta step). Ratios: medians of per-repeat (side-by-side) ratios.",
    ]
    ft = methods.get(FINETUNE, {})
    if ft.get("fwd_over_fwd_bwd") is not None:
        lines += [
            "",
            f"Cost model (finetune worker): no-grad forward = {ft['fwd_over_fwd_bwd']:.2f} x forward+backward; "
            f"SAMA throughput ceiling at unroll {cfg['unroll_steps']} = {ft['sama_ceiling_vs_finetune']:.3f} "
            "x finetune.",
        ]
    lines += [
        "",
        "| target | wall-clock ratio | CPU-time ratio | target | met (wall / CPU) |",
        "|---|---:|---:|---:|---|",
    ]
    cpu_targets = {t["ratio"]: t for t in report.get("targets_cpu_time") or []}
    for t in report["targets"]:
        c = cpu_targets.get(t["ratio"], {})
        lines.append(
            f"| {t['name']} (`{t['ratio']}`) | {_fmt(t['value'], 3)} | {_fmt(c.get('value'), 3)} "
            f"| {_target_text(t)} | {_met(t['met'])} / {_met(c.get('met'))} |"
        )
    sweep = report.get("sweep")
    if sweep:
        names = list(sweep["peak_mem_mb"])
        lines += [
            "",
            f"Memory vs model size ({cfg['model']['num_hidden_layers']} layers, hidden size swept, "
            f"{sweep['steps']} timed steps, peak memory in MB):",
            "",
            "| hidden | params (M) | " + " | ".join(names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for i, h in enumerate(sweep["hidden_sizes"]):
            params = sweep["num_params"][i]
            cells = [_fmt(sweep["peak_mem_mb"][m][i], 0) for m in names]
            lines.append(f"| {h} | {_fmt(params and params / 1e6, 2)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: str) -> None:
    """Two panels as in the SAMA paper's Fig. 1: throughput vs memory, and memory vs model size, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, cfg = report["methods"], report["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for m, e in methods.items():
        if e.get("samples_per_s") is None:
            continue
        ax1.scatter(e["peak_mem_mb"], e["samples_per_s"], s=60, color=colors[m], label=m)
        ax1.annotate(m, (e["peak_mem_mb"], e["samples_per_s"]), textcoords="offset points", xytext=(5, 4))
    ax1.set_xlabel("peak memory (MB)" + (" above model" if cfg["device"] == "cpu" else ""))
    ax1.set_ylabel("throughput (samples/s)")
    ax1.set_title(
        f"{cfg['model']['name']}, batch {cfg['batch_size']}, seq {cfg['seq_len']}, unroll {cfg['unroll_steps']}"
    )
    ax1.grid(alpha=0.3)

    sweep = report.get("sweep")
    if sweep:
        xs = [p / 1e6 if p else float("nan") for p in sweep["num_params"]]
        for m, mems in sweep["peak_mem_mb"].items():
            pts = [(x, y) for x, y in zip(xs, mems) if y is not None and math.isfinite(x)]
            if pts:
                ax2.plot(*zip(*pts), marker="o", color=colors.get(m), label=m)
        ax2.set_title(f"memory vs model size (hidden {', '.join(map(str, sweep['hidden_sizes']))})")
    else:
        for m, e in methods.items():
            if e.get("peak_mem_mb") is not None:
                ax2.scatter(cfg["num_params"] / 1e6, e["peak_mem_mb"], color=colors[m], label=m)
        ax2.set_title("memory vs model size (no --hidden_sizes sweep)")
    ax2.set_xlabel("model parameters (M)")
    ax2.set_ylabel("peak memory (MB)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_config", default="bert-mini", help=f"{', '.join(MODEL_CONFIGS)} or a BertConfig JSON file")
    p.add_argument("--num_layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--hidden_size", type=int, default=None, help="override hidden_size (intermediate = 4x)")
    p.add_argument("--vocab_size", type=int, default=None, help="override vocab_size")
    p.add_argument("--num_labels", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16, help="base and meta batch size")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (rounded up to a multiple of unroll)")
    p.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default: unroll_steps)")
    p.add_argument("--unroll_steps", type=int, default=10)
    p.add_argument("--methods", default="all", help="comma-separated; 'finetune' = plain Trainer; default: all")
    p.add_argument("--method_kwargs", default="{}", help='JSON: method -> meta_gradient_kwargs, e.g. {"cg": {...}}')
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per method (median reported)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--attn_implementation",
        default=None,
        help="attention kernel of the model (default: transformers' choice, sdpa); neumann, cg and unrolled "
        "differentiate twice through it, which SDPA's fused GPU kernels do not support: use 'eager' for them",
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden_sizes", default="", help="comma-separated hidden sizes for a memory-vs-size sweep")
    p.add_argument("--sweep_steps", type=int, default=None, help="timed steps per sweep run (default: unroll)")
    p.add_argument("--sweep_repeats", type=int, default=1)
    p.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=0,
        help="CPU: glibc mmap threshold in bytes for the workers (e.g. 131072) so that peak RSS tracks live tensors;"
        " 0 = glibc's default",
    )
    p.add_argument("--no_cost_model", action="store_true", help="skip timing forward vs forward+backward")
    p.add_argument("--profile_dir", default=None, help="write a torch.profiler table per main-config worker here")
    p.add_argument(
        "--fresh_processes",
        action="store_true",
        help="start a new interpreter per worker instead of forking it from a pre-imported zygote",
    )
    p.add_argument("--worker_timeout", type=float, default=3600.0, help="seconds per worker process")
    p.add_argument("--output", default=None, help="JSON report")
    p.add_argument("--markdown", default=None, help="markdown table")
    p.add_argument("--plot", default=None, help="PNG (default: --output with .png)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result_file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.unroll_steps < 1 or args.steps < 1 or args.batch_size < 1 or args.repeats < 1:
            p.error("--unroll_steps, --steps, --batch_size and --repeats must be >= 1")
        if args.warmup_steps is not None and args.warmup_steps < 0:
            p.error("--warmup_steps must be >= 0")
    return args


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "server":
        serve_workers()
        return 0
    if args.worker is not None:
        result = run_worker(json.loads(args.worker))
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    launcher = WorkerLauncher(fresh=args.fresh_processes)  # starts importing in parallel with us
    try:
        return _benchmark(args, launcher, argv)
    finally:
        launcher.close()


def _benchmark(args: argparse.Namespace, launcher: WorkerLauncher, argv: list[str] | None) -> int:
    unroll = args.unroll_steps
    steps = _round_up(args.steps, unroll)
    if steps != args.steps:
        print(f"--steps {args.steps} rounded up to {steps} (a multiple of --unroll_steps {unroll})")
    warmup = unroll if args.warmup_steps is None else args.warmup_steps
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    threads = args.threads or torch.get_num_threads()
    spec: dict[str, Any] = {
        "model_config": args.model_config,
        "num_hidden_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "vocab_size": args.vocab_size,
        "num_labels": args.num_labels,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "unroll_steps": unroll,
        "bf16": args.bf16,
        "cpu": args.cpu,
        "threads": args.threads,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "method_kwargs": json.loads(args.method_kwargs),
        "cost_model": not args.no_cost_model,
        "profile_dir": args.profile_dir,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "attn_implementation": args.attn_implementation,
    }
    model_cfg = build_model_config(spec)
    methods = _resolve_methods(args.methods, launcher.available_methods())  # after our imports: they overlap
    load_start = os.getloadavg()[0]
    print(
        f"benchmark: {methods} x {args.repeats} repeats, {model_cfg.num_hidden_layers} layers x "
        f"{model_cfg.hidden_size} hidden, seq {args.seq_len}, batch {args.batch_size}, {warmup}+{steps} steps, "
        f"unroll {unroll}, {'cuda' if cuda else 'cpu'}, load {load_start:.2f}",
        flush=True,
    )
    t0 = time.perf_counter()
    runs = run_suite(launcher, spec, methods, args.repeats, args.worker_timeout, log=lambda s: print(s, flush=True))
    summary = summarize(runs)
    ratios = compute_ratios(runs)
    ratios_robust = compute_ratios(runs, "samples_per_s_robust")
    ratios_cpu = compute_ratios(runs, "samples_per_cpu_s") if not cuda else None

    sweep = None
    hidden_sizes = [int(h) for h in args.hidden_sizes.split(",") if h.strip()]
    if hidden_sizes:
        sweep_steps = _round_up(args.sweep_steps or unroll, unroll)
        sweep = {"hidden_sizes": hidden_sizes, "steps": sweep_steps, "num_params": [], "peak_mem_mb": {}}
        sweep["samples_per_s"] = {}
        for h in hidden_sizes:
            print(f"sweep: hidden size {h}", flush=True)
            sweep_spec = {**spec, "hidden_size": h, "steps": sweep_steps, "cost_model": False, "profile_dir": None}
            sweep_runs = run_suite(launcher, sweep_spec, methods, args.sweep_repeats, args.worker_timeout, log=print)
            s = summarize(sweep_runs)
            sweep["num_params"].append(next((e["num_params"] for e in s.values() if "num_params" in e), None))
            for m in methods:
                sweep["peak_mem_mb"].setdefault(m, []).append(s[m]["peak_mem_mb"])
                sweep["samples_per_s"].setdefault(m, []).append(s[m]["samples_per_s"])

    loads = [r["load_avg_1m"] for rs in runs.values() for r in rs if "load_avg_1m" in r] + [load_start]
    num_params = next((e["num_params"] for e in summary.values() if "num_params" in e), None)
    if num_params is None:
        num_params = sum(
            p.numel() for p in __import__("transformers").BertForSequenceClassification(model_cfg).parameters()
        )
    import transformers

    report: dict[str, Any] = {
        "config": {
            "model": {
                "name": args.model_config if args.model_config in MODEL_CONFIGS else Path(args.model_config).name,
                "num_hidden_layers": model_cfg.num_hidden_layers,
                "hidden_size": model_cfg.hidden_size,
                "num_attention_heads": model_cfg.num_attention_heads,
                "intermediate_size": model_cfg.intermediate_size,
                "vocab_size": model_cfg.vocab_size,
                "num_labels": model_cfg.num_labels,
            },
            "num_params": num_params,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "meta_batch_size": args.batch_size,
            "steps": steps,
            "warmup_steps": warmup,
            "unroll_steps": unroll,
            "repeats": args.repeats,
            "methods": methods,
            "method_kwargs": spec["method_kwargs"],
            "bf16": args.bf16,
            "attn_implementation": args.attn_implementation,
            "device": "cuda" if cuda else "cpu",
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "learning_rate": args.learning_rate,
            "optimizer": "adamw_torch_fused (TrainingArguments default)",
            "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default",
            "launcher": "fresh interpreter per worker" if args.fresh_processes else "fork of a pre-imported zygote",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg()[0],
            "load_avg_min": min(loads),
            "load_avg_max": max(loads),
            "wall_s": time.perf_counter() - t0,
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else " ".join(argv),
        },
        "methods": summary,
        "ratios": ratios,
        "ratios_robust": ratios_robust,
        "targets": check_targets(ratios),
        "targets_robust": check_targets(ratios_robust),
        "ratios_cpu_time": ratios_cpu,
        "targets_cpu_time": check_targets(ratios_cpu) if ratios_cpu else None,
        "runs": runs,
    }
    if sweep:
        report["sweep"] = sweep

    markdown = render_markdown(report)
    print("\n" + markdown)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown, encoding="utf-8")
    plot = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output else None)
    if plot:
        render_plot(report, plot)
        print(f"plot: {plot}")
    failed = sorted(m for m, rs in runs.items() if any("error" in r for r in rs))
    if sweep:
        failed += [f"{m} (sweep)" for m, v in sweep["peak_mem_mb"].items() if None in v]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        for m in failed:
            if m in summary and "error" in summary[m]:
                print(f"--- {m}:\n{summary[m]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
