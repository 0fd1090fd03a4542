"""Embedding the cartpole action space with DCEM (paper §5.2.1, appendix C; figs 3, 5, 9, 10).

An action decoder ``u_{1:H} = f_dec(z)`` maps the latent box ``[-1, 1]^d`` to H bounded
controls. Algorithm 2 trains it: repeat { draw ``x_init``; ``z_hat = argmin_z C(f_dec(z);
x_init)`` with latent DCEM; one Adam step on ``C(f_dec(z_hat))`` through DCEM }. ``tau = 0``
means plain CEM in the latent space and a decoder step with ``z_hat`` held constant.

Every ``eval_every`` iterations the embedded controller (the run's own latent solver, without
gradients, on a fixed noise seed) is evaluated on the fixed validation set of initial states;
the validation cost steps a reduce-on-plateau schedule and the best decoder is kept. The
*expert* is full-space CEM (1000 samples, 100 elites, 10 iterations, its final mean, like
the latent controller's output), evaluated once on the same set and cached in the run folder
with the reference code's cheaper expert (100/10/30) and the 1000/100/10 best sample.

Run folder (``out``)::

    config.json                 resolved config, git commit, library versions
    expert.json, expert.npz     expert costs per validation state, full-space CEM iterates
    metrics.csv                 run, latent_dim, tau, seed, iteration, train_cost, val_cost, lr
    summary.json                expert rewards, per-run best validation reward and improvement
    ckpt/{run}.pt               latest training state of each run (resume; state_dicts only)
    jobs/{run}.csv|.json|.npz   per-run metrics, result, arrays of the best decoder
    *.png                       figures, drawn only from the files above (`plot`)

Runs execute in parallel worker processes with one torch thread each; a killed run resumes
from its checkpoints and reproduces the numbers of an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import dcem
from dcem.control import (
    EXPERT_CEM,
    REFERENCE_EXPERT_CEM,
    U_LB,
    U_UB,
    ActionDecoder,
    SolverConfig,
    rollout_cost,
    sample_initial_states,
    solve_horizon,
    validation_states,
)
from dcem.control.mpc import FULL_INIT_SIGMA, LATENT_INIT_SIGMA, LATENT_LB, LATENT_UB
from dcem.experiments import common
from dcem.experiments.common import RunFolderError

__all__ = [
    "EXPERIMENT",
    "CartpoleConfig",
    "RunFolderError",
    "check_out_folder",
    "load_config",
    "plot",
    "run",
    "run_job",
    "run_key",
    "summarize",
    "train_solver",
]

log = logging.getLogger(__name__)
CONVERGED_EXPERT_CEM = SolverConfig(method="cem", n_sample=1000, n_elite=100, n_iter=30)
"""The expert of the headline factor: full-space CEM run to convergence (30 iterations; 10
leave it short of its optimum on the validation states)."""

EXPERIMENT = "cartpole"
METRIC_FIELDS = ["iteration", "train_cost", "val_cost", "lr"]
CKPT_VERSION = 1
N_TRACE_KEEP = 100  # samples per iteration kept for the iterates figure
MIN_TAU = 1e-4
"""The smallest positive DCEM temperature: the gradients through DCEM grow like 1 / tau, and
from about 1e-7 on the first few updates already make the decoder's float32 weights NaN."""

