"""SAMATrainer under gradient accumulation, gradient checkpointing, PEFT/LoRA and mixed precision."""

import importlib
import math

import pytest
import torch
from helpers import sama_args, tiny_bert, train_and_meta

from sama_trainer import ClassificationObjective, SAMATrainer
from sama_trainer.adaptation import adaptation_diagonal
from sama_trainer.losses import per_example_cross_entropy


def make_args(tmp_path, **overrides):
    defaults = dict(meta_batch_size=8, max_steps=8, meta_objective="reweight+correct")
    return sama_args(tmp_path / "out", **{**defaults, **overrides})


def datasets():
    return train_and_meta()


def trained(tmp_path, model=None, **overrides):
    train, meta = datasets()
    trainer = SAMATrainer(model or tiny_bert(dropout=0.0), make_args(tmp_path, **overrides), train, meta)
    trainer.train()
    return trainer


def assert_close_params(a, b, rtol=1e-4, atol=2e-4):
    # Adam normalises per element, so float32 round-off in near-zero gradients can move a weight by ~lr·1e-1
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=n)


def test_gradient_accumulation_gives_the_same_meta_gradient_and_trajectory(tmp_path):
    ref = trained(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    for pdb, gas in [(4, 2), (2, 4)]:
        other = trained(tmp_path, per_device_train_batch_size=pdb, gradient_accumulation_steps=gas)
        assert other.meta_step_count == ref.meta_step_count == 4
        for g_ref, g in zip(ref.last_meta_gradients, other.last_meta_gradients):
            torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-7)
        assert_close_params(ref.model, other.model)
        assert_close_params(ref.meta_model, other.meta_model)
        ref_loss = [h["loss"] for h in ref.state.log_history if "loss" in h]
        loss = [h["loss"] for h in other.state.log_history if "loss" in h]
        assert loss == pytest.approx(ref_loss, rel=1e-4)  # the logged loss is not inflated by GA


def test_gradient_checkpointing_gives_the_same_meta_gradient(tmp_path):
    ref = trained(tmp_path)
    ckpt = trained(tmp_path, gradient_checkpointing=True)
    assert ckpt.model.is_gradient_checkpointing
    for g_ref, g in zip(ref.last_meta_gradients, ckpt.last_meta_gradients):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-8)
    assert_close_params(ref.model, ckpt.model)


def test_bf16_autocast_meta_gradient_close_to_fp32(tmp_path):
    ref = trained(tmp_path, max_steps=2)
    bf16 = trained(tmp_path, max_steps=2, bf16=True)
    a = torch.cat([g.flatten() for g in ref.last_meta_gradients])
    b = torch.cat([g.flatten() for g in bf16.last_meta_gradients])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).norm() / a.norm()).item()
    # documented tolerance (README, "Mixed precision"): cosine >= 0.95 and relative error <= 0.3 on this model
    assert cos >= 0.95 and rel <= 0.3, (cos, rel)
    assert all(torch.isfinite(p).all() for p in bf16.model.parameters())


