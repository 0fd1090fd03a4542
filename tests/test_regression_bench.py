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
    assert set(rows) == {"dcem_S2_update", "dcem_S2_evaluation", "gd_S2_update", "gd_S2_evaluation"}
    for r in rows.values():
        assert r["seconds"] > 0 and r["compiled_seconds"] > 0
        assert r["speedup"] == r["cpu_seconds"] / r["compiled_cpu_seconds"]
    assert rows["dcem_S2_update"]["compile_s"] > 0
    # unrolled GD differentiates twice: torch.compile refuses it (the experiment runs it eagerly)
    assert rows["gd_S2_update"]["compile_error"]
