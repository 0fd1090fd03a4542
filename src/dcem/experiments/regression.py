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
nets' parameters are stacked along a first dimension and the inner optimizer solves one
problem per seed in one call, which costs little more than one seed on a CPU core. Each seed
keeps its own net, optimizer, schedule, data order and results; the DCEM noise of a batch
comes from one generator. With ``compile`` (the default), every DCEM iteration runs compiled
(:func:`dcem.dcem`'s ``compile=True``: ``torch.compile`` of one iteration, the energy net's
forward and backward included).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dcem
from dcem.experiments import common
from dcem.experiments.common import RunFolderError

__all__ = [
    "EXPERIMENT",
    "METHODS",
    "EnergyNet",
    "RegressionConfig",
    "RunFolderError",
    "check_out_folder",
    "energies",
    "evaluate_batch",
    "plot",
    "predict",
    "predict_batch",
    "run",
    "stack_params",
    "summarize",
]

log = logging.getLogger(__name__)

EXPERIMENT = "regression"
METHODS = ("gd", "dcem")
LABELS = {"gd": "Unrolled GD", "dcem": "DCEM"}
COLORS = {"gd": "#348ABD", "dcem": "#A60628"}
METRIC_FIELDS = ["update", "train_mse", "lr"]
CKPT_VERSION = 3  # 3: one DCEM noise generator per job
COMPILED_METHODS = ("dcem",)
"""Methods that ``compile`` compiles. Unrolled GD's training loss differentiates the energy
twice (:func:`dcem.unroll_gd` with ``create_graph``), which ``torch.compile`` does not support
("does not currently support double backward"): it always runs eagerly."""

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
    """Seeds of ``gd`` trained together in one process, their nets stacked (see
    :func:`stack_params`). Each seed keeps its own net, optimizer, schedule and data order;
    its numbers agree with a run of it alone up to float rounding."""
    dcem_seed_batch: int = 2
    """Seeds of ``dcem`` trained together (see ``gd_seed_batch``). The batch's DCEM noise
    comes from one generator, so a DCEM seed's numbers depend on the batch it trains in."""
    eval_seed: int = 1234
    """Seed of the fresh generator used for every DCEM evaluation (train MSE and ablation)."""
    grid_size: int = 200
    """Points per axis of the saved energy surface on ``[0, 2 pi] x [-y_max, y_max]``."""
    y_max: float = 7.0
    """Half-height of the energy-surface window (fig. 2)."""
    compile: bool = True
    """Run DCEM's iterations compiled (``dcem.dcem(..., compile=True)``; see
    :data:`COMPILED_METHODS`), in training and evaluations. Compiling takes tens of seconds
    per worker process (the training iteration's in each job's ``first_update_seconds``, the
    evaluation's at its first evaluation; less with torch's compile cache warm); a
    compilation that fails warns once and runs eagerly. Each update agrees with the eager
    one to float rounding; over hundreds of updates the trajectories drift apart."""

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
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be a bool, got {self.compile!r}")
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
        """A budget that exercises every step in seconds (not a reproduction; eager, as a
        compilation would take longer than the training)."""
        preset: dict[str, Any] = dict(
            seeds=(0, 1),
            compile=False,
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

N_HIDDEN_LAYERS = 2  # Softplus layers after the first: hidden.0, hidden.1

Params = Mapping[str, Tensor]
"""Parameters of S energy nets by :class:`EnergyNet` name, each stacked along a new first
dimension (``inp.weight``: ``(S, n_hidden, 2)``, ...), as :func:`stack_params` makes them."""


class EnergyNet(nn.Module):
    """``E_theta(x, y)``: an MLP on ``(x, y)`` with three Softplus hidden layers, scalar out.

    The parameters (``inp = Linear(2, n_hidden)`` on ``cat(x, y)``, two ``Linear(n_hidden,
    n_hidden)`` in ``hidden``, ``out = Linear(n_hidden, 1)``) hold one net; the arithmetic is
    :func:`energies`, which evaluates S stacked nets at once, called here with S = 1.
    """

    def __init__(self, n_hidden: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(2, n_hidden)
        self.hidden = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(N_HIDDEN_LAYERS)])
        self.out = nn.Linear(n_hidden, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (..., 1), broadcastable -> energies (...)."""
        x, y = torch.broadcast_tensors(x, y)
        e = energies(stack_params([self]), x.reshape(1, -1, 1), y.reshape(1, -1, 1, 1))
        return e.reshape(x.shape[:-1])

    def energy_fn(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``y -> E(x, y)`` for fixed x: (B, 1); y: (B, 1) -> (B,) or (B, N, 1) -> (B, N)."""
        return batched_energy_fn(stack_params([self]), x.unsqueeze(0))


def stack_params(models: Sequence[EnergyNet]) -> dict[str, Tensor]:
    """The parameters of S equally sized nets by name, each stacked along a new first dim.

    Differentiable: the gradient of a stacked tensor flows back to each net's own parameters
    (so each seed keeps its own ``nn.Module`` and optimizer).
    """
    named = [dict(m.named_parameters()) for m in models]
    return {name: torch.stack([n[name] for n in named]) for name in named[0]}


def energies(params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Energies of S nets: x (S, P, 1) points and y (S, P, n, 1) candidates -> (S, P, n).

    Net s sees only its own P points. The first layer is ``b + x w_x + y w_y`` (the x part
    computed once per point); the others are batched matrix products over the S nets.
    """
    return _energies_at(params, _x_part(params, x), y)


def _x_part(params: Params, x: Tensor) -> Tensor:
    """The first layer's bias plus its x column for points x (S, P, 1): (S, P, n_hidden)."""
    w = params["inp.weight"]
    return torch.addcmul(params["inp.bias"].unsqueeze(1), x, w[:, :, 0].unsqueeze(1))


def _energies_at(params: Params, x_part: Tensor, y: Tensor) -> Tensor:
    n_nets, n_points, n = y.shape[:3]
    w_y = params["inp.weight"][:, :, 1].reshape(n_nets, 1, 1, -1)
    h = F.softplus(torch.addcmul(x_part.unsqueeze(2), y, w_y)).reshape(n_nets, n_points * n, -1)
    for i in range(N_HIDDEN_LAYERS):
        weight, bias = params[f"hidden.{i}.weight"], params[f"hidden.{i}.bias"]
        h = F.softplus(torch.baddbmm(bias.unsqueeze(1), h, weight.mT))
    # The 1-unit output layer as multiply-and-sum: a (.., H) x (H, 1) bmm and its backward
    # cost several times more on a CPU core. out.weight: (S, 1, H), out.bias: (S, 1).
    e = torch.linalg.vecdot(h, params["out.weight"]) + params["out.bias"]
    return e.reshape(n_nets, n_points, n)


def batched_energy_fn(params: Params, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``y -> E_s(x_sp, y)`` for S nets at once, for the inner optimizers.

    x: (S, P, 1). The optimizers see the B = S * P problems in the order (net, point):
    y: (B, 1) -> (B,) or (B, N, 1) -> (B, N).
    """
    x_part = _x_part(params, x)

    def energy(y: Tensor) -> Tensor:
        n = y.shape[1] if y.dim() == 3 else 1
        return _energies_at(params, x_part, y.reshape(*x.shape[:2], n, 1)).reshape(y.shape[:-1])

    return energy


def predict_batch(
    params: Params,
    x: Tensor,
    method: str,
    cfg: RegressionConfig,
    n_iter: int,
    generator: torch.Generator | None = None,
    *,
    compile: bool = False,
) -> Tensor:
    """``argmin_y E_s(x_sp, y)`` for S nets (``params`` from :func:`stack_params`) by the
    inner optimizer ``method`` with ``n_iter`` steps, one call for all S * P problems.

    x: (S, P, 1) -> y_hat: (S, P, 1), differentiable w.r.t. ``params`` (unrolled GD's steps,
    DCEM's iterations by autograd). ``generator``: DCEM's noise; ``compile``: DCEM's
    iterations compiled (both unused by ``gd``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    energy = batched_energy_fn(params, x)
    y0 = x.new_zeros(x.shape[0] * x.shape[1], 1)
    if method == "gd":
        y_hat = dcem.unroll_gd(energy, y0, n_iter=n_iter, lr=cfg.gd_lr)
    else:
        y_hat = dcem.dcem(
            energy,
            y0,
            cfg.dcem_init_sigma,
            n_sample=cfg.dcem_n_sample,
            n_elite=cfg.dcem_n_elite,
            n_iter=n_iter,
            tau=cfg.dcem_tau,
            normalize=cfg.dcem_normalize,
            generator=generator,
            compile=compile,
        )
    return y_hat.reshape(x.shape)


def predict(
    model: EnergyNet,
    x: Tensor,
    method: str,
    cfg: RegressionConfig,
    n_iter: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`predict_batch` for one net: x (B, 1) -> y_hat (B, 1)."""
    return predict_batch(stack_params([model]), x.unsqueeze(0), method, cfg, n_iter, generator)[0]


def _dataset(cfg: RegressionConfig) -> tuple[Tensor, Tensor]:
    """x, y*: (n_points, 1) each."""
    x = torch.linspace(0.0, 2.0 * math.pi, cfg.n_points).unsqueeze(1)
    return x, x * torch.sin(x)


def evaluate_batch(
    models: Sequence[EnergyNet], x: Tensor, method: str, cfg: RegressionConfig, n_iter: int
) -> Tensor:
    """Predictions of S nets on the same points without a parameter graph: x (P, 1) ->
    (S, P, 1).

    Each net is solved on its own, all points in one call, its DCEM noise drawn from a fresh
    generator seeded with ``eval_seed``: the same draws for every net, so an evaluation
    depends on the net only.
    """
    preds = []
    with torch.no_grad():  # unroll_gd still differentiates E w.r.t. y, without create_graph
        for model in models:
            gen = torch.Generator(device=x.device).manual_seed(cfg.eval_seed)
            params, points = stack_params([model]), x.unsqueeze(0)
            preds.append(
                predict_batch(params, points, method, cfg, n_iter, gen, compile=cfg.compile)[0]
            )
    return torch.stack(preds)


def _mse(preds: Tensor, y: Tensor) -> list[float]:
    """Per-net MSE of (S, P, 1) predictions against y (P, 1)."""
    return (preds - y).square().mean(dim=(1, 2)).tolist()


# --------------------------------------------------------------------------- one training job


@dataclass
class _Job:
    """The mutable training state of one job: a method and a batch of seeds trained together.

    Each seed keeps its own net, Adam state, LR schedule, data-order generator and metric
    rows; the batch shares the arithmetic and the DCEM noise generator.
    """

    method: str
    seeds: tuple[int, ...]
    models: list[EnergyNet]
    opts: list[torch.optim.Adam]
    scheds: list[torch.optim.lr_scheduler.ReduceLROnPlateau]
    index_gens: list[torch.Generator]
    sample_gen: torch.Generator
    first_update_seconds: float | None = None
    """The first update of this process (a compilation's time included)."""
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
    """Seed s: net init from ``seed_everything(s)``, data order from ``SeedSequence(s)``; the
    batch's DCEM noise from ``SeedSequence(seeds)`` (for one seed, ``SeedSequence(s)``)."""
    sample_seed = np.random.SeedSequence(list(seeds)).generate_state(2)[1]
    job = _Job(method, seeds, [], [], [], [], torch.Generator().manual_seed(int(sample_seed)))
    for seed in seeds:
        common.seed_everything(seed)
        model = EnergyNet(cfg.n_hidden)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
        job.models.append(model)
        job.opts.append(opt)
        job.scheds.append(sched)
        index_seed = np.random.SeedSequence(seed).generate_state(2)[0]
        job.index_gens.append(torch.Generator().manual_seed(int(index_seed)))
        job.rows[seed] = []
    return job


def _job_state(job: _Job) -> dict[str, Any]:
    per_seed = {
        str(seed): {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"index": index_gen.get_state()},
        }
        for seed, model, opt, sched, index_gen in zip(
            job.seeds, job.models, job.opts, job.scheds, job.index_gens, strict=True
        )
    }
    return {
        "version": CKPT_VERSION,
        "method": job.method,
        "seeds": list(job.seeds),
        "update": job.update,
        "seconds": job.seconds,
        "torch_rng": torch.get_rng_state(),
        "sample_rng": job.sample_gen.get_state(),
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
    job.sample_gen.set_state(state["sample_rng"])
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
    for _ in range(min(cfg.n_inner_update, cfg.n_updates - job.update)):
        start = time.perf_counter()
        y_hat = predict_batch(
            stack_params(job.models), x_j, job.method, cfg, cfg.n_inner_iter, job.sample_gen,
            compile=cfg.compile,
        )  # fmt: skip
        # The seeds share no parameter: the gradient of the sum is each seed's own gradient
        # of its squared error (the reference's MSE on one point).
        loss = (y_hat - y_j).square().sum()
        for opt in job.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for model, opt in zip(job.models, job.opts, strict=True):
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
        if job.first_update_seconds is None:
            job.first_update_seconds = time.perf_counter() - start
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
            "compiled": cfg.compile and job.method in COMPILED_METHODS,
            "first_update_seconds": job.first_update_seconds,
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
    overwrite: bool = False, address: str | None = None,
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
        pending.sort(key=_longest_first)
        if pending:
            _run_pending(cfg, out, pending, workers, progress, address)
        summary = summarize(out, run_wall_seconds=time.perf_counter() - start)
        plot(out)
    return summary


def _longest_first(job: tuple[str, tuple[int, ...]]) -> tuple[bool, int]:
    """Sort key starting the longest jobs first, for better packing on the workers: DCEM
    before GD (a DCEM update evaluates the net on ``dcem_n_sample`` candidates per point,
    GD on one), then larger batches of seeds first."""
    method, seeds = job
    return method != "dcem", -len(seeds)


def _run_pending(
    cfg: RegressionConfig,
    out: Path,
    pending: list[tuple[str, tuple[int, ...]]],
    workers: int,
    show: bool,
    address: str | None = None,
) -> None:
    done = {
        batch_key(m, s): len(s) * common.checkpointed(out, batch_key(m, s), "update")
        for m, s in pending
    }
    total = cfg.n_updates * sum(len(s) for _, s in pending)
    with _Progress(done, total, show) as advance:
        common.run_jobs(
            functools.partial(run_job, cfg, out.resolve()),
            pending,
            workers,
            advance,
            _log_results,
            address=address,
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
    seeds of the training time per update, periodic evaluations and compilation included),
    ``first_update_seconds`` (per method: the longest first update of its jobs in the
    processes that finished them, a compilation included; null if they made none),
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
    for name in ("ablation_ci95", "ablation_per_seed", "ms_per_update", "wall_seconds",
                 "first_update_seconds"):  # fmt: skip
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
    firsts = [r["first_update_seconds"] for r in results if r["first_update_seconds"] is not None]
    summary["first_update_seconds"][method] = max(firsts) if firsts else None


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
