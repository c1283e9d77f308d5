"""End-to-end tests of ``recipes/wrench_noisy_finetune.py`` on a tiny synthetic WRENCH folder and a tiny BERT."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset
from huggingface_hub import ModelCard

from sama_trainer import (
    BootstrapCorrectionNet,
    ClassificationObjective,
    HeldOutBaseUpdate,
    MetaWeightNet,
    SAMAConfig,
    SAMAParser,
    load_meta_model,
)
from sama_trainer.data import (
    apply_label_model,
    fit_vote_prior,
    load_wrench,
    make_synthetic_weak_supervision,
    vote_features,
    write_wrench_format,
)
from sama_trainer.data.preparation import hold_out_valid_half, load_wrench_from_hub, stratified_part


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "wrench_noisy_finetune.py"
RESULT_KEYS = {
    "method",
    "dataset",
    "seed",
    "metric_name",
    "test_metric",
    "valid_metric",
    "train_steps",
    "train_seconds",
    "clean_per_class",
}


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("wrench_noisy_finetune", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wrench_dir(tmp_path_factory) -> Path:
    data = make_synthetic_weak_supervision(num_train=96, num_valid=40, num_test=32, num_classes=2, seed=3)
    return write_wrench_format(data, tmp_path_factory.mktemp("data") / "tinyws")


def parse(recipe, argv):
    return SAMAParser((recipe.ScriptArguments, SAMAConfig)).parse_args_and_config(argv)


def _run(recipe, wrench_dir: Path, out: Path, *extra: str):
    argv = [
        "--dataset_dir", str(wrench_dir), "--model_name_or_path", "tiny-bert", "--output_dir", str(out),
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--learning_rate", "1e-3", "--max_seq_length", "24", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", "--use_cpu", "true", *extra,
    ]  # fmt: skip
    return recipe.main(*parse(recipe, argv))


def _card(path: Path) -> ModelCard:
    """The model card, parsed as the Hub parses it."""
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "transformers" and "wrench" in card.data.tags
    assert card.data.datasets == ["tinyws"]
    (result,) = card.data.eval_results  # the test metric in the model-index
    assert result.metric_type == "accuracy" and result.dataset_split == "test"
    assert result.metric_value == pytest.approx(json.loads((path / "results.json").read_text())["test_metric"])
    assert "https://github.com/)" not in card.content and "None" not in card.content
    return card


def _check_results(out: Path, method: str) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == method and results["dataset"] == "tinyws" and results["seed"] == 0
    assert results["metric_name"] == "accuracy"
    assert 0.0 <= results["test_metric"] <= 1.0 and 0.0 <= results["valid_metric"] <= 1.0
    assert results["train_seconds"] > 0
    assert results["device"] == "cpu"  # _run passes --use_cpu
    assert (out / "README.md").is_file()
    return results


def test_baselines_end_to_end(recipe, wrench_dir, tmp_path):
    results = _run(
        recipe, wrench_dir, tmp_path, "--method", "finetune,cft", "--clean_per_class", "5", "--clean_steps", "3",
        "--save_model", "false",
    )  # fmt: skip
    assert [r["method"] for r in results] == ["finetune", "cft"]
    finetune = _check_results(tmp_path / "finetune", "finetune")
    cft = _check_results(tmp_path / "cft", "cft")
    assert finetune["train_steps"] == 4 and cft["train_steps"] == 4 + 3
    # --clean_per_class: 5 clean examples per class for both classes
    assert finetune["clean_per_class"] == 5 and finetune["num_clean"] == cft["num_clean"] == 10
    assert "noise_auroc" not in finetune
    card = _card(tmp_path / "finetune")
    assert card.data.base_model is None and "trained from randomly initialised weights" in card.content  # tiny BERT
    assert "finetune" in card.data.tags
    assert "| cft |" in (tmp_path / "summary.md").read_text()


def test_sama_rc_end_to_end(recipe, wrench_dir, tmp_path):
    (result,) = _run(
        recipe, wrench_dir, tmp_path, "--method", "sama_rc", "--unroll_steps", "2", "--meta_weight_normalize", "true",
        "--meta_weight_center", "true",
    )  # fmt: skip
    results = _check_results(tmp_path, "sama_rc")
    assert result == results
    assert results["train_steps"] == 4 and results["meta_steps"] == 2
    assert results["meta_objective"] == "reweight+correct" and results["meta_gradient"] == "sama"
    assert results["sama_base_update"] and results["sama_base_update_follows_lr"] is False
    assert results["noise_auroc"] is None or 0.0 <= results["noise_auroc"] <= 1.0
    assert results["noise_auroc_within_class"] is None or 0.0 <= results["noise_auroc_within_class"] <= 1.0
    assert results["num_clean"] == 40  # default: the whole valid split
    # weights file: loadable with datasets, one row per covered training example, aligned with the ids
    weights = load_dataset("json", data_files=str(tmp_path / "example_weights.jsonl"), split="train")
    data = load_wrench(wrench_dir)
    train = apply_label_model(data["train"], data.num_classes, tie_break="wrench")
    assert weights["id"] == train["id"] and weights["weak_label"] == train["weak_label"]
    assert weights["label"] == train["label"]
    w = np.asarray(weights["weight"])
    assert np.isfinite(w).all() and (w >= 0).all() and abs(w.mean() - 1.0) < 1e-4  # batch-normalised weights
    weak = np.asarray(weights["weak_label"])
    by_class = results["weight_mean_by_given_class"]
    assert by_class == pytest.approx({name: w[weak == c].mean() for c, name in enumerate(data.label_names)})
    assert set(weights["corrected_label"]) <= {0, 1} and len(weights["corrected_probs"][0]) == 2
    assert (tmp_path / "weights_hist.png").stat().st_size > 0
    card = _card(tmp_path)
    assert "Training with SAMA" in card.content and "| `sama_alpha (used)` | `1.0` |" in card.content
    assert {"sama", "sama_rc"} <= set(card.data.tags)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "sama_meta_model").is_dir()
    reweight = load_meta_model(str(tmp_path / "sama_meta_model"))["reweight"]
    assert isinstance(reweight, MetaWeightNet) and reweight.normalize and reweight.center
    assert not reweight.net[2].bias.requires_grad


def test_lf_features_feed_the_labeling_functions_votes_to_the_weighting_net(recipe, wrench_dir, tmp_path):
    results = _run(
        recipe, wrench_dir, tmp_path, "--method", "finetune,sama_r", "--lf_features", "true", "--unroll_steps", "2",
    )  # fmt: skip
    finetune, sama = results
    assert "meta_feature_column" not in finetune and sama["meta_feature_column"] == "lf_agreement"
    net = load_meta_model(str(tmp_path / "sama_r" / "sama_meta_model"))
    assert isinstance(net, MetaWeightNet) and net.num_features == load_wrench(wrench_dir).num_lfs
    assert sama["meta_steps"] == 2 and 0.0 <= sama["test_metric"] <= 1.0


def test_vote_prior_weights_every_method_that_trains_on_the_weak_labels(recipe, wrench_dir, tmp_path):
    results = _run(
        recipe, wrench_dir, tmp_path, "--method", "finetune,clean_only,sama_r", "--vote_prior", "true",
        "--unroll_steps", "2", "--meta_weight_normalize", "false",
    )  # fmt: skip
    finetune, clean_only, sama = results
    assert finetune["example_weight_column"] == sama["example_weight_column"] == "vote_prior"
    assert clean_only["example_weight_column"] is None
    assert 0.0 <= finetune["vote_prior_noise_auroc"] <= 1.0 and 0.0 < finetune["vote_prior_mean"] < 1.0
    # SAMA's recorded weights are the learned ones times the prior: they rank the rows as the prior does where the
    # weighting net has barely moved (two meta steps)
    data = load_wrench(wrench_dir)
    features, _, ids = vote_features(data["train"], data.num_classes)
    prior = dict(zip(ids, fit_vote_prior(data["valid"], data.num_classes)(features)))
    rows = [json.loads(line) for line in (tmp_path / "sama_r" / "example_weights.jsonl").read_text().splitlines()]
    w, task_prior = np.array([r["weight"] for r in rows]), np.array([prior[r["id"]] for r in rows])
    assert np.corrcoef(w, task_prior)[0, 1] > 0.9 and sama["meta_steps"] == 2


def test_stratified_part_takes_a_seeded_share_of_every_class():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    part = stratified_part(labels, 0.5, seed=3)
    assert [int((labels[part] == c).sum()) for c in (0, 1, 2)] == [5, 2, 1]  # at least one of each class
    assert list(part) == sorted(set(part.tolist())) and np.array_equal(part, stratified_part(labels, 0.5, seed=3))
    assert not np.array_equal(part, stratified_part(labels, 0.5, seed=4))
    assert np.array_equal(stratified_part(labels, 1.0), np.arange(15))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        stratified_part(labels, 0.0)


def test_meta_fraction_gives_sama_part_of_the_clean_set_and_the_clean_phase_all_of_it(
    recipe, wrench_dir, tmp_path, monkeypatch
):
    seen = {}
    original = recipe.fit_with_clean_set

    def recording(model, args, train_dataset, **kwargs):
        phases = original(model, args, train_dataset, **kwargs)
        main, clean = (p.trainer for p in phases)
        seen["meta"] = [tuple(r) for r in main.meta_dataset["input_ids"]]
        seen["meta_labels"] = list(main.meta_dataset["labels"])
        sizers = [c for c in main.callback_handler.callbacks if isinstance(c, HeldOutBaseUpdate)]
        seen["held_out"] = [tuple(r) for s in sizers for r in s.held_out_dataset["input_ids"]]
        seen["clean"] = [tuple(r) for r in clean.train_dataset["input_ids"]]
        return phases

    monkeypatch.setattr(recipe, "fit_with_clean_set", recording)
    (result,) = _run(
        recipe, wrench_dir, tmp_path, "--method", "sama_rc_clean", "--clean_per_class", "6", "--meta_fraction", "0.5",
        "--clean_steps", "3", "--save_model", "false",
    )  # fmt: skip
    assert result["num_clean"] == 12 and result["num_meta"] == 6 and result["meta_fraction"] == 0.5
    assert sorted(seen["meta_labels"]) == [0, 0, 0, 1, 1, 1]  # half of each class
    assert len(seen["clean"]) == 12 and set(seen["meta"]) < set(seen["clean"])  # the clean phase sees all of it
    assert result["train_steps"] == 4 + 3 and seen["held_out"] == [] and result["base_update_scale"] == 1.0
    (result,) = _run(
        recipe, wrench_dir, tmp_path / "sized", "--method", "sama_rc_clean", "--clean_per_class", "6",
        "--meta_fraction", "0.5", "--held_out_base_update", "true", "--clean_steps", "3", "--save_model", "false",
        "--unroll_steps", "2",
    )  # fmt: skip
    assert result["held_out_base_update"] and result["num_meta"] == 6 and result["meta_steps"] == 2
    assert 0.0 <= result["held_out_loss_lowered"] <= 1.0 and 0.0 < result["base_update_scale_mean"] <= 1.0
    assert sorted(seen["held_out"] + seen["meta"]) == sorted(seen["clean"])  # the other half checks the base update
    first_part = seen["meta"]
    (result,) = _run(
        recipe, wrench_dir, tmp_path / "cross", "--method", "sama_rc_clean", "--clean_per_class", "6",
        "--meta_fraction", "0.5", "--cross_fit", "true", "--clean_steps", "3", "--save_model", "false",
        "--unroll_steps", "2",
    )  # fmt: skip
    assert result["cross_fit"] and result["num_meta"] == 12 and result["meta_steps"] == 2
    assert sorted(first_part + seen["meta"]) == sorted(seen["clean"])  # the second meta step drew from the other half
    with pytest.raises(ValueError, match="add --meta_fraction 0.5"):
        _run(recipe, wrench_dir, tmp_path / "bad", "--method", "sama_r", "--cross_fit", "true")
    with pytest.raises(ValueError, match="add --meta_fraction 0.5"):
        _run(recipe, wrench_dir, tmp_path / "bad", "--method", "sama_r", "--held_out_base_update", "true")
    with pytest.raises(ValueError, match="--meta_fraction must be in"):
        _run(recipe, wrench_dir, tmp_path / "bad", "--method", "sama_r", "--meta_fraction", "1.5")


def test_card_names_the_base_model(recipe, wrench_dir, tmp_path):
    _run(recipe, wrench_dir, tmp_path, "--method", "sama_r", "--base_model_id", "org/encoder", "--save_model", "false")
    card = _card(tmp_path)
    assert card.data.base_model == "org/encoder" and "fine-tuned from [org/encoder]" in card.content
    assert "randomly initialised" not in card.content


def test_sama_rc_with_bootstrap_correction(recipe, wrench_dir, tmp_path):
    _run(recipe, wrench_dir, tmp_path, "--method", "sama_rc", "--unroll_steps", "2", "--correction_type", "bootstrap")
    results = _check_results(tmp_path, "sama_rc")
    assert results["meta_steps"] == 2
    correct = load_meta_model(str(tmp_path / "sama_meta_model"))["correct"]
    assert isinstance(correct, BootstrapCorrectionNet)
    assert correct.label_prior.item() != 3.0  # the meta step moved the trust in the given label
    weights = load_dataset("json", data_files=str(tmp_path / "example_weights.jsonl"), split="train")
    probs = np.asarray(weights["corrected_probs"])
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_method_presets(recipe):
    args = recipe.SAMAConfig(output_dir="o", report_to="none")
    assert recipe.method_config("sama_na_r", args, "o").meta_gradient == "sama-na"
    assert recipe.method_config("sama_rc", args, "o").meta_objective == "reweight+correct"
    custom = recipe.SAMAConfig(output_dir="o", report_to="none", meta_objective="correct")
    assert recipe.method_config("sama", custom, "o").meta_objective == "correct"
    with pytest.raises(ValueError, match="--method sama"):
        recipe.method_config("sama_r", custom, "o")


def test_bad_inputs(recipe, wrench_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        _run(recipe, tmp_path / "missing", tmp_path / "o", "--method", "finetune")
    with pytest.raises(ValueError, match="unknown method"):
        _run(recipe, wrench_dir, tmp_path / "o", "--method", "finetune,magic")
    with pytest.raises(ValueError, match="--dataset_dir"):
        recipe.main(*parse(recipe, ["--output_dir", str(tmp_path / "o")]))
    (tmp_path / "empty_model").mkdir()
    missing = [
        ("sama-trainer-tests/no-such-model", "'tiny-bert' \\(built"),
        (str(tmp_path / "empty_model"), "no loadable"),
    ]
    for model, message in missing:
        with pytest.raises(ValueError, match=f"--model_name_or_path .*{message}"):
            _run(recipe, wrench_dir, tmp_path / "o", "--method", "finetune", "--model_name_or_path", model)


def test_synthetic_fallback(recipe, tmp_path):
    argv = [
        "--dataset_dir", str(tmp_path / "absent"), "--fallback_synthetic", "true", "--synthetic_num_train", "60",
        "--fallback_learning_rate", "1e-3", "--method", "finetune", "--max_steps", "2", "--output_dir", str(tmp_path),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--save_model", "false",
    ]  # fmt: skip
    (result,) = recipe.main(*parse(recipe, argv))
    assert result["dataset"] == "synthetic" and result["model"] == "tiny-bert"
    assert result["learning_rate"] == 1e-3 and result["train_steps"] == 2


def test_table_driver_collects_results(tmp_path):
    spec = importlib.util.spec_from_file_location("wrench_table", RECIPE.parent / "wrench_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    runs = [("finetune", None, 0, 0.9), ("finetune", None, 1, 0.8), ("sama_r", 10, 0, 0.95), ("sama_r", 5, 0, 0.9)]
    for method, k, seed, value in runs:
        out = table.run_dir(tmp_path, "youtube", "all" if k is None else str(k), method, seed)
        out.mkdir(parents=True)
        row = {"method": method, "dataset": "youtube", "seed": seed, "metric_name": "accuracy", "test_metric": value}
        row.update(valid_metric=value, train_steps=5, train_seconds=2.0, clean_per_class=k, noise_auroc=None)
        row.update(num_clean=40, num_labels=2)
        if method == "sama_r":
            row.update(noise_auroc=0.7, noise_auroc_within_class=0.6, device="cuda: NVIDIA H200")
        else:
            row.update(device="cpu")
        (out / "results.json").write_text(json.dumps(row))
    md = table.main(
        [
            "--collect_only",
            "--output_root",
            str(tmp_path),
            "--markdown",
            str(tmp_path / "t.md"),
            "--plot",
            str(tmp_path / "k.png"),
        ]
    )
    assert (tmp_path / "k.png").stat().st_size > 0  # the K-curve
    assert "| youtube (accuracy) | all | 85.0 ± 7.1 (n=2) | – |" in md
    assert "| youtube (accuracy) | 10 | – | 95.0 (n=1) † |" in md  # the cell measured on a GPU says so
    rows_in_order = [md.index(f"| youtube (accuracy) | {k} |") for k in ("5", "10", "all")]
    assert rows_in_order == sorted(rows_in_order)  # K in increasing order, the whole clean split last
    assert "† runs on cuda: NVIDIA H200; unmarked cells: CPU" in md
    assert "| youtube | 10 | – | 0.700 / 0.600 |" in md and "| youtube | all | – | – |" in md
    assert (tmp_path / "t.md").read_text() == md
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\nintro\n<!-- wrench-table -->\nold table\n<!-- /wrench-table -->\noutro\n")
    for _ in range(2):  # regenerating replaces the block, it does not append
        table.main(["--collect_only", "--output_root", str(tmp_path), "--results_md", str(doc)])
    assert doc.read_text() == f"# Results\nintro\n<!-- wrench-table -->\n{md.strip()}\n<!-- /wrench-table -->\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="<!-- wrench-table -->"):
        table.main(["--collect_only", "--output_root", str(tmp_path), "--results_md", str(doc)])
    assert doc.read_text() == "no markers\n"
    collect = ["--collect_only", "--output_root", str(tmp_path)]
    only = table.main(collect + ["--methods", "sama_r", "--datasets", "youtube"])
    assert "| dataset (metric) | clean/class | sama_r |" in only and "| youtube (accuracy) | all |" not in only
    assert table.main(collect + ["--datasets", "sms"]).count("| sms") == 0
    other = tmp_path / "other"  # a second root: its runs fill cells the first root lacks and never replace its runs
    for method, seed, value in [("finetune", 0, 0.1), ("cft", 0, 0.7)]:
        out = table.run_dir(other, "youtube", "all", method, seed)
        out.mkdir(parents=True)
        row = {"method": method, "dataset": "youtube", "seed": seed, "metric_name": "accuracy", "test_metric": value}
        row.update(clean_per_class=None, device="cpu", train_seconds=1.0, train_steps=5, valid_metric=value)
        (out / "results.json").write_text(json.dumps(row))
    both = table.main(["--collect_only", "--output_root", f"{tmp_path},{other}", "--methods", "finetune,cft"])
    assert "| youtube (accuracy) | all | 85.0 ± 7.1 (n=2) | 70.0 (n=1) |" in both
    with pytest.raises(SystemExit, match="only with --collect_only"):
        table.main(["--output_root", f"{tmp_path},{other}", "--dry_run"])
    args = argparse.Namespace(python="py", configs_dir="c", extra=["--x"])
    cmd = table.command(args, "trec", "10", "cft", 2, tmp_path)
    assert cmd[cmd.index("--clean_per_class") + 1] == "10" and cmd[-1] == "--x" and "c/wrench_trec.yaml" in cmd


def test_k_curve_gives_a_method_one_colour_in_every_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    spec = importlib.util.spec_from_file_location("wrench_table", RECIPE.parent / "wrench_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = [
        {"dataset": d, "method": m, "clean_per_class": 10, "test_metric": 0.5, "metric_name": "accuracy"}
        for d, methods in [("sms", ["cft", "sama_rc"]), ("youtube", ["clean_only", "cft", "sama_rc"])]
        for m in methods
    ]
    drawn = []
    original = matplotlib.axes.Axes.errorbar

    def recording(self, *args, **kwargs):
        drawn.append((self.get_title(), kwargs["label"], kwargs["color"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recording)
    levels, axhline = [], matplotlib.axes.Axes.axhline

    def recording_level(self, y, *args, **kwargs):
        levels.append((self.get_title(), kwargs["label"], y))
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", recording_level)
    finetune = [
        {**rows[0], "method": "finetune", "test_metric": v, "clean_per_class": k} for v, k in ((0.6, 5), (0.8, 10))
    ]
    table.plot_k_curve(rows + finetune, str(tmp_path / "k.png"), ["clean_only", "cft", "sama_rc", "finetune"])
    colours = {}
    for _, label, colour in drawn:
        assert colours.setdefault(label, colour) == colour  # sms draws cft second, youtube third: same colour
    assert len(drawn) == 5 and len(set(colours.values())) == 3
    # finetune never reads the clean set: one level line at its mean, no point per K
    assert len(levels) == 1 and levels[0][1] == "finetune" and levels[0][2] == pytest.approx(70.0)


STUB_RUN = """
import json, os, sys, time
from pathlib import Path
argv = sys.argv
out = Path(argv[argv.index("--output_dir") + 1])
events = out.parent.parent.parent.parent.parent / "events.txt"
with open(events, "a") as f:
    f.write(f"start {time.time()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {os.getpid()}\\n")
