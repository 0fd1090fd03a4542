"""`dcem regression` and `dcem cartpole` against bad input and interruptions: one line and exit
status 2 instead of a traceback, no folder left that blocks the corrected command, no process
left behind by SIGTERM or Ctrl-C, a fast `--help`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dcem import cli
from dcem.experiments import cartpole, common, regression
from dcem.experiments.cartpole import CartpoleConfig
from dcem.experiments.regression import RegressionConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A regression run of one GD job that takes about a second in this process.
TINY = ["--quick", "--methods", "gd", "--seeds", "0", "--updates", "20", "--eval-every", "10",
        "--checkpoint-every", "10", "--workers", "1"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``dcem ARGV`` in this process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _run(argv: list[str], caplog: pytest.LogCaptureFixture) -> list[str]:
    """Run ``dcem ARGV`` in this process; it must succeed. Its log lines."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    return [record.getMessage() for record in caplog.records]


def _finished_tiny_run(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(["regression", *TINY, "--out", str(out)], caplog)
    assert (out / "summary.json").is_file()


# --------------------------------------------------------------------------- 1: figures


def test_evaluations_after_the_last_update_skip_one_figure_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    argv = ["regression", *TINY, "--updates", "10", "--eval-every", "100", "--out", str(out)]
    lines = _run(argv, caplog)
    assert any(line.startswith("--eval-every 100 > --updates 10") for line in lines)
    skipped = [line for line in lines if line.startswith("convergence.png not drawn")]
    assert len(skipped) == 1 and "eval_every=100" in skipped[0]
    for name in ("ablation.png", "predictions.png", "energy_surfaces.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert not (out / "convergence.png").exists()

    (out / "ablation.png").unlink()
    lines = _run(["regression", "--plot-only", "--out", str(out)], caplog)
    assert (out / "ablation.png").read_bytes().startswith(PNG_MAGIC)
    assert sum(line.startswith("convergence.png not drawn") for line in lines) == 1


# --------------------------------------------------------------------------- 2: --plot-only


def _fake_run(folder: Path, experiment: str, summary: object) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"experiment": experiment, "config": {}}))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.mark.parametrize(
    ("command", "held", "summary"),
    [
        ("regression", "cartpole", {"experiment": "cartpole", "runs": [], "expert_reward": -1}),
        ("cartpole", "regression", {"experiment": "regression", "methods": ["gd"]}),
        ("regression", "dmc", {"final_eval_return": 1.0}),  # a dmc summary names no experiment
    ],
)
def test_plot_only_on_another_experiments_folder_names_what_it_holds(
    command: str, held: str, summary: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _fake_run(tmp_path / "run", held, summary)
    line = _bad([command, "--plot-only", "--out", str(out)], capsys)
    assert "--plot-only" in line and str(out) in line and f"holds a {held} run" in line
    if held != "dmc":
        assert f"dcem {held} --plot-only --out {out}" in line


@pytest.mark.parametrize("command", ["regression", "cartpole"])
@pytest.mark.parametrize("damage", ["cut", "list", "missing files"])
def test_plot_only_on_damaged_results_exits_2(
    command: str, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [{"tau": 1.0, "latent_dim": 2, "seed": 0}]
    summary = {"experiment": command, "methods": ["gd"], "seeds": [0], "updates": 10,
               "runs": runs, "expert_reward": -1.0}  # fmt: skip
    out = _fake_run(tmp_path / "run", command, summary)
    if damage == "cut":
        (out / "summary.json").write_text('{"experiment": "regr')
    elif damage == "list":
        (out / "summary.json").write_text("[]")
    line = _bad([command, "--plot-only", "--out", str(out)], capsys)
    assert "--plot-only" in line and str(out) in line and "rerun" in line


# --------------------------------------------------------------------------- 3: default folders


def test_quick_regression_has_its_own_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    small = ["--methods", "gd", "--seeds", "0", "--updates", "10", "--eval-every", "5",
             "--checkpoint-every", "5", "--workers", "1"]  # fmt: skip
    _run(["regression", "--quick", *small], caplog)
    _run(["regression", *small], caplog)  # not refused: the quick run is elsewhere
    quick = regression.load_config(tmp_path / "runs" / "regression-quick")
    full = regression.load_config(tmp_path / "runs" / "regression")
    assert quick.grid_size == RegressionConfig.quick().grid_size
    assert full.grid_size == RegressionConfig().grid_size


# --------------------------------------------------------------------------- 4: failed starts


def test_a_run_that_failed_before_saving_anything_does_not_block_the_corrected_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the job could not start")

    with monkeypatch.context() as patch:
        patch.setattr(regression, "_run_pending", fail)
        with pytest.raises(RuntimeError, match="could not start"):
            cli.main(["regression", *TINY, "--updates", "20", "--out", str(out)])
    assert (out / "config.json").is_file() and not common.has_results(out)
    lines = _run(["regression", *TINY, "--updates", "30", "--out", str(out)], caplog)
    assert any("saved no results; starting over" in line for line in lines)
    assert regression.load_config(out).n_updates == 30
    assert json.loads((out / "summary.json").read_text())["updates"] == 30


def test_a_run_with_results_is_refused_saying_how_to_go_on_and_overwrite_replaces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    _finished_tiny_run(out, caplog)
    line = _bad(["regression", *TINY, "--updates", "30", "--out", str(out)], capsys)
    assert "different config" in line and "another --out" in line and "--overwrite" in line
    assert regression.load_config(out).n_updates == 20  # untouched
    lines = _run(["regression", *TINY, "--updates", "30", "--overwrite", "--out", str(out)],
                 caplog)  # fmt: skip
    assert any(line.startswith("deleted the regression run in") for line in lines)
    assert regression.load_config(out).n_updates == 30
    assert json.loads((out / "summary.json").read_text())["updates"] == 30


@pytest.mark.parametrize("command", ["regression", "cartpole"])
def test_overwrite_deletes_only_dcem_run_folders(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    line = _bad([command, "--quick", "--overwrite", "--out", str(notes)], capsys)
    assert "--out" in line and "no config.json" in line and "only dcem run folders" in line
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    line = _bad([command, "--overwrite", "--plot-only", "--out", str(notes)], capsys)
    assert "--overwrite" in line and "--plot-only" in line


def test_run_folder_takes_over_only_a_run_of_the_same_experiment_without_results(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    with common.run_folder(out, "exp", {"a": 1}) as resumed:
        assert not resumed
        (out / "expert.json").write_text("{}")  # a cache computed from the config
    with common.run_folder(out, "exp", {"a": 1}) as resumed:
        assert resumed and (out / "expert.json").exists()
    with common.run_folder(out, "exp", {"a": 2}) as resumed:  # nothing saved: taken over
        assert not resumed and not (out / "expert.json").exists()
        common.save_checkpoint(out / "ckpt" / "k.pt", {"step": 1})
    with pytest.raises(common.RunFolderError, match="different config.*--overwrite"):
        with common.run_folder(out, "exp", {"a": 3}):
            pass
    with pytest.raises(common.RunFolderError, match="experiment 'exp', not 'other'"):
        with common.run_folder(out, "other", {"a": 2}):
            pass
    with common.run_folder(out, "other", {"b": 1}, overwrite=True) as resumed:
        assert not resumed and sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]
    assert json.loads((out / "config.json").read_text())["experiment"] == "other"


# --------------------------------------------------------------------------- 5: unusable --out


@pytest.mark.parametrize("command", ["regression", "cartpole"])
@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_an_out_folder_that_cannot_be_created_exits_2(
    command: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("keep me")
    out = tmp_path / "afile" / "run" if where == "under a file" else Path("/proc/dcem-test-run")
    line = _bad([command, "--quick", "--out", str(out)], capsys)
    assert line.startswith(f"dcem {command}: error: argument --out: cannot create {out}")
    assert "choose another --out" in line
    if where == "under a file":
        assert f"{tmp_path / 'afile'} is a file" in line
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "empty"])
def test_a_damaged_checkpoint_exits_2_naming_the_file_and_the_fix(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    _finished_tiny_run(out, caplog)
    for path in (out / "jobs").glob("gd-0.*"):
        if path.suffix != ".csv":
            path.unlink()  # the job is unfinished again: the rerun resumes its checkpoint
    ckpt = out / "ckpt" / "gd-0.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "bit flip":
        ckpt.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    else:
        ckpt.write_bytes(b"")
    line = _bad(["regression", *TINY, "--out", str(out)], capsys)
    assert "--out" in line and str(ckpt) in line and "delete that file" in line


def test_damaged_metric_rows_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    _finished_tiny_run(out, caplog)
    (out / "jobs" / "gd-0.json").unlink()
    (out / "jobs" / "gd-0.csv").write_text("update,train_mse,lr\nten,1.0,0.001\n")
    line = _bad(["regression", *TINY, "--out", str(out)], capsys)
    assert "gd-0.csv line 2 is damaged" in line and "--overwrite" in line


@pytest.mark.parametrize("record", ["[1, 2]", '{"experiment": 3}', '{"experiment": "x", "con'])
def test_a_damaged_run_record_exits_2(
    record: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(record)
    line = _bad(["regression", *TINY, "--out", str(out)], capsys)
    assert "--out" in line and "config.json" in line and "choose another --out" in line


# --------------------------------------------------------------------------- 6: interruptions


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """The processes started by ``root``, directly or not: pid -> (start time, command line)."""
    table = _process_table()
    found: dict[int, tuple[int, str]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _) in table.items():
            if ppid == parent and pid not in found:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    cmd = ""
                found[pid] = (start, cmd)
                frontier.append(pid)
    return found


def _alive(processes: dict[int, tuple[int, str]]) -> list[str]:
    table = _process_table()
    return [
        f"{pid} {cmd[:100]}"
        for pid, (start, cmd) in processes.items()
        if pid in table and table[pid][1] == start and table[pid][2] != "Z"
    ]


def _interrupt(
    command: list[str], ready: Callable[[dict[int, tuple[int, str]]], bool], how: str
) -> subprocess.CompletedProcess:
    """Start ``command`` in its own process group; once ``ready(processes it started)``, send
    SIGTERM to it (``how == "SIGTERM"``) or SIGINT to the group, as Ctrl-C in a terminal does.
    Checks that its two pool workers are gone once it has exited, and every process it
    started (the multiprocessing resource tracker too) within 5 s."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        started = _descendants(proc.pid)
        if ready(started):
            break
        time.sleep(0.02)
    workers = {pid: p for pid, p in started.items() if "spawn_main" in p[1]}
    assert len(workers) == 2, started  # the run is inside its pool of two workers
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert _alive(workers) == [], f"workers outlived the run: {stderr}"
    deadline = time.monotonic() + 5
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(started) == []
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _two_workers(processes: dict[int, tuple[int, str]]) -> bool:
    return sum("spawn_main" in cmd for _, cmd in processes.values()) == 2


def _checkpoint_exists(path: Path) -> Callable[[dict[int, tuple[int, str]]], bool]:
    return lambda processes: path.exists() and _two_workers(processes)


# Three jobs, longest first: dcem seeds 0 and 1, dcem seed 2 (both in the pool of two
# workers), then gd seeds 0 to 2.
POOL = ["--quick", "--seeds", "0,1,2", "--updates", "200", "--eval-every", "20",
        "--checkpoint-every", "20", "--workers", "2"]  # fmt: skip
STOPPED = "interrupted; rerun the same command to resume"


def test_sigterm_ends_every_process_of_the_run_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dcem", "regression", *POOL, "--out", str(out)]
    done = _interrupt(command, _checkpoint_exists(out / "ckpt" / "dcem-0_1.pt"), "SIGTERM")
    assert done.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == STOPPED
    assert 0 < common.load_checkpoint(out / "ckpt" / "dcem-0_1.pt")["update"] < 200


def test_ctrl_c_while_the_workers_start_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dcem", "regression", *POOL, "--out", str(out)]
    done = _interrupt(command, _two_workers, "Ctrl-C")  # they are still importing torch
    assert done.returncode == 128 + signal.SIGINT
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.strip().splitlines() == [STOPPED]


@pytest.mark.slow
def test_runs_stopped_by_sigterm_and_ctrl_c_resume_to_the_numbers_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    command = [sys.executable, "-m", "dcem", "regression", *POOL, "--out", str(stopped)]
    done = _interrupt(command, _checkpoint_exists(stopped / "ckpt" / "dcem-0_1.pt"), "SIGTERM")
    assert done.returncode == 128 + signal.SIGTERM
    at = common.load_checkpoint(stopped / "ckpt" / "dcem-0_1.pt")["update"]

    def advanced(processes: dict[int, tuple[int, str]]) -> bool:
        ckpt = stopped / "ckpt" / "dcem-0_1.pt"
        return _two_workers(processes) and common.load_checkpoint(ckpt)["update"] > at

    done = _interrupt(command, advanced, "Ctrl-C")
    assert done.returncode == 128 + signal.SIGINT
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"resumed {stopped}: 0 of 3 jobs done") and lines[-1] == STOPPED
    assert "Traceback" not in done.stderr

    resumed = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {stopped}: " in resumed.stderr
    done = subprocess.run([*command[:-1], str(straight)], capture_output=True, text=True,
                          env=_env(), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((stopped / "summary.json").read_text())
    assert b["final_mse_per_seed"] == a["final_mse_per_seed"]
    assert b["ablation_per_seed"] == a["ablation_per_seed"]
    assert (stopped / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert json.loads((stopped / "jobs" / "dcem-0.json").read_text())["resumed_from"] > at


def _sleepy_job(seconds: float, progress: common.ProgressFn) -> dict[str, int]:
    """A picklable job for :func:`common.run_jobs`: reports its pid, then sleeps."""
    progress(str(os.getpid()), 1)
    time.sleep(seconds)
    return {"pid": os.getpid()}


def test_an_interrupt_ends_the_pool_workers_at_once() -> None:
    reports: dict[str, int] = {}

    def progress(key: str, units: int) -> None:
        reports[key] = units
        if len(reports) == 2:  # both workers run a job: "Ctrl-C"
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        common.run_jobs(_sleepy_job, [(60.0,), (60.0,), (60.0,)], 2, progress, print)
    assert time.monotonic() - start < 50  # the jobs sleep 60 s
    table = _process_table()
    for pid in map(int, reports):
        assert pid not in table or table[pid][2] == "Z", f"worker {pid} outlived the pool"


# --------------------------------------------------------------------------- 7: resume line


def test_a_resumed_run_says_where_it_resumed_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    lines = _run(["regression", *TINY, "--methods", "gd,dcem", "--updates", "10", "--out",
                  str(out)], caplog)  # fmt: skip
    assert not any(line.startswith("resumed") for line in lines)
    (out / "jobs" / "dcem-0.json").unlink()
    lines = _run(["regression", *TINY, "--methods", "gd,dcem", "--updates", "10", "--out",
                  str(out)], caplog)  # fmt: skip
    assert [line for line in lines if line.startswith("resumed")] == [
        f"resumed {out}: 1 of 2 jobs done; 1 of the 1 left continue from checkpoints"
    ]
    lines = _run(["regression", *TINY, "--methods", "gd,dcem", "--updates", "10", "--out",
                  str(out)], caplog)  # fmt: skip
    assert f"resumed {out}: 2 of 2 jobs done; rewriting the summary and figures" in lines


def test_a_resumed_cartpole_run_says_where_it_resumed_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = CartpoleConfig.quick(seeds=(0,), taus=(0.0,), n_iter=20)
    record = common.run_record(cartpole.EXPERIMENT, cfg.to_json())
    out.mkdir()
    (out / "config.json").write_text(json.dumps(record))

    def stop(*args: object, **kwargs: object) -> dict:  # the first step after the line
        raise KeyboardInterrupt

    monkeypatch.setattr(cartpole, "_expert", stop)
    with caplog.at_level(logging.INFO):
        status = cli.main(["cartpole", "--quick", "--seeds", "0", "--taus", "0", "--updates",
                           "20", "--out", str(out)])  # fmt: skip
    assert status == 130
    messages = [r.getMessage() for r in caplog.records]
    assert f"resumed {out}: 0 of 1 runs done; 0 of the 1 left continue from checkpoints" in (
        messages
    )
    assert messages[-1] == "interrupted; rerun the same command to resume"


# --------------------------------------------------------------------------- 8: --help, --version


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    import dcem

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dcem {dcem.__version__}"


_IMPORTS = """
import sys
import dcem.cli
{build}
heavy = ("torch", "matplotlib", "dcem.experiments.regression", "dcem.experiments.cartpole",
         "dcem.experiments.dmc", "dcem.experiments.common")
print(sorted(m for m in heavy if m in sys.modules))
"""


def _imported_by(build: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _IMPORTS.format(build=build)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(eval(done.stdout))  # noqa: S307 - our own printed list


def test_building_the_parser_imports_neither_torch_nor_an_experiment() -> None:
    ours = ("cli._COMMANDS = {k: v for k, v in cli._COMMANDS.items() if k != 'dmc'}\n"
            "cli.build_parser()").replace("cli.", "dcem.cli.")  # fmt: skip
    assert _imported_by(ours) == []  # the regression and cartpole parts
    imported = _imported_by("dcem.cli.build_parser()")
    if "dcem.experiments.dmc" in imported:
        pytest.xfail("_add_dmc still imports dcem.experiments.dmc (and torch) to build --help")
    assert imported == []


def test_help_defaults_are_the_configs_defaults() -> None:
    regression_default, cartpole_default = RegressionConfig(), CartpoleConfig()
    assert cli._REGRESSION_METHODS == regression.METHODS
    assert cli._MIN_TAU == cartpole.MIN_TAU
    for name, value in cli._REGRESSION_DEFAULTS.items():
        assert getattr(regression_default, name) == value, name
    for name, value in cli._CARTPOLE_DEFAULTS.items():
        assert getattr(cartpole_default, name) == value, name


def test_help_is_fast() -> None:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dcem", "regression", "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "--updates" in done.stdout
    assert time.monotonic() - start < 2.0  # it imported torch (~1.5 s) before


# --------------------------------------------------------------------------- 9: option names


def test_cartpole_updates_is_the_training_length_and_iterations_an_old_alias(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["cartpole", "--quick", "--updates", "7"])
    assert cli._cartpole_config(args) == CartpoleConfig.quick(n_iter=7)
    args = parser.parse_args(["cartpole", "--quick", "--iterations", "7"])
    assert cli._cartpole_config(args) == CartpoleConfig.quick(n_iter=7)
    help_text = _subparser("cartpole").format_help()
    assert "--updates" in help_text and "--iterations" not in help_text
    line = _bad(["cartpole", "--updates", "5", "--iterations", "5"], capsys)
    assert "--iterations" in line and "--updates" in line
    regression_help = _subparser("regression").format_help()
    assert (
        "--updates" in regression_help and "--seeds" in regression_help and "--seeds" in help_text
    )


# --------------------------------------------------------------------------- 10: non-finite


def _subparser(command: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in cli.build_parser()._actions if a.dest == "command"]
    return commands.choices[command]  # type: ignore[index,no-any-return]


def _typed_options(command: str) -> list[str]:
    sub = _subparser(command)
    return [
        action.option_strings[0]
        for action in sub._actions
        if action.option_strings and action.type is not None and action.help != argparse.SUPPRESS
    ]


@pytest.mark.parametrize("command", ["regression", "cartpole"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN"])
def test_non_finite_values_exit_2_naming_the_option(
    command: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = [o for o in _typed_options(command) if o != "--out"]
    assert len(options) >= 5
    assert not math.isfinite(float(value))
    for option in options:
        line = _bad([command, option, value, "--out", str(tmp_path / "run")], capsys)
        assert option in line, line
    assert not (tmp_path / "run").exists()
