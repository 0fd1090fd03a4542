"""The ``dcem`` command: parses options and calls the experiments.

    dcem regression [--quick] [--out DIR] [--methods gd,dcem] [--seeds 0,1,2] [--updates N]
                    [--workers N] [--plot-only]

Each subcommand is one entry of ``_COMMANDS``: a function adding its options to a subparser
and a function running it. Bad option values exit with status 2 and a one-line message naming
the option (``argparse``'s ``parser.error``), before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def _add_regression(parser: argparse.ArgumentParser) -> None:
    from dcem.experiments import regression

    parser.add_argument(
        "--out", type=Path, default=Path("runs/regression"), help="run folder (resumed if it "
        "holds an unfinished run of the same config; default: %(default)s)"
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="tiny budget exercising every step (2 seeds, 300 "
        "updates, ablation at 1,5,10,15,20); options given explicitly still apply"
    )  # fmt: skip
    parser.add_argument(
        "--methods", type=_choice_list(regression.METHODS), help="inner optimizers "
        f"(default: {','.join(regression.METHODS)})"
    )  # fmt: skip
    parser.add_argument("--seeds", type=_seed_list, help="seeds, e.g. 0,1,2 (default: 0,1,2)")
    parser.add_argument("--updates", type=_positive_int, help="Adam updates per job (60000)")
    parser.add_argument(
        "--eval-every", type=_positive_int, help="updates between full-data MSE logs (300)"
    )
    parser.add_argument(
        "--checkpoint-every", type=_positive_int, help="updates between checkpoints (3000)"
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=2, help="parallel job processes (default: 2)"
    )
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
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.quick:
        return regression.RegressionConfig.quick(**overrides)
    return dataclasses.replace(regression.RegressionConfig(), **overrides)


def _run_regression(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dcem.experiments import common, regression

    if args.plot_only:
        if not (args.out / "summary.json").is_file():
            parser.error(f"argument --plot-only: {args.out} has no summary.json to plot from")
        for path in regression.plot(args.out):
            log.info("wrote %s", path)
        return 0
    try:
        cfg = _regression_config(args)
    except ValueError as err:
        parser.error(f"invalid options: {err}")
    try:
        regression.check_out_folder(args.out, cfg)
        summary = regression.run(cfg, args.out, workers=args.workers)
    except (regression.RunFolderError, common.FolderLockedError) as err:
        parser.error(f"argument --out: {err}")
    for method in cfg.methods:
        log.info(
            "%s: final train MSE %.3g (mean over %d seeds), %.2f ms/update",
            method, summary["final_mse"][method] or float("nan"), len(cfg.seeds),
            summary["ms_per_update"][method],
        )  # fmt: skip
    log.info("results in %s", args.out)
    return 0


# --------------------------------------------------------------------------- entry point

_COMMANDS: dict[str, tuple[str, Callable[..., None], Callable[..., int]]] = {
    "regression": (
        "energy-based 1-D regression, unrolled GD vs DCEM (paper §5.1, figs 2, 6, 7)",
        _add_regression,
        _run_regression,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``dcem`` parser with one subparser per entry of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="dcem", description="The Differentiable Cross-Entropy Method: paper reproductions."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler, command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dcem`` command; returns the exit status (2 for bad options)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args, args.command_parser))
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
