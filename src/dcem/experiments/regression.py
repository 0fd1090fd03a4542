"""Energy-based 1-D regression: unrolled GD vs DCEM (paper §5.1, appendix B; figs 2, 6, 7).

Data ``y* = x sin(x)`` on ``n_points`` evenly spaced ``x`` in ``[0, 2 pi]``. An energy network
``E_theta(x, y)`` (MLP on ``(x, y)``) defines the prediction ``y_hat(x) = argmin_y E_theta(x, y)``,
computed by a differentiable inner optimizer:

- ``gd``: :func:`dcem.unroll_gd`, ``n_inner_iter`` steps of size ``gd_lr`` from ``y = 0``;
- ``dcem``: :func:`dcem.dcem`, ``n_inner_iter`` iterations from ``N(0, dcem_init_sigma^2)``.

Training (the public reference's ``regression.py`` and its config as released with the paper):
each *sample step* draws one training index and makes ``n_inner_update`` (1) Adam updates on
``(y_hat(x_j) - y*_j)^2`` (gradient norm clipped); every ``eval_every`` (100) updates the
full-data MSE is logged and steps a reduce-on-plateau schedule. At the end each model is
evaluated with ``1..20`` inner steps (the test-time ablation), and its predictions and energy
surface are saved.

The seeds of a method train together in batches (``gd_seed_batch``, ``dcem_seed_batch``): their
nets are stacked and evaluated with batched matrix products, which costs little more than one
seed on a CPU core, while every seed keeps its own net, optimizer, schedule, random streams and
results.

Run folder (``out``)::

    config.json              resolved config, git commit, library versions
    metrics.csv              method, seed, update, train_mse, lr (every eval_every updates)
    summary.json             final MSE, ablation and timings per method (see `summarize`)
    ckpt/{method}-{seeds}.pt latest training state of each job, a batch of seeds (resume)
    jobs/{method}-{seed}.*   per-seed metrics (.csv), model outputs (.npz), result (.json)
    *.png                    figures, drawn only from the files above (`plot`)

Jobs run in parallel worker processes with one torch thread each; a killed run resumes from
its checkpoints and reproduces the numbers of an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import dcem
from dcem import optim
from dcem.experiments import common
from dcem.experiments.common import RunFolderError

__all__ = [
    "EXPERIMENT",
    "METHODS",
    "EnergyNet",
    "RegressionConfig",
    "RunFolderError",
    "check_out_folder",
    "plot",
    "predict",
    "run",
    "summarize",
]

log = logging.getLogger(__name__)

EXPERIMENT = "regression"
METHODS = ("gd", "dcem")
LABELS = {"gd": "Unrolled GD", "dcem": "DCEM"}
COLORS = {"gd": "#348ABD", "dcem": "#A60628"}
# Milliseconds per update of a job of S seeds ~ fixed + per_seed * S, evaluations included,
# to start the longest jobs first (one CPU core, session 5: GD 1.45 ms for one seed and 2.26
# for three; DCEM 6.9 and 10.2 ms for one and two plus 1.4 ms of evaluation per seed).
JOB_COST = {"gd": (1.05, 0.4), "dcem": (3.6, 4.7)}
METRIC_FIELDS = ["update", "train_mse", "lr"]
EVAL_ROWS = 2_000  # net evaluations (rows) per solve in evaluations (see `evaluate_batch`)
CKPT_VERSION = 2  # 2: one checkpoint per batch of seeds

Progress = common.ProgressFn
"""Called as ``progress(job_key, updates_done)`` every ``eval_every`` updates of a job."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RegressionConfig:
    """Everything that determines the results of a regression run (recorded in config.json)."""

    methods: tuple[str, ...] = METHODS
    """Inner optimizers to train, a subset of ``("gd", "dcem")``."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One training job per (method, seed); the seed fixes init, data order and DCEM noise."""
    n_updates: int = 60_000
    """Adam updates per job (the paper's "number of updates")."""
    n_inner_update: int = 1
    """Consecutive updates on the same randomly drawn training point. The reference as
    released with the paper (facebookresearch/dcem, commit 36be13c, ``regression-conf.yaml``)
    uses 1: every update draws a new point. Its later copy under ``exps/`` says 3, which
    converges about three times slower per update here than the paper's fig. 6
    (0.18 vs 0.05 train MSE for unrolled GD at 12k updates)."""
    n_points: int = 100
    """Training points ``x`` evenly spaced on ``[0, 2 pi]``."""
    n_hidden: int = 128
    """Width of each of the energy MLP's three Softplus hidden layers."""
    lr: float = 1e-3
    """Initial Adam learning rate."""
    clip_norm: float = 1.0
    """Maximum gradient norm of each update."""
    eval_every: int = 100
    """Updates between full-data MSE evaluations (logged; they step the LR schedule). The
    reference checks ``step % 100 == 0`` after each sample step of ``n_inner_update`` updates:
    with 1 it evaluates, and steps the schedule, every 100 updates."""
    plateau_patience: int = 20
    """ReduceLROnPlateau patience, counted in evaluations (reference: 20, so 2,000 updates)."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor."""
    checkpoint_every: int = 3_000
    """Updates between checkpoints (checkpoints fall on sample-step boundaries)."""
    n_inner_iter: int = 10
    """Inner GD steps / DCEM iterations during training."""
    gd_lr: float = 0.1
    """Step size of the unrolled gradient descent on ``y``."""
    dcem_n_sample: int = 100
    """DCEM samples per iteration."""
    dcem_n_elite: int = 10
    """DCEM (soft) elite set size."""
    dcem_tau: float = 1.0
    """DCEM temperature (the paper's tau: it divides the scores)."""
    dcem_init_sigma: float = 7.0
    """Standard deviation of DCEM's initial sampling distribution (mean 0)."""
    dcem_normalize: bool = True
    """Standardize the energies of each DCEM iteration before the soft top-k."""
    ablation_steps: tuple[int, ...] = tuple(range(1, 21))
    """Test-time inner step counts for the ablation (fig. 6 right, fig. 7)."""
    gd_seed_batch: int = 3
    """Seeds of ``gd`` trained together as one batched model in one process (``baddbmm``
    over their stacked weights). Each seed keeps its own net, optimizer, schedule and random
    streams; its numbers agree with a run of it alone up to float rounding."""
    dcem_seed_batch: int = 2
    """Seeds of ``dcem`` trained together (see ``gd_seed_batch``). A DCEM update costs about
    three GD updates, so with two workers the batches dcem{0,1} | dcem{2} then gd{0,1,2}
    finish at about the same time (one batch of three would leave a core idle for most of
    the run)."""
    eval_seed: int = 1234
    """Seed of the fresh generator used for every DCEM evaluation (train MSE and ablation)."""
    grid_size: int = 200
    """Points per axis of the saved energy surface on ``[0, 2 pi] x [-y_max, y_max]``."""
    y_max: float = 7.0
    """Half-height of the energy-surface window (fig. 2)."""

    def __post_init__(self) -> None:
        _check_choices("methods", self.methods, METHODS)
        _check_ints("seeds", self.seeds, low=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        _check_ints("ablation_steps", self.ablation_steps, low=1)
        for name in ("n_updates", "n_inner_update", "n_points", "n_hidden", "eval_every"):
            _check_ints(name, (getattr(self, name),), low=1)
        for name in ("checkpoint_every", "n_inner_iter", "dcem_n_sample", "grid_size",
                     "gd_seed_batch", "dcem_seed_batch"):  # fmt: skip
            _check_ints(name, (getattr(self, name),), low=1)
        _check_ints("plateau_patience", (self.plateau_patience,), low=0)
        _check_ints("eval_seed", (self.eval_seed,), low=0)
        if not 1 <= self.dcem_n_elite < self.dcem_n_sample:
            raise ValueError(
                f"dcem_n_elite must be in [1, dcem_n_sample={self.dcem_n_sample}), "
                f"got {self.dcem_n_elite}"
            )
        for name in ("lr", "clip_norm", "gd_lr", "dcem_tau", "dcem_init_sigma", "y_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")

    @classmethod
    def quick(cls, **overrides: Any) -> RegressionConfig:
        """A budget that exercises every step in seconds (not a reproduction)."""
        preset: dict[str, Any] = dict(
            seeds=(0, 1),
            n_updates=300,
            eval_every=50,
            checkpoint_every=150,
            ablation_steps=(1, 5, 10, 15, 20),
            grid_size=60,
        )
        return cls(**{**preset, **overrides})

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-compatible values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_choices(name: str, values: Sequence[str], choices: Sequence[str]) -> None:
    if not values or any(v not in choices for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct values from {choices}, got {values!r}")


def _check_ints(name: str, values: Sequence[int], low: int) -> None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)
    if not values or not ok:
        raise ValueError(f"{name} must be integers >= {low}, got {values!r}")


# --------------------------------------------------------------------------- model


class EnergyNet(nn.Module):
    """``E_theta(x, y)``: an MLP on ``(x, y)`` with three Softplus hidden layers, scalar out.

    The first layer is ``Linear(2, n_hidden)`` on ``cat(x, y)``, evaluated as
    ``b + x w_x + y w_y`` so that :meth:`energy_fn` can compute the ``x`` part once per
    prediction (the inner optimizers evaluate many ``y`` for the same ``x``).
    """

    def __init__(self, n_hidden: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(2, n_hidden)
        self.hidden = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(2)])
        self.out = nn.Linear(n_hidden, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (..., 1), broadcastable -> energies (...)."""
        return self._head(self._first(torch.addcmul(self.inp.bias, x, self.inp.weight[:, 0]), y))

    def energy_fn(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``y -> E(x, y)`` for fixed x: (B, 1); y: (B, 1) -> (B,) or (B, N, 1) -> (B, N)."""
        x_part = torch.addcmul(self.inp.bias, x, self.inp.weight[:, 0])  # (B, n_hidden)

        def energy(y: Tensor) -> Tensor:
            return self._head(self._first(x_part if y.dim() == 2 else x_part.unsqueeze(1), y))

        return energy

    def _first(self, x_part: Tensor, y: Tensor) -> Tensor:
        return F.softplus(torch.addcmul(x_part, y, self.inp.weight[:, 1]))

    def _head(self, h: Tensor) -> Tensor:
        for layer in self.hidden:
            linear = cast(nn.Linear, layer)
            h = F.softplus(F.linear(h, linear.weight, linear.bias))
        return F.linear(h, self.out.weight, self.out.bias).squeeze(-1)


def predict(
    model: EnergyNet,
    x: Tensor,
    method: str,
    cfg: RegressionConfig,
    n_iter: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``argmin_y E(x, y)`` by the inner optimizer ``method`` with ``n_iter`` steps.

    x: (B, 1) -> y_hat: (B, 1), differentiable w.r.t. the model's parameters.
    """
    energy = model.energy_fn(x)
    if method == "gd":
        return dcem.unroll_gd(energy, torch.zeros_like(x), n_iter=n_iter, lr=cfg.gd_lr)
    if method == "dcem":
        return dcem.dcem(
            energy,
            torch.zeros_like(x),
            cfg.dcem_init_sigma,
            n_sample=cfg.dcem_n_sample,
            n_elite=cfg.dcem_n_elite,
            n_iter=n_iter,
            tau=cfg.dcem_tau,
            normalize=cfg.dcem_normalize,
            generator=generator,
        )
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _dataset(cfg: RegressionConfig) -> tuple[Tensor, Tensor]:
    """x, y*: (n_points, 1) each."""
    x = torch.linspace(0.0, 2.0 * math.pi, cfg.n_points).unsqueeze(1)
    return x, x * torch.sin(x)


def _predict_eval(
    model: EnergyNet, x: Tensor, method: str, cfg: RegressionConfig, n_iter: int
) -> Tensor:
    """Predictions of one net without a parameter graph: x (P, 1) -> (P, 1); see
    :func:`evaluate_batch` (DCEM's noise comes from a fresh ``eval_seed`` generator)."""
    return evaluate_batch([model], x, method, cfg, n_iter)[0]


# --------------------------------------------------------------------------- seeds as one batch


def stack_params(models: Sequence[EnergyNet]) -> list[Tensor]:
    """The parameters of S equally sized nets, each stacked along a new first dim (S, ...).

    Differentiable: the gradient of a stacked tensor flows back to each net's own parameters.
    """
    return [torch.stack(group) for group in zip(*(m.parameters() for m in models), strict=True)]


def _net_inputs(params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, ...]:
    """The stacked nets' parameters as :func:`_net_forward` takes them, for points x (S, P, 1):
    ``(x_part (S, P, H), w_y (S, 1, 1, H), w_1, b_1, w_2, b_2, w_out, b_out)``, where
    ``x_part`` is the first layer's bias plus its x part and ``w_y`` its y column."""
    w_in, b_in, *rest = params
    x_part = torch.addcmul(b_in.unsqueeze(1), x, w_in[:, :, 0].unsqueeze(1))
    return (x_part, w_in[:, :, 1].reshape(x.shape[0], 1, 1, -1), *rest)


def _net_forward(y_sp: Tensor, net: Sequence[Tensor]) -> Tensor:
    """Energies E (S, P * n) of S nets (``net`` from :func:`_net_inputs`) at candidates
    y_sp (S, P, n, 1), differentiable by autograd."""
    x_part, w_y, w_1, b_1, w_2, b_2, w_out, b_out = net
    n_nets, n_points, n = y_sp.shape[:3]
    a_1 = torch.addcmul(x_part.unsqueeze(2), y_sp, w_y).reshape(n_nets, n_points * n, -1)
    h_1 = F.softplus(a_1)
    a_2 = torch.baddbmm(b_1.unsqueeze(1), h_1, w_1.transpose(1, 2))
    h_2 = F.softplus(a_2)
    a_3 = torch.baddbmm(b_2.unsqueeze(1), h_2, w_2.transpose(1, 2))
    h_3 = F.softplus(a_3)
    # The 1-unit output layer as multiply-and-sum: a (.., H) x (H, 1) bmm and its backward
    # cost several times more on a CPU core. w_out: (S, 1, H), b_out: (S, 1).
    return torch.linalg.vecdot(h_3, w_out) + b_out


def _softplus_np(a: np.ndarray, sigmoid: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``F.softplus(a)`` (beta 1, threshold 20) in NumPy and, when ``sigmoid``, its derivative
    ``exp(a) / (1 + exp(a))`` as ``torch.ops.aten.softplus_backward`` computes it (1 above
    the threshold). NumPy's exp and log1p took 0.6-0.7x the time of torch's softplus kernel
    on a CPU core here for (2, 100..1000, 128) arrays."""
    with np.errstate(over="ignore", invalid="ignore"):  # exp(a) = inf above ~88: masked
        z = np.exp(a)
        h = np.log1p(z)
        s = None
        if sigmoid:
            s = z + 1
            np.divide(z, s, out=s)
    if a.max(initial=-np.inf) > 20:
        big = a > 20
        np.copyto(h, a, where=big)
        if s is not None:
            np.copyto(s, 1, where=big)
    return h, s


class _NetArrays:
    """The stacked nets (from :func:`_net_inputs`) as NumPy arrays shaped for
    :func:`_net_forward_np` and :func:`_net_backward_np` (views of the tensors' memory)."""

    def __init__(self, net: Sequence[Tensor]) -> None:
        x_part, w_y, w_1, b_1, w_2, b_2, w_out, b_out = (t.detach().numpy() for t in net)
        n_nets, self.n_points, n_hidden = x_part.shape
        self.x_part, self.w_1, self.w_2, self.b_out = x_part, w_1, w_2, b_out
        self.w_y, self.w_out = w_y.reshape(n_nets, 1, n_hidden), w_out
        self.b_1, self.b_2 = b_1[:, None], b_2[:, None]
        self.w_1t, self.w_2t = w_1.transpose(0, 2, 1), w_2.transpose(0, 2, 1)


def _net_forward_np(
    y: np.ndarray, net: _NetArrays, sigmoid: bool
) -> tuple[np.ndarray, tuple[np.ndarray | None, ...]]:
    """:func:`_net_forward` in NumPy: candidates y (S, P * n) -> (E (S, P * n), (s_1, h_1,
    s_2, h_2, s_3, h_3)) with the activations ``h_l = softplus(a_l)`` and, for
    :func:`_net_backward_np` (when ``sigmoid``), their derivatives ``s_l = softplus'(a_l)``,
    each (S, P * n, H)."""
    n_nets, rows = y.shape
    a_1 = net.x_part[:, :, None, :] + y.reshape(n_nets, net.n_points, -1, 1) * net.w_y[:, None]
    a_1 = a_1.reshape(n_nets, rows, -1)
    h_1, s_1 = _softplus_np(a_1, sigmoid)
    a_2 = np.matmul(h_1, net.w_1t)
    a_2 += net.b_1
    h_2, s_2 = _softplus_np(a_2, sigmoid)
    a_3 = np.matmul(h_2, net.w_2t)
    a_3 += net.b_2
    h_3, s_3 = _softplus_np(a_3, sigmoid)
    e = np.matmul(h_3, net.w_out.transpose(0, 2, 1))[..., 0]
    e += net.b_out
    return e, (s_1, h_1, s_2, h_2, s_3, h_3)


def _net_backward_np(
    g_e: np.ndarray, y: np.ndarray, acts: Sequence[np.ndarray], net: _NetArrays,
    grads: Sequence[np.ndarray], need_y: bool,
) -> np.ndarray | None:  # fmt: skip
    """The vector-Jacobian product of :func:`_net_forward_np` with g_e (S, P * n).

    Adds the parameter gradients to ``grads`` (shaped like :func:`_net_inputs`' tensors) and
    returns the candidates' gradient (like y) when ``need_y``: ``g_a3 = s_3 g_e w_out``,
    ``g_a2 = s_2 (g_a3 W_2)``, ``g_a1 = s_1 (g_a2 W_1)``; ``g_W_l += g_a^T h``, ``g_b_l +=
    sum g_a``, ``g_y = g_a1 . w_y``, with the saved derivatives ``s_l = softplus'(a_l)``.
    """
    s_1, h_1, s_2, h_2, s_3, h_3 = acts
    g_xp, g_wy, g_w1, g_b1, g_w2, g_b2, g_wo, g_bo = grads
    n_nets, rows = y.shape
    g_wo += np.matmul(g_e[:, None], h_3)
    g_bo += g_e.sum(1, keepdims=True)
    g_a = g_e[..., None] * net.w_out
    g_a *= s_3
    g_w2 += np.matmul(g_a.transpose(0, 2, 1), h_2)
    g_b2 += g_a.sum(1)
    g_a = np.matmul(g_a, net.w_2)
    g_a *= s_2
    g_w1 += np.matmul(g_a.transpose(0, 2, 1), h_1)
    g_b1 += g_a.sum(1)
    g_a = np.matmul(g_a, net.w_1)
    g_a *= s_1
    g_xp += g_a.reshape(n_nets, net.n_points, -1, g_a.shape[-1]).sum(2)
    g_wy += np.matmul(y[:, None], g_a).reshape(g_wy.shape)
    if not need_y:
        return None
    return np.matmul(g_a, net.w_y.transpose(0, 2, 1))[..., 0]


def batched_energy_fn(params: Sequence[Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    """``y -> E_s(x_sp, y)`` for S nets at once, ``params`` from :func:`stack_params`.

    x: (S, P, 1), P points for each net. The inner optimizers see the B = S * P problems
    in the order (net, point): y: (B, 1) -> (B,) or (B, N, 1) -> (B, N). Each net sees only
    its own points, through batched matrix products (``baddbmm``) over the S nets.
    """
    net = _net_inputs(params, x)

    def energy(y: Tensor) -> Tensor:
        n = y.shape[1] if y.dim() == 3 else 1
        return _net_forward(y.reshape(*x.shape[:2], n, 1), net).reshape(y.shape[:-1])

    return energy


class _NonFinite(Exception):
    """Raised by :class:`_DCEMThroughNet` when an energy is not finite (the general path
    takes over, with the noise drawn so far in ``draws``)."""

    def __init__(self, draws: list[Tensor]) -> None:
        super().__init__("non-finite energy")
        self.draws = draws


def _dcem_solve_np(
    noise: Callable[[], Tensor], cfg: RegressionConfig, n_iter: int, arrays: _NetArrays,
    record: bool,
) -> tuple[np.ndarray, list[tuple]]:  # fmt: skip
    """DCEM's iterations on the nets in NumPy (:func:`dcem.dcem_step`'s arithmetic with the
    library's NumPy refit): returns the final mean (S * P, 1) and, when ``record``, what the
    backward of :class:`_DCEMThroughNet` needs of every iteration. Raises :class:`_NonFinite`
    (with the noise drawn so far) at the first non-finite energy."""
    n_nets, n_points = arrays.x_part.shape[:2]
    mu = np.zeros((n_nets * n_points, 1), arrays.x_part.dtype)
    sigma = np.full_like(mu, cfg.dcem_init_sigma)
    steps, draws = [], []
    for _ in range(n_iter):
        eps = noise()
        draws.append(eps)
        x = mu[:, None] + sigma[:, None] * eps.numpy()
        y = x.reshape(n_nets, -1)
        e, acts = _net_forward_np(y, arrays, sigmoid=record)
        if not (math.isfinite(e.sum()) or np.isfinite(e).all()):
            raise _NonFinite(draws)
        new_mu, new_sigma, _, refit = optim._soft_refit_numpy(
            torch.from_numpy(e.reshape(n_nets * n_points, -1)), torch.from_numpy(x),
            cfg.dcem_n_elite, cfg.dcem_tau, cfg.dcem_normalize,
        )  # fmt: skip
        mu, sigma = new_mu.numpy(), new_sigma.numpy()
        if record:
            steps.append((eps.numpy(), y, acts, refit))
    return mu, steps


class _DCEMThroughNet(torch.autograd.Function):
    """DCEM's solve through the energy nets (training, :func:`predict_batch`) as one node.

    The same iterations as :func:`dcem.dcem_step` in the forward (samples, energies,
    standardized soft top-k, weighted refit; same operations, same noise, small CPU
    problems); the backward walks the iterations in reverse with the refit's written-out
    VJP (the library's NumPy form) and :func:`_net_backward_np`: ``g_x = g_x(refit) +
    g_y(E)``, ``g_mu = sum_n g_x``, ``g_sigma = sum_n g_x eps``. No autograd graph is built
    and the nets run in NumPy (about a microsecond per operation against several for torch's
    on these (S, 100, 128) arrays; ``benchmarks/regression.py`` times both paths). First
    derivatives only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, noise: Callable[[], Tensor], cfg: RegressionConfig, n_iter: int, *net: Tensor
    ) -> Tensor:
        ctx.arrays = _NetArrays(net)
        mu, ctx.steps = _dcem_solve_np(noise, cfg, n_iter, ctx.arrays, record=True)
        ctx.cfg = cfg
        ctx.save_for_backward(*net)  # keeps the arrays' memory alive
        return torch.from_numpy(mu)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_mu: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        net, cfg, arrays = ctx.saved_tensors, ctx.cfg, ctx.arrays
        grads = [np.zeros(p.shape, arrays.x_part.dtype) for p in net]
        g_sigma = torch.zeros_like(g_mu)
        for t in reversed(range(len(ctx.steps))):
            eps, y, acts, refit = ctx.steps[t]
            g_v, g_x = optim._soft_refit_backward_numpy(
                refit, cfg.dcem_n_elite, cfg.dcem_tau, cfg.dcem_normalize, g_mu, g_sigma
            )
            g_y = _net_backward_np(g_v.numpy().reshape(y.shape), y, acts, arrays, grads, t > 0)
            if g_y is not None:  # mu_0 and sigma_0 are constants
                g_xn = g_x.numpy() + g_y.reshape(g_x.shape)
                g_mu = torch.from_numpy(g_xn.sum(1))
                g_sigma = torch.from_numpy((g_xn * eps).sum(1))
        need = ctx.needs_input_grad[3:]
        return (
            None, None, None,
            *(torch.from_numpy(g) if n else None for g, n in zip(grads, need, strict=True)),
        )  # fmt: skip


def _numpy_ok(x: Tensor) -> bool:
    """Whether a solve for x (S, P, 1) may leave torch for NumPy: a float CPU tensor outside
    torch.func transforms (which the written-out nodes do not support)."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch._C._are_functorch_transforms_active()
    )  # fmt: skip


def _fast_dcem_ok(x: Tensor, cfg: RegressionConfig) -> bool:
    """Whether DCEM's solve for x (S, P, 1) may run in NumPy (:func:`_dcem_solve_np`, with
    :class:`_DCEMThroughNet` for gradients): small problems (the NumPy refit's size)."""
    return _numpy_ok(x) and x.shape[0] * x.shape[1] * cfg.dcem_n_sample <= optim._SMALL_REFIT


def _softplus_parts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(softplus(a), softplus'(a), softplus''(a))`` as :func:`F.softplus` and autograd
    compute them (beta 1, threshold 20: the identity above 20, so 1 and 0 there)."""
    h, s = _softplus_np(a, sigmoid=True)
    assert s is not None
    return h, s, s * (1 - s)


class _GDThroughNet(torch.autograd.Function):
    """Unrolled GD through the energy nets (training, :func:`predict_batch`) as one node.

    (Its forward writes out the layers rather than calling :func:`_net_forward_np`: it needs
    softplus'' and not the energies, which that function would compute on this hot path.)

    The same steps as :func:`dcem.unroll_gd` on :func:`batched_energy_fn` from ``y = 0``:
    ``y <- y - lr dE/dy``, with ``dE/dy`` by the chain rule through the three Softplus
    layers (``d_3 = w_out s_3``, ``d_2 = (d_3 W_2) s_2``, ``d_1 = (d_2 W_1) s_1``, ``dE/dy =
    <d_1, w_y>``, ``s_l = softplus'(a_l)``). The backward is the reverse pass through that
    computation (second derivatives ``softplus''`` enter through the ``s_l``) in NumPy; the
    weight gradients of every step are collected and summed by one matrix product per layer.
    Autograd's double-backward graph of the same computation spent most of a training update
    on per-step rank-1 weight-gradient products and their accumulation. First derivatives
    only; ``w_out``'s bias has no effect on ``dE/dy`` and gets no gradient (as in autograd).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, cfg: RegressionConfig, n_iter: int, *net: Tensor
    ) -> Tensor:
        x_part, w_y, w_1, b_1, w_2, b_2, w_out, _ = (t.detach().numpy() for t in net)
        n_nets, n_points, n_hidden = x_part.shape
        w_y, w_out = w_y.reshape(n_nets, 1, n_hidden), w_out.reshape(n_nets, 1, n_hidden)
        w_1t, w_2t = w_1.transpose(0, 2, 1), w_2.transpose(0, 2, 1)
        lr = x_part.dtype.type(cfg.gd_lr)
        y = np.zeros((n_nets, n_points), x_part.dtype)
        steps = []
        for _ in range(n_iter):
            h_1, s_1, q_1 = _softplus_parts(x_part + y[..., None] * w_y)
            h_2, s_2, q_2 = _softplus_parts(np.matmul(h_1, w_1t) + b_1[:, None])
            _, s_3, q_3 = _softplus_parts(np.matmul(h_2, w_2t) + b_2[:, None])
            d_3 = w_out * s_3
            e_2 = np.matmul(d_3, w_2)
            d_2 = e_2 * s_2
            e_1 = np.matmul(d_2, w_1)
            d_1 = e_1 * s_1
            steps.append((y, h_1, h_2, s_1, s_2, s_3, q_1, q_2, q_3, d_1, d_2, d_3, e_1, e_2))
            y = y - lr * (d_1 * w_y).sum(-1)
        ctx.steps, ctx.lr = steps, lr
        ctx.arrays = (w_y, w_1, w_1t, w_2, w_2t, w_out)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w_y, w_1, w_1t, w_2, w_2t, w_out = ctx.arrays
        g_y = g_out.detach().numpy().astype(w_y.dtype)  # adjoint of the current y
        g_xp = np.zeros_like(ctx.steps[0][1])
        g_wy, g_wo = np.zeros_like(w_y), np.zeros_like(w_out)
        g_b1, g_b2 = np.zeros_like(w_y[:, 0]), np.zeros_like(w_y[:, 0])
        rows_1: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # g_W1 = sum L^T R
        rows_2: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        for y, h_1, h_2, s_1, s_2, s_3, q_1, q_2, q_3, d_1, d_2, d_3, e_1, e_2 in reversed(
            ctx.steps
        ):
            g_g = (-ctx.lr * g_y)[..., None]  # adjoint of dE/dy, broadcast over units
            g_d1 = g_g * w_y
            g_wy += (g_g * d_1).sum(1, keepdims=True)
            g_e1, g_s1 = g_d1 * s_1, g_d1 * e_1
            g_d2 = np.matmul(g_e1, w_1t)
            g_e2, g_s2 = g_d2 * s_2, g_d2 * e_2
            g_d3 = np.matmul(g_e2, w_2t)
            g_wo += (g_d3 * s_3).sum(1, keepdims=True)
            g_a3 = g_d3 * w_out * q_3
            g_b2 += g_a3.sum(1)
            g_a2 = g_s2 * q_2 + np.matmul(g_a3, w_2) * s_2
            g_b1 += g_a2.sum(1)
            g_a1 = g_s1 * q_1 + np.matmul(g_a2, w_1) * s_1
            g_xp += g_a1
            g_wy += (g_a1 * y[..., None]).sum(1, keepdims=True)
            g_y = g_y + (g_a1 * w_y).sum(-1)
            rows_1[0].extend((d_2, g_a2))
            rows_1[1].extend((g_e1, h_1))
            rows_2[0].extend((d_3, g_a3))
            rows_2[1].extend((g_e2, h_2))
        g_w1, g_w2 = (
            np.matmul(np.concatenate(left, 1).transpose(0, 2, 1), np.concatenate(right, 1))
            for left, right in (rows_1, rows_2)
        )
        grads = (g_xp, g_wy[:, :, None], g_w1, g_b1, g_w2, g_b2, g_wo)
        need = ctx.needs_input_grad[2:]
        return (
            None, None,
            *(torch.from_numpy(g) if n else None for g, n in zip(grads, need, strict=False)),
            None,
        )  # fmt: skip


def _fast_gd_ok(x: Tensor) -> bool:
    """Whether :class:`_GDThroughNet` may solve a training prediction for x (S, P, 1)
    (without gradients, :func:`dcem.unroll_gd` builds no graph and is cheap)."""
    return torch.is_grad_enabled() and _numpy_ok(x)


def predict_batch(
    params: Sequence[Tensor],
    x: Tensor,
    method: str,
    cfg: RegressionConfig,
    n_iter: int,
    noise: Callable[[], Tensor],
) -> Tensor:
    """``argmin_y E_s(x_sp, y)`` for S nets (``params`` from :func:`stack_params`).

    x: (S, P, 1) -> y_hat: (S, P, 1), differentiable w.r.t. ``params``. ``noise()`` returns
    the ``(S * P, dcem_n_sample, 1)`` standard normal draws of one DCEM iteration (so each
    net can draw from its own generator); unused by ``gd``. One DCEM iteration is
    :func:`dcem.dcem_step`, the step :func:`dcem.dcem` loops over; small CPU problems with
    gradients take :class:`_DCEMThroughNet` (:class:`_GDThroughNet` for ``gd``), the same
    arithmetic without an autograd graph.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gd" and _fast_gd_ok(x):
        y = _GDThroughNet.apply(cfg, n_iter, *_net_inputs(params, x))
        return cast(Tensor, y).reshape(x.shape)
    if method == "dcem" and _fast_dcem_ok(x, cfg):
        try:
            net = _net_inputs(params, x)
            if torch.is_grad_enabled():
                mu = _DCEMThroughNet.apply(noise, cfg, n_iter, *net)
            else:  # evaluations
                mu = torch.from_numpy(_dcem_solve_np(noise, cfg, n_iter, _NetArrays(net), False)[0])
            return cast(Tensor, mu).reshape(x.shape)
        except _NonFinite as stop:  # the general path ranks non-finite energies last
            noise = functools.partial(_replay_then_draw, list(stop.draws), noise)
    energy = batched_energy_fn(params, x)
    y0 = x.new_zeros(x.shape[0] * x.shape[1], 1)
    if method == "gd":
        return dcem.unroll_gd(energy, y0, n_iter=n_iter, lr=cfg.gd_lr).reshape(x.shape)
    mu, sigma = y0, torch.full_like(y0, cfg.dcem_init_sigma)
    for _ in range(n_iter):
        mu, sigma, *_ = dcem.dcem_step(
            energy, mu, sigma, noise(),
            n_elite=cfg.dcem_n_elite, tau=cfg.dcem_tau, normalize=cfg.dcem_normalize,
        )  # fmt: skip
    return mu.reshape(x.shape)


def _replay_then_draw(replay: list[Tensor], noise: Callable[[], Tensor]) -> Tensor:
    """The replayed draws in order, then fresh ones from ``noise``."""
    return replay.pop(0) if replay else noise()


def evaluate_batch(
    models: Sequence[EnergyNet],
    x: Tensor,
    method: str,
    cfg: RegressionConfig,
    n_iter: int,
    chunk: int | None = None,
) -> Tensor:
    """Predictions of S nets on the same points without a parameter graph: x (P, 1) ->
    (S, P, 1). Every net's DCEM noise comes from its own fresh ``eval_seed`` generator (the
    same draws for each net), so an evaluation depends on the net only.

    The points are solved ``chunk`` at a time (the problems are independent), which keeps
    the ``(S, chunk * n_sample, n_hidden)`` activations in cache; the noise of every
    iteration is drawn first, in the order of an unchunked solve. The default chunk makes
    about ``EVAL_ROWS`` rows per solve: on a CPU core an evaluation of two DCEM nets took
    0.39 s with 1 point per solve, 0.31 s with 5, 0.29 s with 10 or 20 and 0.30 s with 40.
    """
    n_nets, n_points = len(models), x.shape[0]
    if chunk is None:
        rows_per_point = n_nets * (cfg.dcem_n_sample if method == "dcem" else 1)
        chunk = max(1, EVAL_ROWS // rows_per_point)
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    shape = (n_points, cfg.dcem_n_sample, 1)
    draws = [torch.randn(shape, generator=gen) for _ in range(n_iter)] if method == "dcem" else []
    preds = []
    with torch.no_grad():  # unroll_gd still differentiates E w.r.t. y, without create_graph
        params = stack_params(models)
        for start in range(0, n_points, chunk):
            part = slice(start, start + chunk)
            noise = (d[part].repeat(n_nets, 1, 1) for d in draws)
            xs = x[part].expand(n_nets, -1, 1)
            preds.append(
                predict_batch(params, xs, method, cfg, n_iter, functools.partial(next, noise))
            )
    return torch.cat(preds, dim=1)


def _mse(preds: Tensor, y: Tensor) -> list[float]:
    """Per-net MSE of (S, P, 1) predictions against y (P, 1)."""
    return (preds - y).square().mean(dim=(1, 2)).tolist()


# --------------------------------------------------------------------------- one training job


@dataclass
class _Job:
    """The mutable training state of one job: a method and a batch of seeds trained together.

    Each seed keeps its own net, Adam state, LR schedule, data-order and DCEM-noise
    generators and metric rows; only the arithmetic is batched.
    """

    method: str
    seeds: tuple[int, ...]
    models: list[EnergyNet]
    opts: list[torch.optim.Adam]
    scheds: list[torch.optim.lr_scheduler.ReduceLROnPlateau]
    index_gens: list[torch.Generator]
    sample_gens: list[torch.Generator]
    update: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return batch_key(self.method, self.seeds)


def job_key(method: str, seed: int) -> str:
    """The file stem of one seed's results: ``{method}-{seed}``."""
    return f"{method}-{seed}"


def batch_key(method: str, seeds: Sequence[int]) -> str:
    """The file stem of a job's checkpoint: ``{method}-{seed}_{seed}...``
    (``{method}-{seed}`` for a single seed)."""
    return f"{method}-{'_'.join(str(s) for s in seeds)}"


def seed_batches(cfg: RegressionConfig, method: str) -> list[tuple[int, ...]]:
    """The seeds of ``cfg`` in consecutive batches of ``{method}_seed_batch``."""
    k = cfg.gd_seed_batch if method == "gd" else cfg.dcem_seed_batch
    return [cfg.seeds[i : i + k] for i in range(0, len(cfg.seeds), k)]


def _new_job(cfg: RegressionConfig, method: str, seeds: tuple[int, ...]) -> _Job:
    job = _Job(method, seeds, [], [], [], [], [])
    for seed in seeds:
        common.seed_everything(seed)
        model = EnergyNet(cfg.n_hidden)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
        index_seed, sample_seed = np.random.SeedSequence(seed).generate_state(2)
        job.models.append(model)
        job.opts.append(opt)
        job.scheds.append(sched)
        job.index_gens.append(torch.Generator().manual_seed(int(index_seed)))
        job.sample_gens.append(torch.Generator().manual_seed(int(sample_seed)))
        job.rows[seed] = []
    return job


def _job_state(job: _Job) -> dict[str, Any]:
    per_seed = {
        str(seed): {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"index": index_gen.get_state(), "sample": sample_gen.get_state()},
        }
        for seed, model, opt, sched, index_gen, sample_gen in zip(
            job.seeds, job.models, job.opts, job.scheds, job.index_gens, job.sample_gens,
            strict=True,
        )
    }  # fmt: skip
    return {
        "version": CKPT_VERSION,
        "method": job.method,
        "seeds": list(job.seeds),
        "update": job.update,
        "seconds": job.seconds,
        "torch_rng": torch.get_rng_state(),
        "per_seed": per_seed,
    }


def _restore(job: _Job, state: dict[str, Any], path: Path) -> None:
    if (state.get("version"), state.get("method"), state.get("seeds")) != (
        CKPT_VERSION,
        job.method,
        list(job.seeds),
    ):
        raise common.CheckpointError(f"checkpoint {path} does not belong to job {job.key}")
    for i, seed in enumerate(job.seeds):
        saved = state["per_seed"][str(seed)]
        job.models[i].load_state_dict(saved["model"])
        job.opts[i].load_state_dict(saved["optimizer"])
        job.scheds[i].load_state_dict(saved["scheduler"])
        job.index_gens[i].set_state(saved["rng"]["index"])
        job.sample_gens[i].set_state(saved["rng"]["sample"])
    torch.set_rng_state(state["torch_rng"])
    job.update, job.seconds = int(state["update"]), float(state["seconds"])
    job.resumed_from = job.update


def _evaluate(job: _Job, data: tuple[Tensor, Tensor], cfg: RegressionConfig) -> None:
    """Full-data MSE of every seed's net with the training step count: log it and step each
    seed's LR schedule with its own MSE."""
    x, y = data
    mses = _mse(evaluate_batch(job.models, x, job.method, cfg, cfg.n_inner_iter), y)
    for seed, opt, sched, mse in zip(job.seeds, job.opts, job.scheds, mses, strict=True):
        lr = opt.param_groups[0]["lr"]  # the rate that produced this model
        sched.step(mse)
        job.rows[seed].append({"update": job.update, "train_mse": repr(mse), "lr": repr(lr)})


def _sample_step(job: _Job, data: tuple[Tensor, Tensor], cfg: RegressionConfig) -> None:
    """Each seed draws one training point; up to ``n_inner_update`` updates on them follow."""
    x, y = data
    index = torch.stack([torch.randint(cfg.n_points, (), generator=g) for g in job.index_gens])
    x_j, y_j = x[index].unsqueeze(1), y[index].unsqueeze(1)  # (S, 1, 1) each
    shape = (1, cfg.dcem_n_sample, 1)

    def noise() -> Tensor:  # each seed's DCEM noise from its own generator
        return torch.cat([torch.randn(shape, generator=g) for g in job.sample_gens])

    for _ in range(min(cfg.n_inner_update, cfg.n_updates - job.update)):
        y_hat = predict_batch(
            stack_params(job.models), x_j, job.method, cfg, cfg.n_inner_iter, noise
        )
        # The seeds share no parameter: the gradient of the sum is each seed's own gradient
        # of its squared error (the reference's MSE on one point).
        loss = (y_hat - y_j).square().sum()
        for opt in job.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for model, opt in zip(job.models, job.opts, strict=True):
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
        job.update += 1
        if job.update % cfg.eval_every == 0:
            _evaluate(job, data, cfg)


def _checkpoint(job: _Job, out: Path) -> None:
    """Append each seed's metric rows since the last checkpoint, then save the state
    atomically (a crash in between leaves rows past the checkpoint, cut on resume)."""
    for seed in job.seeds:
        common.append_csv(out / "jobs" / f"{job_key(job.method, seed)}.csv", METRIC_FIELDS,
                          job.rows[seed])  # fmt: skip
        job.rows[seed].clear()
    common.save_checkpoint(out / "ckpt" / f"{job.key}.pt", _job_state(job))


def _resume_or_start(cfg: RegressionConfig, out: Path, method: str, seeds: tuple[int, ...]) -> _Job:
    """A fresh job, or the job restored from its checkpoint with its metrics truncated to it."""
    job = _new_job(cfg, method, seeds)
    ckpt = out / "ckpt" / f"{job.key}.pt"
    metrics = [out / "jobs" / f"{job_key(method, seed)}.csv" for seed in seeds]
    if ckpt.exists():
        _restore(job, common.load_checkpoint(ckpt), ckpt)
        for path in metrics:
            common.truncate_csv(path, METRIC_FIELDS, lambda row: int(row["update"]) <= job.update)
    else:
        for path in metrics:
            path.unlink(missing_ok=True)  # rows of a run killed before its first checkpoint
    return job


def _train(job: _Job, cfg: RegressionConfig, out: Path, progress: Progress | None) -> None:
    data = _dataset(cfg)
    last_ckpt = reported = job.update
    start = time.perf_counter()
    while job.update < cfg.n_updates:
        _sample_step(job, data, cfg)
        due = job.update - last_ckpt >= cfg.checkpoint_every or job.update == cfg.n_updates
        if progress is not None and (due or job.update - reported >= cfg.eval_every):
            # in a worker of a killed run, this exits first
            progress(job.key, job.update * len(job.seeds))
            reported = job.update
        if due:
            now = time.perf_counter()
            job.seconds += now - start
            start, last_ckpt = now, job.update
            _checkpoint(job, out)


def _final_outputs(job: _Job, cfg: RegressionConfig, out: Path) -> list[dict[str, Any]]:
    """Ablation, predictions and energy surface of each seed's final net, saved as NPZ + JSON
    (one result per seed)."""
    x, y = _dataset(cfg)
    steps = list(cfg.ablation_steps)
    evals = {
        k: evaluate_batch(job.models, x, job.method, cfg, k) for k in {*steps, cfg.n_inner_iter}
    }
    mses = {k: _mse(preds, y) for k, preds in evals.items()}
    grid_x = torch.linspace(0.0, 2.0 * math.pi, cfg.grid_size)
    grid_y = torch.linspace(-cfg.y_max, cfg.y_max, cfg.grid_size)
    gy, gx = torch.meshgrid(grid_y, grid_x, indexing="ij")
    results = []
    for i, (seed, model) in enumerate(zip(job.seeds, job.models, strict=True)):
        with torch.no_grad():
            energy = model(gx.reshape(-1, 1), gy.reshape(-1, 1)).reshape(gy.shape)
        preds = torch.stack([evals[k][i] for k in steps])
        with common.atomic_open(out / "jobs" / f"{job_key(job.method, seed)}.npz", "wb") as handle:
            np.savez(
                handle,
                x=x.squeeze(1).numpy(),
                y_target=y.squeeze(1).numpy(),
                steps=np.asarray(steps),
                predictions=preds.squeeze(2).numpy(),
                grid_x=grid_x.numpy(),
                grid_y=grid_y.numpy(),
                energy=energy.numpy(),
            )
        seconds = job.seconds / len(job.seeds)  # the job's time, shared equally by its seeds
        results.append({
            "method": job.method,
            "seed": seed,
            "updates": job.update,
            "final_mse": _finite_or_none(mses[cfg.n_inner_iter][i]),
            "ablation": {str(k): _finite_or_none(mses[k][i]) for k in steps},
            "seconds": seconds,
            "ms_per_update": 1e3 * seconds / max(job.update, 1),
            "seed_batch": list(job.seeds),
            "resumed_from": job.resumed_from,
        })  # fmt: skip
    return results


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_job(
    cfg: RegressionConfig,
    out: Path,
    method: str,
    seeds: tuple[int, ...],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or resume) one batch of seeds of ``method`` to ``cfg.n_updates`` as one batched
    model and write each seed's results; returns ``{"method", "seeds", "results"}``."""
    with common.job_slot(out, batch_key(method, seeds)):
        job = _resume_or_start(cfg, out, method, seeds)
        _train(job, cfg, out, progress)
        results = _final_outputs(job, cfg, out)
        for result in results:
            key = job_key(method, result["seed"])
            common.atomic_write_json(out / "jobs" / f"{key}.json", result)
    return {"method": method, "seeds": list(seeds), "results": results}


# --------------------------------------------------------------------------- the whole run


def check_out_folder(out: Path, cfg: RegressionConfig) -> None:
    """Raise :class:`RunFolderError` unless ``out`` is new, empty, a run of ``cfg``, or a
    regression run that saved no results yet (which :func:`run` starts over)."""
    common.check_out_folder(
        out, EXPERIMENT, cfg.to_json(), takeover=True, hint=common.OVERWRITE_HINT
    )


def _job_done(out: Path, method: str, seed: int) -> bool:
    return common.job_done(out, job_key(method, seed), lambda result: result["method"] == method)


def run(
    cfg: RegressionConfig, out: str | os.PathLike[str], workers: int = 2, progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) every job (a method and a batch of seeds) of ``cfg`` in ``out``,
    summarize and plot.

    ``workers``: parallel processes (1 runs the jobs in this process). ``progress``: show a
    tqdm bar (only on a terminal). ``overwrite``: delete the dcem run in ``out`` first (see
    :func:`common.run_folder`, which also says which folders are refused). Returns the
    summary (also written to summary.json).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out = Path(out)
    start = time.perf_counter()
    with common.run_folder(
        out, EXPERIMENT, cfg.to_json(), overwrite=overwrite, logger=log
    ) as resumed:
        jobs = [(m, seeds) for m in cfg.methods for seeds in seed_batches(cfg, m)]
        pending = [(m, seeds) for m, seeds in jobs if not all(_job_done(out, m, s) for s in seeds)]
        if resumed:
            started = sum((out / "ckpt" / f"{batch_key(*job)}.pt").exists() for job in pending)
            common.log_resumed(log, out, len(jobs) - len(pending), len(jobs), started, "jobs")
        pending.sort(key=lambda job: -_job_cost(*job))  # longest first: better packing
        if pending:
            _run_pending(cfg, out, pending, workers, progress)
        summary = summarize(out, run_wall_seconds=time.perf_counter() - start)
        plot(out)
    return summary


def _job_cost(method: str, seeds: tuple[int, ...]) -> float:
    """Relative running time of a job: a fixed cost per update plus a cost per seed."""
    fixed, per_seed = JOB_COST[method]
    return fixed + per_seed * len(seeds)


def _run_pending(
    cfg: RegressionConfig,
    out: Path,
    pending: list[tuple[str, tuple[int, ...]]],
    workers: int,
    show: bool,
) -> None:
    done = {
        batch_key(m, s): len(s) * common.checkpointed(out, batch_key(m, s), "update")
        for m, s in pending
    }
    total = cfg.n_updates * sum(len(s) for _, s in pending)
    with _Progress(done, total, show) as advance:
        common.run_jobs(
            functools.partial(run_job, cfg, out), pending, workers, advance, _log_results
        )


# ``_Progress(done, total, show, log_every=60.0)``: one tqdm bar over all jobs on a terminal,
# otherwise a log line "regression: {done} / {total} updates" every ``log_every`` seconds.
_Progress = functools.partial(
    common.RunProgress, experiment=EXPERIMENT, unit="updates", bar_unit="upd", job_noun="jobs",
    logger=log,
)  # fmt: skip


def _log_results(job: dict[str, Any]) -> None:
    for result in job["results"]:
        log.info(
            "%s seed %d: final MSE %.3g after %d updates (%.2f ms/update)",
            result["method"], result["seed"], result["final_mse"] or math.nan, result["updates"],
            result["ms_per_update"],
        )  # fmt: skip


# --------------------------------------------------------------------------- results


def summarize(out: str | os.PathLike[str], run_wall_seconds: float | None = None) -> dict[str, Any]:
    """Aggregate the per-job results of ``out`` into metrics.csv and summary.json.

    summary.json: ``final_mse`` / ``final_mse_ci95`` (mean / 95% CI half-width over seeds),
    ``final_mse_per_seed``, ``ablation`` (step count -> mean MSE), ``ablation_ci95``,
    ``ablation_per_seed``, ``updates``, ``train_inner_steps``, ``ms_per_update`` (mean over
    seeds of the training time per update, periodic evaluations included),
    ``wall_seconds`` (per method: summed job seconds; ``total``: their sum) and
    ``run_wall_seconds`` (elapsed time of the invocation that wrote the summary).
    """
    out = Path(out)
    cfg = load_config(out)
    results = {
        (m, s): json.loads((out / "jobs" / f"{job_key(m, s)}.json").read_text(encoding="utf-8"))
        for m in cfg.methods
        for s in cfg.seeds
    }
    _write_metrics(out, cfg)
    summary: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "methods": list(cfg.methods),
        "seeds": list(cfg.seeds),
        "updates": cfg.n_updates,
        "ablation_steps": list(cfg.ablation_steps),
        "train_inner_steps": cfg.n_inner_iter,
        "run_wall_seconds": run_wall_seconds,
    }
    for name in ("final_mse", "final_mse_ci95", "final_mse_per_seed", "ablation"):
        summary[name] = {}
    for name in ("ablation_ci95", "ablation_per_seed", "ms_per_update", "wall_seconds"):
        summary[name] = {}
    for method in cfg.methods:
        _summarize_method(summary, method, [results[method, s] for s in cfg.seeds])
    summary["wall_seconds"]["total"] = sum(summary["wall_seconds"][m] for m in cfg.methods)
    common.atomic_write_json(out / "summary.json", summary)
    return summary


def _summarize_method(summary: dict[str, Any], method: str, results: list[dict]) -> None:
    finals = np.array([_nan_if_none(r["final_mse"]) for r in results])
    mean, half = common.mean_ci95(finals)
    summary["final_mse"][method] = _finite_or_none(float(mean))
    summary["final_mse_ci95"][method] = _finite_or_none(float(half))
    summary["final_mse_per_seed"][method] = {str(r["seed"]): r["final_mse"] for r in results}
    steps = list(results[0]["ablation"])
    table = np.array([[_nan_if_none(r["ablation"][k]) for k in steps] for r in results])
    mean, half = common.mean_ci95(table)
    summary["ablation"][method] = {
        k: _finite_or_none(float(v)) for k, v in zip(steps, mean, strict=True)
    }
    summary["ablation_ci95"][method] = {
        k: _finite_or_none(float(v)) for k, v in zip(steps, half, strict=True)
    }
    summary["ablation_per_seed"][method] = {str(r["seed"]): r["ablation"] for r in results}
    summary["ms_per_update"][method] = float(np.mean([r["ms_per_update"] for r in results]))
    summary["wall_seconds"][method] = float(sum(r["seconds"] for r in results))


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _write_metrics(out: Path, cfg: RegressionConfig) -> None:
    fields = ["method", "seed", *METRIC_FIELDS]
    with common.atomic_open(out / "metrics.csv", "w") as handle:
        handle.write(",".join(fields) + "\n")
        for method in cfg.methods:
            for seed in cfg.seeds:
                for row in common.read_csv(out / "jobs" / f"{job_key(method, seed)}.csv"):
                    values = [method, str(seed), *(row[k] for k in METRIC_FIELDS)]
                    handle.write(",".join(values) + "\n")


def load_config(out: str | os.PathLike[str]) -> RegressionConfig:
    """The config recorded in ``out/config.json``."""
    record = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    if record.get("experiment") != EXPERIMENT:
        raise RunFolderError(f"{out} holds experiment {record.get('experiment')!r}")
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()
    }
    return RegressionConfig(**values)


# --------------------------------------------------------------------------- figures


def plot(out: str | os.PathLike[str]) -> list[Path]:
    """Draw the figures of ``out`` from summary.json, metrics.csv and jobs/*.npz only.

    convergence.png is skipped, with a log line, when no train MSE was logged (the first
    evaluation, at ``eval_every`` updates, came after the last update). Raises
    :class:`RunFolderError` for a folder without a regression summary (naming what it holds)
    or with missing or damaged result files.
    """
    out = Path(out)
    summary = common.load_summary(out, EXPERIMENT)
    try:
        methods = summary["methods"]
        npz = {m: _load_npz(out / "jobs" / f"{job_key(m, summary['seeds'][0])}.npz")
               for m in methods}  # fmt: skip
        convergence = _plot_convergence(common.read_csv(out / "metrics.csv"), methods)
        eval_every, updates = load_config(out).eval_every, summary["updates"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise RunFolderError(
            f"{out} has missing or damaged result files ({type(err).__name__}: {err}); rerun "
            "the command that made it to rewrite them"
        ) from err
    paths = []
    if convergence is None:
        log.info(
            "convergence.png not drawn: no train MSE was logged (one is logged every "
            "eval_every=%d updates; the run made %d)", eval_every, updates,
        )  # fmt: skip
    else:
        paths.append(_save(convergence, out, "convergence"))
    paths += [
        _save(_plot_ablation(summary), out, "ablation"),
        _save(_plot_predictions(npz), out, "predictions"),
        _save(_plot_energy(npz), out, "energy_surfaces"),
    ]
    return paths


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def _figure(n_panels: int = 1, width: float = 5.0) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(width * n_panels, 3.6), layout="constrained")
    axes = fig.subplots(1, n_panels, sharey=n_panels > 1, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    with common.atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    return path


def _band(ax: Any, x: np.ndarray, values: np.ndarray, method: str) -> None:
    """Geometric mean over seeds (rows of ``values``) with the 95% CI band of log10 values.

    The axes are logarithmic: an interval on the raw values reaches below zero
    with three seeds and vanishes from the plot, one on the logs does not.
    """
    logs = np.log10(np.maximum(values, np.finfo(np.float64).tiny))
    mean, half = common.mean_ci95(logs)
    half = np.nan_to_num(half)
    ax.plot(x, 10**mean, color=COLORS[method], lw=2, label=LABELS[method])
    ax.fill_between(
        x, 10 ** (mean - half), 10 ** (mean + half), color=COLORS[method], alpha=0.2, lw=0
    )


def _plot_convergence(rows: list[dict[str, str]], methods: list[str]) -> Any:
    """The train-MSE curves of ``methods``; ``None`` if no method has a logged point."""
    fig, (ax,) = _figure()
    drawn = False
    for method in methods:
        curves: dict[str, dict[int, float]] = {}
        for row in rows:
            if row["method"] == method:
                curves.setdefault(row["seed"], {})[int(row["update"])] = float(row["train_mse"])
        updates = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
        if not updates:
            continue
        values = np.array([[c[u] for u in updates] for c in curves.values()])
        _band(ax, np.array(updates), values, method)
        drawn = True
    if not drawn:
        return None
    ax.set(yscale="log", xlabel="Number of updates", ylabel="geometric mean over seeds, 95% CI")
    ax.set_title("Train MSE")
    ax.legend()
    return fig


def _plot_ablation(summary: dict[str, Any]) -> Any:
    fig, (ax,) = _figure()
    for method in summary["methods"]:
        per_seed = summary["ablation_per_seed"][method]
        steps = [int(k) for k in next(iter(per_seed.values()))]
        values = np.array([[_nan_if_none(v) for v in r.values()] for r in per_seed.values()])
        _band(ax, np.array(steps), values, method)
    trained = summary.get("train_inner_steps")
    if trained is not None:
        ax.axvline(trained, color="0.5", ls=":", lw=1, label="steps used in training")
    ax.set(yscale="log", xlabel="Number of inner loop iterations at test time", title="MSE")
    ax.set_ylabel("geometric mean over seeds, 95% CI")
    ax.set_xticks(summary["ablation_steps"])
    ax.legend()
    return fig


def _plot_predictions(npz: dict[str, dict[str, np.ndarray]]) -> Any:
    from matplotlib import cm, colors

    fig, axes = _figure(len(npz))
    steps = next(iter(npz.values()))["steps"]
    norm = colors.Normalize(vmin=steps.min(), vmax=steps.max())
    for ax, (method, data) in zip(axes, npz.items(), strict=True):
        for k, pred in zip(data["steps"], data["predictions"], strict=True):
            ax.plot(data["x"], pred, color=cm.coolwarm(norm(k)), lw=1.2)
        ax.plot(data["x"], data["y_target"], color="k", lw=2)
        ax.set(title=LABELS[method], xlabel="x", ylim=(-7.5, 3.5))
    axes[0].set_ylabel("y")
    fig.colorbar(cm.ScalarMappable(norm, "coolwarm"), ax=list(axes), label="test-time inner steps")
    return fig


def _normalized_log_energy(energy: np.ndarray) -> np.ndarray:
    """Per-x min-max normalization of E over y, then log, clipped to [-10, 0] (fig. 2)."""
    low, high = energy.min(axis=0, keepdims=True), energy.max(axis=0, keepdims=True)
    scaled = np.minimum((energy - low) / np.maximum(high - low, 1e-12), 1.0)
    return np.clip(np.log(scaled + 1e-6), -10.0, 0.0)


def _plot_energy(npz: dict[str, dict[str, np.ndarray]]) -> Any:
    fig, axes = _figure(len(npz))
    for ax, (method, data) in zip(axes, npz.items(), strict=True):
        z = _normalized_log_energy(data["energy"])
        filled = ax.contourf(data["grid_x"], data["grid_y"], z, levels=10, cmap="Blues")
        ax.plot(data["x"], data["y_target"], color="k", lw=2)
        ax.set(title=LABELS[method], xlabel="x")
    axes[0].set_ylabel("y")
    fig.colorbar(filled, ax=list(axes), label="log normalized energy")
    return fig
