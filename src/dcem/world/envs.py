"""DeepMind Control Suite tasks from proprioceptive state, with PlaNet's action repeat.

``make_env("cheetah-run", seed=0)`` loads the task through ``dm_control`` (an optional
dependency: ``pip install 'dcem[dmc]'``). The observation dictionary is flattened into one
``float32`` vector in the task's own, fixed key order (``DMCEnv.obs_keys``). One agent step
repeats the action ``action_repeat`` times and sums the rewards; an episode lasts
``episode_steps`` = 1000 environment steps, i.e. ``ceil(1000 / action_repeat)`` agent steps.

Rendering needs an OpenGL backend that ``dm_control`` selects from the ``MUJOCO_GL``
environment variable when it is first imported (``egl`` on a headless GPU machine, ``osmesa``
in software). This module never sets it; ``DMCEnv.render`` raises ``RenderUnavailableError``
when no backend works, so callers can skip videos.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """A control-suite task and PlaNet's action repeat for it."""

    domain: str
    """``dm_control.suite`` domain name."""
    task: str
    """Task name within the domain."""
    action_repeat: int
    """Environment steps per agent step (Hafner et al. 2018, table of hyper-parameters)."""


TASKS: dict[str, TaskSpec] = {
    "cartpole-swingup": TaskSpec("cartpole", "swingup", 8),
    "reacher-easy": TaskSpec("reacher", "easy", 4),
    "cheetah-run": TaskSpec("cheetah", "run", 4),
    "finger-spin": TaskSpec("finger", "spin", 2),
    "cup-catch": TaskSpec("ball_in_cup", "catch", 4),
    "walker-walk": TaskSpec("walker", "walk", 2),
}
"""Known task names ``domain-task`` and their specs."""

EPISODE_STEPS = 1000
"""Environment steps per episode (PlaNet and the paper)."""


class RenderUnavailableError(RuntimeError):
    """No OpenGL backend works for offscreen rendering (set ``MUJOCO_GL=egl`` or ``osmesa``)."""


