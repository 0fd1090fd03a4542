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
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import random
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FolderLockedError",
    "append_csv",
    "atomic_open",
    "atomic_write_json",
    "atomic_write_text",
    "git_commit",
    "load_checkpoint",
    "lock_file",
    "lock_folder",
    "mean_ci95",
    "read_csv",
    "run_record",
    "save_checkpoint",
    "seed_everything",
    "t_quantile",
    "truncate_csv",
]

_CKPT_MAGIC = b"DCEMCKPT1\n"
_DIGEST_LEN = 64  # hex characters of a SHA-256 digest


class CheckpointError(ValueError):
    """A checkpoint file is missing its header, truncated, corrupted or unreadable."""


class FolderLockedError(RuntimeError):
    """Another process holds the lock of a run folder."""


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

    Returns the number of rows kept. A missing file is left missing (0 rows).
    """
    if not Path(path).exists():
        return 0
    rows = [row for row in read_csv(path) if keep(row)]
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
