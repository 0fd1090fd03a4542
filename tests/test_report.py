"""``dcem report``: the Markdown of docs/results.md from real --quick run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcem.experiments import common, report

pytest.importorskip("dm_control.suite", reason="dm_control is not installed")


def _dcem(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dcem", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    commands = {
        "regression": ["regression", "--quick", "--updates", "100", "--seeds", "0,1",
                       "--workers", "1"],
        "cartpole": ["cartpole", "--quick", "--updates", "20", "--seeds", "0,1", "--taus", "1",
                     "--workers", "1"],
        "dmc": ["dmc", "train", "--quick", "--task", "cartpole-swingup", "--no-video"],
    }  # fmt: skip
    out = {}
    for name, args in commands.items():
        out[name] = root / name
        done = _dcem(*args, "--out", out[name])
        assert done.returncode == 0, done.stderr
    out["phase2"] = root / "phase2"
    done = _dcem("dmc", "train", "--quick", "--task", "cartpole-swingup", "--no-video",
                 "--planner", "latent", "--init-from", out["dmc"], "--decoder-pretrain", "20",
                 "--out", out["phase2"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_report_rebuilds_every_number_from_the_run_folders(runs: dict[str, Path],
                                                           tmp_path: Path) -> None:  # fmt: skip
    target = tmp_path / "results.md"
    done = _dcem("report", *runs.values(), "--out", target)
    assert done.returncode == 0, done.stderr
    text = target.read_text()
    assert text.startswith("# Measured results") and "dcem report" in text
    # regression: the final MSE of each method, as summary.json has it
    summary = json.loads((runs["regression"] / "summary.json").read_text())
    for method in summary["methods"]:
        mean = summary["final_mse"][method]
        assert f"| {method} | {format(mean, '.3g')}" in text, method
    # cartpole: each (latent dim, tau) improvement factor
    summary = json.loads((runs["cartpole"] / "summary.json").read_text())
    for g in summary["improvement_factor"]:
        head = format(g["headline_mean"], ".3g")
        assert f"| {g['latent_dim']} | {g['tau']:g} | {head}" in text
        assert f"| {format(g['mean'], '.3g')}" in text
    # dmc: every evaluation point of metrics.csv with its mean
    rows = [r for r in common.read_csv(runs["dmc"] / "metrics.csv") if r["phase"] == "eval"]
    assert rows
    for r in rows:
        assert f"| {int(r['env_step']):,} | {float(r['return']):.1f} |" in text
    # phase 2: its settings, and per episode the saturated share and imagined vs real returns
    assert "decoder pre-trained for 20 autoencoder steps" in text
    rows = [r for r in common.read_csv(runs["phase2"] / "metrics.csv") if r["phase"] == "train"]
    assert rows
    for r in rows:
        share = format(float(r["saturated_fraction"]), ".3f")
        assert f"| {r['episode']} | {float(r['return']):.1f} | {share} |" in text
    # the same command gives the same document
    again = _dcem("report", *runs.values(), "--out", tmp_path / "again.md")
    assert again.returncode == 0 and (tmp_path / "again.md").read_text() == text


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    done = _dcem("report", tmp_path, "--out", tmp_path / "r.md")
    assert done.returncode == 2 and "config.json" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.md").exists()
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "other"}))
    with pytest.raises(common.RunFolderError, match="other"):
        report.render([tmp_path])
