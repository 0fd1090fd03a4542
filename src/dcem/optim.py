"""CEM, the differentiable CEM (DCEM), and unrolled gradient descent.

All three solve ``x* = argmin_x f(x)`` for a batch of problems. ``dcem`` is
differentiable: its output carries gradients to the parameters inside ``f``, to
``init_mu`` and to ``init_sigma`` through reparameterized sampling, the costs,
the soft top-k (:func:`dcem.lml`, implicit gradient) and the weighted
maximum-likelihood updates, all by autograd. One iteration is :func:`dcem_step` /
:func:`cem_step`; the loops add bookkeeping only. Each computation has one PyTorch
implementation; ``compile=True`` hands one iteration to ``torch.compile``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dcem.lml import _lml

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


# ----------------------------------------------------------------------------- one iteration


def _scores(
    v: Tensor, normalize: bool, n_elite: int, finish: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Scores ``z`` (B, N) to rank (higher is better) for costs ``v`` (B, N), and ``ok``.

    ``z = -v``, standardized per problem over its finite costs when ``normalize``
    (``(mean - v) / max(std, eps)``, unbiased std); a non-finite cost scores ``-inf``
    (weight exactly 0 in :func:`dcem.lml`, never an elite) and gets no gradient.
    A problem with fewer than ``n_elite`` finite costs cannot rank its elites:
    ``finish=True`` raises ``ValueError`` naming it (one host sync) and ``ok`` is None;
    ``finish=False`` returns ``ok``, a 0-dim bool tensor, False if there is such a problem.
    """
    finite = torch.isfinite(v)
    count = finite.sum(-1, keepdim=True)
    ok = _enough_finite(count, v.shape[-1], n_elite, finish)
    v = torch.where(finite, v, 0.0)
    if normalize:
        count = count.to(v.dtype)
        dev = torch.where(finite, v - v.sum(-1, keepdim=True) / count, 0.0)
        var = torch.linalg.vecdot(dev, dev).unsqueeze(-1) / (count - 1).clamp_min(1)
        # a zero variance gets a zero gradient, not NaN; a tiny std is clamped to eps
        std = var.clamp_min(torch.finfo(v.dtype).tiny).sqrt().clamp_min(torch.finfo(v.dtype).eps)
        v = dev / std
    return torch.where(finite, -v, -math.inf), ok


def _enough_finite(count: Tensor, n_sample: int, n_elite: int, finish: bool) -> Tensor | None:
    """Whether every problem has ``n_elite`` finite costs (``count``: (B, 1) finite costs of
    each of N): raise if not (``finish``, one host sync), or return it as a 0-dim bool."""
    count = count.squeeze(-1)
    if not finish:
        return (count >= n_elite).all()
    if bool((count < n_elite).any()):
        empty = (count == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"f returned no finite cost for problem(s) {empty} "
                f"(costs of shape {(count.shape[0], n_sample)})"
            )
        raise ValueError(
            f"f returned fewer finite costs than n_elite = {n_elite} for problem(s) "
            f"{(count < n_elite).nonzero().flatten().tolist()[:20]} (fewest: "
            f"{int(count.min())} of n_sample = {n_sample}); non-finite costs cannot "
            "rank elites: lower n_elite, raise n_sample or keep the samples in f's domain "
            "(lb, ub)"
        )
    return None


def _sample(mu: Tensor, sigma: Tensor, eps: Tensor, lb: Tensor | None, ub: Tensor | None) -> Tensor:
    """Reparameterized samples mu + sigma * eps, (B, N, d), clamped to the bounds."""
    x = torch.addcmul(mu.unsqueeze(1), sigma.unsqueeze(1), eps)
    if lb is not None or ub is not None:
        x = torch.clamp(
            x, None if lb is None else lb.unsqueeze(1), None if ub is None else ub.unsqueeze(1)
        )
    return x