Progress = common.ProgressFn
"""Called as ``progress(run_key, iterations_done)`` every ``eval_every`` iterations of a run."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CartpoleConfig:
    """Everything that determines the results of a cartpole run (recorded in config.json).

    The expert is ``EXPERT_CEM`` (full-space CEM, 1000 samples, 100 elites, 10 iterations)
    and its output is the final mean, the same output rule as the latent controller; the
    reference code's expert (100/10/30, ``REFERENCE_EXPERT_CEM``) and the 1000/100/10 best
    sample (``return_best``) are reported beside it.
    """

    latent_dims: tuple[int, ...] = (2,)
    """Latent dimensions d of the decoder; one run per (d, tau, seed)."""
    taus: tuple[float, ...] = (1.0,)
    """DCEM temperatures (the paper's tau, dividing the scores); 0 means latent CEM with the
    decoder updated at a constant ``z_hat`` (no gradient through the optimizer)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds; a seed fixes the decoder init, the training initial states and the solver noise."""
    n_iter: int = 10_000
    """Training iterations (decoder updates) per run (the paper: 1e5). About 0.07 s each
    with d = 2, tau > 0 on one core (validations included), so the default 3 seeds on 2
    workers take about 25 minutes on a 2-core machine; tau = 0 runs are ~2.5x faster."""
    eval_every: int = 100
    """Iterations between validations (logged; they step the LR schedule, keep the best)."""
    checkpoint_every: int = 500
    """Iterations between checkpoints; a multiple of ``eval_every``."""
    horizon: int = 20
    """Planning horizon H (controls per decoded sequence)."""
    hidden: int = 256
    """Width of each of the decoder's ELU hidden layers."""
    n_layers: int = 3
    """Hidden layers of the decoder."""
    lr: float = 5e-4
    """Initial Adam learning rate."""
    clip_norm: float = 1.0
    """Maximum gradient norm of each update."""
    plateau_patience: int = 10
    """ReduceLROnPlateau patience on the validation cost, counted in validations."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor."""
    n_sample: int = 100
    """Latent solver samples per iteration."""
    n_elite: int = 10
    """Latent solver (soft) elites."""
    solver_iters: int = 10
    """Latent solver iterations."""
    init_sigma: float = 0.5
    """Initial sigma of the latent search (mean 0, the centre of the box)."""
    normalize: bool = True
    """Standardize the costs per problem inside the latent solver."""
    n_validation: int = 100
    """Size of the fixed validation set of initial states (``validation_states``)."""
    eval_seed: int = 1234
    """Seed of the fresh generator of every validation solve (and of the expert's)."""
    test_seed: int = 1
    """Seed of a held-out set of ``n_validation`` initial states (``validation_states`` uses
    0), on which the best decoder and the expert are evaluated once with fresh solver noise:
    the best validation cost is selected on the validation set, so it is optimistic."""
    surface_grid: int = 60
    """Points per axis of the saved cost surfaces C(z) on the latent box (d = 2 only)."""
    n_surface_states: int = 4
    """Validation states (the first ones) whose cost surfaces are saved; the first one is the
    state of the iterates figure."""

    def __post_init__(self) -> None:
        _check_ints("latent_dims", self.latent_dims, low=1)
        _check_ints("seeds", self.seeds, low=0)
        for name in ("latent_dims", "seeds", "taus"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"{name} must be distinct, got {getattr(self, name)}")
        ok = all(isinstance(t, (int, float)) and 0 <= t < math.inf for t in self.taus)
        if not self.taus or not ok:
            raise ValueError(f"taus must be finite numbers >= 0, got {self.taus!r}")
        if any(0 < t < MIN_TAU for t in self.taus):
            raise ValueError(f"taus must be 0 (latent CEM) or >= {MIN_TAU:g}, got {self.taus!r}")
        for name in ("n_iter", "eval_every", "checkpoint_every", "horizon", "hidden"):
            _check_ints(name, (getattr(self, name),), low=1)
        for name in ("n_layers", "solver_iters", "n_validation", "surface_grid"):
            _check_ints(name, (getattr(self, name),), low=1)
        _check_ints("plateau_patience", (self.plateau_patience,), low=0)
        _check_ints("eval_seed", (self.eval_seed,), low=0)
        _check_ints("test_seed", (self.test_seed,), low=1)
        _check_ints("n_surface_states", (self.n_surface_states,), low=1)
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"eval_every={self.eval_every}"
            )
        if not 1 <= self.n_elite < self.n_sample:
            raise ValueError(
                f"n_elite must be in [1, n_sample={self.n_sample}), got {self.n_elite}"
            )
        if self.n_surface_states > self.n_validation:
            raise ValueError(
                f"n_surface_states={self.n_surface_states} must be <= n_validation"
                f"={self.n_validation}"
            )
        for name in ("lr", "clip_norm", "init_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")

    @classmethod
    def quick(cls, **overrides: Any) -> CartpoleConfig:
        """A budget that exercises every step in seconds (not a reproduction)."""
        preset: dict[str, Any] = dict(
            taus=(1.0, 0.0),
            seeds=(0, 1),
            n_iter=60,
            eval_every=20,
            checkpoint_every=20,
            n_validation=20,
            surface_grid=25,
            n_surface_states=2,
        )
        return cls(**{**preset, **overrides})

    @classmethod
    def grid(cls, **overrides: Any) -> CartpoleConfig:
        """The paper's ablation grid: d in {2, 8, 16} x tau in {1, 0.1, 0} x 3 seeds."""
        return cls(**{"latent_dims": (2, 8, 16), "taus": (1.0, 0.1, 0.0), **overrides})

    def runs(self) -> list[tuple[int, float, int]]:
        """Every (latent_dim, tau, seed) of the config."""
        return [(d, t, s) for d in self.latent_dims for t in self.taus for s in self.seeds]

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-compatible values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_ints(name: str, values: Sequence[int], low: int) -> None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)
    if not values or not ok:
        raise ValueError(f"{name} must be integers >= {low}, got {values!r}")


def run_key(latent_dim: int, tau: float, seed: int) -> str:
    """The file stem of a run: ``d{latent_dim}-tau{tau:g}-s{seed}``."""
    return f"d{latent_dim}-tau{tau:g}-s{seed}"


def train_solver(cfg: CartpoleConfig, tau: float) -> SolverConfig:
    """The latent solver of a run: DCEM at ``tau``, or plain CEM for ``tau = 0``."""
    shared: dict[str, Any] = dict(
        n_sample=cfg.n_sample,
        n_elite=cfg.n_elite,
        n_iter=cfg.solver_iters,
        init_sigma=cfg.init_sigma,
        normalize=cfg.normalize,
    )
    if tau == 0:
        return SolverConfig(method="cem", **shared)
    return SolverConfig(method="dcem", tau=float(tau), **shared)


# --------------------------------------------------------------------------- one training run


@dataclass
class _Job:
    """The mutable training state of one (latent_dim, tau, seed) run."""

    latent_dim: int
    tau: float
    seed: int
    decoder: ActionDecoder
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau
    state_gen: torch.Generator
    sample_gen: torch.Generator
    iteration: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    best_val: float = math.inf
    best_iteration: int = 0
    best_model: dict[str, Tensor] | None = None
    window: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return run_key(self.latent_dim, self.tau, self.seed)


