"""Tests of CEM, DCEM and unrolled GD: optima, finite-difference gradients, limits, errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import dcem
from conftest import run_benchmark
from dcem.optim import IterationInfo

F64 = torch.float64


def quadratic(p: torch.Tensor):
    """0.5 x'x + p'x per problem; p: (B, d). The minimizer is -p."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x * x).sum(-1) + (x * p.unsqueeze(1)).sum(-1)

    return f


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_problem(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The regression-style cost: a 2-128-128-128-1 Softplus energy E(x, y) over y, B=100, d=1."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 128),
        torch.nn.Softplus(),
        torch.nn.Linear(128, 128),
        torch.nn.Softplus(),
        torch.nn.Linear(128, 128),
        torch.nn.Softplus(),
        torch.nn.Linear(128, 1),
    ).to(dtype)
    xs = torch.linspace(0, 2 * math.pi, 100, dtype=dtype).unsqueeze(-1)

    def f(y: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([xs.unsqueeze(1).expand(-1, y.shape[1], -1), y], -1)
        return net(inp).squeeze(-1)

    return net, f, torch.zeros(100, 1, dtype=dtype)


def test_quadratic_optimum() -> None:
    p = torch.randn(2, 2, generator=gen(1), dtype=F64)
    kw = dict(n_sample=100, n_elite=50, n_iter=40, generator=gen(2))
    x_dcem = dcem.dcem(quadratic(p), torch.zeros(2, 2, dtype=F64), 3.0, tau=1.0, **kw)
    assert (x_dcem + p).abs().max() < 1e-3
    x_cem = dcem.cem(quadratic(p), torch.zeros(2, 2, dtype=F64), 3.0, **kw)
    assert (x_cem + p).abs().max() < 1e-3


def test_single_problem_shape_and_module() -> None:
    p = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    out = dcem.dcem(quadratic(p), torch.zeros(3, dtype=F64), 2.0, n_iter=20, generator=gen())
    assert out.shape == (3,)
    module = dcem.DCEM(n_iter=20, init_sigma=2.0)
    assert torch.equal(module(quadratic(p), torch.zeros(3, dtype=F64), generator=gen()), out)


def _central_fd(fn, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(t)
    flat = grad.view(-1)
    for i in range(t.numel()):
        plus, minus = t.clone(), t.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        flat[i] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


@pytest.mark.parametrize("backward", ["full", "checkpoint"])
def test_gradients_match_finite_differences(backward: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=F64)
    a = w @ w.T + torch.eye(3, dtype=F64)  # a positive-definite quadratic with parameters
    p0 = torch.randn(2, 3, dtype=F64)
    mu0 = torch.randn(2, 3, dtype=F64)
    sigma0 = torch.full((2, 3), 1.5, dtype=F64)
    weight = torch.randn(2, 3, dtype=F64)

    def solve(p: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        def f(x: torch.Tensor) -> torch.Tensor:
            return 0.5 * torch.einsum("bni,ij,bnj->bn", x, a, x) + (x * p.unsqueeze(1)).sum(-1)

        out = dcem.dcem(
            f,
            mu,
            sigma,
            n_sample=20,
            n_elite=5,
            n_iter=3,
            tau=0.5,
            generator=gen(3),
            backward=backward,
        )
        return (out * weight).sum()

    args = [t.clone().requires_grad_() for t in (p0, mu0, sigma0)]
    solve(*args).backward()
    for i, name in enumerate(["p", "init_mu", "init_sigma"]):

        def along(t: torch.Tensor, i: int = i) -> torch.Tensor:
            full = [p0, mu0, sigma0]
            full[i] = t
            return solve(*full).detach()

        fd = _central_fd(along, [p0, mu0, sigma0][i])
        err = (args[i].grad - fd).norm() / fd.norm()
        assert err < 1e-4, (name, float(err))


@pytest.mark.parametrize("decomposition", ["noise", "centred"])
def test_refit_is_the_weighted_maximum_likelihood(decomposition: str) -> None:
    """``_refit(mu, sigma, e, w, k)`` is the weighted mean and (biased) std of the samples
    ``x = mu + sigma e`` written directly, in values and gradients (float64), for weights
    that sum to k or not, and for e the noise or the samples centred by a constant; a
    gradcheck covers its own derivative."""
    import importlib

    optim = importlib.import_module("dcem.optim")
    torch.manual_seed(0)
    mu = torch.randn(4, 3, dtype=F64, requires_grad=True)
    sigma = (torch.rand(4, 3, dtype=F64) + 0.5).requires_grad_()
    eps = torch.randn(4, 50, 3, dtype=F64)
    for total in (10.0, 9.5):
        w = (total * torch.softmax(torch.randn(4, 50, dtype=F64), -1)).requires_grad_()
        x = mu.unsqueeze(1) + sigma.unsqueeze(1) * eps
        direct_mu = (w.unsqueeze(-1) * x).sum(1) / 10
        direct_var = (w.unsqueeze(-1) * (x - direct_mu.unsqueeze(1)) ** 2).sum(1) / 10
        if decomposition == "noise":
            m2, s2 = optim._refit(mu, sigma, eps, w, 10)
        else:  # x = c + 1 * (x - c) for a constant c
            c = x.detach().mean(1) + 5.0
            m2, s2 = optim._refit(c, torch.ones_like(c), x - c.unsqueeze(1), w, 10)
        torch.testing.assert_close(m2, direct_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s2, direct_var.sqrt(), rtol=1e-12, atol=1e-12)
        probe = torch.randn(4, 6, dtype=F64)
        direct = torch.cat([direct_mu, direct_var.sqrt()], -1)
        g1 = torch.autograd.grad((direct * probe).sum(), [mu, sigma, w], retain_graph=True)
        g2 = torch.autograd.grad((torch.cat([m2, s2], -1) * probe).sum(), [mu, sigma, w])
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    e = eps[:2, :7].clone().requires_grad_()
    fn = lambda m, s, e, w: optim._refit(m, s, e, w, 3)  # noqa: E731
    args = (mu[:2].detach().requires_grad_(), sigma[:2].detach().requires_grad_(), e,
            (3 * torch.softmax(torch.randn(2, 7, dtype=F64), -1)).requires_grad_())  # fmt: skip
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("normalize", [True, False])
def test_soft_refit_gradcheck_with_non_finite_costs(normalize: bool) -> None:
    """Scores, soft top-k and refit (``_soft_refit``, autograd with the LML's implicit
    gradient) against finite differences in float64, with a non-finite cost in a problem:
    it gets weight exactly 0 and no gradient."""
    import importlib

    optim = importlib.import_module("dcem.optim")
    torch.manual_seed(1)
    v = torch.randn(3, 12, dtype=F64)
    v[1, 4] = math.inf
    v[2, 0] = math.nan
    v.requires_grad_()
    mu = torch.randn(3, 2, dtype=F64, requires_grad=True)
    sigma = (torch.rand(3, 2, dtype=F64) + 0.5).requires_grad_()
    eps = torch.randn(3, 12, 2, dtype=F64)

    def fn(v: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> tuple:
        out = optim._soft_refit(v, mu, sigma, eps, 4, 0.7, normalize)
        return out[0], out[1]

    w = optim._soft_refit(v, mu, sigma, eps, 4, 0.7, normalize)[2]
    assert w[1, 4] == 0 and w[2, 0] == 0
    torch.testing.assert_close(w.sum(-1), torch.full((3,), 4.0, dtype=F64))
    (g_v,) = torch.autograd.grad(sum(t.sum() for t in fn(v, mu, sigma)), [v])
    assert g_v[1, 4] == 0 and g_v[2, 0] == 0 and torch.isfinite(g_v).all()
    finite = torch.isfinite(v.detach())

    def on_finite(vf: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> tuple:
        return fn(v.detach().masked_scatter(finite, vf), mu, sigma)

    vf = v.detach()[finite].clone().requires_grad_()
    assert torch.autograd.gradcheck(on_finite, (vf, mu, sigma))


def test_large_problem_gradient_matches_finite_differences() -> None:
    """At (B, N, d) = (4, 100, 200) the directional derivative w.r.t. f's parameters,
    init_mu and init_sigma matches central differences (float64, common random numbers)."""
    batch, n, d = 4, 100, 200
    torch.manual_seed(0)
    p0 = torch.randn(batch, d, dtype=F64)
    mu0, sigma0 = torch.randn(batch, d, dtype=F64), torch.rand(batch, d, dtype=F64) + 0.5
    probe = torch.randn(batch, d, dtype=F64)
    dirs = [torch.randn(batch, d, dtype=F64) for _ in range(3)]

    def loss(p: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        f = lambda x: (0.5 * x.square() + p.unsqueeze(1) * x).sum(-1)  # noqa: E731
        out = dcem.dcem(f, mu, sigma, n_sample=n, n_elite=10, n_iter=3, generator=gen(4))
        return (out * probe).sum()

    args = [t.clone().requires_grad_() for t in (p0, mu0, sigma0)]
    grads = torch.autograd.grad(loss(*args), args)
    for i, (g, u) in enumerate(zip(grads, dirs, strict=True)):
        h = 1e-6
        plus = [t.clone() for t in (p0, mu0, sigma0)]
        minus = [t.clone() for t in (p0, mu0, sigma0)]
        plus[i] += h * u
        minus[i] -= h * u
        fd = (loss(*plus) - loss(*minus)) / (2 * h)
        assert float((g * u).sum()) == pytest.approx(float(fd), rel=1e-4), i


def test_large_problem_under_torch_func_matches_autograd() -> None:
    """torch.func.grad through dcem equals autograd's gradient (float64)."""
    batch, n, d = 4, 100, 200
    torch.manual_seed(1)
    p0 = torch.randn(batch, d, dtype=F64)
    probe = torch.randn(batch, d, dtype=F64)

    def loss(p: torch.Tensor) -> torch.Tensor:
        f = lambda x: (0.5 * x.square() + p.unsqueeze(1) * x).sum(-1)  # noqa: E731
        out = dcem.dcem(f, torch.zeros(batch, d, dtype=F64), 1.0, n_sample=n, n_iter=2,
                        generator=gen(5))  # fmt: skip
        return (out * probe).sum()

    p = p0.clone().requires_grad_()
    (g_autograd,) = torch.autograd.grad(loss(p), p)
    g_func = torch.func.grad(loss)(p0)
    torch.testing.assert_close(g_func, g_autograd, rtol=1e-9, atol=1e-12)


def test_small_tau_equals_cem_iterates() -> None:
    # Prop. 2's corollary: as tau -> 0 the soft elites become the hard ones. The
    # weights differ from 0/1 by about exp(-gap / tau), with gap the distance of
    # the k-th and (k+1)-th standardized scores, so the iterates agree to 1e-6
    # whenever every such gap exceeds ~30 tau; the test checks that it does.
    p = torch.randn(4, 3, generator=gen(5), dtype=F64)
    traces: dict[str, list[torch.Tensor]] = {"dcem": [], "cem": []}
    gaps: list[float] = []

    def record(name: str):
        def cb(info: IterationInfo) -> None:
            traces[name].append(torch.cat([info.mu, info.sigma], -1))
            if name == "cem":
                z = (info.costs - info.costs.mean(-1, keepdim=True)) / info.costs.std(
                    -1, keepdim=True
                )
                ranked = z.sort(-1).values
                gaps.append(float((ranked[:, 5] - ranked[:, 4]).min()))

        return cb

    kw = dict(n_sample=20, n_elite=5, n_iter=6, normalize=True)
    mu0 = torch.zeros(4, 3, dtype=F64)
    dcem.dcem(quadratic(p), mu0, 2.0, tau=1e-4, generator=gen(6), callback=record("dcem"), **kw)
    dcem.cem(quadratic(p), mu0, 2.0, generator=gen(6), callback=record("cem"), **kw)
    assert min(gaps) > 30 * 1e-4
    for a, b in zip(traces["dcem"], traces["cem"], strict=True):
        assert (a - b).abs().max() < 1e-6
    # the reference's inverse convention (temp = 1e-4 multiplying) would give weights ~ k/N
    soft: list[IterationInfo] = []
    dcem.dcem(quadratic(p), mu0, 2.0, tau=1e4, generator=gen(6), callback=soft.append, **kw)
    assert torch.allclose(soft[0].weights, torch.full_like(soft[0].weights, 5 / 20), atol=1e-3)


def test_checkpoint_is_bit_identical() -> None:
    net, f, y0 = mlp_problem(dtype=F64)
    grads = {}
    outs = {}
    for mode in ["full", "checkpoint"]:
        net.zero_grad()
        out = dcem.dcem(f, y0, 7.0, n_iter=4, generator=gen(11), backward=mode)
        out.sum().backward()
        outs[mode] = out.detach()
        grads[mode] = [q.grad.clone() for q in net.parameters()]
    assert torch.equal(outs["full"], outs["checkpoint"])
    for a, b in zip(grads["full"], grads["checkpoint"], strict=True):
        assert torch.equal(a, b)


def test_generator_reproducible_and_global_rng_used_otherwise() -> None:
    p = torch.randn(2, 2, dtype=F64)
    a = dcem.dcem(quadratic(p), torch.zeros(2, 2, dtype=F64), n_iter=3, generator=gen(1))
    b = dcem.dcem(quadratic(p), torch.zeros(2, 2, dtype=F64), n_iter=3, generator=gen(1))
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = dcem.dcem(quadratic(p), torch.zeros(2, 2, dtype=F64), n_iter=3)
    torch.manual_seed(0)
    d = dcem.dcem(quadratic(p), torch.zeros(2, 2, dtype=F64), n_iter=3)
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_bounds_clamp_samples_and_result() -> None:
    p = torch.tensor([[-5.0, 5.0]], dtype=F64)  # optimum (5, -5) lies outside the box
    seen: list[IterationInfo] = []
    out = dcem.dcem(
        quadratic(p),
        torch.zeros(1, 2, dtype=F64),
        3.0,
        lb=-1.0,
        ub=torch.tensor([2.0, 1.0]),
        n_iter=10,
        generator=gen(),
        callback=seen.append,
    )
    for info in seen:
        assert info.samples[..., 0].min() >= -1 and info.samples[..., 0].max() <= 2
        assert info.samples[..., 1].min() >= -1 and info.samples[..., 1].max() <= 1
    assert torch.allclose(out, torch.tensor([[2.0, -1.0]], dtype=F64), atol=0.05)
    best = dcem.cem(
        quadratic(p), torch.zeros(1, 2, dtype=F64), 3.0, lb=-1.0, ub=1.0, generator=gen()
    )
    assert best.abs().max() <= 1.0


def test_cem_return_best_and_no_grad() -> None:
    p = torch.randn(3, 2, generator=gen(9), dtype=F64).requires_grad_()
    mean = dcem.cem(quadratic(p), torch.zeros(3, 2, dtype=F64), n_iter=3, generator=gen(1))
    best = dcem.cem(
        quadratic(p), torch.zeros(3, 2, dtype=F64), n_iter=3, generator=gen(1), return_best=True
    )
    assert not mean.requires_grad and not best.requires_grad
    # the best sample over all iterations is no worse than any sample of the first iteration
    first: list[IterationInfo] = []
    dcem.cem(
        quadratic(p),
        torch.zeros(3, 2, dtype=F64),
        n_iter=1,
        generator=gen(1),
        callback=first.append,
    )
    f = quadratic(p.detach())
    assert torch.all(f(best.unsqueeze(1)).squeeze(1) <= first[0].costs.min(-1).values + 1e-12)
    mu0 = torch.zeros(3, 2, dtype=F64, requires_grad=True)  # hard elites pass gradients to mu0 only
    assert dcem.cem(quadratic(p), mu0, n_iter=2, grad=True).requires_grad
    assert not dcem.cem(quadratic(p), mu0, n_iter=2).requires_grad


def test_nonfinite_costs_rank_last() -> None:
    p = torch.zeros(2, 2, dtype=F64)
    base = quadratic(p)

    def f(x: torch.Tensor) -> torch.Tensor:
        v = base(x)
        v = torch.where(x[..., 0] > 0.5, torch.full_like(v, math.nan), v)
        return torch.where(x[..., 1] > 0.5, torch.full_like(v, math.inf), v)

    for solver in ("dcem", "cem"):
        seen: list[IterationInfo] = []
        getattr(dcem, solver)(
            f, torch.zeros(2, 2, dtype=F64), n_iter=3, generator=gen(), callback=seen.append
        )
        assert (~torch.isfinite(seen[0].costs)).any()
        for info in seen:
            bad = ~torch.isfinite(info.costs)
            if bad.any():
                assert info.weights[bad].max() < 1e-12
            assert torch.allclose(info.weights.sum(-1), torch.full((2,), 10.0, dtype=F64))

    def all_bad_second(x: torch.Tensor) -> torch.Tensor:
        v = base(x)
        v[1] = math.nan
        return v

    for solver in ("dcem", "cem"):
        with pytest.raises(ValueError, match=r"problem\(s\) \[1\]"):
            getattr(dcem, solver)(all_bad_second, torch.zeros(2, 2, dtype=F64), generator=gen())


def test_pruned_keeping_everything_equals_full_and_drops_graph_otherwise() -> None:
    net, f, y0 = mlp_problem(seed=1, dtype=F64)
    target = torch.linspace(0, 2 * math.pi, 100, dtype=F64).unsqueeze(-1)

    def grads(mode: str, n_keep: int, **kw: int) -> tuple[torch.Tensor, torch.Tensor]:
        net.zero_grad()
        out = dcem.dcem(f, y0, 7.0, n_iter=3, generator=gen(4), backward=mode, n_keep=n_keep, **kw)
        ((out - target * torch.sin(target)) ** 2).mean().backward()
        return out.detach(), torch.cat([q.grad.flatten() for q in net.parameters()])

    out_full, g_full = grads("full", 30)
    out_all, g_all = grads("pruned", 100)
    assert torch.equal(out_full, out_all)
    assert torch.allclose(g_all, g_full, rtol=1e-9, atol=1e-9 * g_full.abs().max())
    out_30, g_30 = grads("pruned", 30)
    assert torch.equal(out_full, out_30)  # the forward pass is exact
    err = float((g_30 - g_full).norm() / g_full.norm())
    assert 0 < err < 0.05  # the backward pass is an approximation, a close one here
    # without anchors the dropped samples all borrow the mean's gradient: far worse
    _, g_bare = grads("pruned", 30, n_anchor=0)
    assert float((g_bare - g_full).norm() / g_full.norm()) > 3 * err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_sample=10, n_elite=10), "n_elite must be < n_sample"),
        (dict(n_iter=0), "n_iter"),
        (dict(init_sigma=0.0), "init_sigma"),
        (dict(init_sigma=torch.tensor([1.0, -1.0])), "init_sigma"),
        (dict(init_sigma=torch.ones(3)), r"init_sigma of shape \(3,\)"),
        (dict(lb=1.0, ub=0.0), "lb must be < ub"),
        (dict(tau=0.0), "tau"),
        (dict(backward="sometimes"), "backward"),
        (dict(backward="pruned", n_keep=5), "n_keep must be an integer >= 10"),
        (dict(backward="pruned", n_anchor=-1), "n_anchor must be an integer >= 0"),
        (dict(init_sigma=torch.ones(2, device="meta")), "device"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    p = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=match):
        dcem.dcem(quadratic(p), torch.zeros(1, 2), **kwargs)


def test_bad_cost_function() -> None:
    with pytest.raises(ValueError, match=r"shape \(B, N\) = \(1, 100\).*got \(1, 100, 2\)"):
        dcem.dcem(lambda x: x, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="floating"):
        dcem.cem(lambda x: (x.sum(-1) > 0).long(), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="init_mu"):
        dcem.dcem(lambda x: x.sum(-1), torch.zeros(1, 2, 3))


def test_unroll_gd_matches_closed_form_and_fd() -> None:
    # f(y) = 0.5 a ||y||^2 + b'y: y_T = (1 - lr a)^T y0 - b (1 - (1 - lr a)^T) / a
    a = torch.tensor(2.0, dtype=F64, requires_grad=True)
    b = torch.tensor([[0.3, -0.7]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0]], dtype=F64)

    def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dcem.unroll_gd(
            lambda y: 0.5 * a * (y * y).sum(-1) + (b * y).sum(-1), y0, n_iter=5, lr=0.1
        )

    y = solve(a, b)
    r = 1 - 0.1 * a.detach()
    closed = r**5 * y0 - b.detach() * (1 - r**5) / a.detach()
    assert torch.allclose(y.detach(), closed, atol=1e-12)
    y.sum().backward()
    fd_a = (
        solve(a.detach() + 1e-6, b.detach()) - solve(a.detach() - 1e-6, b.detach())
    ).sum() / 2e-6
    assert torch.allclose(a.grad, fd_a, rtol=1e-6)
    with torch.no_grad():
        assert not solve(a, b).requires_grad
    with pytest.raises(ValueError, match="n_iter"):
        dcem.unroll_gd(lambda y: y.sum(-1), y0, n_iter=0, lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        dcem.unroll_gd(lambda y: y, y0, n_iter=2, lr=0.1)


def test_benchmark_runs_tiny(tmp_path: Path) -> None:
    """The optimizer benchmark at tiny size: eager and compiled (aot_eager backend) timings
    with their ratios, compile costs, the new batch size (no recompile) and the fresh
    process with a warm cache, the targets section, the backward modes."""
    result = run_benchmark("optim", tmp_path)
    assert result["default"] == "eager" and result["compile_backend"] == "aot_eager"
    rows = result["results"]
    for row in rows:
        assert row["noise_floor_s"] > 0 and row["dcem_fwd_bwd_s"] > 0 and row["cem_fwd_s"] > 0
        assert 0 < row["f_fwd_s"] < row["f_fwd_bwd_s"]  # the cost alone, for the split
        assert row["dcem_over_floor"] == pytest.approx(row["dcem_fwd_bwd_s"] / row["noise_floor_s"])
        base = row["baseline_dcem_fwd_bwd_s"]
        assert row["dcem_speedup_vs_baseline"] == pytest.approx(base / row["dcem_fwd_bwd_s"])
    compiled = rows[-1]  # --tiny compiles at its last size only
    assert "compiled_dcem_fwd_bwd_s" not in rows[0]
    assert compiled["compiled_dcem_fwd_bwd_s"] > 0 and compiled["compiled_cem_fwd_s"] > 0
    assert compiled["compile"]["dcem_first_call_s"] > compiled["compiled_dcem_fwd_bwd_s"]
    assert result["new_batch_size"]["recompiled"] is False
    assert result["new_batch_size"]["B"] == compiled["B"] // 2
    assert result["warm_cache_process"]["dcem_first_call_s"] > 0
    assert set(result["targets"]) == {"dcem_1x2"}  # the other target sizes are not tiny
    modes = result["mlp"]["backward_modes"]
    assert modes["checkpoint"]["grad_rel_error"] == 0.0
    assert modes["checkpoint"]["peak_bytes"] < modes["full"]["peak_bytes"]
    assert modes["pruned"]["peak_bytes"] < modes["full"]["peak_bytes"]


def test_benchmark_cost_forms_are_the_same_quadratic() -> None:
    """The optimizer benchmark times its quadratic written four ways: each is
    ``0.5 x'x + p'x`` with gradient ``x + p`` (float64)."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        forms = importlib.import_module("optim").cost_forms
    finally:
        sys.path.pop(0)
    p = torch.randn(3, 4, generator=gen(6), dtype=F64)
    x = torch.randn(3, 5, 4, generator=gen(7), dtype=F64, requires_grad=True)
    expected = 0.5 * (x * x).sum(-1) + (x * p.unsqueeze(1)).sum(-1)
    for name, f in forms(p).items():
        value = f(x)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12, msg=name)
        (grad,) = torch.autograd.grad(value.sum(), x)
        torch.testing.assert_close(grad, x + p.unsqueeze(1), rtol=1e-12, atol=1e-12, msg=name)


def test_trace_records_per_iteration_summaries() -> None:
    p = torch.randn(3, 2, generator=gen(2), dtype=F64)
    trace = dcem.Trace()
    seen: list[IterationInfo] = []

    def both(info: IterationInfo) -> None:
        trace(info)
        seen.append(info)

    out = dcem.dcem(
        quadratic(p), torch.zeros(3, 2, dtype=F64), 2.0, n_iter=5, generator=gen(), callback=both
    )
    assert len(trace.mu) == len(trace.sigma) == len(trace.mean_cost) == len(trace.elite_cost) == 5
    assert torch.equal(trace.mu[-1], out.detach())
    for info, mean, elite in zip(seen, trace.mean_cost, trace.elite_cost, strict=True):
        assert torch.allclose(mean, info.costs.mean(-1))
        assert torch.allclose(elite, (info.weights * info.costs).sum(-1) / 10)
        assert torch.all(elite <= mean)  # the elites are the cheaper samples


def test_second_derivatives_match_finite_differences_in_autograd_and_torch_func() -> None:
    """d2 out / dp2 through dcem (the LML's implicit backward is itself differentiable):
    torch.func.grad of torch.func.grad, and autograd with create_graph, both equal central
    differences of the first derivative (float64)."""

    def out(p: torch.Tensor) -> torch.Tensor:
        cost = lambda x: ((x - p) ** 2 * (1 + x**2)).sum(-1)  # noqa: E731
        return dcem.dcem(cost, torch.zeros(1, 2, dtype=F64), n_iter=3, generator=gen(0))[0, 0]

    p = torch.tensor([0.3, -0.2], dtype=F64)
    grad0 = lambda p: torch.func.grad(out)(p)[0]  # noqa: E731
    second = torch.func.grad(grad0)(p)
    q = p.clone().requires_grad_()
    (g,) = torch.autograd.grad(out(q), q, create_graph=True)
    (second_autograd,) = torch.autograd.grad(g[0], q)
    torch.testing.assert_close(second_autograd, second, rtol=1e-9, atol=1e-12)
    h = 1e-5
    for i in range(2):
        e = torch.zeros(2, dtype=F64)
        e[i] = h
        fd = (grad0(p + e) - grad0(p - e)) / (2 * h)
        assert abs(float(second[i]) - float(fd)) <= 1e-4 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_agrees_with_float32(dtype: torch.dtype) -> None:
    p32 = torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]])
    outs, grads = [], []
    for dt in (torch.float32, dtype):
        p = p32.to(dt).clone().requires_grad_()
        cost = lambda x, p=p: ((x - p.unsqueeze(1)) ** 2).sum(-1)  # noqa: E731
        out = dcem.dcem(cost, torch.zeros(2, 3, dtype=dt), n_iter=10, generator=gen(3))
        out.sum().backward()
        assert out.dtype == dt and p.grad is not None and p.grad.dtype == dt
        outs.append(out.float())
        grads.append(p.grad.float())
    assert torch.allclose(outs[1], p32, atol=0.15)  # the optimum of sum (x - p)^2 is p
    assert torch.isfinite(grads[1]).all()
    assert (grads[1] - grads[0]).norm() <= 0.25 * grads[0].norm()


# ----------------------------------------------------------------------------- compile=True


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> Any:
    """dcem.optim with a fresh compile cache and the aot_eager backend (dynamo's tracing and
    AOTAutograd's joint graph, without inductor's code generation: seconds, not minutes)."""
    import importlib

    optim = importlib.import_module("dcem.optim")
    torch._dynamo.reset()
    monkeypatch.setattr(optim, "_COMPILED", {})
    monkeypatch.setattr(optim, "_BACKEND", "aot_eager")
    yield optim
    torch._dynamo.reset()


def _solve_and_grad(solver: str, batch: int, bad: bool = False, **kw: Any) -> tuple:
    p = torch.randn(batch, 3, generator=gen(batch), dtype=F64).requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        v = 0.5 * (x * x).sum(-1) + (x * p.unsqueeze(1)).sum(-1)
        return torch.where(x[..., 0] > 1.0, math.inf, v) if bad else v

    out = getattr(dcem, solver)(f, torch.zeros(batch, 3, dtype=F64), 1.5, n_sample=30,
                                n_elite=5, n_iter=3, generator=gen(1), **kw)  # fmt: skip
    if not out.requires_grad:
        return out, None
    (g,) = torch.autograd.grad(out.sum(), p)
    return out.detach(), g


@pytest.mark.parametrize("backward", ["full", "checkpoint", "pruned"])
def test_compiled_dcem_equals_eager_and_a_new_batch_size_does_not_recompile(
    compiled: Any, backward: str
) -> None:
    from torch._dynamo.utils import counters

    kw: dict[str, Any] = dict(backward=backward, n_keep=10) if backward == "pruned" else {}
    for batch in (4, 6):  # the second size reuses the first one's graphs (dynamic shapes)
        before = counters["stats"]["unique_graphs"]
        out_c, g_c = _solve_and_grad("dcem", batch, compile=True, **kw)
        if batch == 6:
            assert counters["stats"]["unique_graphs"] == before
        out_e, g_e = _solve_and_grad("dcem", batch, **kw)
        torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_c, g_e, rtol=1e-8, atol=1e-10)
    assert compiled._COMPILED[f"_dcem_step{'_pruned' if backward == 'pruned' else ''}"]


def test_compiled_cem_equals_eager(compiled: Any) -> None:
    for batch in (3, 5):
        out_c, _ = _solve_and_grad("cem", batch, compile=True)
        out_e, _ = _solve_and_grad("cem", batch)
        torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["dcem", "cem"])
def test_compiled_iteration_with_non_finite_costs_runs_again_eagerly(
    compiled: Any, solver: str
) -> None:
    """Non-finite costs send an iteration back to the eager code: the same result as eager
    (within rounding), the weights of the non-finite costs exactly 0, and a problem left
    with too few finite costs raises the eager error."""
    out_c, g_c = _solve_and_grad(solver, 4, bad=True, compile=True)
    out_e, g_e = _solve_and_grad(solver, 4, bad=True)
    torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
    if g_e is not None:
        torch.testing.assert_close(g_c, g_e, rtol=1e-8, atol=1e-10)

    def hopeless(x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:2], math.nan, dtype=x.dtype)

    with pytest.raises(ValueError, match=r"no finite cost for problem\(s\) \[0, 1\]"):
        getattr(dcem, solver)(hopeless, torch.zeros(2, 3), compile=True)


def test_compile_failure_warns_once_and_runs_eagerly(
    compiled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_backend(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "_BACKEND", broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile of _dcem_step failed") as record:
        out_c, g_c = _solve_and_grad("dcem", 3, compile=True)
        out_c2, _ = _solve_and_grad("dcem", 3, compile=True)
    assert sum("torch.compile" in str(w.message) for w in record) == 1
    assert compiled._COMPILED["_dcem_step"] is None
    out_e, g_e = _solve_and_grad("dcem", 3)
    assert torch.equal(out_c, out_e) and torch.equal(g_c, g_e) and torch.equal(out_c2, out_e)


def test_compiled_call_raises_the_callers_errors_without_a_warning(compiled: Any) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"f must return costs of shape \(B, N\)"):
            dcem.dcem(lambda x: x.sum(), torch.zeros(2, 3), compile=True)
    assert compiled._COMPILED.get("_dcem_step") is not None  # not marked as broken


def test_compile_is_off_by_default_and_checked(compiled: Any) -> None:
    _solve_and_grad("dcem", 2)
    dcem.cem(lambda x: x.square().sum(-1), torch.zeros(2, 3))
    assert compiled._COMPILED == {}  # nothing compiled unless asked
    with pytest.raises(TypeError, match="compile must be True or False"):
        dcem.dcem(lambda x: x.square().sum(-1), torch.zeros(2, 3), compile="yes")
    with pytest.raises(TypeError, match="compile must be True or False"):
        dcem.DCEM(compile=1)


def test_given_noise_reproduces_the_generator_and_is_batch_invariant() -> None:
    """``noise`` holds the draws a generator would make: same answer as that generator; each
    problem solved alone with its slice of the noise equals the batched solve; the
    checkpointed backward from given noise equals the full one."""
    B, N, d, T = 3, 40, 2, 5
    p = torch.randn(B, d, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return ((x - p.unsqueeze(1)) ** 2).sum(-1) + torch.sin(3 * x).sum(-1)

    kw: dict[str, Any] = dict(n_sample=N, n_elite=5, n_iter=T, tau=0.5)
    gen = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.randn(B, N, d, generator=gen, dtype=F64) for _ in range(T)])
    mu0 = torch.zeros(B, d, dtype=F64)
    with_gen = dcem.dcem(f, mu0, 1.0, generator=torch.Generator().manual_seed(7), **kw)
    with_noise = dcem.dcem(f, mu0, 1.0, noise=noise, **kw)
    assert torch.equal(with_gen, with_noise)
    for b in range(B):

        def f_one(x: torch.Tensor, b: int = b) -> torch.Tensor:  # problem b alone: (1, N, d)
            return ((x - p[b]) ** 2).sum(-1) + torch.sin(3 * x).sum(-1)

        alone = dcem.dcem(f_one, mu0[b], 1.0, noise=noise[:, b], **kw)
        torch.testing.assert_close(alone, with_noise[b], rtol=1e-12, atol=1e-12)
    (g_full,) = torch.autograd.grad(with_noise.sum(), p)
    out = dcem.dcem(f, mu0, 1.0, noise=noise, backward="checkpoint", **kw)
    (g_ckpt,) = torch.autograd.grad(out.sum(), p)
    torch.testing.assert_close(g_ckpt, g_full, rtol=1e-12, atol=1e-12)
    assert g_full.abs().sum() > 0


def test_bad_noise_is_refused_naming_it() -> None:
    f = lambda x: x.square().sum(-1)  # noqa: E731
    mu = torch.zeros(2, 3)
    good = torch.randn(4, 2, 10, 3)
    with pytest.raises(ValueError, match="noise or generator, not both"):
        dcem.dcem(f, mu, n_sample=10, n_elite=2, n_iter=4, noise=good,
                  generator=torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match=r"noise must have shape \(n_iter, B, N, d\)"):
        dcem.dcem(f, mu, n_sample=10, n_elite=2, n_iter=5, noise=good)
    with pytest.raises(ValueError, match="noise must be torch.float32"):
        dcem.dcem(f, mu, n_sample=10, n_elite=2, n_iter=4, noise=good.double())
    with pytest.raises(TypeError, match="noise must be a tensor"):
        dcem.dcem(f, mu, n_sample=10, n_elite=2, n_iter=4, noise=[1.0])
