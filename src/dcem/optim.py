"""CEM, the differentiable CEM (DCEM), and unrolled gradient descent.

All three solve ``x* = argmin_x f(x)`` for a batch of problems. ``dcem`` is
differentiable: its output carries gradients to the parameters inside ``f``, to
``init_mu`` and to ``init_sigma`` through reparameterized sampling, the costs,
the soft top-k (:func:`dcem.lml`, implicit gradient) and the weighted
maximum-likelihood updates. One iteration is :func:`dcem_step` /
:func:`cem_step`; the loops add bookkeeping only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from dcem import _native
from dcem.lml import _forward as _lml_forward
from dcem.lml import _forward_numpy as _lml_forward_numpy
from dcem.lml import _vjp as _lml_vjp
from dcem.lml import lml

__all__ = [
    "cem",
    "dcem",
    "unroll_gd",
    "dcem_step",
    "cem_step",
    "DCEM",
    "Trace",
    "IterationInfo",
]

Cost = Callable[[Tensor], Tensor]
Bound = float | Tensor | None
Backward = Literal["full", "checkpoint", "pruned"]


@dataclass
class IterationInfo:
    """What a callback sees after each iteration (all tensors detached).

    Attributes:
        iteration: 0-based iteration index.
        samples: ``(B, N, d)`` the clamped samples of this iteration.
        costs: ``(B, N)`` their costs (non-finite as returned by ``f``).
        weights: ``(B, N)`` elite weights (soft for DCEM, 0/1 for CEM), summing to k.
        mu: ``(B, d)`` mean after the update. sigma: ``(B, d)`` std after the update.
    """

    iteration: int
    samples: Tensor
    costs: Tensor
    weights: Tensor
    mu: Tensor
    sigma: Tensor


@dataclass
class Trace:
    """Per-iteration summaries for plots: mean and std after each update, the mean cost
    of the samples and the elite-weighted mean cost. Lists of ``(B, d)`` / ``(B,)``."""

    mu: list[Tensor] = field(default_factory=list)
    sigma: list[Tensor] = field(default_factory=list)
    mean_cost: list[Tensor] = field(default_factory=list)
    elite_cost: list[Tensor] = field(default_factory=list)

    def __call__(self, info: IterationInfo) -> None:
        k = info.weights.sum(-1)
        finite = torch.isfinite(info.costs)
        costs = torch.where(finite, info.costs, torch.zeros_like(info.costs))
        self.mu.append(info.mu)
        self.sigma.append(info.sigma)
        self.mean_cost.append(costs.sum(-1) / finite.sum(-1).clamp_min(1))
        self.elite_cost.append((info.weights * costs).sum(-1) / k)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_callable(name: str, value: Any, optional: bool = False) -> None:
    if not (callable(value) or (optional and value is None)):
        what = "a callable or None" if optional else "a callable"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def _describe(value: Any) -> str:
    """A short description of a bad argument: its dtype and shape for a tensor, else its type."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def _as_tensor(name: str, value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (Tensor, int, float)):
        raise TypeError(f"{name} must be a number or a floating tensor, got {_describe(value)}")
    if isinstance(value, Tensor):
        if value.device != like.device:
            raise ValueError(
                f"{name} is on {value.device} but init_mu is on {like.device}; "
                "put every tensor argument on one device"
            )
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        out = value.to(like.dtype)
    else:
        out = torch.as_tensor(float(value), dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(out, like.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(out.shape)} does not broadcast to (B, d) = {tuple(like.shape)}"
        ) from None


