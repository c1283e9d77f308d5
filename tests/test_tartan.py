"""TARTAN recipe and multitask model: wiring, per-example MLM loss, label vocabulary, collator, end-to-end runs."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from sama_trainer.tartan import AuxWeightNet, TartanCollator, TartanMultitaskModel, per_example_mlm_loss


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tartan"))


def _load_recipe():
    spec = importlib.util.spec_from_file_location(
        "tartan_recipe", os.path.join(ROOT, "recipes", "tartan_continued_pretraining.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _write_task(path: str, n_train: int = 48, n_eval: int = 12, seed: int = 0) -> str:
    """A synthetic dont-stop-pretraining task folder; label 'D' occurs in test only, 'C' never in dev."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)

    def rows(n: int, labels: list[str]) -> list[dict]:
        out = []
        for i in range(n):
            label = labels[i % len(labels)]
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
            words.insert(rng.randint(0, len(words)), f"key{label}")
            out.append({"text": " ".join(words), "label": label})
        return out

    splits = {"train": rows(n_train, ["A", "B", "C"]), "dev": rows(n_eval, ["A", "B"]), "test": rows(n_eval, "ABCD")}
    for name, data in splits.items():
        with open(os.path.join(path, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    with open(os.path.join(path, "train.txt"), "w") as f:
        f.writelines(r["text"] + "\n" for r in splits["train"])
    with open(os.path.join(path, "domain.1xTAPT.txt"), "w") as f:  # includes long documents and a blank line
        f.writelines(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))) + "\n" for _ in range(30))
        f.write("\n")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    return _write_task(str(tmp_path_factory.mktemp("tartan") / "toy"))


@pytest.fixture(scope="module")
def tiny(task_dir):
    args = recipe.TartanArguments(task="toy", task_dir=task_dir, model_name_or_path=recipe.TINY_ROBERTA)
    args.max_seq_length = 32
    splits = recipe.read_task(task_dir)
    names = recipe.label_vocabulary(splits)
    torch.manual_seed(0)
    model, tokenizer = recipe.build_model_and_tokenizer(args, names, splits)
    return args, model, tokenizer, splits, names


def _batch(tiny, n: int = 4) -> dict[str, torch.Tensor]:
    args, model, tokenizer, splits, names = tiny
    label2id = {name: i for i, name in enumerate(names)}
    data = recipe.load_task_datasets(args, tokenizer, label2id, splits)
    aux, _, _ = recipe.load_aux_corpus(args, tokenizer)
    features = [{**data["train"][i], **aux[i]} for i in range(n)]
    return TartanCollator(tokenizer, seed=0)(features)


def test_multitask_model_shares_one_encoder(tiny):
    _, model, _, _, _ = tiny
    encoder = model.encoder
    assert encoder is model.classifier_model.roberta
    # the MLM branch keeps no encoder of its own and its decoder is tied to the shared input embeddings
    assert not any(isinstance(m, type(encoder)) for m in model.lm_head.modules())
    assert model.lm_head.decoder.weight is encoder.get_input_embeddings().weight
    enc_ids = {id(p) for p in encoder.parameters()}
    assert enc_ids <= {id(p) for p in model.parameters()}


def test_gradients_from_both_heads_reach_the_encoder(tiny):
    _, model, _, _, _ = tiny
    batch = _batch(tiny)
    layer = model.encoder.encoder.layer[0].attention.self.query.weight
    cls_head = model.classifier_model.classifier.out_proj.weight
    mlm_head = model.lm_head.dense.weight
    model.train()
    for part, own, other in (("ft", cls_head, mlm_head), ("mlm", mlm_head, cls_head)):
        model.zero_grad(set_to_none=True)
        if part == "ft":
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        else:
            keys = ("mlm_input_ids", "mlm_attention_mask", "mlm_labels")
            loss = model(**{k: batch[k] for k in keys}).mlm_losses.mean()
        loss.backward()
        assert layer.grad is not None and layer.grad.abs().sum() > 0, part
        assert own.grad is not None and own.grad.abs().sum() > 0, part
        assert other.grad is None, part
    model.zero_grad(set_to_none=True)


