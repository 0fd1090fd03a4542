"""A grid of world-model runs from one command: ``dcem sweep dmc`` / ``dcem sweep ppo``.

Each point of the grid and each seed is one ordinary run folder under the sweep's folder,
named by its values (``OUT/latent_dim=8-seed1``), trained by :func:`dcem.experiments.dmc.train`
or :func:`dcem.experiments.ppo.train` in a worker of :func:`common.run_jobs`: a Ray cluster
(local or joined) or this machine's process pool. What a run does is what the same options
would do in ``dcem dmc train``; so is resuming: a finished run (``summary.json``) is skipped,
an interrupted one resumes from its checkpoint, a failed one is reported with the end of its
log (``OUT/logs/NAME.log``) and does not stop the others. ``OUT/sweep.json`` records the
grid: the same command finishes what is missing, another grid in the same folder is refused.
``OUT/results.csv`` has one row per run: its grid values, seed, status and the scalars of
its ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dcem.experiments import common

__all__ = ["Sweep", "results", "run"]

log = logging.getLogger(__name__)
EXPERIMENTS = ("dmc", "ppo")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The runs of a sweep.

    Attributes:
        experiment: ``"dmc"`` (``dcem dmc train``) or ``"ppo"`` (``dcem dmc ppo``).
        base: the config every run starts from (a ``DMCConfig`` or ``PPOConfig``).
        grid: ``(field, values)`` pairs of config fields (underscored names) and their
            values; every combination is a run, for each seed.
        seeds: values of the config's ``seed``.
    """

    experiment: str
    base: Any
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, "
                             f"got {self.experiment!r}")  # fmt: skip
        known = {f.name for f in dataclasses.fields(self.base)}
        names = [k for k, _ in self.grid]
        for key, values in self.grid:
            if key not in known or key == "seed":
                raise ValueError(
                    f"grid: {key!r} is not an option of a {self.experiment} run"
                    + (" (give seeds with --seeds)" if key == "seed" else "")
                )
            if not values:
                raise ValueError(f"grid: {key} has no values")
        if len(set(names)) != len(names):
            raise ValueError(f"grid: an option appears twice in {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {list(self.seeds)}")

    def runs(self) -> list[tuple[str, Any]]:
        """``(name, config)`` of every run; each config is validated when it is made."""
        keys = [k for k, _ in self.grid]
        out = []
        for combo in itertools.product(*(v for _, v in self.grid)):
            for seed in self.seeds:
                values = dict(zip(keys, combo, strict=True))
                cfg = dataclasses.replace(self.base, **values, seed=seed)
                name = "-".join([*(f"{k}={_text(v)}" for k, v in values.items()), f"seed{seed}"])
                out.append((name, cfg))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "base": self.base.to_json(),
                "grid": {k: list(v) for k, v in self.grid}, "seeds": list(self.seeds)}  # fmt: skip


def _text(value: Any) -> str:
    return str(value).replace("/", "_").replace(",", "+")


