"""Throughput and peak memory of ``SAMATrainer`` (each meta-gradient method) next to the plain ``Trainer``.

Every run trains a BERT built from its config on synthetic token data in its own process, for the same number of
optimizer steps, and measures:

* throughput over ``--steps`` optimizer steps after ``--warmup_steps`` (default: one unroll, so the first meta step
  and its one-time allocations are excluded): samples per second of wall-clock time and samples per second of the
  process's CPU time. ``--steps`` is rounded up to a multiple of ``--unroll_steps``, so the window holds exactly
  ``steps / unroll_steps`` meta steps, which are timed through ``SAMACallback``'s meta-step events;
* peak memory above the memory right after the model and data were built. CUDA: ``torch.cuda.max_memory_allocated``.
  CPU: the kernel's peak RSS (``VmHWM``), measured in one extra run per method with glibc's mmap threshold fixed
  at 64 KiB, so that freed tensors go back to the system and the peak RSS is the peak of live memory (the CPU
  counterpart of ``max_memory_allocated``); the throughput runs keep the default allocator and report their peak
  RSS too (it also counts memory glibc keeps after a free).

Runs are interleaved: each repeat runs every method once, in an order rotated by one each repeat, and ratios are
medians of the per-repeat ratios, so a slow drift of the machine's load cancels out. On a CPU shared with other jobs
the samples per CPU-second (with ``--threads 1``) hardly change with the load, unlike the wall-clock figures.

Examples::

    python recipes/benchmark.py --threads 1 --methods finetune,sama --repeats 5 --output bench.json
    python recipes/benchmark.py --model_config bert-base --batch_size 48 --output gpu.json   # on a GPU
    python recipes/benchmark.py --threads 1 --methods finetune,sama \
        --variants '{"sama-eval": {"method": "sama", "meta_dropout": false}}'   # a method with other SAMAConfig fields

``recipes/benchmark_betty.py`` (the authors' library, Betty, on the same workload) and ``recipes/benchmark_scale.py``
(how the meta step's cost grows) reuse the workload and measurements defined here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FINETUNE = "finetune"
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 32, "vocab_size": 1024},
    "bert-mini": {"num_hidden_layers": 4, "hidden_size": 256, "vocab_size": 30522},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "vocab_size": 30522},
}
# glibc: allocations above this many bytes get their own mapping, returned to the system when freed
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------------------------------------------------
# The workload: a BERT from its config and fixed-length random token sequences


def build_model_config(spec: dict[str, Any]) -> Any:
    """A ``BertConfig`` from a preset name (or a config JSON file) in ``spec["model_config"]``, with overrides."""
    from transformers import BertConfig

    name = spec["model_config"]
    if name in MODEL_PRESETS:
        kwargs: dict[str, Any] = dict(MODEL_PRESETS[name])
    else:
        kwargs = json.loads(Path(name).read_text(encoding="utf-8"))
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if spec.get(key):
            kwargs[key] = spec[key]
    hidden = kwargs.get("hidden_size", 768)
    if name in MODEL_PRESETS or spec.get("hidden_size"):
        kwargs["num_attention_heads"] = max(h for h in range(1, max(hidden // 64, 1) + 1) if hidden % h == 0)
        kwargs["intermediate_size"] = 4 * hidden
    kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 512), spec["seq_len"])
    kwargs["num_labels"] = spec.get("num_labels", 2)
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]
    return BertConfig(**kwargs)


class TokenDataset:
    """``n`` random token sequences of length ``seq_len`` with random labels (a map-style dataset of dicts)."""

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


def build_workload(spec: dict[str, Any]) -> tuple[Any, TokenDataset, TokenDataset]:
    """(model, training data, meta data) of a run: enough examples for every step and meta step of the run."""
    import torch
    from transformers import BertForSequenceClassification

    config = build_model_config(spec)
    batch, steps = spec["batch_size"], spec["warmup_steps"] + spec["steps"]
    n_meta = (steps // spec["unroll_steps"] + 1) * spec.get("meta_batch_size", batch)
    args = (spec["seq_len"], config.vocab_size, config.num_labels)
    train = TokenDataset(steps * batch * spec.get("world_size", 1), *args, seed=spec["seed"])
    meta = TokenDataset(n_meta * spec.get("world_size", 1), *args, seed=spec["seed"] + 1)
    torch.manual_seed(spec["seed"])
    return BertForSequenceClassification(config), train, meta


# ----------------------------------------------------------------------------------------------------------------
# Measurements inside a run


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall and CPU time of steps ``warmup + 1 .. warmup + steps`` and of the meta steps among them.

    Drive it with :meth:`step_begin` / :meth:`step_end` (1-based step numbers) and :meth:`meta_begin` /
    :meth:`meta_end`; ``collective_bytes`` counts what ``torch.distributed`` collectives send while a meta step runs
    (see :func:`count_collective_bytes`).
    """

    def __init__(self, warmup: int, steps: int, device: Any):
        self.first, self.last, self.device = warmup + 1, warmup + steps, device
        self.active, self.in_meta = False, False
        self.start = self.end = (0.0, 0.0)  # (wall, cpu)
        self.step_wall: list[float] = []
        self.meta_wall: list[float] = []
        self.meta_cpu: list[float] = []
        self.meta_at: list[int] = []  # index of the timed step each meta step ran in
        self.collective_bytes: list[int] = []
        self._mark = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        _sync(self.device)
        return time.perf_counter(), time.process_time()

    def step_begin(self, step: int) -> None:
        if step == self.first:
            self.active = True
            self.start = self._now()
            self._last_stamp = self.start[0]

    def step_end(self, step: int) -> None:
        if not self.active:
            return
        now = self._now()
        self.step_wall.append(now[0] - self._last_stamp)
        self._last_stamp = now[0]
        if step == self.last:
            self.active, self.end = False, now

    def meta_begin(self) -> None:
        if self.active:
            self.in_meta = True
            self.collective_bytes.append(0)
            self._mark = self._now()

    def meta_end(self) -> None:
        if self.active:
            wall, cpu = self._now()
            self.meta_wall.append(wall - self._mark[0])
            self.meta_cpu.append(cpu - self._mark[1])
            self.meta_at.append(len(self.step_wall))
        self.in_meta = False

    def result(self, samples_per_step: int) -> dict[str, Any]:
        if not self.step_wall or self.active:
            raise RuntimeError("the timed window was not completed: too few steps for --warmup_steps + --steps")
        steps = len(self.step_wall)
        wall, cpu = self.end[0] - self.start[0], self.end[1] - self.start[1]
        meta_in_step = [0.0] * steps
        for i, t in zip(self.meta_at, self.meta_wall):
            meta_in_step[i] += t
        out: dict[str, Any] = {
            "timed_steps": steps,
            "samples_per_s": steps * samples_per_step / wall,
            "samples_per_cpu_s": steps * samples_per_step / cpu if cpu > 0 else None,
            "step_ms": 1000 * wall / steps,
            "step_cpu_ms": 1000 * cpu / steps,
            "base_step_ms": 1000 * statistics.median(s - m for s, m in zip(self.step_wall, meta_in_step)),
            "meta_steps_timed": len(self.meta_wall),
        }
        if self.meta_wall:
            out["meta_step_ms"] = 1000 * statistics.median(self.meta_wall)
            out["meta_step_cpu_ms"] = 1000 * statistics.median(self.meta_cpu)
            out["base_step_cpu_ms"] = 1000 * (cpu - sum(self.meta_cpu)) / steps
        if any(self.collective_bytes):
            out["collective_bytes_per_meta_step"] = statistics.median(self.collective_bytes)
        return out


