"""Benchmark: one training update of the regression experiment (paper §5.1), eager vs compiled.

For each job shape of the default run (DCEM with 2 and 1 seeds batched, unrolled GD with 3
seeds), on one CPU thread:

- the median time of a training update (prediction through ``dcem.dcem`` / ``dcem.unroll_gd``,
  backward, clipping, Adam) eager and compiled (the experiment's ``compile``), the two
  alternating in one process, and the compile time (the first compiled update; the compiled
  DCEM iteration is shared by all batch sizes, so only the first DCEM shape compiles);
- the full-data evaluation (every ``eval_every`` updates) of the job's nets, eager and
  compiled.

Unrolled GD differentiates twice, which ``torch.compile`` does not support: the experiment
runs it eagerly, and its row records the error of compiling its training loss.

Times are wall seconds (``seconds``) and this process's CPU seconds (``cpu_seconds``, less
sensitive to other load on the machine).

Usage: ``python benchmarks/regression.py [--tiny] [--out FILE]``; JSON as the other
benchmarks (``speedup`` > 1 means compiled is faster).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from common import parse_args, write_result
from dcem.experiments import regression

JOBS = [("dcem", 2), ("dcem", 1), ("gd", 3)]
TINY_JOBS = [("dcem", 2), ("gd", 2)]


def _timed(fn, repeat: int = 1) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall and CPU seconds per call of ``fn()``, over ``repeat`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - wall) / repeat, (time.process_time() - cpu) / repeat


def _gd_compile_error(cfg: regression.RegressionConfig) -> str | None:
    """The error of compiling unrolled GD's training loss and its backward (None if it works)."""
    job = regression._new_job(cfg, "gd", (0,))
    x = torch.ones(1, 1, 1)

    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return regression.predict_batch(params, x, "gd", cfg, cfg.n_inner_iter).square().sum()

    try:
        torch.compile(loss)(regression.stack_params(job.models), x).backward()
    except Exception as err:  # the compiler raises many types
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def measure(method: str, seeds: int, cfg, updates: int, repeats: int) -> list[dict]:
    """The update row and the evaluation row of one job shape, eager and compiled."""
    data = regression._dataset(cfg)
    modes = {"eager": cfg, "compiled": dataclasses.replace(cfg, compile=True)}
    jobs = {m: regression._new_job(c, method, tuple(range(seeds))) for m, c in modes.items()}
    first = {m: _timed(lambda m=m: regression._sample_step(jobs[m], data, modes[m])) for m in modes}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    evals: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(repeats + 1):  # the first round warms up (and compiles the evaluation)
        for m, c in modes.items():
            times[m].append(_timed(lambda m=m, c=c: regression._sample_step(jobs[m], data, c),
                                   updates))  # fmt: skip
            evals[m].append(_timed(lambda m=m, c=c: regression._evaluate(jobs[m], data, c)))
    wall = {m: statistics.median(t[0] for t in ts[1:]) for m, ts in times.items()}
    cpu = {m: statistics.median(t[1] for t in ts[1:]) for m, ts in times.items()}
    name = f"{method}_S{seeds}"
    update = {
        "name": f"{name}_update", "seconds": wall["eager"], "cpu_seconds": cpu["eager"],
        "compiled_seconds": wall["compiled"], "compiled_cpu_seconds": cpu["compiled"],
        "speedup": cpu["eager"] / cpu["compiled"], "updates": updates,
        "compile_s": first["compiled"][0] - first["eager"][0],
    }  # fmt: skip
    if method not in regression.COMPILED_METHODS:
        update["compile_error"] = _gd_compile_error(cfg)  # compiled == eager here
    e_wall = {m: statistics.median(t[0] for t in ts[1:]) for m, ts in evals.items()}
    e_cpu = {m: statistics.median(t[1] for t in ts[1:]) for m, ts in evals.items()}
    evaluation = {
        "name": f"{name}_evaluation", "seconds": e_wall["eager"], "cpu_seconds": e_cpu["eager"],
        "compiled_seconds": e_wall["compiled"], "compiled_cpu_seconds": e_cpu["compiled"],
        "speedup": e_cpu["eager"] / e_cpu["compiled"],
    }  # fmt: skip
    return [update, evaluation]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, repeats=7, tiny_repeats=2)
    cfg = regression.RegressionConfig(eval_every=10**9, compile=False)
    if args.tiny:
        cfg = dataclasses.replace(cfg, n_hidden=16, dcem_n_sample=20, dcem_n_elite=4)
    updates = 2 if args.tiny else 50
    rows = []
    for method, seeds in TINY_JOBS if args.tiny else JOBS:
        rows += measure(method, seeds, cfg, updates, args.repeats)
    return write_result("regression", rows, args.out, tiny=args.tiny, repeats=args.repeats)


if __name__ == "__main__":
    main()
