"""``dcem dmc ppo``: PPO into the latent-DCEM controller of a phase-2 run (Algorithm 3, phase 3).

A run reads top to bottom: load the phase-2 world model and decoder, then for each PPO step
collect ``episodes_per_step`` episodes with the stochastic policy (:class:`DCEMPolicy`), compute
GAE advantages, take ``passes`` passes of minibatch updates of the clipped objective plus the
value loss, checkpoint, and every ``eval_every`` steps evaluate the noise-free controller on
the phase-2 run's own evaluation episodes (same seeds: before/after comparisons are paired).
``metrics.csv`` has a row per PPO step (and per evaluation), ``ppo.png`` the curves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcem.experiments import common, dmc
from dcem.experiments.common import CheckpointError
from dcem.experiments.ppo_config import ADDED, PPOConfig
from dcem.world import State, make_env
from dcem.world.ppo import DCEMPolicy, clipped_surrogate, gae

__all__ = ["EXPERIMENT", "METRIC_FIELDS", "plot", "train"]

log = logging.getLogger(__name__)

EXPERIMENT = "ppo"
CKPT_VERSION = 1
METRIC_FIELDS = [
    "ppo_step", "phase", "return", "return_std", "eval_returns", "policy_loss", "value_loss",
    "ratio_first_max_dev", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction",
    "approx_kl", "std", "env_steps", "episode_seconds", "update_seconds", "peak_memory_mb",
    "wall_seconds", "minibatches",
]  # fmt: skip
"""Train rows: one per PPO step (``return``: mean of its episodes; the ratio statistics over
its minibatches; ``ratio_first_max_dev``: max ``|ratio - 1|`` of the first minibatch, before
any gradient step: 0 up to rounding; ``minibatches``: the gradient steps taken, fewer than
``passes`` times the batch's when ``target_kl`` stopped them; ``peak_memory_mb``: on CUDA
the allocator's peak during the update, otherwise the process's peak resident memory so
far). Eval rows: ``return`` mean, ``return_std``, each episode's return in ``eval_returns``."""
TRAIN_STREAM, VALUE_STREAM, EVAL_STREAM = 11, 12, dmc.EVAL_STREAM