def trainer_clock_callback(clock: StepClock) -> Any:
    """A ``SAMACallback`` that drives ``clock`` from the Trainer's step events and SAMA's meta-step events."""
    from sama_trainer import SAMACallback

    class ClockCallback(SAMACallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(state.global_step)

        def on_meta_step_begin(self, args, state, control, **kwargs):
            clock.meta_begin()

        def on_meta_step(self, args, state, control, metrics=None, **kwargs):
            clock.meta_end()

    return ClockCallback()


def count_collective_bytes(clock: StepClock) -> None:
    """Count the bytes of ``torch.distributed`` all-reduce/broadcast calls made during a meta step into ``clock``."""
    import torch.distributed as dist

    def counting(collective):
        def wrapper(tensor, *args, **kwargs):
            if clock.in_meta and clock.collective_bytes:
                clock.collective_bytes[-1] += tensor.numel() * tensor.element_size()
            return collective(tensor, *args, **kwargs)

        return wrapper

    dist.all_reduce = counting(dist.all_reduce)
    dist.broadcast = counting(dist.broadcast)


class PeakMemory:
    """Peak memory (MB) above the memory at construction: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device: Any):
        import torch

        gc.collect()
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # peak RSS := current RSS
            self.baseline = self._rss_kb("VmRSS") * 1024

    @staticmethod
    def _rss_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._rss_kb("VmHWM") * 1024
        return (peak - self.baseline) / 2**20


def time_passes(model: Any, batch: dict[str, Any], device: Any, reps: int = 3) -> dict[str, float]:
    """Median times (ms; CPU time on a CPU) of a no-grad forward, a forward+backward (train mode) and one
    multi-tensor add over all parameters (an elementwise pass over θ)."""
    import torch

    clock = time.process_time if device.type == "cpu" else time.perf_counter
    params = [p.detach() for p in model.parameters()]
    scratch = [p.clone() for p in params]

    def forward_backward():
        model(**batch).loss.backward()

    def forward():
        with torch.no_grad():
            model(**batch)

    def theta_pass():
        torch._foreach_add_(scratch, params)

    out = {}
    model.train()
    for name, fn in (("fwd_bwd_ms", forward_backward), ("fwd_ms", forward), ("theta_pass_ms", theta_pass)):
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            _sync(device)
            t = clock()
            fn()
            _sync(device)
            times.append(1000 * (clock() - t))
        out[name] = statistics.median(times[1:])
        model.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# One run: a method (or the plain Trainer) on the workload, in this process


def training_arguments(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The ``TrainingArguments`` every run shares."""
    cuda = _device(spec).type == "cuda"
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["warmup_steps"] + spec["steps"],
        learning_rate=spec["learning_rate"],
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        seed=spec["seed"],
        bf16=spec.get("bf16", False),
        use_cpu=not cuda,
        **spec.get("training_overrides", {}),
    )