def _prepare(
    init_mu: Tensor,
    init_sigma: float | Tensor,
    lb: Bound,
    ub: Bound,
    n_sample: int,
    n_elite: int,
    n_iter: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """Validate the common arguments; returns (mu (B, d), sigma, lb, ub, single).

    The value checks (finite ``init_mu``, finite ``init_sigma > 0``, bounds that are not
    NaN, ``lb < ub``) cost one host sync together."""
    if not isinstance(init_mu, Tensor) or not init_mu.is_floating_point():
        raise ValueError(
            f"init_mu must be a floating tensor of shape (B, d) or (d,), got {_describe(init_mu)}"
        )
    if init_mu.dim() not in (1, 2) or init_mu.shape[-1] == 0:
        raise ValueError(f"init_mu must have shape (B, d) or (d,), got {tuple(init_mu.shape)}")
    _check_int("n_sample", n_sample, 2)
    _check_int("n_elite", n_elite, 1)
    _check_int("n_iter", n_iter, 1)
    if n_elite >= n_sample:
        raise ValueError(f"n_elite must be < n_sample, got n_elite={n_elite}, n_sample={n_sample}")
    single = init_mu.dim() == 1
    mu = init_mu.unsqueeze(0) if single else init_mu
    sigma = _as_tensor("init_sigma", init_sigma, mu)
    lo = None if lb is None else _as_tensor("lb", lb, mu)
    hi = None if ub is None else _as_tensor("ub", ub, mu)
    checks = [
        ("init_mu", torch.isfinite(mu.detach()).all(), "must be finite"),
        ("init_sigma", torch.isfinite(sigma.detach()).all(), "must be finite"),
        ("init_sigma", (sigma.detach() > 0).all(), "must be > 0 everywhere"),
    ]
    if lo is not None:
        checks.append(("lb", (lo < math.inf).all(), "must not be NaN or +inf"))
    if hi is not None:
        checks.append(("ub", (hi > -math.inf).all(), "must not be NaN or -inf"))
    if lo is not None and hi is not None:
        checks.append(("lb", (lo < hi).all(), "must be < ub everywhere"))
    passed = torch.stack([ok for _, ok, _ in checks])
    if not bool(passed.all()):  # the one host sync
        name, _, what = checks[int((~passed).nonzero()[0, 0])]
        value = {"init_mu": mu, "init_sigma": sigma, "lb": lo, "ub": hi}[name]
        assert value is not None
        raise ValueError(
            f"{name} {what}, got {_summary(value)}"
            + (f" and ub {_summary(hi)}" if what.endswith("< ub everywhere") else "")
        )
    return mu, sigma, lo, hi, single


def _summary(t: Tensor | None) -> str:
    """min, max and the number of NaN of a tensor argument, for an error message."""
    if t is None:
        return "None"
    t = t.detach()
    nans = int(torch.isnan(t).sum())
    finite = t[~torch.isnan(t)]
    if finite.numel() == 0:
        return f"all NaN (shape {tuple(t.shape)})"
    text = f"min {float(finite.min()):.3g}, max {float(finite.max()):.3g}"
    return text + (f", {nans} NaN" if nans else "")


def _costs(f: Cost, x: Tensor) -> Tensor:
    """Evaluate f on x (B, N, d) and check it returns floating (B, N) on x's device."""
    v = f(x)
    if not isinstance(v, Tensor):
        raise ValueError(
            f"f must return a tensor of shape (B, N) = {tuple(x.shape[:2])}, got {type(v)}"
        )
    if v.shape != x.shape[:2]:
        raise ValueError(
            f"f must return costs of shape (B, N) = {tuple(x.shape[:2])} for samples "
            f"of shape {tuple(x.shape)}, got {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise ValueError(f"f must return a floating tensor, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"f returned costs on {v.device} for samples on {x.device}")
    # costs of another floating dtype (float64 costs of float32 samples, say) are cast to
    # the samples' dtype, differentiably: what cem and dcem rank and weigh
    return v if v.dtype == x.dtype else v.to(x.dtype)


def _std_mean(v: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.std_mean(v, dim=-1, keepdim=True)`` (unbiased) in two passes: the mean, then
    the centred sum of squares. Differentiable (a zero variance is clamped to the smallest
    normal number, so its gradient is 0 rather than NaN); on a CPU core it took a tenth of
    the time of ``std_mean``'s kernel for (1024, 100)."""
    mean = v.mean(-1, keepdim=True)
    centred = v - mean
    var = torch.linalg.vecdot(centred, centred).unsqueeze(-1) / (v.shape[-1] - 1)
    return var.clamp_min(torch.finfo(v.dtype).tiny).sqrt(), mean


def _standardize(v: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Finite costs (B, N) to scores ``z`` (what :func:`_scores` computes), with the clamped
    std ``s`` and the mask ``live`` of problems whose std is not clamped (for the VJP)."""
    if not normalize:
        return -v, None, None
    std, mean = _std_mean(v)
    eps = torch.finfo(v.dtype).eps
    s = std.clamp_min(eps)
    return (mean - v) / s, s, std > eps


def _standardize_vjp(g_z: Tensor, z: Tensor, s: Tensor | None, live: Tensor | None) -> Tensor:
    """``g_v`` from ``g_z`` for :func:`_standardize`: for the unbiased std,
    ``g_v = (-g_z + mean(g_z) + z sum(g_z z) / (N - 1)) / std`` (no spread term where
    the std was clamped)."""
    if s is None or live is None:
        return -g_z
    spread = (g_z * z).sum(-1, keepdim=True) / (z.shape[-1] - 1) * live
    return (g_z.mean(-1, keepdim=True) - g_z + z * spread) / s


def _scores(v: Tensor, normalize: bool, k: int = 1) -> Tensor:
    """Scores to rank (higher is better): -v, standardized per problem when ``normalize``.

    Non-finite costs get the score ``-inf`` (weight exactly 0 in :func:`dcem.lml`, never
    an elite); the others are standardized over the finite costs of their problem. A
    problem with fewer than ``k`` finite costs raises ``ValueError`` (its elites would
    have to include non-finite ones). Costs with a non-finite entry cost one more host
    sync; all-finite costs none beyond :func:`_all_finite`'s.
    """
    if _all_finite(v):
        return _standardize(v, normalize)[0]
    finite = torch.isfinite(v)
    count = finite.sum(-1)
    few = (count < k).nonzero().flatten()
    if few.numel():
        empty = (count == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"f returned no finite cost for problem(s) {empty} "
                f"(costs of shape {tuple(v.shape)})"
            )
        raise ValueError(
            f"f returned fewer finite costs than n_elite = {k} for problem(s) "
            f"{few.tolist()[:20]} (fewest: {int(count.min())} of n_sample = {v.shape[-1]}); "
            "non-finite costs cannot rank elites: lower n_elite, raise n_sample or keep the "
            "samples in f's domain (lb, ub)"
        )
    v = torch.where(finite, v, torch.zeros_like(v))
    if normalize:
        n_finite = count.unsqueeze(-1).to(v.dtype)
        dev = torch.where(finite, v - v.sum(-1, keepdim=True) / n_finite, torch.zeros_like(v))
        std = ((dev * dev).sum(-1, keepdim=True) / (n_finite - 1).clamp_min(1)).sqrt()
        scores = -dev / std.clamp_min(torch.finfo(v.dtype).eps)
    else:
        scores = -v
    return torch.where(finite, scores, torch.full_like(scores, -math.inf))


def _all_finite(v: Tensor) -> bool:
    """One host sync: the sum is finite unless a cost is not (or the sum overflows)."""
    return math.isfinite(float(v.detach().sum())) or bool(torch.isfinite(v).all())


class _SoftRefit(torch.autograd.Function):
    """Scores, soft elites and the weighted refit of one DCEM iteration as one graph node.

    ``(v (B, N) finite costs, x (B, N, d)) -> (mu (B, d), sigma (B, d), weights (B, N))``,
    the same arithmetic as ``_scores`` + ``lml`` + ``_refit`` with a hand-written backward:

    * refit: ``var = sum_n w_n (x_n - mu)^2 / k``, so ``g_mu' = g_mu - 2 g_var sum_n w_n
      (x_n - mu) / k``, ``g_w_n = (g_mu' . x_n + g_var . (x_n - mu)^2) / k`` and
      ``g_x_n = w_n (g_mu' + 2 g_var (x_n - mu)) / k`` with ``g_var = g_sigma / (2 sigma)``;
    * soft top-k: the closed-form implicit gradient of :func:`dcem.lml.lml`;
    * standardization ``z = (mean - v) / std`` (unbiased std):
      ``g_v = (-g_z + mean(g_z) + z sum(g_z z) / (N - 1)) / std``.

    Small problems are overhead-bound: one node instead of about twenty cuts the
    per-iteration overhead (see ``benchmarks/optim.py``). Once differentiable: a second
    derivative through :func:`dcem` raises; under ``torch.func`` transforms the general,
    autograd-composed path is used instead.
    """

    @staticmethod
    def forward(ctx, v: Tensor, x: Tensor, k: int, tau: float, normalize: bool):  # type: ignore[override]
        ctx.k, ctx.tau, ctx.normalize = k, tau, normalize
        ctx.small = (
            x.device.type == "cpu" and x.numel() <= _SMALL_REFIT and v.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float64)
        )  # fmt: skip
        if ctx.small:
            mu, sigma, w, ctx.arrays = _soft_refit_numpy(v, x, k, tau, normalize)
            ctx.mark_non_differentiable(w)
            return mu, sigma, w
        tiny = torch.finfo(v.dtype).tiny
        z, s, live = _standardize(v, normalize)
        w = _lml_forward(z, k, tau, None)
        wk = (w / k).unsqueeze(1)
        mu = torch.bmm(wk, x).squeeze(1)
        dev = x - mu.unsqueeze(1)
        var = torch.bmm(wk, dev * dev).squeeze(1)
        sigma = var.clamp_min(tiny).sqrt()
        ctx.save_for_backward(x, w, z, s, live, mu, sigma, var)
        ctx.mark_non_differentiable(w)
        return mu, sigma, w

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mu: Tensor, g_sigma: Tensor, _g_w: Tensor):  # type: ignore[override]
        if ctx.small:
            g_v, g_x = _soft_refit_backward_numpy(
                ctx.arrays, ctx.k, ctx.tau, ctx.normalize, g_mu, g_sigma
            )
            return g_v, g_x, None, None, None
        x, w, z, s, live, mu, sigma, var = ctx.saved_tensors
        k = ctx.k
        tiny = torch.finfo(var.dtype).tiny
        g_var = torch.where(var > tiny, g_sigma / (2 * sigma), torch.zeros_like(var))
        dev = x - mu.unsqueeze(1)
        wk = (w / k).unsqueeze(1)
        g_mu = g_mu - 2 * g_var * torch.bmm(wk, dev).squeeze(1)
        g_w = torch.bmm(x, g_mu.unsqueeze(-1)) + torch.bmm(dev * dev, g_var.unsqueeze(-1))
        g_w = g_w.squeeze(-1) / k
        g_x = wk.transpose(1, 2) * torch.addcmul(
            g_mu.unsqueeze(1), g_var.unsqueeze(1), dev, value=2
        )
        g_v = _standardize_vjp(_lml_vjp(w, g_w, ctx.tau), z, s, live)
        return g_v, g_x, None, None, None


# CPU problems with at most this many sample entries (B * N * d) take the NumPy form of the
# fused node: the same arithmetic at about a microsecond per operation instead of several.
_SMALL_REFIT = 8192


def _soft_refit_numpy(
    v: Tensor, x: Tensor, k: int, tau: float, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """:class:`_SoftRefit`'s forward on small CPU tensors; returns mu, sigma, w, saved arrays."""
    vn, xn = v.detach().numpy(), x.detach().numpy().copy()  # saved: x may be reused
    n = vn.shape[-1]
    eps, tiny = np.finfo(vn.dtype).eps, np.finfo(vn.dtype).tiny
    if normalize:
        mean = vn.sum(-1, keepdims=True) / n
        centred = vn - mean
        std = np.sqrt((centred * centred).sum(-1, keepdims=True) / (n - 1))
        live, s = std > eps, np.maximum(std, eps)
        z = -centred / s
    else:
        z, s, live = -vn, None, None
    w = _lml_forward_numpy(z, k, tau)
    wk = (w / k)[:, None, :]
    mu = np.matmul(wk, xn)[:, 0]
    dev = xn - mu[:, None]
    var = np.matmul(wk, dev * dev)[:, 0]
    sigma = np.sqrt(np.maximum(var, tiny))
    arrays = (xn, w, z, s, live, mu, sigma, var)
    return torch.from_numpy(mu), torch.from_numpy(sigma), torch.from_numpy(w), arrays


def _soft_refit_backward_numpy(
    arrays: tuple, k: int, tau: float, normalize: bool, g_mu: Tensor, g_sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """:class:`_SoftRefit`'s backward (formulas in its docstring) on the saved ``arrays`` of
    :func:`_soft_refit_numpy`; returns ``(g_v (B, N), g_x (B, N, d))``."""
    xn, w, z, s, live, mu, sigma, var = arrays
    tiny = np.finfo(var.dtype).tiny
    gm, gs = g_mu.detach().numpy(), g_sigma.detach().numpy()
    g_var = np.where(var > tiny, gs / (2 * sigma), 0).astype(var.dtype)
    dev = xn - mu[:, None]
    wk = w / k
    gm = gm - 2 * g_var * np.matmul(wk[:, None, :], dev)[:, 0]
    g_w = (np.matmul(xn, gm[:, :, None]) + np.matmul(dev * dev, g_var[:, :, None]))[..., 0] / k
    g_x = wk[:, :, None] * (gm[:, None, :] + 2 * g_var[:, None, :] * dev)
    h = w * (1 - w)
    ratio = (h * g_w).sum(-1, keepdims=True) / np.maximum(h.sum(-1, keepdims=True), tiny)
    g_z = (g_w - ratio) * h
    if np.finfo(g_z.dtype).tiny <= tau <= np.finfo(g_z.dtype).max:
        g_z = g_z / g_z.dtype.type(tau)
    else:  # tau is 0 or inf in the dtype: divide in float64 (overflow to inf is the value)
        with np.errstate(over="ignore"):
            g_z = (g_z.astype(np.float64) / tau).astype(g_z.dtype)
    if normalize:
        spread = (g_z * z).sum(-1, keepdims=True) / (z.shape[-1] - 1) * live
        g_v = (g_z.sum(-1, keepdims=True) / z.shape[-1] - g_z + z * spread) / s
    else:
        g_v = -g_z
    return torch.from_numpy(np.ascontiguousarray(g_v)), torch.from_numpy(g_x)


def _fusable() -> bool:
    """Whether :class:`_SoftRefit` may replace the composed path (not under torch.func/compile)."""
    return not (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())


# ----------------------------------------------------------------------------- one iteration


def _sample(mu: Tensor, sigma: Tensor, eps: Tensor, lb: Tensor | None, ub: Tensor | None) -> Tensor:
    """Reparameterized samples mu + sigma * eps, (B, N, d), clamped to the bounds."""
    x = torch.addcmul(mu.unsqueeze(1), sigma.unsqueeze(1), eps)
    if lb is not None or ub is not None:
        x = torch.clamp(
            x, None if lb is None else lb.unsqueeze(1), None if ub is None else ub.unsqueeze(1)
        )
    return x


class _Sample(torch.autograd.Function):
    """``mu + sigma * eps`` (B, N, d) for large problems, with a backward that never writes a
    (B, N, d) tensor: ``g_mu = sum_n g`` and ``g_sigma = sum_n g eps`` in one pass, in the C
    loops (:mod:`dcem._native`) or a cache-sized block of problems at a time (autograd's
    ``addcmul`` backward writes ``g * eps`` whole, then reads it again). With a graph to
    build (``create_graph``) the backward is made of differentiable operations."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(sigma, eps)
        return torch.addcmul(mu.unsqueeze(1), sigma.unsqueeze(1), eps)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sigma, eps = ctx.saved_tensors
        need_mu, need_sigma, need_eps = ctx.needs_input_grad
        g_mu = g_sigma = None
        if need_sigma:
            g_mu, g_sigma = _sample_sums(g, eps)
        elif need_mu:
            g_mu = g.sum(1)
        g_eps = g * sigma.unsqueeze(1) if need_eps else None
        return g_mu if need_mu else None, g_sigma, g_eps


def _sample_sums(g: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_n g, sum_n g eps)`` (B, d) of (B, N, d) tensors, reading g once: the C loops,
    or a block of problems at a time (differentiable: the form taken with a graph)."""
    if _native_ok(g, eps):
        g_mu, g_sigma = _native.sample_vjp(g.numpy(), eps.numpy())
        return torch.from_numpy(g_mu), torch.from_numpy(g_sigma)
    mus, sigmas = [], []
    for g_i, eps_i in _blocks(g, eps):
        mus.append(g_i.sum(1))
        sigmas.append(torch.mul(g_i, eps_i).sum(1))
    return torch.cat(mus), torch.cat(sigmas)


_BLOCK = 1 << 18  # entries (1 MiB of float32) per block of the large-problem nodes


def _native_ok(*tensors: Tensor) -> bool:
    """Whether the C loops may take these tensors: built, CPU, one float32/float64 dtype,
    no graph (they are read as NumPy arrays)."""
    dtype = tensors[0].dtype
    plain = all(
        t.device.type == "cpu" and t.dtype == dtype and not t.requires_grad for t in tensors
    )
    return plain and dtype in (torch.float32, torch.float64) and _native.library() is not None


def _blocks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """The same cache-sized slices of problems (first dim) of (B, N, ...) tensors; one
    slice, the whole tensors, off the CPU (a GPU pays a kernel launch per operation)."""
    rows = max(1, _BLOCK // max(1, *(t[0].numel() for t in tensors)))
    if tensors[0].device.type != "cpu":
        rows = tensors[0].shape[0]
    return [tuple(t[i : i + rows] for t in tensors) for i in range(0, tensors[0].shape[0], rows)]


def _noise_moments(w: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_n w eps, sum_n w eps^2)``, both (B, d), for weights w (B, N) and noise eps
    (B, N, d), reading the noise once: the C loops, or a cache-sized block of problems at
    a time (``eps^2`` is never written whole). No autograd graph."""
    if _native_ok(w, eps):
        a, q = _native.noise_moments(w.numpy(), eps.numpy())
        return torch.from_numpy(a), torch.from_numpy(q)
    firsts, seconds = [], []
    for w_i, eps_i in _blocks(w.unsqueeze(1), eps):
        firsts.append(torch.bmm(w_i, eps_i))
        seconds.append(torch.bmm(w_i, eps_i.square()))
    return torch.cat(firsts).squeeze(1), torch.cat(seconds).squeeze(1)


def _noise_moments_vjp(eps: Tensor, g_a: Tensor, g_q: Tensor) -> Tensor:
    """The gradient ``(B, N)`` w.r.t. w of :func:`_noise_moments`:
    ``sum_d (eps g_a + eps^2 g_q)``, like the forward."""
    if _native_ok(eps, g_a, g_q):
        return torch.from_numpy(_native.noise_moments_vjp(eps.numpy(), g_a.numpy(), g_q.numpy()))
    parts = []
    for a_i, q_i, eps_i in _blocks(g_a.unsqueeze(1), g_q.unsqueeze(1), eps):
        part = torch.bmm(a_i, eps_i.transpose(1, 2))
        parts.append(torch.baddbmm(part, q_i, eps_i.square().transpose(1, 2)))
    return torch.cat(parts).squeeze(1)


def _refit_from_moments(
    mu: Tensor, sigma: Tensor, total: Tensor, a: Tensor, squares: Tensor, k: int
) -> tuple[Tensor, ...]:
    """:func:`_refit_reparam`'s formulas from ``S = sum w`` (B, 1) and the noise moments
    ``a = sum w eps``, ``squares = sum w eps^2`` (B, d): returns ``(mu', sigma', e, c,
    spread, var)``, the last four for :class:`_NoiseRefit`'s backward."""
    e = a / total
    spread = squares - total * e * e
    new_mu = torch.addcmul(total * mu, sigma, a) / k
    c = (1 - total / k) * torch.addcmul(mu, sigma, e)
    var = (sigma * sigma * spread + total * c * c) / k
    return new_mu, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(), e, c, spread, var


class _NoiseRefit(torch.autograd.Function):
    """Scores, soft elites and the refit from the noise (:func:`_refit_reparam`) of one
    large-problem DCEM iteration as one graph node:
    ``(v (B, N) finite costs, mu (B, d), sigma (B, d), eps (B, N, d) constant noise) ->
    (mu' (B, d), sigma' (B, d), w (B, N))``.

    The same arithmetic as ``_scores`` + ``lml`` + ``_refit_reparam``, with a hand-written
    backward (the chain rule through the refit formulas, :func:`dcem.lml`'s implicit
    gradient and the standardization's): about twenty small autograd nodes per iteration
    become one, and the noise is read once in each direction (:func:`_noise_moments`).
    The gradient through ``S = sum w`` is left out: the soft top-k pins S at k, and its
    VJP removes any per-problem constant from ``g_w``. Once differentiable; under
    ``torch.func`` transforms the composed path is used instead.
    """

    @staticmethod
    def forward(ctx: Any, v: Tensor, mu: Tensor, sigma: Tensor, eps: Tensor, k: int,
                tau: float, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]  # fmt: skip
        z, s, live = _standardize(v, normalize)
        w = _lml_forward(z, k, tau, None)
        total = w.sum(-1, keepdim=True)
        new_mu, new_sigma, e, c, spread, var = _refit_from_moments(
            mu, sigma, total, *_noise_moments(w, eps), k
        )
        ctx.k, ctx.tau = k, tau
        ctx.save_for_backward(eps, w, z, s, live, sigma, total, e, c, spread, var, new_sigma)
        ctx.mark_non_differentiable(w)
        return new_mu, new_sigma, w

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_new_mu: Tensor, g_new_sigma: Tensor, _g_w: Tensor
                 ) -> tuple[Tensor | None, ...]:  # type: ignore[override]  # fmt: skip
        eps, w, z, s, live, sigma, total, e, c, spread, var, new_sigma = ctx.saved_tensors
        k = ctx.k
        tiny = torch.finfo(var.dtype).tiny
        # var = (sigma^2 spread + S c^2) / k, sigma' = sqrt(var) where var > tiny
        g_var = torch.where(var > tiny, g_new_sigma / (2 * new_sigma), torch.zeros_like(var)) / k
        g_spread = g_var * sigma * sigma
        # c = (1 - S / k) (mu + sigma e); mu' = (S mu + sigma a) / k
        g_m = 2 * g_var * total * c * (1 - total / k)
        g_mu = g_new_mu * (total / k) + g_m
        g_sigma = g_mu * e + 2 * g_var * sigma * spread  # a = S e
        # spread = q - S e^2, e = a / S
        g_e = g_m * sigma - 2 * total * e * g_spread
        g_a = g_new_mu * sigma / k + g_e / total
        g_w = _noise_moments_vjp(eps, g_a, g_spread)
        g_v = _standardize_vjp(_lml_vjp(w, g_w, ctx.tau), z, s, live)
        return g_v, g_mu, g_sigma, None, None, None, None


# Function.apply adds a Python layer (torch.func checks) to every call, a large share of a
# small problem's iteration; these nodes run only in eager autograd (see _fusable), so
# DCEM calls the C implementation that Function.apply ends in (as dcem.lml does).
_apply_sample = super(torch.autograd.Function, _Sample).apply
_apply_soft_refit = super(torch.autograd.Function, _SoftRefit).apply
_apply_noise_refit = super(torch.autograd.Function, _NoiseRefit).apply


def _refit(x: Tensor, weights: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Weighted Gaussian maximum likelihood: x (B, N, d), weights (B, N) summing to k."""
    w = weights.unsqueeze(1)
    mu = torch.bmm(w, x).squeeze(1) / k
    dev = x - mu.unsqueeze(1)
    var = torch.bmm(w, dev * dev).squeeze(1) / k
    return mu, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


def _refit_reparam(
    mu: Tensor, sigma: Tensor, eps: Tensor, weights: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """:func:`_refit` of unclamped samples ``x = mu + sigma * eps``, computed from ``eps``.

    The same function, but the (B, N, d) work is two reads of the constant noise
    and one elementwise pass without a graph: with ``S = sum w``, ``A = sum w eps``
    and the weighted mean ``e = A / S`` of the noise,
    ``mu' = (S mu + sigma A) / k`` and
    ``sigma'^2 = (sigma^2 sum w (eps - e)^2 + S c^2) / k``, ``c = (1 - S / k)(mu + sigma e)``,
    where ``sum w (eps - e)^2 = sum w eps^2 - S e^2`` (the noise is standard normal, so
    the two terms are of the order of k and their difference loses no more than a few
    digits; one pass writes ``eps^2`` instead of two for the centred squares).
    """
    w = weights.unsqueeze(1)
    a, squares = torch.bmm(w, eps).squeeze(1), torch.bmm(w, eps.square()).squeeze(1)
    new_mu, new_sigma, *_ = _refit_from_moments(
        mu, sigma, weights.sum(-1, keepdim=True), a, squares, k
    )
    return new_mu, new_sigma


# Above this many sample entries (B * N * d) without bounds, refit from the noise.
_REPARAM_REFIT_MIN = 65_536


def dcem_step(
    f: Cost,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    n_elite: int,
    tau: float,
    lb: Tensor | None = None,
    ub: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One DCEM iteration from noise ``eps`` (B, N, d).

    Returns ``(mu, sigma, samples, costs, weights)``: the refitted ``(B, d)`` mean
    and std, the ``(B, N, d)`` samples, their ``(B, N)`` costs and the soft elite
    weights ``lml(scores, n_elite, tau)``. Differentiable in everything.

    The shapes, ``n_elite`` and ``tau`` are checked (no host sync); the values of
    ``mu`` and ``sigma`` are not (:func:`dcem` checks its inputs once).
    """
    _check_step(mu, sigma, eps, n_elite)
    _check_tau(tau)
    return _dcem_step(
        f, mu, sigma, eps, n_elite=n_elite, tau=tau, lb=lb, ub=ub, normalize=normalize
    )


def _check_step(mu: Tensor, sigma: Tensor, eps: Tensor, n_elite: int) -> None:
    """Shapes of one step's arguments (Python only: no host sync)."""
    ok = isinstance(mu, Tensor) and isinstance(sigma, Tensor) and isinstance(eps, Tensor)
    if not (ok and mu.dim() == 2 and sigma.shape == mu.shape and eps.dim() == 3
            and eps.shape[0] == mu.shape[0] and eps.shape[2] == mu.shape[1]):  # fmt: skip
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t) for t in (mu, sigma, eps)]
        raise ValueError(
            "mu and sigma must be tensors of shape (B, d) and eps of shape (B, N, d), got "
            f"mu {shapes[0]}, sigma {shapes[1]}, eps {shapes[2]}"
        )
    _check_int("n_elite", n_elite, 1)
    if n_elite >= eps.shape[1]:
        raise ValueError(f"n_elite must be < N = eps.shape[1], got {n_elite} and eps {eps.shape}")


def _dcem_step(
    f: Cost,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    n_elite: int,
    tau: float,
    lb: Tensor | None = None,
    ub: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`dcem_step` without the argument checks (what :func:`dcem` calls)."""
    reparam = lb is None and ub is None and eps.numel() >= _REPARAM_REFIT_MIN
    if reparam and _fusable():
        x = _apply_sample(mu, sigma, eps)
    else:
        x = _sample(mu, sigma, eps, lb, ub)
    v = _costs(f, x)
    if _fusable() and _all_finite(v):
        if not reparam:
            new_mu, new_sigma, weights = _apply_soft_refit(v, x, n_elite, tau, normalize)
            return new_mu, new_sigma, x, v, weights
        if not eps.requires_grad:
            new_mu, new_sigma, weights = _apply_noise_refit(
                v, mu, sigma, eps, n_elite, tau, normalize
            )
            return new_mu, new_sigma, x, v, weights
    weights = lml(_scores(v, normalize, n_elite), n_elite, tau)
    if reparam:
        new_mu, new_sigma = _refit_reparam(mu, sigma, eps, weights, n_elite)
    else:
        new_mu, new_sigma = _refit(x, weights, n_elite)
    return new_mu, new_sigma, x, v, weights


def _dcem_step_pruned(
    f: Cost,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    n_elite: int,
    tau: float,
    n_keep: int,
    n_anchor: int,
    lb: Tensor | None,
    ub: Tensor | None,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """DCEM iteration that keeps f's graph only on ``n_keep + n_anchor + 1`` of the N samples.

    f runs on all N samples without a graph, then again with a graph on the ``n_keep``
    samples of largest soft-elite weight, on ``n_anchor`` anchors spread evenly (by weight
    rank) over the dropped samples, and on the current mean. Every dropped sample borrows
    the cost gradient of its nearest graph point (its value stays exact): the standardization
    couples every cost to the weights, so the dropped samples' gradients cannot simply be
    left out, and a nearby point's gradient is a good stand-in where ``f`` is smooth.
    """
    x = _sample(mu, sigma, eps, lb, ub)
    with torch.no_grad():
        v_all = _costs(f, x)
        scores = _scores(v_all, normalize, n_elite)
        order = lml(scores, n_elite, tau).argsort(dim=-1, descending=True)
        dropped = order[:, n_keep:]
        n_anchor = min(n_anchor, dropped.shape[1])
        picks = torch.linspace(0, max(dropped.shape[1] - 1, 0), n_anchor, device=x.device)
        graph_idx = torch.cat([order[:, :n_keep], dropped[:, picks.round().long()]], 1)
    points = torch.cat(
        [_take(x, graph_idx),
         _finish(mu, lb, ub, single=False).unsqueeze(1)], 1,
    )  # fmt: skip
    v_graph = _costs(f, points)
    with torch.no_grad():
        nearest = torch.cdist(x.detach(), points.detach()).argmin(-1)  # (B, N)
    borrowed = v_graph.gather(1, nearest)
    v = (v_all + (borrowed - borrowed.detach())).scatter(1, graph_idx, v_graph[:, :-1])
    if _fusable() and _all_finite(v):
        mu, sigma, weights = _apply_soft_refit(v, x, n_elite, tau, normalize)
    else:
        weights = lml(_scores(v, normalize, n_elite), n_elite, tau)
        mu, sigma = _refit(x, weights, n_elite)
    return mu, sigma, x, v, weights


def cem_step(
    f: Cost,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    n_elite: int,
    lb: Tensor | None = None,
    ub: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One CEM iteration from noise ``eps`` (B, N, d): hard top-k elites (``topk``, then the
    elite rows taken by index).

    Returns ``(mu, sigma, samples, costs, weights)`` like :func:`dcem_step`, with
    0/1 weights. (``normalize`` does not change the ranking; it is accepted for
    symmetry with :func:`dcem_step`.) Shapes and ``n_elite`` are checked as there.
    """
    _check_step(mu, sigma, eps, n_elite)
    return _cem_update(f, _sample(mu, sigma, eps, lb, ub), n_elite)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """The rows ``x[b, idx[b, j]]``: x (B, N, d), idx (B, m) -> (B, m, d), differentiable.

    ``index_select`` on the flattened rows copies whole rows; ``gather`` with the index
    expanded over d took 10x the time at (1024, 100, 32), m = 10 on a CPU core.
    """
    n_batch, n = x.shape[:2]
    offsets = torch.arange(0, n_batch * n, n, device=idx.device).unsqueeze(1)
    rows = x.reshape(n_batch * n, x.shape[-1]).index_select(0, (idx + offsets).flatten())
    return rows.view(n_batch, idx.shape[1], x.shape[-1])


def _lowest(v: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k lowest of each row of finite costs v (B, N), in no order.

    NumPy's ``argpartition`` (introselect) on CPU float32/float64 rows: half the time of
    ``topk(largest=False, sorted=False)`` at (1024, 100), k = 10, on a CPU core.
    """
    if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64) and k < v.shape[-1]:
        picked = np.argpartition(v.detach().numpy(), k - 1, axis=-1)[:, :k]
        return torch.from_numpy(np.ascontiguousarray(picked))
    return v.topk(k, dim=-1, largest=False, sorted=False).indices


def _cem_update(f: Cost, x: Tensor, n_elite: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rest of :func:`cem_step` given the samples x (B, N, d)."""
    v = _costs(f, x)
    if _all_finite(v):  # the lowest costs directly (no negated copy, the elites unordered)
        idx = _lowest(v, n_elite)
    else:
        idx = _scores(v, False, n_elite).topk(n_elite, dim=-1, sorted=False).indices
    elites = _take(x, idx)
    mu = elites.mean(1)
    sigma = (elites - mu.unsqueeze(1)).square().mean(1).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    weights = torch.zeros_like(v).scatter_(1, idx, 1.0)
    return mu, sigma, x, v, weights


# ----------------------------------------------------------------------------- loops


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {_describe(generator)} "
            "(for a seed s, pass torch.Generator().manual_seed(s))"
        )


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    _check_generator(generator)
    if generator is not None:
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but init_mu is on {device}")
        return generator
    # A private stream seeded from the global RNG, so the checkpoint mode can replay it.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def _replayed_step(
    f: Cost, state: Tensor, shape: tuple[int, ...], after: list[Tensor], kw: dict
) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """A DCEM step that draws its noise from a saved generator state.

    Checkpointing runs it once in the forward pass and again in the backward
    pass; both draws are the same numbers. ``after`` receives the generator
    state that follows the draw.
    """

    def run(mu: Tensor, sigma: Tensor) -> tuple[Tensor, ...]:
        gen = torch.Generator(device=mu.device)
        gen.set_state(state)
        eps = torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
        after[:] = [gen.get_state()]
        return _dcem_step(f, mu, sigma, eps, **kw)

    return run


def dcem(
    f: Cost,
    init_mu: Tensor,
    init_sigma: float | Tensor = 1.0,
    *,
    n_sample: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    tau: float = 1.0,
    lb: Bound = None,
    ub: Bound = None,
    normalize: bool = True,
    generator: torch.Generator | None = None,
    backward: Backward = "full",
    n_keep: int | None = None,
    n_anchor: int | None = None,
    callback: Callable[[IterationInfo], None] | None = None,
) -> Tensor:
    """Differentiable cross-entropy method: ``argmin_x f(x)`` with gradients.

    Each iteration draws ``X = mu + sigma * eps`` (``eps ~ N(0, I)``, clamped to
    ``[lb, ub]``), evaluates ``v = f(X)``, standardizes ``v`` per problem when
    ``normalize``, takes soft elite weights ``I = lml(-v, n_elite, tau)`` and
    refits ``mu = sum_i I_i X_i / k``, ``sigma^2 = sum_i I_i (X_i - mu)^2 / k``.

    Args:
        f: costs of samples, ``(B, N, d) -> (B, N)``, lower is better.
        init_mu: ``(B, d)``, or ``(d,)`` for one problem (the result is then ``(d,)``).
        init_sigma: float or tensor broadcastable to ``(B, d)``, ``> 0``.
        n_sample: samples per iteration N. n_elite: elites k, ``k < N``.
        n_iter: iterations T. tau: the paper's temperature ``> 0``; it divides
            the scores, and ``tau -> 0`` recovers hard CEM (the reference code's
            ``temp`` multiplies, so it is ``1 / tau``).
        lb, ub: optional bounds, floats or tensors broadcastable to ``(B, d)``.
        normalize: standardize the costs per problem (makes ``tau`` scale-free).
        generator: source of the Gaussian noise (common random numbers); by
            default a private stream seeded from the global RNG.
        backward: ``"full"`` keeps every iteration's graph; ``"checkpoint"``
            recomputes each iteration in the backward pass from the same random
            numbers (identical results and gradients, less memory);
            ``"pruned"`` evaluates ``f`` on all N samples without a graph and
            again with a graph on ``n_keep`` samples of largest weight (default
            ``3 * n_elite``), ``n_anchor`` anchors among the others (default
            ``n_elite``) and the mean; each other sample borrows the cost
            gradient of its nearest graph point. Values are exact, gradients an
            approximation: good where ``f`` is smooth on the scale of the
            sample spread, and it ignores the change of a dropped sample's
            cost gradient over the distance to its anchor (the optimizer
            benchmark measures the error; memory scales with
            ``n_keep + n_anchor + 1`` instead of ``N``).
        n_keep, n_anchor: graph samples of the ``"pruned"`` mode (see above).
        callback: called with an :class:`IterationInfo` after each iteration.

    Non-finite costs rank as the worst (weight exactly 0, never an elite); a problem
    with fewer than ``n_elite`` finite costs in an iteration raises ``ValueError``
    naming its index. Costs of another floating dtype than the samples (float64 costs
    of float32 samples, say) are cast to the samples' dtype, as in :func:`cem`.

    Raises:
        ValueError: bad sizes, ``tau`` not a finite number ``> 0``, ``init_mu`` not
            finite, ``init_sigma`` not finite and ``> 0``, NaN bounds or ``lb >= ub``
            (checked at the call, one host sync), or costs as above.
        TypeError: ``f`` or ``callback`` not callable, ``normalize`` not a bool,
            ``generator`` not a ``torch.Generator`` or None, bounds or ``init_sigma``
            neither numbers nor tensors.

    Returns:
        The final mean ``(B, d)`` (or ``(d,)``), clamped to the bounds.
        Gradients reach the parameters of ``f``, ``init_mu`` and ``init_sigma``
        (first derivatives by backpropagation through every iteration, with the soft
        top-k's implicit gradient; second derivatives only under ``torch.func``).

    On the CPU, problems with ``B * N * d >= 65,536`` and no bounds make their passes over
    the noise in C loops compiled on first use (:mod:`dcem._native`; PyTorch blocks without
    a C compiler or with ``DCEM_NATIVE=0``).
    """
    _check_callable("f", f)
    _check_tau(tau)
    if not isinstance(backward, str) or backward not in ("full", "checkpoint", "pruned"):
        raise ValueError(f"backward must be 'full', 'checkpoint' or 'pruned', got {backward!r}")
    _check_bool("normalize", normalize)
    _check_callable("callback", callback, optional=True)
    _check_generator(generator)
    mu, sigma, lo, hi, single = _prepare(init_mu, init_sigma, lb, ub, n_sample, n_elite, n_iter)
    n_keep = 3 * n_elite if n_keep is None else n_keep
    n_anchor = n_elite if n_anchor is None else n_anchor
    if backward == "pruned":
        _check_int("n_keep", n_keep, n_elite)
        _check_int("n_anchor", n_anchor, 0)
        n_keep = min(n_keep, n_sample)
    gen = _generator(generator, mu.device)
    shape = (mu.shape[0], n_sample, mu.shape[1])
    kw: dict[str, Any] = dict(n_elite=n_elite, tau=float(tau), lb=lo, ub=hi, normalize=normalize)
    for t in range(n_iter):
        if backward == "checkpoint":
            after: list[Tensor] = []
            run = _replayed_step(f, gen.get_state(), shape, after, kw)
            out = checkpoint(run, mu, sigma, use_reentrant=False)
            gen.set_state(after[0])
        else:
            eps = torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
            if backward == "pruned":
                out = _dcem_step_pruned(f, mu, sigma, eps, n_keep=n_keep, n_anchor=n_anchor, **kw)
            else:
                out = _dcem_step(f, mu, sigma, eps, **kw)
        mu, sigma = out[0], out[1]
        if callback is not None:
            x, v, w = (a.detach() for a in out[2:])
            callback(IterationInfo(t, x, v, w, mu.detach(), sigma.detach()))
    return _finish(mu, lo, hi, single)


def _finish(mu: Tensor, lb: Tensor | None, ub: Tensor | None, single: bool) -> Tensor:
    if lb is not None or ub is not None:
        mu = torch.clamp(mu, lb, ub)
    return mu.squeeze(0) if single else mu


def cem(
    f: Cost,
    init_mu: Tensor,
    init_sigma: float | Tensor = 1.0,
    *,
    n_sample: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    lb: Bound = None,
    ub: Bound = None,
    normalize: bool = True,
    generator: torch.Generator | None = None,
    return_best: bool = False,
    grad: bool = False,
    callback: Callable[[IterationInfo], None] | None = None,
) -> Tensor:
    """Cross-entropy method: ``argmin_x f(x)`` with hard top-k elites.

    Same arguments and shapes as :func:`dcem` without ``tau``: each iteration
    keeps the ``n_elite`` samples of lowest cost (vectorized ``topk`` and
    ``index_select``) and refits the mean and std to them. Runs under ``no_grad``
    unless ``grad=True``. With ``return_best`` the best sample seen over all
    iterations is returned instead of the final mean. Non-finite costs rank
    last and are never elites; a problem with fewer than ``n_elite`` finite costs in an
    iteration raises ``ValueError``. Costs are cast to the samples' dtype. The argument
    checks and errors are those of :func:`dcem`.

    Returns:
        ``(B, d)`` (or ``(d,)``): the final mean or the best sample, clamped to the bounds.
    """
    _check_callable("f", f)
    for name, flag in (("normalize", normalize), ("return_best", return_best), ("grad", grad)):
        _check_bool(name, flag)
    _check_callable("callback", callback, optional=True)
    _check_generator(generator)
    mu, sigma, lo, hi, single = _prepare(init_mu, init_sigma, lb, ub, n_sample, n_elite, n_iter)
    gen = _generator(generator, mu.device)
    shape = (mu.shape[0], n_sample, mu.shape[1])
    best_x, best_v = mu, torch.full(mu.shape[:1], math.inf, dtype=mu.dtype, device=mu.device)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        # Without a graph, the noise and the samples live in two buffers reused by
        # every iteration (fresh large allocations cost page faults).
        reuse = not torch.is_grad_enabled()
        eps = torch.empty(shape, device=mu.device, dtype=mu.dtype) if reuse else None
        buf = torch.empty_like(eps) if eps is not None else None
        for t in range(n_iter):
            if eps is None or buf is None:
                noise = torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
                x = _sample(mu, sigma, noise, lo, hi)
            else:
                torch.randn(shape, generator=gen, out=eps)
                x = torch.addcmul(mu.unsqueeze(1), sigma.unsqueeze(1), eps, out=buf)
                if lo is not None or hi is not None:
                    x.clamp_(
                        None if lo is None else lo.unsqueeze(1),
                        None if hi is None else hi.unsqueeze(1),
                    )
            mu, sigma, x, v, w = _cem_update(f, x, n_elite)
            if return_best:
                vv = torch.where(torch.isfinite(v), v, torch.full_like(v, math.inf))
                val, idx = vv.min(-1)
                better = val < best_v
                cand = _take(x, idx.unsqueeze(1)).squeeze(1)
                best_x = torch.where(better.unsqueeze(-1), cand, best_x)
                best_v = torch.where(better, val, best_v)
            if callback is not None:
                samples = x.detach().clone() if reuse else x.detach()
                callback(IterationInfo(t, samples, v.detach(), w, mu.detach(), sigma.detach()))
    return _finish(best_x if return_best else mu, lo, hi, single)


def unroll_gd(f: Callable[[Tensor], Tensor], y0: Tensor, *, n_iter: int, lr: float) -> Tensor:
    """Unrolled gradient descent ``y <- y - lr * grad_y f(y)``, differentiable through every step.

    Args:
        f: costs per problem, ``(B, d) -> (B,)`` (or a scalar); the step uses ``grad`` of
            its sum, so problems stay independent.
        y0: ``(B, d)`` finite start. n_iter: steps ``>= 1``. lr: step size ``> 0``.

    Returns:
        ``(B, d)``. When grad mode is on, the steps are taken with
        ``torch.autograd.grad(..., create_graph=True)`` so the result is
        differentiable w.r.t. the parameters of ``f`` (second derivatives);
        under ``no_grad`` the steps are taken without building a graph.

    Raises:
        ValueError: bad ``n_iter``, ``lr`` or ``y0`` (checked at the call, ``y0``'s
            finiteness with one host sync); ``f`` returning costs of the wrong shape or not
            computed from ``y`` with autograd; and, after the last step, a non-finite cost,
            gradient or iterate at any step, naming the first such step (counted from 0).
            A non-finite value is never returned silently: ``f`` returned NaN/inf, or the
            iterates diverged (``lr`` too large for ``f``). The steps themselves add no host
            sync: each records whether its values were finite in a device flag, and the
            flags are read once at the end.
        TypeError: ``f`` not callable.
    """
    _check_callable("f", f)
    _check_int("n_iter", n_iter, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise ValueError(f"y0 must be a floating tensor, got {_describe(y0)}")
    if not bool(torch.isfinite(y0.detach()).all()):
        raise ValueError(f"y0 must be finite, got {_summary(y0)}")
    create_graph = torch.is_grad_enabled()
    y = y0 if y0.requires_grad else y0.detach().requires_grad_()
    flags: list[Tensor] = []  # per step: (cost, gradient, iterate) finite, no host sync
    sizes: list[Tensor] = []  # per step: max |y| at its start, for the error message
    with torch.enable_grad():
        for _ in range(n_iter):
            energy = f(y)
            if not isinstance(energy, Tensor) or energy.shape not in (y.shape[:1], torch.Size([])):
                got = tuple(energy.shape) if isinstance(energy, Tensor) else type(energy)
                raise ValueError(
                    f"f must return costs of shape (B,) = {tuple(y.shape[:1])}, got {got}"
                )
            g = None
            if energy.requires_grad:
                (g,) = torch.autograd.grad(
                    energy.sum(), y, create_graph=create_graph, allow_unused=True
                )
            if g is None:
                raise ValueError(
                    "f must compute its costs from y with autograd (they do not depend on "
                    "y: detached, converted to a number, or computed without y)"
                )
            sizes.append(y.detach().abs().amax())
            y = y - lr * g
            flags.append(torch.stack([torch.isfinite(t.detach()).all() for t in (energy, g, y)]))
            if not create_graph:
                y = y.detach().requires_grad_()
    finite = torch.stack(flags)  # (n_iter, 3)
    if not bool(finite.all()):  # the one host sync of the steps
        step, what = (int(i) for i in (~finite).nonzero()[0])
        size = f"max |y| = {float(sizes[step]):.3g} at that step"
        hint = f" ({size}: the iterates may have diverged, lr = {lr:.6g} too large for f)"
        raise ValueError(
            [
                f"f returned a non-finite cost at step {step}" + (hint if step else ""),
                f"the gradient of f is not finite at step {step} (its cost was finite; {size})",
                f"the iterates diverged: y is not finite after step {step} (finite cost "
                f"and gradient); lr = {lr:.6g} is too large for f",
            ][what]
            + f" (n_iter = {n_iter}, steps counted from 0)"
        )
    return y if create_graph else y.detach()


class DCEM(torch.nn.Module):
    """Thin module holding the hyper-parameters of :func:`dcem`.

    ``forward(f, init_mu, init_sigma=None, generator=None)`` calls :func:`dcem`.
    """

    def __init__(
        self,
        *,
        n_sample: int = 100,
        n_elite: int = 10,
        n_iter: int = 10,
        tau: float = 1.0,
        init_sigma: float = 1.0,
        lb: Bound = None,
        ub: Bound = None,
        normalize: bool = True,
        backward: Backward = "full",
    ) -> None:
        super().__init__()
        # the checks that need no tensor, at construction (the rest at each call)
        for name, value, low in (("n_sample", n_sample, 2), ("n_elite", n_elite, 1),
                                 ("n_iter", n_iter, 1)):  # fmt: skip
            _check_int(name, value, low)
        if n_elite >= n_sample:
            raise ValueError(
                f"n_elite must be < n_sample, got n_elite={n_elite}, n_sample={n_sample}"
            )
        _check_tau(tau)
        _check_bool("normalize", normalize)
        if not isinstance(backward, str) or backward not in ("full", "checkpoint", "pruned"):
            raise ValueError(f"backward must be 'full', 'checkpoint' or 'pruned', got {backward!r}")
        self.kw = dict(
            n_sample=n_sample,
            n_elite=n_elite,
            n_iter=n_iter,
            tau=tau,
            lb=lb,
            ub=ub,
            normalize=normalize,
            backward=backward,
        )
        self.init_sigma = init_sigma

    def forward(
        self,
        f: Cost,
        init_mu: Tensor,
        init_sigma: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        sigma = self.init_sigma if init_sigma is None else init_sigma
        return dcem(f, init_mu, sigma, generator=generator, **self.kw)  # type: ignore[arg-type]
