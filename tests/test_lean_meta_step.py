"""The lean meta step's memory layout: du/dg on a few rows, embedding tables formed in their hook, compact buffers.

Every shortcut must give the same numbers as the allocating path (``consume_grads=False``), bit for bit where the
arithmetic is the same.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import count_draw_recorders

from sama_trainer import MetaWeightNet, adaptation_diagonal, meta_gradient
from sama_trainer.adaptation import adaptation_diagonal_into_, adaptation_diagonal_rows
from sama_trainer.meta_gradient import core


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),  # per-tensor rule
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),  # per-tensor rule
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_du_dg_on_rows_equals_those_rows_of_the_whole_diagonal(name):
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 6, generator=gen))
    opt = OPTIMIZERS[name]([table])
    for _ in range(3):
        table.grad = torch.randn(50, 6, generator=gen)
        opt.step()
    whole = adaptation_diagonal_into_(opt, [table], [table.grad], [torch.empty_like(table)])[0]
    rows = torch.tensor([3, 0, 41, 17])
    got = adaptation_diagonal_rows(opt, table, table.grad[rows], rows)
    assert torch.equal(got, whole[rows])  # the same rule (multi-tensor or per-tensor) on the same elements
    per_tensor = adaptation_diagonal(opt, [table], [table.grad])[0]
    torch.testing.assert_close(got, per_tensor[rows], rtol=1e-5, atol=1e-8)  # float32 rounding of the foreach form


def table_problem(table_rows: int, opt_name: str = "adamw"):
    """Embedding table + linear head; the base batch and the meta batch each touch a few rows of the table."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.Parameter(torch.randn(table_rows, 8, generator=gen) * 0.5)
    head = torch.nn.Parameter(torch.randn(8, 3, generator=gen) * 0.5)
    tokens = torch.randint(0, table_rows, (16, 4), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)
    meta_tokens = torch.randint(0, table_rows, (8, 4), generator=gen)
    meta_labels = torch.randint(0, 3, (8,), generator=gen)
    torch.manual_seed(0)
    net = MetaWeightNet(hidden_size=8)
    params = [emb, head]

    def logits_of(ids):
        return F.embedding(ids, emb).mean(1) @ head

    def base_loss():
        losses = F.cross_entropy(logits_of(tokens), labels, reduction="none")
        return (net(losses.detach()) * losses).mean()

    def meta_loss():
        return F.cross_entropy(logits_of(meta_tokens), meta_labels)

    opt = OPTIMIZERS[opt_name](params)
    for _ in range(3):
        opt.zero_grad()
        base_loss().backward()
        opt.step()
    return params, list(net.parameters()), base_loss, meta_loss, opt


@pytest.mark.parametrize("method", ["sama", "sama-na"])
@pytest.mark.parametrize("opt_name", ["adamw", "adam_l2"])
def test_embedding_table_formed_in_its_hook_gives_the_same_meta_gradient(method, opt_name, monkeypatch):
    monkeypatch.setattr(core, "TABLE_MIN_ROWS", 64)
    results, seen = [], {}
    for consume in (False, True):
        params, lam, base_loss, meta_loss, opt = table_problem(200, opt_name)
        grads = [p.grad for p in params]
        assert 0 < len(core._nonzero_rows(grads[0])) <= 100  # the table's gradient is row-sparse
        last = grads if consume else [g.clone() for g in grads]

        def watched_meta_loss(grads=grads, consume=consume, meta_loss=meta_loss):
            if consume:  # during the meta forward: the table's buffer holds no memory
                seen["table_bytes"] = grads[0].untyped_storage().nbytes()
                seen["head_bytes"] = grads[1].untyped_storage().nbytes()
            return meta_loss()

        out = meta_gradient(
            method, params, lam, base_loss, watched_meta_loss, optimizer=opt, last_grads=last, alpha=0.3,
            restore=True, consume_grads=consume,
        )  # fmt: skip
        assert not out.skipped
        results.append((out, [b.clone() for b in last]))
    (ref, _), (got, buffers) = results
    assert seen["table_bytes"] == 0
    assert (seen["head_bytes"] == 0) == (method == "sama-na")  # u = v: no buffer needs memory before the backward
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # same arithmetic on every non-zero entry of u
    assert got.stats["u_norm"] == ref.stats["u_norm"] > 0
    # u lives in the buffers afterwards, zero outside the rows the meta batch touched
    params, lam, base_loss, meta_loss, opt = table_problem(200, opt_name)
    meta_rows = core._nonzero_rows(torch.autograd.grad(meta_loss(), params[0])[0])
    assert torch.equal(core._nonzero_rows(buffers[0]), meta_rows)


def test_buffers_get_their_storage_back_when_the_meta_loss_raises(monkeypatch):
    monkeypatch.setattr(core, "TABLE_MIN_ROWS", 64)
    params, lam, base_loss, _, opt = table_problem(200)
    grads = [p.grad for p in params]

    def failing_meta_loss():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        meta_gradient(
            "sama", params, lam, base_loss, failing_meta_loss, optimizer=opt, last_grads=grads, consume_grads=True
        )
    for g, p in zip(grads, params):
        assert g.shape == p.shape and g.untyped_storage().nbytes() == p.numel() * p.element_size()
        g.add_(1.0)  # usable