def task_spec(name: str) -> TaskSpec:
    """The ``TaskSpec`` of ``name``; ValueError listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def flatten_observation(obs: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    """Concatenate ``obs[k].ravel()`` for ``k`` in ``keys``: a ``(obs_size,)`` float32 vector."""
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in keys])


class DMCEnv:
    """A control-suite task with action repeat and a fixed episode length.

    Args:
        name: task name, one of ``TASKS`` (e.g. ``"cheetah-run"``).
        seed: seed of the task's random initial states.
        action_repeat: environment steps per agent step; None for PlaNet's value of the task.
        episode_steps: environment steps per episode (1000).

    Attributes:
        obs_size, action_size: lengths of the observation and action vectors.
        action_low, action_high: ``(action_size,)`` float32 bounds; actions are clipped to them.
        obs_keys: the order in which the observation dictionary is flattened.
        max_agent_steps: agent steps per episode, ``ceil(episode_steps / action_repeat)``.
    """

    def __init__(
        self,
        name: str,
        *,
        seed: int = 0,
        action_repeat: int | None = None,
        episode_steps: int = EPISODE_STEPS,
    ) -> None:
        spec = task_spec(name)
        repeat = spec.action_repeat if action_repeat is None else action_repeat
        if repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {repeat}")
        if episode_steps < 1:
            raise ValueError(f"episode_steps must be >= 1, got {episode_steps}")
        try:
            from dm_control import suite
        except ImportError as error:  # dm_control missing, or the MUJOCO_GL backend it names
            raise ImportError(
                f"DMCEnv needs dm_control (pip install 'dcem[dmc]') and, when MUJOCO_GL is set, "
                f"an importable OpenGL backend of that name: {error}"
            ) from error
        self.name, self.action_repeat, self.episode_steps = name, repeat, episode_steps
        # The episode length is counted here, so the suite's own time limit is lifted.
        self._env = suite.load(
            spec.domain, spec.task, task_kwargs={"random": seed, "time_limit": float("inf")}
        )
        self.obs_keys = tuple(self._env.observation_spec())
        self.obs_size = sum(math.prod(v.shape) for v in self._env.observation_spec().values())
        action_spec = self._env.action_spec()
        self.action_size = int(action_spec.shape[0])
        self.action_low = np.asarray(action_spec.minimum, dtype=np.float32)
        self.action_high = np.asarray(action_spec.maximum, dtype=np.float32)
        self.max_agent_steps = math.ceil(episode_steps / repeat)
        self._steps = 0

    def reset(self, *, seed: int | None = None) -> np.ndarray:
        """Start an episode; returns the first observation ``(obs_size,)`` float32.

        ``seed`` re-seeds the task's random state first (the initial state of the episode
        depends on it alone), so an episode can be replayed, e.g. after resuming a run.
        """
        if seed is not None:
            self._env.task.random.seed(seed)
        self._steps = 0
        return flatten_observation(self._env.reset().observation, self.obs_keys)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Apply ``action`` ``(action_size,)`` (clipped to the bounds) ``action_repeat`` times.

        Returns:
            ``(obs, reward, done)``: the next observation ``(obs_size,)`` float32, the sum of
            the rewards over the repeats, and whether the episode is over (``episode_steps``
            environment steps taken, or the task ended).
        """
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_size,):
            raise ValueError(
                f"action must have shape ({self.action_size},), got {tuple(action.shape)}"
            )
        action = np.clip(action, self.action_low, self.action_high)
        reward, done = 0.0, False
        for _ in range(self.action_repeat):
            time_step = self._env.step(action)
            self._steps += 1
            reward += float(time_step.reward or 0.0)
            done = time_step.last() or self._steps >= self.episode_steps
            if done:
                break
        return flatten_observation(time_step.observation, self.obs_keys), reward, done

    def get_state(self) -> np.ndarray:
        """The simulator's state (positions, velocities, activations) and the step counter:
        a float64 vector that :meth:`set_state` restores."""
        return np.append(self._env.physics.get_state(), float(self._steps))

    def set_state(self, state: np.ndarray) -> np.ndarray:
        """Restore a :meth:`get_state` vector; returns the observation there ``(obs_size,)``.

        Stepping from a restored state gives the same rewards and observations as stepping
        from where it was taken (the tasks' dynamics are deterministic).
        """
        state = np.asarray(state, dtype=np.float64)
        physics = self._env.physics
        size = physics.get_state().shape[0] + 1
        if state.shape != (size,):
            raise ValueError(f"state must have shape ({size},), got {tuple(state.shape)}")
        with physics.reset_context():
            physics.set_state(state[:-1])
        self._steps = int(state[-1])
        return flatten_observation(self._env.task.get_observation(physics), self.obs_keys)

    @property
    def steps(self) -> int:
        """Environment steps taken in the current episode."""
        return self._steps

    @property
    def agent_step_seconds(self) -> float:
        """Simulated seconds per agent step (``action_repeat`` control steps)."""
        return float(self._env.control_timestep()) * self.action_repeat

    def close(self) -> None:
        """Release the simulator (and any rendering context)."""
        self._env.close()

    def render(self, *, height: int = 64, width: int = 64, camera_id: int = 0) -> np.ndarray:
        """Offscreen RGB frame ``(height, width, 3)`` uint8 of the current state.

        Raises:
            RenderUnavailableError: no OpenGL backend works in this process.
        """
        try:
            frame = self._env.physics.render(height=height, width=width, camera_id=camera_id)
        except Exception as error:  # backend failures surface as many different types
            raise RenderUnavailableError(
                f"offscreen rendering failed ({type(error).__name__}: {error}); set MUJOCO_GL="
                "egl or osmesa before dm_control is first imported"
            ) from error
        return np.asarray(frame, dtype=np.uint8)


def make_env(
    name: str,
    *,
    seed: int = 0,
    action_repeat: int | None = None,
    episode_steps: int = EPISODE_STEPS,
) -> DMCEnv:
    """``DMCEnv(name, ...)``: a control-suite task by name (see ``TASKS``)."""
    return DMCEnv(name, seed=seed, action_repeat=action_repeat, episode_steps=episode_steps)
