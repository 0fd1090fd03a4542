"""Run-folder hygiene shared by every experiment.

- Atomic writes (:func:`atomic_open`, :func:`atomic_write_text`, :func:`atomic_write_json`):
  write a temporary file in the target folder, fsync it, then ``os.replace`` it over the
  target, so a killed process leaves either the old file or the new one, never half of one.
- Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`): nested dicts of tensors and
  plain Python values (``state_dict``s, RNG states), never pickled objects. The file is a short
  header with a SHA-256 of the ``torch.save`` payload, so truncation and bit flips are detected
  before ``torch.load(..., weights_only=True)`` sees the bytes.
- The resolved config record (:func:`run_record`) with the seed(s) and the git commit.
- :func:`seed_everything`, CSV append/read/truncate, a folder lock, and the Student-t 95%
  confidence interval (:func:`mean_ci95`) used for the seed bands in the figures.
- The run machinery of the experiments: :func:`check_out_folder` (refuse a folder holding
  another experiment or config), :func:`run_folder` (create, lock and claim it: take over a
  run that saved no results, or delete an old run with ``overwrite``), :func:`load_summary`
  (a run's summary for its figures), :func:`job_done` / :func:`checkpointed` (what is left to do),
  :func:`job_slot` / :func:`save_job` (one job's lock and checkpoints), :class:`RunProgress`
  (a bar or sparse log lines) and :func:`run_jobs` (in this process or in a pool of spawned
  workers that report progress through a queue; an error or interrupt stops every worker).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FolderLockedError",
    "OVERWRITE_HINT",
    "ProgressFn",
    "RESULT_FILES",
    "RunFolderError",
    "RunProgress",
    "append_csv",
    "atomic_open",
    "atomic_write_json",
    "bootstrap_ci95",
    "atomic_write_text",
    "check_out_folder",
    "checkpointed",
    "config_diff",
    "git_commit",
    "has_results",
    "job_done",
    "job_slot",
    "load_checkpoint",
    "load_summary",
    "lock_file",
    "lock_folder",
    "log_resumed",
    "mean_ci95",
    "read_csv",
    "run_folder",
    "run_jobs",
    "run_record",
    "save_checkpoint",
    "save_job",
    "seed_everything",
    "t_quantile",
    "truncate_csv",
]

log = logging.getLogger(__name__)

_CKPT_MAGIC = b"DCEMCKPT1\n"
_DIGEST_LEN = 64  # hex characters of a SHA-256 digest


class CheckpointError(ValueError):
    """A checkpoint file is missing its header, truncated, corrupted or unreadable."""


class FolderLockedError(RuntimeError):
    """Another process holds the lock of a run folder."""


class RunFolderError(ValueError):
    """The output folder holds something this run must not resume from or overwrite."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8, ``newline=""``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        kwargs: dict[str, Any] = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (no NaN/inf) to ``path`` atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- checkpoints


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Save ``state`` (tensors, numbers, strings, lists and dicts of them) atomically.

    Layout: ``DCEMCKPT1\\n`` + hex SHA-256 of the payload + ``\\n`` + the ``torch.save`` payload.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping, got {type(state).__name__}")
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    with atomic_open(path, "wb") as handle:
        handle.write(_CKPT_MAGIC + digest + b"\n" + payload)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file if the header, the digest or the payload
    is wrong (a truncated or corrupted file), and ``FileNotFoundError`` if it does not exist.
    """
    data = Path(path).read_bytes()
    header_len = len(_CKPT_MAGIC) + _DIGEST_LEN + 1
    if not data.startswith(_CKPT_MAGIC) or len(data) < header_len:
        raise CheckpointError(f"checkpoint {path} has no valid header (not a dcem checkpoint?)")
    digest = data[len(_CKPT_MAGIC) : header_len - 1].decode("ascii", errors="replace")
    payload = data[header_len:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated (SHA-256 mismatch, {len(payload)} "
            "payload bytes)"
        )
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for unreadable payloads
        raise CheckpointError(f"checkpoint {path} could not be loaded: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a dict")
    return state


# --------------------------------------------------------------------------- seeds and records


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch's default generator."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeding the legacy global RNG is the point here
    torch.manual_seed(seed)


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit hash of the git checkout holding ``path`` (default: this package), if any.

    A ``+dirty`` suffix marks uncommitted changes to tracked files.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_record(experiment: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` record of a run: experiment name, resolved config, code version."""
    return {
        "experiment": experiment,
        "config": dict(config),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------- CSV


def append_csv(
    path: str | os.PathLike[str], fieldnames: list[str], rows: Iterable[Mapping[str, Any]]
) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header first if the file is new."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = not target.exists() or target.stat().st_size == 0
    with open(target, "a", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of the CSV at ``path`` as dicts; a final line cut off by a crash is dropped."""
    text = Path(path).read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def truncate_csv(
    path: str | os.PathLike[str], fieldnames: list[str], keep: Callable[[dict[str, str]], bool]
) -> int:
    """Rewrite the CSV at ``path`` atomically with only the rows where ``keep(row)``.

    Returns the number of rows kept. A missing file is left missing (0 rows). A row that
    ``keep`` cannot read (``ValueError``, ``KeyError``, ``TypeError``: a damaged file) raises
    :class:`RunFolderError` naming the file and the row.
    """
    if not Path(path).exists():
        return 0
    rows = []
    for number, row in enumerate(read_csv(path), start=2):  # line 1 is the header
        try:
            kept = keep(row)
        except (ValueError, KeyError, TypeError) as err:
            raise RunFolderError(
                f"{path} line {number} is damaged ({err}); delete the run's folder or rerun "
                "with --overwrite to start over"
            ) from err
        if kept:
            rows.append(row)
    with atomic_open(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


# --------------------------------------------------------------------------- folder lock


@contextlib.contextmanager
def lock_file(path: str | os.PathLike[str], *, blocking: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; released if the process dies).

    With ``blocking=False`` raise :class:`FolderLockedError` at once if another process holds
    it; with ``blocking=True`` wait for it.
    """
    import fcntl  # POSIX only; imported here so the module imports everywhere

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as err:
            raise FolderLockedError(f"{path} is in use by another running process") from err
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def lock_folder(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock ``path/.lock`` of a run folder; :class:`FolderLockedError` if taken."""
    try:
        with lock_file(Path(path) / ".lock"):
            yield
    except FolderLockedError as err:
        raise FolderLockedError(f"{path} is in use by another running process") from err


# --------------------------------------------------------------------------- statistics


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):  # cos, (2/3) cos^3, (2*4)/(3*5) cos^5, ...
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):  # 1, (1/2) cos^2, (1*3)/(2*4) cos^4, ...
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with integer ``df >= 1``, by bisection."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < mass:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < mass else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci95(values: Any, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the Student-t 95% confidence interval along ``axis``.

    ``values``: array-like, e.g. (n_seeds, n_points). The half-width is
    ``t_{0.975, n-1} * std(ddof=1) / sqrt(n)``; with a single value it is NaN.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[axis] == 0:
        raise ValueError(f"values must have a non-empty axis {axis}, got shape {arr.shape}")
    n = arr.shape[axis]
    mean = arr.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    half = t_quantile(0.975, n - 1) * arr.std(axis=axis, ddof=1) / math.sqrt(n)
    return mean, np.asarray(half)


def bootstrap_ci95(
    values: Any, statistic: Callable[..., Any] = np.median, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """``statistic`` of ``values`` (1-D; default the median) and its percentile-bootstrap 95%
    interval ``(lo, hi)``: the 2.5% and 97.5% quantiles of the statistic over ``n_boot``
    resamples with replacement, drawn from a NumPy generator seeded with ``seed`` (the same
    values give the same interval). ``statistic(x, axis=1)`` must reduce each row of ``x``
    (``np.median``, ``np.mean``). With a single value the interval is that value."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {arr.shape}")
    rng = np.random.default_rng(seed)
    stats = statistic(arr[rng.integers(0, arr.size, size=(n_boot, arr.size))], axis=1)
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(statistic(arr)), float(lo), float(hi)


# --------------------------------------------------------------------------- run folders and jobs


def config_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> str:
    """The fields whose values differ, as ``"k: old -> new"`` for up to three of them; ``""``
    if none. A field missing from one side counts as its value in ``defaults`` (if given)."""
    fill = defaults or {}
    diff = sorted(k for k in old.keys() | new.keys()
                  if old.get(k, fill.get(k)) != new.get(k, fill.get(k)))  # fmt: skip
    return ", ".join(f"{k}: {old.get(k, fill.get(k))!r} -> {new.get(k, fill.get(k))!r}"
                     for k in diff[:3])  # fmt: skip


OVERWRITE_HINT = "choose another --out, or add --overwrite to delete it"
"""How to go on from a refused run folder, for experiments whose command has ``--overwrite``."""

RESULT_FILES = ("summary.json", "ckpt/*.pt", "jobs/*.json", "jobs/*.npz")
"""What a run saves as it goes (relative glob patterns): a folder holding none of them can be
taken over by a run of another config (see :func:`run_folder`)."""


def _is_empty(out: Path) -> bool:
    return not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]


def _read_record(out: Path, hint: str) -> dict[str, Any]:
    """``out/config.json`` as a dict naming its experiment; :class:`RunFolderError` if it is
    missing or unreadable (then ``out`` is not known to be a dcem run folder)."""
    path = out / "config.json"
    if not path.is_file():
        raise RunFolderError(f"{out} is not empty and holds no config.json; {hint}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err}); {hint}") from err
    if not (isinstance(record, dict) and isinstance(record.get("experiment"), str)
            and isinstance(record.get("config", {}), dict)):  # fmt: skip
        raise RunFolderError(f"{path} is not a dcem run record; {hint}")
    return record


def has_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run saved as it went (:data:`RESULT_FILES`)."""
    return any(any(out.glob(pattern)) for pattern in RESULT_FILES)


def check_out_folder(
    out: Path, experiment: str, config: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None, *, takeover: bool = False,
    hint: str = "choose another --out",
) -> str:  # fmt: skip
    """Raise :class:`RunFolderError` unless ``out`` is new, empty, or a run of ``experiment``.

    ``config``: the resolved config of this run as JSON values (the config's ``to_json()``);
    a folder whose ``config.json`` records another config is refused, naming up to three of
    the differing fields (see :func:`config_diff`; ``defaults`` stand in for fields an older
    record lacks). A folder holding only its ``.lock`` counts as empty. Refusals end with
    ``hint`` (how to go on). Returns ``"new"`` (missing or empty), ``"resume"`` (the same
    experiment and config) or, with ``takeover``, ``"replace"``: a run of ``experiment`` with
    another config that saved no results yet (:func:`has_results`).
    """
    try:
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"{out} exists and is not a folder; choose another --out")
        if _is_empty(out):
            return "new"
        record = _read_record(out, "choose another --out")
    except OSError as err:
        raise RunFolderError(f"{out} cannot be read ({err}); choose another --out") from err
    if record["experiment"] != experiment:
        raise RunFolderError(
            f"{out} holds results of experiment {record['experiment']!r}, not {experiment!r}; "
            f"{hint}"
        )
    detail = config_diff(record.get("config", {}), config, defaults)
    if not detail:
        return "resume"
    if takeover and not has_results(out):
        return "replace"
    raise RunFolderError(
        f"{out} holds a {experiment} run with a different config ({detail}); {hint}"
    )


def _dcem_run_in(out: Path) -> str | None:
    """The experiment of the dcem run in ``out`` that ``--overwrite`` may delete; ``None`` for a
    new or empty folder. Anything else (a file, a folder without a readable config.json)
    raises :class:`RunFolderError`."""
    hint = "--overwrite deletes only dcem run folders: choose another --out"
    try:
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"{out} exists and is not a folder; {hint}")
        return None if _is_empty(out) else str(_read_record(out, hint)["experiment"])
    except OSError as err:
        raise RunFolderError(f"{out} cannot be read ({err}); choose another --out") from err


def _make_folder(out: Path) -> None:
    """``mkdir -p out``; :class:`RunFolderError` saying why not (e.g. a file on the path)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        base = next((p for p in out.parents if p.exists()), None)
        if base is not None and not base.is_dir():
            why = f"{base} is a file, not a folder"
        else:
            why = f"{err.strerror or err} (in {base})"
        raise RunFolderError(f"cannot create {out}: {why}; choose another --out") from err


def _clear_folder(out: Path) -> None:
    """Delete everything in ``out`` but its ``.lock`` (held by this process)."""
    for entry in out.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def run_folder(
    out: Path, experiment: str, config: Mapping[str, Any], *, overwrite: bool = False,
    logger: logging.Logger = log,
) -> Iterator[bool]:  # fmt: skip
    """Create and lock ``out`` for a run of ``experiment`` with ``config`` (JSON values);
    yields whether it resumes a run of the same config. Checks first, writes nothing if
    they fail:

    - a new or empty folder gets ``config.json`` (:func:`run_record`);
    - a run of the same experiment and config is resumed (a warning if the code changed);
    - a run of the same experiment with another config that saved no results yet (one that
      failed or was stopped before its first checkpoint) is emptied and started over with
      ``config``, with a log line: it must not block the corrected command;
    - with ``overwrite``, any dcem run folder (its ``config.json`` names an experiment) is
      emptied first;
    - anything else raises :class:`RunFolderError` ending with :data:`OVERWRITE_HINT` (or
      why ``overwrite`` does not apply); a folder that cannot be created raises it too, and a
      folder in use by another process :class:`FolderLockedError`.
    """
    out = Path(out)

    def check() -> str | None:
        if overwrite:
            return _dcem_run_in(out)
        state = check_out_folder(out, experiment, config, takeover=True, hint=OVERWRITE_HINT)
        return experiment if state == "replace" else None

    check()
    _make_folder(out)
    with lock_folder(out):
        old = check()  # again, holding the lock
        if old is not None:
            _clear_folder(out)
            if overwrite:
                logger.info("deleted the %s run in %s (--overwrite)", old, out)
            else:
                logger.info(
                    "%s held a %s run of another config that had saved no results; starting "
                    "over with this config", out, experiment,
                )  # fmt: skip
        path = out / "config.json"
        record = run_record(experiment, config)
        resumed = path.is_file()
        if not resumed:
            atomic_write_json(path, record)
        else:
            started = json.loads(path.read_text(encoding="utf-8")).get("git_commit")
            if started != record["git_commit"]:
                logger.warning(
                    "%s was started at commit %s; continuing with code at %s",
                    out, started, record["git_commit"],
                )  # fmt: skip
        yield resumed


def log_resumed(
    logger: logging.Logger, out: Path, done: int, total: int, from_checkpoint: int, noun: str
) -> None:
    """One line for a resumed run: ``resumed OUT: 3 of 6 jobs done; 2 of the 3 left continue
    from checkpoints`` (``noun``: what the run is made of, e.g. ``"jobs"``)."""
    left = total - done
    if left == 0:
        tail = "; rewriting the summary and figures"
    else:
        tail = f"; {from_checkpoint} of the {left} left continue from checkpoints"
    logger.info("resumed %s: %d of %d %s done%s", out, done, total, noun, tail)


def load_summary(out: Path, experiment: str) -> dict[str, Any]:
    """The ``summary.json`` of the ``experiment`` run in ``out``, to draw its figures from.

    :class:`RunFolderError` if it is missing or unreadable, or if ``out`` holds a run of
    another experiment (naming it, and for a regression or cartpole run the command that
    draws its figures).
    """
    path = Path(out) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{out} has no summary.json to plot from; run the experiment "
                             "there first") from None  # fmt: skip
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err}); rerun the command that made it "
                             "to rewrite it") from err  # fmt: skip
    if not isinstance(summary, dict):
        raise RunFolderError(f"{path} is not a run summary; rerun the command that made it "
                             "to rewrite it")  # fmt: skip
    kind = summary.get("experiment")
    if kind is None:  # e.g. a dmc summary: its config.json names the experiment
        with contextlib.suppress(RunFolderError, OSError):
            kind = _read_record(Path(out), "")["experiment"]
    if kind != experiment:
        redraw = f"; draw it with: dcem {kind} --plot-only --out {out}"
        raise RunFolderError(
            f"{out} holds a {kind or 'non-dcem'} run, not a {experiment} run"
            + (redraw if kind in ("regression", "cartpole") else "")
        )
    return summary