def test_per_example_mlm_loss_matches_manual(tiny):
    _, model, _, _, _ = tiny
    batch = _batch(tiny, n=5)
    labels = batch["mlm_labels"].clone()
    labels[2] = -100  # an example with no masked token
    model.eval()
    with torch.no_grad():
        out = model(
            mlm_input_ids=batch["mlm_input_ids"], mlm_attention_mask=batch["mlm_attention_mask"], mlm_labels=labels
        )
        hidden = model.encoder(input_ids=batch["mlm_input_ids"], attention_mask=batch["mlm_attention_mask"])
        logits = model.lm_head(hidden.last_hidden_state)  # [B, T, V], all positions
    for i in range(5):
        mask = labels[i] != -100
        expected = F.cross_entropy(logits[i][mask], labels[i][mask]) if mask.any() else torch.tensor(0.0)
        torch.testing.assert_close(out.mlm_losses[i], expected, rtol=1e-5, atol=1e-5)
        assert out.mlm_num_masked[i] == mask.sum()
    assert out.mlm_losses[2] == 0

    # the helper alone, on hand-made values
    token_logits = torch.randn(4, 7)
    targets = torch.tensor([1, 2, 3, 4])
    rows = torch.tensor([0, 0, 2, 2])
    losses, counts = per_example_mlm_loss(token_logits, targets, rows, 3)
    ce = F.cross_entropy(token_logits, targets, reduction="none")
    torch.testing.assert_close(losses, torch.stack([ce[:2].mean(), torch.tensor(0.0), ce[2:].mean()]))
    assert counts.tolist() == [2.0, 0.0, 2.0]


def test_label_vocabulary_is_the_union_of_all_splits(task_dir):
    splits = recipe.read_task(task_dir)
    assert recipe.label_vocabulary(splits) == ["A", "B", "C", "D"]  # D only in test, C not in dev


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_DATA, "chemprot")), reason="TARTAN data not available")
def test_label_vocabulary_chemprot():
    splits = recipe.read_task(os.path.join(REAL_DATA, "chemprot"))
    labels = recipe.label_vocabulary(splits)
    assert len(labels) == 13
    assert len({r["label"] for r in splits["dev"]}) == 12 and set(labels) > {r["label"] for r in splits["test"]}


def test_collator_masks_every_example_and_never_special_tokens(tiny):
    _, _, tokenizer, _, _ = tiny
    collator = TartanCollator(tokenizer, mlm_probability=0.05, seed=0)
    seqs = [[tokenizer.cls_token_id, *range(10, 10 + n), tokenizer.sep_token_id] for n in (1, 3, 8, 20)]
    batch = collator([{"mlm_input_ids": s, "aux_index": i, "aux_source": 0} for i, s in enumerate(seqs)])
    masked = batch["mlm_labels"] != -100
    assert masked.any(-1).all()  # ensure_masked
    special = torch.isin(batch["mlm_labels"], torch.tensor(tokenizer.all_special_ids))
    assert not special.any()
    assert (batch["mlm_attention_mask"].sum(-1) == torch.tensor([len(s) for s in seqs])).all()
    assert batch["aux_index"].tolist() == [0, 1, 2, 3]


def test_aux_corpus_windows_long_documents(tiny):
    args, _, tokenizer, _, _ = tiny
    aux, records, sources = recipe.load_aux_corpus(args, tokenizer)
    assert sources == ["train.txt", "domain.1xTAPT.txt"]
    assert len(aux) == len(records) > 48 + 30  # some documents were cut into several windows
    assert max(len(x) for x in aux["mlm_input_ids"]) <= args.max_seq_length
    assert any(r["window"] > 0 for r in records)
    assert set(aux["aux_source"]) == {0, 1}


def test_aux_weight_net_starts_at_one():
    net = AuxWeightNet(num_sources=2)
    w = net(torch.rand(5) * 10, F.one_hot(torch.tensor([0, 1, 0, 1, 1]), 2).float())
    torch.testing.assert_close(w, torch.ones(5))


def test_mlm_head_warm_up_trains_only_the_head(tiny):
    args, model, tokenizer, _, _ = tiny
    aux, _, _ = recipe.load_aux_corpus(args, tokenizer)
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    head = {id(p) for p in model.mlm_head_parameters()}
    tied = model.encoder.get_input_embeddings().weight
    assert id(tied) not in head and head == {id(p) for p in model.lm_head.parameters()} - {id(tied)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collator = TartanCollator(tokenizer, seed=0)
    torch.manual_seed(0)
    losses = model.warm_up_mlm_head(aux, collator, steps=40, batch_size=8, learning_rate=1e-2, seed=0)
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])  # the head learns
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) in head), name  # encoder, embeddings and classifier bit-identical
        assert p.requires_grad, name  # nothing left frozen
        assert (p.grad is None) == (id(p) not in head), name  # no backward through the encoder or the embeddings
    assert model.lm_head.decoder.weight is model.encoder.get_input_embeddings().weight
    assert model.warm_up_mlm_head(aux, collator, steps=0) == []


def test_aux_weight_net_initial_weight(task_dir):
    net = AuxWeightNet(num_sources=2, init_bias=AuxWeightNet.init_bias_for(0.1))
    torch.testing.assert_close(net(torch.rand(3) * 10, None), torch.full((3,), 0.1))
    assert AuxWeightNet.init_bias_for(1.0) == 0.0  # the middle of (0, 2): the default net
    for bad in (0.0, 2.0):
        with pytest.raises(ValueError, match="aux_init_weight"):
            recipe.TartanArguments(task_dir=task_dir, aux_init_weight=bad)


