"""Run-folder helpers: atomic writes, checkpoints, seeds, CSV, folder lock, Student-t CI, and
the run machinery shared by the experiments (folder check, job state, progress, job pool)."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dcem.experiments import common


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- atomic writes


def test_atomic_open_failure_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old contents\n")
    with pytest.raises(RuntimeError, match="boom"):
        with common.atomic_open(target, "w") as handle:
            handle.write("half of the new cont")
            raise RuntimeError("boom")
    assert target.read_text() == "old contents\n"
    assert _listing(tmp_path) == ["summary.json"]


def test_atomic_open_failure_on_new_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with common.atomic_open(tmp_path / "new.bin") as handle:
            handle.write(b"\x00" * 1000)
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_atomic_write_json_replaces_and_rejects_nan_before_touching_the_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "a.json"
    common.atomic_write_json(target, {"x": [1, 2.5]})
    assert json.loads(target.read_text()) == {"x": [1, 2.5]}
    common.atomic_write_json(target, {"x": 3})
    assert json.loads(target.read_text()) == {"x": 3}
    with pytest.raises(ValueError):
        common.atomic_write_json(target, {"x": math.nan})
    assert json.loads(target.read_text()) == {"x": 3}
    assert _listing(tmp_path) == ["a.json"]


# --------------------------------------------------------------------------- checkpoints


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(7)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "gen": gen.get_state(),
            "update": 42, "name": "gd", "lrs": [0.1, math.inf]}  # fmt: skip


def test_checkpoint_roundtrip_restores_tensors_generator_and_values(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "ckpt" / "gd-0.pt"
    common.save_checkpoint(path, state)
    loaded = common.load_checkpoint(path)
    assert loaded["update"] == 42 and loaded["name"] == "gd" and loaded["lrs"] == [0.1, math.inf]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    restored = torch.Generator()
    restored.set_state(loaded["gen"])
    expected = torch.Generator().manual_seed(7)
    assert torch.equal(torch.randn(5, generator=restored), torch.randn(5, generator=expected))
    assert _listing(path.parent) == ["gd-0.pt"]


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_checkpoint_is_detected(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "c.pt"
    common.save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(common.CheckpointError, match="corrupted or truncated") as err:
        common.load_checkpoint(path)
    assert str(path) in str(err.value)


def test_bit_flip_in_tensor_data_is_detected(tmp_path: Path) -> None:
    # torch.load alone accepts this file and returns wrong weights; the digest must catch it.
    path = tmp_path / "c.pt"
    common.save_checkpoint(path, {"w": torch.arange(4096, dtype=torch.float32)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(common.CheckpointError, match="SHA-256 mismatch"):
        common.load_checkpoint(path)


def test_foreign_file_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(common.CheckpointError, match="no valid header"):
        common.load_checkpoint(path)


def test_checkpoint_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    common.save_checkpoint(path, {"obj": _Opaque()})  # a correct digest over a pickled object
    with pytest.raises(common.CheckpointError, match="could not be loaded"):
        common.load_checkpoint(path)


class _Opaque:
    pass


# --------------------------------------------------------------------------- seeds, records, CSV


def test_seed_everything_makes_all_three_rngs_reproducible() -> None:
    import random

    common.seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    common.seed_everything(3)
    second = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="seed"):
        common.seed_everything(-1)


def test_git_commit_of_this_checkout_and_outside_git(tmp_path: Path) -> None:
    commit = common.git_commit()
    if commit is None:
        pytest.skip("the package is not inside a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    assert common.git_commit(tmp_path) is None


def test_run_record_names_experiment_config_and_code_version() -> None:
    record = common.run_record("regression", {"seeds": [0, 1]})
    assert record["experiment"] == "regression" and record["config"] == {"seeds": [0, 1]}
    assert {"git_commit", "torch", "python", "numpy"} <= record.keys()


def test_csv_append_read_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "m.csv"
    fields = ["update", "loss"]
    common.append_csv(path, fields, [{"update": 1, "loss": 0.5}, {"update": 2, "loss": 0.25}])
    common.append_csv(path, fields, [{"update": 3, "loss": 0.125}])
    assert path.read_text().count("update,loss") == 1
    with open(path, "a") as handle:  # a row cut off by a crash
        handle.write("4,0.06")
    rows = common.read_csv(path)
    assert [r["update"] for r in rows] == ["1", "2", "3"]
    kept = common.truncate_csv(path, fields, lambda r: int(r["update"]) <= 2)
    assert kept == 2
    assert path.read_bytes() == b"update,loss\n1,0.5\n2,0.25\n"


def test_folder_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with common.lock_folder(tmp_path):
        with pytest.raises(common.FolderLockedError, match="in use"):
            with common.lock_folder(tmp_path):
                pass
    with common.lock_folder(tmp_path):  # released after the first context
        pass


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", [*range(1, 41), 57, 100, 333, 1000])
def test_t_quantile_matches_scipy(df: int) -> None:
    for p in (0.9, 0.975, 0.995):
        assert common.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_mean_ci95_matches_scipy_t_interval(n: int) -> None:
    values = np.random.default_rng(n).lognormal(size=(n, 4))
    mean, half = common.mean_ci95(values, axis=0)
    for j in range(4):
        column = values[:, j]
        low, high = stats.t.interval(0.95, n - 1, loc=column.mean(), scale=stats.sem(column))
        assert mean[j] == pytest.approx(column.mean(), rel=1e-12)
        assert mean[j] - half[j] == pytest.approx(low, rel=1e-9)
        assert mean[j] + half[j] == pytest.approx(high, rel=1e-9)


def test_bootstrap_ci95_matches_scipy_percentile_bootstrap() -> None:
    """Same estimator as scipy.stats.bootstrap(method="percentile"), other random draws: the
    ends agree to within the resampling noise (a few hundredths of a standard deviation)."""
    values = np.random.default_rng(3).normal(10.0, 2.0, size=40)
    median, lo, hi = common.bootstrap_ci95(values)
    ref = stats.bootstrap((values,), np.median, n_resamples=20_000, method="percentile",
                          random_state=np.random.default_rng(4)).confidence_interval  # fmt: skip
    assert median == np.median(values)
    assert lo == pytest.approx(ref.low, abs=0.15) and hi == pytest.approx(ref.high, abs=0.15)
    assert lo < median < hi and hi - lo > 0.5  # a real interval, not a point
    assert common.bootstrap_ci95(values) == (median, lo, hi)  # seeded: reproducible
    assert common.bootstrap_ci95([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        common.bootstrap_ci95([])


def test_mean_ci95_other_axis_single_value_and_bad_input() -> None:
    values = np.array([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    mean, half = common.mean_ci95(values, axis=1)
    assert np.allclose(mean, [3.0, 3.0]) and half[1] == 0.0 and half[0] > 0
    mean, half = common.mean_ci95([[5.0, 6.0]])
    assert np.allclose(mean, [5.0, 6.0]) and np.isnan(half).all()
    with pytest.raises(ValueError, match="non-empty"):
        common.mean_ci95(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="df"):
        common.t_quantile(0.975, 0)


def test_checkpoint_bytes_are_torch_save_payload_after_header(tmp_path: Path) -> None:
    # The payload is an ordinary torch.save archive: tools can strip the header and load it.
    path = tmp_path / "c.pt"
    common.save_checkpoint(path, {"w": torch.ones(2)})
    data = path.read_bytes()
    header, digest, payload = data.split(b"\n", 2)
    assert header == b"DCEMCKPT1" and len(digest) == 64
    loaded = torch.load(io.BytesIO(payload), weights_only=True)
    assert torch.equal(loaded["w"], torch.ones(2))


# --------------------------------------------------------------------------- run machinery


def test_check_out_folder_accepts_new_empty_and_same_config(tmp_path: Path) -> None:
    common.check_out_folder(tmp_path / "new", "exp", {"a": 1})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").touch()
    common.check_out_folder(tmp_path / "run", "exp", {"a": 1})  # only a lock: empty
    (tmp_path / "run" / "config.json").write_text('{"experiment": "exp", "config": {"a": 1}}')
    common.check_out_folder(tmp_path / "run", "exp", {"a": 1})


def test_check_out_folder_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(common.RunFolderError, match="exists and is not a folder"):
        common.check_out_folder(tmp_path / "file", "exp", {"a": 1})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not empty and holds no config.json"),
        ("{not json", "is unreadable"),
        ('{"experiment": "other", "config": {}}', "holds results of experiment 'other', not 'exp'"),
        (
            '{"experiment": "exp", "config": {"a": 2, "b": 0}}',
            "holds a exp run with a different config (a: 2 -> 1, b: 0 -> None)",
        ),
    ],
)
def test_check_out_folder_refuses_other_contents(
    tmp_path: Path, content: str | None, message: str
) -> None:
    (tmp_path / "summary.json").write_text("{}")
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(common.RunFolderError, match=re.escape(message)):
        common.check_out_folder(tmp_path, "exp", {"a": 1})


def test_job_done_needs_json_npz_and_an_accepted_result(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()

    def has_x(result: dict) -> bool:
        return result["x"] == 1

    (jobs / "k.json").write_text('{"x": 1}')
    assert not common.job_done(tmp_path, "k", has_x)  # no NPZ yet
    (jobs / "k.npz").write_bytes(b"")
    assert common.job_done(tmp_path, "k", has_x)
    (jobs / "k.json").write_text('{"y": 1}')
    assert not common.job_done(tmp_path, "k", has_x)  # KeyError counts as not done
    (jobs / "k.json").write_text('{"x": 1')
    assert not common.job_done(tmp_path, "k", has_x)  # cut-off JSON


def test_checkpointed_reads_the_counter_or_zero(tmp_path: Path) -> None:
    assert common.checkpointed(tmp_path, "k", "update") == 0
    common.save_checkpoint(tmp_path / "ckpt" / "k.pt", {"update": 42})
    assert common.checkpointed(tmp_path, "k", "update") == 42


def test_run_progress_logs_sparse_lines_on_the_given_logger(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("dcem.test_progress")
    kw = dict(experiment="exp", unit="steps", bar_unit="st", job_noun="jobs", logger=logger)
    with caplog.at_level("INFO", logger=logger.name):
        with common.RunProgress({"a": 0, "b": 5}, 20, True, log_every=0.0, **kw) as report:
            report("a", 10)
        with common.RunProgress({"a": 0}, 20, False, log_every=0.0, **kw) as report:
            report("a", 10)  # show=False: silent
    assert [r.getMessage() for r in caplog.records] == ["exp: 15 / 20 steps"]
    assert "\r" not in capsys.readouterr().err


def _square_job(offset: int, x: int, progress: common.ProgressFn) -> dict[str, int]:
    """A picklable job for :func:`common.run_jobs`: reports twice, returns ``offset + x**2``."""
    progress(f"j{x}", 1)
    progress(f"j{x}", 2)
    return {"x": x, "y": offset + x * x}


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_in_process_and_in_a_pool(workers: int) -> None:
    reports: dict[str, int] = {}
    results: list[dict[str, int]] = []
    job = functools.partial(_square_job, 10)
    common.run_jobs(job, [(1,), (2,), (3,)], workers, reports.__setitem__, results.append)
    assert sorted((r["x"], r["y"]) for r in results) == [(1, 11), (2, 14), (3, 19)]
    if workers == 1:
        assert reports == {"j1": 2, "j2": 2, "j3": 2}
    else:  # a report still in a worker's queue when its result arrives may be left unread
        assert reports and all(reports[key] in (1, 2) for key in reports)
        assert set(reports) <= {"j1", "j2", "j3"}


def test_run_jobs_pool_reraises_a_job_error() -> None:
    with pytest.raises(ValueError, match="boom"):
        common.run_jobs(_failing_job, [(0,)], 2, lambda key, n: None, lambda result: None)


def _failing_job(x: int, progress: common.ProgressFn) -> dict[str, int]:
    raise ValueError(f"boom {x}")


def test_job_slot_holds_the_job_lock_with_one_torch_thread(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    with common.job_slot(tmp_path, "k"):
        assert torch.get_num_threads() == 1
        with pytest.raises(common.FolderLockedError):
            with common.lock_file(tmp_path / "ckpt" / "k.lock"):
                pass
    assert torch.get_num_threads() == threads
    with common.lock_file(tmp_path / "ckpt" / "k.lock"):  # released
        pass


def test_save_job_appends_rows_empties_them_and_checkpoints(tmp_path: Path) -> None:
    rows = [{"update": 1, "loss": 0.5}]
    common.save_job(tmp_path, "k", ["update", "loss"], rows, {"update": 1})
    rows.append({"update": 2, "loss": 0.25})
    common.save_job(tmp_path, "k", ["update", "loss"], rows, {"update": 2})
    assert rows == []
    assert (tmp_path / "jobs" / "k.csv").read_text() == "update,loss\n1,0.5\n2,0.25\n"
    assert common.load_checkpoint(tmp_path / "ckpt" / "k.pt") == {"update": 2}


def test_check_out_folder_states_and_takeover_of_a_run_without_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert common.check_out_folder(out, "exp", {"a": 1}) == "new"
    out.mkdir()
    (out / "config.json").write_text('{"experiment": "exp", "config": {"a": 1}}')
    (out / "expert.json").write_text("{}")  # a cache: not a result
    assert common.check_out_folder(out, "exp", {"a": 1}) == "resume"
    assert not common.has_results(out)
    assert common.check_out_folder(out, "exp", {"a": 2}, takeover=True) == "replace"
    with pytest.raises(common.RunFolderError, match="different config.*; choose another --out$"):
        common.check_out_folder(out, "exp", {"a": 2})  # without takeover (dmc's way)
    common.save_checkpoint(out / "ckpt" / "k.pt", {"step": 1})
    assert common.has_results(out)
    with pytest.raises(common.RunFolderError, match=re.escape(common.OVERWRITE_HINT)):
        common.check_out_folder(out, "exp", {"a": 2}, takeover=True, hint=common.OVERWRITE_HINT)


def test_truncate_csv_names_a_damaged_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("update,loss\n1,0.5\nx,0.4\n")
    with pytest.raises(common.RunFolderError, match=r"m\.csv line 3 is damaged"):
        common.truncate_csv(path, ["update", "loss"], lambda row: int(row["update"]) <= 1)
    assert path.read_text() == "update,loss\n1,0.5\nx,0.4\n"  # untouched


def test_load_summary_names_what_a_folder_holds(tmp_path: Path) -> None:
    with pytest.raises(common.RunFolderError, match="has no summary.json"):
        common.load_summary(tmp_path, "regression")
    (tmp_path / "summary.json").write_text('{"experiment": "cartpole"}')
    with pytest.raises(common.RunFolderError, match=re.escape(
        f"holds a cartpole run, not a regression run; draw it with: dcem cartpole --plot-only "
        f"--out {tmp_path}"
    )):  # fmt: skip
        common.load_summary(tmp_path, "regression")
    assert common.load_summary(tmp_path, "cartpole") == {"experiment": "cartpole"}
    (tmp_path / "summary.json").write_text('{"experiment": "cartp')
    with pytest.raises(common.RunFolderError, match="is unreadable"):
        common.load_summary(tmp_path, "cartpole")


def test_log_resumed_says_what_is_done_and_what_continues(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("dcem.test_resumed")
    with caplog.at_level("INFO", logger=logger.name):
        common.log_resumed(logger, Path("runs/x"), 3, 6, 2, "jobs")
        common.log_resumed(logger, Path("runs/x"), 6, 6, 0, "runs")
    assert [r.getMessage() for r in caplog.records] == [
        "resumed runs/x: 3 of 6 jobs done; 2 of the 3 left continue from checkpoints",
        "resumed runs/x: 6 of 6 runs done; rewriting the summary and figures",
    ]
