"""The ``dcem`` command: parses options and calls the experiments.

    dcem regression [--quick] [--out DIR] [--methods gd,dcem] [--seeds 0,1,2] [--updates N]
                    [--no-compile] [--workers N] [--overwrite] [--plot-only]
    dcem cartpole [--quick | --grid] [--out DIR] [--latent-dims 2,8,16] [--taus 1,0.1,0]
                  [--seeds 0,1,2] [--updates N] [--horizon H] [--workers N] [--overwrite]
                  [--plot-only]
    dcem dmc train [--quick] [--out DIR] [--task cheetah-run] [--planner cem] [--CONFIG-FIELD V]
    dcem dmc eval RUN_DIR [RUN_DIR ...] [--episodes N] [--planner cem,latent] [--video]
                  [--candidates N --elites K --iterations T] [--plot PATH]

Each subcommand is one entry of ``_COMMANDS``: a function adding its options to a subparser
and a function running it, which imports what it needs (building the parser imports neither
torch nor an experiment: ``dcem --help`` is fast). Bad option values exit with status 2 and a
one-line message naming the option (``parser.error``), before anything is written; so do run
folders that cannot be used and damaged checkpoints, with a hint how to go on. SIGINT and
SIGTERM stop the run and its workers with one line; the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

log = logging.getLogger("dcem")


# --------------------------------------------------------------------------- option types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated non-negative integers like 0,1,2, got {text!r}"
        ) from None
    if any(s < 0 or s >= 2**32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"must be distinct integers in [0, 2**32) like 0,1,2, got {text!r}"
        )
    return seeds


def _choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(","))
        unknown = [v for v in values if v not in choices]
        if unknown or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(
                f"must be distinct values from {','.join(choices)}, got {text!r}"
            )
        return values

    parse.__name__ = "list"
    return parse


# --------------------------------------------------------------------------- regression

# The parser shows these defaults without importing the experiment (and torch); a test checks
# them against RegressionConfig and CartpoleConfig.
_REGRESSION_METHODS = ("gd", "dcem")
_REGRESSION_DEFAULTS = {"n_updates": 60_000, "eval_every": 100, "checkpoint_every": 3_000}


def _add_regression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (resumed if it holds an unfinished "
        "run of the same config; default: runs/regression, runs/regression-quick with --quick)"
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="tiny budget exercising every step (2 seeds, 300 "
        "updates, ablation at 1,5,10,15,20); options given explicitly still apply"
    )  # fmt: skip
    parser.add_argument(
        "--methods", type=_choice_list(_REGRESSION_METHODS), help="inner optimizers "
        f"(default: {','.join(_REGRESSION_METHODS)})"
    )  # fmt: skip
    parser.add_argument("--seeds", type=_seed_list, help="seeds, e.g. 0,1,2 (default: 0,1,2)")
    defaults = _REGRESSION_DEFAULTS
    parser.add_argument(
        "--updates", type=_positive_int,
        help=f"Adam updates per job ({defaults['n_updates']})",
    )  # fmt: skip
    parser.add_argument(
        "--eval-every", type=_positive_int,
        help=f"updates between full-data MSE logs ({defaults['eval_every']})",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-every", type=_positive_int,
        help=f"updates between checkpoints ({defaults['checkpoint_every']})",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="run DCEM's iterations compiled (torch.compile: tens of seconds per worker, then "
        "faster updates; unrolled GD always runs eagerly) (default: on; off with --quick)",
    )  # fmt: skip
    _add_run_options(parser, "job")


def _add_run_options(parser: argparse.ArgumentParser, job: str) -> None:
    """--workers, --overwrite and --plot-only, shared by regression and cartpole."""
    parser.add_argument(
        "--workers", type=_positive_int, default=2, help=f"parallel {job} processes (default: 2)"
    )
    parser.add_argument(
        "--address", default=None, metavar="local|auto|HOST:PORT", help=f"run the {job}s on "
        "a Ray cluster: local (started here with --workers CPUs), auto or HOST:PORT (join a "
        "running one); needs pip install 'dcem[ray]' (default: local processes, no Ray)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the dcem run in --out first (a "
        "folder whose config.json names a dcem experiment; others are refused)"
    )  # fmt: skip
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the figures of --out from its result "
        "files; runs nothing"
    )  # fmt: skip


def _regression_config(args: argparse.Namespace) -> Any:
    from dcem.experiments import regression

    given = {
        "methods": args.methods,
        "seeds": args.seeds,
        "n_updates": args.updates,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
        "compile": args.compile,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.quick:
        return regression.RegressionConfig.quick(**overrides)
    return dataclasses.replace(regression.RegressionConfig(), **overrides)


def _regression_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path("runs/regression" + ("-quick" if args.quick else ""))


def _run_regression(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dcem.experiments import regression

    out = _regression_out(args)
    if args.plot_only:
        return _plot_only(regression.plot, out, args, parser)
    try:
        cfg = _regression_config(args)
    except ValueError as err:
        parser.error(f"invalid options: {err}")
    if cfg.eval_every > cfg.n_updates:
        log.warning(
            "--eval-every %d > --updates %d: no train MSE will be logged (no convergence.png)",
            cfg.eval_every, cfg.n_updates,
        )  # fmt: skip
    with _run_errors(parser):
        summary = regression.run(cfg, out, workers=args.workers, overwrite=args.overwrite,
                                 address=args.address)  # fmt: skip
    for method in cfg.methods:
        log.info(
            "%s: final train MSE %.3g (mean over %d seeds), %.2f ms/update",
            method, summary["final_mse"][method] or float("nan"), len(cfg.seeds),
            summary["ms_per_update"][method],
        )  # fmt: skip
    log.info("results in %s", out)
    return 0


def _plot_only(
    plot: Callable[[Path], list[Path]], out: Path, args: argparse.Namespace,
    parser: argparse.ArgumentParser,
) -> int:  # fmt: skip
    """``--plot-only``: redraw the figures of ``out``; a folder without them exits 2."""
    from dcem.experiments import common

    if args.overwrite:
        parser.error("argument --overwrite: not allowed with --plot-only (which runs nothing)")
    try:
        paths = plot(out)
    except common.RunFolderError as err:
        parser.error(f"argument --plot-only: {err}")
    for path in paths:
        log.info("wrote %s", path)
    return 0


@contextlib.contextmanager
def _run_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn the run-folder problems of a run into one line and exit status 2: a folder that
    cannot be used (naming how to go on), one in use, a damaged checkpoint."""
    from dcem.experiments import common

    try:
        yield
    except common.CheckpointError as err:
        parser.error(
            f"argument --out: {err}; delete that file to redo its job from the start, or rerun "
            "with --overwrite to start the whole run over"
        )
    except (common.RunFolderError, common.FolderLockedError) as err:
        parser.error(f"argument --out: {err}")


