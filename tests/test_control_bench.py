"""Smoke test of benchmarks/control.py at tiny size, run as a real command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "control.py"
NAMES = {"rollout_B1_N16_H5", "rollout_B4_N8_H5", "latent_dcem_update", "expert_solve"}


def test_control_benchmark_tiny_writes_json(tmp_path):
    out = tmp_path / "nested" / "control.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == "control" and result["tiny"] is True
    assert result["threads"] == 1
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == NAMES
    for r in rows.values():
        assert r["seconds"] > 0 and r["baseline_seconds"] > 0
        assert abs(r["ratio_to_baseline"] * r["baseline_seconds"] - r["seconds"]) < 1e-12
        assert r["baseline"]
    assert rows["rollout_B4_N8_H5"]["loop_sequences_timed"] == 4
    assert isinstance(rows["expert_solve"]["mean_cost"], float)
