"""CPU time of the meta batch's forward+backward, whole or cut into length-sorted micro-batches, side by side.

The meta batches are what the WRENCH recipe draws at ``--clean_per_class K``: ``meta_batch_size`` examples of a
class-balanced K-per-class sample of the valid split, tokenized as the recipe does (MiniLM, ``max_seq_length``). For
each draw the three ways of computing the meta loss's gradient run one after the other in this process (the order
rotates), so the ratios compare like with like on a shared machine::

    python recipes/benchmark_meta_split.py --dataset_dir recipes/data/wrench/youtube --threads 1 --output split.json

Ways: ``whole`` (one pass, padded to the longest), ``micro<M>`` (``meta_micro_batch_size`` M), ``overhead<P>``
(``meta_pass_overhead_tokens`` P). Each is ``SAMATrainer``'s cut (``sama_trainer.meta_data.length_chunks``) and loss
(the size-weighted sum of the micro-batches' mean cross-entropies) with one backward.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pass_overhead import load_model

from sama_trainer.data import load_wrench, subsample_per_class
from sama_trainer.losses import per_example_cross_entropy
from sama_trainer.meta_data import length_chunks, mean_over_chunks
from sama_trainer.pretrained import TINY_BERT


def clean_examples(dataset_dir: str, k: int, seed: int) -> list[tuple[str, int]]:
    """The recipe's clean set at ``--clean_per_class k``: ``k`` examples per class of the WRENCH folder's valid split
    (text, gold label), drawn as ``prepare_task`` draws them."""
    clean = subsample_per_class(load_wrench(dataset_dir)["valid"], k, seed=seed)
    return list(zip(clean["text"], clean["label"]))


def pad(encoded: list[list[int]], labels: list[int]) -> dict[str, torch.Tensor]:
    width = max(map(len, encoded))
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def meta_pass(
    model: Any, batch: dict[str, torch.Tensor], size: int | None, overhead: float | None
) -> tuple[float, int]:
    """CPU seconds of the meta loss's forward+backward over ``batch`` cut as ``SAMATrainer`` cuts it; passes made."""
    chunks = length_chunks(batch, size, overhead)

    def loss(chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in chunk.items() if k != "labels"}
        return per_example_cross_entropy(model(**inputs).logits, chunk["labels"]).mean()

    start = time.process_time()
    mean_over_chunks(loss, chunks).backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start, len(chunks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="a WRENCH folder with valid.json")
    parser.add_argument("--model_name_or_path", default="default", help="as recipes/pass_overhead.py")
    parser.add_argument("--clean_per_class", type=int, default=10)
    parser.add_argument("--meta_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--pass_overhead_tokens", type=float, default=60.0)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clean = clean_examples(args.dataset_dir, args.clean_per_class, args.seed)
    model = load_model(args.model_name_or_path, 1 + max(label for _, label in clean), args.seed).train()
    tiny = args.model_name_or_path == TINY_BERT
    tokenizer = None if tiny else AutoTokenizer.from_pretrained(model.config._name_or_path)
    if tiny:  # no tokenizer: word ids from the words' lengths
        encoded = [[5 + (len(w) % 900) for w in text.split()][: args.max_seq_length] or [5] for text, _ in clean]
    else:
        encoded = [tokenizer(text, truncation=True, max_length=args.max_seq_length)["input_ids"] for text, _ in clean]
    ways = {
        "whole": (None, None),
        f"micro{args.micro_batch_size}": (args.micro_batch_size, None),
        f"overhead{args.pass_overhead_tokens:g}": (None, args.pass_overhead_tokens),
    }
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {way: [] for way in ways}
    passes: dict[str, list[int]] = {way: [] for way in ways}
    names = list(ways)
    meta_pass(model, pad(encoded[: args.meta_batch_size], [0] * min(args.meta_batch_size, len(encoded))), None, None)
    for draw in range(args.draws):
        index = rng.sample(range(len(clean)), min(args.meta_batch_size, len(clean)))
        batch = pad([encoded[i] for i in index], [clean[i][1] for i in index])
        for way in names[draw % len(names) :] + names[: draw % len(names)]:  # rotate the order
            seconds, n = meta_pass(model, batch, *ways[way])
            times[way].append(seconds)
            passes[way].append(n)
    report = {
        "dataset_dir": args.dataset_dir,
        "clean_examples": len(clean),
        "threads": torch.get_num_threads(),
        "ways": {
            way: {
                "median_cpu_s": statistics.median(times[way]),
                "mean_passes": statistics.fmean(passes[way]),
                "ratio_to_whole": statistics.median(t / w for t, w in zip(times[way], times["whole"])),
            }
            for way in ways
        },
    }
    for way, row in report["ways"].items():
        print(
            f"{way:>14}: {row['median_cpu_s'] * 1000:7.1f} ms, {row['mean_passes']:.2f} passes, "
            f"{row['ratio_to_whole']:.2f} x whole"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
