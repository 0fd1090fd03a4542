"""Tests of the dm_control wrapper dcem.world.envs against the raw control suite, and (slow)
an RSSM trained on a real cartpole-swingup recording."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcem.world import RSSM, TASKS, ReplayBuffer, flatten_observation, make_env

suite = pytest.importorskip("dm_control.suite", reason="dm_control is not installed")


def raw_env(name: str, seed: int):
    spec = TASKS[name]
    return suite.load(spec.domain, spec.task, task_kwargs={"random": seed})


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError) as info:
        make_env("cheetah-fly")
    for name in ("cheetah-run", "walker-walk", "cartpole-swingup"):
        assert name in str(info.value)


def test_flatten_observation_keeps_key_order_and_scalars():
    obs = {"orientations": np.arange(4.0).reshape(2, 2), "height": np.float64(7.0), "v": [8, 9]}
    flat = flatten_observation(obs, ("orientations", "height", "v"))
    assert flat.dtype == np.float32
    assert np.array_equal(flat, [0, 1, 2, 3, 7, 8, 9])


def test_env_matches_raw_suite_with_action_repeat():
    env, raw = make_env("cartpole-swingup", seed=3), raw_env("cartpole-swingup", seed=3)
    assert (env.obs_size, env.action_size, env.action_repeat) == (5, 1, 8)
    assert env.obs_keys == ("position", "velocity")
    assert np.array_equal(env.action_low, [-1.0]) and np.array_equal(env.action_high, [1.0])
    obs = env.reset()
    expected = raw.reset().observation
    assert obs.dtype == np.float32 and obs.shape == (5,)
    expected = np.concatenate([expected["position"], expected["velocity"]]).astype(np.float32)
    np.testing.assert_array_equal(obs, expected)
    for action in (0.7, -1.0, 0.2):
        obs, reward, done = env.step(np.array([action]))
        rewards = [raw.step([action]) for _ in range(8)]
        assert reward == pytest.approx(sum(ts.reward for ts in rewards), rel=1e-12)
        last = rewards[-1].observation
        np.testing.assert_allclose(obs, np.concatenate([last["position"], last["velocity"]]))
        assert not done
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(2))


def test_seeding():
    first = [make_env("cheetah-run", seed=s).reset() for s in (1, 1, 2)]
    assert first[0].shape == (17,)
    assert np.array_equal(first[0], first[1]) and not np.array_equal(first[0], first[2])


def test_episode_ends_after_1000_environment_steps():
    env = make_env("cartpole-swingup", seed=0)
    assert env.max_agent_steps == 125
    env.reset()
    steps, done = 0, False
    while not done:
        _, _, done = env.step(np.zeros(1))
        steps += 1
    assert steps == 125
    short = make_env("cartpole-swingup", episode_steps=20)  # 8 + 8 + 4 environment steps
    short.reset()
    assert [short.step(np.zeros(1))[2] for _ in range(3)] == [False, False, True]


def test_render_or_clear_error():
    script = (
        "from dcem.world import make_env, RenderUnavailableError\n"
        "env = make_env('cartpole-swingup'); env.reset()\n"
        "try:\n"
        "    frame = env.render(height=32, width=48)\n"
        "except RenderUnavailableError:\n"
        "    print('unavailable')\n"
        "else:\n"
        "    print(frame.shape, frame.dtype)\n"
    )
    env = {**os.environ, "MUJOCO_GL": "egl"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0 and "MUJOCO_GL" in out.stderr:
        pytest.skip("no EGL backend on this machine: dm_control cannot import it")
    assert out.returncode == 0, out.stderr[-2000:]
    if "unavailable" in out.stdout:
        pytest.skip("no EGL backend on this machine: render raised RenderUnavailableError")
    assert "(32, 48, 3) uint8" in out.stdout


def _record(env, rng: np.random.Generator, buffer: ReplayBuffer, episodes: int) -> None:
    for _ in range(episodes):
        buffer.start_episode(env.reset())
        done = False
        while not done:
            action = rng.uniform(env.action_low, env.action_high).astype(np.float32)
            obs, reward, done = env.step(action)
            buffer.add_step(action, reward, obs, done)


@pytest.mark.slow
def test_model_trained_on_real_cartpole_predicts_held_out_rewards():
    """Record random cartpole-swingup episodes, train a small RSSM from the replay buffer for
    400 updates, and predict the rewards of a held-out episode (filtered from its posterior)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env, rng = make_env("cartpole-swingup", seed=0), np.random.default_rng(0)
        train, held_out = ReplayBuffer(5, 1, seed=0), ReplayBuffer(5, 1)
        _record(env, rng, train, episodes=5)
        _record(env, rng, held_out, episodes=1)
        torch.manual_seed(0)
        model = RSSM(5, 1, deter_size=64, stoch_size=8, hidden_size=64)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(400):
            batch = {k: torch.from_numpy(v) for k, v in train.sample(16, 30).items()}
            terms = model.loss(batch["obs"], batch["action"], batch["reward"])
            optimizer.zero_grad()
            terms.total.backward()
            optimizer.step()
        rows = {k: torch.from_numpy(v)[:, None] for k, v in held_out.state_dict().items()
                if k in ("obs", "action", "reward")}  # fmt: skip
        with torch.no_grad():
            post, _ = model.observe(rows["obs"], rows["action"])
            predicted = model.predict_reward(post)[1:]
        rewards = rows["reward"][1:]
        constant = ((rewards - rewards.mean()) ** 2).mean()
        assert ((predicted - rewards) ** 2).mean() < 0.8 * constant
    finally:
        torch.set_num_threads(threads)
