"""TARTAN: the multitask model, data, objective passes, weight statistics, saving/loading and the recipe end to end."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, TrainerCallback

from sama_trainer import SAMAConfig, load_meta_model
from sama_trainer.tartan import (
    TINY_ROBERTA,
    AuxWeightNet,
    PairedDataset,
    TartanCollator,
    TartanMTTrainer,
    TartanMultitaskModel,
    TartanObjective,
    TartanTrainer,
    build_multitask_model,
    label_vocabulary,
    load_aux_corpus,
    per_example_mlm_loss,
    read_task,
    task_datasets,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tartan"))
MAX_LENGTH = 32


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe("tartan_continued_pretraining")

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
    """(tiny model, tokenizer, tokenised splits, auxiliary corpus, label names); copy the model before changing it."""
    splits = read_task(task_dir)
    names = label_vocabulary(splits)
    torch.manual_seed(0)
    model, tokenizer = build_multitask_model(
        TINY_ROBERTA, names, MAX_LENGTH, tiny_texts=[r["text"] for r in splits["train"]]
    )
    data = task_datasets(splits, tokenizer, names, MAX_LENGTH)
    aux = load_aux_corpus(task_dir, ["train.txt", "domain.1xTAPT.txt"], tokenizer, MAX_LENGTH)
    return model, tokenizer, data, aux, names


def _batch(tiny, n: int = 4) -> dict[str, torch.Tensor]:
    _, tokenizer, data, aux, _ = tiny
    features = [{**data["train"][i], **aux.dataset[i]} for i in range(n)]
    return TartanCollator(tokenizer, seed=0)(features)


def _config(tmp_path, **kwargs) -> SAMAConfig:
    defaults = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        learning_rate=1e-3, meta_learning_rate=1e-2, sama_alpha=0.3, unroll_steps=2, max_steps=4,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=1, data_seed=0,
    )  # fmt: skip
    return SAMAConfig(**{**defaults, **kwargs})


def _tartan_trainer(tiny, tmp_path, **kwargs) -> TartanTrainer:
    model, tokenizer, data, aux, _ = tiny
    trainer_kwargs = ("meta_model", "objective", "callbacks")
    config = _config(tmp_path, **{k: kwargs.pop(k) for k in list(kwargs) if k not in trainer_kwargs})
    return TartanTrainer(
        model=copy.deepcopy(model), args=config, train_dataset=PairedDataset(data["train"], aux.dataset),
        meta_dataset=data["train"], data_collator=TartanCollator(tokenizer), processing_class=tokenizer, **kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# model


def test_multitask_model_shares_one_encoder(tiny):
    model = tiny[0]
    encoder = model.encoder
    assert encoder is model.classifier_model.roberta
    # the MLM branch keeps no encoder of its own and its decoder is tied to the shared input embeddings
    assert not any(isinstance(m, type(encoder)) for m in model.lm_head.modules())
    assert model.lm_head.decoder.weight is encoder.get_input_embeddings().weight
    assert {id(p) for p in encoder.parameters()} <= {id(p) for p in model.parameters()}


def test_gradients_from_both_heads_reach_the_encoder(tiny):
    model = copy.deepcopy(tiny[0])
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


def test_per_example_mlm_loss_matches_manual(tiny):
    model = tiny[0]
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


def test_uniform_mlm_loss_is_ln_vocabulary(tiny):
    model = tiny[0]
    vocab = model.encoder.get_input_embeddings().num_embeddings
    assert vocab > 100 and model.uniform_mlm_loss() == pytest.approx(math.log(vocab))


def test_mlm_head_warm_up_trains_only_the_head(tiny):
    model, tokenizer, _, aux, _ = tiny
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    head = {id(p) for p in model.mlm_head_parameters()}
    tied = model.encoder.get_input_embeddings().weight
    assert id(tied) not in head and head == {id(p) for p in model.lm_head.parameters()} - {id(tied)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collator = TartanCollator(tokenizer, seed=0)
    losses = model.warm_up_mlm_head(aux.dataset, collator, steps=40, batch_size=8, learning_rate=1e-2, seed=0)
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])  # the head learns
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) in head), name  # encoder, embeddings and classifier bit-identical
        assert p.requires_grad, name  # nothing left frozen
        assert (p.grad is None) == (id(p) not in head), name  # no backward through the encoder or the embeddings
    assert model.lm_head.decoder.weight is model.encoder.get_input_embeddings().weight
    assert model.warm_up_mlm_head(aux.dataset, collator, steps=0) == []


def test_multitask_model_save_load_round_trip(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from any freshly built model
    model.save_pretrained(str(tmp_path))
    reloaded = TartanMultitaskModel.from_pretrained(str(tmp_path))
    assert reloaded.lm_head.decoder.weight is reloaded.encoder.get_input_embeddings().weight
    expected = model.state_dict()
    assert set(reloaded.state_dict()) == set(expected)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    clf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))  # the classifier is a plain HF model
    assert torch.equal(clf.classifier.out_proj.weight, model.classifier_model.classifier.out_proj.weight)
    in_place = copy.deepcopy(tiny[0])
    in_place.load_weights(str(tmp_path))
    assert all(torch.equal(v, expected[k]) for k, v in in_place.state_dict().items())
    assert in_place.lm_head.decoder.weight is in_place.encoder.get_input_embeddings().weight


def test_missing_model_error_names_the_fix():
    with pytest.raises(ValueError, match=f"--model_name_or_path .*'{TINY_ROBERTA}' \\(built in-process\\)"):
        build_multitask_model("sama-trainer-tests/no-such-model", ["a", "b"], 32)


# ----------------------------------------------------------------------------------------------------------------
# data


def test_label_vocabulary_is_the_union_of_all_splits(task_dir):
    assert label_vocabulary(read_task(task_dir)) == ["A", "B", "C", "D"]  # D only in test, C not in dev


def test_read_task_names_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        read_task(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_DATA, "chemprot")), reason="TARTAN data not available")
def test_label_vocabulary_chemprot():
    splits = read_task(os.path.join(REAL_DATA, "chemprot"))
    labels = label_vocabulary(splits)
    assert len(labels) == 13
    assert len({r["label"] for r in splits["dev"]}) == 12 and set(labels) > {r["label"] for r in splits["test"]}


def test_collator_masks_every_example_and_never_special_tokens(tiny):
    tokenizer = tiny[1]
    collator = TartanCollator(tokenizer, mlm_probability=0.05, seed=0)
    seqs = [[tokenizer.cls_token_id, *range(10, 10 + n), tokenizer.sep_token_id] for n in (1, 3, 8, 20)]
    batch = collator([{"mlm_input_ids": s, "aux_index": i, "aux_source": 0} for i, s in enumerate(seqs)])
    masked = batch["mlm_labels"] != -100
    assert masked.any(-1).all()  # ensure_masked
    special = torch.isin(batch["mlm_labels"], torch.tensor(tokenizer.all_special_ids))
    assert not special.any()
    assert (batch["mlm_attention_mask"].sum(-1) == torch.tensor([len(s) for s in seqs])).all()
    assert batch["aux_index"].tolist() == [0, 1, 2, 3]
    again = collator.with_seed(0)([{"mlm_input_ids": s} for s in seqs])
    assert torch.equal(
        again["mlm_labels"],
        TartanCollator(tokenizer, 0.05, seed=0)([{"mlm_input_ids": s} for s in seqs])["mlm_labels"],
    )


def test_aux_corpus_windows_long_documents(tiny, task_dir):
    tokenizer, aux = tiny[1], tiny[3]
    assert aux.sources == ["train.txt", "domain.1xTAPT.txt"]
    assert len(aux.dataset) == len(aux.records) > 48 + 30  # some documents were cut into several windows
    assert max(len(x) for x in aux.dataset["mlm_input_ids"]) <= MAX_LENGTH
    assert any(r["window"] > 0 for r in aux.records)
    assert set(aux.dataset["aux_source"]) == {0, 1}
    assert aux.dataset["aux_index"] == [r["aux_index"] for r in aux.records] == list(range(len(aux.records)))
    small = load_aux_corpus(task_dir, ["missing.txt", "train.txt"], tokenizer, MAX_LENGTH, max_examples=10, seed=3)
    assert small.sources == ["train.txt"] and len(small.dataset) == 10 and set(small.dataset["aux_source"]) == {0}


def test_paired_dataset_covers_both_datasets():
    paired = PairedDataset([{"a": i} for i in range(3)], [{"b": i} for i in range(5)])
    assert len(paired) == 5
    assert [paired[i] for i in range(5)] == [{"a": i % 3, "b": i} for i in range(5)]
    with pytest.raises(ValueError, match="non-empty"):
        PairedDataset([], [{"b": 0}])


# ----------------------------------------------------------------------------------------------------------------
# objective and weighting net


def test_aux_weight_net_initial_weight_and_loss_scale():
    sources = F.one_hot(torch.tensor([0, 1, 0, 1, 1]), 2).float()
    torch.testing.assert_close(AuxWeightNet(num_sources=2)(torch.rand(5) * 10, sources), torch.ones(5))
    net = AuxWeightNet(num_sources=2, init_bias=AuxWeightNet.init_bias_for(0.1))
    torch.testing.assert_close(net(torch.rand(3) * 10, None), torch.full((3,), 0.1))
    assert AuxWeightNet.init_bias_for(1.0) == 0.0  # the middle of (0, 2): the default net
    for bad in (0.0, 2.0):
        with pytest.raises(ValueError, match="aux_init_weight"):
            TartanObjective(init_weight=bad)
    raw = AuxWeightNet(num_sources=2)
    torch.nn.init.normal_(raw.net[2].weight)  # a net whose output depends on the loss
    scaled = AuxWeightNet(num_sources=2, loss_scale=8.0)
    scaled.load_state_dict(raw.state_dict())
    losses = torch.rand(5) * 10
    torch.testing.assert_close(scaled(losses, sources), raw(losses / 8.0, sources))
    assert not torch.allclose(scaled(losses, sources), raw(losses, sources))
    with pytest.raises(ValueError, match="loss_scale"):
        AuxWeightNet(loss_scale=0.0)
    with pytest.raises(ValueError, match="aux_loss_scale"):
        TartanObjective(loss_scale=-1.0)


class _ForwardCounter:
    """Counts forwards of the multitask model by which parts ran (end task, MLM) and of the shared encoder."""

    def __init__(self, model: TartanMultitaskModel):
        self.calls: Counter = Counter()
        self.encoder_calls = 0
        model.register_forward_pre_hook(self._model, with_kwargs=True)
        model.encoder.register_forward_pre_hook(self._encoder)

    def _model(self, module, args, kwargs):
        self.calls[(kwargs.get("input_ids") is not None, kwargs.get("mlm_input_ids") is not None)] += 1

    def _encoder(self, module, args):
        self.encoder_calls += 1


def test_objective_passes_run_only_what_they_need(tiny):
    model = copy.deepcopy(tiny[0])
    counter = _ForwardCounter(model)
    objective = TartanObjective.for_model(model, num_sources=2)
    batch = _batch(tiny, n=6)
    examples = objective.example_losses(model, dict(batch))  # the perturbed passes: the MLM part only
    assert counter.calls == {(False, True): 1} and counter.encoder_calls == 1
    assert examples.features.tolist() == F.one_hot(batch["aux_source"], 2).float().tolist()
    assert torch.equal(examples.example_ids, batch["aux_index"]) and examples.logits is None
    _, end_task_loss = objective.base_losses(model, dict(batch))  # a base step: one forward for both tasks
    assert counter.calls == {(False, True): 1, (True, True): 1} and counter.encoder_calls == 3
    assert end_task_loss.requires_grad and end_task_loss.shape == ()
    objective.meta_loss(model, dict(batch))  # meta batches: the end task only
    assert counter.calls == {(False, True): 1, (True, True): 1, (True, False): 1} and counter.encoder_calls == 4
    assert objective.input_columns == ("aux_index", "aux_source")
    with pytest.raises(ValueError, match="PairedDataset"):
        objective.example_losses(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})


def test_objective_losses_match_the_model_in_eval_mode(tiny):
    model = copy.deepcopy(tiny[0]).eval()
    objective = TartanObjective.for_model(model, num_sources=2)
    batch = _batch(tiny, n=6)
    with torch.no_grad():
        base, end_task_loss = objective.base_losses(model, dict(batch))
        examples = objective.example_losses(model, dict(batch))
        mlm = model(**{k: batch[k] for k in ("mlm_input_ids", "mlm_attention_mask", "mlm_labels")}).mlm_losses
        logits = model.classifier_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(base.losses, mlm)
    torch.testing.assert_close(examples.losses, mlm)
    torch.testing.assert_close(end_task_loss, F.cross_entropy(logits, batch["labels"]))
    torch.testing.assert_close(objective.meta_loss(model, dict(batch)), F.cross_entropy(logits, batch["labels"]))
    net = AuxWeightNet(num_sources=2)
    torch.nn.init.normal_(net.net[2].weight)
    weighted, weights = objective.weighted_loss(net, examples)
    torch.testing.assert_close(weights, net(mlm, F.one_hot(batch["aux_source"], 2).float()))
    torch.testing.assert_close(weighted, (weights * mlm).mean())


def test_training_runs_one_forward_per_base_step_and_only_mlm_in_perturbed_passes(tiny, tmp_path):
    trainer = _tartan_trainer(tiny, tmp_path, max_steps=4, unroll_steps=2)
    counter = _ForwardCounter(trainer.model)
    trainer.train()
    assert trainer.meta_step_count == 2
    # per base step one forward with both parts; per meta step one end-task forward (meta loss) and two MLM-only
    # forwards (θ ± εu)
    assert counter.calls == {(True, True): 4, (True, False): 2, (False, True): 4}


TOP_LAYER_AND_HEADS = r"layer\.1\.|\.classifier\.|lm_head"  # the tiny model's last layer and both heads


def test_scoped_training_reuses_the_shared_lower_layers_in_the_second_perturbed_pass(tiny, tmp_path):
    # the MLM decoder is tied to the (unscoped) input embeddings: the cache must still give the same training
    results, embedding_calls = [], []
    for name, kwargs in (("cached", None), ("uncached", {"pass_cache": None})):
        trainer = _tartan_trainer(
            tiny, tmp_path / name, meta_gradient_params=TOP_LAYER_AND_HEADS, meta_gradient_kwargs=kwargs,
            sama_base_update=False, max_steps=4, unroll_steps=2,
        )  # fmt: skip
        calls: list[int] = []
        lowest = trainer.model.encoder.embeddings.word_embeddings  # inside a reused call: not run when reused
        lowest.register_forward_pre_hook(lambda m, args, c=calls: c.append(1))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert trainer.meta_step_count == 2
        embedding_calls.append(len(calls))
        results.append([*trainer.model.parameters(), *trainer.meta_model.parameters()])
    assert embedding_calls[1] - embedding_calls[0] == 2  # one pass fewer below the scope per meta step
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("layer.0." in n for n in moved)  # base steps train everything; only the meta step is scoped


def test_trainer_defaults_and_checks(tiny, tmp_path):
    trainer = _tartan_trainer(tiny, tmp_path)
    model = trainer.model
    assert isinstance(trainer.objective, TartanObjective) and isinstance(trainer.meta_model, AuxWeightNet)
    assert trainer.meta_model.loss_scale == pytest.approx(model.uniform_mlm_loss())
    assert trainer.label_names == ["labels"]
    with pytest.raises(ValueError, match="meta_weight_normalize_by_class.*set it to False"):
        _tartan_trainer(tiny, tmp_path, meta_weight_normalize_by_class=True)
    with pytest.raises(ValueError, match="meta_objective='reweight'"):
        _tartan_trainer(tiny, tmp_path, meta_objective="correct")


def test_weight_statistics_match_a_hand_computation(tiny, tmp_path):
    """The per-auxiliary-example weights the trainer keeps (WeightHistory by aux_index) are the mean of the weights
    each example got in the base steps it was drawn in (perturbed passes not counted)."""
    torch.manual_seed(3)
    net = AuxWeightNet(num_sources=2, loss_scale=tiny[0].uniform_mlm_loss())
    torch.nn.init.normal_(net.net[2].weight)  # weights that differ between examples
    trainer = _tartan_trainer(tiny, tmp_path, max_steps=6, unroll_steps=2, meta_model=net)
    objective, drawn = trainer.objective, []
    pending: list = []
    base_losses = objective.base_losses

    def recording_base_losses(model, inputs):
        examples, loss = base_losses(model, inputs)
        pending.append(examples.example_ids.tolist())
        return examples, loss

    def record(module, args, output):
        if pending:  # the next weighting-net call after a base forward is the base step's
            drawn.append((pending.pop(), output.detach().tolist()))

    objective.base_losses = recording_base_losses
    net.register_forward_hook(record)
    trainer.train()
    assert len(drawn) == 6 and trainer.meta_step_count == 3
    sums, counts = defaultdict(float), defaultdict(int)
    for ids, weights in drawn:
        for i, w in zip(ids, weights):
            sums[i] += w
            counts[i] += 1
    means = trainer.example_weight_means()
    totals = trainer.weight_history.totals()[1]
    n_aux = len(tiny[3].dataset)
    for i in range(n_aux):
        assert totals[i] == counts.get(i, 0)
        if counts.get(i):
            assert means[i].item() == pytest.approx(sums[i] / counts[i], rel=1e-6)
        else:
            assert math.isnan(means[i].item())
    assert len(set(round(w, 6) for _, ws in drawn for w in ws)) > 1  # the check is not vacuous
    report = trainer.aux_weight_report(tiny[3].dataset)
    assert [r["aux_index"] for r in report] == list(range(n_aux))
    for r in report:
        assert r["times_drawn"] == counts.get(r["aux_index"], 0)
        if r["times_drawn"]:
            assert r["train_mean_weight"] == pytest.approx(sums[r["aux_index"]] / r["times_drawn"], rel=1e-6)
        else:
            assert r["train_mean_weight"] is None


def test_trainer_saves_multitask_model_and_weighting_net(tiny, tmp_path):
    trainer = _tartan_trainer(tiny, tmp_path, max_steps=2, unroll_steps=1)
    trainer.train()
    assert trainer.meta_step_count == 2
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    reloaded = TartanMultitaskModel.from_pretrained(out)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    net = load_meta_model(os.path.join(out, "sama_meta_model"))
    assert isinstance(net, AuxWeightNet)
    assert (net.num_sources, net.loss_scale) == (2, trainer.meta_model.loss_scale)
    for key, value in trainer.meta_model.state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key


class _StateAtTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state_dict = {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_loads_the_checkpoint_weights(tiny, tmp_path):
    first = _tartan_trainer(tiny, tmp_path, max_steps=4, unroll_steps=1, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = str(tmp_path / "checkpoint-2")
    expected = TartanMultitaskModel.from_pretrained(checkpoint).state_dict()
    assert any(not torch.equal(v, first.model.state_dict()[k]) for k, v in expected.items())  # step 2 != step 4
    at_begin = _StateAtTrainBegin()
    resumed = _tartan_trainer(tiny, tmp_path, max_steps=4, unroll_steps=1, callbacks=[at_begin])
    with torch.no_grad():
        for p in resumed.model.parameters():
            p.zero_()  # only the checkpoint's weights can make it equal
    resumed.train(resume_from_checkpoint=checkpoint)
    for key, value in at_begin.state_dict.items():
        assert torch.equal(value, expected[key]), key
    assert resumed.model.lm_head.decoder.weight is resumed.model.encoder.get_input_embeddings().weight
    assert resumed.state.global_step == 4 and resumed.meta_step_count == 4  # the meta counters came back too


def test_fixed_weight_trainer_adds_the_weighted_mlm_loss(tiny, tmp_path):
    model, tokenizer, data, aux, _ = tiny
    model = copy.deepcopy(model).train()
    batch = _batch(tiny, n=6)
    model_inputs = {k: v for k, v in batch.items() if k not in ("aux_index", "aux_source")}
    torch.manual_seed(5)  # the same dropout masks in every forward below
    expected = model(**model_inputs)
    for weight in (0.0, 0.5):
        trainer = TartanMTTrainer(
            model=model, args=_config(tmp_path), train_dataset=PairedDataset(data["train"], aux.dataset),
            data_collator=TartanCollator(tokenizer), aux_weight=weight,
        )  # fmt: skip
        torch.manual_seed(5)
        loss = trainer.compute_loss(model, dict(batch))
        torch.testing.assert_close(loss, expected.loss + weight * expected.mlm_losses.mean())
    model.eval()
    end_task = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**end_task).loss)  # evaluation


# ----------------------------------------------------------------------------------------------------------------
# recipe


def _run(task_dir: str, tmp_path, method: str, steps: int, **extra):
    argv = [
        "--task", "toy", "--task_dir", task_dir, "--method", method, "--model_name_or_path", TINY_ROBERTA,
        "--max_seq_length", str(MAX_LENGTH), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--unroll_steps", "2", "--learning_rate", "1e-3",
        "--meta_learning_rate", "1e-2", "--sama_alpha", "0.3", "--output_dir", str(tmp_path / "{method}"),
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--seed", "1",
    ]  # fmt: skip
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    args, training_args = recipe.parse_args(argv)
    return recipe.main(args, training_args), training_args.output_dir


def _card_metadata(path: str) -> dict:
    import yaml

    with open(path) as f:
        text = f.read()
    return yaml.safe_load(text.split("---\n")[1]), text


def test_end_to_end_sama_writes_results_weights_card_and_model(task_dir, tmp_path):
    results, out = _run(task_dir, tmp_path, "sama", steps=6, logging_steps=2)
    assert out == str(tmp_path / "sama")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("method", "task", "seed", "metric", "dev_score", "test_score"):
        assert saved[key] == results[key]
    assert saved["method"] == "sama" and saved["seed"] == 1 and saved["metric"] == "macro_f1"
    assert saved["meta_steps"] == 3 and saved["labels"] == ["A", "B", "C", "D"]
    assert 0 < saved["train_cpu_s"] <= saved["cpu_time_s"]  # the training's share of the run's CPU time
    steps = [e["step"] for e in saved["weight_trajectory"]]
    assert steps == [2, 4, 6]
    assert all(0 < e["weight_min"] <= e["weight_mean"] <= e["weight_max"] < 2 for e in saved["weight_trajectory"])
    with open(os.path.join(out, "aux_weights.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == saved["n_aux"]
    assert sum(r["times_drawn"] for r in rows) == 6 * 4
    assert all(r["final_weight"] > 0 for r in rows)
    assert len({round(r["final_weight"], 6) for r in rows}) > 1  # the meta net moved away from its constant init
    by_source = saved["aux_weights"]
    assert {s: v["n"] for s, v in by_source.items() if s != "all"} == dict(Counter(r["source"] for r in rows))
    meta, card = _card_metadata(os.path.join(out, "README.md"))
    assert meta["datasets"] == ["toy"] and {"sama", "tartan"} <= set(meta["tags"])
    assert "base_model" not in meta and "randomly initialised" in card  # the tiny model is built from a config
    [entry] = meta["model-index"]
    test = [r for r in entry["results"] if r["dataset"]["split"] == "test"]
    assert test[0]["metrics"][0] == {"type": "macro_f1", "value": saved["test_score"]}
    assert "## Training with SAMA" in card and "## End-task-aware training (TARTAN)" in card
    clf = AutoModelForSequenceClassification.from_pretrained(out)  # the classifier is a plain HF model
    assert clf.config.num_labels == 4 and clf.config.id2label[3] == "D"
    assert saved["aux_loss_scale"] == pytest.approx(math.log(clf.get_input_embeddings().num_embeddings))
    assert isinstance(load_meta_model(os.path.join(out, "sama_meta_model")), AuxWeightNet)


def test_end_to_end_sama_with_head_warm_up_and_small_initial_weight(task_dir, tmp_path):
    extra = dict(save_final_model="false", aux_init_weight=0.1, mlm_head_warmup_steps=3, meta_learning_rate=1e-7)
    results, out = _run(task_dir, tmp_path, "sama", steps=2, **extra)
    assert results["mlm_head_warmup"]["steps"] == 3
    with open(os.path.join(out, "aux_weights.jsonl")) as f:
        weights = [json.loads(line)["final_weight"] for line in f]
    assert all(abs(w - 0.1) < 1e-3 for w in weights)  # the start the flag asked for (a tiny meta lr)


@pytest.mark.parametrize("method", ["finetune", "tartan_mt"])
def test_end_to_end_baselines(task_dir, tmp_path, method):
    results, out = _run(task_dir, tmp_path, method, steps=2, save_final_model="false")
    assert results["method"] == method and 0.0 <= results["test_score"] <= 1.0
    assert (results["n_aux"] == 0) == (method == "finetune")
    assert os.path.isfile(os.path.join(out, "results.json"))
    meta, card = _card_metadata(os.path.join(out, "README.md"))
    assert "tartan" in meta["tags"] and "sama" not in meta["tags"] and "## Training with SAMA" not in card
    assert ("TARTAN-MT" in card) == (method == "tartan_mt")
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not os.path.isfile(os.path.join(out, "aux_weights.jsonl"))


def test_configs_parse_and_cli_overrides(tmp_path):
    configs = os.path.join(ROOT, "recipes", "configs")
    for task in recipe.TASKS:
        path = os.path.join(configs, f"tartan_{task}.yaml")
        args, training_args = recipe.parse_args(["--config", path, "--output_dir", str(tmp_path)])
        assert args.task == task and training_args.learning_rate == 2e-5 and training_args.unroll_steps == 10
        assert training_args.sama_alpha == 0.3 and training_args.meta_learning_rate == 1e-5
        assert args.base_model == "roberta-base"
    cpu = os.path.join(configs, "tartan_cpu.yaml")
    argv = ["--config", os.path.join(configs, "tartan_sciie.yaml"), "--config", cpu, "--seed", "7"]
    args, training_args = recipe.parse_args([*argv, "--method", "finetune"])
    assert args.task == "sciie" and args.method == "finetune" and training_args.seed == 7
    assert args.num_hidden_layers == 3 and training_args.max_steps == 200 and training_args.meta_batch_size == 64
    assert args.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert training_args.output_dir.endswith(os.path.join("sciie", "finetune", "seed7"))
    with pytest.raises(ValueError, match="unknown option"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("no_such_option: 1\n")
        recipe.parse_args(["--config", str(bad)])


def test_local_model_folder_needs_a_base_model_for_the_card(tmp_path):
    with pytest.raises(ValueError, match="--base_model"):
        recipe.TartanArguments(model_name_or_path=str(tmp_path))
    args = recipe.TartanArguments(model_name_or_path=str(tmp_path), base_model="org/model")
    assert args.base_model == "org/model"
    with pytest.raises(ValueError, match="aux_init_weight"):
        recipe.TartanArguments(aux_init_weight=2.0)


def test_table_driver_aggregates(tmp_path):
    table = _load_recipe("tartan_table")
    for task, metric in (("chemprot", "micro_f1"), ("sciie", "macro_f1")):
        for method, base in (("finetune", 0.5), ("sama", 0.6)):
            for seed in range(3):
                out = table.run_dir(str(tmp_path), task, method, seed)
                os.makedirs(out)
                score = base + 0.01 * seed
                result = {"task": task, "method": method, "seed": seed, "metric": metric, "model": "/local/m"}
                result.update(base_model="org/m", args={"num_hidden_layers": 3})
                result.update(test_score=score, dev_score=score, cpu_time_s=1.0, runtime_s=2.0)
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(result, f)
    text = table.write_table(str(tmp_path))
    assert "Model: `org/m` (first 3 layers)" in text and "/local/m" not in text
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


def test_task_scores_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    from sama_trainer.tartan import classification_scores

    rng = np.random.default_rng(0)
    for classes in (2, 6):
        labels = rng.integers(0, classes, 300)
        logits = rng.normal(size=(300, classes + 1))  # some predictions fall on a class absent from the labels
        preds = logits.argmax(-1)
        scores = classification_scores(logits, labels)
        assert scores["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
        assert scores["micro_f1"] == pytest.approx(f1_score(labels, preds, average="micro"))
        assert scores["accuracy"] == pytest.approx(accuracy_score(labels, preds))