def job_done(out: Path, key: str, is_result: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether job ``key`` has finished: ``jobs/{key}.json`` and ``jobs/{key}.npz`` exist and
    ``is_result`` accepts the JSON (an unreadable file or a ``KeyError`` in it counts as no)."""
    path = out / "jobs" / f"{key}.json"
    if not (path.is_file() and (out / "jobs" / f"{key}.npz").is_file()):
        return False
    try:
        return bool(is_result(json.loads(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError, KeyError):
        return False


def checkpointed(out: Path, key: str, counter: str) -> int:
    """The ``counter`` (e.g. ``"update"``) saved in ``ckpt/{key}.pt``; 0 without a checkpoint."""
    path = out / "ckpt" / f"{key}.pt"
    return int(load_checkpoint(path)[counter]) if path.exists() else 0


@contextlib.contextmanager
def job_slot(out: Path, key: str) -> Iterator[None]:
    """Run the body of job ``key`` with one torch thread, holding ``ckpt/{key}.lock``.

    The lock is waited for: a worker orphaned by a killed run holds it until it notices, at
    its next progress report (see :func:`run_jobs`), and exits. The previous torch thread
    count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with lock_file(out / "ckpt" / f"{key}.lock", blocking=True):
            yield
    finally:
        torch.set_num_threads(threads)


def save_job(
    out: Path, key: str, fields: list[str], rows: list[dict[str, Any]], state: Mapping[str, Any]
) -> None:
    """Checkpoint job ``key``: append its metric ``rows`` since the last checkpoint to
    ``jobs/{key}.csv`` and empty the list, then save ``state`` atomically to ``ckpt/{key}.pt``."""
    append_csv(out / "jobs" / f"{key}.csv", fields, rows)
    rows.clear()
    save_checkpoint(out / "ckpt" / f"{key}.pt", state)


ProgressFn = Callable[[str, int], None]
"""Called as ``progress(job_key, units_done)`` while a job trains."""


class RunProgress:
    """Progress over all jobs of a run: one tqdm bar on a terminal, else a log line every
    ``log_every`` seconds (``"{experiment}: {done} / {total} {unit}"`` on ``logger``).

    ``done``: units each pending job already has (from its checkpoint); ``total``: units of all
    of them; ``show=False`` shows and logs nothing. Call it as ``progress(key, units_done)``.
    ``bar_unit`` and ``job_noun`` label the bar (``"upd"``, ``"jobs"``).
    """

    def __init__(
        self, done: dict[str, int], total: int, show: bool, *, experiment: str, unit: str,
        bar_unit: str, job_noun: str, logger: logging.Logger, log_every: float = 60.0,
    ) -> None:  # fmt: skip
        from tqdm.auto import tqdm

        self.done, self.total, self.log_every = done, total, log_every
        self.experiment, self.unit, self.logger = experiment, unit, logger
        self.bar = tqdm(
            total=total, initial=sum(done.values()), unit=bar_unit,
            disable=None if show else True,  # None: disabled when stderr is not a terminal
            desc=f"{experiment} ({len(done)} {job_noun})", dynamic_ncols=True,
        )  # fmt: skip
        self.log_now = show and self.bar.disable
        self.last_log = time.monotonic()

    def __call__(self, key: str, units: int) -> None:
        self.bar.update(units - self.done[key])
        self.done[key] = units
        if self.log_now and time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            finished = sum(self.done.values())
            self.logger.info("%s: %d / %d %s", self.experiment, finished, self.total, self.unit)

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def run_jobs(
    job: Callable[..., dict[str, Any]], pending: Sequence[tuple[Any, ...]], workers: int,
    progress: ProgressFn, on_result: Callable[[dict[str, Any]], None], *,
    address: str | None = None,
) -> None:  # fmt: skip
    """Call ``job(*args, progress=...)`` for every ``args`` of ``pending``, in this process
    (``workers == 1``), in ``min(workers, len(pending))`` spawned worker processes, or as
    tasks of a Ray cluster (``address``).

    ``job`` must be picklable (a module-level function or a ``functools.partial`` of one).
    Workers report progress through a queue that this process feeds to ``progress``; a worker
    whose parent died exits at its next report. ``on_result`` gets each job's return value
    as it finishes. An error or interrupt (``KeyboardInterrupt``, e.g. from SIGINT, or what a
    SIGTERM handler raises) cancels the jobs not yet started, ends every worker process
    (their jobs resume from their checkpoints) and is re-raised. Workers ignore SIGINT: a
    Ctrl-C, which a terminal sends to all of them, is this process's to handle.

    ``address``: ``"local"`` starts a Ray cluster on this machine with ``workers`` CPUs for
    the call; ``"auto"`` or ``"HOST:PORT"`` joins a running one (``ray start --head``), whose
    nodes must see the same run folders (paths in ``pending`` should be absolute). Each job
    takes one CPU; Ray runs a job again if its worker process or node dies, and the job
    resumes from its checkpoints. Needs the ``ray`` package (``pip install 'dcem[ray]'``).
    """
    if not pending:
        return
    if address is not None:
        _run_ray(job, pending, workers, progress, on_result, address)
    elif workers == 1:
        for args in pending:
            on_result(job(*args, progress=progress))
    else:
        _run_pool(job, pending, min(workers, len(pending)), progress, on_result)


def ray_module() -> Any:
    """The ``ray`` package; an ``ImportError`` saying how to install it if it is missing."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the Ray engine needs the ray package: pip install 'dcem[ray]'") from err
    return ray


@contextlib.contextmanager
def ray_cluster(address: str, workers: int) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address`` for the body (``"local"``: start one with
    ``workers`` CPUs on this machine, stopped afterwards); yields the ``ray`` module. Joins a
    connection this process already has."""
    ray = ray_module()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "configure_logging": False}  # fmt: skip
    if address == "local":
        ray.init(num_cpus=workers, **options)
    else:
        ray.init(address=address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_task(job: Callable[..., dict[str, Any]], args: tuple[Any, ...], reports: Any) -> Any:
    """One job in a Ray worker: progress goes to the driver through the ``reports`` queue.

    Sent without waiting for the queue's answer: a task that blocks on ``ray.get`` lends its
    CPU back to the cluster, which then starts another task beside it (more than
    ``workers`` at a time)."""
    return job(*args, progress=lambda key, units: reports.actor.put_nowait.remote((key, units)))


def _run_ray(
    job: Callable[..., dict[str, Any]], pending: Sequence[tuple[Any, ...]], workers: int,
    progress: ProgressFn, on_result: Callable[[dict[str, Any]], None], address: str,
) -> None:  # fmt: skip
    with ray_cluster(address, workers) as ray:
        from ray.util.queue import Empty, Queue

        reports = Queue()
        # Ray starts task workers at niceness 15, so that on a busy machine (our training runs
        # beside the sweep) they get a fraction of a core; its own job supervisor sets this
        # variable to 0 for the same reason.
        normal = {"env_vars": {"RAY_worker_niceness": "0"}}
        task = ray.remote(num_cpus=1, max_retries=3, runtime_env=normal)(_ray_task)
        running = [task.remote(job, args, reports) for args in pending]

        def drain() -> None:
            with contextlib.suppress(Empty):
                for key, units in reports.get_nowait_batch(reports.qsize()):
                    progress(key, units)

        try:
            while running:
                ready, running = ray.wait(running, num_returns=1, timeout=0.2)
                drain()
                for ref in ready:
                    on_result(ray.get(ref))
            drain()
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(reports.actor)


# Worker-process side of the pool: the progress queue and the parent's pid, set by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(progress_queue: Any, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers on Ctrl-C
    _WORKER.update(queue=progress_queue, parent=parent_pid)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int, every: float = 1.0) -> None:
    """End this worker within ``every`` seconds of its parent's death (e.g. SIGKILL), also in
    a job that reports no progress for a long time: its run would go on holding the run
    folder's lock. Checkpoints are written atomically, so ending abruptly loses no file."""
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(1)