def _new_job(cfg: CartpoleConfig, latent_dim: int, tau: float, seed: int) -> _Job:
    common.seed_everything(seed)
    decoder = ActionDecoder(
        latent_dim, horizon=cfg.horizon, hidden=cfg.hidden, n_layers=cfg.n_layers
    )
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
    )
    state_seed, sample_seed = np.random.SeedSequence(seed).generate_state(2)
    state_gen = torch.Generator().manual_seed(int(state_seed))
    sample_gen = torch.Generator().manual_seed(int(sample_seed))
    return _Job(latent_dim, tau, seed, decoder, opt, sched, state_gen, sample_gen)


def _job_state(job: _Job) -> dict[str, Any]:
    return {
        "version": CKPT_VERSION,
        "key": job.key,
        "iteration": job.iteration,
        "seconds": job.seconds,
        "best_val": job.best_val,
        "best_iteration": job.best_iteration,
        "best_model": job.best_model,
        "model": job.decoder.state_dict(),
        "optimizer": job.opt.state_dict(),
        "scheduler": job.sched.state_dict(),
        "rng": {"state": job.state_gen.get_state(), "sample": job.sample_gen.get_state()},
    }


def _restore(job: _Job, state: dict[str, Any], path: Path) -> None:
    if (state.get("version"), state.get("key")) != (CKPT_VERSION, job.key):
        raise common.CheckpointError(f"checkpoint {path} does not belong to run {job.key}")
    job.decoder.load_state_dict(state["model"])
    job.opt.load_state_dict(state["optimizer"])
    job.sched.load_state_dict(state["scheduler"])
    job.state_gen.set_state(state["rng"]["state"])
    job.sample_gen.set_state(state["rng"]["sample"])
    job.iteration, job.seconds = int(state["iteration"]), float(state["seconds"])
    job.best_val, job.best_iteration = float(state["best_val"]), int(state["best_iteration"])
    job.best_model = state["best_model"]
    job.resumed_from = job.iteration


def validation_costs(
    decoder: ActionDecoder, solver: SolverConfig, states: Tensor, eval_seed: int
) -> Tensor:
    """``(n,)`` costs of the embedded controller on ``states``; noise from ``eval_seed`` only."""
    generator = torch.Generator().manual_seed(eval_seed)
    with torch.no_grad():
        return solve_horizon(states, decoder=decoder, solver=solver, generator=generator).cost


def _train_step(job: _Job, solver: SolverConfig, cfg: CartpoleConfig) -> float:
    """One update of Algorithm 2 on one initial state; returns its training cost."""
    x_init = sample_initial_states(1, generator=job.state_gen)
    cost = solve_horizon(x_init, decoder=job.decoder, solver=solver, generator=job.sample_gen)
    loss = cost.cost.mean()
    job.opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(job.decoder.parameters(), cfg.clip_norm)
    job.opt.step()
    job.iteration += 1
    return loss.item()


def _validate(job: _Job, solver: SolverConfig, states: Tensor, cfg: CartpoleConfig) -> None:
    """Validation cost: log it with the window's mean train cost, step the schedule, keep best."""
    val = validation_costs(job.decoder, solver, states, cfg.eval_seed).mean().item()
    lr = job.opt.param_groups[0]["lr"]  # the rate that produced this decoder
    job.sched.step(val)
    if val < job.best_val:
        job.best_val, job.best_iteration = val, job.iteration
        job.best_model = {k: v.detach().clone() for k, v in job.decoder.state_dict().items()}
    train = float(np.mean(job.window))
    job.window.clear()
    job.rows.append(
        {"iteration": job.iteration, "train_cost": repr(train), "val_cost": repr(val), "lr": lr}
    )


def _checkpoint(job: _Job, out: Path) -> None:
    """Append the metric rows since the last checkpoint, then save the state atomically."""
    common.save_job(out, job.key, METRIC_FIELDS, job.rows, _job_state(job))


def _resume_or_start(
    cfg: CartpoleConfig, out: Path, latent_dim: int, tau: float, seed: int
) -> _Job:
    """A fresh run, or the run restored from its checkpoint with its metrics truncated to it."""
    job = _new_job(cfg, latent_dim, tau, seed)
    ckpt, metrics = out / "ckpt" / f"{job.key}.pt", out / "jobs" / f"{job.key}.csv"
    if ckpt.exists():
        _restore(job, common.load_checkpoint(ckpt), ckpt)
        common.truncate_csv(
            metrics, METRIC_FIELDS, lambda row: int(row["iteration"]) <= job.iteration
        )
    else:
        metrics.unlink(missing_ok=True)  # rows of a run killed before its first checkpoint
    return job


def _train(
    job: _Job, cfg: CartpoleConfig, out: Path, progress: Progress | None, compile: bool = False
) -> None:
    solver = dataclasses.replace(train_solver(cfg, job.tau), compile=compile)
    states = validation_states(n=cfg.n_validation)
    last_ckpt = job.iteration
    start = time.perf_counter()
    while job.iteration < cfg.n_iter:
        job.window.append(_train_step(job, solver, cfg))
        last = job.iteration == cfg.n_iter
        if job.iteration % cfg.eval_every == 0 or last:
            _validate(job, solver, states, cfg)
            if progress is not None:
                progress(job.key, job.iteration)  # in a worker of a killed run, this exits first
        if job.iteration - last_ckpt >= cfg.checkpoint_every or last:
            now = time.perf_counter()
            job.seconds += now - start
            start, last_ckpt = now, job.iteration
            _checkpoint(job, out)


