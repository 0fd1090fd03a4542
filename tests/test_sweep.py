"""``dcem sweep``: grids of real runs on the process pool and on a local Ray cluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dm_control.suite", reason="dm_control is not installed")

RUN = ["--", "--quick", "--task", "cartpole-swingup", "--no-video"]
GRID = ["--grid", "explore-noise=0.3,0.6", "--seeds", "0"]


def _sweep(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dcem", "sweep", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def _results(out: Path) -> list[dict[str, str]]:
    """results.csv without what depends on the machine's load."""
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-run sweep on the process pool (no Ray)."""
    out = tmp_path_factory.mktemp("sweep") / "pool"
    done = _sweep("dmc", "--out", out, *GRID, "--no-ray", *RUN)
    assert done.returncode == 0, done.stderr
    return out


def test_pool_sweep_writes_one_run_folder_and_row_per_point(pooled: Path) -> None:
    rows = _results(pooled)
    assert [(r["name"], r["explore_noise"], r["seed"], r["status"]) for r in rows] == [
        ("explore_noise=0.3-seed0", "0.3", "0", "done"),
        ("explore_noise=0.6-seed0", "0.6", "0", "done"),
    ]
    for row in rows:  # each a real run: its own folder, config and summary
        run = pooled / row["name"]
        assert f'"explore_noise": {row["explore_noise"]}' in (run / "config.json").read_text()
        assert float(row["final_eval_return"]) > 0 and row["env_steps"] == "600"
        assert "eval at 600 env steps" in (pooled / "logs" / f"{row['name']}.log").read_text()
    again = _sweep("dmc", "--out", pooled, *GRID, "--no-ray", *RUN)
    assert again.returncode == 0 and "2 done, 0 to run" in again.stderr, again.stderr
    other = _sweep("dmc", "--out", pooled, "--grid", "explore-noise=0.1", "--no-ray", *RUN)
    assert other.returncode == 2 and "another sweep" in other.stderr, other.stderr


def test_ray_sweep_equals_the_pool_sweep(pooled: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="ray is not installed")
    out = tmp_path / "ray"
    done = _sweep("dmc", "--out", out, *GRID, "--workers", "2", *RUN)
    assert done.returncode == 0, done.stderr
    assert "local Ray cluster of 2 CPUs" in done.stderr
    assert _results(out) == _results(pooled)


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    out = tmp_path / "failing"
    done = _sweep("dmc", "--out", out, "--grid", f"init-from=,{tmp_path / 'missing'}",
                  "--no-ray", *RUN)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "failed" in done.stderr and "has no checkpoint" in done.stderr  # the log's end
    status = {r["name"]: r["status"] for r in _results(out)}
    assert sorted(status.values()) == ["done", "failed"], status


def test_killed_driver_then_the_same_command_runs_only_what_is_missing(
    pooled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dcem", "sweep", "dmc", "--out", str(out), *GRID,
               "--no-ray", "--workers", "2", *RUN]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    first = out / "explore_noise=0.3-seed0" / "summary.json"
    second = out / "explore_noise=0.6-seed0" / "summary.json"
    while not (first.exists() or second.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(3)  # the orphaned worker ends within a second (it would hold the run's lock)
    finished = int(first.exists()) + int(second.exists())
    again = _sweep("dmc", "--out", out, *GRID, "--no-ray", *RUN)
    assert again.returncode == 0, again.stderr
    assert f"{finished} done, {2 - finished} to run" in again.stderr, again.stderr
    assert _results(out) == _results(pooled)


def test_bad_grids_are_refused_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    for grid, message in (("bogus=1,2", "'bogus' is not an option"),
                          ("seed=1,2", "--seeds"), ("latent-dim=two", "int values"),
                          ("latent-dim", "OPTION=V1,V2")):  # fmt: skip
        done = _sweep("dmc", "--out", out, "--grid", grid, "--no-ray", *RUN)
        assert done.returncode == 2 and message in done.stderr, (grid, done.stderr)
    done = _sweep("cartpole", "--out", out, "--grid", "horizon=5,10", "--no-ray", "--", "--quick")
    assert done.returncode == 2 and "latent-dims, taus" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.slow  # about a minute: two cartpole grids and a Ray cluster
def test_cartpole_grid_on_ray_equals_the_pool(tmp_path: Path) -> None:
    """The experiment's own jobs on either engine: the same runs, the same numbers."""
    pytest.importorskip("ray", reason="ray is not installed")
    summaries = []
    for engine in (["--no-ray"], []):
        out = tmp_path / ("pool" if engine else "ray")
        done = _sweep("cartpole", "--out", out, "--grid", "taus=1,0", "--seeds", "0", *engine,
                      "--", "--quick")  # fmt: skip
        assert done.returncode == 0, done.stderr
        summaries.append(json.loads((out / "summary.json").read_text()))
    pool, ray = ([(r["tau"], r["seed"], r["best_val_reward"], r["test_reward"])
                  for r in s["runs"]] for s in summaries)  # fmt: skip
    assert pool == ray and [(t, s) for t, s, *_ in pool] == [(1.0, 0), (0.0, 0)]


def test_ray_runs_at_most_workers_jobs_at_a_time_while_they_report_progress() -> None:
    pytest.importorskip("ray", reason="ray is not installed")
    from dcem.experiments import common

    def timed_job(index: int, *, progress) -> dict:  # nested: Ray ships it by value
        """A job that reports progress while it runs and returns when it ran."""
        start = time.time()
        for _ in range(15):
            time.sleep(0.3)
            progress(str(index), 1)
        return {"index": index, "start": start, "end": time.time()}

    reported: dict[str, int] = {}
    results: list[dict] = []

    def progress(key: str, units: int) -> None:
        reported[key] = reported.get(key, 0) + units

    common.run_jobs(timed_job, [(i,) for i in range(2)], 1, progress, results.append,
                    address="local")  # fmt: skip
    spans = sorted((r["start"], r["end"]) for r in results)
    assert len(spans) == 2 and reported == {"0": 15, "1": 15}
    # one CPU: each job starts after the one before it ended (a job blocked on reporting
    # progress must not lend its CPU to another)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
