"""Is a world model good enough to plan with? ``dcem dmc diagnose RUN`` (PlaNet runs).

On ``episodes`` held-out episodes, collected with the run's own training behaviour (its
planner plus exploration noise, or uniform random actions) and never stored in its replay:

* ``obs_r2``: reconstruction R² of every observation dimension from the filtered posterior
  (in the model's normalized units; R² is invariant to the per-dimension normalization);
* ``reward_r2``: R² of the reward predicted from the posterior;
* ``open_loop_reward_r2[k-1]``: R² of the reward predicted ``k = 1..horizon`` steps ahead,
  imagining with the prior mean under the actions that were actually taken, from every
  posterior state of the episodes;
* ``rank_correlation``: at ``states`` states of those episodes, Spearman's correlation between
  the imagined (prior mean) and the true ``horizon``-step return of ``sequences`` uniformly
  random action sequences (the true returns from the simulator restored to that state),
  mean and per state;
* ``planner``: the true return of the run's planner's plan from those states against the
  mean and the best true return of the random sequences, and the plan's imagined return.

R² is ``1 - sum (y - ŷ)² / sum (y - mean y)²`` over all rows (one value per dimension).
Written to ``RUN/diagnose/envNNNNNNN.{json,npz,png}`` (the checkpoint's environment step):
the JSON holds the numbers, the ``.npz`` the arrays they were computed from (so they can be
checked or reanalysed), the PNG one figure of the four.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcem.experiments import common, dmc
from dcem.experiments.common import RunFolderError
from dcem.world import State, plan

__all__ = ["POLICIES", "diagnose", "r2_score", "spearman"]

POLICIES = ("planner", "random")
DIAG_STREAM = 4


def r2_score(y: Tensor, pred: Tensor) -> Tensor:
    """Coefficient of determination per column: ``(N, k) -> (k,)`` (or ``(N,) -> ()``)."""
    resid = (y - pred).square().sum(0)
    total = (y - y.mean(0)).square().sum(0)
    return 1.0 - resid / total


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last dimension, ties sharing their average rank: ``(..., n)``."""
    below = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1)
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1)
    return below.to(x.dtype) + (equal.to(x.dtype) + 1) / 2


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation along the last dimension: ``(..., n) -> (...)``.

    The Pearson correlation of the ranks (average ranks for ties); NaN where either side is
    constant.
    """
    rx, ry = _ranks(x), _ranks(y.to(x.dtype))
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()


def _finite(values: Any) -> Any:
    """A float or list of floats with NaN/inf (a constant target) as None, for JSON."""
    if isinstance(values, list):
        return [_finite(v) for v in values]
    return float(values) if np.isfinite(values) else None


def _collect(
    agent: dmc.Agent, env: Any, episodes: int, policy: str, seed: int, bar: Any
) -> dict[str, np.ndarray]:
    """Held-out episodes, time-major: obs ``(T+1, E, o)``, action, reward, physics state."""
    cfg = agent.cfg
    gen = torch.Generator(agent.device).manual_seed(dmc._seed(cfg.seed, DIAG_STREAM, seed))
    data: dict[str, list[np.ndarray]] = {"obs": [], "action": [], "reward": [], "physics": []}
    for e in range(episodes):
        obs = env.reset(seed=dmc._seed(cfg.seed, DIAG_STREAM, seed, e))
        rows: dict[str, list[Any]] = {"obs": [obs], "reward": [0.0],
                                      "action": [np.zeros(env.action_size, np.float32)],
                                      "physics": [env.get_state()]}  # fmt: skip
        belief = agent.model.initial_state((1,))
        action = torch.zeros(env.action_size, device=agent.device)
        done = False
        while not done:
            if policy == "random":
                u = torch.rand(agent.low.shape, generator=gen, device=agent.device)
                action = agent.low + (agent.high - agent.low) * u
            else:
                belief, action = agent.act(belief, action, obs, explore=True, generator=gen)
            action_np = action.cpu().numpy().astype(np.float32)
            obs, reward, done = env.step(action_np)
            for key, value in (("obs", obs), ("action", action_np), ("reward", reward),
                               ("physics", env.get_state())):  # fmt: skip
                rows[key].append(value)
            bar.update(1)
        for key, value in rows.items():
            data[key].append(np.asarray(value))
    return {key: np.stack(value, axis=1) for key, value in data.items()}


def _true_returns(env: Any, physics: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """True returns of action sequences ``(R, H, a)`` from one simulator state: ``(R,)``."""
    returns = np.zeros(actions.shape[0])
    for i, seq in enumerate(actions):
        env.set_state(physics)
        for a in seq:
            _, reward, done = env.step(a)
            returns[i] += reward
            if done:
                break
    return returns


def diagnose(
    out: Path, *, ckpt: Path | None = None, episodes: int = 2, states: int = 8,
    sequences: int = 50, policy: str = "planner", seed: int = 0, device: str = "cpu",
    show_progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Diagnose the model of the dmc run in ``out`` (see the module docstring).

    Args:
        out: run folder. ckpt: checkpoint to diagnose (default ``out/ckpt/latest.pt``; the
            run keeps one per evaluation point, ``out/ckpt/envNNNNNNN.pt``).
        episodes: held-out episodes to collect. states: start states for the return tests,
            drawn uniformly from those episodes. sequences: random action sequences per state.
        policy: ``planner`` (the run's planner with its exploration noise) or ``random``.
        seed: seed of the held-out episodes and draws. device: torch device of the model.

    Returns:
        The record also written to ``out/diagnose/envNNNNNNN.json``.
    """
    for name, value in (("episodes", episodes), ("states", states), ("sequences", sequences)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if sequences < 2:
        raise ValueError(f"sequences must be >= 2 for a rank correlation, got {sequences}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    cfg = dmc.load_config(out, device=device)
    path = Path(ckpt) if ckpt is not None else Path(out) / "ckpt" / "latest.pt"
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: no checkpoint to diagnose")
    start_time = time.perf_counter()
    agent, env = dmc._restore_agent(cfg, path)
    agent.planner = "cem"  # the model is diagnosed with full-space CEM (any run has it)
    from tqdm.auto import tqdm

    try:
        steps = episodes * agent.cfg.agent_steps_per_episode
        with tqdm(total=steps, desc=f"diagnose {cfg.task}: collect", unit="step",
                  disable=None if show_progress else True) as bar:  # fmt: skip
            data = _collect(agent, env, episodes, policy, seed, bar)
        record, arrays = _measure(agent, env, data, states, sequences, seed)
    finally:
        env.close()
    record = {
        "run": str(out), "checkpoint": str(path), "task": cfg.task,
        "env_steps_trained": agent.counters["env_step"], "episodes": episodes,
        "policy": policy, "agent_steps": int(data["reward"].shape[0] - 1), **record,
        "seconds": round(time.perf_counter() - start_time, 1),
    }  # fmt: skip
    stem = Path(out) / "diagnose" / f"env{agent.counters['env_step']:07d}"
    common.atomic_write_json(stem.with_suffix(".json"), record)
    with common.atomic_open(stem.with_suffix(".npz"), "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    plot(record, arrays, stem.with_suffix(".png"))
    return record


@torch.no_grad()
def _measure(
    agent: dmc.Agent, env: Any, data: dict[str, np.ndarray], states: int, sequences: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    model, cfg, dev = agent.model, agent.cfg, agent.device
    dtype = model.obs_loc.dtype
    obs, actions, rewards = (torch.as_tensor(data[k], device=dev, dtype=dtype)
                             for k in ("obs", "action", "reward"))  # fmt: skip
    gen = torch.Generator(dev).manual_seed(dmc._seed(cfg.seed, DIAG_STREAM, seed, 1 << 20))
    post, _ = model.observe(obs, actions, generator=gen)
    n_rows, n_ep = obs.shape[:2]
    # reconstruction and posterior reward
    target = model.normalize(obs).reshape(n_rows * n_ep, -1)
    recon = model.predict_obs(post).reshape(n_rows * n_ep, -1)
    post_reward = model.predict_reward(post)[1:].reshape(-1)
    true_reward = rewards[1:].reshape(-1)
    # open loop from every posterior state with H steps of actions after it
    h = cfg.horizon
    starts = n_rows - h
    if starts < 1:
        raise ValueError(f"episodes of {n_rows - 1} agent steps are shorter than the horizon {h}")
    start = State(*(x[:starts].reshape(starts * n_ep, -1) for x in post))
    future = torch.stack([actions[1 + k : 1 + k + starts] for k in range(h)])  # (H, S, E, a)
    imagined = model.imagine(start, future.reshape(h, starts * n_ep, -1), sample=False)
    actual = torch.stack([rewards[1 + k : 1 + k + starts] for k in range(h)])
    open_pred, open_true = imagined, actual.reshape(h, -1)
    open_r2 = r2_score(open_true.t(), open_pred.t())
    # returns of random sequences and of the planner from chosen states
    rng = np.random.default_rng(dmc._seed(cfg.seed, DIAG_STREAM, seed, 2))
    pick = rng.choice(starts * n_ep, size=min(states, starts * n_ep), replace=False)
    low, high = env.action_low, env.action_high
    rand = rng.uniform(low, high, size=(len(pick), sequences, h, env.action_size))
    rand = rand.astype(np.float32)
    chosen = State(*(x[pick] for x in start))
    rep = State(*(x.repeat_interleave(sequences, 0) for x in chosen))
    rand_t = torch.as_tensor(rand, device=dev, dtype=dtype)
    rand_imag = model.imagine(rep, rand_t.reshape(-1, h, env.action_size).transpose(0, 1),
                              sample=False).sum(0).view(len(pick), sequences)  # fmt: skip
    physics = data["physics"][:starts].reshape(starts * n_ep, -1)[pick]
    n_sample, n_elite, n_iter = agent.cem_sizes
    _, plans = plan(model, chosen, action_low=agent.low, action_high=agent.high, horizon=h,
                    n_iter=n_iter, n_sample=n_sample, n_elite=n_elite, sample=False,
                    generator=gen, return_plan=True)  # type: ignore[misc]  # fmt: skip
    plan_imag = model.imagine(chosen, plans.transpose(0, 1), sample=False).sum(0)
    plans_np = plans.cpu().numpy()
    rand_true = np.stack([_true_returns(env, physics[i], rand[i]) for i in range(len(pick))])
    plan_true = np.array([_true_returns(env, physics[i], plans_np[i : i + 1])[0]
                          for i in range(len(pick))])  # fmt: skip
    rho = spearman(rand_imag.double().cpu(), torch.as_tensor(rand_true)).numpy()
    arrays = {
        "obs_target": target.cpu().numpy(), "obs_pred": recon.cpu().numpy(),
        "reward_target": true_reward.cpu().numpy(), "reward_pred": post_reward.cpu().numpy(),
        "open_loop_target": open_true.cpu().numpy(), "open_loop_pred": open_pred.cpu().numpy(),
        "random_imagined": rand_imag.cpu().numpy(), "random_true": rand_true,
        "plan_imagined": plan_imag.cpu().numpy(), "plan_true": plan_true,
    }  # fmt: skip
    obs_r2 = r2_score(target, recon)
    record = {
        "obs_r2": _finite(obs_r2.tolist()),
        "obs_r2_mean": _finite(float(obs_r2[obs_r2.isfinite()].mean())),
        "reward_r2": _finite(float(r2_score(true_reward, post_reward))),
        "open_loop_reward_r2": _finite(open_r2.tolist()),
        "rank_correlation": _finite(float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan),
        "rank_correlation_per_state": _finite(rho.tolist()),
        "states": len(pick), "sequences": sequences, "horizon": h,
        "planner": {
            "sizes": [n_sample, n_elite, n_iter],
            "true_return": float(plan_true.mean()),
            "imagined_return": float(plan_imag.mean()),
            "random_true_return_mean": float(rand_true.mean()),
            "random_true_return_best": float(rand_true.max(1).mean()),
        },
    }  # fmt: skip
    return record, arrays


def plot(record: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> Path:
    """The diagnostic's figure: reconstruction R² per dimension, open-loop reward R² per step,
    imagined vs true returns of random sequences, and the planner against random sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    r2 = np.asarray([np.nan if v is None else v for v in record["obs_r2"]], dtype=float)
    axes[0].bar(np.arange(len(r2)), np.clip(r2, -1, 1), color="#348ABD")
    axes[0].set(title=f"Reconstruction R² (reward R² {record['reward_r2'] or np.nan:.2f})",
                xlabel="observation dimension", ylim=(-1, 1))  # fmt: skip
    steps = np.arange(1, len(record["open_loop_reward_r2"]) + 1)
    axes[1].plot(
        steps,
        np.maximum(np.asarray(record["open_loop_reward_r2"], dtype=float), -1),
        marker="o",
        color="#A60628",
    )
    axes[1].set(
        title="Open-loop reward R² (clipped at -1)", xlabel="imagined step", ylim=(-1.05, 1)
    )
    for imag, true in zip(arrays["random_imagined"], arrays["random_true"], strict=True):
        axes[2].scatter(true, imag, s=6, alpha=0.6)
    axes[2].set(title=f"Random sequences (Spearman {record['rank_correlation'] or np.nan:.2f})",
                xlabel="true return", ylabel="imagined return")  # fmt: skip
    p = record["planner"]
    names = ["random mean", "random best", "planner"]
    axes[3].bar(names, [p["random_true_return_mean"], p["random_true_return_best"],
                        p["true_return"]], color=["#999999", "#777777", "#A60628"])  # fmt: skip
    axes[3].set(title=f"True {record['horizon']}-step return", ylabel="return")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{record['task']} after {record['env_steps_trained']:,} env steps "
        f"({record['episodes']} held-out episodes, {record['policy']} policy)"
    )
    fig.tight_layout()
    return common.save_png(fig, path, dpi=90)


def load(path: Path) -> dict[str, Any]:
    """A diagnose record written by :func:`diagnose`."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
