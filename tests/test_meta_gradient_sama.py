"""SAMA / SAMA-NA meta-gradients against closed forms and autograd (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sama_trainer import MetaWeightNet, adaptation_diagonal, meta_gradient
from sama_trainer.meta_gradient import central_difference


torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Biased regression: L_base(θ, λ) = ½·mean((Xθ - y)²) + β/2·‖θ - λ‖², L_meta(θ) = ½·mean((X_v θ - y_v)²)


def biased_regression(n=100, d=20, beta=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g)
    yv = Xv @ (w_true + 0.3 * torch.randn(d, generator=g)) + 0.1 * torch.randn(n, generator=g)
    return X, y, Xv, yv, beta


def closures(theta, lam, X, y, Xv, yv, beta):
    def base_loss():
        return 0.5 * ((X @ theta - y) ** 2).mean() + 0.5 * beta * ((theta - lam) ** 2).sum()

    def meta_loss():
        return 0.5 * ((Xv @ theta - yv) ** 2).mean()

    return base_loss, meta_loss


def inner_solution(lam, X, y, beta):
    n, d = X.shape
    B = X.T @ X / n + beta * torch.eye(d)
    return torch.linalg.solve(B, X.T @ y / n + beta * lam)


def test_sama_equals_analytic_value_on_biased_regression_sgd_and_adam():
    X, y, Xv, yv, beta = biased_regression()
    lam = torch.randn(20, requires_grad=True)
    theta = torch.nn.Parameter(inner_solution(lam.detach(), X, y, beta))
    base_loss, meta_loss = closures(theta, lam, X, y, Xv, yv, beta)
    v = Xv.T @ (Xv @ theta.detach() - yv) / len(yv)  # ∂L_meta/∂θ
    # ∂²L_base/∂λ∂θ = -β·I, so SAMA's value is exactly β·(du/dg ⊙ v); the central difference is exact (quadratic)
    sgd = torch.optim.SGD([theta], lr=0.05)
    got = meta_gradient("sama", [theta], [lam], base_loss, meta_loss, optimizer=sgd, alpha=1.0)[0]
    torch.testing.assert_close(got, beta * 0.05 * v, rtol=1e-8, atol=1e-12)

    adam = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(3):
        theta.grad = torch.randn(20)
        adam.step()
    g = theta.grad.clone()
    st = adam.state[theta]
    m, s, t = st["exp_avg"], st["exp_avg_sq"], 3
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    c1, c2 = 1 - b1**t, math.sqrt(1 - b2**t)
    D = s.sqrt() / c2 + eps
    diag = lr / c1 * ((1 - b1) / D - (1 - b2) * g * m / (c2 * s.sqrt() * D**2))  # closed form du/dg
    theta_now = theta.detach().clone()
    v = Xv.T @ (Xv @ theta_now - yv) / len(yv)
    got = meta_gradient("sama", [theta], [lam], base_loss, meta_loss, optimizer=adam, last_grads=[g], alpha=0.3)[0]
    torch.testing.assert_close(got, beta * diag * v, rtol=1e-8, atol=1e-14)
    assert torch.equal(theta.detach(), theta_now)
    # SAMA-NA ignores the optimizer: β·v
    got = meta_gradient("sama-na", [theta], [lam], base_loss, meta_loss, optimizer=adam, alpha=0.3)[0]
    torch.testing.assert_close(got, beta * v, rtol=1e-8, atol=1e-12)


def test_sama_meta_descent_converges_to_the_optimal_bias():
    X, y, Xv, yv, beta = biased_regression()
    n, d = X.shape
    B = X.T @ X / n + beta * torch.eye(d)
    theta_v = torch.linalg.lstsq(Xv, yv.unsqueeze(-1)).solution.squeeze(-1)  # minimiser of L_meta
    lam_star = (B @ theta_v - X.T @ y / n) / beta  # θ*(λ*) = θ_v
    lr = 0.1
    # SAMA's meta-gradient at θ*(λ) is β·lr·g_v(θ*(λ)) = β·lr·H_v·B⁻¹·β·(λ - λ*): real positive spectrum. Plain
    # gradient descent with the step size 2/(μ_min + μ_max) of that spectrum (an oracle choice) converges linearly.
    Hv = Xv.T @ Xv / n
    mu = torch.linalg.eigvals(beta * lr * Hv @ torch.linalg.inv(B) * beta).real
    step = 2.0 / (mu.min() + mu.max())
    lam = torch.zeros(d, requires_grad=True)
    for _ in range(100):
        theta = torch.nn.Parameter(inner_solution(lam.detach(), X, y, beta))
        base_loss, meta_loss = closures(theta, lam, X, y, Xv, yv, beta)
        sgd = torch.optim.SGD([theta], lr=lr)
        grad = meta_gradient("sama", [theta], [lam], base_loss, meta_loss, optimizer=sgd)[0]
        with torch.no_grad():
            lam -= step * grad
    rel = (lam.detach() - lam_star).norm() / lam_star.norm()
    assert rel < 0.01, rel


# --------------------------------------------------------------------------------------------------------------
# Finite-difference mixed product vs double backward (tiny MLP with a reweighting net)


def tiny_reweighting_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.nn.Parameter(torch.randn(6, 10, generator=g) * 0.5)
    W2 = torch.nn.Parameter(torch.randn(10, 3, generator=g) * 0.5)
    x, labels = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    net = MetaWeightNet(hidden_size=100, use_uncertainty=True).double()

    def losses_logits():
        logits = torch.tanh(x @ W1) @ W2
        return F.cross_entropy(logits, labels, reduction="none"), logits

    def base_loss(detach_inputs=True):
        losses, logits = losses_logits()
        inputs = (losses.detach(), logits.detach()) if detach_inputs else (losses, logits)
        return (net(*inputs) * losses).mean()

    return [W1, W2], list(net.parameters()), base_loss


def test_finite_difference_mixed_product_matches_double_backward():
    theta, lam, base_loss = tiny_reweighting_problem()
    g = torch.Generator().manual_seed(1)
    u = [torch.randn(p.shape, generator=g) for p in theta]
    # reference: (∂²L/∂λ∂θ)·u with the meta net's inputs differentiated too (the FD re-evaluates them at θ ± εu)
    grads_theta = torch.autograd.grad(base_loss(detach_inputs=False), theta, create_graph=True)
    dot = sum((gt * ui).sum() for gt, ui in zip(grads_theta, u))
    reference = torch.autograd.grad(dot, lam)
    norm = math.sqrt(sum((ui**2).sum().item() for ui in u))
    before = [p.detach().clone() for p in theta]
    fd, finite = central_difference(theta, lam, lambda: base_loss(True), u, 1e-5 / norm)
    assert finite
    num = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(fd, reference)))
    den = math.sqrt(sum((b**2).sum().item() for b in reference))
    assert num / den <= 1e-6, num / den
    assert all(torch.equal(a, b) for a, b in zip(before, theta))


# --------------------------------------------------------------------------------------------------------------
# One-step Adam lookahead (peers-and-oracles §4.5)


def test_sama_matches_one_step_adam_lookahead_to_first_order():
    """w' = Adam step on G = Σ λ_j ∇ℓ_j(w0); exact ∂L_val(w')/∂λ_i = -∇ℓ_i(w0)ᵀ[du/dg ⊙ g_v(w')] (u includes lr).

    SAMA evaluates ∇ℓ_i at w' instead of w0, so on least squares it is exact up to O(lr): the error must shrink
    in proportion to the learning rate.
    """
    g = torch.Generator().manual_seed(3)
    n, d = 12, 5
    X, y = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    Xv, yv = torch.randn(20, d, generator=g), torch.randn(20, generator=g)
    w0 = torch.randn(d, generator=g)
    lam = torch.rand(n, generator=g).requires_grad_(True)
    errors = []
    for lr in (1e-2, 1e-3):
        w = torch.nn.Parameter(w0.clone())
        adam = torch.optim.Adam([w], lr=lr)
        adam.state[w] = {  # a warm state, as after some training
            "step": torch.tensor(5.0),
            "exp_avg": torch.randn(d, generator=torch.Generator().manual_seed(4)) * 0.1,
            "exp_avg_sq": torch.rand(d, generator=torch.Generator().manual_seed(5)) * 0.1,
        }
        per_example_grads = (X @ w0 - y).unsqueeze(-1) * X  # ∇ℓ_i(w0), ℓ_i = ½(x_iᵀw - y_i)²
        G = (lam.detach().unsqueeze(-1) * per_example_grads).sum(0)
        w.grad = G.clone()
        adam.step()
        diag = adaptation_diagonal(adam, [w], [G])[0]
        gv = Xv.T @ (Xv @ w.detach() - yv) / len(yv)
        exact = -per_example_grads @ (diag * gv)

        def base_loss(w=w):
            return (lam * 0.5 * (X @ w - y) ** 2).sum()

        def meta_loss(w=w):
            return 0.5 * ((Xv @ w - yv) ** 2).mean()

        got = meta_gradient("sama", [w], [lam], base_loss, meta_loss, optimizer=adam, last_grads=[G])[0]
        errors.append(((got - exact).norm() / exact.norm()).item())
    assert errors[1] < 5e-3
    assert 5 < errors[0] / errors[1] < 20  # first order in lr


# --------------------------------------------------------------------------------------------------------------
# contract: θ restored, RNG shared, non-finite guard


def test_theta_bit_identical_and_dropout_passes_share_masks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    x, labels = torch.randn(32, 8), torch.randint(0, 3, (32,))
    xm, ym = torch.randn(16, 8), torch.randint(0, 3, (16,))
    net = MetaWeightNet()
    params, lam = list(model.parameters()), list(net.parameters())

    def base_loss():
        with torch.no_grad():
            losses = F.cross_entropy(model(x), labels, reduction="none")
        return (net(losses) * losses).mean()

    def meta_loss():
        return F.cross_entropy(model(xm), ym)

    before = [p.detach().clone() for p in params]
    state = torch.get_rng_state()
    first = meta_gradient("sama-na", params, lam, base_loss, meta_loss, alpha=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    torch.set_rng_state(state)
    second = meta_gradient("sama-na", params, lam, base_loss, meta_loss, alpha=0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(t.abs().sum() > 0 for t in first)
    # without a shared RNG the two perturbed passes see different dropout masks: the estimate changes
    torch.set_rng_state(state)
    unshared = meta_gradient("sama-na", params, lam, base_loss, meta_loss, alpha=0.5, share_rng=False)
    assert not all(torch.allclose(a, b) for a, b in zip(first, unshared))


@pytest.mark.parametrize("consume", [False, True])  # with a saved θ / arithmetic moves without a copy
@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_base_update_leaves_theta_at_theta_minus_scale_eps_u(scale, consume):
    X, y, Xv, yv, beta = biased_regression(n=30, d=4)
    lam = torch.zeros(4, requires_grad=True)
    theta = torch.nn.Parameter(torch.randn(4))
    base_loss, meta_loss = closures(theta, lam, X, y, Xv, yv, beta)
    start = theta.detach().clone()
    v = Xv.T @ (Xv @ start - yv) / len(yv)
    options = dict(alpha=0.7, restore=False, base_update_scale=scale)
    if consume:
        options.update(consume_grads=True, last_grads=[torch.zeros(4)])
    out = meta_gradient("sama-na", [theta], [lam], base_loss, meta_loss, **options)
    torch.testing.assert_close(theta.detach(), start - scale * 0.7 * v / v.norm())
    assert out.stats["eps"] == pytest.approx(0.7 / v.norm().item())
    if scale == 0.0 and not consume:
        assert torch.equal(theta.detach(), start)  # from the saved copy: bit-exact


@pytest.mark.parametrize("where", ["meta_loss", "base_loss"])
def test_non_finite_values_skip_and_leave_theta_untouched(where):
    X, y, Xv, yv, beta = biased_regression(n=30, d=4)
    lam = torch.zeros(4, requires_grad=True)
    theta = torch.nn.Parameter(torch.randn(4))
    base_loss, meta_loss = closures(theta, lam, X, y, Xv, yv, beta)
    nan = {"meta_loss": meta_loss, "base_loss": base_loss}
    nan[where] = lambda f=nan[where]: f() * float("nan")
    start = theta.detach().clone()
    out = meta_gradient("sama", [theta], [lam], nan["base_loss"], nan["meta_loss"], restore=False)
    assert out.skipped and out.stats["skipped"] == 1.0
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out)
    assert torch.equal(theta.detach(), start)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown meta-gradient method 'nope'.*sama"):
        meta_gradient("nope", [], [], lambda: None, lambda: None)


# --------------------------------------------------------------------------------------------------------------
# consume_grads: u formed in the consumed gradient buffers (no θ-sized v), θ not copied with the base update


def stepped_problem(opt_name, seed=0):
    """An MLP whose first matrix is used twice (tied), a parameter only the base loss sees, a meta net, and an
    optimizer that has just taken a step on the base loss (so p.grad holds the gradients it used)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(6, 6, generator=g) * 0.5)
    V = torch.nn.Parameter(torch.randn(6, 3, generator=g) * 0.5)
    base_only = torch.nn.Parameter(torch.randn(3, generator=g))
    x, labels = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    xm, ym = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    net = MetaWeightNet(hidden_size=16).double()
    params = [W, V, base_only]

    def logits_of(inp, shift=True):
        out = torch.tanh(torch.tanh(inp @ W) @ W) @ V
        return out + base_only if shift else out

    def base_loss():
        losses = F.cross_entropy(logits_of(x), labels, reduction="none")
        return (net(losses.detach()) * losses).mean()

    def meta_loss():
        return F.cross_entropy(logits_of(xm, shift=False), ym)

    opt = {
        "adam_l2": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        "sgd_nesterov": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    }[opt_name]()
    for _ in range(3):
        opt.zero_grad()
        base_loss().backward()
        opt.step()
    return params, list(net.parameters()), base_loss, meta_loss, opt


@pytest.mark.parametrize("method", ["sama", "sama-na"])
@pytest.mark.parametrize("opt_name", ["adam_l2", "adamw", "sgd_nesterov"])
@pytest.mark.parametrize("restore", [True, False])
def test_consume_grads_matches_the_allocating_path(method, opt_name, restore):
    results = []
    for consume in (False, True):
        params, lam, base_loss, meta_loss, opt = stepped_problem(opt_name)
        start = [p.detach().clone() for p in params]
        grads = [p.grad for p in params]
        last = grads if consume else [t.clone() for t in grads]
        out = meta_gradient(
            method, params, lam, base_loss, meta_loss, optimizer=opt, last_grads=last, alpha=0.3,
            restore=restore, consume_grads=consume,
        )  # fmt: skip
        results.append((out, start, [p.detach().clone() for p in params], grads))
    (ref, start, ref_after, _), (got, start2, got_after, buffers) = results
    assert all(torch.equal(a, b) for a, b in zip(start, start2))
    if restore:  # same arithmetic in the same order: bit-identical
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    else:  # the θ - εu pass starts from (θ + εu) - 2εu: equal up to rounding
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    assert got.stats["u_norm"] == ref.stats["u_norm"] > 0
    assert got.stats["v_norm"] == pytest.approx(ref.stats["v_norm"], rel=1e-6)  # a float32 statistic
    if restore:
        assert all(torch.equal(a, b) for a, b in zip(start, got_after))
    else:  # θ - εu reached as (θ + εu) - 2εu: equal up to rounding, and really moved
        for a, b in zip(ref_after, got_after):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-14)
        assert not torch.equal(got_after[0], start[0])
        assert torch.equal(got_after[2], start[2])  # L_meta does not see base_only: u = 0 there
    assert torch.count_nonzero(buffers[2]) == 0  # the buffers now hold u


@pytest.mark.parametrize("failure", ["error", "non_finite"])
def test_consume_grads_without_a_theta_copy_returns_to_theta_when_the_minus_pass_fails(failure):
    """Copy-free mode (θ moved arithmetically): an exception or a non-finite loss in the θ - εu pass puts θ back."""
    params, lam, base_loss, meta_loss, opt = stepped_problem("adamw")
    start = [p.detach().clone() for p in params]
    calls = []

    def failing_base_loss():
        calls.append(1)
        loss = base_loss()
        if len(calls) == 2 and failure == "error":
            raise RuntimeError("boom")
        return loss * float("nan") if len(calls) == 2 else loss

    def run():
        return meta_gradient(
            "sama", params, lam, failing_base_loss, meta_loss, optimizer=opt, last_grads=[p.grad for p in params],
            restore=False, consume_grads=True,
        )  # fmt: skip

    if failure == "error":
        with pytest.raises(RuntimeError, match="boom"):
            run()
    else:
        out = run()
        assert out.skipped and out.stats["skip_reason_nonfinite_fd"] == 1.0
    assert len(calls) == 2
    for a, b in zip(start, params):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=1e-14)