# --------------------------------------------------------------------------- cartpole

_CARTPOLE_DEFAULTS = {"n_iter": 10_000, "horizon": 20}
_MIN_TAU = 1e-4  # cartpole.MIN_TAU


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers like 2,8,16, got {text!r}"
        ) from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be distinct positive integers like 2,8,16, got {text!r}"
        )
    return values


def _tau_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated numbers >= 0 like 1,0.1,0 (0: latent CEM), got {text!r}"
        ) from None
    ok = all(0 <= v < float("inf") for v in values)  # also rejects nan
    if not ok or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be distinct finite numbers >= 0 like 1,0.1,0 (0: latent CEM), got {text!r}"
        )
    if any(0 < v < _MIN_TAU for v in values):
        raise argparse.ArgumentTypeError(
            f"must be 0 (latent CEM) or >= {_MIN_TAU:g}: smaller temperatures overflow the "
            f"float32 gradients through DCEM, got {text!r}"
        )
    return values


def _add_cartpole(parser: argparse.ArgumentParser) -> None:
    default = _CARTPOLE_DEFAULTS
    parser.add_argument(
        "--out", type=Path, help="run folder (resumed if it holds an unfinished run of the same "
        "config; default: runs/cartpole, runs/cartpole-grid with --grid, runs/cartpole-quick "
        "with --quick)"
    )  # fmt: skip
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--quick", action="store_true", help="tiny budget exercising every step (d 2, tau 1 and "
        "0, 2 seeds, 60 updates, 20 validation states); explicit options still apply"
    )  # fmt: skip
    budget.add_argument(
        "--grid", action="store_true", help="the paper's grid: --latent-dims 2,8,16 --taus "
        "1,0.1,0; explicit options still apply"
    )  # fmt: skip
    parser.add_argument(
        "--latent-dims", type=_positive_int_list, help="latent dimensions (default: 2)"
    )
    parser.add_argument(
        "--taus", type=_tau_list, help="DCEM temperatures, 0 for latent CEM (default: 1)"
    )
    parser.add_argument("--seeds", type=_seed_list, help="seeds, e.g. 0,1,2 (default: 0,1,2)")
    parser.add_argument(
        "--updates", type=_positive_int,
        help=f"decoder updates (training iterations) per run ({default['n_iter']})",
    )  # fmt: skip
    parser.add_argument(  # the old name of --updates, kept for old command lines
        "--iterations", type=_positive_int, dest="iterations", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--horizon", type=_positive_int, help=f"planning horizon H ({default['horizon']})"
    )
    parser.add_argument(
        "--compile", action="store_true", help="run the training and validation solves as "
        "torch.compile graphs: a compile of a minute or two per job process, then faster "
        "updates; not part of the config (a run resumes with or without it)"
    )  # fmt: skip
    _add_run_options(parser, "run")