# barrier: wait (at most 120 s) until STUB_PEERS runs have started, so the test sees whether they overlap
deadline = time.time() + 120
while events.read_text().count("start") < int(os.environ.get("STUB_PEERS", "1")) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.2)
if argv[argv.index("--method") + 1] == "broken":
    sys.exit(3)
with open(events, "a") as f:
    f.write(f"end {time.time()}\\n")
row = dict(method=argv[argv.index("--method") + 1], dataset="youtube", seed=int(argv[argv.index("--seed") + 1]))
row.update(metric_name="accuracy", test_metric=0.5, valid_metric=0.5, train_steps=1, train_seconds=0.5)
(out / "results.json").write_text(json.dumps(dict(row, clean_per_class=None)))
"""


def _stub_driver(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("wrench_table", RECIPE.parent / "wrench_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    stub = tmp_path / "stub_python.py"
    stub.write_text(f"#!{sys.executable}\n# stands in for `python recipe ...`: argv[1] is the recipe path\n{STUB_RUN}")
    stub.chmod(0o755)
    return table, stub


def _events(root: Path) -> list[tuple[str, float]]:
    return [
        (kind, float(t)) for kind, t, *_ in (line.split() for line in (root / "events.txt").read_text().splitlines())
    ]


def test_table_driver_runs_jobs_in_parallel_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_PEERS", "4")
    table, stub = _stub_driver(tmp_path)
    root = tmp_path / "runs"  # events.txt lands in tmp_path (five levels above each run folder)
    flags = ["--datasets", "youtube", "--methods", "finetune,cft", "--seeds", "0,1", "--clean_per_class", "all"]
    table.main([*flags, "--python", str(stub), "--output_root", str(root), "--jobs", "4"])
    assert len(list(root.glob("*/k*/*/seed*/results.json"))) == 4
    events = _events(tmp_path)
    starts = sorted(t for kind, t in events if kind == "start")
    first_end = min(t for kind, t in events if kind == "end")
    assert len(starts) == 4 and starts[-1] < first_end  # all four ran at once
    table.main([*flags, "--python", str(stub), "--output_root", str(root), "--jobs", "4"])
    assert len(_events(tmp_path)) == 8  # finished runs are skipped: nothing ran again


def test_table_driver_spreads_runs_over_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_PEERS", "4")
    table, stub = _stub_driver(tmp_path)
    flags = ["--datasets", "youtube", "--methods", "finetune", "--seeds", "0,1,2,3", "--clean_per_class", "all"]
    table.main(
        [*flags, "--python", str(stub), "--output_root", str(tmp_path / "runs"), "--jobs", "4", "--devices", "0,1"]
    )
    seen = [line.split()[2] for line in (tmp_path / "events.txt").read_text().splitlines() if line.startswith("start")]
    assert sorted(seen) == ["0", "0", "1", "1"]  # four runs in flight at once, two per GPU


def test_table_driver_sigterm_stops_runs_in_flight_and_keeps_finished_ones(tmp_path):
    _, stub = _stub_driver(tmp_path)
    root = tmp_path / "runs"

    def driver_cmd(seeds: str) -> list[str]:
        cmd = [sys.executable, str(RECIPE.parent / "wrench_table.py"), "--datasets", "youtube", "--seeds", seeds]
        cmd += ["--methods", "finetune", "--clean_per_class", "all", "--python", str(stub)]
        return cmd + ["--output_root", str(root)]

    assert subprocess.run(driver_cmd("0"), capture_output=True, timeout=600).returncode == 0  # seed 0 finishes
    # seeds 1 and 2 start together and wait for peers that never come
    env = {**os.environ, "STUB_PEERS": "4"}
    driver = subprocess.Popen([*driver_cmd("0,1,2"), "--jobs", "2"], env=env, stdout=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_events(tmp_path)) < 4 and time.time() < deadline:  # start+end of seed 0, starts of seeds 1 and 2
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=5) == 128 + signal.SIGTERM
    pids = [int(line.split()[3]) for line in (tmp_path / "events.txt").read_text().splitlines()[2:]]
    time.sleep(0.2)
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)  # the runs in flight are gone
    assert [p.parent.name for p in root.glob("*/k*/*/seed*/results.json")] == ["seed0"]  # the finished one is kept


def test_table_driver_time_budget_and_failed_runs(tmp_path, capsys):
    table, stub = _stub_driver(tmp_path)
    root = tmp_path / "runs"
    flags = ["--datasets", "youtube", "--clean_per_class", "all", "--python", str(stub), "--output_root", str(root)]
    table.main([*flags, "--methods", "finetune", "--seeds", "0,1,2", "--time_budget", "0.2"])
    assert len(list(root.glob("*/k*/*/seed*/results.json"))) == 1  # the first run started, the budget was then spent
    assert "runs 2..3 not started" in capsys.readouterr().out
    table.main([*flags, "--methods", "broken,finetune", "--seeds", "0", "--jobs", "2"])
    out = capsys.readouterr().out
    assert "FAILED (exit 3" in out and "broken/seed0/log.txt" in out
    assert not (root / "youtube" / "kall" / "broken" / "seed0" / "results.json").exists()


def test_metrics_come_from_evaluate_and_match_wrench_definitions(recipe):
    import evaluate
    from sklearn.metrics import accuracy_score, f1_score

    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert recipe.compute_metric("accuracy", preds, labels) == pytest.approx(3 / 5)
    assert recipe.compute_metric("f1", preds, labels) == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert recipe.compute_metric("f1", np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0  # no positive predicted
    rng = np.random.default_rng(0)
    for _ in range(3):
        p, y = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert recipe.compute_metric("f1", p, y) == pytest.approx(f1_score(y, p))
        p, y = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
        assert recipe.compute_metric("accuracy", p, y) == pytest.approx(accuracy_score(y, p))
    assert isinstance(evaluate.load(str(recipe.METRIC_SCRIPT)), evaluate.Metric)  # a local `evaluate` metric
    with pytest.raises(ValueError, match="accuracy"):
        recipe.compute_metric("auroc", preds, labels)


def test_tune_on_valid_fold_scores_the_other_half_of_valid(recipe, wrench_dir, tmp_path):
    """--tune_on_valid_fold: the two folds swap two stratified halves of valid; test is never used."""
    valid = load_wrench(wrench_dir)["valid"]
    valid_texts, valid_labels = list(valid["text"]), list(valid["label"])
    folds = []
    for fold in (0, 1):
        data = load_wrench(wrench_dir)
        hold_out_valid_half(data, fold, split_seed=123)
        folds.append((list(data["valid"]["text"]), list(data["test"]["text"]), list(data["valid"]["label"])))
    (clean0, score0, labels0), (clean1, score1, _) = folds
    assert sorted(clean0) == sorted(score1) and sorted(score0) == sorted(clean1)
    assert sorted(clean0 + score0) == sorted(valid_texts)
    for c in set(valid_labels):  # stratified: each class is split in half
        assert abs(2 * labels0.count(c) - valid_labels.count(c)) <= 1
    with pytest.raises(ValueError, match="must be 0 or 1"):
        hold_out_valid_half(load_wrench(wrench_dir), 2, split_seed=123)
    results = _run(recipe, wrench_dir, tmp_path, "--method", "finetune", "--tune_on_valid_fold", "1")
    assert results[0]["tune_on_valid_fold"] == 1
    assert results[0]["num_clean"] == len(clean1) and results[0]["num_test"] == len(score1)


def test_dataset_name_picks_the_wrench_folder_of_a_hub_snapshot(recipe, wrench_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(wrench_dir, snapshot / "sms")
    other = make_synthetic_weak_supervision(num_train=30, num_valid=20, num_test=20, num_classes=2, seed=9)
    write_wrench_format(other, snapshot / "youtube")  # a different data set: picking the wrong folder shows
    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ValueError, match="found .*sms.*youtube.*name the folder"):
        load_wrench_from_hub("org/wrench", None)
    script_args, _ = parse(
        recipe, ["--dataset_name", "org/wrench", "--dataset_config", "sms", "--output_dir", str(tmp_path / "o")]
    )
    data, name = recipe.load_data(script_args, 0)
    assert calls[-1] == ("org/wrench", "dataset", ["*sms/*", "sms/*"])
    assert name == "sms" and data["train"]["id"] == load_wrench(wrench_dir)["train"]["id"]
    assert len(data["train"]) != len(load_wrench(snapshot / "youtube")["train"])

    def offline(**kwargs):
        raise OSError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="download the WRENCH folder and pass its path"):
        recipe.load_data(script_args, 0)


WRENCH_CONFIGS = ["demo", "wrench_youtube", "wrench_sms", "wrench_trec", "wrench_chemprot"]


@pytest.mark.parametrize("name", WRENCH_CONFIGS)
def test_shipped_configs_parse_and_share_the_default_settings(recipe, name):
    """Every key of the shipped YAML configs is an option of the recipe (a typo would be an error here), and every
    dataset config trains with wrench_default.yaml's settings: only data, input length and steps differ."""
    configs = RECIPE.parent / "configs"
    script_args, training_args = parse(recipe, ["--config", str(configs / f"{name}.yaml")])
    default_script, default_training = parse(recipe, ["--config", str(configs / "wrench_default.yaml")])
    own = {"max_steps", "output_dir", "logging_dir", "disable_tqdm"}
    differing = {
        f.name for f in dataclasses.fields(training_args)
        if f.name not in own and getattr(training_args, f.name) != getattr(default_training, f.name)
    }  # fmt: skip
    assert differing == set()
    assert training_args.unroll_steps == default_training.unroll_steps == 2 and training_args.meta_weight_center
    assert Path(REPO_ROOT, script_args.dataset_dir).is_dir() or script_args.dataset_dir.startswith("../shared")


