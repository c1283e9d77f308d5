"""adaptation_diagonal against autograd through torch's own optimizer step (differentiable=True), in float64."""

import pytest
import torch

from sama_trainer import UnsupportedOptimizerError, adaptation_diagonal
from sama_trainer.adaptation import apply_adaptation_


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.3)),
    "sgd_wd": (torch.optim.SGD, dict(lr=0.3, weight_decay=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.3, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.3, momentum=0.9, nesterov=True)),
    "sgd_dampening": (torch.optim.SGD, dict(lr=0.3, momentum=0.9, dampening=0.2)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)),
    "adam_l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, eps=1e-6)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99))),
    "adamw_foreach": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, foreach=True)),
}


def _clone(state_dict):
    # load_state_dict shares same-dtype tensors with the dict it is given: copy so every replay starts from it
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state_dict)


def _autograd_diagonal(cls, kwargs, state_dict, theta, grad):
    """-d(θ_after)/dg through a differentiable copy of the optimizer, from the same state."""
    x = theta.clone().requires_grad_(True).clone()  # non-leaf, as differentiable=True needs
    opt = cls([x], differentiable=True, **{k: v for k, v in kwargs.items() if k != "foreach"})
    opt.load_state_dict(_clone(state_dict))
    for group in opt.param_groups:
        group.update(differentiable=True, foreach=False)
    for state in opt.state.values():  # the differentiable path computes bias corrections from this tensor
        if "step" in state:
            state["step"] = state["step"].to(torch.float64)
    g = grad.clone().requires_grad_(True)
    x.grad = g
    opt.step()
    return -torch.autograd.grad(x.sum(), g)[0]  # the update is elementwise: the VJP with ones is the diagonal


def _finite_difference_diagonal(cls, kwargs, state_dict, theta, grad, h=1e-6):
    """-d(θ_after)/dg by a central difference of torch's own (non-differentiable) step, all elements at once."""

    def step(g):
        x = torch.nn.Parameter(theta.clone())
        opt = cls([x], **kwargs)
        opt.load_state_dict(_clone(state_dict))
        x.grad = g.clone()
        opt.step()
        return x.detach()

    return -(step(grad + h) - step(grad - h)) / (2 * h)


# torch cannot differentiate these steps (amsgrad uses maximum(out=...); the first momentum step detaches the buffer)
NO_AUTOGRAD = {("adam_amsgrad", None), ("sgd_momentum", 0), ("sgd_nesterov", 0), ("sgd_dampening", 0)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("warm_steps", [0, 1, 4, 25])
def test_adaptation_matches_autograd_of_torch_step(name, warm_steps):
    cls, kwargs = OPTIMIZERS[name]
    if name == "sgd_dampening" and warm_steps == 0:
        pytest.skip("torch's first momentum step ignores dampening and SGD keeps no step count (documented)")
    gen = torch.Generator().manual_seed(warm_steps)
    theta = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64, generator=gen))
    opt = cls([theta], **kwargs)
    for _ in range(warm_steps):  # random optimizer state
        theta.grad = torch.randn(theta.shape, dtype=torch.float64, generator=gen) * 3
        opt.step()
    state_before = _clone(opt.state_dict())
    theta_before = theta.detach().clone()
    grad = torch.randn(theta.shape, dtype=torch.float64, generator=gen)
    theta.grad = grad.clone()
    opt.step()  # the real step; adaptation reads the live state right after it
    got = adaptation_diagonal(opt, [theta], [grad])[0]

    # Adam's first step: du/dg = lr·eps/(|g|+eps)² is a cancellation between terms of size lr/|g| that no oracle
    # resolves better than rounding at that scale, so measure errors against the terms' scale there.
    scale = (kwargs["lr"] / grad.abs()).norm() if warm_steps == 0 and cls is not torch.optim.SGD else None
    # oracle 1: autograd through torch's differentiable step
    if (name, None) not in NO_AUTOGRAD and (name, warm_steps) not in NO_AUTOGRAD:
        expected = _autograd_diagonal(cls, kwargs, state_before, theta_before, grad)
        rel = (got - expected).norm() / (scale or expected.norm())
        assert rel <= 1e-5, f"{name}: relative error vs autograd {rel:.2e}"
    # oracle 2: central difference of torch's real (float64) step
    expected = _finite_difference_diagonal(cls, kwargs, state_before, theta_before, grad)
    rel = (got - expected).norm() / (scale or expected.norm())
    assert rel <= 1e-5, f"{name}: relative error vs finite differences {rel:.2e}"
    v = torch.randn(theta.shape, dtype=torch.float64, generator=gen)
    inplace = apply_adaptation_(opt, [theta], [grad], [v.clone()])[0]
    torch.testing.assert_close(inplace, v * got)


