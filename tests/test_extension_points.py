"""Extension points: registering a meta-gradient method and a du/dg rule; the meta-batch stream's sharding, cycling,
length grouping and state."""

import pytest
import torch

from sama_trainer import (
    MetaGradients,
    adaptation,
    adaptation_diagonal,
    available_methods,
    meta_gradient,
    register_method,
)
from sama_trainer.adaptation import UnsupportedOptimizerError, register_adaptation
from sama_trainer.meta_data import MetaBatchStream
from sama_trainer.meta_gradient import local_agreement, registry


def test_register_method_makes_it_callable_by_name():
    calls = []

    @register_method("test-direct-only")
    def direct_only(base_params, meta_params, base_loss, meta_loss, *, optimizer=None, last_grads=None, **options):
        calls.append(options)
        loss = meta_loss()
        return MetaGradients(list(torch.autograd.grad(loss, meta_params)), {"meta_loss": float(loss.detach())})

    assert "test-direct-only" in available_methods()
    theta, lam = torch.nn.Parameter(torch.tensor([1.0])), torch.nn.Parameter(torch.tensor([2.0, 3.0]))
    out = meta_gradient("test-direct-only", [theta], [lam], lambda: theta.sum(), lambda: (lam**2).sum(), flag=1)
    torch.testing.assert_close(out[0], torch.tensor([4.0, 6.0]))
    assert calls == [{"flag": 1}] and not out.skipped

    seen = []

    def agree(grads, reason):  # a method that does not agree itself is agreed on by meta_gradient
        seen.append(reason)
        return local_agreement(grads, reason)

    meta_gradient("test-direct-only", [theta], [lam], lambda: theta.sum(), lambda: (lam**2).sum(), agree=agree)
    assert seen == [None]
    registry._METHODS.pop("test-direct-only")


def test_register_adaptation_is_used_for_the_class_and_its_subclasses():
    class Halving(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-group["lr"] / 2)

    class SubHalving(Halving):
        pass

    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(UnsupportedOptimizerError, match="Halving"):
        adaptation_diagonal(Halving([p]), [p], [torch.ones(3)])

    @register_adaptation(Halving)
    def halving_rule(param, grad, group, state, bias_correction):
        return group["lr"] / 2  # θ ← θ - lr/2·g: du/dg = lr/2

    try:
        for cls in (Halving, SubHalving):
            (diag,) = adaptation_diagonal(cls([p], lr=0.4), [p], [torch.ones(3)])
            torch.testing.assert_close(diag, torch.full((3,), 0.2))
    finally:
        adaptation._RULES.pop(Halving)  # keep the error messages of other tests as they are


def _stream(n=10, batch=3, world=1, rank=0, seed=0, **kw):
    return MetaBatchStream(list(range(n)), batch, lambda xs: list(xs), seed=seed, rank=rank, world_size=world, **kw)


def test_meta_batches_cycle_through_shuffled_epochs():
    stream = _stream(n=10, batch=3)
    epoch0 = [stream.next_batch() for _ in range(3)]  # 9 of 10 examples; the tail starts the next epoch
    assert all(len(b) == 3 for b in epoch0) and len({x for b in epoch0 for x in b}) == 9
    epoch1 = [stream.next_batch() for _ in range(3)]
    assert stream.state_dict() == {"epoch": 1, "position": 9}
    assert epoch0 != epoch1  # reshuffled
    assert [x for b in epoch0 for x in b] != list(range(9))


def test_ranks_take_disjoint_shards_of_the_same_order():
    streams = [_stream(n=12, batch=2, world=3, rank=r) for r in range(3)]
    for _ in range(2):  # two batches per rank = one epoch of 12
        batches = [s.next_batch() for s in streams]
        assert len({x for b in batches for x in b}) == 6
    seen = set()
    for s in streams:
        s.load_state_dict({"epoch": 0, "position": 0})
        seen |= {x for _ in range(2) for x in s.next_batch()}
    assert seen == set(range(12))
    uneven = [_stream(n=5, batch=3, world=2, rank=r) for r in range(2)]  # padded by wrapping, as DistributedSampler
    assert [len(s.next_batch()) for s in uneven] == [3, 3]


def test_state_dict_resumes_the_exact_sequence():
    full = _stream(n=7, batch=2, seed=3)
    expected = [full.next_batch() for _ in range(9)]
    part = _stream(n=7, batch=2, seed=3)
    head = [part.next_batch() for _ in range(4)]
    resumed = _stream(n=7, batch=2, seed=3)
    resumed.load_state_dict(part.state_dict())
    assert head + [resumed.next_batch() for _ in range(5)] == expected


def test_length_grouping_keeps_epochs_complete_and_batches_homogeneous():
    lengths = [int(x) for x in torch.randint(1, 100, (64,), generator=torch.Generator().manual_seed(0))]
    plain = _stream(n=64, batch=8)
    grouped = _stream(n=64, batch=8, lengths=lengths)
    for stream in (plain, grouped):
        batches = [stream.next_batch() for _ in range(8)]
        assert sorted(x for b in batches for x in b) == list(range(64))  # every example once per epoch
        stream.spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert grouped.spread < plain.spread / 3  # examples of a batch have similar lengths
    with pytest.raises(ValueError, match="lengths"):
        _stream(n=5, lengths=[1, 2])


def test_length_grouping_leaves_out_a_different_tail_each_epoch():
    # 20 examples, batches of 16: each epoch leaves 4 out; sorting before cutting would always leave out the 4
    # shortest (they would never reach the meta loss)
    lengths = list(range(1, 21))
    stream = _stream(n=20, batch=16, lengths=lengths)
    drawn = [set(stream.next_batch()) for _ in range(12)]
    assert all(len(b) == 16 for b in drawn)
    assert set().union(*drawn) == set(range(20))
    assert len({frozenset(set(range(20)) - b) for b in drawn}) > 1
    shortest = set(sorted(range(20), key=lambda i: lengths[i])[:4])
    assert sum(len(b & shortest) for b in drawn) > 0.5 * 12 * 4 * 16 / 20  # about their share (38 expected)