def _cartpole_config(args: argparse.Namespace) -> Any:
    from dcem.experiments import cartpole

    given = {
        "latent_dims": args.latent_dims,
        "taus": args.taus,
        "seeds": args.seeds,
        "n_iter": args.updates if args.updates is not None else args.iterations,
        "horizon": args.horizon,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.quick:
        return cartpole.CartpoleConfig.quick(**overrides)
    if args.grid:
        return cartpole.CartpoleConfig.grid(**overrides)
    return cartpole.CartpoleConfig(**overrides)


def _cartpole_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path("runs/cartpole" + ("-quick" if args.quick else "-grid" if args.grid else ""))


def _run_cartpole(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dcem.experiments import cartpole

    out = _cartpole_out(args)
    if args.plot_only:
        return _plot_only(cartpole.plot, out, args, parser)
    if args.iterations is not None:
        if args.updates is not None:
            parser.error("argument --iterations: the old name of --updates; give only --updates")
        log.warning("--iterations is deprecated: it is now called --updates")
    try:
        cfg = _cartpole_config(args)
    except ValueError as err:
        parser.error(f"invalid options: {err}")
    with _run_errors(parser):
        summary = cartpole.run(cfg, out, workers=args.workers, overwrite=args.overwrite,
                               address=args.address, compile=args.compile)  # fmt: skip
    log.info("expert reward %.3f (mean over the validation set)", summary["expert_reward"])
    for group in summary["improvement_factor"]:
        log.info(
            "latent dim %d, tau %g: improvement factor %.3f on held-out states against CEM "
            "1000/100/30 (headline); paper's form %.3f (best validation against CEM "
            "1000/100/10); mean over %d seeds",
            group["latent_dim"], group["tau"], group["headline_mean"], group["mean"],
            len(cfg.seeds),
        )  # fmt: skip
    log.info("results in %s", out)
    return 0


# --------------------------------------------------------------------------- dmc


def _add_config_options(
    parser: argparse.ArgumentParser, config: type, choices: dict[str, Sequence[str]]
) -> None:
    """An option per field of the dataclass ``config`` (``--field-name``, its type, its help
    and default); None where not given, so that the config's defaults apply."""
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"] + f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)  # fmt: skip
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=None, choices=choices.get(f.name),
                            metavar=f.name.upper() if f.name not in choices else None,
                            help=text)  # fmt: skip


def _add_dmc(parser: argparse.ArgumentParser) -> None:
    from dcem.experiments import dmc_config as dmc  # the options alone: no torch import

    sub = parser.add_subparsers(dest="dmc_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="train a world model and planner (Algorithm 3)")
    train.add_argument("--out", type=Path, default=None, help="run folder (resumed if it holds "
                       "an unfinished run of the same config; default: runs/dmc/TASK-PLANNER-"
                       "seedN[-quick])")  # fmt: skip
    train.add_argument("--quick", action="store_true", help="tiny sizes and budget exercising "
                       "every step (the smoke test)")  # fmt: skip
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch threads (default: torch's, one per core)")  # fmt: skip
    train.add_argument("--tensorboard", action="store_true", help="also log every metrics.csv "
                       "row to OUT/tensorboard (needs the tensorboard package)")  # fmt: skip
    train.add_argument("--verbose", action="store_true", help="show dm_control's and "
                       "MuJoCo's own log lines")  # fmt: skip
    choices = {"task": sorted(dmc.TASKS), "planner": dmc.PLANNERS,
               "dcem_backward": dmc.BACKWARDS,
               "decoder_pretrain_data": dmc.PRETRAIN_DATA}  # fmt: skip
    _add_config_options(train, dmc.DMCConfig, choices)
    from dcem.experiments import ppo_config

    ppo = sub.add_parser("ppo", help="PPO into a phase-2 run's latent-DCEM controller (phase 3)")
    ppo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (resumed if it holds an "
        "unfinished run of the same config; default: runs/ppo/PHASE2-seedN[-quick])",
    )
    ppo.add_argument("--quick", action="store_true", help="tiny budget exercising every step")
    ppo.add_argument("--threads", type=_positive_int, default=None,
                     help="torch threads (default: torch's, one per core)")  # fmt: skip
    _add_config_options(ppo, ppo_config.PPOConfig, {"dcem_backward": dmc.BACKWARDS})
    evaluate = sub.add_parser("eval", help="evaluate a run's latest checkpoint; returns to JSON")
    evaluate.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folder(s)")
    evaluate.add_argument("--episodes", type=_positive_int, default=10, help="evaluation "
                          "episodes per run (default: %(default)s)")  # fmt: skip
    evaluate.add_argument("--planner", type=_choice_list(dmc.PLANNERS), default=None,
                          help="planner(s) to act with, e.g. cem,latent (default: the run's "
                          "own)")  # fmt: skip
    for flag, what in (("--plan-samples", "candidates per iteration"),
                       ("--plan-elites", "elites per iteration"),
                       ("--plan-iter", "iterations per decision")):  # fmt: skip
        evaluate.add_argument(flag, type=_positive_int, default=None, help=f"planner {what} "
                              "(CEM or latent DCEM; default: the run's)")  # fmt: skip
    evaluate.add_argument("--plot", type=Path, default=None, help="also draw a box plot of "
                          "every record in the runs' eval/ folders (paper fig. 4)")  # fmt: skip
    evaluate.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    evaluate.add_argument("--video", action="store_true", help="also render eval-PLANNER.gif")
    evaluate.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes that share the episodes, one torch thread each (default: 1)",
    )
    evaluate.add_argument("--address", default=None, metavar="local|auto|HOST:PORT",
                          help="run those processes on a Ray cluster: local (started here), "
                          "auto or HOST:PORT (join one) (default: no Ray)")  # fmt: skip
    diag = sub.add_parser("diagnose", help="is the world model good enough to plan with? R² "
                          "of reconstruction and rewards, open-loop rewards, return ranking "
                          "(JSON and figure in RUN_DIR/diagnose)")  # fmt: skip
    diag.add_argument("run", type=Path, metavar="RUN_DIR", help="run folder")
    diag.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the "
                      "run's latest; RUN_DIR/ckpt/envNNNNNNN.pt: at its evaluations)")  # fmt: skip
    diag.add_argument(
        "--episodes",
        type=_positive_int,
        default=2,
        help="held-out episodes to collect (default: %(default)s)",
    )
    diag.add_argument(
        "--states",
        type=_positive_int,
        default=8,
        help="start states for the return tests (default: %(default)s)",
    )
    diag.add_argument(
        "--sequences",
        type=_positive_int,
        default=50,
        help="random action sequences per state (default: %(default)s)",
    )
    diag.add_argument("--policy", choices=("planner", "random"), default="planner",
                      help="how the held-out episodes act (default: %(default)s, with the "
                      "run's exploration noise)")  # fmt: skip
    diag.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    diag.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _config(args: argparse.Namespace, cls: Any, quick: dict[str, Any]) -> Any:
    """``cls`` (a config dataclass) from the options given, over ``quick`` with --quick."""
    values: dict[str, Any] = dict(quick) if args.quick else {}
    for f in dataclasses.fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _dmc_config(args: argparse.Namespace) -> Any:
    from dcem.experiments import dmc_config as dmc

    return _config(args, dmc.DMCConfig, dmc.QUICK)


def _ppo_config(args: argparse.Namespace) -> Any:
    from dcem.experiments import ppo_config

    return _config(args, ppo_config.PPOConfig, ppo_config.QUICK)


def _choose_gl_backend() -> None:
    """Set ``MUJOCO_GL`` for offscreen rendering when the user has not: EGL, else OSMesa.

    Must run before ``dm_control`` is first imported. Without either library it stays unset
    and the video is skipped with one log line.
    """
    import ctypes.util
    import os

    if "MUJOCO_GL" in os.environ:
        return
    for backend, library in (("egl", "EGL"), ("osmesa", "OSMesa")):
        if ctypes.util.find_library(library):
            os.environ["MUJOCO_GL"] = backend
            return


def _run_dmc(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    _choose_gl_backend()
    if not getattr(args, "verbose", False):  # dm_control's and PyOpenGL's chatter
        for name in ("absl", "OpenGL"):
            logging.getLogger(name).setLevel(logging.ERROR)
    device = getattr(args, "device", None)
    if device is not None:
        from dcem.experiments.dmc_config import check_device

        try:
            check_device(device)
        except ValueError as err:
            parser.error(f"argument --device: {err}")

    from dcem.experiments import common, dmc

    if args.dmc_command == "diagnose":
        from dcem.experiments import diagnose

        try:
            record = diagnose.diagnose(
                args.run, ckpt=args.ckpt, episodes=args.episodes, states=args.states,
                sequences=max(2, args.sequences), policy=args.policy, seed=args.seed,
                device=args.device,
            )  # fmt: skip
        except (dmc.RunFolderError, common.CheckpointError, ValueError) as err:
            parser.error(f"argument RUN_DIR: {err}")
        print(json.dumps({k: v for k, v in record.items() if k != "rank_correlation_per_state"},
                         indent=1))  # fmt: skip
        return 0
    if args.dmc_command == "eval":
        sizes = (args.plan_samples, args.plan_elites, args.plan_iter)
        if any(v is not None for v in sizes) and None in sizes:
            parser.error("arguments --plan-samples, --plan-elites, --plan-iter: give all three "
                         "or none")  # fmt: skip
        import torch

        from dcem.experiments import ppo

        torch.set_num_threads(1)  # one thread per worker, this process's included
        records: list[dict[str, Any]] = []
        for run in args.runs:
            if ppo.is_run(run):  # the PPO-tuned controller: figure 4's third row
                if args.planner is not None or None not in sizes:
                    parser.error(f"arguments --planner, --plan-*: {run} is a PPO run, which "
                                 "acts with its own latent-DCEM controller")  # fmt: skip
                try:
                    record = ppo.evaluate_run(
                        run, episodes=args.episodes, device=args.device, workers=args.workers,
                        address=args.address,
                    )  # fmt: skip
                except (dmc.RunFolderError, common.CheckpointError, ValueError) as err:
                    parser.error(f"argument RUN_DIR: {err}")
                records.append(record)
                continue
            for planner in args.planner or (None,):
                try:
                    record = dmc.evaluate(
                        run, episodes=args.episodes, planner=planner, device=args.device,
                        video=args.video, sizes=None if None in sizes else sizes,
                        workers=args.workers, address=args.address,
                    )  # fmt: skip
                except (dmc.RunFolderError, common.CheckpointError, ValueError) as err:
                    parser.error(f"argument RUN_DIR: {err}")
                records.append(record)
        for record in records:
            log.info("%s %s (%d trajectories per decision): mean return %.1f, median %.1f "
                     "(95%% CI %.1f to %.1f) over %d episodes", record["run"], record["planner"],
                     record["trajectories_per_decision"], record["mean"], record["median"],
                     *record["median_ci95"], record["episodes"])  # fmt: skip
        if args.plot is not None:
            log.info("wrote %s", dmc.plot_eval(dmc.eval_records(args.runs), args.plot))
        print(json.dumps(records if len(records) > 1 else records[0], indent=2))
        return 0
    if args.dmc_command == "ppo":
        return _run_ppo(args, parser)
    try:
        cfg = _dmc_config(args)
    except ValueError as err:
        parser.error(f"invalid options: {err}")
    out = args.out or Path(
        f"runs/dmc/{cfg.task}-{cfg.planner}-seed{cfg.seed}" + ("-quick" if args.quick else "")
    )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            parser.error("argument --tensorboard: the tensorboard package is not installed "
                         "(pip install tensorboard)")  # fmt: skip
    try:
        summary = dmc.train(cfg, out, tensorboard=args.tensorboard)
    except (dmc.RunFolderError, common.FolderLockedError, common.CheckpointError) as err:
        where = "--init-from" if str(err).startswith("init_from") else "--out"
        parser.error(f"argument {where}: {err}")
    except OSError as err:
        parser.error(f"argument --out: cannot write the run folder {out}: {err}")
    log.info(
        "final evaluation return %s after %d env steps (%.0f s); results in %s",
        summary["final_eval_return"], summary["env_steps"], summary["wall_seconds"], out,
    )  # fmt: skip
    return 0


def _run_ppo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dcem.experiments import common, ppo

    try:
        cfg = _ppo_config(args)
    except ValueError as err:
        parser.error(f"invalid options: {err}")
    name = Path(cfg.init_from).name or "run"
    out = args.out or Path(f"runs/ppo/{name}-seed{cfg.seed}" + ("-quick" if args.quick else ""))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        summary = ppo.train(cfg, out)
    except (common.RunFolderError, common.FolderLockedError, common.CheckpointError,
            ValueError) as err:  # fmt: skip
        where = "--init-from" if str(err).startswith("init_from") else "--out"
        parser.error(f"argument {where}: {err}")
    except OSError as err:
        parser.error(f"argument --out: cannot write the run folder {out}: {err}")
    log.info("evaluation return %.1f before PPO, %.1f after %d PPO steps; results in %s",
             summary["eval_return_before"], summary["eval_return_after"], summary["ppo_steps"],
             out)  # fmt: skip
    return 0


# --------------------------------------------------------------------------- sweep

_SWEEP_LISTS = {"cartpole": ("latent-dims", "taus"), "regression": ("methods",)}


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=("dmc", "ppo", "cartpole", "regression"),
                        help="dmc: runs of dcem dmc train, one folder each; ppo: of dcem dmc "
                        "ppo; cartpole, regression: that experiment's own grid in one folder, "
                        "its jobs on the same engine")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (the same "
                        "command resumes it: finished runs are skipped)")  # fmt: skip
    parser.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                        help="an option and its values, e.g. latent-dim=2,8 (repeat for more "
                        "options; every combination runs); cartpole: latent-dims, taus; "
                        "regression: methods")  # fmt: skip
    parser.add_argument("--seeds", type=_seed_list, default=(0,), help="seeds (default: 0)")
    parser.add_argument("--workers", type=_positive_int, default=2,
                        help="runs at a time on this machine (default: 2)")  # fmt: skip
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="join a running Ray cluster (ray start --head) instead of "
                        "starting one here")  # fmt: skip
    parser.add_argument("--no-ray", action="store_true", help="run on this machine's process "
                        "pool without Ray (the default when ray is not installed)")  # fmt: skip
    parser.set_defaults(options=[])  # what follows "--" on the command line (see main)
    parser.usage = "%(prog)s EXPERIMENT --out DIR [--grid OPTION=V1,V2 ...] [...] [-- OPTIONS]"
    parser.epilog = ("OPTIONS, after --, go to every run, e.g. -- --quick --env-steps 20000 "
                     "(the options of dcem dmc train, dcem dmc ppo, dcem cartpole or dcem "
                     "regression)")  # fmt: skip


