"""Test-wide settings and helpers."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread: the suite also starts worker subprocesses, and OpenMP
# threads that wait for a busy core slow small operators down by an order of
# magnitude on a shared 2-core machine.
torch.set_num_threads(1)


def run_benchmark(name: str, tmp_path: Path, *options: str, timeout: float = 300) -> dict:
    """Run ``benchmarks/{name}.py --tiny [options]`` in a subprocess and return its JSON."""
    out = tmp_path / f"{name}.json"
    script = str(ROOT / "benchmarks" / f"{name}.py")
    proc = subprocess.run(
        [sys.executable, script, "--tiny", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    return result
