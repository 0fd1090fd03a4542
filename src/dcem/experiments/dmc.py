"""DeepMind Control from proprioception with a PlaNet world model (paper §5.2.2, Algorithm 3).

Phase 1 of Algorithm 3: ``seed_episodes`` episodes of uniformly random actions fill the replay;
then every episode acts with the CEM planner (``dcem.world.plan``) in the learned RSSM plus
Gaussian exploration noise, filtering the belief with each observation, while the model is
trained on PlaNet's bound every ``update_every`` environment steps (``updates_per_round``
Adam updates on batches of ``batch_size`` sequences of ``seq_len`` steps). Every
``eval_every`` environment steps ``eval_episodes`` episodes run without noise and without
being stored.

Run folder (``out``)::

    config.json        resolved config, git commit, library versions
    metrics.csv        env_step, episode, phase (seed/train/eval), return, loss terms, updates,
                       wall_seconds: one row per episode
    summary.json       final and best evaluation returns, counts, timings
    ckpt/latest.pt     model, optimizer, replay, generators and counters (state_dicts and
                       tensors only), written atomically after every episode
    ckpt/envNNNNNNN.pt a copy of it at each evaluation point (``dcem dmc diagnose --ckpt``)
    training.png       the paper's phase-1 layout: episode reward, obs, reward and KL loss
    eval.gif           one evaluation episode rendered offscreen (when a GL backend works)
    eval/{planner}.json  returns written by ``dcem dmc eval``

A killed run resumes from ``ckpt/latest.pt`` when the same command is run again. Episodes are
seeded by their index and the planner's generator is in the checkpoint, so a resumed run
repeats the episode that was cut off exactly as it would have gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcem.experiments import common
from dcem.experiments.common import CheckpointError, RunFolderError
from dcem.experiments.dmc_config import DEFAULTS, PLANNERS, QUICK, DMCConfig
from dcem.world import (
    TASKS,
    DMCEnv,
    RenderUnavailableError,
    State,
    fit_decoder,
    make_env,
    plan,
    plan_latent,
)
from dcem.world import agent as agent_lib

__all__ = [
    "EXPERIMENT",
    "METRIC_FIELDS",
    "PLANNERS",
    "QUICK",
    "Agent",
    "CheckpointError",
    "DMCConfig",
    "RunFolderError",
    "eval_records",
    "evaluate",
    "load_config",
    "plot",
    "plot_eval",
    "train",
]

log = logging.getLogger(__name__)

EXPERIMENT = "dmc"
CKPT_VERSION = 2
"""Checkpoint format: 2 added the observation statistics (``RSSM.obs_loc`` etc.)."""
METRIC_FIELDS = [
    "env_step", "episode", "phase", "return", "return_std", "eval_returns", "obs_loss",
    "reward_loss", "kl_loss", "kl_raw", "updates", "wall_seconds", "episode_seconds",
    "plan_seconds", "update_seconds", "physics_seconds", "decoder_cost",
    "saturated_fraction", "plan_imagined", "plan_real",
]  # fmt: skip
"""Columns of ``metrics.csv``. Train and seed rows: one per episode. Eval rows: one per
evaluation point, ``return`` the mean and ``return_std`` the standard deviation of its
episodes, ``eval_returns`` each episode's return (space-separated). ``saturated_fraction``,
``plan_imagined`` and ``plan_real`` (train and eval rows; see :func:`run_episode`, averaged
over an evaluation's episodes) show whether the planner exploits errors of the model: its
plans saturate the actions and the model rates them above what they earn."""


def load_config(out: Path, **overrides: Any) -> DMCConfig:
    """The config recorded in ``out/config.json`` (with ``overrides``, e.g. the device)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise RunFolderError(f"{out} has no config.json: not a dcem dmc run folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("experiment") != EXPERIMENT:
        what = record.get("experiment") if isinstance(record, dict) else None
        raise RunFolderError(f"{out} holds a {what!r} run, not a dmc run")
    if not isinstance(record.get("config"), dict):
        raise RunFolderError(f"{path} has no 'config' object")
    known = {f.name: f for f in dataclasses.fields(DMCConfig)}
    values = {k: v for k, v in record["config"].items() if k in known}
    for name, value in values.items():
        kind = str(known[name].type)
        types: dict[str, type | tuple[type, ...]] = {
            "int": int, "float": (int, float), "bool": bool, "str": str,
        }  # fmt: skip
        expected = types[kind]
        if not isinstance(value, expected) or (kind == "int" and isinstance(value, bool)):
            raise RunFolderError(f"{path}: config field {name!r} must be a {kind}, got {value!r}")
    try:
        return DMCConfig(**{**values, **overrides})
    except ValueError as err:
        raise RunFolderError(f"{path} holds an invalid config: {err}") from None


# --------------------------------------------------------------------------- agent


def _seed(*words: int) -> int:
    """A 31-bit seed derived from ``words`` (run seed, stream, index)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0] >> 1)


TRAIN_STREAM, EVAL_STREAM, MODEL_STREAM = 1, 2, 3


class Agent(agent_lib.Agent):
    """The library's agent (:class:`dcem.world.agent.Agent`) as one run drives it: its
    config, counters, wall time, checkpoint format and compile fallback."""

    cfg: DMCConfig

    def __init__(self, cfg: DMCConfig, env: DMCEnv) -> None:
        super().__init__(
            cfg, env.obs_size, env.action_size, env.action_low, env.action_high,
            device=cfg.device, model_seed=_seed(cfg.seed, MODEL_STREAM),
            replay_seed=_seed(cfg.seed, 0), generator_seed=_seed(cfg.seed, TRAIN_STREAM),
        )  # fmt: skip
        if cfg.compile:
            self.model.compile(dynamic=True)
        self.counters = {"episode": 0, "env_step": 0, "evals": 0, "warmup": 0}
        self.wall_seconds = 0.0
        self._compile_checked = False

    def act(
        self, belief: State, prev_action: Tensor, obs: np.ndarray, *, explore: bool,
        generator: torch.Generator,
    ) -> tuple[State, Tensor]:  # fmt: skip
        """:meth:`dcem.world.agent.Agent.act`; with ``compile``, a compilation that fails
        falls back to eager (one warning)."""
        if not self.cfg.compile or self._compile_checked:
            return super().act(belief, prev_action, obs, explore=explore, generator=generator)
        state = generator.get_state()
        try:
            result = super().act(belief, prev_action, obs, explore=explore, generator=generator)
        except Exception as err:  # the compiler raises many types
            first = str(err).splitlines()[0] if str(err) else ""
            log.warning("torch.compile failed (%s: %s); planning eagerly", type(err).__name__,
                        first)  # fmt: skip
            torch.compiler.set_stance("force_eager")
            generator.set_state(state)
            result = super().act(belief, prev_action, obs, explore=explore, generator=generator)
        self._compile_checked = True
        return result

    # ------------------------------------------------------------ checkpoint
    def checkpoint(self) -> dict[str, Any]:
        """The run's checkpoint: the agent's state dict, format version, task, config,
        counters and wall time."""
        state = self.state_dict()
        state.pop("updates")  # kept among the counters, as format 2 has it
        return {
            "version": CKPT_VERSION, "task": self.cfg.task, "config": self.cfg.to_json(),
            **state, "counters": {**self.counters, "updates": self.updates},
            "wall_seconds": self.wall_seconds,
        }  # fmt: skip

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Restore a checkpoint; refuses one of another task, config or format version."""
        if state.get("version") != CKPT_VERSION:
            raise CheckpointError(
                f"{path} has format version {state.get('version')!r}, expected {CKPT_VERSION} "
                "(written by an older dcem, without observation statistics); start a new run "
                "with another --out"
            )
        if state.get("task") != self.cfg.task:
            raise CheckpointError(
                f"{path} is a checkpoint of task {state.get('task')!r}, not {self.cfg.task!r}"
            )
        detail = common.config_diff(state.get("config", {}), self.cfg.to_json(), DEFAULTS)
        if detail:
            raise CheckpointError(f"{path} was written with another config ({detail})")
        counters = {k: int(v) for k, v in state["counters"].items()}
        try:
            self.load_state_dict({**state, "updates": counters.pop("updates")})
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path} does not fit this model: {err}") from err
        self.counters.update(counters)
        self.wall_seconds = float(state["wall_seconds"])


# --------------------------------------------------------------------------- episodes


def run_episode(
    agent: Agent, env: DMCEnv, *, mode: str, seed: int,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
    frames: list[np.ndarray] | None = None,
    timers: dict[str, float] | None = None,
    plans: dict[str, float] | None = None,
) -> float:  # fmt: skip
    """One episode; returns its return.

    ``mode``: ``"seed"`` (uniform random actions), ``"train"`` (planner + exploration noise)
    or ``"eval"`` (planner only). Seed and train episodes go to the replay. ``on_step(t)`` is
    called before each agent step ``t`` (model updates); ``frames`` collects renders;
    ``timers["plan"]`` and ``timers["physics"]`` accumulate the seconds spent acting (belief
    and planner) and in the simulator. ``plans`` receives what shows a planner exploiting
    the model (train and eval episodes): ``saturated_fraction``, the share of action
    components in the outer 2.5% of their range at either end (``|a| > 0.95`` in [-1, 1]),
    and ``plan_imagined`` / ``plan_real``, the means over decisions of the model's return of
    the chosen plan over the horizon H and of the rewards the next H steps paid (decisions
    with H steps left).
    """
    timers = {} if timers is None else timers
    clock = time.perf_counter
    store = mode != "eval"
    generator = agent.generator if generator is None else generator
    obs = env.reset(seed=seed)
    if store:
        agent.replay.start_episode(obs)
    belief = agent.model.initial_state((1,))
    saturated = 0
    action = torch.zeros(env.action_size, device=agent.device)
    total, done, t = 0.0, False, 0
    rewards: list[float] = []
    imagined: list[Tensor] = []
    while not done:
        if on_step is not None:
            on_step(t)
        tick = clock()
        if mode == "seed":
            action = agent.random_action()
        else:
            belief, action = agent.act(
                belief, action, obs, explore=mode == "train", generator=generator
            )
        if mode != "seed" and agent.last_imagined_return is not None:
            imagined.append(agent.last_imagined_return)
        action_np = action.cpu().numpy().astype(np.float32)
        tock = clock()
        obs, reward, done = env.step(action_np)
        timers["plan"] = timers.get("plan", 0.0) + tock - tick
        timers["physics"] = timers.get("physics", 0.0) + clock() - tock
        if store:
            agent.replay.add_step(action_np, reward, obs, done)
        if frames is not None:
            frames.append(env.render(height=128, width=128))
        total, t = total + reward, t + 1
        rewards.append(reward)
        saturated += saturated_count(action_np, env.action_low, env.action_high)
    if plans is not None and mode != "seed":
        plans.update(_plan_stats(imagined, rewards, agent.cfg.horizon))
        plans["saturated_fraction"] = saturated / (t * action_np.size)
    return total


def saturated_count(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> int:
    """Action components in the outer 2.5% of their range ``[low, high]`` at either end
    (``|a| > 0.95`` in [-1, 1]): what a planner exploiting the model tends to output."""
    mid, half = 0.5 * (high + low), 0.5 * (high - low)
    return int((np.abs(actions - mid) > 0.95 * half).sum())


def _plan_stats(imagined: list[Tensor], rewards: list[float], horizon: int) -> dict[str, Any]:
    """Means of the imagined returns of the plans chosen at the decisions with ``horizon``
    steps left and of the rewards those steps paid (empty strings if there is none)."""
    n = len(rewards) - horizon + 1
    if n < 1 or len(imagined) < n:
        return {"plan_imagined": "", "plan_real": ""}
    paid = np.convolve(np.asarray(rewards, dtype=np.float64), np.ones(horizon), "valid")
    return {"plan_imagined": float(torch.stack(imagined[:n]).double().mean()),
            "plan_real": float(paid[:n].mean())}  # fmt: skip


def _evaluate_agent(
    agent: Agent, env: DMCEnv, episodes: Sequence[int], frames: list[np.ndarray] | None = None,
    timers: dict[str, float] | None = None, plans: list[dict[str, Any]] | None = None,
) -> list[float]:  # fmt: skip
    """Returns of the noise-free planner on evaluation episodes with the given indices;
    ``plans`` receives each episode's plan statistics (see :func:`run_episode`)."""
    returns = []
    for i in episodes:
        gen = torch.Generator(agent.device).manual_seed(_seed(agent.cfg.seed, EVAL_STREAM, i))
        stats: dict[str, Any] = {}
        returns.append(run_episode(agent, env, mode="eval", seed=_seed(agent.cfg.seed,
                       EVAL_STREAM, i, 1), generator=gen, frames=frames if i == episodes[0]
                       else None, timers=timers, plans=stats))  # fmt: skip
        if plans is not None:
            plans.append(stats)
    return returns


def _mean_plans(plans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each plan statistic over episodes (an empty string where none has it)."""
    keys = ("saturated_fraction", "plan_imagined", "plan_real")
    values = {k: [p[k] for p in plans if p.get(k, "") != ""] for k in keys}
    return {k: float(np.mean(v)) if v else "" for k, v in values.items()}


# --------------------------------------------------------------------------- training


def _check_init_from(cfg: DMCConfig) -> dict[str, Any]:
    """The phase-1 checkpoint ``cfg.init_from`` names, loaded; errors name ``init_from``."""
    run = Path(cfg.init_from)
    path = run / "ckpt" / "latest.pt"
    if not path.is_file():
        raise RunFolderError(f"init_from: {run} has no checkpoint (ckpt/latest.pt)")
    state = common.load_checkpoint(path)
    if state.get("version") != CKPT_VERSION:
        raise CheckpointError(
            f"init_from: {path} has format version {state.get('version')!r}, expected "
            f"{CKPT_VERSION} (a phase-1 run of an older dcem, without observation statistics); "
            "train phase 1 again"
        )
    if state.get("task") != cfg.task:
        raise CheckpointError(f"init_from: {path} is a run of task {state.get('task')!r}, "
                              f"not {cfg.task!r}")  # fmt: skip
    return state


def _init_from(agent: Agent, run: Path) -> None:
    """Phase 2 start: the world model, its optimizer and (``keep_replay``) the replay of the
    phase-1 run in ``run``; refuses a run of another task or other model sizes."""
    cfg = agent.cfg
    path = run / "ckpt" / "latest.pt"
    state = _check_init_from(cfg)
    try:
        if not cfg.reinit_model:
            agent.model.load_state_dict(state["model"])
            agent.optimizer.load_state_dict(state["optimizer"])
        if cfg.keep_replay:
            agent.load_replay(state)
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"init_from: {path} does not fit this model: {err}") from err
    log.info("phase 2 from %s (%d env steps): model %s, replay %s", run,
             int(state["counters"]["env_step"]), "re-initialized" if cfg.reinit_model else
             "loaded", f"{agent.replay.num_episodes} episodes" if cfg.keep_replay else
             "deleted")  # fmt: skip
    if cfg.decoder_pretrain and agent.decoder is not None:
        if cfg.decoder_pretrain_data == "plans":
            sequences = agent.cem_plans(cfg.decoder_pretrain_states)
            what = f"full-CEM plans from {len(sequences)} replay belief states"
        else:
            sequences = torch.as_tensor(
                agent.replay.action_windows(cfg.horizon, last=cfg.decoder_pretrain_episodes)
            )
            what = f"{len(sequences)} action windows of the replay (" + (
                f"last {cfg.decoder_pretrain_episodes} episodes)"
                if cfg.decoder_pretrain_episodes else "all episodes)")  # fmt: skip
        losses = fit_decoder(agent.decoder, sequences, steps=cfg.decoder_pretrain,
                             generator=agent.generator)  # fmt: skip
        log.info("decoder pre-trained on %s: reconstruction error %.4f -> %.4f (their "
                 "variance %.4f)", what, losses[0], losses[-1],
                 float(sequences.var(0).mean()))  # fmt: skip


def _resume(agent: Agent, out: Path) -> None:
    path = out / "ckpt" / "latest.pt"
    if not path.exists():
        if agent.cfg.init_from:
            _init_from(agent, Path(agent.cfg.init_from))
        return
    agent.restore(common.load_checkpoint(path), path)
    episode = agent.counters["episode"]
    evals = agent.counters["evals"]
    kept = common.truncate_csv(
        out / "metrics.csv", METRIC_FIELDS,
        lambda r: int(r["episode"]) < (evals if r["phase"] == "eval" else episode),
    )  # fmt: skip
    log.info("resumed %s at episode %d (%d env steps, %d metric rows)", out, episode,
             agent.counters["env_step"], kept)  # fmt: skip


def _save(agent: Agent, out: Path, rows: list[dict[str, Any]]) -> None:
    common.append_csv(out / "metrics.csv", METRIC_FIELDS, rows)
    rows.clear()
    common.save_checkpoint(out / "ckpt" / "latest.pt", agent.checkpoint())


def _progress(cfg: DMCConfig, done: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.env_steps, initial=min(done, cfg.env_steps), unit="step",
                desc=f"dmc {cfg.task}", dynamic_ncols=True,
                disable=None if show else True)  # fmt: skip


def check_out_folder(out: Path, cfg: DMCConfig) -> None:
    """Raise :class:`RunFolderError` unless ``out`` is new, empty or a run of this config."""
    common.check_out_folder(out, EXPERIMENT, cfg.to_json(), DEFAULTS)


def train(
    cfg: DMCConfig, out: Path, *, show_progress: bool = True, tensorboard: bool = False
) -> dict[str, Any]:
    """Train (or resume) the run in ``out``; returns the summary (also in ``summary.json``).

    ``tensorboard``: also write every ``metrics.csv`` row to ``out/tensorboard`` (needs the
    ``tensorboard`` package).
    """
    out = Path(out)
    check_out_folder(out, cfg)
    if cfg.init_from and not (out / "ckpt" / "latest.pt").exists():
        _check_init_from(cfg)  # before anything is written: a wrong path leaves no folder
    with common.lock_folder(out):
        if not (out / "config.json").exists():
            common.atomic_write_json(out / "config.json", common.run_record(EXPERIMENT,
                                     cfg.to_json()))  # fmt: skip
        env = make_env(cfg.task, seed=cfg.seed, action_repeat=cfg.repeat,
                       episode_steps=cfg.episode_steps)  # fmt: skip
        try:
            agent = Agent(cfg, env)
            _resume(agent, out)
            writer = _tensorboard_writer(out) if tensorboard else None
            try:
                with _progress(cfg, agent.counters["env_step"], show_progress) as bar:
                    _train_loop(agent, env, out, bar, writer)
            finally:
                if writer is not None:
                    writer.close()
            summary = _finish(agent, env, out)
        finally:
            env.close()
    return summary


def _warm_up_decoder(agent: Agent, out: Path) -> None:
    """``decoder_warmup`` decoder updates on replay batches before acting (checkpointed every
    10), so that the latent planner starts from a decoder fitted to the phase-1 model."""
    cfg, c = agent.cfg, agent.counters
    while agent.decoder is not None and c["warmup"] < cfg.decoder_warmup and agent.can_update():
        start, costs = time.perf_counter(), []
        for _ in range(min(10, cfg.decoder_warmup - c["warmup"])):
            obs, actions, _ = agent.sample_batch()
            costs.append(agent.update_decoder(obs, actions))
            c["warmup"] += 1
        agent.wall_seconds += time.perf_counter() - start
        log.info("decoder warm-up %d / %d: imagined cost %.3f", c["warmup"], cfg.decoder_warmup,
                 float(torch.stack(costs).mean()))  # fmt: skip
        _save(agent, out, [])


def _tensorboard_writer(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log_rows(writer: Any, rows: list[dict[str, Any]]) -> None:
    """Each numeric field of ``rows`` as a scalar ``phase/field`` at the row's env step."""
    for row in rows:
        for key, value in row.items():
            if key not in ("env_step", "episode", "phase") and isinstance(value, int | float):
                writer.add_scalar(f"{row['phase']}/{key}", value, int(row["env_step"]))
    writer.flush()


def _train_loop(agent: Agent, env: DMCEnv, out: Path, bar: Any, writer: Any = None) -> None:
    cfg, c = agent.cfg, agent.counters
    rows: list[dict[str, Any]] = []
    _warm_up_decoder(agent, out)
    while c["env_step"] < cfg.env_steps:
        steps_before = c["env_step"]
        row = _train_episode(agent, env)
        rows.append(row)
        bar.update(min(c["env_step"], cfg.env_steps) - min(steps_before, cfg.env_steps))
        bar.set_postfix_str(_postfix(row))
        if bar.disable:  # no terminal: one log line per episode instead of the bar
            log.info("episode %d (%s), %d env steps, %.0f s: %s", row["episode"], row["phase"],
                     c["env_step"], agent.wall_seconds, _postfix(row))  # fmt: skip
        last = c["env_step"] >= cfg.env_steps
        evaluated = last or c["env_step"] // cfg.eval_every > steps_before // cfg.eval_every
        if evaluated:
            rows.extend(_eval_rows(agent, env))
        if writer is not None:
            _log_rows(writer, rows)
        _save(agent, out, rows)
        if evaluated:  # the model at each evaluation point, for diagnose and phase 2
            snapshot = out / "ckpt" / f"env{c['env_step']:07d}.pt"
            with common.atomic_open(snapshot, "wb") as handle:
                handle.write((out / "ckpt" / "latest.pt").read_bytes())
        if evaluated or c["episode"] % 5 == 0:
            plot(out)  # the figure follows the run


def _train_episode(agent: Agent, env: DMCEnv) -> dict[str, Any]:
    """One seed or training episode with its model updates; its ``metrics.csv`` row."""
    cfg, c = agent.cfg, agent.counters
    interval = max(1, cfg.update_every // cfg.repeat)
    start = time.perf_counter()
    losses: list[dict[str, float]] = []
    timers = {"plan": 0.0, "physics": 0.0, "update": 0.0}
    plans: dict[str, Any] = {}

    def on_step(t: int) -> None:
        if t % interval == 0 and agent.can_update():
            tick = time.perf_counter()
            if c["env_step"] < cfg.obs_stats_until:
                agent.fit_obs_stats()
            losses.append(agent.update(cfg.updates_per_round))
            timers["update"] += time.perf_counter() - tick

    mode = "seed" if c["episode"] < cfg.seed_episodes else "train"
    ret = run_episode(agent, env, mode=mode, seed=_seed(cfg.seed, TRAIN_STREAM, c["episode"]),
                      on_step=on_step if mode == "train" else None, timers=timers,
                      plans=plans)  # fmt: skip
    c["env_step"] += env.steps
    c["episode"] += 1
    if c["episode"] == cfg.seed_episodes:
        agent.fit_obs_stats()  # from the seed episodes alone, until the first update round
    seconds = time.perf_counter() - start
    agent.wall_seconds += seconds
    keys = ("obs_loss", "reward_loss", "kl_loss", "kl_raw", "decoder_cost")
    mean = {k: float(np.mean([x[k] for x in losses if k in x])) if any(k in x for x in losses)
            else "" for k in keys}  # fmt: skip
    return {"env_step": c["env_step"], "episode": c["episode"] - 1, "phase": mode,
            "return": ret, **mean, "updates": agent.updates,
            "wall_seconds": round(agent.wall_seconds, 2), **_split(seconds, timers),
            **plans}  # fmt: skip


def _split(seconds: float, timers: dict[str, float]) -> dict[str, float]:
    """The ``metrics.csv`` columns of an episode's wall time and its parts."""
    return {"episode_seconds": round(seconds, 2), "plan_seconds": round(timers["plan"], 2),
            "update_seconds": round(timers.get("update", 0.0), 2),
            "physics_seconds": round(timers["physics"], 2)}  # fmt: skip


def _postfix(row: dict[str, Any]) -> str:
    text = f"return {row['return']:.0f}"
    if row["obs_loss"] != "":
        text += f" obs {row['obs_loss']:.3g} rew {row['reward_loss']:.3g} kl {row['kl_raw']:.3g}"
    if row.get("decoder_cost", "") != "":
        text += f" plan cost {row['decoder_cost']:.3g}"
    return text


def _eval_rows(agent: Agent, env: DMCEnv) -> list[dict[str, Any]]:
    """One evaluation point: ``eval_episodes`` noise-free episodes on the same seeded starts
    at every point (the episodes of ``dcem dmc eval``), summarized in one row."""
    start = time.perf_counter()
    c = agent.counters
    timers = {"plan": 0.0, "physics": 0.0}
    plans: list[dict[str, Any]] = []
    returns = _evaluate_agent(agent, env, range(agent.cfg.eval_episodes), timers=timers,
                              plans=plans)  # fmt: skip
    seconds = time.perf_counter() - start
    agent.wall_seconds += seconds
    row = {"env_step": c["env_step"], "episode": c["evals"], "phase": "eval",
           "return": float(np.mean(returns)), "return_std": float(np.std(returns)),
           "eval_returns": " ".join(f"{r:.2f}" for r in returns), "updates": agent.updates,
           "wall_seconds": round(agent.wall_seconds, 2), **_split(seconds, timers),
           **_mean_plans(plans)}  # fmt: skip
    c["evals"] += 1
    log.info("eval at %d env steps: mean %.1f (std %.1f) over %s", c["env_step"], row["return"],
             row["return_std"], ", ".join(f"{r:.1f}" for r in returns))  # fmt: skip
    return [row]


def _finish(agent: Agent, env: DMCEnv, out: Path) -> dict[str, Any]:
    """Summary, figure and (once) the evaluation video of a finished run."""
    rows = common.read_csv(out / "metrics.csv")
    evals = [r for r in rows if r["phase"] == "eval"]
    last_step = max((int(r["env_step"]) for r in evals), default=-1)
    final = [float(r["return"]) for r in evals if int(r["env_step"]) == last_step]
    by_step: dict[int, list[float]] = {}
    for r in evals:
        by_step.setdefault(int(r["env_step"]), []).append(float(r["return"]))
    best: tuple[int | None, list[float]] = max(
        by_step.items(), key=lambda kv: float(np.mean(kv[1])), default=(None, [])
    )
    summary = {
        "task": agent.cfg.task, "planner": agent.cfg.planner,
        "env_steps": agent.counters["env_step"], "episodes": agent.counters["episode"],
        "updates": agent.updates, "wall_seconds": round(agent.wall_seconds, 1),
        "final_eval_return": float(np.mean(final)) if final else None,
        "final_eval_env_step": last_step if final else None,
        "best_eval_return": float(np.mean(best[1])) if best[1] else None,
        "best_eval_env_step": best[0],
        "trajectories_per_decision": agent.cfg.trajectories_per_decision(),
    }  # fmt: skip
    common.atomic_write_json(out / "summary.json", summary)
    plot(out)
    if agent.cfg.video and not (out / "eval.gif").exists():
        write_video(agent, env, out / "eval.gif")
    return summary


def write_video(agent: Agent, env: DMCEnv, path: Path) -> bool:
    """Render one evaluation episode to a GIF; False (and one log line) without a GL backend."""
    frames: list[np.ndarray] = []
    try:
        _evaluate_agent(agent, env, [0], frames=frames)
    except RenderUnavailableError as err:
        log.warning("no video: %s", str(err).splitlines()[0])
        return False
    from PIL import Image

    images = [Image.fromarray(f) for f in frames[::2]]
    with common.atomic_open(path, "wb") as handle:
        images[0].save(handle, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(2000 * env.agent_step_seconds), loop=0)  # fmt: skip
    return True


# --------------------------------------------------------------------------- evaluation


def _restore_agent(cfg: DMCConfig, path: Path) -> tuple[Agent, DMCEnv]:
    """The agent of ``cfg`` with the checkpoint at ``path`` loaded, and its environment (the
    caller closes it; closed here if loading fails)."""
    env = make_env(cfg.task, seed=cfg.seed, action_repeat=cfg.repeat,
                   episode_steps=cfg.episode_steps)  # fmt: skip
    try:
        agent = Agent(cfg, env)
        agent.restore(common.load_checkpoint(path), path)
    except BaseException:
        env.close()
        raise
    return agent, env


def evaluate(
    out: Path, *, episodes: int, planner: str | None = None, device: str = "cpu",
    video: bool = False, sizes: tuple[int, int, int] | None = None, show_progress: bool = True,
    workers: int = 1, address: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate the latest checkpoint of the run in ``out`` with a noise-free planner.

    Args:
        out: run folder. episodes: evaluation episodes ``0..episodes-1`` (fixed seeds, the
            run's own evaluation episodes).
        planner: ``cem`` or ``latent`` (default: the run's); ``latent`` needs a run trained
            with the latent planner, ``cem`` works on any run (same world model).
        sizes: ``(candidates, elites, iterations)`` of that planner (default: the run's).
        video: also render the first episode to ``eval-{planner}.gif``.
        workers: processes that share the episodes (each loads the checkpoint and runs one
            torch thread); every episode is seeded by its index, so the returns do not depend
            on how many there are.
        address: run those processes as tasks of a Ray cluster (see
            :func:`common.run_jobs`).

    Returns:
        The record also written to ``eval/{planner}-{candidates}x{iterations}.json``: returns,
        mean, std, median with its bootstrap 95% interval (``median_ci95``), trajectories per
        decision, plan statistics (:func:`run_episode`, means over episodes), seconds.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if planner is not None and planner not in PLANNERS:
        raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {planner!r}")
    cfg = load_config(out, device=device)
    planner = planner or cfg.planner
    path = Path(out) / "ckpt" / "latest.pt"
    if not path.exists():
        raise RunFolderError(f"{out} has no checkpoint to evaluate (ckpt/latest.pt)")
    if planner == "latent" and cfg.planner != "latent":
        raise ValueError(f"planner latent needs a run trained with --planner latent; {out} "
                         f"was trained with {cfg.planner}")  # fmt: skip
    if sizes is not None and sizes[1] >= sizes[0]:
        raise ValueError(f"elites must be < candidates, got {sizes[1]} >= {sizes[0]}")
    workers = min(workers, episodes)
    start = time.perf_counter()
    results: dict[int, tuple[float, dict[str, Any]]] = {}
    trained: list[int] = []  # env steps of the checkpoint each job evaluated

    def gather(job: dict[str, Any]) -> None:
        results.update(job["episodes"])
        trained.append(job["env_step"])

    # a bar on a terminal, otherwise a log line per episode
    with common.RunProgress({str(i): 0 for i in range(episodes)}, episodes, show_progress,
                            experiment=f"eval {out} {planner}", unit="episodes done",
                            bar_unit="ep", job_noun="episodes", logger=log,
                            log_every=0.0) as advance:  # fmt: skip
        chunks = [(Path(out).resolve(), device, planner, sizes,
                   tuple(range(w, episodes, workers)), 1 if workers > 1 else None)
                  for w in range(workers)]  # fmt: skip
        common.run_jobs(_eval_job, chunks, workers, advance, gather, address=address)
    returns = [results[i][0] for i in range(episodes)]
    if video:
        agent, env = _restore_agent(cfg, path)
        try:
            _set_planner(agent, planner, sizes)
            write_video(agent, env, Path(out) / f"eval-{planner}.gif")
        finally:
            env.close()
    if sizes is not None:
        n_sample, n_iter = sizes[0], sizes[2]
    elif planner == "latent":
        n_sample, n_iter = cfg.latent_samples, cfg.latent_iter
    else:
        n_sample, n_iter = cfg.plan_samples, cfg.plan_iter
    median, lo, hi = common.bootstrap_ci95(returns)
    record = {
        "run": str(out), "task": cfg.task, "planner": planner,
        "env_steps_trained": trained[0], "episodes": episodes,
        "candidates": n_sample, "iterations": n_iter,
        "trajectories_per_decision": n_sample * n_iter,
        "returns": returns, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
        "median": median, "median_ci95": [lo, hi],
        **_mean_plans([results[i][1] for i in range(episodes)]),
        "workers": workers, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    common.atomic_write_json(Path(out) / "eval" / f"{planner}-{n_sample}x{n_iter}.json", record)
    return record


def _set_planner(agent: Agent, planner: str, sizes: tuple[int, int, int] | None) -> None:
    agent.planner = planner
    if sizes is not None:
        setattr(agent, "latent_sizes" if planner == "latent" else "cem_sizes", sizes)


def _eval_job(
    out: Path, device: str, planner: str, sizes: tuple[int, int, int] | None,
    episodes: tuple[int, ...], threads: int | None, *, progress: common.ProgressFn,
) -> dict[str, Any]:  # fmt: skip
    """Evaluation episodes ``episodes`` of the run in ``out`` (one job of :func:`evaluate`,
    in this process or a worker): ``{"episodes": {index: (return, plan statistics)},
    "env_step": the checkpoint's env steps}``."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = load_config(out, device=device)
    agent, env = _restore_agent(cfg, Path(out) / "ckpt" / "latest.pt")
    try:
        _set_planner(agent, planner, sizes)
        done: dict[int, tuple[float, dict[str, Any]]] = {}
        for i in episodes:
            plans: list[dict[str, Any]] = []
            ret = _evaluate_agent(agent, env, [i], plans=plans)[0]
            done[i] = (ret, plans[0])
            progress(str(i), 1)
    finally:
        env.close()
    return {"episodes": done, "env_step": agent.counters["env_step"]}


def compare_plans(out: Path, *, states: int = 12, seed: int = 0) -> dict[str, Any]:
    """Full CEM (1000/100/10) and latent DCEM plans on belief states of a phase-2 run's replay.

    For each planner, and for all-zero actions as a reference: the mean imagined return of
    its ``(states, horizon, a)`` plans under the run's model (prior mean, no sampling), the
    mean ``|a|`` of the plans and the fraction of actions with ``|a| > 0.95``. A latent
    planner whose plans the model rates higher than full CEM's while the environment rates
    them lower is exploiting model errors rather than searching badly.
    The belief states are the posteriors at the last step of ``states`` replay windows.
    """
    cfg = load_config(out)
    if cfg.planner != "latent":
        raise ValueError(f"compare_plans needs a run trained with --planner latent; {out} "
                         f"was trained with {cfg.planner}")  # fmt: skip
    path = Path(out) / "ckpt" / "latest.pt"
    agent, env = _restore_agent(cfg, path)
    env.close()
    if agent.decoder is None:
        raise CheckpointError(f"{path} holds no action decoder")
    decoder = agent.decoder
    batch = agent.replay.sample(states, cfg.seq_len)
    obs, act = (torch.as_tensor(batch[k], device=agent.device) for k in ("obs", "action"))
    gen = torch.Generator(agent.device).manual_seed(seed)
    with torch.no_grad():
        start = State(*(x[-1] for x in agent.model.observe(obs, act)[0]))
        plans = {
            "cem": plan(agent.model, start, action_low=agent.low, action_high=agent.high,
                        horizon=cfg.horizon, sample=cfg.plan_sample, generator=gen,
                        return_plan=True)[1],
            "latent": plan_latent(agent.model, decoder, start, sample=cfg.plan_sample,
                                  generator=gen, return_plan=True)[1],
        }  # fmt: skip
        plans["zero"] = torch.zeros_like(plans["cem"])
        result: dict[str, Any] = {"run": str(out), "states": states}
        for name, actions in plans.items():
            imagined = agent.model.imagined_return(start, actions.transpose(0, 1), sample=False)
            result[name] = {
                "imagined_return": float(imagined.mean()),
                "mean_abs_action": float(actions.abs().mean()),
                "saturated_fraction": float((actions.abs() > 0.95).float().mean()),
            }
    return result


def eval_records(runs: Sequence[Path]) -> list[dict[str, Any]]:
    """Every record :func:`evaluate` wrote in the ``eval/`` folders of ``runs``, in order."""
    records = []
    for run in runs:
        for path in sorted((Path(run) / "eval").glob("*.json")):
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return records


def plot_eval(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Box plot of evaluation returns per task and planner (the layout of the paper's fig. 4).

    One panel per task, one horizontal box per record (run and planner) from the top in the
    order given, labelled with the planner, the run folder's name, its imagined trajectories
    per decision and the number of episodes; rewards on a shared 0-1000 axis. Drawn from the
    records of :func:`evaluate` (and ``dcem.experiments.ppo.evaluate_run``) alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    rows = max(sum(r["task"] == t for r in records) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 0.9 + 0.8 * rows),
                             squeeze=False)  # fmt: skip
    names = {"cem": "Full CEM", "latent": "Latent DCEM", "ppo": "Latent DCEM+PPO"}
    colors = {"cem": "#3a87c0", "latent": "#a5183c", "ppo": "#7a68a6"}
    for ax, task in zip(axes[0], tasks, strict=True):
        group = [r for r in records if r["task"] == task][::-1]  # the first on top
        boxes = ax.boxplot([r["returns"] for r in group], orientation="horizontal", widths=0.6,
                           patch_artist=True, medianprops={"color": "0.15"})  # fmt: skip
        for patch, r in zip(boxes["boxes"], group, strict=True):
            patch.set_facecolor(colors.get(r["planner"], "0.6"))
        ax.set_yticks(range(1, len(group) + 1))
        ax.set_yticklabels([f"{names.get(r['planner'], r['planner'])}\n{Path(r['run']).name}\n"
                            f"{r['trajectories_per_decision']:,} traj./decision, "
                            f"{r['episodes']} ep." for r in group], fontsize=7)  # fmt: skip
        ax.set_xlim(0, 1000)
        ax.set(title=task, xlabel="Eval Reward")
        ax.grid(alpha=0.4, axis="x", ls=":")
    fig.tight_layout()
    return common.save_png(fig, path, dpi=100)


# --------------------------------------------------------------------------- figure


def _column(rows: list[dict[str, str]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(float(r["env_step"]), float(r[key])) for r in rows if r.get(key, "") != ""]
    data = np.asarray(pairs, dtype=float).reshape(-1, 2)
    return data[:, 0] / 1000.0, data[:, 1]


def _eval_means(rows: list[dict[str, str]]) -> Iterator[tuple[float, float]]:
    steps = sorted({int(r["env_step"]) for r in rows})
    for s in steps:
        yield s / 1000.0, float(np.mean([float(r["return"]) for r in rows
                                         if int(r["env_step"]) == s]))  # fmt: skip


def plot(out: Path) -> Path:
    """Draw ``training.png`` from ``metrics.csv`` alone (the paper's phase-1 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_csv(Path(out) / "metrics.csv")
    cfg = load_config(out)
    train_rows = [r for r in rows if r["phase"] != "eval"]
    evals = np.asarray(list(_eval_means([r for r in rows if r["phase"] == "eval"])))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    x, y = _column(train_rows, "return")
    axes[0].plot(x, y, color="#348ABD", label="train (with exploration noise)")
    if len(evals):
        # markers: a short run may have a single evaluation, which a line alone would hide
        axes[0].plot(evals[:, 0], evals[:, 1], color="#A60628", marker="o", ms=3,
                     label="eval (mean ± std)")  # fmt: skip
        spread = [
            (float(r["env_step"]) / 1000.0, float(r["return"]), float(r["return_std"]))
            for r in rows
            if r["phase"] == "eval" and r.get("return_std", "") != ""
        ]
        if spread:
            sx, sm, ss = np.asarray(spread).T
            axes[0].fill_between(sx, sm - ss, sm + ss, color="#A60628", alpha=0.2, lw=0)
    axes[0].legend(fontsize=8)
    panels = [("Episode Reward", None), ("Obs Loss", "obs_loss"), ("Rew Loss", "reward_loss"),
              ("KL Loss", "kl_raw")]  # fmt: skip
    for ax, (title, key) in zip(axes, panels, strict=True):
        if key is not None:
            x, y = _column(train_rows, key)
            ax.plot(x, y, color="#348ABD")
            if key == "obs_loss" and len(y) and np.all(y > 0):
                ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("1k Steps")
        ax.grid(alpha=0.3)
    name = "PlaNet+DCEM" if cfg.planner == "latent" else "PlaNet"
    fig.suptitle(f"{name} {cfg.task} ({cfg.planner} planner, "
                 f"{cfg.trajectories_per_decision():,} trajectories per decision)")  # fmt: skip
    fig.tight_layout()
    path = Path(out) / "training.png"
    return common.save_png(fig, path, dpi=100)


def known_tasks() -> str:
    """The task names, comma-separated (for error messages)."""
    return ", ".join(sorted(TASKS))