# --------------------------------------------------------------------------- final arrays


def _best_decoder(job: _Job, cfg: CartpoleConfig) -> ActionDecoder:
    decoder = ActionDecoder(
        job.latent_dim, horizon=cfg.horizon, hidden=cfg.hidden, n_layers=cfg.n_layers
    )
    decoder.load_state_dict(job.best_model if job.best_model is not None else {})
    return decoder.eval()


def traced_solve(
    x_init: Tensor, solver: SolverConfig, decoder: ActionDecoder | None, horizon: int, seed: int
) -> dict[str, np.ndarray]:
    """Solve one horizon problem ``x_init (1, 5)`` recording every iteration's samples.

    Full action space without a decoder, else the latent box. Returns ``samples (T, K, d)``,
    ``controls (T, K, H)`` and ``costs (T, K)`` for the first ``K = N_TRACE_KEEP`` samples of
    each iteration, and the solution's ``u (H,)`` and ``cost ()``.
    """
    infos: list[dcem.IterationInfo] = []
    if decoder is None:
        lb, ub, d, sigma = U_LB, U_UB, horizon, FULL_INIT_SIGMA
    else:
        lb, ub, d, sigma = (
            LATENT_LB,
            LATENT_UB,
            decoder.latent_dim,
            solver.init_sigma or LATENT_INIT_SIGMA,
        )

    def to_controls(z: Tensor) -> Tensor:
        return z if decoder is None else decoder(z)

    def f(z: Tensor) -> Tensor:
        return rollout_cost(x_init, to_controls(z))

    kw: dict[str, Any] = dict(
        n_sample=solver.n_sample, n_elite=solver.n_elite, n_iter=solver.n_iter, lb=lb, ub=ub,
        normalize=solver.normalize, generator=torch.Generator().manual_seed(seed),
        callback=infos.append,
    )  # fmt: skip
    with torch.no_grad():
        mu0 = x_init.new_zeros(1, d)
        if solver.method == "dcem":
            z = dcem.dcem(f, mu0, sigma, tau=solver.tau, **kw)
        else:
            z = dcem.cem(f, mu0, sigma, **kw)
        samples = torch.stack([info.samples[0, :N_TRACE_KEEP] for info in infos])
        u = to_controls(z)
        return {
            "samples": samples.numpy(),
            "controls": to_controls(samples).numpy(),
            "costs": torch.stack([info.costs[0, :N_TRACE_KEEP] for info in infos]).numpy(),
            "u": u[0].numpy(),
            "cost": rollout_cost(x_init, u)[0].numpy(),
        }