def run(
    sweep: Sweep, out: Path, *, workers: int = 2, address: str | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run what is missing of ``sweep`` in ``out``; returns the rows of ``results.csv``.

    ``workers``: runs at a time on this machine (the pool's processes, or the CPUs of a
    local Ray cluster). ``address``: ``"local"`` (a Ray cluster on this machine for this
    call), ``"auto"`` or ``"HOST:PORT"`` (join one), ``None`` (the process pool; no Ray).
    """
    out = Path(out).resolve()
    _claim(out, sweep)
    runs = sweep.runs()
    pending = [(sweep.experiment, name, cfg, out) for name, cfg in runs
               if not (out / name / "summary.json").exists()]  # fmt: skip
    done = {name: int((out / name / "summary.json").exists()) for name, _ in runs}
    failed: list[str] = []
    seconds: list[float] = []
    slots = min(workers, len(pending)) or 1

    def finished(result: dict[str, Any]) -> None:
        seconds.append(result["seconds"])
        if result["status"] != "done":
            failed.append(result["name"])
            log.error("run %s failed: %s\nend of %s:\n%s", result["name"], result["error"],
                      result["log"], _tail(Path(result["log"])))  # fmt: skip
        left = len(pending) - len(seconds)
        eta = sum(seconds) / len(seconds) * math.ceil(left / slots)
        log.info("run %s %s in %.0f s; sweep: %d done, %d failed, %d running, %d waiting, "
                 "about %.0f min left", result["name"], result["status"], result["seconds"],
                 len(runs) - len(pending) + len(seconds) - len(failed), len(failed),
                 min(slots, left), max(left - slots, 0), eta / 60)  # fmt: skip

    log.info("sweep %s: %d runs, %d done, %d to run on %s", out, len(runs),
             len(runs) - len(pending), len(pending), _engine(address, workers))  # fmt: skip
    with common.RunProgress(done, len(runs), show_progress, experiment=f"sweep {out.name}",
                            unit="runs done", bar_unit="run", job_noun="runs", logger=log,
                            log_every=0.0) as advance:  # fmt: skip
        common.run_jobs(_run_one, pending, workers, advance, finished, address=address)
    rows = results(out, sweep)
    if failed:
        log.error("%d of %d runs failed (%s); the same command runs them again", len(failed),
                  len(runs), ", ".join(failed))  # fmt: skip
    return rows


def _engine(address: str | None, workers: int) -> str:
    if address is None:
        return f"{workers} local processes"
    return f"a local Ray cluster of {workers} CPUs" if address == "local" else f"Ray at {address}"


def _claim(out: Path, sweep: Sweep) -> None:
    """Record the sweep in ``out/sweep.json``; refuse a folder holding another sweep."""
    path = out / "sweep.json"
    spec = sweep.to_json()
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise common.RunFolderError(f"{path} is unreadable ({err})") from None
        if old != spec:
            diff = common.config_diff(old, spec)
            raise common.RunFolderError(f"{out} holds another sweep ({diff}); choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise common.RunFolderError(f"{out} is not empty and holds no sweep.json; choose "
                                    "another --out")  # fmt: skip
    common.atomic_write_json(path, spec)


def _run_one(
    experiment: str, name: str, cfg: Any, out: Path, *, progress: common.ProgressFn
) -> dict[str, Any]:
    """One run of a sweep (in a worker): trained, or its error caught and logged."""
    import torch

    from dcem.experiments import dmc, ppo

    folder, log_path = out / name, out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        if experiment == "dmc":
            dmc.train(cfg, folder, show_progress=False)
        else:
            ppo.train(cfg, folder, show_progress=False)
        status, error = "done", ""
    except Exception as err:  # a failed run is reported; the others go on
        logging.getLogger(__name__).error("%s", traceback.format_exc())
        status, error = "failed", f"{type(err).__name__}: {err}"
    finally:
        torch.set_num_threads(threads)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    progress(name, 1)
    return {"name": name, "status": status, "error": error, "log": str(log_path),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def results(out: Path, sweep: Sweep) -> list[dict[str, Any]]:
    """The rows of ``out/results.csv`` (written here): per run its name, grid values, seed,
    status (``done``, ``failed`` if its log ends in an error, else ``missing``) and the
    scalar fields of its ``summary.json``."""
    rows, fields = [], ["name", *(k for k, _ in sweep.grid), "seed", "status"]
    for name, cfg in sweep.runs():
        row: dict[str, Any] = {"name": name, **{k: getattr(cfg, k) for k, _ in sweep.grid},
                               "seed": cfg.seed}  # fmt: skip
        summary = out / name / "summary.json"
        if summary.exists():
            data = json.loads(summary.read_text(encoding="utf-8"))
            scalars = {k: v for k, v in data.items()
                       if isinstance(v, int | float | str) and not isinstance(v, bool)}  # fmt: skip
            row.update(status="done", **scalars)
            fields += [k for k in scalars if k not in fields]
        else:
            log_path = out / "logs" / f"{name}.log"
            row["status"] = "failed" if "Traceback" in _tail(log_path, 200) else "missing"
        rows.append(row)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    common.atomic_write_text(out / "results.csv", text.getvalue())
    return rows


def parse_grid(items: Sequence[str], base: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``["latent-dim=2,8", ...]`` as ``(("latent_dim", (2, 8)), ...)``, each value converted
    to the type of that field in ``base`` (a ``ValueError`` names the item otherwise)."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    grid = []
    for item in items:
        key, sep, text = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or not text.strip():
            raise ValueError(f"grid: expected OPTION=V1,V2,..., got {item!r}")
        if name not in fields:
            raise ValueError(f"grid: {key!r} is not an option of this run")
        kind = type(getattr(base, name))
        try:
            values = tuple(_convert(kind, v.strip()) for v in text.split(","))
        except ValueError:
            raise ValueError(f"grid: {key} takes {kind.__name__} values, got {text!r}") from None
        grid.append((name, values))
    return tuple(grid)


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return kind(text)