def build_optimizer(spec: dict[str, Any], model: Any) -> Any:
    """``torch.optim.Adam`` (fused) for ``spec["optimizer"] == "adam"``; None leaves the Trainer's default (fused
    AdamW)."""
    import torch

    if spec.get("optimizer") != "adam":
        return None
    return torch.optim.Adam(model.parameters(), lr=spec["learning_rate"], fused=True)


def _device(spec: dict[str, Any]) -> Any:
    import torch

    if spec.get("world_size", 1) > 1 or spec.get("cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def prepare_run(spec: dict[str, Any]) -> tuple[Any, Any, TokenDataset, TokenDataset, PeakMemory]:
    """(device, model on it, training data, meta data, peak memory counted from now) of a worker's run."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = _device(spec)
    model, train_data, meta_data = build_workload(spec)
    model.to(device)
    return device, model, train_data, meta_data, PeakMemory(device)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["method"]`` (``finetune`` = plain ``Trainer``) and return its measurements."""
    from transformers import Trainer, TrainingArguments

    from sama_trainer import SAMAConfig, SAMATrainer

    device, model, train_data, meta_data, memory = prepare_run(spec)
    clock = StepClock(spec["warmup_steps"], spec["steps"], device)
    if spec.get("world_size", 1) > 1:
        count_collective_bytes(clock)
    with tempfile.TemporaryDirectory(prefix="sama-bench-") as output_dir:
        common = training_arguments(spec, output_dir)
        kwargs = dict(callbacks=[trainer_clock_callback(clock)], optimizers=(build_optimizer(spec, model), None))
        if spec["method"] == FINETUNE:
            trainer = Trainer(model, TrainingArguments(**common), train_dataset=train_data, **kwargs)
        else:
            settings = dict(
                meta_gradient=spec["method"],
                meta_gradient_kwargs=spec.get("method_kwargs") or None,
                unroll_steps=spec["unroll_steps"],
            )
            args = SAMAConfig(**{**common, **settings, **spec.get("sama_overrides", {})})
            trainer = SAMATrainer(model, args, train_dataset=train_data, meta_dataset=meta_data, **kwargs)
        trainer.train()
    result = {
        **clock.result(spec["batch_size"] * spec.get("world_size", 1)),
        "peak_mem_mb": memory.peak_mb(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "device": str(device),
    }
    if spec["method"] != FINETUNE:
        result["meta_steps_skipped"] = trainer.meta_steps_skipped
    if spec.get("cost_model"):
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        result.update(time_passes(model, batch, device))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Running runs: each in a fresh interpreter, interleaved across repeats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, spec: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a new process (``spec["world_size"]`` gloo processes via torchrun when > 1)
    and return rank 0's result, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="sama-bench-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        worker = [script, "--worker", json.dumps({**spec, "result_file": result_file})]
        world = spec.get("world_size", 1)
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
            cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", *worker]
        else:
            cmd = [sys.executable, *worker]
        full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(Path(script).parent), _root()])}
        if world > 1:
            full_env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", ACCELERATE_USE_CPU="true")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.isfile(result_file):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            return {"error": f"exit code {proc.returncode}: " + "\n".join(tail)}
        return json.loads(Path(result_file).read_text(encoding="utf-8"))