def cost_surface(decoder: ActionDecoder, states: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """``C(f_dec(z); x)`` on a ``grid x grid`` mesh of the 2-D latent box for each state.

    Returns the axis ``(grid,)`` and the costs ``(S, grid, grid)`` indexed ``[s, i_z2, i_z1]``.
    """
    if decoder.latent_dim != 2:
        raise ValueError(f"decoder.latent_dim must be 2 for a surface, got {decoder.latent_dim}")
    axis = torch.linspace(LATENT_LB, LATENT_UB, grid)
    z2, z1 = torch.meshgrid(axis, axis, indexing="ij")
    z = torch.stack((z1, z2), dim=-1).reshape(1, -1, 2)
    with torch.no_grad():
        u = decoder(z).expand(states.shape[0], -1, -1)
        costs = rollout_cost(states, u).reshape(-1, grid, grid)
    return axis, costs


def _final_outputs(job: _Job, cfg: CartpoleConfig, out: Path) -> dict[str, Any]:
    """Validation costs, iterates and cost surfaces of the best decoder (NPZ + JSON)."""
    decoder = _best_decoder(job, cfg)
    solver = train_solver(cfg, job.tau)
    states = validation_states(n=cfg.n_validation)
    val = validation_costs(decoder, solver, states, cfg.eval_seed)
    test_states = validation_states(n=cfg.n_validation, seed=cfg.test_seed)
    test = validation_costs(decoder, solver, test_states, cfg.eval_seed + 1)
    trace = traced_solve(states[:1], solver, decoder, cfg.horizon, cfg.eval_seed)
    arrays: dict[str, Any] = {"val_costs": val.numpy(), "test_costs": test.numpy()}
    arrays.update({f"iterates_{k}": v for k, v in trace.items()})
    if job.latent_dim == 2:
        axis, surface = cost_surface(decoder, states[: cfg.n_surface_states], cfg.surface_grid)
        arrays.update(surface_axis=axis.numpy(), surface_costs=surface.numpy())
    with common.atomic_open(out / "jobs" / f"{job.key}.npz", "wb") as handle:
        np.savez(handle, **arrays)
    return {
        "latent_dim": job.latent_dim,
        "tau": job.tau,
        "seed": job.seed,
        "iterations": job.iteration,
        "best_iteration": job.best_iteration,
        "best_val_cost": val.mean().item(),
        "test_cost": test.mean().item(),
        "seconds": job.seconds,
        "seconds_per_iteration": job.seconds / max(job.iteration, 1),
        "resumed_from": job.resumed_from,
    }


def run_job(
    cfg: CartpoleConfig,
    out: Path,
    latent_dim: int,
    tau: float,
    seed: int,
    progress: Progress | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Train (or resume) one run to ``cfg.n_iter`` iterations and write its results;
    ``compile``: its training and validation solves run as ``torch.compile`` graphs."""
    key = run_key(latent_dim, tau, seed)
    if compile:  # the graphs of earlier jobs in this worker must not count toward dynamo's
        torch.compiler.reset()  # recompile limit (each (latent_dim, tau) compiles anew)
    with common.job_slot(out, key):
        job = _resume_or_start(cfg, out, latent_dim, tau, seed)
        _train(job, cfg, out, progress, compile)
        result = _final_outputs(job, cfg, out)
        common.atomic_write_json(out / "jobs" / f"{key}.json", result)
    return result


# --------------------------------------------------------------------------- the expert


def _expert_costs(
    states: Tensor, solver: SolverConfig, horizon: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Costs of full-space CEM's final mean and of its best sample, ``(n,)`` each."""
    best = torch.full(states.shape[:1], math.inf)

    def keep_best(info: dcem.IterationInfo) -> None:
        best.copy_(torch.minimum(best, info.costs.min(-1).values))

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = dcem.cem(
            lambda u: rollout_cost(states, u), states.new_zeros(len(states), horizon),
            FULL_INIT_SIGMA, n_sample=solver.n_sample, n_elite=solver.n_elite,
            n_iter=solver.n_iter, lb=U_LB, ub=U_UB, normalize=solver.normalize,
            generator=generator, callback=keep_best,
        )  # fmt: skip
        return rollout_cost(states, z), best


def _expert(cfg: CartpoleConfig, out: Path) -> dict[str, Any]:
    """Evaluate the experts once on the validation set; cached as expert.json / expert.npz."""
    path = out / "expert.json"
    if path.is_file() and (out / "expert.npz").is_file():
        try:
            cached = dict(json.loads(path.read_text(encoding="utf-8")))
            if "converged_expert_test_reward" in cached:  # else written by an older dcem
                return cached
        except (OSError, ValueError, TypeError) as err:  # a cache: computed again
            log.warning("%s is unreadable (%s); evaluating the expert again", path, err)
    states = validation_states(n=cfg.n_validation)
    mean_cost, best_cost = _expert_costs(states, EXPERT_CEM, cfg.horizon, cfg.eval_seed)
    ref_cost, _ = _expert_costs(states, REFERENCE_EXPERT_CEM, cfg.horizon, cfg.eval_seed)
    test_states = validation_states(n=cfg.n_validation, seed=cfg.test_seed)
    test_cost, _ = _expert_costs(test_states, EXPERT_CEM, cfg.horizon, cfg.eval_seed + 1)
    converged, _ = _expert_costs(test_states, CONVERGED_EXPERT_CEM, cfg.horizon,
                                 cfg.eval_seed + 1)  # fmt: skip
    trace = traced_solve(states[:1], EXPERT_CEM, None, cfg.horizon, cfg.eval_seed)
    arrays: dict[str, Any] = {f"iterates_{k}": v for k, v in trace.items()}
    arrays.update(
        expert_costs=mean_cost.numpy(),
        reference_costs=ref_cost.numpy(),
        best_sample_costs=best_cost.numpy(),
        test_costs=test_cost.numpy(),
        converged_test_costs=converged.numpy(),
    )
    with common.atomic_open(out / "expert.npz", "wb") as handle:
        np.savez(handle, **arrays)
    record = {
        "expert": dataclasses.asdict(EXPERT_CEM) | {"output": "final mean"},
        "reference_expert": dataclasses.asdict(REFERENCE_EXPERT_CEM) | {"output": "final mean"},
        "expert_reward": -mean_cost.mean().item(),
        "reference_expert_reward": -ref_cost.mean().item(),
        "expert_best_sample_reward": -best_cost.mean().item(),
        "expert_test_reward": -test_cost.mean().item(),
        "converged_expert": dataclasses.asdict(CONVERGED_EXPERT_CEM) | {"output": "final mean"},
        "converged_expert_test_reward": -converged.mean().item(),
    }
    common.atomic_write_json(path, record)
    return record


# --------------------------------------------------------------------------- the whole run


def check_out_folder(out: Path, cfg: CartpoleConfig) -> None:
    """Raise :class:`RunFolderError` unless ``out`` is new, empty, a cartpole run of ``cfg``,
    or a cartpole run that saved no results yet (which :func:`run` starts over)."""
    common.check_out_folder(
        out, EXPERIMENT, cfg.to_json(), takeover=True, hint=common.OVERWRITE_HINT
    )


def _job_done(out: Path, key: str) -> bool:
    return common.job_done(out, key, lambda result: "best_val_cost" in result)


def run(
    cfg: CartpoleConfig, out: str | os.PathLike[str], workers: int = 2, progress: bool = True,
    overwrite: bool = False, address: str | None = None, compile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) every (latent_dim, tau, seed) of ``cfg`` in ``out``, summarize, plot.

    ``workers``: parallel processes (1 runs everything in this process). ``progress``: a tqdm
    bar on a terminal, else a log line a minute. ``overwrite``: delete the dcem run in ``out``
    first (see :func:`common.run_folder`, which also says which folders are refused).
    ``address``: run the jobs on a Ray cluster instead (see :func:`common.run_jobs`).
    ``compile``: the training and validation solves of each job run as ``torch.compile``
    graphs (each job process compiles them once; not part of the config: results equal the
    eager ones up to rounding, and an interrupted run resumes with or without it).
    Returns the summary (also summary.json).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out = Path(out)
    start = time.perf_counter()
    with common.run_folder(
        out, EXPERIMENT, cfg.to_json(), overwrite=overwrite, logger=log
    ) as resumed:
        if resumed:
            left = [run_key(*r) for r in cfg.runs() if not _job_done(out, run_key(*r))]
            started = sum((out / "ckpt" / f"{key}.pt").exists() for key in left)
            total = len(cfg.runs())
            common.log_resumed(log, out, total - len(left), total, started, "runs")
        expert = _expert(cfg, out)
        log.info(
            "expert reward %.3f (reference expert %.3f, best sample %.3f)",
            expert["expert_reward"], expert["reference_expert_reward"],
            expert["expert_best_sample_reward"],
        )  # fmt: skip
        pending = [r for r in cfg.runs() if not _job_done(out, run_key(*r))]
        pending.sort(key=lambda r: (-r[0], -r[1]))  # larger, differentiable runs first
        if pending:
            _run_pending(cfg, out, pending, workers, progress, address, compile)
        summary = summarize(out, run_wall_seconds=time.perf_counter() - start)
        plot(out)
    return summary


def _run_pending(
    cfg: CartpoleConfig, out: Path, pending: list[tuple[int, float, int]], workers: int,
    show: bool, address: str | None = None, compile: bool = False,
) -> None:  # fmt: skip
    done = {run_key(*r): common.checkpointed(out, run_key(*r), "iteration") for r in pending}
    with _Progress(done, cfg.n_iter * len(pending), show) as advance:
        common.run_jobs(
            functools.partial(run_job, cfg, out.resolve(), compile=compile),
            pending,
            workers,
            advance,
            _log_result,
            address=address,
        )


# ``_Progress(done, total, show, log_every=60.0)``: one tqdm bar over all runs on a terminal,
# otherwise a log line "cartpole: {done} / {total} iterations" every ``log_every`` seconds.
_Progress = functools.partial(
    common.RunProgress, experiment=EXPERIMENT, unit="iterations", bar_unit="it", job_noun="runs",
    logger=log,
)  # fmt: skip


def _log_result(result: dict[str, Any]) -> None:
    log.info(
        "%s: best validation cost %.3f at iteration %d (%.3f s/iteration)",
        run_key(result["latent_dim"], result["tau"], result["seed"]), result["best_val_cost"],
        result["best_iteration"], result["seconds_per_iteration"],
    )  # fmt: skip


# --------------------------------------------------------------------------- results


def load_config(out: str | os.PathLike[str]) -> CartpoleConfig:
    """The config recorded in ``out/config.json``."""
    record = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    if record.get("experiment") != EXPERIMENT:
        raise RunFolderError(f"{out} holds experiment {record.get('experiment')!r}")
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()
    }
    return CartpoleConfig(**values)


def summarize(out: str | os.PathLike[str], run_wall_seconds: float | None = None) -> dict[str, Any]:
    """Aggregate the run results of ``out`` into metrics.csv and summary.json.

    summary.json: ``expert_reward``, ``reference_expert_reward`` and
    ``expert_best_sample_reward`` (mean validation reward = -cost), ``expert_test_reward``
    (held-out states); ``runs``: one entry per (latent_dim, tau, seed) with
    ``best_val_reward`` (of the best decoder) and ``improvement_factor`` =
    ``best_val_reward / expert_reward`` (> 1: better than the expert), also against the other
    two experts, and ``test_reward`` / ``test_improvement_factor`` on the held-out states;
    ``headline_improvement_factor``: ``test_reward`` over the held-out reward of the converged
    expert (``CONVERGED_EXPERT_CEM``), both with fresh noise: like against like, where
    ``improvement_factor`` (the paper's form) takes the best of many validations on the
    states it is scored on and divides by an expert short of convergence.
    ``improvement_factor`` per (latent_dim, tau): mean and 95% CI half-width over seeds of
    the three factors (``mean``, ``ci95``, ``test_mean``, ``test_ci95``, ``headline_mean``,
    ``headline_ci95``); ``run_wall_seconds``.
    """
    out = Path(out)
    cfg = load_config(out)
    expert = json.loads((out / "expert.json").read_text(encoding="utf-8"))
    _write_metrics(out, cfg)
    runs = [_run_entry(out, expert, *r) for r in cfg.runs()]
    groups = [_group(runs, d, tau) for d in cfg.latent_dims for tau in cfg.taus]
    summary = {
        "experiment": EXPERIMENT,
        "expert": "full-space CEM 1000/100/10, final mean",
        **{k: expert[k] for k in ("expert_reward", "reference_expert_reward")},
        "expert_best_sample_reward": expert["expert_best_sample_reward"],
        "expert_test_reward": expert["expert_test_reward"],
        "converged_expert_test_reward": expert["converged_expert_test_reward"],
        "headline": "held-out states, fresh noise, against full-space CEM 1000/100/30",
        "n_validation": cfg.n_validation,
        "runs": runs,
        "improvement_factor": groups,
        "run_wall_seconds": run_wall_seconds,
    }
    common.atomic_write_json(out / "summary.json", summary)
    return summary


def _group(runs: list[dict[str, Any]], latent_dim: int, tau: float) -> dict[str, Any]:
    """Mean and 95% CI half-width over seeds of both improvement factors of (latent_dim, tau)."""
    mine = [r for r in runs if (r["latent_dim"], r["tau"]) == (latent_dim, tau)]
    mean, half = common.mean_ci95([r["improvement_factor"] for r in mine])
    test_mean, test_half = common.mean_ci95([r["test_improvement_factor"] for r in mine])
    head_mean, head_half = common.mean_ci95([r["headline_improvement_factor"] for r in mine])
    return {
        "latent_dim": latent_dim,
        "tau": tau,
        "mean": float(mean),
        "ci95": _finite_or_none(half),
        "test_mean": float(test_mean),
        "test_ci95": _finite_or_none(test_half),
        "headline_mean": float(head_mean),
        "headline_ci95": _finite_or_none(head_half),
    }


def _run_entry(
    out: Path, expert: dict[str, Any], latent_dim: int, tau: float, seed: int
) -> dict[str, Any]:
    result = json.loads((out / "jobs" / f"{run_key(latent_dim, tau, seed)}.json").read_text())
    reward = -result["best_val_cost"]
    return {
        "latent_dim": latent_dim,
        "tau": tau,
        "seed": seed,
        "best_val_reward": reward,
        "best_iteration": result["best_iteration"],
        "improvement_factor": reward / expert["expert_reward"],
        "improvement_factor_vs_reference": reward / expert["reference_expert_reward"],
        "improvement_factor_vs_best_sample": reward / expert["expert_best_sample_reward"],
        "test_reward": -result["test_cost"],
        "test_improvement_factor": -result["test_cost"] / expert["expert_test_reward"],
        "headline_improvement_factor": -result["test_cost"]
        / expert["converged_expert_test_reward"],
        "iterations": result["iterations"],
        "seconds_per_iteration": result["seconds_per_iteration"],
    }


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _write_metrics(out: Path, cfg: CartpoleConfig) -> None:
    fields = ["run", "latent_dim", "tau", "seed", *METRIC_FIELDS]
    with common.atomic_open(out / "metrics.csv", "w") as handle:
        handle.write(",".join(fields) + "\n")
        for d, tau, seed in cfg.runs():
            key = run_key(d, tau, seed)
            for row in common.read_csv(out / "jobs" / f"{key}.csv"):
                values = [key, str(d), f"{tau:g}", str(seed), *(row[k] for k in METRIC_FIELDS)]
                handle.write(",".join(values) + "\n")


# --------------------------------------------------------------------------- figures

TAU_COLORS = ["#348ABD", "#A60628", "#7A68A6", "#467821", "#D55E00", "#CC79A7"]


def plot(out: str | os.PathLike[str]) -> list[Path]:
    """Draw the figures of ``out`` from summary.json, metrics.csv, expert.npz and jobs/*.npz.

    ``surfaces.png`` needs runs with latent dimension 2 and is skipped without them.
    """
    out = Path(out)
    summary = common.load_summary(out, EXPERIMENT)
    try:
        runs = summary["runs"]
        taus = sorted({r["tau"] for r in runs}, reverse=True)
        dims = sorted({r["latent_dim"] for r in runs})
        seed = min(r["seed"] for r in runs)
        rows = common.read_csv(out / "metrics.csv")
        d = 2 if 2 in dims else dims[0]
        surfaces = (
            {tau: _load_npz(out / "jobs" / f"{run_key(2, tau, seed)}.npz") for tau in taus}
            if 2 in dims else None
        )  # fmt: skip
        latent = _load_npz(out / "jobs" / f"{run_key(d, taus[0], seed)}.npz")
        expert = _load_npz(out / "expert.npz")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise RunFolderError(
            f"{out} has missing or damaged result files ({type(err).__name__}: {err}); rerun "
            "the command that made it to rewrite them"
        ) from err
    paths = [
        _save(_plot_improvement(summary, dims, taus), out, "improvement_factor"),
        _save(_plot_convergence(rows, summary["expert_reward"], dims, taus), out, "convergence"),
    ]
    if surfaces is not None:
        paths.append(_save(_plot_surfaces(surfaces), out, "surfaces"))
    paths.append(_save(_plot_iterates(expert, latent, d, taus[0]), out, "iterates"))
    return paths


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def _tau_label(tau: float) -> str:
    return "CEM (τ = 0)" if tau == 0 else f"DCEM τ = {tau:g}"


def _figure(n_rows: int, n_cols: int, width: float = 4.0, height: float = 3.2, **kw: Any) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    return fig, fig.subplots(n_rows, n_cols, squeeze=False, **kw)


def _save(fig: Any, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    with common.atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return path


def _plot_improvement(summary: dict[str, Any], dims: list[int], taus: list[float]) -> Any:
    fig, axes = _figure(1, 2, width=5.0)
    groups = {(g["latent_dim"], g["tau"]): g for g in summary["improvement_factor"]}
    width = 0.8 / len(taus)
    panels = (("headline_", "held-out states vs converged CEM 1000/100/30"),
              ("", "paper's form: best validation vs CEM 1000/100/10"))  # fmt: skip
    for ax, (prefix, title) in zip(axes[0], panels, strict=True):
        for j, tau in enumerate(taus):
            x = np.arange(len(dims)) + (j - (len(taus) - 1) / 2) * width
            mean = [groups[d, tau][f"{prefix}mean"] for d in dims]
            err = [groups[d, tau][f"{prefix}ci95"] or 0.0 for d in dims]
            ax.bar(x, mean, width, yerr=err, color=TAU_COLORS[j % len(TAU_COLORS)],
                   label=_tau_label(tau), ecolor="0.25")  # fmt: skip
        ax.axhline(1.0, color="0.4", ls="--", lw=1)
        ax.set_xticks(np.arange(len(dims)), [str(d) for d in dims])
        ax.set(xlabel="Latent space dimension", ylabel="Improvement factor")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    return fig


def _curves(rows: list[dict[str, str]], d: int, tau: float, column: str) -> tuple[Any, Any]:
    """Iterations and ``(seeds, points)`` values of ``column`` for one (d, tau)."""
    per_seed: dict[str, dict[int, float]] = {}
    for row in rows:
        if int(row["latent_dim"]) == d and float(row["tau"]) == tau:
            per_seed.setdefault(row["seed"], {})[int(row["iteration"])] = float(row[column])
    its = sorted(set.intersection(*(set(c) for c in per_seed.values())))
    return np.array(its), np.array([[c[i] for i in its] for c in per_seed.values()])


def _plot_convergence(
    rows: list[dict[str, str]], expert_reward: float, dims: list[int], taus: list[float]
) -> Any:
    fig, axes = _figure(2, len(dims), sharex=True)
    for col, d in enumerate(dims):
        for row, (column, name) in enumerate(
            (("train_cost", "Training"), ("val_cost", "Validation"))
        ):
            ax = axes[row, col]
            for j, tau in enumerate(taus):
                its, values = _curves(rows, d, tau, column)
                mean, half = common.mean_ci95(values)
                color = TAU_COLORS[j % len(TAU_COLORS)]
                marker = "o" if len(its) < 30 else None  # a few points: make them visible
                ax.plot(its, mean, color=color, lw=1.5, marker=marker, ms=3, label=_tau_label(tau))
                half = np.nan_to_num(half)
                ax.fill_between(its, mean - half, mean + half, color=color, alpha=0.2, lw=0)
            ax.axhline(-expert_reward, color="k", ls="--", lw=1, label="expert")
            ax.set(xscale="log", ylabel=f"{name} cost")
        axes[0, col].set_title(f"Latent space dimension: {d}")
        axes[1, col].set_xlabel("Iteration")
    axes[0, 0].legend(fontsize=8)
    return fig


def _plot_surfaces(npz: dict[float, dict[str, np.ndarray]]) -> Any:
    taus = list(npz)
    n_states = next(iter(npz.values()))["surface_costs"].shape[0]
    fig, axes = _figure(n_states, len(taus), width=3.0, height=2.8)
    for col, tau in enumerate(taus):
        axis, costs = npz[tau]["surface_axis"], npz[tau]["surface_costs"]
        for row in range(n_states):
            ax = axes[row, col]
            filled = ax.contourf(axis, axis, -costs[row], levels=20, cmap="viridis")
            fig.colorbar(filled, ax=ax, label="reward" if col == len(taus) - 1 else None)
            ax.set(xticks=[-1, 0, 1], yticks=[-1, 0, 1])
        axes[0, col].set_title(_tau_label(tau))
    for row in range(n_states):
        axes[row, 0].set_ylabel(f"initial state {row}\nz₂")
    return fig


def _plot_controls(ax: Any, controls: np.ndarray, title: str) -> Any:
    from matplotlib import cm, colors

    norm = colors.Normalize(vmin=0, vmax=len(controls) - 1)
    steps = np.arange(controls.shape[-1])
    for t, batch in enumerate(controls):
        for u in batch[:20]:
            ax.plot(steps, u, color=cm.viridis(norm(t)), lw=0.6, alpha=0.6)
    ax.set(title=title, xlabel="time step", ylim=(U_LB * 1.05, U_UB * 1.05))
    return cm.ScalarMappable(norm, "viridis")


def _plot_iterates(
    expert: dict[str, np.ndarray], latent: dict[str, np.ndarray], d: int, tau: float
) -> Any:
    from matplotlib import cm, colors

    has_surface = d == 2 and "surface_costs" in latent
    fig, axes = _figure(1, 3 if has_surface else 2)
    _plot_controls(axes[0, 0], expert["iterates_controls"], "Full-space CEM samples")
    mappable = _plot_controls(
        axes[0, 1], latent["iterates_controls"], f"Latent {_tau_label(tau)} samples (d = {d})"
    )
    axes[0, 0].set_ylabel("control u")
    if has_surface:
        ax = axes[0, 2]
        axis = latent["surface_axis"]
        ax.contourf(axis, axis, -latent["surface_costs"][0], levels=20, cmap="Greys_r")
        samples = latent["iterates_samples"]
        norm = colors.Normalize(vmin=0, vmax=len(samples) - 1)
        for t, batch in enumerate(samples):
            ax.scatter(batch[:, 0], batch[:, 1], s=4, color=cm.viridis(norm(t)))
        ax.set(title="Latent samples over the reward", xlabel="z₁", ylabel="z₂")
    fig.colorbar(mappable, ax=list(axes[0]), label="iteration")
    return fig