def _worker_progress(key: str, units: int) -> None:
    if os.getppid() != _WORKER["parent"]:  # the parent died (e.g. SIGKILL): stop, don't race
        os._exit(1)
    _WORKER["queue"].put((key, units))


def _worker_job(job: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> dict[str, Any]:
    return job(*args, progress=_worker_progress)


def _run_pool(
    job: Callable[..., dict[str, Any]], pending: Sequence[tuple[Any, ...]], workers: int,
    progress: ProgressFn, on_result: Callable[[dict[str, Any]], None],
) -> None:  # fmt: skip
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    pool = cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue, os.getpid())
    )
    try:
        with _environ(OPENBLAS_NUM_THREADS="1"), _spawning():  # the workers start in `submit`
            futures = {pool.submit(_worker_job, job, args) for args in pending}
        while futures:
            _drain(progress_queue, progress, timeout=0.2)
            finished = {f for f in futures if f.done()}
            for future in finished:
                on_result(future.result())
            futures -= finished
        _drain(progress_queue, progress, timeout=0.0)
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress_queue.close()


def _stop_workers(pool: cf.ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Cancel the jobs not started and end the worker processes: SIGTERM, then SIGKILL for
    any still alive after ``grace`` seconds. (Python 3.14 has ``pool.terminate_workers``.)"""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops it
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive():
                process.kill()
                process.join()


@contextlib.contextmanager
def _spawning() -> Iterator[None]:
    """The body starts worker processes (main thread only): SIGINT is ignored, which they
    inherit (and Python keeps), so that a Ctrl-C while one still imports prints no traceback
    there; SIGTERM is held until the body ends, so that no worker is started without being
    entered in the pool's table of processes (which :func:`_stop_workers` ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum)),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])  # now for the handler that was there before


@contextlib.contextmanager
def _environ(**defaults: str) -> Iterator[None]:
    """Set environment variables the user has not set, for the body only. The workers run
    one thread each: NumPy's OpenBLAS would otherwise start a thread per core in each."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _drain(progress_queue: Any, progress: ProgressFn, timeout: float) -> None:
    """Feed the queued ``(key, units)`` reports to ``progress``, waiting ``timeout`` s for one."""
    try:
        progress(*progress_queue.get(timeout=timeout) if timeout else progress_queue.get_nowait())
        while True:
            progress(*progress_queue.get_nowait())
    except queue.Empty:
        pass