def worker_main(spec: dict[str, Any], run_fn: Any) -> None:
    """Entry point of a worker process: run ``run_fn(spec)``; rank 0 writes the result file."""
    from sama_trainer import end_process_group

    result = run_fn(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result_file"]).write_text(json.dumps(result), encoding="utf-8")
    end_process_group()  # a finished gloo worker must not abort in torch's teardown and fail the launch


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def run_interleaved(
    script: str, specs: dict[str, dict[str, Any]], repeats: int, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Run every spec ``repeats`` times, the order rotated by one each repeat. Returns name -> per-repeat results."""
    names = list(specs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = time.perf_counter()
            result = {**launch(script, specs[name], timeout), "repeat": r}
            runs[name].append(result)
            what = result["error"].splitlines()[-1] if "error" in result else _brief(result)
            print(f"  [{r + 1}/{repeats}] {name}: {what} ({time.perf_counter() - t:.0f} s)", flush=True)
    return runs


def measure_memory(script: str, specs: dict[str, dict[str, Any]], timeout: float) -> dict[str, float | None]:
    """Peak memory (MB) of each spec from one short run (warm-up + one unroll) with live-memory accounting."""
    out = {}
    for name, spec in specs.items():
        short = {**spec, "steps": spec["unroll_steps"], "cost_model": False}
        result = launch(script, short, timeout, env=None if _device(spec).type == "cuda" else MEMORY_RUN_ENV)
        out[name] = result.get("peak_mem_mb")
        print(f"  memory {name}: {_fmt(out[name], 0)} MB" + (f" ({result['error']})" if "error" in result else ""))
    return out


def _brief(result: dict[str, Any]) -> str:
    text = f"{result['samples_per_s']:.2f} samples/s, {_fmt(result.get('samples_per_cpu_s'))} samples/CPU-s"
    return text + f", peak RSS {result['peak_mem_mb']:.0f} MB"


def median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str, field: str) -> float | None:
    """Median over repeats of ``a``'s ``field`` divided by ``b``'s in the same repeat."""
    pairs = zip(runs.get(a, []), runs.get(b, []))
    return median([x[field] / y[field] for x, y in pairs if x.get(field) is not None and y.get(field)])


def summarize(runs: dict[str, list[dict]], fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per name: the median of each field over the runs without an error, and the first error if any."""
    out = {}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        entry = {f: median([r.get(f) for r in ok]) for f in fields}
        entry["repeats_ok"] = len(ok)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            entry["error"] = errors[0]
        out[name] = entry
    return out


def environment(threads: int | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average_1m_start": os.getloadavg()[0],
        # glibc allocator settings the runs inherit (e.g. MALLOC_TRIM_THRESHOLD_: freed memory kept, not re-faulted)
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_root())
        env["commit"] = commit.stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def finish(report: dict[str, Any], markdown: str, args: argparse.Namespace) -> int:
    """Write the report; exit code 1 (and the names on stderr) if a run or a memory run failed."""
    write_report(report, markdown, args.output, args.markdown)
    summary, memory = report["summary"], report["peak_memory_mb"]
    failed = [n for n, e in summary.items() if "error" in e] + [n for n, m in memory.items() if m is None]
    if failed:
        print(f"FAILED: {sorted(set(failed))}", file=sys.stderr)
        return 1
    return 0


def write_report(report: dict[str, Any], markdown: str, output: str | None, markdown_path: str | None) -> None:
    print("\n" + markdown)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown, encoding="utf-8")


def _fmt(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def describe_workload(cfg: dict[str, Any]) -> str:
    """The model and batch of a report's ``config``, as the first words of its markdown."""
    return (
        f"BERT {cfg['num_hidden_layers']} layers x {cfg['hidden_size']} hidden ({cfg['num_params'] / 1e6:.1f}M "
        f"parameters), seq_len {cfg['seq_len']}, batch {cfg['batch_size']}"
    )


def throughput_ratios(runs: dict[str, list[dict]], a: str, b: str) -> dict[str, float | None]:
    """``a``'s throughput over ``b``'s: wall clock (``throughput``) and CPU time (``throughput_cpu``)."""
    return {
        "throughput": paired_ratio(runs, a, b, "samples_per_s"),
        "throughput_cpu": paired_ratio(runs, a, b, "samples_per_cpu_s"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line shared by the benchmark recipes


def add_common_arguments(p: argparse.ArgumentParser, memory_runs: bool = True) -> None:
    """The options every benchmark recipe takes (and ``--no_memory_runs`` where it measures memory)."""
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    if memory_runs:
        p.add_argument("--no_memory_runs", action="store_true", help="skip the live-memory runs (peak RSS only)")
    p.add_argument("--worker_timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--output", default=None, help="JSON report")
    p.add_argument("--markdown", default=None, help="markdown table")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def workload_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings every recipe passes on from its command line."""
    return {
        "model_config": args.model_config,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu": args.cpu,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
    }


def served_as_worker(args: argparse.Namespace, run_fn: Any) -> bool:
    """In a worker process (``--worker SPEC``): run the spec with ``run_fn`` and return True."""
    if args.worker is None:
        return False
    worker_main(json.loads(args.worker), run_fn)
    return True


# ----------------------------------------------------------------------------------------------------------------
# This benchmark: every method against the plain Trainer

FIELDS = (
    "samples_per_s",
    "samples_per_cpu_s",
    "peak_mem_mb",
    "base_step_ms",
    "meta_step_ms",
    "meta_step_cpu_ms",
    "step_cpu_ms",
)


def method_ratios(runs: dict[str, list[dict]], memory: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Per method: throughput ratios to the plain Trainer (wall clock and CPU time) and memory ratios."""
    base_mem = memory.get(FINETUNE)
    out = {}
    for name in runs:
        out[name] = {
            **throughput_ratios(runs, name, FINETUNE),
            "memory": memory[name] / base_mem if memory.get(name) is not None and base_mem else None,
            "rss_default_malloc": paired_ratio(runs, name, FINETUNE, "peak_mem_mb"),
        }
    return out


def render_markdown(report: dict[str, Any]) -> str:
    cfg, summary, ratios, memory = report["config"], report["summary"], report["ratios"], report["peak_memory_mb"]
    lines = [
        f"{describe_workload(cfg)} (meta batch = base batch), unroll {cfg['unroll_steps']}, {cfg['steps']} timed "
        f"steps after {cfg['warmup_steps']} warm-up steps, "
        f"{cfg['repeats']} interleaved repeats, {cfg['device']}{', bf16' if cfg.get('bf16') else ''}, "
        f"{cfg['attn_implementation']} attention, torch threads {report['environment']['torch_threads']}.",
        "",
        "| method | samples/s | vs plain | samples/CPU-s | vs plain | peak memory (MB) | vs plain "
        "| peak RSS, default malloc (MB) | vs plain | base step (ms) | meta step (ms) | meta step CPU (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in summary.items():
        r = ratios[name]
        if e.get("samples_per_s") is None:
            lines.append(f"| {name} | failed: {e.get('error', '').splitlines()[-1][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {name} | {e['samples_per_s']:.2f} | {_fmt(r['throughput'], 3)} | {_fmt(e['samples_per_cpu_s'])} "
            f"| {_fmt(r['throughput_cpu'], 3)} | {_fmt(memory.get(name), 0)} | {_fmt(r['memory'], 3)} "
            f"| {e['peak_mem_mb']:.0f} | {_fmt(r['rss_default_malloc'], 3)} | {_fmt(e['base_step_ms'], 0)} "
            f"| {_fmt(e.get('meta_step_ms'), 0)} | {_fmt(e.get('meta_step_cpu_ms'), 0)} |"
        )
    passes = report.get("cost_model")
    if passes:
        lines += [
            "",
            f"Passes (plain Trainer's model, CPU time on a CPU): forward+backward {passes['fwd_bwd_ms']:.0f} ms, "
            f"no-grad forward {passes['fwd_ms']:.0f} ms; a meta step's passes (forward+backward + 2 forwards) put "
            f"the throughput ceiling of a first-order method at unroll {cfg['unroll_steps']} at "
            f"{passes['ceiling']:.3f} x plain.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_config", default="bert-mini", help=f"{', '.join(MODEL_PRESETS)} or a BertConfig JSON")
    p.add_argument("--num_layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--hidden_size", type=int, default=None, help="override hidden_size (intermediate = 4x)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16, help="base and meta batch size")
    p.add_argument("--unroll_steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (rounded up to a multiple of unroll)")
    p.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default: unroll_steps)")
    p.add_argument("--methods", default="finetune,sama,sama-na,t1t2", help="'finetune' = plain Trainer; or 'all'")
    p.add_argument("--method_kwargs", default="{}", help='JSON: method -> meta_gradient_kwargs, e.g. {"cg": {...}}')
    p.add_argument(
        "--variants",
        default="{}",
        help="JSON: name -> a method and SAMAConfig fields, run next to --methods, e.g. "
        '{"sama-eval": {"method": "sama", "meta_dropout": false}}',
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn_implementation", default=None, help="e.g. eager (second-order methods need it on GPU)")
    add_common_arguments(p)
    args = p.parse_args(argv)
    if args.worker is None and min(args.unroll_steps, args.steps, args.batch_size, args.repeats) < 1:
        p.error("--unroll_steps, --steps, --batch_size and --repeats must be >= 1")
    return args


def base_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings shared by every method (``steps`` rounded up to a multiple of the unroll)."""
    unroll = args.unroll_steps
    return {
        **workload_spec(args),
        "num_hidden_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "unroll_steps": unroll,
        "steps": -(-args.steps // unroll) * unroll,
        "warmup_steps": unroll if args.warmup_steps is None else args.warmup_steps,
        "bf16": args.bf16,
        "attn_implementation": args.attn_implementation,
    }


def variant_specs(
    variants: dict[str, dict[str, Any]], spec: dict[str, Any], method_kwargs: dict[str, Any], taken: set[str]
) -> dict[str, dict[str, Any]]:
    """Specs of ``--variants``: each a SAMA method with some ``SAMAConfig`` fields set (e.g. ``meta_dropout``)."""
    from sama_trainer import SAMAConfig, available_methods

    fields = set(SAMAConfig.__dataclass_fields__)
    out = {}
    for name, variant in variants.items():
        settings = dict(variant)
        method = settings.pop("method", None)
        if name in taken or method not in available_methods():
            raise SystemExit(
                f"variant {name!r}: give a new name and a SAMA method, e.g. "
                f'{{"{name}-x": {{"method": "sama", "meta_dropout": false}}}} (methods: {available_methods()})'
            )
        unknown = set(settings) - fields
        if unknown:
            raise SystemExit(f"variant {name!r}: {sorted(unknown)} are not SAMAConfig fields")
        kwargs = method_kwargs.get(name, method_kwargs.get(method))
        out[name] = {**spec, "method": method, "method_kwargs": kwargs, "cost_model": False}
        out[name]["sama_overrides"] = settings
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if served_as_worker(args, run):
        return 0
    from sama_trainer import available_methods

    methods = [FINETUNE, *available_methods()] if args.methods == "all" else args.methods.split(",")
    unknown = set(methods) - {FINETUNE, *available_methods()}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; available: {[FINETUNE, *available_methods()]}")
    kwargs = json.loads(args.method_kwargs)
    spec = base_spec(args)
    specs = {m: {**spec, "method": m, "method_kwargs": kwargs.get(m), "cost_model": m == FINETUNE} for m in methods}
    specs.update(variant_specs(json.loads(args.variants), spec, kwargs, set(specs)))
    methods = list(specs)
    print(f"benchmark: {methods} x {args.repeats} repeats, {spec}", flush=True)
    script = str(Path(__file__).resolve())
    runs = run_interleaved(script, specs, args.repeats, args.worker_timeout)
    memory = {} if args.no_memory_runs else measure_memory(script, specs, args.worker_timeout)
    summary = summarize(runs, FIELDS)
    config = build_model_config(spec)
    first_ok = next((r for rs in runs.values() for r in rs if "error" not in r), {})
    report: dict[str, Any] = {
        "config": {
            **spec,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_params": first_ok.get("num_params", 0),
            "attn_implementation": first_ok.get("attn_implementation"),
            "device": first_ok.get("device"),
            "repeats": args.repeats,
            "methods": methods,
            "optimizer": "adamw_torch_fused (TrainingArguments default)",
            "command": " ".join(["python", "recipes/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "environment": environment(args.threads),
        "summary": summary,
        "ratios": method_ratios(runs, memory),
        "peak_memory_mb": memory,
        "runs": runs,
    }
    plain = [r for r in runs.get(FINETUNE, []) if "fwd_bwd_ms" in r]
    if plain:
        fwd_bwd, fwd = median([r["fwd_bwd_ms"] for r in plain]), median([r["fwd_ms"] for r in plain])
        step = median([r["step_cpu_ms"] if r["device"] == "cpu" else r["step_ms"] for r in plain])
        unroll = spec["unroll_steps"]
        ceiling = unroll * step / (unroll * step + fwd_bwd + 2 * fwd)
        report["cost_model"] = {"fwd_bwd_ms": fwd_bwd, "fwd_ms": fwd, "step_ms": step, "ceiling": ceiling}
    return finish(report, render_markdown(report), args)


if __name__ == "__main__":
    sys.exit(main())
