"""Meta networks as plain modules: closed forms at initialisation and invariants for any parameters."""

import math

import pytest
import torch
import torch.nn.functional as F

from sama_trainer import BootstrapCorrectionNet, LabelCorrectionNet


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _batch(seed: int = 0, batch: int = 32, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=gen) * 3.0, torch.randint(0, classes, (batch,), generator=gen)


def test_bootstrap_at_init_is_the_closed_form_mix():
    logits, labels = _batch()
    net = BootstrapCorrectionNet(5, hidden_size=8, label_prior=2.0)
    beta = 1.0 / (1.0 + math.exp(2.0))  # zero-initialised output layer: β = sigmoid(-label_prior)
    expected = (1 - beta) * F.one_hot(labels, 5).float() + beta * F.softmax(logits, dim=-1)
    torch.testing.assert_close(net(logits, labels), expected)
    torch.testing.assert_close(net.mixing(logits, labels), torch.full((32,), beta))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_only_moves_labels_towards_the_models_prediction(seed):
    logits, labels = _batch(seed)
    net = BootstrapCorrectionNet(5, hidden_size=8)
    _randomise(net, seed)
    out, beta = net(logits, labels), net.mixing(logits, labels)
    assert beta.min() > 0.01 and beta.max() < 0.99 and beta.std() > 0.01  # per-example mixes: the check bites
    torch.testing.assert_close(out.sum(-1), torch.ones(32))
    probs = F.softmax(logits, dim=-1)
    off_label = ~F.one_hot(labels, 5).bool()
    # every class other than the given one gets exactly β times the model's probability: no other mass can appear
    torch.testing.assert_close(out[off_label], (beta.unsqueeze(-1) * probs)[off_label])

    hard = BootstrapCorrectionNet(5, hidden_size=8, hard_prediction=True)
    hard.load_state_dict(net.state_dict())
    support = F.one_hot(labels, 5).bool() | F.one_hot(probs.argmax(-1), 5).bool()
    out_hard = hard(logits, labels)
    assert torch.all(out_hard[~support] == 0)  # only the given label and the predicted class carry mass
    torch.testing.assert_close(out_hard.sum(-1), torch.ones(32))


def test_bootstrap_soft_labels_and_gradient_reaches_every_parameter():
    logits, labels = _batch()
    soft = F.one_hot(labels, 5).float() * 0.7 + 0.3 / 5
    net = BootstrapCorrectionNet(5, hidden_size=8)
    _randomise(net)
    out = net(logits, soft)
    beta = net.mixing(logits, soft).unsqueeze(-1)
    torch.testing.assert_close(out, (1 - beta) * soft + beta * F.softmax(logits, dim=-1))
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bootstrap_rejects_one_class():
    with pytest.raises(ValueError, match="num_labels >= 2"):
        BootstrapCorrectionNet(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_correction_with_half_noisy_mix_never_flips_the_class(seed):
    logits, labels = _batch(seed, classes=6)
    net = LabelCorrectionNet(6, hidden_size=8, mix_noisy=0.5)
    _randomise(net, seed)
    with torch.no_grad():
        net.net[2].bias.copy_(torch.linspace(-20.0, 20.0, 6))  # the MLP alone would relabel every row as class 5
        net.label_logit.fill_(-5.0)
    out = net(logits, labels)
    unmixed = (out - 0.5 * F.one_hot(labels, 6).float()) / 0.5
    assert (unmixed.argmax(-1) == 5).float().mean() > 0.9  # so the check below bites
    torch.testing.assert_close(out.sum(-1), torch.ones(32))
    assert torch.equal(out.argmax(-1), labels)  # more than half the mass stays on the given label