def _sweep_address(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """Ray cluster address of the sweep: ``--address``, else a local one if Ray is installed,
    else ``None`` (process pool)."""
    import importlib.util

    if args.no_ray:
        if args.address is not None:
            parser.error("argument --no-ray: not allowed with --address")
        return None
    if args.address is not None or importlib.util.find_spec("ray") is not None:
        if importlib.util.find_spec("ray") is None:
            parser.error("argument --address: needs the ray package (pip install 'dcem[ray]')")
        return args.address or "local"
    log.info("ray is not installed: running on %d local processes", args.workers)
    return None


def _run_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = list(args.options)
    address = _sweep_address(args, parser)
    if args.experiment in _SWEEP_LISTS:  # the experiment's own grid, on the sweep's engine
        argv = [args.experiment, *options, "--out", str(args.out), "--seeds",
                ",".join(map(str, args.seeds)), "--workers", str(args.workers)]  # fmt: skip
        if address is not None:
            argv += ["--address", address]
        for item in args.grid:
            key, sep, values = item.partition("=")
            lists = _SWEEP_LISTS[args.experiment]
            if key.lstrip("-") not in lists or not sep:
                parser.error(f"argument --grid: {item!r}: {args.experiment} sweeps over "
                             f"{', '.join(lists)} (OPTION=V1,V2)")  # fmt: skip
            argv += [f"--{key.lstrip('-')}", values]
        inner = build_parser().parse_args(argv)
        return int(inner.handler(inner, inner.command_parser))
    from dcem.experiments import common, sweep

    command = ["dmc", "train" if args.experiment == "dmc" else "ppo", *options]
    inner = build_parser().parse_args(command)  # bad options exit here, naming the option
    if getattr(inner, "out", None) is not None:
        parser.error("argument --out: give it before --, for the sweep folder")
    try:
        base = _dmc_config(inner) if args.experiment == "dmc" else _ppo_config(inner)
        spec = sweep.Sweep(args.experiment, base, sweep.parse_grid(args.grid, base), args.seeds)
        spec.runs()  # every run's config is valid
    except (ValueError, TypeError) as err:
        parser.error(f"argument --grid: {err}")
    _choose_gl_backend()  # the workers inherit it
    for name in ("absl", "OpenGL"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        rows = sweep.run(spec, args.out, workers=args.workers, address=address)
    except common.RunFolderError as err:
        parser.error(f"argument --out: {err}")
    done = sum(r["status"] == "done" for r in rows)
    log.info("%d of %d runs done; results in %s", done, len(rows), args.out / "results.csv")
    return 0 if done == len(rows) else 1


# --------------------------------------------------------------------------- entry point

# --------------------------------------------------------------------------- report


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="run folders of any experiment (a dmc run in progress too)",
    )
    parser.add_argument(
        "--bench",
        type=Path,
        nargs="*",
        default=[],
        metavar="JSON",
        help="benchmark JSON files to add (benchmarks/out/*.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"),
                        help="Markdown file to write (default: %(default)s)")  # fmt: skip


