"""The optional C loops (dcem._native): same sums as NumPy, and a safe build."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

native = importlib.import_module("dcem._native")
needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C compiler")


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 7, 16, 37])  # around the 16 partial sums of the vjp
def test_kernels_equal_numpy_sums(dtype: type, d: int) -> None:
    rng = np.random.default_rng(d)
    batch, n = 5, 23
    w = rng.random((batch, n)).astype(dtype)
    eps = rng.standard_normal((batch, n, d)).astype(dtype)
    g = rng.standard_normal((batch, n, d)).astype(dtype)
    g_a, g_q = rng.standard_normal((2, batch, d)).astype(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-13, "atol": 1e-13}
    a, q = native.noise_moments(w, eps)
    np.testing.assert_allclose(a, np.einsum("bn,bnd->bd", w, eps), **tol)
    np.testing.assert_allclose(q, np.einsum("bn,bnd->bd", w, eps * eps), **tol)
    g_w = native.noise_moments_vjp(eps, g_a, g_q)
    expected = np.einsum("bnd,bd->bn", eps, g_a) + np.einsum("bnd,bd->bn", eps * eps, g_q)
    np.testing.assert_allclose(g_w, expected, **tol)
    g_mu, g_sigma = native.sample_vjp(g, eps)
    np.testing.assert_allclose(g_mu, g.sum(1), **tol)
    np.testing.assert_allclose(g_sigma, (g * eps).sum(1), **tol)
    assert a.dtype == q.dtype == g_w.dtype == g_mu.dtype == g_sigma.dtype == dtype
    # non-contiguous inputs are copied, not misread
    np.testing.assert_allclose(native.sample_vjp(g[:, ::-1], eps[:, ::-1])[1], g_sigma, **tol)


def _fresh(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A new interpreter: build (or not) and report what library() gave."""
    code = "from dcem import _native; print(_native.library() is not None)"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )


@needs_compiler
def test_build_is_cached_and_leaves_no_temporaries(tmp_path: Path) -> None:
    first = _fresh({"DCEM_CACHE_DIR": str(tmp_path)})
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # the temporary folder is gone
    stamp = built[0].stat().st_mtime_ns
    again = _fresh({"DCEM_CACHE_DIR": str(tmp_path)})
    assert again.stdout.strip() == "True" and built[0].stat().st_mtime_ns == stamp


_SOLVE = """
import sys, torch, dcem
torch.manual_seed(0)
p = torch.randn(8, 100, dtype=torch.float64, requires_grad=True)
f = lambda x: ((x - p.unsqueeze(1)) ** 2).sum(-1)
gen = torch.Generator().manual_seed(0)
out = dcem.dcem(f, torch.zeros(8, 100, dtype=torch.float64), n_iter=3, generator=gen)
out.sum().backward()
torch.save((out.detach(), p.grad), sys.argv[1])
"""


def _solve(path: Path, env: dict[str, str]) -> tuple:
    """Run ``_SOLVE`` in a new interpreter (8 problems of d = 100: the large-problem path)."""
    done = subprocess.run(
        [sys.executable, "-c", _SOLVE, str(path)], env={**os.environ, **env}, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    import torch

    return torch.load(path)


@pytest.mark.parametrize(
    "env", [{"DCEM_NATIVE": "0"}, {"CC": "/nonexistent/cc"}], ids=["switched-off", "no-compiler"]
)
def test_no_library_falls_back_and_dcem_still_runs(tmp_path: Path, env: dict[str, str]) -> None:
    """Without the C loops (switched off, or no compiler) nothing is built and dcem runs
    its PyTorch blocks: the same solution and gradient as with them, to rounding."""
    cache = tmp_path / "cache"
    assert _fresh({"DCEM_CACHE_DIR": str(cache), **env}).stdout.strip() == "False"
    assert not any(cache.glob("*.so"))
    fallback = _solve(tmp_path / "fallback.pt", {"DCEM_CACHE_DIR": str(cache), **env})
    if native.library() is not None:
        with_c = _solve(tmp_path / "native.pt", {})
        for a, b in zip(fallback, with_c, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