def test_aux_weight_net_loss_scale_divides_the_loss_feature(task_dir):
    torch.manual_seed(0)
    raw = AuxWeightNet(num_sources=2)
    torch.nn.init.normal_(raw.net[2].weight)  # a net whose output depends on the loss
    scaled = AuxWeightNet(num_sources=2, loss_scale=8.0)
    scaled.load_state_dict(raw.state_dict())
    losses, sources = torch.rand(6) * 10, F.one_hot(torch.tensor([0, 1, 0, 1, 1, 0]), 2).float()
    torch.testing.assert_close(scaled(losses, sources), raw(losses / 8.0, sources))
    assert not torch.allclose(scaled(losses, sources), raw(losses, sources))
    with pytest.raises(ValueError, match="loss_scale"):
        AuxWeightNet(loss_scale=0.0)
    with pytest.raises(ValueError, match="aux_loss_scale"):
        recipe.TartanArguments(task_dir=task_dir, aux_loss_scale=-1.0)


def test_tartan_trainer_scales_the_loss_feature_by_ln_vocab(tiny, tmp_path):
    from sama_trainer import SAMAConfig
    from sama_trainer.tartan import TartanTrainer

    args, model, tokenizer, splits, names = tiny
    train = recipe.load_task_datasets(args, tokenizer, {n: i for i, n in enumerate(names)}, splits)["train"]
    config = SAMAConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", meta_objective="reweight")
    vocab = model.encoder.get_input_embeddings().num_embeddings
    common = dict(model=model, args=config, train_dataset=train, meta_dataset=train)
    default = TartanTrainer(**common)
    assert default.aux_loss_scale == pytest.approx(math.log(vocab)) and vocab > 100
    assert default.meta_model.loss_scale == pytest.approx(math.log(vocab))
    assert TartanTrainer(**common, aux_loss_scale=1.0).meta_model.loss_scale == 1.0
    by_class = dataclasses.replace(config, meta_weight_normalize_by_class=True)
    with pytest.raises(ValueError, match="meta_weight_normalize_by_class.*set it to False"):
        TartanTrainer(**{**common, "args": by_class})


def test_end_to_end_sama_with_head_warm_up_and_small_initial_weight(task_dir, tmp_path):
    extra = dict(save_final_model="false", aux_init_weight=0.1, mlm_head_warmup_steps=3, meta_learning_rate=1e-7)
    results, out = _run(task_dir, tmp_path, "sama", steps=2, **extra)
    assert results["mlm_head_warmup"]["steps"] == 3
    with open(os.path.join(out, "aux_weights.jsonl")) as f:
        weights = [json.loads(line)["final_weight"] for line in f]
    assert all(abs(w - 0.1) < 1e-3 for w in weights)  # the start the flag asked for (a tiny meta lr)


def _run(task_dir: str, tmp_path, method: str, steps: int, **extra):
    argv = [
        "--task", "toy", "--task_dir", task_dir, "--method", method, "--model_name_or_path", recipe.TINY_ROBERTA,
        "--max_seq_length", "32", "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--unroll_steps", "2", "--learning_rate", "1e-3",
        "--meta_learning_rate", "1e-2", "--sama_alpha", "0.3", "--output_dir", str(tmp_path / "{method}"),
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--seed", "1",
    ]  # fmt: skip
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    args, training_args = recipe.parse_args(argv)
    return recipe.main(args, training_args), training_args.output_dir