def _run_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import shlex

    from dcem.experiments import report
    from dcem.experiments.common import RunFolderError

    command = "dcem report " + " ".join(shlex.quote(str(p)) for p in args.runs)
    if args.bench:
        command += " --bench " + " ".join(shlex.quote(str(p)) for p in args.bench)
    try:
        path = report.write(args.out, args.runs, args.bench, command=command)
    except RunFolderError as err:
        parser.error(f"argument RUN_DIR: {err}")
    except OSError as err:
        parser.error(f"argument --out: cannot write {args.out}: {err}")
    log.info("wrote %s", path)
    return 0


_COMMANDS: dict[str, tuple[str, Callable[..., None], Callable[..., int]]] = {
    "regression": (
        "energy-based 1-D regression, unrolled GD vs DCEM (paper §5.1, figs 2, 6, 7)",
        _add_regression,
        _run_regression,
    ),
    "cartpole": (
        "embedding the cartpole action space with DCEM (paper §5.2.1, figs 3, 5, 9, 10)",
        _add_cartpole,
        _run_cartpole,
    ),
    "dmc": (
        "DeepMind Control from proprioception: PlaNet world model + CEM planner (paper §5.2.2)",
        _add_dmc,
        _run_dmc,
    ),
    "sweep": (
        "a grid of runs (options x seeds) on a Ray cluster or this machine's processes",
        _add_sweep,
        _run_sweep,
    ),
    "report": (
        "the measured tables of docs/results.md, rebuilt from run folders and benchmark JSON",
        _add_report,
        _run_report,
    ),
}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith(("the following arguments are required", "unrecognized argu",
                               "argument COMMAND", "argument ACTION")):  # fmt: skip
            message += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``dcem`` parser with one subparser per entry of ``_COMMANDS``.

    Building it imports no experiment, torch or matplotlib: a handler imports what its
    command needs when it runs.
    """
    import dcem  # the package alone: its names load on first use

    parser = _Parser(
        prog="dcem", description="The Differentiable Cross-Entropy Method: paper reproductions."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {dcem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler, command_parser=command)
    return parser


class _Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM while a command runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    # Further signals are ignored while the interrupted command stops its workers.
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise _Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Interrupted` in the body (main thread only); the
    previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGINT", "SIGTERM")
    previous = {name: signal.signal(getattr(signal, name), _on_signal) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), signal.SIG_DFL if handler is None else handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dcem`` command; returns the exit status (2 for bad options or folders).

    SIGINT (Ctrl-C) and SIGTERM end the run with one line: the workers are stopped, the
    checkpoints kept, and the same command resumes (status 130 or 143).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options: list[str] = []
    if argv[:1] == ["sweep"] and "--" in argv:  # the options of every run of the sweep
        argv, options = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = build_parser().parse_args(argv)
    if options:
        args.options = options
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with _signals_interrupt():
            return int(args.handler(args, args.command_parser))
    except KeyboardInterrupt as err:
        log.error("interrupted; rerun the same command to resume")
        return 128 + (err.signum if isinstance(err, _Interrupted) else signal.SIGINT)
