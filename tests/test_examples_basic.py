"""The example scripts run at --tiny size, write their figures and print true facts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, tmp_path: Path, figures: list[str]) -> str:
    """Run ``examples/{name}.py --tiny``; check its figures exist; return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    for figure in figures:
        path = tmp_path / figure
        assert path.is_file(), f"{figure} was not written"
        assert path.stat().st_size > 1000, f"{figure} is nearly empty"
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matches {pattern!r} in:\n{text}"
    return float(match.group(1))


def test_cem_2d(tmp_path: Path) -> None:
    out = _run("cem_2d", tmp_path, ["cem_2d.png", "cem_2d_temperature.png"])
    grid_min = _number(r"grid minimum (\S+)", out)
    # the global minimum is the deepest well, near the origin; the other wells are at about
    # -0.88 and -0.55, so a tolerance of 0.02 tells the global well from the others
    assert -1.08 < grid_min < -1.06
    cem_cost = _number(r"^CEM\s+final mean .* cost (\S+)", out)
    dcem_cost = _number(r"^DCEM\s+final mean .* cost (\S+)", out)
    assert abs(cem_cost - grid_min) < 5e-3, out  # hard elites: CEM collapses on the minimum
    assert abs(dcem_cost - grid_min) < 2e-2, out  # soft elites keep a wider Gaussian (tau=1)
    # DCEM's weights are the soft top-k of its standardized scores
    assert _number(r"matches DCEM's weights: max diff (\S+)", out) < 1e-5
    k = 6  # n_elite at --tiny
    sums = [float(s) for s in re.findall(r"weights sum (\S+)", out)]
    assert len(sums) == 4 and all(abs(s - k) < 1e-3 for s in sums), out
    assert _number(r"^hard top-k.*max (\S+)", out) == 1.0
    assert _number(r"^hard top-k.*min (\S+)", out) == 0.0
    tops = [_number(rf"tau = {t}\s+weights sum .* max (\S+)", out) for t in ("0.1", "1", "10")]
    assert tops[0] > tops[1] > tops[2] and tops[2] < 0.5, out  # hotter, flatter weights


def test_soft_topk(tmp_path: Path) -> None:
    out = _run("soft_topk", tmp_path, ["soft_topk.png"])
    # the implicit gradient against central finite differences in float64 (~1e-10 measured)
    diffs = [float(d) for d in re.findall(r"central differences .* max abs diff (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-6, out
    # tau -> 0: within 1e-3 of the hard top-k, and as fast as sigmoid(-gap / (2 tau)) predicts
    err = _number(r"max \|lml - topk_mask\| at tau = \S+: (\S+)", out)
    guide = _number(r"\(sigmoid\(-gap / \(2 tau\)\) = (\S+)\)", out)
    assert err < 1e-3 and abs(err - guide) < 0.1 * guide, out
    # while a large tau is far from it (the weights approach k / n)
    assert _number(r"at tau = 10: (\S+)", out) > 0.3, out