def test_end_to_end_sama_writes_results_weights_and_card(task_dir, tmp_path):
    results, out = _run(task_dir, tmp_path, "sama", steps=6, logging_steps=2)
    assert out == str(tmp_path / "sama")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("method", "task", "seed", "metric", "dev_score", "test_score"):
        assert saved[key] == results[key]
    assert saved["method"] == "sama" and saved["seed"] == 1 and saved["metric"] == "macro_f1"
    assert saved["meta_steps"] == 3 and saved["labels"] == ["A", "B", "C", "D"]
    steps = [e["step"] for e in saved["weight_trajectory"]]
    assert (
        steps
        and steps == sorted(steps)
        and all(0 < e["weight_min"] <= e["weight_mean"] <= e["weight_max"] < 2 for e in saved["weight_trajectory"])
    )
    with open(os.path.join(out, "aux_weights.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == saved["n_aux"]
    assert sum(r["times_drawn"] for r in rows) == 6 * 4
    assert all(r["final_weight"] > 0 for r in rows)
    assert len({round(r["final_weight"], 6) for r in rows}) > 1  # the meta net moved away from its constant init
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "Trained with SAMA" in card and "End-task-aware training (TARTAN)" in card
    clf = AutoModelForSequenceClassification.from_pretrained(out)  # the classifier is a plain HF model
    assert clf.config.num_labels == 4 and clf.config.id2label[3] == "D"
    assert saved["aux_loss_scale"] == pytest.approx(math.log(clf.get_input_embeddings().num_embeddings))
    reloaded = TartanMultitaskModel.from_pretrained(out)
    assert reloaded.lm_head.decoder.weight is reloaded.encoder.get_input_embeddings().weight


@pytest.mark.parametrize("method", ["finetune", "tartan_mt"])
def test_end_to_end_baselines(task_dir, tmp_path, method):
    results, out = _run(task_dir, tmp_path, method, steps=2, save_final_model="false")
    assert results["method"] == method and 0.0 <= results["test_score"] <= 1.0
    assert (results["n_aux"] == 0) == (method == "finetune")
    assert os.path.isfile(os.path.join(out, "results.json")) and os.path.isfile(os.path.join(out, "README.md"))
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not os.path.isfile(os.path.join(out, "aux_weights.jsonl"))


def test_configs_parse_and_cli_overrides(tmp_path):
    configs = os.path.join(ROOT, "recipes", "configs")
    for task in recipe.TASKS:
        path = os.path.join(configs, f"tartan_{task}.yaml")
        args, training_args = recipe.parse_args(["--config", path, "--output_dir", str(tmp_path)])
        assert args.task == task and training_args.learning_rate == 2e-5 and training_args.unroll_steps == 10
        assert training_args.sama_alpha == 0.3 and training_args.meta_learning_rate == 1e-5
    cpu = os.path.join(configs, "tartan_cpu.yaml")
    args, training_args = recipe.parse_args(
        [
            "--config",
            os.path.join(configs, "tartan_sciie.yaml"),
            "--config",
            cpu,
            "--seed",
            "7",
            "--method",
            "finetune",
        ]
    )
    assert args.task == "sciie" and args.method == "finetune" and training_args.seed == 7
    assert training_args.output_dir.endswith(os.path.join("sciie", "finetune", "seed7"))


def test_table_driver_aggregates(tmp_path):
    spec = importlib.util.spec_from_file_location("tartan_table", os.path.join(ROOT, "recipes", "tartan_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for task, metric in (("chemprot", "micro_f1"), ("sciie", "macro_f1")):
        for method, base in (("finetune", 0.5), ("sama", 0.6)):
            for seed in range(3):
                out = table.run_dir(str(tmp_path), task, method, seed)
                os.makedirs(out)
                score = base + 0.01 * seed
                result = {"task": task, "method": method, "seed": seed, "metric": metric, "model": "m"}
                result.update(test_score=score, dev_score=score, cpu_time_s=1.0, runtime_s=2.0)
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(result, f)
    text = table.write_table(str(tmp_path))
    assert "| Fine-tune (baseline) | 51.00 ± 1.00 | 51.00 ± 1.00 | **51.00** ± 1.00 |" in text
    assert "| SAMA (learned w) | 61.00 ± 1.00 | 61.00 ± 1.00 | **61.00** ± 1.00 |" in text
    assert "chemprot (micro_f1)" in text and os.path.isfile(tmp_path / "table.json")
    for seed in (1, 2):  # sciie/sama with seed 0 only: no std of one value, and only seed 0 ran on every task
        os.remove(os.path.join(table.run_dir(str(tmp_path), "sciie", "sama", seed), "results.json"))
    text = table.write_table(str(tmp_path))
    assert "| SAMA (learned w) | 61.00 ± 1.00 | 60.00 (n=1) | **60.50** |" in text
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n<!-- tartan-table -->\nold\n<!-- /tartan-table -->\nnotes\n")
    table.main(["--aggregate_only", "--output_root", str(tmp_path), "--results_md", str(doc)])
    block = doc.read_text().split("<!-- tartan-table -->\n")[1].split("<!-- /tartan-table -->")[0]
    assert block.strip() == text.split("\n", 1)[1].strip() and "# TARTAN table" not in block
    assert doc.read_text().startswith("# Results\n") and doc.read_text().endswith("<!-- /tartan-table -->\nnotes\n")


def test_missing_model_error_names_the_fix(tmp_path):
    args, _ = recipe.parse_args(
        ["--task", "sciie", "--model_name_or_path", "sama-trainer-tests/no-such-model", "--output_dir", str(tmp_path)]
    )
    with pytest.raises(ValueError, match=f"--model_name_or_path .*'{recipe.TINY_ROBERTA}' \\(built in-process\\)"):
        recipe.build_model_and_tokenizer(args, ["a", "b"], {"train": []})
