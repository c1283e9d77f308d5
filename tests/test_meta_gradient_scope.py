"""``meta_gradient_params``: the meta-gradient through a named subset of the base parameters only."""

import contextlib
import re

import pytest
import torch
from helpers import pad_batch, sama_args, tiny_bert, train_and_meta

from sama_trainer import SAMAConfig, SAMATrainer
from sama_trainer.meta_gradient import Perturbation, PrefixCache
from sama_trainer.meta_gradient.core import _RandomDraws
from sama_trainer.model_card import sama_card_section


TOP = r"encoder\.layer\.1\.|classifier"  # tiny_bert has two layers: the last one and the head


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_scoped_meta_steps_equal_those_of_a_model_frozen_outside_the_scope(tmp_path):
    # With a zero base learning rate θ moves only by the meta steps' base updates θ - εu (u = v for sama-na), so a
    # run scoped by name and a run with every other parameter frozen must take the same meta steps.
    train, meta = train_and_meta()
    common = dict(meta_gradient="sama-na", optim="sgd", learning_rate=0.0, max_steps=8, sama_alpha=0.5)

    frozen_model = tiny_bert()
    for name, p in frozen_model.named_parameters():
        p.requires_grad_(bool(re.search(TOP, name)))
    frozen = SAMATrainer(frozen_model, sama_args(tmp_path / "frozen", **common), train, meta)
    frozen.train()

    scoped = SAMATrainer(tiny_bert(), sama_args(tmp_path / "scoped", meta_gradient_params=TOP, **common), train, meta)
    before, meta_before = _snapshot(scoped.model), _snapshot(scoped.meta_model)
    scoped.train()

    assert scoped.meta_step_count == frozen.meta_step_count == 4 and scoped.meta_steps_skipped == 0
    moved = [n for n, p in scoped.model.named_parameters() if not torch.equal(before[n], p)]
    assert moved and all(re.search(TOP, n) for n in moved)  # the base updates touch the scope only
    for (name, a), b in zip(scoped.model.named_parameters(), frozen.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(scoped.meta_model.parameters(), frozen.meta_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(meta_before[n], p) for n, p in scoped.meta_model.named_parameters())


@pytest.mark.parametrize("scope", [None, "classifier"])
def test_meta_backward_stops_at_the_scope(tmp_path, scope):
    # The saving: a scoped meta loss is not backpropagated into the layers below the scope.
    train, meta = train_and_meta()
    trainer = SAMATrainer(tiny_bert(), sama_args(tmp_path, meta_gradient_params=scope), train, meta)
    reached = []
    embeddings = trainer.model.bert.embeddings.word_embeddings.weight
    embeddings.register_hook(lambda grad: reached.append(1))
    trainer.train()
    base_steps, meta_steps = 12, trainer.meta_step_count
    assert meta_steps == 6
    assert len(reached) == base_steps + (meta_steps if scope is None else 0)


def test_a_pattern_that_is_not_a_regex_or_matches_nothing_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="not a regular expression.*pattern over parameter names"):
        SAMAConfig(output_dir=str(tmp_path), meta_gradient_params="layer.(5", report_to="none")
    train, meta = train_and_meta()
    with pytest.raises(ValueError, match="matches none of the model's trainable parameters.*classifier.bias"):
        SAMATrainer(tiny_bert(), sama_args(tmp_path, meta_gradient_params="decoder"), train, meta)


def _difference_at_top(model, batches, pass_cache=None, seed=0):
    """The finite difference of a per-example weighted loss along a random direction of the top parameters."""
    top = [p for n, p in model.named_parameters() if re.search(TOP, n)]
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen) for p in top]
    weights = torch.ones(sum(len(b["labels"]) for b in batches), requires_grad=True)

    def base_loss():
        losses, start = [], 0
        for batch in batches:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            losses.append(weights[start : start + len(ce)] * ce)
            start += len(ce)
        return torch.cat(losses).mean()

    torch.manual_seed(seed)  # the same dropout masks for every call
    perturbation = Perturbation(top, direction, 0.5)
    diff = perturbation.difference([weights], base_loss, True, pass_cache)
    perturbation.restore()
    return diff[0]


def _batches():
    train, _ = train_and_meta()
    return [pad_batch([train[i] for i in range(start, start + 8)]) for start in (0, 8)]


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


@pytest.mark.parametrize("replay_draws", [True, False])
def test_prefix_cache_reuses_the_lower_layers_and_keeps_the_difference(monkeypatch, replay_draws):
    if not replay_draws:  # the second pass draws its dropout masks again: the RNG must be set past the reused calls
        monkeypatch.setattr(_RandomDraws, "replaying", lambda self: contextlib.nullcontext())
    model, batches = tiny_bert(dropout=0.3).train(), _batches()
    lowest, top_layer = model.bert.embeddings.word_embeddings, model.bert.encoder.layer[1].attention.self.query
    lowest_calls, top_calls = _count_calls(lowest), _count_calls(top_layer)

    plain = _difference_at_top(model, batches)
    assert (len(lowest_calls), len(top_calls)) == (4, 4)  # 2 passes x 2 micro-batches

    cache = PrefixCache(model, [p for n, p in model.named_parameters() if re.search(TOP, n)])
    assert {type(m).__name__ for m in cache.candidates} >= {"BertEmbeddings", "BertLayer"}
    cached = _difference_at_top(model, batches, cache)
    assert (len(lowest_calls), len(top_calls)) == (4 + 2, 4 + 4)  # below the scope: the first pass only
    assert cache.reused_calls == 2 * 2  # the embeddings and layer 0, per micro-batch
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    assert plain.abs().sum() > 0


def test_prefix_cache_reuses_nothing_when_the_lowest_layer_is_perturbed():
    model, batches = tiny_bert().train(), _batches()
    cache = PrefixCache(model, list(model.parameters()))
    assert cache.candidates and all(not list(m.parameters()) for m in cache.candidates)  # dropouts, activations
    _difference_at_top(model, batches, cache)
    assert cache.reused_calls == 0


def test_scoped_training_with_and_without_the_prefix_cache_is_the_same(tmp_path):
    train, meta = train_and_meta()
    results, lowest_calls = [], []
    for name, kwargs in (("cached", None), ("uncached", {"pass_cache": None})):
        args = sama_args(tmp_path / name, meta_gradient_params=TOP, meta_gradient_kwargs=kwargs, max_steps=8)
        trainer = SAMATrainer(tiny_bert(), args, train, meta)
        lowest_calls.append(_count_calls(trainer.model.bert.embeddings.word_embeddings))
        trainer.train()
        results.append([*trainer.model.parameters(), *trainer.meta_model.parameters()])
    assert trainer.meta_step_count == 4
    assert len(lowest_calls[1]) - len(lowest_calls[0]) == 4  # one pass fewer below the scope per meta step
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_the_model_card_records_the_scope_in_one_table_cell(tmp_path):
    train, meta = train_and_meta()
    trainer = SAMATrainer(tiny_bert(), sama_args(tmp_path, meta_gradient_params=TOP), train, meta)
    rows = [line for line in sama_card_section(trainer).splitlines() if line.startswith("| `")]
    assert "| `meta_gradient_params` | `encoder\\.layer\\.1\\.\\|classifier` |" in rows
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 3 for row in rows)  # two cells per row, pipes escaped