def _refit(mu: Tensor, sigma: Tensor, e: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Weighted Gaussian maximum likelihood of samples ``x = mu + sigma * e``:
    ``mu' = sum_n w_n x_n / k`` and ``sigma'^2 = sum_n w_n (x_n - mu')^2 / k``, (B, d).

    mu, sigma: (B, d); e: (B, N, d); w: (B, N), summing to about k. Computed from ``e``:
    with ``S = sum w``, ``A = sum w e`` and ``Q = sum w e^2``, ``mu' = (S mu + sigma A) / k``
    and, as ``x - mu' = D + sigma e`` with ``D = mu - mu'``,
    ``sigma'^2 = (sigma^2 Q + 2 sigma D A + S D^2) / k``. Exact for any such decomposition
    of x. DCEM passes the standard normal noise (``e = eps``, a constant: the (B, N, d) work
    is two weighted sums, of the noise and of its square, and the gradient to mu and sigma
    is (B, d) arithmetic), or for clamped samples ``e = (x - mu) / sigma``. With e of order 1
    the terms are of the order of ``sigma^2 k`` and their sum loses a few digits at most.
    Differentiable in every argument.
    """
    total = w.sum(-1, keepdim=True)
    wb = w.unsqueeze(1)
    a = torch.bmm(wb, e).squeeze(1)
    q = torch.bmm(wb, e * e).squeeze(1)
    new_mu = torch.addcmul(total * mu, sigma, a) / k
    d = mu - new_mu
    var = (sigma * torch.addcmul(sigma * q, d, a, value=2) + total * d * d) / k
    return new_mu, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


def _soft_refit(
    v: Tensor, mu: Tensor, sigma: Tensor, e: Tensor, k: int, tau: float, normalize: bool,
    finish: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Scores, soft elites ``w = lml(z, k, tau)`` and the refit of ``x = mu + sigma e`` from
    the costs v (B, N): ``(mu', sigma', w, ok)``. ``finish`` as in :func:`_scores`; with
    ``finish=False`` the soft top-k is stage 1 alone and ``ok`` also says it converged."""
    z, ok = _scores(v, normalize, k, finish)
    w, converged = _lml(z, k, tau, finish)
    new_mu, new_sigma = _refit(mu, sigma, e, w, k)
    return new_mu, new_sigma, w, (None if ok is None or converged is None else ok & converged)


def _noise(x: Tensor, mu: Tensor, sigma: Tensor, eps: Tensor, bounded: bool) -> Tensor:
    """The standardized samples ``e`` with ``x = mu + sigma e`` (see :func:`_refit`)."""
    return (x - mu.unsqueeze(1)) / sigma.unsqueeze(1) if bounded else eps


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
    weights ``lml(scores, n_elite, tau)``. Differentiable in everything, by autograd
    through the sampling, ``f``, the standardization and the refit, with the soft
    top-k's implicit gradient.

    The shapes, ``n_elite`` and ``tau`` are checked (no host sync); the values of
    ``mu`` and ``sigma`` are not (:func:`dcem` checks its inputs once).
    """
    _check_step(mu, sigma, eps, n_elite)
    _check_tau(tau)
    out = _dcem_step(f, mu, sigma, eps, n_elite=n_elite, tau=tau, lb=lb, ub=ub, normalize=normalize)
    return out[:5]


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


Step = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]


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
    finish: bool = True,
) -> Step:
    """:func:`dcem_step` without the argument checks, plus ``ok`` (see :func:`_soft_refit`):
    the unit that ``compile=True`` compiles."""
    x = _sample(mu, sigma, eps, lb, ub)
    v = _costs(f, x)
    e = _noise(x, mu, sigma, eps, lb is not None or ub is not None)
    new_mu, new_sigma, w, ok = _soft_refit(v, mu, sigma, e, n_elite, tau, normalize, finish)
    return new_mu, new_sigma, x, v, w, ok


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
    finish: bool = True,
) -> Step:
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
        scores, ok = _scores(v_all, normalize, n_elite, finish)
        w_all, converged = _lml(scores, n_elite, tau, finish)
        order = w_all.argsort(dim=-1, descending=True)
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
    e = _noise(x, mu, sigma, eps, lb is not None or ub is not None)
    mu, sigma, w, ok_refit = _soft_refit(v, mu, sigma, e, n_elite, tau, normalize, finish)
    if ok is not None and converged is not None and ok_refit is not None:
        ok = ok & converged & ok_refit
    return mu, sigma, x, v, w, ok


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
    return _cem_step(f, mu, sigma, eps, n_elite=n_elite, lb=lb, ub=ub)[:5]


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """The rows ``x[b, idx[b, j]]``: x (B, N, d), idx (B, m) -> (B, m, d), differentiable.

    ``index_select`` on the flattened rows copies whole rows (``gather`` with the index
    expanded over d reads and writes it entry by entry).
    """
    n_batch, n = x.shape[:2]
    offsets = torch.arange(0, n_batch * n, n, device=idx.device).unsqueeze(1)
    rows = x.reshape(n_batch * n, x.shape[-1]).index_select(0, (idx + offsets).flatten())
    return rows.view(n_batch, idx.shape[1], x.shape[-1])


def _cem_step(
    f: Cost,
    mu: Tensor,
    sigma: Tensor,
    eps: Tensor,
    *,
    n_elite: int,
    lb: Tensor | None = None,
    ub: Tensor | None = None,
    finish: bool = True,
) -> Step:
    """:func:`cem_step` without the argument checks, plus ``ok`` (see :func:`_scores`): the
    ``n_elite`` lowest finite costs of each problem (``topk``), their mean and std."""
    x = _sample(mu, sigma, eps, lb, ub)
    v = _costs(f, x)
    finite = torch.isfinite(v)
    ok = _enough_finite(finite.sum(-1, keepdim=True), v.shape[-1], n_elite, finish)
    lowest = torch.where(finite, v, math.inf).topk(n_elite, dim=-1, largest=False, sorted=False)
    elites = _take(x, lowest.indices)
    mu = elites.mean(1)
    sigma = (elites - mu.unsqueeze(1)).square().mean(1).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    weights = torch.zeros_like(v).scatter_(1, lowest.indices, 1.0)
    return mu, sigma, x, v, weights, ok


# ----------------------------------------------------------------------------- compile

# The compiled form of each step function, made on first use with compile=True (None after
# a failed compile: that step then runs eagerly for the rest of the process), and the
# torch.compile backend it uses.
_COMPILED: dict[str, Callable[..., Step] | None] = {}
_BACKEND = "inductor"


def _run(step: Callable[..., Step], compile: bool, *args: Any, **kw: Any) -> Step:
    """``step(*args, **kw)`` with ``finish=True`` (eager), or compiled when ``compile``.

    The compiled form runs with ``finish=False``: no host sync and no data-dependent branch
    inside (traced with dynamic shapes, so a new batch size does not recompile), and one
    host sync after it reads ``ok``. An iteration it cannot finish
    (a problem with non-finite costs or a soft top-k row that stage 1 leaves unconverged)
    runs again eagerly from the same noise, which gives the exact answer or raises. A
    compile failure warns once and the step runs eagerly from then on; an error of the
    caller's own (``f`` raising, bad shapes) is raised by the eager run.
    """
    if compile:
        name = step.__name__
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(step, dynamic=True, backend=_BACKEND)
        fn = _COMPILED[name]
        if fn is not None:
            try:
                out = fn(*args, finish=False, **kw)
            except Exception as err:  # a compiler's error, or the caller's: raised below
                out = step(*args, finish=True, **kw)
                _COMPILED[name] = None
                warnings.warn(
                    f"dcem: torch.compile of {name} failed ({type(err).__name__}: "
                    f"{str(err).strip()[:300]}); running it eagerly from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return out
            if out[-1] is not None and bool(out[-1]):  # the one host sync
                return out
    return step(*args, finish=True, **kw)


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
    f: Cost, state: Tensor, shape: tuple[int, ...], after: list[Tensor], kw: dict, compile: bool
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
        return _run(_dcem_step, compile, f, mu, sigma, eps, **kw)[:5]

    return run


def _noise_step(
    f: Cost, eps: Tensor, kw: dict, compile: bool, mu: Tensor, sigma: Tensor
) -> tuple[Tensor, ...]:
    """A DCEM step from given noise (the checkpoint mode's recomputation with ``noise``)."""
    return _run(_dcem_step, compile, f, mu, sigma, eps, **kw)[:5]


def _check_noise(
    noise: Any, generator: Any, shape: tuple[int, ...], single: bool, like: Tensor
) -> Tensor:
    """``noise`` as ``(n_iter, B, N, d)``: a tensor of that shape (``(n_iter, N, d)`` for one
    problem) in ``like``'s dtype and device, given instead of a generator."""
    if generator is not None:
        raise ValueError("give noise or generator, not both")
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a tensor or None, got {_describe(noise)}")
    expected = shape[:1] + shape[2:] if single else shape
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must have shape (n_iter, B, N, d) = {expected}, got "
                         f"{tuple(noise.shape)}")  # fmt: skip
    if noise.dtype != like.dtype or noise.device != like.device:
        raise ValueError(f"noise must be {like.dtype} on {like.device} like init_mu, got "
                         f"{noise.dtype} on {noise.device}")  # fmt: skip
    return noise.unsqueeze(1) if single else noise


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
    compile: bool = False,
    noise: Tensor | None = None,
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
        compile: run each iteration (sampling, ``f``, standardization, the soft top-k's
            fixed Newton steps, refit; forward and backward) as a ``torch.compile``
            graph with dynamic shapes (the noise is drawn outside it). The first call
            compiles: two graphs when the first iteration's mean and std need no
            gradient and the later ones do, one more for ``B = 1`` (PyTorch specializes
            sizes 0 and 1), seconds to a minute each on a CPU, less with the compile
            cache warm. A new batch size does not compile again; a new code of ``f``,
            ``tau``, bounds or grad mode does. An iteration the graph cannot finish
            (non-finite costs, a soft top-k row that needs the robust stage 2) runs
            again eagerly from the same noise, so results are those of the eager code
            up to rounding. A compile failure warns once and runs eagerly from then on.
            Default False: a call never compiles unless asked.
        noise: the standard normal draws ``eps`` of every iteration, ``(n_iter, B, N, d)``
            (or ``(n_iter, N, d)`` for one problem), in ``init_mu``'s dtype and device,
            instead of drawing them from ``generator`` (give one or the other): the same
            noise gives the same samples, whatever the batch it is solved in (a policy that
            recomputes its actions in a larger batch, say).

    Non-finite costs rank as the worst (weight exactly 0, never an elite); a problem
    with fewer than ``n_elite`` finite costs in an iteration raises ``ValueError``
    naming its index. Costs of another floating dtype than the samples (float64 costs
    of float32 samples, say) are cast to the samples' dtype, as in :func:`cem`.

    Raises:
        ValueError: bad sizes, ``tau`` not a finite number ``> 0``, ``init_mu`` not
            finite, ``init_sigma`` not finite and ``> 0``, NaN bounds or ``lb >= ub``
            (checked at the call, one host sync), or costs as above.
        TypeError: ``f`` or ``callback`` not callable, ``normalize`` or ``compile`` not a
            bool, ``generator`` not a ``torch.Generator`` or None, bounds or
            ``init_sigma`` neither numbers nor tensors.

    Returns:
        The final mean ``(B, d)`` (or ``(d,)``), clamped to the bounds.
        Gradients reach the parameters of ``f``, ``init_mu`` and ``init_sigma`` by
        autograd through every iteration (sampling, costs, standardization, refit), with
        the soft top-k's closed-form implicit gradient; second derivatives too (autograd
        with ``create_graph`` or ``torch.func``).
    """
    _check_callable("f", f)
    _check_tau(tau)
    if not isinstance(backward, str) or backward not in ("full", "checkpoint", "pruned"):
        raise ValueError(f"backward must be 'full', 'checkpoint' or 'pruned', got {backward!r}")
    _check_bool("normalize", normalize)
    _check_bool("compile", compile)
    _check_callable("callback", callback, optional=True)
    _check_generator(generator)
    mu, sigma, lo, hi, single = _prepare(init_mu, init_sigma, lb, ub, n_sample, n_elite, n_iter)
    if noise is not None:
        noise = _check_noise(noise, generator, (n_iter, *mu.shape[:1], n_sample, mu.shape[1]),
                             single, mu)  # fmt: skip
    n_keep = 3 * n_elite if n_keep is None else n_keep
    n_anchor = n_elite if n_anchor is None else n_anchor
    if backward == "pruned":
        _check_int("n_keep", n_keep, n_elite)
        _check_int("n_anchor", n_anchor, 0)
        n_keep = min(n_keep, n_sample)
    gen = _generator(generator, mu.device) if noise is None else None
    shape = (mu.shape[0], n_sample, mu.shape[1])
    kw: dict[str, Any] = dict(n_elite=n_elite, tau=float(tau), lb=lo, ub=hi, normalize=normalize)
    for t in range(n_iter):
        if backward == "checkpoint":
            after: list[Tensor] = []
            run: Callable[[Tensor, Tensor], tuple[Tensor, ...]]
            if noise is not None:
                run = functools.partial(_noise_step, f, noise[t], kw, compile)
            else:
                assert gen is not None  # drawn above when noise is None
                run = _replayed_step(f, gen.get_state(), shape, after, kw, compile)
            out = checkpoint(run, mu, sigma, use_reentrant=False)
            if gen is not None:
                gen.set_state(after[0])
        else:
            eps = (torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
                   if noise is None else noise[t])  # fmt: skip
            if backward == "pruned":
                out = _run(_dcem_step_pruned, compile, f, mu, sigma, eps, n_keep=n_keep,
                           n_anchor=n_anchor, **kw)  # fmt: skip
            else:
                out = _run(_dcem_step, compile, f, mu, sigma, eps, **kw)
        mu, sigma = out[0], out[1]
        if callback is not None:
            x, v, w = (a.detach() for a in out[2:5])
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
    compile: bool = False,
) -> Tensor:
    """Cross-entropy method: ``argmin_x f(x)`` with hard top-k elites.

    Same arguments and shapes as :func:`dcem` without ``tau``: each iteration
    keeps the ``n_elite`` samples of lowest cost (vectorized ``topk`` and
    ``index_select``) and refits the mean and std to them. Runs under ``no_grad``
    unless ``grad=True``. With ``return_best`` the best sample seen over all
    iterations is returned instead of the final mean. Non-finite costs rank
    last and are never elites; a problem with fewer than ``n_elite`` finite costs in an
    iteration raises ``ValueError``. Costs are cast to the samples' dtype. The argument
    checks and errors are those of :func:`dcem`; ``compile=True`` compiles one iteration
    as there (an iteration with non-finite costs runs again eagerly).

    Returns:
        ``(B, d)`` (or ``(d,)``): the final mean or the best sample, clamped to the bounds.
    """
    _check_callable("f", f)
    for name, flag in (("normalize", normalize), ("return_best", return_best), ("grad", grad),
                       ("compile", compile)):  # fmt: skip
        _check_bool(name, flag)
    _check_callable("callback", callback, optional=True)
    _check_generator(generator)
    mu, sigma, lo, hi, single = _prepare(init_mu, init_sigma, lb, ub, n_sample, n_elite, n_iter)
    gen = _generator(generator, mu.device)
    shape = (mu.shape[0], n_sample, mu.shape[1])
    best_x, best_v = mu, torch.full(mu.shape[:1], math.inf, dtype=mu.dtype, device=mu.device)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for t in range(n_iter):
            eps = torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
            mu, sigma, x, v, w, _ = _run(_cem_step, compile, f, mu, sigma, eps, n_elite=n_elite,
                                         lb=lo, ub=hi)  # fmt: skip
            if return_best:
                val, idx = torch.where(torch.isfinite(v), v, math.inf).min(-1)
                better = val < best_v
                cand = _take(x, idx.unsqueeze(1)).squeeze(1)
                best_x = torch.where(better.unsqueeze(-1), cand, best_x)
                best_v = torch.where(better, val, best_v)
            if callback is not None:
                callback(IterationInfo(t, x.detach(), v.detach(), w, mu.detach(), sigma.detach()))
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
    """Thin module holding the hyper-parameters of :func:`dcem` (``compile`` included).

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
        compile: bool = False,
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
        _check_bool("compile", compile)
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
            compile=compile,
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