class Run:
    """The phase-2 agent's model and decoder as a :class:`DCEMPolicy`, its optimizer and
    counters; ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg = cfg
        phase2 = Path(cfg.init_from)
        base = dmc.load_config(phase2, device=cfg.device)
        if base.planner != "latent":
            raise ValueError(f"init_from: {phase2} was trained with --planner {base.planner}; "
                             "PPO needs a phase-2 run (--planner latent)")  # fmt: skip
        path = phase2 / "ckpt" / "latest.pt"
        if not path.exists():
            raise common.RunFolderError(f"init_from: {phase2} has no checkpoint yet")
        self.base = dataclasses.replace(base, compile=False)
        steps = cfg.episode_steps or base.episode_steps
        self.env = make_env(base.task, seed=base.seed, action_repeat=base.repeat,
                            episode_steps=steps)  # fmt: skip
        agent = dmc.Agent(self.base, self.env)
        state = common.load_checkpoint(path)
        try:
            agent.model.load_state_dict(state["model"])
            assert agent.decoder is not None  # a latent agent has one
            agent.decoder.load_state_dict(state["decoder"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"init_from: {path} does not fit its config: {err}") from err
        self.low, self.high = agent.low, agent.high
        with torch.random.fork_rng(devices=[]):  # the value head's init, seeded
            torch.manual_seed(dmc._seed(cfg.seed, VALUE_STREAM))
            self.policy = DCEMPolicy(
                agent.model, agent.decoder, n_sample=base.latent_samples,
                n_elite=base.latent_elites, n_iter=base.latent_iter, tau=base.latent_tau,
                std=cfg.std, learn_std=cfg.learn_std, backward=cfg.dcem_backward,  # type: ignore[arg-type]
            )  # fmt: skip
        self.policy.fine_tune(cfg.parts)
        heads = [*self.policy.value.parameters()]
        if cfg.learn_std:
            heads.append(self.policy.log_std)
        self.optimizer = torch.optim.Adam([
            {"params": self.policy.part_parameters(cfg.parts), "lr": cfg.lr},
            {"params": heads, "lr": cfg.value_lr},
        ])  # fmt: skip
        self.device = agent.device
        self.generator = torch.Generator(self.device).manual_seed(
            dmc._seed(cfg.seed, TRAIN_STREAM))  # fmt: skip
        self.counters = {"ppo_step": 0, "evals": 0, "env_steps": 0}
        self.wall_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"version": CKPT_VERSION, "config": self.cfg.to_json(),
                "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "counters": dict(self.counters),
                "wall_seconds": self.wall_seconds}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if state.get("version") != CKPT_VERSION:
            raise CheckpointError(f"{path} has format version {state.get('version')!r}, "
                                  f"expected {CKPT_VERSION}")  # fmt: skip
        detail = common.config_diff(state.get("config", {}), self.cfg.to_json())
        if detail:
            raise CheckpointError(f"{path} was written with another config ({detail})")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        self.wall_seconds = float(state["wall_seconds"])


# --------------------------------------------------------------------------- episodes


@torch.no_grad()
def episode(run: Run, seed: int, generator: torch.Generator, explore: bool) -> dict[str, Any]:
    """One episode with the policy: sampled actions (``explore``) or the noise-free mean.

    Returns the return and, per decision, the belief (a :class:`State` of ``(T, ·)``), DCEM
    seed, unclipped action, log-probability, value and reward, and the last belief's value.
    """
    model, policy = run.policy.model, run.policy
    obs = run.env.reset(seed=seed)
    belief = model.initial_state((1,))
    action = torch.zeros(run.env.action_size, device=run.device)
    steps: list[dict[str, Any]] = []
    done = False
    while not done:
        obs_t = torch.as_tensor(obs, device=run.device)[None]
        belief = model.belief(belief, action[None], obs_t, generator=generator)
        d = policy.act(belief, generator, explore=explore)
        action = torch.maximum(torch.minimum(d["action"][0], run.high), run.low)
        obs, reward, done = run.env.step(action.cpu().numpy().astype(np.float32))
        steps.append({**d, "belief": belief, "reward": reward})
    last = policy.value(policy.features(model.belief(belief, action[None], torch.as_tensor(
        obs, device=run.device)[None], generator=generator)))[0, 0]  # fmt: skip
    return {
        "return": float(sum(s["reward"] for s in steps)),
        "belief": State(*(torch.cat([s["belief"][i] for s in steps]) for i in range(4))),
        **{k: torch.cat([s[k] for s in steps]) for k in ("seed", "action", "logp", "value")},
        "reward": torch.tensor([s["reward"] for s in steps], device=run.device),
        "last_value": last,
    }


def _eval_episode(run: Run, i: int) -> dict[str, Any]:
    """Noise-free evaluation episode ``i``: the seeds ``dcem dmc eval`` gives its episode ``i``
    on the phase-2 run, so PPO's returns pair with the latent planner's episode by episode."""
    seed = run.base.seed
    gen = torch.Generator(run.device).manual_seed(dmc._seed(seed, EVAL_STREAM, i))
    return episode(run, dmc._seed(seed, EVAL_STREAM, i, 1), gen, explore=False)


def evaluate(run: Run) -> list[float]:
    """Returns of the noise-free controller on the phase-2 run's evaluation episodes."""
    return [_eval_episode(run, i)["return"] for i in range(run.cfg.eval_episodes)]


def _record(out: Path) -> dict[str, Any] | None:
    """``out/config.json`` if it records a ``dcem dmc ppo`` run, else ``None``."""
    try:
        record = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("experiment") == EXPERIMENT else None


def is_run(out: Path) -> bool:
    """Whether ``out/config.json`` records a ``dcem dmc ppo`` run."""
    return _record(out) is not None


def load_run(out: Path, device: str = "cpu") -> Run:
    """The PPO run in ``out`` at its latest checkpoint (errors name the folder)."""
    record = _record(out)
    if record is None:
        raise common.RunFolderError(f"{out} is not a dcem dmc ppo run folder (config.json)")
    known = {f.name for f in dataclasses.fields(PPOConfig)}
    cfg = PPOConfig(**{k: v for k, v in record["config"].items() if k in known}, device=device)
    run = Run(cfg)
    ckpt = Path(out) / "ckpt" / "latest.pt"
    if not ckpt.exists():
        run.env.close()
        raise common.RunFolderError(f"{out} has no checkpoint to evaluate (ckpt/latest.pt)")
    run.load_state_dict(common.load_checkpoint(ckpt), ckpt)
    return run


