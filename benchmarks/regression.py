"""Benchmark: one training update of the regression experiment (paper §5.1) on a CPU core.

For each job shape of the default run (DCEM with 1 and 2 seeds batched, unrolled GD with 3),
the median time of a training update (solve, loss, backward, clipping, Adam), and:

- the written-out solve (``_DCEMThroughNet`` / ``_GDThroughNet``, what the runs use)
  against the library path (``dcem.dcem_step`` / ``dcem.unroll_gd`` differentiated by
  autograd), alternating in the same process;
- every job: worker processes as the runs start them (``keep_freed_memory``) against
  glibc's default allocator settings, each in a fresh subprocess, with the minor page faults
  per update (``getrusage``) beside the time;
- the full-data evaluation (every ``eval_every`` updates) per job shape.

Usage: ``python benchmarks/regression.py [--tiny] [--out FILE]``; JSON as the other
benchmarks (``ratio_to_baseline`` < 1 means faster than the baseline).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import parse_args, write_result
from dcem.experiments import regression
from dcem.experiments.common import keep_freed_memory

JOBS = [("dcem", 1), ("dcem", 2), ("gd", 3)]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_updates(job: regression._Job, data: tuple, cfg, updates: int) -> tuple[float, float]:
    """Seconds and minor page faults per training update, over ``updates`` updates."""
    faults, start = _faults(), time.perf_counter()
    for _ in range(updates):
        regression._sample_step(job, data, cfg)
    return (time.perf_counter() - start) / updates, (_faults() - faults) / updates


def measure(method: str, seeds: int, updates: int, repeats: int) -> dict:
    """Median seconds per update (the written-out and the library path alternating),
    faults, evaluation time."""
    cfg = regression.RegressionConfig(eval_every=10**9)
    job = regression._new_job(cfg, method, tuple(range(seeds)))
    data = regression._dataset(cfg)
    switch = "_fast_dcem_ok" if method == "dcem" else "_fast_gd_ok"
    fast_ok = getattr(regression, switch)
    paths = {"fused": fast_ok, "autograd": lambda *_: False}
    times: dict[str, list[float]] = {p: [] for p in paths}
    faults: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(repeats + 1):  # the first round warms up
        for path, check in paths.items():
            setattr(regression, switch, check)
            seconds, per_update = _time_updates(job, data, cfg, updates)
            times[path].append(seconds)
            faults[path].append(per_update)
    setattr(regression, switch, fast_ok)
    evals = []
    for _ in range(max(1, repeats // 2) + 1):
        start = time.perf_counter()
        regression._evaluate(job, data, regression.RegressionConfig())
        evals.append(time.perf_counter() - start)
    return {  # medians without the warm-up round
        "seconds": {p: statistics.median(t[1:]) for p, t in times.items()},
        "faults_per_update": {p: statistics.median(f[1:]) for p, f in faults.items()},
        "eval_seconds": statistics.median(evals[1:]),
    }


def _child(malloc: str, updates: int, repeats: int) -> list[dict]:
    """Run :func:`measure` for every job shape in a fresh process with ``malloc`` settings."""
    cmd = [sys.executable, __file__, "--child", malloc, str(updates), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child ({malloc}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, repeats=7, tiny_repeats=2)
    updates = 3 if args.tiny else 50
    runs = {m: _child(m, updates, args.repeats) for m in ("keep", "default")}
    rows = []
    for i, (method, seeds) in enumerate(JOBS):
        keep, default = runs["keep"][i], runs["default"][i]
        path = "fused"
        name = f"{method}_S{seeds}"
        library = "dcem_step" if method == "dcem" else "unroll_gd"
        rows.append(_row(f"{name}_fused_vs_autograd", keep["seconds"]["fused"],
                         keep["seconds"]["autograd"], f"library {library} + autograd",
                         updates=updates))  # fmt: skip
        rows.append(_row(f"{name}_keep_freed_memory", keep["seconds"][path],
                         default["seconds"][path], "glibc default malloc settings",
                         faults_per_update=keep["faults_per_update"][path],
                         baseline_faults_per_update=default["faults_per_update"][path],
                         updates=updates))  # fmt: skip
        rows.append({"name": f"{name}_evaluation", "seconds": keep["eval_seconds"]})
    return write_result("regression", rows, args.out, tiny=args.tiny, repeats=args.repeats)


def _row(name: str, seconds: float, baseline: float, what: str, **extra: object) -> dict:
    return {
        "name": name, "seconds": seconds, "baseline": what, "baseline_seconds": baseline,
        "ratio_to_baseline": seconds / baseline, **extra,
    }  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        torch.set_num_threads(1)
        if sys.argv[2] == "keep":
            keep_freed_memory()
        n_updates, n_repeats = int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps([measure(m, s, n_updates, n_repeats) for m, s in JOBS]))
    else:
        main()
