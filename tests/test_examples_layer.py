"""The example scripts examples/dcem_layer.py and examples/mpc_cartpole.py at --tiny size:
they run, write their figures, and the facts they print hold."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, out: Path) -> str:
    """Run ``examples/{name}.py --tiny --out out``; its stdout, after checking that it passed."""
    try:
        proc = subprocess.run(
            [sys.executable, f"examples/{name}.py", "--tiny", "--out", str(out)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as err:
        raise AssertionError(f"{name}.py failed:\n{err.stderr}") from err
    return proc.stdout


def check_figures(out: Path, *names: str) -> None:
    for name in names:
        path = out / name
        assert path.is_file(), f"{name} missing"
        assert path.stat().st_size > 1000, f"{name} is (almost) empty"
        if name.endswith(".gif"):
            assert path.stat().st_size < 1_000_000, f"{name} is over 1 MB"


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return tuple(float(g) for g in match.groups())


def test_dcem_layer(tmp_path: Path) -> None:
    out = run_example("dcem_layer", tmp_path / "figures")  # a folder the script must create
    check_figures(tmp_path / "figures", "dcem_layer_loss.png", "dcem_layer.gif",
                  "dcem_layer_batch.png")  # fmt: skip
    # part 1: DCEM's argmin starts in a well far from the target (about 3.3 away) and the
    # learned landscape moves it onto the target; without a (correct) gradient it stays put
    start, final = numbers(r"^part 1: .*initial (\d+\.\d+), final (\d+\.\d+)$", out)
    assert start > 2.0
    assert final < 0.3
    # part 2: the energy MLP's training MSE through DCEM falls (from about 30 to about 3)
    start, final = numbers(r"^part 2: .*initial (\d+\.\d+), final (\d+\.\d+)$", out)
    assert final < 0.25 * start


def test_mpc_cartpole(tmp_path: Path) -> None:
    out = run_example("mpc_cartpole", tmp_path)
    check_figures(tmp_path, "mpc_cartpole.png", "mpc_cartpole.gif", "mpc_cartpole_grad.png")
    cost = {
        name: numbers(rf"^\s+{name}\s+(-?\d+\.\d+)$", out)[0]
        for name in ("CEM", "DCEM", "do-nothing")
    }
    # hanging without force costs about +1 per step; both MPC controllers swing the pole up
    # (above the horizontal on average: negative cost)
    assert cost["do-nothing"] > 0
    for name in ("CEM", "DCEM"):
        assert cost[name] < min(0.0, cost["do-nothing"]), cost
    grad, fd = numbers(r"autograd through DCEM (-?\d+\.\d+), finite difference (-?\d+\.\d+)", out)
    assert abs(fd) > 0.1  # a gradient that is not trivially zero
    assert abs(grad - fd) <= 1e-4 * abs(fd), (grad, fd)
    before, after = numbers(r"plan cost (-?\d+\.\d+) -> (-?\d+\.\d+)$", out)
    assert after < before
