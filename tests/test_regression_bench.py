"""Smoke test of benchmarks/regression.py at tiny size, run as a real command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "regression.py"


def test_regression_benchmark_tiny_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "regression.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == "regression" and result["tiny"] is True
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {
        "dcem_S1_fused_vs_autograd", "dcem_S1_keep_freed_memory", "dcem_S1_evaluation",
        "dcem_S2_fused_vs_autograd", "dcem_S2_keep_freed_memory", "dcem_S2_evaluation",
        "gd_S3_fused_vs_autograd", "gd_S3_keep_freed_memory", "gd_S3_evaluation",
    }  # fmt: skip
    for r in rows.values():
        assert r["seconds"] > 0
        if "baseline_seconds" in r:
            assert r["baseline_seconds"] > 0
            assert abs(r["ratio_to_baseline"] * r["baseline_seconds"] - r["seconds"]) < 1e-12
    assert rows["dcem_S2_keep_freed_memory"]["faults_per_update"] >= 0
