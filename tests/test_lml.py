"""Tests of the LML projection: constraint accuracy, an independent solver, gradients, limits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import expit

import dcem
from conftest import run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def scores(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=dtype)
    if kind == "cauchy":
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        return torch.tan(math.pi * (u - 0.5)).to(dtype)
    if kind == "tied":
        return 0.7 + 1e-6 * torch.rand(shape, generator=gen, dtype=dtype)
    if kind == "bimodal":
        modes = 4.0 * torch.randint(0, 2, shape, generator=gen).to(dtype)
        return modes + 0.1 * torch.randn(shape, generator=gen, dtype=dtype)
    raise ValueError(kind)


def reference_dual(x: np.ndarray, k: float, tau: float) -> np.ndarray:
    """Independent float64 solver: SciPy's brentq on sum(sigmoid((x + nu) / tau)) = k."""
    z = x / tau

    def g(nu: float) -> float:
        return float(expit(z + nu).sum() - k)

    lo, hi = -z.max() - 40.0, -z.min() + 40.0
    nu = brentq(g, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    return expit(z + nu)


@pytest.mark.parametrize("kind", ["gaussian", "cauchy", "tied", "bimodal"])
@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_constraint_float64(kind: str, n: int) -> None:
    rows = 2 if n == 100_000 else 8
    x = scores(kind, (rows, n), torch.float64, seed=n)
    for tau in [1e-3, 1e-1, 1.0, 10.0, 1e3]:
        for k in sorted({1, max(1, n // 10), n // 2, n - 1}):
            y = dcem.lml(x, k, tau)
            err = (y.sum(-1) - k).abs().max().item()
            assert err <= 1e-9 * max(1, k), (kind, n, tau, k, err)
            assert torch.all((y >= 0) & (y <= 1))


@pytest.mark.parametrize("kind", ["gaussian", "cauchy", "bimodal"])
@pytest.mark.parametrize("n", [10, 1000, 10_000])
def test_constraint_float32(kind: str, n: int) -> None:
    x = scores(kind, (4, n), torch.float32, seed=n + 1)
    for tau in [1e-2, 1e-1, 1.0, 100.0]:
        for k in sorted({1, max(1, n // 10), n // 2, n - 1}):
            y = dcem.lml(x, k, tau)
            assert y.dtype == torch.float32
            err = (y.double().sum(-1) - k).abs().max().item()
            assert err <= 1e-4 * max(1, k), (kind, n, tau, k, err)


@pytest.mark.parametrize("kind", ["gaussian", "cauchy", "tied", "bimodal"])
def test_matches_brentq(kind: str) -> None:
    x = scores(kind, (3, 200), torch.float64, seed=7)
    for tau in [1e-2, 1.0, 100.0]:
        for k in [1, 20, 150]:
            y = dcem.lml(x, k, tau)
            for row in range(x.shape[0]):
                ref = reference_dual(x[row].numpy(), k, tau)
                np.testing.assert_allclose(y[row].numpy(), ref, rtol=0, atol=1e-8)


def test_solution_is_the_projection_kkt() -> None:
    # y = sigmoid((x + nu) / tau) for one scalar nu: logit(y) * tau - x is constant per row.
    x = scores("gaussian", (5, 50), torch.float64)
    y = dcem.lml(x, 7, 0.5)
    nu = torch.logit(y) * 0.5 - x
    assert (nu - nu.mean(-1, keepdim=True)).abs().max() < 1e-8


def test_leading_batch_dims_and_module() -> None:
    x = scores("gaussian", (2, 3, 4, 30), torch.float32)
    y = dcem.lml(x, 5, 0.3)
    assert y.shape == x.shape
    flat = dcem.lml(x.reshape(-1, 30), 5, 0.3).reshape(x.shape)
    assert torch.equal(y, flat)
    module = dcem.LML(5, tau=0.3)
    assert torch.equal(module(x), y)
    single = dcem.lml(x[0, 0, 0], 5, 0.3)
    assert torch.allclose(single, y[0, 0, 0])


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_gradcheck(tau: float, k: int) -> None:
    x = scores("gaussian", (3, 10), torch.float64, seed=k).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dcem.lml(t, k, tau), (x,), eps=1e-6, atol=1e-7)


def test_gradgradcheck() -> None:
    x = scores("gaussian", (2, 6), torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: dcem.lml(t, 2, 0.7), (x,), eps=1e-6, atol=1e-6)


def test_jacrev_matches_closed_form() -> None:
    x = scores("gaussian", (12,), torch.float64)
    tau, k = 0.8, 4
    jac = torch.func.jacrev(lambda t: dcem.lml(t, k, tau))(x)
    y = dcem.lml(x, k, tau)
    h = y * (1 - y)
    closed = (torch.diag(h) - torch.outer(h, h) / h.sum()) / tau
    assert torch.allclose(jac, closed, atol=1e-12)
    fd = torch.autograd.functional.jacobian(lambda t: dcem.lml(t, k, tau), x)
    assert torch.allclose(jac, fd, atol=1e-12)


def test_vmap_matches_batched_call() -> None:
    x = scores("gaussian", (4, 3, 20), torch.float64)
    batched = dcem.lml(x, 6, 0.5)
    mapped = torch.func.vmap(lambda t: dcem.lml(t, 6, 0.5))(x)
    assert torch.allclose(mapped, batched, atol=1e-14)
    mapped_inner = torch.func.vmap(lambda t: dcem.lml(t, 6, 0.5), in_dims=1, out_dims=1)(x)
    assert torch.allclose(mapped_inner, batched, atol=1e-14)
    grads = torch.func.vmap(torch.func.grad(lambda t: (dcem.lml(t, 6, 0.5) * t).sum()))(x)
    x_req = x.clone().requires_grad_()
    (dcem.lml(x_req, 6, 0.5) * x_req).sum().backward()
    assert torch.allclose(grads, x_req.grad, atol=1e-12)


def test_small_tau_gives_topk_mask() -> None:
    x = scores("gaussian", (6, 40), torch.float64)
    for k in [1, 5, 39]:
        y = dcem.lml(x, k, 1e-6)
        assert torch.allclose(y, dcem.topk_mask(x, k), atol=1e-12)


def test_topk_mask() -> None:
    x = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(dcem.topk_mask(x, 2), expected)
    assert torch.equal(dcem.topk_mask(x, 4), torch.ones_like(x))
    with pytest.raises(ValueError, match="k"):
        dcem.topk_mask(x, 1.5)


def test_k_equals_n() -> None:
    x = scores("gaussian", (3, 8), torch.float64).requires_grad_()
    y = dcem.lml(x, 8, 0.5)
    assert torch.equal(y, torch.ones_like(y))
    (y * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_infinite_scores() -> None:
    inf = math.inf
    x = torch.tensor(
        [[inf, 0.1, -inf, 0.3, -0.2], [inf, inf, 0.0, 1.0, -inf], [-inf, 2.0, 1.0, 0.0, -1.0]],
        dtype=torch.float64,
    )
    y = dcem.lml(x, 2, 0.5)
    assert torch.isfinite(y).all()
    assert torch.allclose(y.sum(-1), torch.full((3,), 2.0, dtype=torch.float64), atol=1e-10)
    assert y[0, 0] == 1 and y[1, 0] == 1 and y[1, 1] == 1
    assert y[0, 2] == 0 and y[1, 4] == 0 and y[2, 0] == 0
    assert torch.all(y[1, 2:4] == 0)  # the two +inf entries fill k = 2
    # the finite entries of row 0 are the projection of those entries with k - 1
    sub = dcem.lml(x[0, [1, 3, 4]], 1, 0.5)
    assert torch.allclose(y[0, [1, 3, 4]], sub, atol=1e-10)
    with pytest.raises(ValueError, match=r"\+inf"):
        dcem.lml(torch.tensor([inf, inf, inf, 0.0]), 2)


def test_huge_inputs_tiny_tau_are_finite() -> None:
    for dtype in (torch.float32, torch.float64):
        x = 1e6 * scores("gaussian", (4, 100), dtype)
        x = x.requires_grad_()
        y = dcem.lml(x, 10, 1e-4)
        assert torch.isfinite(y).all()
        y.backward(torch.randn_like(y))
        assert torch.isfinite(x.grad).all()


def test_half_precision_follows_input() -> None:
    x = scores("gaussian", (3, 50), torch.float32).to(torch.bfloat16)
    y = dcem.lml(x, 5)
    assert y.dtype == torch.bfloat16
    assert (y.float().sum(-1) - 5).abs().max() < 0.1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(5), 0), "k"),
        ((torch.randn(5), 6), "k"),
        ((torch.randn(5), 2, 0.0), "tau"),
        ((torch.randn(5), 2, -1.0), "tau"),
        ((torch.arange(5), 2), "dtype"),
        ((torch.randn(3, 0), 1), "last dimension"),
        ((torch.tensor([0.1, float("nan"), 0.3]), 1), "NaN"),
    ],
)
def test_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dcem.lml(*args)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=30),
    k_frac=st.floats(0.0, 1.0),
    tau=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_properties(data: list[float], k_frac: float, tau: float, seed: int) -> None:
    x = torch.tensor(data, dtype=torch.float64)
    n = x.numel()
    k = 1 + round(k_frac * (n - 1))
    y = dcem.lml(x, k, tau)
    assert torch.all((y >= 0) & (y <= 1))
    assert abs(y.sum().item() - k) <= 1e-9 * max(1, k)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(dcem.lml(x[perm], k, tau), y[perm], atol=1e-12)
    i = seed % n
    bumped = x.clone()
    bumped[i] += 0.5
    y2 = dcem.lml(bumped, k, tau)
    slack = 1e-11 * max(1, k)  # the root find's float64 tolerance on sum(y) = k
    assert y2[i] >= y[i] - slack  # raising a score never lowers its weight
    others = torch.arange(n) != i
    assert torch.all(y2[others] <= y[others] + slack)


def test_benchmark_runs_tiny(tmp_path: Path) -> None:
    result = run_benchmark("lml", tmp_path)
    for row in result["results"]:
        assert row["lml_fwd_bwd_s"] > 0 and row["elementwise_s"] > 0
        assert row["max_constraint_error"] <= 1e-4 * row["k"]


def test_torch_compile_runs_with_graph_breaks() -> None:
    # Documented: dynamo breaks the graph at the data-dependent checks and runs lml eagerly.
    torch._dynamo.reset()
    x = scores("gaussian", (4, 10), torch.float32).requires_grad_()
    compiled = torch.compile(lambda t: (dcem.lml(t, 3, 0.5) * t).sum(), backend="eager")
    compiled(x).backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    (dcem.lml(x, 3, 0.5) * x).sum().backward()
    assert torch.allclose(grad_compiled, x.grad, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfinished_form_is_stage_one_and_compiles_into_one_graph(dtype: torch.dtype) -> None:
    """``_lml(..., finish=False)`` (what dcem's compiled iteration uses) is stage 1 alone:
    where it reports convergence it equals the exact projection; rows it cannot finish
    (heavy tails at small tau, +-inf) make ``ok`` False. It traces into one graph with
    its implicit backward (``fullgraph=True``), and the finished form equals lml."""
    import importlib

    lml_module = importlib.import_module("dcem.lml")
    easy = scores("gaussian", (6, 50), dtype, seed=3)
    y, ok = lml_module._lml(easy, 7, 0.5, False)
    assert ok is not None and bool(ok)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, dcem.lml(easy, 7, 0.5), atol=tol, rtol=0)
    hard = torch.cat([easy, 1e4 * scores("cauchy", (1, 50), dtype, seed=4)])
    assert not bool(lml_module._lml(hard, 7, 1e-3, False)[1])
    with_inf = easy.clone()
    with_inf[0, 0] = math.inf
    assert not bool(lml_module._lml(with_inf, 7, 0.5, False)[1])
    y_exact, ok_exact = lml_module._lml(hard, 7, 1e-3, True)
    assert ok_exact is None and torch.equal(y_exact, dcem.lml(hard, 7, 1e-3))

    torch._dynamo.reset()
    x = easy.clone().requires_grad_()
    step = torch.compile(
        lambda t: lml_module._lml(t, 7, 0.5, False), backend="aot_eager", fullgraph=True
    )
    y_c, ok_c = step(x)
    (y_c * torch.arange(50, dtype=dtype)).sum().backward()
    assert bool(ok_c)
    grad_c, x.grad = x.grad, None
    (dcem.lml(x, 7, 0.5) * torch.arange(50, dtype=dtype)).sum().backward()
    torch.testing.assert_close(y_c, y.detach())
    torch.testing.assert_close(grad_c, x.grad, atol=10 * tol, rtol=0)