def test_buffers_that_hold_du_dg_through_the_meta_forward_share_one_block():
    params, lam, base_loss, meta_loss, opt = table_problem(40)  # below TABLE_MIN_ROWS: both hold du/dg
    grads = [p.grad for p in params]
    before = {g.untyped_storage().data_ptr() for g in grads}
    out = meta_gradient(
        "sama", params, lam, base_loss, meta_loss, optimizer=opt, last_grads=grads, consume_grads=True, alpha=0.3
    )
    assert not out.skipped
    after = {g.untyped_storage().data_ptr() for g in grads}
    assert len(before) == 2 and len(after) == 1


def _manual_difference(params, direction, eps, lam, base_loss):
    """The central difference with both passes drawn from the same RNG state, by hand."""
    grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=sign * eps)
        with torch.random.fork_rng(devices=[]):
            grads.append(torch.autograd.grad(base_loss(), lam))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(d, alpha=sign * eps)
    return [(a - b) / (2 * eps) for a, b in zip(*grads)]


@pytest.mark.parametrize("draw", ["dropout", "theta_dependent", "count_changes"])
def test_second_perturbed_pass_replays_the_first_pass_draws_exactly(draw, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    theta = torch.nn.Parameter(torch.randn(6, 3, generator=gen))
    lam = torch.nn.Parameter(torch.randn(3, generator=gen))
    x = torch.randn(32, 6, generator=gen)
    direction = [torch.randn(6, 3, generator=gen).abs()]  # Σd > 0: θ + εd has the larger sum
    start_sum = theta.detach().sum()

    def base_loss():
        h = x @ theta
        if draw == "dropout":
            h = F.dropout(h, p=0.3, training=True) + F.dropout(h, p=0.1, training=True)
        elif draw == "theta_dependent":  # drawn with probabilities that depend on θ: must not be replayed
            h = h * torch.bernoulli(torch.sigmoid(h))
        elif draw == "count_changes":  # one more draw at θ - εd than at θ + εd: the replay runs out
            h = F.dropout(h, p=0.3, training=True)
            if theta.sum() < start_sum:
                h = F.dropout(h, p=0.5, training=True)
        return ((h - lam) ** 2).mean()

    replayed, mismatches = [], []

    class Spy(core._RandomDraws):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self._replay is not None and torch.Tag.nondeterministic_seeded in func.tags:
                replayed.append(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    class Mismatch(core._ReplayMismatch):
        def __init__(self, *args):
            mismatches.append(args)
            super().__init__(*args)

    monkeypatch.setattr(core, "_RandomDraws", Spy)
    monkeypatch.setattr(core, "_ReplayMismatch", Mismatch)
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    perturbation = core.Perturbation([theta], direction, eps=0.05)
    got = perturbation.difference([lam], base_loss)
    perturbation.restore()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left as it was
    expected = _manual_difference([theta], direction, 0.05, [lam], base_loss)
    assert torch.equal(got[0], expected[0])
    bernoulli = torch.ops.aten.bernoulli_.float
    assert replayed == {"dropout": [bernoulli] * 2, "theta_dependent": [], "count_changes": [bernoulli] * 2}[draw]
    assert len(mismatches) == (draw == "count_changes")  # ... and the second pass was drawn again


def test_without_the_draw_replay_both_passes_draw_the_same_masks_and_nothing_intercepts_them(monkeypatch):
    """``replay_draws=False``: no recorder; the second pass draws its masks again from the same RNG state."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.nn.Parameter(torch.randn(6, 3, generator=gen))
    lam = torch.nn.Parameter(torch.randn(3, generator=gen))
    x = torch.randn(32, 6, generator=gen)
    direction = [torch.randn(6, 3, generator=gen)]

    def base_loss():
        return ((F.dropout(x @ theta, p=0.3, training=True) - lam) ** 2).mean()

    recorders = count_draw_recorders(monkeypatch)
    results = {}
    for replay in (True, False):
        torch.manual_seed(7)
        rng_before = torch.get_rng_state()
        perturbation = core.Perturbation([theta], direction, eps=0.05)
        results[replay] = perturbation.difference([lam], base_loss, replay_draws=replay)[0]
        perturbation.restore()
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert len(recorders) == 1  # only the replaying call made one
    assert torch.equal(results[True], results[False])
    assert torch.equal(results[False], _manual_difference([theta], direction, 0.05, [lam], base_loss)[0])
    torch.manual_seed(8)  # other masks: another value, so the equalities above compare the masks' effect
    perturbation = core.Perturbation([theta], direction, eps=0.05)
    assert not torch.equal(perturbation.difference([lam], base_loss, replay_draws=False)[0], results[False])
    perturbation.restore()