def test_adam_without_bias_correction_matches_reference_formula():
    """bias_correction=False: the reference library's [(1-β1)s - (1-β2)g·m]/(√s+eps)^3·lr up to where eps sits."""
    gen = torch.Generator().manual_seed(1)
    theta = torch.nn.Parameter(torch.randn(50, dtype=torch.float64, generator=gen))
    opt = torch.optim.Adam([theta], lr=1e-3, eps=1e-12)
    for _ in range(5):
        theta.grad = torch.randn(50, dtype=torch.float64, generator=gen)
        opt.step()
    g = theta.grad
    b1, b2 = opt.param_groups[0]["betas"]
    st = opt.state[theta]
    m, s = st["exp_avg"], st["exp_avg_sq"]
    reference = 1e-3 * ((1 - b1) * s - (1 - b2) * g * m) / (s.sqrt() + 1e-12) ** 3
    got = adaptation_diagonal(opt, [theta], [g], bias_correction=False)[0]
    assert ((got - reference).norm() / reference.norm()) < 1e-8
    with_bc = adaptation_diagonal(opt, [theta], [g])[0]
    assert not torch.allclose(with_bc, got)  # bias correction matters at step 5


def test_unsupported_optimizer_raises_naming_supported():
    theta = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.RMSprop([theta])
    with pytest.raises(UnsupportedOptimizerError, match="Adam.*SGD|SGD.*Adam"):
        adaptation_diagonal(opt, [theta], [torch.zeros(3)])


def test_adam_needs_last_grads_and_unstepped_params_give_zero():
    theta = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([theta])
    assert torch.equal(adaptation_diagonal(opt, [theta], None)[0], torch.zeros(3))  # no step yet: u(g) constant
    theta.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="last_grads"):
        adaptation_diagonal(opt, [theta], None)


def test_wrapped_optimizer_is_unwrapped():
    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    theta = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([theta], lr=0.5)
    assert torch.equal(adaptation_diagonal(Wrapper(opt), [theta], None)[0], torch.full((3,), 0.5))


@pytest.mark.parametrize("name", ["adam_amsgrad", "adamw", "sgd_momentum"])
def test_chunked_in_place_adaptation_equals_whole_tensor_diagonal(name, monkeypatch):
    import sama_trainer.adaptation as adaptation

    cls, kwargs = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(7)
    shapes = [(37, 11), (5,)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    opt = cls(params, **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    grads = [p.grad for p in params]
    whole = adaptation_diagonal(opt, params, grads)
    monkeypatch.setattr(adaptation, "CHUNK_ELEMENTS", 100)  # 407 elements -> 5 chunks, the small tensor whole
    v = [torch.randn(p.shape, generator=gen) for p in params]
    chunked = apply_adaptation_(opt, params, grads, [x.clone() for x in v])
    for c, d, x in zip(chunked, whole, v):
        torch.testing.assert_close(c, d * x)


@pytest.mark.parametrize("consume", [False, True])
def test_bucketed_foreach_adam_equals_per_tensor_rule(consume, monkeypatch):
    """The multi-tensor Adam path (buckets across tensors, chunks of large ones, two param groups, an unstepped
    parameter, an entry whose second moment is 0, du/dg written over the gradients themselves) equals the per-tensor
    rule element for element."""
    import sama_trainer.adaptation as adaptation

    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 9), (7,), (3, 5), (11,), (2, 2)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)) for shape in shapes]
    frozen_until_now = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    opt = torch.optim.AdamW(
        [{"params": params[:3]}, {"params": params[3:] + [frozen_until_now], "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.05,
    )
    for k in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad[..., 0] = 0.0  # never any gradient here: exp_avg_sq stays exactly 0
        if k == 0:
            params[4].grad = None  # one step fewer: its bias correction differs from its group's
        opt.step()
    assert adaptation._step_counts(opt, params[3:] + [frozen_until_now]) == [3.0, 2.0, None]
    all_params = params + [frozen_until_now]
    grads = [p.grad for p in params] + [torch.randn(4, generator=gen, dtype=torch.float64)]
    assert (opt.state[params[0]]["exp_avg_sq"][..., 0] == 0).all()
    whole = adaptation_diagonal(opt, all_params, grads)

    calls = []
    foreach = adaptation._FOREACH_RULES[adaptation._adam_rule]

    def counting(bucket, bias_correction):
        calls.append(len(bucket.targets))
        return foreach(bucket, bias_correction)

    counting.accepts = foreach.accepts
    monkeypatch.setitem(adaptation._FOREACH_RULES, adaptation._adam_rule, counting)
    monkeypatch.setattr(adaptation, "CHUNK_ELEMENTS", 100)  # 360 elements -> 4 chunks; buckets close at 100
    grads_in = [g.clone() for g in grads]
    out = grads_in if consume else [torch.empty_like(p) for p in all_params]
    adaptation.adaptation_diagonal_into_(opt, all_params, grads_in, out)
    for o, d in zip(out, whole):
        torch.testing.assert_close(o, d, rtol=1e-12, atol=0.0)
    assert whole[-1].eq(0).all() and out[-1].eq(0).all()  # unstepped: u did not depend on g
    assert whole[0][..., 0].ne(0).all()  # s = 0 entries keep the first term
    # both groups took the foreach path (the unstepped parameter did not); the first group's 360 + 7 + 15 elements
    # fill 4 buckets, the second group's two step counts one each
    assert sum(calls) >= len(shapes) and len(calls) == 6
