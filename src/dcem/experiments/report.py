"""``dcem report RUN [RUN ...]``: the measured tables of ``docs/results.md`` from run folders.

Every number comes from the files a run folder holds (``config.json``, ``summary.json``,
``metrics.csv``, ``eval/*.json``, ``diagnose/*.json``) or from benchmark JSON files, so the
document is rebuilt by running the same command again. Each folder is recognised by the
experiment its ``config.json`` names: ``regression`` (paper §5.1), ``cartpole`` (§5.2.1),
``dmc`` (§5.2.2, a run in progress included) or ``ppo`` (§5.2.2, phase 3). The records of
``dcem dmc eval`` in the runs are also drawn as figure 4 beside the document.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dcem.experiments import common
from dcem.experiments.common import RunFolderError

__all__ = ["render", "write"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err})") from None


def _num(value: Any, fmt: str = ".3g") -> str:
    return "n/a" if value is None else format(float(value), fmt)


def _pm(mean: Any, half: Any, fmt: str = ".3g") -> str:
    return _num(mean, fmt) + ("" if half is None else f" ± {_num(half, fmt)}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _regression(run: Path, config: dict[str, Any]) -> list[str]:
    s = common.load_summary(run, "regression")
    methods, steps = s["methods"], [str(k) for k in s["ablation_steps"]]
    lines = [f"{len(s['seeds'])} seeds x {s['updates']:,} updates; trained with "
             f"{s['train_inner_steps']} inner steps; mean ± 95% CI over seeds.", ""]  # fmt: skip
    rows = [[m, _pm(s["final_mse"][m], s["final_mse_ci95"][m]), _num(s["ms_per_update"][m]),
             _num(s["wall_seconds"][m], ".0f")] for m in methods]  # fmt: skip
    lines += _table(["method", "final train MSE", "ms per update and seed", "job seconds"], rows)
    lines += ["", "Test-time MSE with other numbers of inner steps:", ""]
    rows = [[k, *(_pm(s["ablation"][m].get(k), s["ablation_ci95"][m].get(k)) for m in methods)]
            for k in steps]  # fmt: skip
    lines += _table(["inner steps", *methods], rows)
    if s.get("run_wall_seconds"):
        lines += ["", f"Wall time of the run: {s['run_wall_seconds'] / 60:.1f} min."]
    return lines


def _cartpole(run: Path, config: dict[str, Any]) -> list[str]:
    s = common.load_summary(run, "cartpole")
    seeds = len({r["seed"] for r in s["runs"]})
    lines = [f"Improvement factor = latent controller's reward / full-space CEM's, mean ± 95% "
             f"CI over {seeds} seeds. Headline: on held-out states with fresh noise, against "
             f"CEM 1000/100/30 (reward {_num(s['converged_expert_test_reward'], '.4g')}). "
             f"Paper's form: the best of the validations on the {s['n_validation']} states it "
             f"is scored on, against CEM 1000/100/10 (reward "
             f"{_num(s['expert_reward'], '.4g')}).", ""]  # fmt: skip
    rows = [[str(g["latent_dim"]), f"{g['tau']:g}", _pm(g["headline_mean"], g["headline_ci95"]),
             _pm(g["mean"], g["ci95"])] for g in s["improvement_factor"]]  # fmt: skip
    return lines + _table(["latent dim", "tau", "headline (held-out)", "paper's form"], rows)


def _dmc(run: Path, config: dict[str, Any]) -> list[str]:
    cfg = config["config"]
    rows = common.read_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    evals = [r for r in rows if r["phase"] == "eval"]
    train = [r for r in rows if r["phase"] == "train"]
    steps = int(rows[-1]["env_step"]) if rows else 0
    planner = (f"latent DCEM {cfg['latent_samples']}x{cfg['latent_iter']}"
               if cfg["planner"] == "latent" else
               f"CEM {cfg['plan_samples']}/{cfg['plan_elites']}/{cfg['plan_iter']}")  # fmt: skip
    lines = [f"`{cfg['task']}`, {planner} planner, {steps:,} environment steps in "
             f"`metrics.csv`.", ""]  # fmt: skip
    if evals:
        table = [[f"{int(r['env_step']):,}", _num(r["return"], ".1f"),
                  _num(r.get("return_std") or None, ".1f"),
                  str(len((r.get("eval_returns") or "").split()) or 1)] for r in evals]  # fmt: skip
        lines += _table(["env steps", "eval return (mean)", "std", "episodes"], table)
    if train and train[-1].get("episode_seconds"):
        last = train[-10:]
        mean = {k: sum(float(r[k]) for r in last) / len(last)
                for k in ("episode_seconds", "plan_seconds", "update_seconds",
                          "physics_seconds")}  # fmt: skip
        lines += ["", f"Wall time per training episode (mean of the last {len(last)}): "
                  f"{mean['episode_seconds']:.0f} s = planning {mean['plan_seconds']:.0f} + "
                  f"model updates {mean['update_seconds']:.0f} + physics "
                  f"{mean['physics_seconds']:.1f} s."]  # fmt: skip
    if cfg["planner"] == "latent":
        lines += _phase2(cfg, train)
    lines += _eval_table(run)
    diagnoses = [_read_json(p) for p in sorted((run / "diagnose").glob("*.json"))]
    if diagnoses:
        table = []
        for d in diagnoses:
            open_loop, p = d["open_loop_reward_r2"], d["planner"]
            table.append([f"{d['env_steps_trained']:,}", _num(d["obs_r2_mean"], ".2f"),
                          _num(d["reward_r2"], ".2f"), _num(open_loop[0], ".2f"),
                          _num(open_loop[-1], ".2f"), _num(d["rank_correlation"], ".2f"),
                          f"{_num(p['true_return'], '.2f')} / "
                          f"{_num(p['random_true_return_best'], '.2f')}"])  # fmt: skip
        lines += ["", "`dcem dmc diagnose` (held-out episodes):", ""]
        lines += _table(["env steps", "obs R² (mean)", "reward R²", "open-loop R² step 1",
                         f"step {len(diagnoses[-1]['open_loop_reward_r2'])}", "Spearman",
                         "planner / best random true return"], table)  # fmt: skip
    return lines


def _pretrain_data(cfg: dict[str, Any]) -> str:
    if not cfg.get("decoder_pretrain"):
        return ""
    if cfg.get("decoder_pretrain_data") == "plans":
        return (
            f" on full-CEM plans ({cfg['plan_samples']}/{cfg['plan_elites']}/"
            f"{cfg['plan_iter']}) from {cfg['decoder_pretrain_states']} replay belief states"
        )
    last = cfg.get("decoder_pretrain_episodes", 0)
    return f" on the last {last} episodes' action windows" if last else " on the action windows"


def _phase2(cfg: dict[str, Any], train: list[dict[str, str]]) -> list[str]:
    """Phase 2's settings and, per training episode, what shows the latent planner
    exploiting the model: saturated actions and imagined against real 12-step returns."""
    start = cfg.get("init_from") or "a fresh model"
    updates = int(train[-1]["updates"]) // cfg["decoder_every"] if train else 0
    lines = ["", f"Phase 2 from `{Path(start).name}`: latent dimension {cfg['latent_dim']}, "
             f"decoder pre-trained for {cfg.get('decoder_pretrain', 0)} autoencoder steps"
             f"{_pretrain_data(cfg)}, "
             f"{cfg.get('decoder_warmup', 0)} warm-up DCEM updates, then {updates} DCEM "
             f"updates (one every {cfg['decoder_every']} model updates).", ""]  # fmt: skip
    table = [[r["episode"], _num(r["return"], ".1f"), _num(r.get("saturated_fraction") or None,
              ".3f"), _num(r.get("plan_imagined") or None, ".2f"),
              _num(r.get("plan_real") or None, ".2f"), _num(r.get("decoder_cost") or None, ".2f")]
             for r in train]  # fmt: skip
    return lines + _table(["episode", "train return", "saturated share", "imagined (H steps)",
                           "real (H steps)", "decoder cost"], table)  # fmt: skip


def _eval_records(run: Path) -> list[dict[str, Any]]:
    return [_read_json(p) for p in sorted((run / "eval").glob("*.json"))]


def _eval_table(run: Path) -> list[str]:
    """The records of ``dcem dmc eval`` in ``run/eval`` (figure 4's numbers)."""
    records = _eval_records(run)
    if not records:
        return []
    table = [[r["planner"], f"{r['trajectories_per_decision']:,}", str(r["episodes"]),
              _num(r["mean"], ".1f"), _num(r["std"], ".1f"),
              f"{_num(r['median'], '.1f')} ({_num(r['median_ci95'][0], '.1f')} to "
              f"{_num(r['median_ci95'][1], '.1f')})"] for r in records]  # fmt: skip
    return ["", "`dcem dmc eval`:", ""] + _table(
        ["planner", "trajectories per decision", "episodes", "mean", "std",
         "median (bootstrap 95% CI)"], table)  # fmt: skip


def _ppo(run: Path, config: dict[str, Any]) -> list[str]:
    cfg = config["config"]
    s = common.load_summary(run, "ppo")
    rows = common.read_csv(run / "metrics.csv")
    train = [r for r in rows if r["phase"] == "train"]
    lines = [f"From `{Path(cfg['init_from']).name}`: fine-tuned {cfg['fine_tune']}, "
             f"{cfg['passes']} pass(es), {cfg['episodes_per_step']} episodes per PPO step, "
             f"std {cfg['std']} ({'learned' if cfg['learn_std'] else 'fixed'}), learning "
             f"rate {cfg['lr']:g}, {s['ppo_steps']} PPO steps.", ""]  # fmt: skip
    before, after = s["eval_returns_before"], s["eval_returns_after"]
    table = [["before PPO", str(len(before)), _num(s["eval_return_before"], ".1f")],
             ["after PPO", str(len(after)), _num(s["eval_return_after"], ".1f")]]  # fmt: skip
    lines += _table(["noise-free evaluation", "episodes", "mean return"], table)
    if "paired_difference" in s:
        lo, hi = s["paired_difference_t95"]
        b_lo, b_hi = s["paired_difference_bootstrap95"]
        lines += ["", f"Paired difference (after - before, same episodes): "
                  f"{_num(s['paired_difference'], '.1f')}, Student-t 95% CI "
                  f"{_num(lo, '.1f')} to {_num(hi, '.1f')}, bootstrap {_num(b_lo, '.1f')} "
                  f"to {_num(b_hi, '.1f')}."]  # fmt: skip
    if train:
        n = len(train)
        mean = {k: sum(float(r[k] or 0) for r in train) / n
                for k in ("episode_seconds", "update_seconds")}  # fmt: skip
        peak = max(float(r.get("peak_memory_mb") or 0) for r in train)
        lines += ["", f"Per PPO step (mean of {n}): {mean['episode_seconds']:.0f} s per "
                  f"episode collected, {mean['update_seconds']:.0f} s of updates; peak "
                  f"memory {peak:.0f} MB."]  # fmt: skip
    return lines + _eval_table(run)


_SECTIONS: dict[str, tuple[str, Callable[[Path, dict[str, Any]], list[str]]]] = {
    "regression": ("Energy-based regression (paper §5.1)", _regression),
    "cartpole": ("Cartpole action embedding (paper §5.2.1)", _cartpole),
    "dmc": ("DeepMind Control with a PlaNet world model (paper §5.2.2)", _dmc),
    "ppo": ("PPO into the latent-DCEM controller (paper §5.2.2, phase 3)", _ppo),
}


def _benchmark(path: Path) -> list[str]:
    """The numeric fields of a benchmark JSON that compare (ratios, speedups, compile times)."""
    data = _read_json(path)
    if not isinstance(data, dict) or "benchmark" not in data:
        raise RunFolderError(f"{path} is not a benchmark JSON (no 'benchmark' field)")
    rows: list[list[str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                name = item.get("device", i) if isinstance(item, dict) else i
                walk(f"{prefix}[{name}]", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if any(word in prefix for word in ("ratio", "speedup", "compile_s", "faster")):
                rows.append([f"`{prefix}`", _num(value, ".3g")])

    walk("", {k: v for k, v in data.items() if k != "config"})
    head = [f"`{path.name}`: torch {data.get('torch', '?')}, {data.get('threads', '?')} "
            "thread(s).", ""]  # fmt: skip
    return head + _table(["quantity", "value"], rows)


def render(
    runs: Sequence[Path], benchmarks: Sequence[Path] = (), command: str = "",
    figure: str | None = None,
) -> str:  # fmt: skip
    """The Markdown document for ``runs`` (run folders) and ``benchmarks`` (JSON files);
    ``figure``: the path (relative to the document) of figure 4, shown after the runs.

    Raises :class:`RunFolderError` naming the folder or file that cannot be read.
    """
    lines = ["# Measured results", "",
             "Generated from run folders and benchmark files by"
             + (f" `{command}`" if command else " `dcem report`")
             + "; every number below can be rebuilt by running it again.", ""]  # fmt: skip
    for run in runs:
        run = Path(run)
        record = _read_json(run / "config.json")
        kind = record.get("experiment") if isinstance(record, dict) else None
        if kind not in _SECTIONS:
            raise RunFolderError(f"{run}: config.json names experiment {kind!r}, not one of "
                                 f"{', '.join(_SECTIONS)}")  # fmt: skip
        title, section = _SECTIONS[kind]
        lines += [f"## {title}: `{run.name}`", "", *section(run, record), ""]
    if figure is not None:
        lines += ["## Figure 4: evaluation returns per planner", "",
                  f"![Figure 4: evaluation returns per planner]({figure})", ""]  # fmt: skip
    if benchmarks:
        lines += ["## Benchmarks", ""]
        for path in benchmarks:
            lines += [*_benchmark(Path(path)), ""]
    return "\n".join(lines).rstrip() + "\n"


def write(
    path: Path, runs: Sequence[Path], benchmarks: Sequence[Path] = (), command: str = ""
) -> Path:
    """Write :func:`render`'s document to ``path`` atomically; with ``dcem dmc eval`` records
    in the runs, figure 4 (their box plot) to ``img/figure4.png`` beside it."""
    records = [r for run in runs for r in _eval_records(Path(run))]
    figure = None
    if records:
        from dcem.experiments import dmc

        dmc.plot_eval(records, Path(path).parent / "img" / "figure4.png")
        figure = "img/figure4.png"
    common.atomic_write_text(path, render(runs, benchmarks, command, figure))
    return Path(path)
