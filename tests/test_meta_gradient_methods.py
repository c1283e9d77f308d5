"""Meta-gradient methods (sama, sama-na, t1t2, neumann, cg, unrolled): shared contract and exact oracles, in float64.

Oracles (see the project notes on peers and oracles, §4): biased (iMAML-style) regression, per-example weighted least
squares, one-step lookahead with SGD and with Adam, torchmeta's one-step MAML integers, and the double-backward mixed
product that the finite differences approximate.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sama_trainer.meta_gradient import available_methods, get_method, is_adaptive, is_second_order, meta_gradient


DT = torch.float64
METHODS = available_methods()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen):
    return torch.randn(*shape, dtype=DT, generator=gen)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().to(DT) for t in (a, b))  # continuous data: no ties
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


# ----------------------------------------------------------------------------------------------------------------
# 1. contract, for every registered method


class MLPProblem:
    """Per-example reweighting of a tiny tanh MLP: L_base = mean(2σ(λ)·CE_i(θ)), L_meta = CE on a validation set."""

    def __init__(self, seed: int = 0):
        gen = _gen(seed)
        self.x, self.xv = _randn(12, 4, gen=gen), _randn(8, 4, gen=gen)
        self.y = torch.randint(0, 3, (12,), generator=gen)
        self.yv = torch.randint(0, 3, (8,), generator=gen)
        self.theta = [
            torch.nn.Parameter(0.7 * _randn(4, 5, gen=gen)),
            torch.nn.Parameter(0.1 * _randn(5, gen=gen)),
            torch.nn.Parameter(0.7 * _randn(5, 3, gen=gen)),
        ]
        self.lam = [torch.nn.Parameter(0.5 * _randn(12, gen=gen)), torch.nn.Parameter(_randn(2, gen=gen))]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2 = self.theta
        return torch.tanh(x @ w1 + b1) @ w2

    def base_loss(self) -> torch.Tensor:
        weights = 2 * torch.sigmoid(self.lam[0])
        return (weights * F.cross_entropy(self.logits(self.x), self.y, reduction="none")).mean()

    def meta_loss(self) -> torch.Tensor:  # λ unused: the direct part is zero
        return F.cross_entropy(self.logits(self.xv), self.yv)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.theta]

    def adam(self) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """An Adam on θ after two steps (θ moves), and the gradients of its last step."""
        opt = torch.optim.Adam(self.theta, lr=0.01)
        for _ in range(2):
            grads = torch.autograd.grad(self.base_loss(), self.theta)
            for p, g in zip(self.theta, grads):
                p.grad = g.clone()
            opt.step()
        for p in self.theta:
            p.grad = None
        return opt, list(grads)


def _call(problem: MLPProblem, method: str, optimizer: str | None, base_loss=None, meta_loss=None, **options):
    opt, last = problem.adam() if optimizer == "adam" else (None, None)
    before = problem.snapshot()
    out = meta_gradient(
        method,
        problem.theta,
        problem.lam,
        base_loss or problem.base_loss,
        meta_loss or problem.meta_loss,
        optimizer=opt,
        last_grads=last,
        **options,
    )
    for p, q in zip(problem.theta, before):
        assert torch.equal(p, q), f"{method}: θ changed"
    return out


def test_registry_flags():
    assert {"sama", "sama-na", "t1t2", "neumann", "cg", "unrolled"} <= set(METHODS)
    second_order = {m for m in METHODS if is_second_order(m)}
    adaptive = {m for m in METHODS if is_adaptive(m)}
    assert {"neumann", "cg", "unrolled"} <= second_order
    assert not {"sama", "sama-na", "t1t2"} & second_order
    assert {"sama", "unrolled"} <= adaptive  # unrolled's lookahead uses the base optimizer's du/dg
    assert not {"sama-na", "t1t2", "neumann", "cg"} & adaptive


@pytest.mark.parametrize("optimizer", [None, "adam"])
@pytest.mark.parametrize("method", METHODS)
def test_contract(method, optimizer):
    problem = MLPProblem()
    out = _call(problem, method, optimizer)
    assert not out.skipped and out.stats["skipped"] == 0.0
    assert [g.shape for g in out] == [p.shape for p in problem.lam]
    assert all(g.dtype == DT and torch.isfinite(g).all() for g in out)
    assert out[0].abs().sum() > 0  # the implicit part reaches the example weights
    assert torch.equal(out[1], torch.zeros(2, dtype=DT))  # λ₂ is used by neither loss
    assert {"meta_loss", "v_norm"} <= set(out.stats)
    assert all(p.grad is None for p in problem.theta + problem.lam)  # no .grad side effects


@pytest.mark.parametrize("method", METHODS)
def test_direct_part_is_added(method):
    """Adding h(λ) (independent of θ) to L_meta shifts every method's result by exactly ∇h."""
    problem = MLPProblem()
    plain = _call(problem, method, None)
    shift = torch.tensor([0.3, -1.2], dtype=DT)
    shifted = _call(problem, method, None, meta_loss=lambda: problem.meta_loss() + shift @ problem.lam[1])
    torch.testing.assert_close(shifted[0], plain[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(shifted[1], plain[1] + shift, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("which", ["meta", "base"])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_guard(method, which):
    problem = MLPProblem()
    nan = torch.tensor(float("nan"), dtype=DT)
    losses = {"meta_loss": lambda: problem.meta_loss() * nan} if which == "meta" else {}
    if which == "base":
        losses["base_loss"] = lambda: problem.base_loss() * nan
    out = _call(problem, method, "adam", **losses)
    assert out.skipped and out.stats["skipped"] == 1.0
    assert any(k.startswith("skip_reason_") for k in out.stats)
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(out, problem.lam))


@pytest.mark.parametrize("method", ["neumann", "cg", "unrolled"])
def test_second_order_methods_take_trainer_options(method):
    """The trainer passes its FD options to every method; methods that never move θ accept and ignore them."""
    problem = MLPProblem()
    ref = _call(problem, method, None)
    opts = dict(restore=False, workspace=None, base_step_hook=None, share_rng=True, bias_correction=True)
    opts["loss_scale"] = 1024.0  # fp16 grad-scaler scale: a power of two, so the result is bit-identical
    out = _call(problem, method, None, **opts)  # _call asserts θ is bit-identical
    torch.testing.assert_close(list(out), list(ref), rtol=0, atol=0)
    with pytest.raises(TypeError, match="iteratons"):
        _call(problem, method, None, iteratons=3)


# ----------------------------------------------------------------------------------------------------------------
# 2. biased (iMAML-style) regression: ∇_φ L_val = β B⁻¹ g_v(θ*)


class BiasedRegression:
    """L_base = ½ mean((Xθ - y)²) + β/2 ‖θ - φ‖², L_val = ½ mean((X_v θ - y_v)²), θ at the exact θ*(φ)."""

    def __init__(self, n: int = 100, d: int = 20, beta: float = 0.15, seed: int = 0):
        gen = _gen(seed)
        self.x = _randn(n, d, gen=gen)
        self.y = self.x @ _randn(d, gen=gen) + 0.1 * _randn(n, gen=gen)
        self.xv, self.yv = _randn(50, d, gen=gen), _randn(50, gen=gen)
        phi = _randn(d, gen=gen)
        self.beta = beta
        self.b = self.x.T @ self.x / n + beta * torch.eye(d, dtype=DT)
        theta = torch.linalg.solve(self.b, self.x.T @ self.y / n + beta * phi)
        self.gv = self.xv.T @ (self.xv @ theta - self.yv) / len(self.yv)
        self.exact = beta * torch.linalg.solve(self.b, self.gv)
        self.theta, self.phi = torch.nn.Parameter(theta), torch.nn.Parameter(phi)

    def base_loss(self) -> torch.Tensor:
        return (
            0.5 * ((self.x @ self.theta - self.y) ** 2).mean() + self.beta / 2 * ((self.theta - self.phi) ** 2).sum()
        )

    def meta_loss(self) -> torch.Tensor:
        return 0.5 * ((self.xv @ self.theta - self.yv) ** 2).mean()

    def run(self, method: str, **options) -> torch.Tensor:
        before = self.theta.detach().clone()
        out = meta_gradient(method, [self.theta], [self.phi], self.base_loss, self.meta_loss, **options)
        assert torch.equal(self.theta, before) and not out.skipped
        return out[0]


@pytest.mark.parametrize(
    "method, options, max_rel",
    [
        # measured: rel. error 6e-16 (cg, K = d = 20), 2e-13 (neumann, K = 100, α = 1/λ_max(B) ≈ 0.50)
        ("cg", dict(iterations=20), 1e-10),
        ("cg", dict(iterations=40), 1e-10),  # converged CG stays put
        ("neumann", dict(iterations=100), 1e-10),
    ],
)
def test_biased_regression_oracle(method, options, max_rel):
    prob = BiasedRegression()
    if method == "neumann":
        options["alpha"] = 1.0 / float(torch.linalg.eigvalsh(prob.b).max())  # < 2/λ_max: the series converges
    got = prob.run(method, **options)
    assert _cos(got, prob.exact) >= 0.999
    assert _rel(got, prob.exact) <= max_rel


@pytest.mark.parametrize("iterations, damping", [(1, 0.0), (3, 0.0), (4, 0.3)])
def test_cg_iterates_are_krylov_galerkin_solutions(iterations, damping):
    """K CG steps from 0 give x_K = V (VᵀAV)⁻¹ Vᵀ v, V = [v, Av, …, A^{K-1}v]: checks the update with r_{k+1}."""
    prob = BiasedRegression()
    a = prob.b + damping * torch.eye(len(prob.gv), dtype=DT)
    cols = [prob.gv]
    for _ in range(iterations - 1):
        cols.append(a @ cols[-1])
    basis = torch.linalg.qr(torch.stack(cols, dim=1)).Q
    x = basis @ torch.linalg.solve(basis.T @ a @ basis, basis.T @ prob.gv)
    got = prob.run("cg", iterations=iterations, damping=damping)
    assert _rel(got, prob.beta * x) <= 1e-9
    if iterations > 1:  # not yet converged: a wrong iteration would not land on the Galerkin solution
        assert _rel(got, prob.exact) > 1e-4


def test_neumann_is_the_truncated_series():
    """iterations=K sums K+1 terms: p = α Σ_{k=0..K} (I - αB)^k g_v, so the meta-gradient is β p."""
    prob = BiasedRegression()
    alpha, k = 0.3, 4
    m = torch.eye(len(prob.gv), dtype=DT) - alpha * prob.b
    expected = alpha * sum(torch.linalg.matrix_power(m, j) @ prob.gv for j in range(k + 1))
    got = prob.run("neumann", alpha=alpha, iterations=k)
    assert _rel(got, prob.beta * expected) <= 1e-12
    assert _rel(prob.run("neumann", alpha=alpha, iterations=0), prob.beta * alpha * prob.gv) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# 3. per-example weighted least squares: ∂L_val/∂λ_i = -r_i x_iᵀ A⁻¹ g_v(w*)


class WeightedLeastSquares:
    """L_base = Σ λ_i ½ (x_iᵀw - y_i)² + μ/2 ‖w‖² at the exact w*(λ); L_val = ½ mean((X_v w - y_v)²)."""

    def __init__(self, n: int = 40, d: int = 5, mu: float = 0.5, seed: int = 1):
        gen = _gen(seed)
        self.x = _randn(n, d, gen=gen)
        self.y = self.x @ _randn(d, gen=gen) + 0.5 * _randn(n, gen=gen)
        self.xv = _randn(30, d, gen=gen)
        self.yv = self.xv @ _randn(d, gen=gen)
        lam = 0.5 + torch.rand(n, dtype=DT, generator=gen)
        self.mu = mu
        a = self.x.T @ (lam[:, None] * self.x) + mu * torch.eye(d, dtype=DT)
        w = torch.linalg.solve(a, self.x.T @ (lam * self.y))
        self.r = self.x @ w - self.y
        self.gv = self.xv.T @ (self.xv @ w - self.yv) / len(self.yv)
        self.exact = -self.r * (self.x @ torch.linalg.solve(a, self.gv))
        self.w, self.lam = torch.nn.Parameter(w), torch.nn.Parameter(lam)

    def base_loss(self) -> torch.Tensor:
        return (self.lam * 0.5 * (self.x @ self.w - self.y) ** 2).sum() + self.mu / 2 * (self.w**2).sum()

    def meta_loss(self) -> torch.Tensor:
        return 0.5 * ((self.xv @ self.w - self.yv) ** 2).mean()

    def run(self, method: str, **options) -> torch.Tensor:
        before = self.w.detach().clone()
        out = meta_gradient(method, [self.w], [self.lam], self.base_loss, self.meta_loss, **options)
        assert torch.equal(self.w, before) and not out.skipped
        return out[0]


@pytest.mark.parametrize("iterations", [5, 10])
def test_weighted_least_squares_cg_is_exact(iterations):
    prob = WeightedLeastSquares()
    got = prob.run("cg", iterations=iterations)  # d = 5: CG is exact after 5 steps (measured rel. error 4e-16)
    assert _rel(got, prob.exact) <= 1e-6


@pytest.mark.parametrize("method", ["sama", "sama-na"])
def test_weighted_least_squares_sama_direction(method):
    """SAMA replaces A⁻¹ by the identity: exactly -r_i x_iᵀ g_v (central FD of a quadratic), so only the direction
    and the ranking of the exact IFT answer are matched. Measured on this problem (cond(A) ≈ 2.7): cosine 0.921,
    Spearman 0.858 (the thresholds below sit just under them; they are properties of the problem, not tolerances).
    """
    prob = WeightedLeastSquares()
    got = prob.run(method)
    assert _rel(got, -prob.r * (prob.x @ prob.gv)) <= 1e-10
    assert _cos(got, prob.exact) >= 0.9
    assert _spearman(got, prob.exact) >= 0.8
    assert _rel(got, prob.exact) > 0.5  # not the exact answer (different scale): direction only


# ----------------------------------------------------------------------------------------------------------------
# 4. unrolled = exact one-step lookahead (SGD and Adam)


class Logistic:
    """L_base = Σ λ_j ℓ_j(θ), ℓ_j = BCE-with-logits(x_jᵀθ, y_j); L_val = mean BCE on a validation set."""

    def __init__(self, seed: int = 2):
        gen = _gen(seed)
        self.x, self.xv = _randn(10, 4, gen=gen), _randn(16, 4, gen=gen)
        self.y = (torch.rand(10, generator=gen) < 0.5).to(DT)
        self.yv = (torch.rand(16, generator=gen) < 0.5).to(DT)
        self.theta = torch.nn.Parameter(_randn(4, gen=gen))
        self.lam = torch.nn.Parameter(0.5 + torch.rand(10, dtype=DT, generator=gen))

    def base_loss(self) -> torch.Tensor:
        return (self.lam * F.binary_cross_entropy_with_logits(self.x @ self.theta, self.y, reduction="none")).sum()

    def meta_loss(self) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.xv @ self.theta, self.yv)

    def oracle(self, diag: torch.Tensor) -> torch.Tensor:
        """-∇ℓ_i(w₀)ᵀ [D ⊙ g_v(w′)] with w′ = w₀ - D ⊙ Σ_j λ_j ∇ℓ_j(w₀), all in closed form."""
        with torch.no_grad():
            w0, lam = self.theta.detach(), self.lam.detach()
            per_example = (torch.sigmoid(self.x @ w0) - self.y)[:, None] * self.x  # rows ∇ℓ_i(w₀)
            w1 = w0 - diag * (lam @ per_example)
            gv = self.xv.T @ (torch.sigmoid(self.xv @ w1) - self.yv) / len(self.yv)
            return -per_example @ (diag * gv)

    def run(self, **options) -> torch.Tensor:
        before = self.theta.detach().clone()
        out = meta_gradient("unrolled", [self.theta], [self.lam], self.base_loss, self.meta_loss, **options)
        assert torch.equal(self.theta, before) and not out.skipped
        return out[0]


def test_unrolled_sgd_lookahead():
    """§4.4: ∂L_val(w′)/∂λ_i = -α ∇ℓ_i(w₀)ᵀ g_v(w′), w′ = w₀ - α Σ_j λ_j ∇ℓ_j(w₀) (measured rel. error ~1e-16)."""
    prob = Logistic()
    lr = 0.3
    expected = prob.oracle(torch.full((4,), lr, dtype=DT))
    assert _rel(prob.run(lr=lr), expected) <= 1e-12
    assert _rel(prob.run(optimizer=torch.optim.SGD([prob.theta], lr=lr)), expected) <= 1e-12
    assert _rel(prob.run(lr=2 * lr, alpha=0.5), expected) <= 1e-12  # α scales the lookahead step
    assert _rel(prob.run(lr=lr / 2), expected) > 1e-3  # the step size matters


def test_unrolled_adam_lookahead():
    """§4.5: ∂L_val(w′)/∂λ_i = -∇ℓ_i(w₀)ᵀ [D ⊙ g_v(w′)] with D = du/dg of a stepped torch Adam (bias-corrected),
    computed here from the optimizer state: D = lr/c1·[(1-β1)/den - (1-β2)·g·m/(c2·√s·den²)], den = √s/c2 + eps.
    The lookahead is linear in g with D held fixed: w′ = w₀ - D ⊙ Σ_j λ_j ∇ℓ_j(w₀).
    """
    prob = Logistic()
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-8
    opt = torch.optim.Adam([prob.theta], lr=lr, betas=(b1, b2), eps=eps)
    gen = _gen(3)
    for _ in range(3):
        last = _randn(4, gen=gen)
        prob.theta.grad = last.clone()
        opt.step()
    prob.theta.grad = None
    state = opt.state[prob.theta]
    t = float(state["step"])
    m, s = state["exp_avg"], state["exp_avg_sq"]
    c1, c2 = 1 - b1**t, math.sqrt(1 - b2**t)
    den = s.sqrt() / c2 + eps
    diag = lr / c1 * ((1 - b1) / den - (1 - b2) * last * m / (c2 * s.sqrt() * den**2))
    expected = prob.oracle(diag)
    got = prob.run(optimizer=opt, last_grads=[last])
    assert _rel(got, expected) <= 1e-10  # measured ~1e-16
    assert _rel(got, prob.oracle(torch.full((4,), lr, dtype=DT))) > 1e-2  # the adaptation matters here


# ----------------------------------------------------------------------------------------------------------------
# 5. torchmeta's one-step MAML integers


def test_unrolled_one_step_maml_integers():
    """f(w) = ½(aᵀw)², w′ = w - α∇f(w), g(w′) = ½(bᵀw′)²: ∇_w g(w′) = (I - α aaᵀ) b (bᵀw′) = (3780, 8505, 13230).

    Mapping onto the meta-gradient signature: the meta parameter λ is MAML's initialization w, the base parameter θ
    is the fast-weight offset (θ₀ = 0), the adapted weights are λ + θ. Then L_base = f(λ + θ), L_meta = g(λ + θ),
    and unrolled's lookahead θ′ = -α∇f(λ) gives λ + θ′ = w′; its answer is direct ∂g/∂λ = b(bᵀw′) plus the implicit
    part -α aaᵀ b(bᵀw′), i.e. exactly the MAML meta-gradient (all values are small integers and halves: exact).
    """
    a, b = torch.tensor([1.0, 2, 3], dtype=DT), torch.tensor([4.0, 5, 6], dtype=DT)
    lam = torch.nn.Parameter(torch.tensor([2.0, 3, 5], dtype=DT))
    theta = torch.nn.Parameter(torch.zeros(3, dtype=DT))

    def base_loss():
        return 0.5 * (a @ (lam + theta)) ** 2

    def meta_loss():
        return 0.5 * (b @ (lam + theta)) ** 2

    expected = torch.tensor([3780.0, 8505.0, 13230.0], dtype=DT)
    for options in (dict(lr=0.5), dict(optimizer=torch.optim.SGD([theta], lr=0.5))):
        out = meta_gradient("unrolled", [theta], [lam], base_loss, meta_loss, **options)
        assert torch.equal(out[0], expected), out[0]
        assert out.stats["meta_loss"] == 0.5 * 315.0**2  # at w′ = (-9.5, -20, -29.5): bᵀw′ = -315
        assert torch.equal(theta, torch.zeros(3, dtype=DT))


def test_sama_direct_part_with_aliased_gradients():
    """Same MAML parametrization, SAMA with an SGD(lr = ½) base optimizer: the loss is linear-quadratic, so the central
    difference is exact and the answer is b(bᵀλ) - ½ aaᵀ b(bᵀλ) (at θ = 0)."""
    a, b = torch.tensor([1.0, 2, 3], dtype=DT), torch.tensor([4.0, 5, 6], dtype=DT)
    lam = torch.nn.Parameter(torch.tensor([2.0, 3, 5], dtype=DT))
    theta = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    out = meta_gradient(
        "sama",
        [theta],
        [lam],
        lambda: 0.5 * (a @ (lam + theta)) ** 2,
        lambda: 0.5 * (b @ (lam + theta)) ** 2,
        optimizer=torch.optim.SGD([theta], lr=0.5),
    )
    v = b * (b @ lam.detach())
    torch.testing.assert_close(out[0], v - 0.5 * a * (a @ v), rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# 6. t1t2 against the double-backward mixed product


def _exact_first_order_ift(problem: MLPProblem) -> list[torch.Tensor]:
    """direct - (∂²L_base/∂λ∂θ)·v with v = ∂L_meta/∂θ, by double backward (what T1-T2/SAMA-NA approximate)."""
    v = torch.autograd.grad(problem.meta_loss(), problem.theta)
    g = torch.autograd.grad(problem.base_loss(), problem.theta, create_graph=True)
    mixed = torch.autograd.grad(g, problem.lam, grad_outputs=v, allow_unused=True)
    return [-m if m is not None else torch.zeros_like(p) for m, p in zip(mixed, problem.lam)]


def test_t1t2_matches_double_backward():
    """Central difference with ‖εv‖ = α: error O(α²). Measured rel. error 1.1e-5 at the default α = 0.01 and 2.9e-6
    at α = 0.005 (ratio 4.0); a one-sided or wrongly scaled difference would fail both checks."""
    problem = MLPProblem()
    expected = _exact_first_order_ift(problem)
    got = _call(problem, "t1t2", None)
    assert torch.equal(got[1], expected[1])
    err = _rel(got[0], expected[0])
    assert err <= 2e-5
    err_half = _rel(_call(problem, "t1t2", None, alpha=0.005)[0], expected[0])
    assert 3.0 <= err / err_half <= 5.0
    # t1t2 is SAMA-NA with the reference library's small default step
    same = _call(problem, "sama-na", None, alpha=0.01)
    assert all(torch.equal(x, y) for x, y in zip(got, same))
    assert get_method("t1t2").__kwdefaults__["alpha"] == 0.01


@pytest.mark.parametrize("method", ["neumann", "cg", "unrolled"])
def test_second_order_methods_explain_missing_double_backward(method):
    """torch's CPU SDPA kernel has no double backward: the error names the way out."""
    gen = _gen(4)
    q = torch.nn.Parameter(_randn(1, 2, 4, 8, gen=gen))
    lam = torch.nn.Parameter(_randn(4, gen=gen))

    def base_loss():
        return (F.scaled_dot_product_attention(q, q, q).sum(dim=(0, 1, 3)) * lam).sum() ** 2

    def meta_loss():
        return F.scaled_dot_product_attention(q, q, q).square().mean()

    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        meta_gradient(method, [q], [lam], base_loss, meta_loss)
    assert torch.equal(q, _randn(1, 2, 4, 8, gen=_gen(4)))