def test_demo_reads_the_shipped_data(recipe):
    script_args, _ = parse(recipe, ["--config", str(RECIPE.parent / "configs" / "demo.yaml")])
    assert (REPO_ROOT / script_args.dataset_dir / "train.json").is_file() and script_args.log_file


def test_paper_protocol_config_overrides_a_dataset_config(recipe):
    configs = RECIPE.parent / "configs"
    _, args = parse(
        recipe, ["--config", str(configs / "wrench_trec.yaml"), "--config", str(configs / "wrench_paper.yaml")]
    )
    assert (args.per_device_train_batch_size, args.max_steps, args.learning_rate) == (32, 1000, 1e-5)
    assert (args.meta_learning_rate, args.unroll_steps, args.lr_scheduler_type.value) == (1e-5, 10, "cosine")


HALF = ("--meta_fraction", "0.5")


@pytest.mark.parametrize(
    "method, mode, extra",
    [
        ("cft", "continue", ()),
        ("sama_rc_clean", "continue", ()),
        ("sama_rc_clean", "mix", ()),
        ("sama_rc_clean", "continue", HALF + ("--held_out_base_update", "true")),
        ("sama_rc_clean", "continue", HALF + ("--cross_fit", "true")),
    ],
)
def test_test_split_is_read_only_by_the_final_evaluation(
    recipe, wrench_dir, tmp_path, monkeypatch, method, mode, extra
):
    from transformers import Trainer

    tasks, events = [], []
    prepare = recipe.prepare_task
    monkeypatch.setattr(recipe, "prepare_task", lambda *a, **k: tasks.append(prepare(*a, **k)) or tasks[-1])
    train, predict = Trainer.train, Trainer.predict

    def recording_train(self, *args, **kwargs):
        seen = [self.train_dataset, self.eval_dataset, getattr(self, "meta_dataset", None)]
        events.append(("train", [id(d) for d in seen if d is not None], len(self.train_dataset)))
        return train(self, *args, **kwargs)

    def recording_predict(self, dataset, *args, **kwargs):
        events.append(("predict", [id(dataset)], len(dataset)))
        return predict(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    monkeypatch.setattr(Trainer, "predict", recording_predict)
    meta_rows, meta_loss = set(), ClassificationObjective.meta_loss

    def recording_meta_loss(self, model, inputs):  # meta batches and held-out checks alike
        meta_rows.update(tuple(r[m.bool()].tolist()) for r, m in zip(inputs["input_ids"], inputs["attention_mask"]))
        return meta_loss(self, model, inputs)

    monkeypatch.setattr(ClassificationObjective, "meta_loss", recording_meta_loss)
    _run(recipe, wrench_dir, tmp_path, "--method", method, "--sama_clean_mode", mode, "--clean_steps", "2",
         "--eval_strategy", "steps", "--eval_steps", "2", "--save_model", "false", "--unroll_steps", "2",
         *extra)  # fmt: skip
    (task,) = tasks
    test, clean = id(task.test_tok), {id(task.clean_tok), id(task.clean_as_train_tok)}
    trains = [e for e in events if e[0] == "train"]
    assert all(test not in ids for _, ids, _ in trains)  # never a training, meta or model-selection set
    first_test_read = next(i for i, e in enumerate(events) if test in e[1])
    assert first_test_read > max(i for i, e in enumerate(events) if e[0] == "train")  # only after all training
    assert meta_rows <= {tuple(r) for r in task.clean_tok["input_ids"]}  # every meta loss is on clean rows
    assert bool(meta_rows) == (method != "cft")
    phases = [("clean" if ids[0] in clean else "main", size) for _, ids, size in trains]
    if mode == "mix":  # one phase on the weak rows plus the clean rows
        assert phases == [("main", len(task.train_tok) + len(task.clean_as_train_tok))]
    else:  # weak (majority-vote) rows first, then the clean set
        assert phases == [("main", len(task.train_tok)), ("clean", len(task.clean_as_train_tok))]


def test_console_shows_the_report_and_the_log_file_the_rest(wrench_dir, tmp_path):
    """A run with --log_file (as `make demo`): the console has the report and progress bars, not the Trainer's
    per-step log dictionaries or loading reports; those are in the log file."""
    log = tmp_path / "run.log"
    cmd = [
        sys.executable, str(RECIPE), "--dataset_dir", str(wrench_dir), "--model_name_or_path", "tiny-bert",
        "--output_dir", str(tmp_path / "out"), "--log_file", str(log), "--method", "finetune,sama_r",
        "--max_steps", "4", "--unroll_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--max_seq_length", "24", "--save_model", "false", "--disable_tqdm", "false",
        "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "| finetune |" in console and "| sama_r |" in console and "× finetune" in console
    assert f"Full log: {log}" in console
    assert "'loss'" not in console and "meta/meta_loss" not in console and "LOAD REPORT" not in console
    logged = log.read_text()
    assert '"loss"' in logged and "meta/meta_loss" in logged  # every per-step log is in the file
