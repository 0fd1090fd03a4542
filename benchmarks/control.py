"""Benchmark of the cartpole hot paths: batched rollouts, a latent-DCEM update, an expert solve.

Each time is the median of repeated runs and is also given as a ratio to a baseline timed in
the same run, so that figures compare across machines:

* ``rollout_*``: one batched ``rollout_cost`` of B initial states x N samples x H steps,
  against the same rollouts written as a Python loop over the B x N sequences (timed on a
  subset of the sequences and scaled to all of them; the JSON says how many were timed).
* ``latent_dcem_update``: one Algorithm 2 update (decoder + DCEM 100 samples / 10 elites /
  10 iterations on one initial state, backward, Adam step), against the τ = 0 update of the
  paper (CEM, then backward through the decoder only).
* ``expert_solve``: full-space CEM (1000 samples / 100 elites / 10 iterations) on the 100
  validation states at once, against one state at a time (timed on a subset, scaled).

Runs on one CPU thread in float32. Usage: python benchmarks/control.py [--out PATH] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dcem.control import ActionDecoder, rollout_cost, validation_states
from dcem.control.mpc import EXPERT_CEM, LATENT_DCEM, SolverConfig, solve_horizon


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run."""

    horizon: int
    """Planning horizon H."""
    rollouts: tuple[tuple[int, int], ...]
    """(B initial states, N samples) of each rollout benchmark."""
    loop_subset: int
    """Sequences timed in the Python-loop rollout baseline."""
    latent_dim: int
    """Latent dimension of the decoder."""
    hidden: int
    """Hidden width of the decoder."""
    latent_solver: SolverConfig
    """Optimizer of the latent-DCEM update."""
    expert_solver: SolverConfig
    """Optimizer of the expert solve."""
    n_states: int
    """Validation states of the expert solve."""
    expert_loop_subset: int
    """States timed in the one-state-at-a-time expert baseline."""
    repeats: int
    """Timed repeats (median)."""


FULL = BenchConfig(
    horizon=20,
    rollouts=((1, 1000), (100, 100)),
    loop_subset=100,
    latent_dim=2,
    hidden=256,
    latent_solver=LATENT_DCEM,
    expert_solver=EXPERT_CEM,
    n_states=100,
    expert_loop_subset=10,
    repeats=10,
)
TINY = BenchConfig(
    horizon=5,
    rollouts=((1, 16), (4, 8)),
    loop_subset=4,
    latent_dim=2,
    hidden=16,
    latent_solver=replace(LATENT_DCEM, n_sample=16, n_elite=4, n_iter=2),
    expert_solver=replace(EXPERT_CEM, n_sample=32, n_elite=4, n_iter=2),
    n_states=4,
    expert_loop_subset=2,
    repeats=2,
)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def row(name: str, seconds: float, baseline: str, baseline_seconds: float, **extra) -> dict:
    return {
        "name": name,
        "seconds": seconds,
        "baseline": baseline,
        "baseline_seconds": baseline_seconds,
        "ratio_to_baseline": seconds / baseline_seconds,
        "speedup_vs_baseline": baseline_seconds / seconds,
        **extra,
    }


def bench_rollout(batch: int, n: int, cfg: BenchConfig) -> dict:
    gen = torch.Generator().manual_seed(0)
    x_init = validation_states(n=batch)
    u = torch.rand(batch, n, cfg.horizon, generator=gen) * 200 - 100
    with torch.no_grad():
        batched = median_time(lambda: rollout_cost(x_init, u), cfg.repeats)
        pairs = [(b, i) for b in range(batch) for i in range(n)][: cfg.loop_subset]

        def loop() -> None:
            for b, i in pairs:
                rollout_cost(x_init[b : b + 1], u[b : b + 1, i])

        per_sequence = median_time(loop, max(1, cfg.repeats // 2)) / len(pairs)
    return row(
        f"rollout_B{batch}_N{n}_H{cfg.horizon}",
        batched,
        "python loop over the B*N sequences (scaled from a timed subset)",
        per_sequence * batch * n,
        batch=batch,
        n_sample=n,
        horizon=cfg.horizon,
        loop_sequences_timed=len(pairs),
    )


def bench_latent_update(cfg: BenchConfig) -> dict:
    torch.manual_seed(0)
    decoder = ActionDecoder(cfg.latent_dim, horizon=cfg.horizon, hidden=cfg.hidden)
    opt = torch.optim.Adam(decoder.parameters(), lr=5e-4)
    x_init = validation_states(n=1)
    gen = torch.Generator().manual_seed(0)

    def update(solver: SolverConfig) -> None:
        opt.zero_grad()
        sol = solve_horizon(x_init, decoder=decoder, solver=solver, generator=gen)
        sol.cost.mean().backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()

    solver = cfg.latent_solver
    ours = median_time(lambda: update(solver), cfg.repeats)
    tau0 = median_time(lambda: update(replace(solver, method="cem")), cfg.repeats)
    return row(
        "latent_dcem_update",
        ours,
        "tau=0 update: CEM in the latent space, backward through the decoder only",
        tau0,
        latent_dim=cfg.latent_dim,
        hidden=cfg.hidden,
        n_sample=solver.n_sample,
        n_elite=solver.n_elite,
        n_iter=solver.n_iter,
    )


def bench_expert(cfg: BenchConfig) -> dict:
    x_init = validation_states(n=cfg.n_states)
    solver = cfg.expert_solver
    gen = torch.Generator().manual_seed(0)
    subset = cfg.expert_loop_subset
    with torch.no_grad():
        batched = median_time(
            lambda: solve_horizon(x_init, horizon=cfg.horizon, solver=solver, generator=gen),
            max(1, cfg.repeats // 2),
        )

        def loop() -> None:
            for b in range(subset):
                solve_horizon(x_init[b : b + 1], horizon=cfg.horizon, solver=solver, generator=gen)

        per_state = median_time(loop, 1) / subset
        cost = solve_horizon(x_init, horizon=cfg.horizon, solver=solver, generator=gen).cost
    return row(
        "expert_solve",
        batched,
        "one initial state at a time (scaled from a timed subset)",
        per_state * cfg.n_states,
        n_states=cfg.n_states,
        n_sample=solver.n_sample,
        n_elite=solver.n_elite,
        n_iter=solver.n_iter,
        loop_states_timed=subset,
        mean_cost=float(cost.mean()),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="small sizes (for the test suite)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TINY if args.tiny else FULL
    rows = [bench_rollout(b, n, cfg) for b, n in cfg.rollouts]
    rows += [bench_latent_update(cfg), bench_expert(cfg)]
    result = {
        "benchmark": "control",
        "tiny": args.tiny,
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": rows,
    }
    for r in rows:
        print(
            f"{r['name']:28s} {r['seconds'] * 1e3:10.2f} ms | baseline "
            f"{r['baseline_seconds'] * 1e3:10.2f} ms | ratio {r['ratio_to_baseline']:.3g}",
            file=sys.stderr,
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