def test_skipped_base_step_skips_the_meta_step(tmp_path, monkeypatch):
    """An fp16 grad-scaler overflow skips the optimizer step; the meta step must be skipped too (and logged)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    trainer = trained(tmp_path, max_steps=4)
    assert trainer.meta_step_count == trainer.meta_steps_skipped == 2
    assert trainer.skip_reasons == {"base_step_skipped": 2}
    assert [h["meta/skipped_steps"] for h in trainer.state.log_history if "loss" in h] == [2.0]


def test_overflowing_meta_loss_is_skipped_and_leaves_everything_finite(tmp_path):
    class Overflow(ClassificationObjective):
        def meta_loss(self, model, inputs):
            return super().meta_loss(model, inputs) * float("inf")

    train, meta = datasets()
    args = make_args(tmp_path, max_steps=4)
    trainer = SAMATrainer(tiny_bert(), args, train, meta, objective=Overflow.from_config(args))
    meta_before = {n: p.detach().clone() for n, p in trainer.meta_model.named_parameters()}
    trainer.train()
    assert trainer.meta_steps_skipped == 2 and trainer.meta_step_count == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.equal(meta_before[n], p) for n, p in trainer.meta_model.named_parameters())


# ------------------------------------------------------------------------------------------------------------
# PEFT / LoRA


def lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])


def test_lora_only_adapters_are_theta_and_frozen_weights_stay_bit_identical(tmp_path):
    train, meta = datasets()
    model = tiny_bert(dropout=0.0)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SAMATrainer(model, make_args(tmp_path, max_steps=6), train, meta, peft_config=lora_config())
    theta = trainer._base_params()
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert len(theta) == len(names)
    trainer.train()
    assert trainer.meta_step_count == 3
    for n, p in trainer.model.named_parameters():
        if not p.requires_grad:
            base_name = n.replace("base_model.model.", "").replace(".base_layer", "")
            base_name = base_name.replace("classifier.original_module", "classifier")
            assert torch.equal(p, frozen_before[base_name]), n


def test_lora_meta_gradient_equals_manual_computation_on_adapter_params(tmp_path):
    """Re-derive one SAMA meta-gradient by hand (autograd for v, closed-form Adam du/dg, explicit ±εu passes)."""
    captured = {}

    class Capture(SAMATrainer):
        def meta_step(self, base_batches):
            params = self._base_params()
            captured["theta"] = [p.detach().clone() for p in params]
            captured["grads"] = [p.grad.detach().clone() for p in params]
            captured["batches"] = base_batches
            captured["meta_state"] = {k: v.clone() for k, v in self.meta_model.state_dict().items()}
            captured["lr"] = [group["lr"] for group in self.optimizer.param_groups]
            super().meta_step(base_batches)

    train, meta = datasets()
    args = make_args(tmp_path, max_steps=2, meta_objective="reweight", sama_base_update=False, meta_batch_size=16)
    trainer = Capture(tiny_bert(dropout=0.0), args, train, meta, peft_config=lora_config())
    trainer.train()
    got = trainer.last_meta_gradients

    model, net = trainer.model, trainer.meta_model
    net.load_state_dict(captured["meta_state"])
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, t in zip(params, captured["theta"]):
            p.copy_(t)
    meta_inputs = {k: torch.tensor(meta[k]) for k in ("input_ids", "attention_mask", "labels")}  # the whole set
    labels = meta_inputs.pop("labels")
    v = torch.autograd.grad(per_example_cross_entropy(model(**meta_inputs).logits, labels).mean(), params)
    for group, lr in zip(trainer.optimizer.param_groups, captured["lr"]):  # the lr of the step that was taken
        group["lr"] = lr
    diag = adaptation_diagonal(trainer.optimizer, params, captured["grads"])
    u = [d * vi for d, vi in zip(diag, v)]
    eps = 1.0 / math.sqrt(sum((x**2).sum().item() for x in u))

    def weighted_loss_grad(sign):
        with torch.no_grad():
            for p, t, ui in zip(params, captured["theta"], u):
                p.copy_(t + sign * eps * ui)
        total = 0.0
        for batch in captured["batches"]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                losses = per_example_cross_entropy(model(**inputs).logits, batch["labels"])
            total = total + (net(losses) * losses).mean()
        return torch.autograd.grad(total / len(captured["batches"]), list(net.parameters()))

    manual = [-(gp - gm) / (2 * eps) for gp, gm in zip(weighted_loss_grad(+1), weighted_loss_grad(-1))]
    for a, b in zip(got, manual):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("base_update", [True, False])
def test_lean_meta_step_matches_the_allocating_one(tmp_path, monkeypatch, base_update):
    """The trainer forms u in the consumed gradient buffers (and, with the base update, keeps no θ copy); turning
    that off with meta_gradient_kwargs must not change the training run beyond float32 rounding."""
    core = importlib.import_module("sama_trainer.meta_gradient.sama")  # where the SAMA methods look it up

    calls = []
    original = core.adapted_meta_loss_gradients

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    kw = dict(sama_base_update=base_update, meta_objective="reweight")
    monkeypatch.setattr(core, "adapted_meta_loss_gradients", spy)
    lean = trained(tmp_path, **kw)
    assert len(calls) == 4  # the trainer really took the lean path on every meta step
    allocating = trained(tmp_path, meta_gradient_kwargs={"consume_grads": False}, **kw)
    assert len(calls) == 4  # ... and consume_grads=False really turns it off
    assert lean.meta_step_count == allocating.meta_step_count == 4
    if base_update:
        assert_close_params(lean.model, allocating.model, rtol=1e-5, atol=1e-6)
        assert_close_params(lean.meta_model, allocating.meta_model, rtol=1e-5, atol=1e-6)
    else:  # same arithmetic: bit-identical
        assert all(torch.equal(a, b) for a, b in zip(lean.model.parameters(), allocating.model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(lean.meta_model.parameters(), allocating.meta_model.parameters()))