def evaluate_run(
    out: Path, *, episodes: int, device: str = "cpu", workers: int = 1,
    show_progress: bool = True, address: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate the latest checkpoint of the PPO run in ``out`` like ``dcem dmc eval`` a
    phase-2 run: noise-free episodes ``0..episodes-1`` with that run's seeds, in ``workers``
    processes (Ray tasks with ``address``, see :func:`common.run_jobs`). Returns the record
    also written to ``eval/ppo-{candidates}x{iterations}.json`` (the fields of
    :func:`dcem.experiments.dmc.evaluate`'s record, planner ``"ppo"``)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    run = load_run(out, device)  # refuses a wrong folder before any worker starts
    base, steps = run.base, run.counters["ppo_step"]
    run.env.close()
    workers = min(workers, episodes)
    start = time.perf_counter()
    results: dict[int, tuple[float, float]] = {}
    with common.RunProgress({str(i): 0 for i in range(episodes)}, episodes, show_progress,
                            experiment=f"eval {out} ppo", unit="episodes done", bar_unit="ep",
                            job_noun="episodes", logger=log, log_every=0.0) as advance:  # fmt: skip
        chunks = [(Path(out).resolve(), device, tuple(range(w, episodes, workers)),
                   1 if workers > 1 else None) for w in range(workers)]  # fmt: skip
        common.run_jobs(_eval_job, chunks, workers, advance,
                        lambda job: results.update(job["episodes"]), address=address)  # fmt: skip
    returns = [results[i][0] for i in range(episodes)]
    median, lo, hi = common.bootstrap_ci95(returns)
    record = {
        "run": str(out), "task": base.task, "planner": "ppo", "ppo_steps": steps,
        "episodes": episodes, "candidates": base.latent_samples, "iterations": base.latent_iter,
        "trajectories_per_decision": base.latent_samples * base.latent_iter,
        "returns": returns, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
        "median": median, "median_ci95": [lo, hi],
        "saturated_fraction": float(np.mean([results[i][1] for i in range(episodes)])),
        "workers": workers, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    record.update(_paired_with_start(out, returns))
    name = f"ppo-{base.latent_samples}x{base.latent_iter}.json"
    common.atomic_write_json(Path(out) / "eval" / name, record)
    return record


def _paired_with_start(out: Path, returns: list[float]) -> dict[str, Any]:
    """The evaluation before the first PPO step (``metrics.csv``), episode by episode against
    ``returns`` (the same seeds): ``before_returns`` and the mean paired difference with its
    Student-t and bootstrap 95% intervals over the episodes both have; ``{}`` without it."""
    path = Path(out) / "metrics.csv"
    rows = common.read_csv(path) if path.is_file() else []
    first = next((r for r in rows if r["phase"] == "eval" and r["ppo_step"] == "0"), None)
    before = [float(x) for x in (first or {}).get("eval_returns", "").split()]
    n = min(len(before), len(returns))
    return {"before_returns": before[:n], **_paired(before[:n], returns[:n])} if n > 1 else {}


def _paired(before: list[float], after: list[float]) -> dict[str, Any]:
    """Mean of ``after - before`` (the same episodes) with its Student-t and bootstrap 95%
    intervals."""
    diff = np.asarray(after) - np.asarray(before)
    mean, half = common.mean_ci95(diff)
    _, lo, hi = common.bootstrap_ci95(diff, np.mean)
    return {"paired_difference": float(mean),
            "paired_difference_t95": [float(mean - half), float(mean + half)],
            "paired_difference_bootstrap95": [lo, hi]}  # fmt: skip


def _eval_job(
    out: Path, device: str, episodes: tuple[int, ...], threads: int | None, *,
    progress: common.ProgressFn,
) -> dict[str, Any]:  # fmt: skip
    """Episodes ``episodes`` of :func:`evaluate_run` (in this process or a worker):
    ``{"episodes": {index: (return, share of action components in the outer 2.5% of their
    range at either end)}}``."""
    if threads is not None:
        torch.set_num_threads(threads)
    run = load_run(out, device)
    try:
        done = {}
        for i in episodes:
            ep = _eval_episode(run, i)
            low, high = run.low.cpu().numpy(), run.high.cpu().numpy()
            clipped = np.clip(ep["action"].cpu().numpy(), low, high)
            share = dmc.saturated_count(clipped, low, high) / clipped.size
            done[i] = (ep["return"], share)
            progress(str(i), 1)
    finally:
        run.env.close()
    return {"episodes": done}


# --------------------------------------------------------------------------- one PPO step


def ppo_step(run: Run) -> dict[str, Any]:
    """Collect ``episodes_per_step`` episodes, then ``passes`` passes of minibatch updates."""
    cfg, c = run.cfg, run.counters
    tick = time.perf_counter()
    eps = [episode(run, dmc._seed(cfg.seed, TRAIN_STREAM, c["ppo_step"], e), run.generator,
                   explore=True) for e in range(cfg.episodes_per_step)]  # fmt: skip
    collect = time.perf_counter() - tick
    adv, ret = gae(
        torch.stack([e["reward"] for e in eps], 1),
        torch.stack([e["value"] for e in eps], 1),
        torch.stack([e["last_value"] for e in eps]),
        gamma=cfg.gamma,
        lam=cfg.lam,
    )
    batch: dict[str, Any] = {
        "belief": State(*(torch.cat([e["belief"][i] for e in eps]) for i in range(4))),
        **{k: torch.cat([e[k] for e in eps]) for k in ("seed", "action", "logp")},
        "adv": adv.T.reshape(-1), "ret": ret.T.reshape(-1),
    }  # fmt: skip
    n = batch["adv"].shape[0]
    stats: list[dict[str, float]] = []
    losses: list[tuple[float, float]] = []
    first_dev = None
    stopped = False  # by target_kl
    tick = time.perf_counter()
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    for _ in range(cfg.passes):
        if stopped:
            break
        order = torch.randperm(n, generator=run.generator, device=run.device)
        for idx in order.split(cfg.minibatch):
            state = State(*(x[idx] for x in batch["belief"]))
            logp, value = run.policy.evaluate(state, batch["seed"][idx], batch["action"][idx])
            a = batch["adv"][idx]
            a = (a - a.mean()) / (a.std(correction=0) + 1e-8) if a.numel() > 1 else a
            policy_loss, s = clipped_surrogate(logp, batch["logp"][idx], a, clip=cfg.clip)
            value_loss = 0.5 * (value - batch["ret"][idx]).square().mean()
            if first_dev is None:
                first_dev = max(abs(s["ratio_min"] - 1), abs(s["ratio_max"] - 1))
            run.optimizer.zero_grad()
            (policy_loss + value_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            run.optimizer.step()
            stats.append(s)
            losses.append((float(policy_loss.detach()), float(value_loss.detach())))
            stopped = cfg.target_kl > 0 and s["approx_kl"] > cfg.target_kl
            if stopped:
                break
    update = time.perf_counter() - tick
    peak = (torch.cuda.max_memory_allocated(run.device) / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    c["env_steps"] += cfg.episodes_per_step * run.env.steps  # episodes of one length
    returns = [e["return"] for e in eps]
    row = {
        "ppo_step": c["ppo_step"], "phase": "train", "return": float(np.mean(returns)),
        "return_std": float(np.std(returns)), "policy_loss": float(np.mean([x for x, _ in losses])),
        "value_loss": float(np.mean([v for _, v in losses])), "ratio_first_max_dev": first_dev,
        **{k: float(np.mean([s[k] for s in stats])) for k in ("ratio_mean", "clip_fraction",
                                                              "approx_kl")},
        "ratio_min": min(s["ratio_min"] for s in stats),
        "ratio_max": max(s["ratio_max"] for s in stats),
        "std": float(run.policy.log_std.exp().mean()), "env_steps": c["env_steps"],
        "episode_seconds": round(collect / cfg.episodes_per_step, 2),
        "update_seconds": round(update, 2), "peak_memory_mb": round(peak, 1),
        "minibatches": len(stats),
    }  # fmt: skip
    c["ppo_step"] += 1
    return row


# --------------------------------------------------------------------------- the run


def _eval_row(run: Run) -> dict[str, Any]:
    tick = time.perf_counter()
    returns = evaluate(run)
    run.wall_seconds += time.perf_counter() - tick
    log.info("eval after %d PPO steps: mean %.1f over %s", run.counters["ppo_step"],
             float(np.mean(returns)), ", ".join(f"{r:.1f}" for r in returns))  # fmt: skip
    return {"ppo_step": run.counters["ppo_step"], "phase": "eval",
            "return": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "eval_returns": " ".join(f"{r:.2f}" for r in returns),
            "env_steps": run.counters["env_steps"],
            "wall_seconds": round(run.wall_seconds, 2)}  # fmt: skip


def train(cfg: PPOConfig, out: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) PPO in ``out``; returns the summary (also ``summary.json``).

    An evaluation before the first update (step 0) and after every ``eval_every`` updates; a
    checkpoint after each update and evaluation, so an interrupted run loses at most one.
    """
    out = Path(out)
    common.check_out_folder(out, EXPERIMENT, cfg.to_json(), ADDED)
    run = Run(cfg)  # refuses a wrong init_from before anything is written
    try:
        with common.lock_folder(out):
            if not (out / "config.json").exists():
                common.atomic_write_json(
                    out / "config.json", common.run_record(EXPERIMENT, cfg.to_json())
                )
            path = out / "ckpt" / "latest.pt"
            if path.exists():
                run.load_state_dict(common.load_checkpoint(path), path)
                step, evals = run.counters["ppo_step"], run.counters["evals"]
                done = evals == _points(cfg, step)  # the evaluation at ``step`` is in
                common.truncate_csv(out / "metrics.csv", METRIC_FIELDS, lambda r: int(
                    r["ppo_step"]) < step or (r["phase"] == "eval" and done and int(
                        r["ppo_step"]) == step))  # fmt: skip
            _loop(run, out, show_progress)
            summary = _summary(out)
            common.atomic_write_json(out / "summary.json", summary)
            plot(out)
    finally:
        run.env.close()
    return summary


def _points(cfg: PPOConfig, step: int) -> int:
    """Evaluations due up to and including PPO step ``step``: at 0, every ``eval_every``
    steps and at the last step."""
    last = step == cfg.ppo_steps and step % cfg.eval_every != 0
    return step // cfg.eval_every + 1 + int(last)


def _loop(run: Run, out: Path, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    cfg, c = run.cfg, run.counters
    bar = tqdm(total=cfg.ppo_steps, initial=c["ppo_step"], unit="step", desc="ppo",
               disable=None if show_progress else True, dynamic_ncols=True)  # fmt: skip
    with bar:
        while True:
            if c["evals"] < _points(cfg, c["ppo_step"]):
                _save(run, out, [_eval_row(run)], evaluated=True)
            if c["ppo_step"] >= cfg.ppo_steps:
                return
            tick = time.perf_counter()
            row = ppo_step(run)
            run.wall_seconds += time.perf_counter() - tick
            row["wall_seconds"] = round(run.wall_seconds, 2)
            _save(run, out, [row])
            bar.update(1)
            bar.set_postfix_str(f"return {row['return']:.0f} kl {row['approx_kl']:.2g}")
            if bar.disable:
                log.info("PPO step %d / %d: return %.1f, approx KL %.3g (%.0f s)",
                         c["ppo_step"], cfg.ppo_steps, row["return"], row["approx_kl"],
                         run.wall_seconds)  # fmt: skip


def _save(run: Run, out: Path, rows: list[dict[str, Any]], evaluated: bool = False) -> None:
    if evaluated:
        run.counters["evals"] += 1
    common.append_csv(out / "metrics.csv", METRIC_FIELDS, rows)
    common.save_checkpoint(out / "ckpt" / "latest.pt", run.state_dict())


def _summary(out: Path) -> dict[str, Any]:
    rows = common.read_csv(out / "metrics.csv")
    evals = [r for r in rows if r["phase"] == "eval"]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    before = [float(x) for x in first.get("eval_returns", "").split()]
    after = [float(x) for x in last.get("eval_returns", "").split()]
    summary = {
        "experiment": EXPERIMENT,
        "ppo_steps": int(rows[-1]["ppo_step"]) if rows else 0,
        "eval_return_before": float(first["return"]) if first else None,
        "eval_return_after": float(last["return"]) if last else None,
        "eval_returns_before": before,
        "eval_returns_after": after,
    }
    if len(evals) > 1 and len(before) == len(after) > 1:
        # the evaluations replay the same episode seeds: after - before, episode by episode
        summary.update(_paired(before, after))
    return summary


def plot(out: Path) -> Path:
    """``ppo.png`` from ``metrics.csv`` alone: returns against PPO steps (the layout of the
    paper's ``ppo-cheetah.png``), approximate KL and clip fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_csv(Path(out) / "metrics.csv")
    train_rows = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot([int(r["ppo_step"]) + 1 for r in train_rows], [float(r["return"]) for r in train_rows],
             ".-", alpha=0.6, label="train (with action noise)")  # fmt: skip
    ax1.errorbar([int(r["ppo_step"]) for r in evals], [float(r["return"]) for r in evals],
                 [float(r["return_std"]) for r in evals], fmt="o-", capsize=3,
                 label="eval (noise-free)")  # fmt: skip
    ax1.set(xlabel="PPO step", ylabel="return", title="PPO into latent DCEM")
    ax1.legend(fontsize=8)
    ax2.plot(
        [int(r["ppo_step"]) for r in train_rows],
        [float(r["approx_kl"]) for r in train_rows],
        ".-",
        label="approx. KL",
    )
    ax2.plot(
        [int(r["ppo_step"]) for r in train_rows],
        [float(r["clip_fraction"]) for r in train_rows],
        ".-",
        label="clip fraction",
    )
    ax2.set(xlabel="PPO step", title="policy change per step")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / "ppo.png"
    return common.save_png(fig, path, dpi=100)
