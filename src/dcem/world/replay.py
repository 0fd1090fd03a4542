"""Episode replay buffer with uniform sampling of fixed-length sequences.

Storage is one row per observation, in flat growable arrays: ``obs (N, o)`` float32,
``action (N, a)`` float32, ``reward (N,)`` float32, ``done (N,)`` bool. Row ``i`` holds an
observation together with the action that led *into* it, the reward received with it and
whether the episode ended there; the first row of an episode has a zero action and reward.
An episode of ``T`` agent steps is ``T + 1`` rows. This is the alignment ``RSSM.observe`` and
``RSSM.loss`` expect, so a sampled batch goes to the model as it is.

Sampling draws ``B`` windows of ``L`` consecutive rows uniformly among all windows that lie
inside one episode (the unfinished episode included), with a PCG64 ``numpy`` generator.
``state_dict`` holds plain arrays only (data, episode boundaries and the generator's state),
so a checkpoint holds the data and the sampler continues exactly where it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_FIELDS = ("obs", "action", "reward", "done")


class ReplayBuffer:
    """Episodes of (observation, previous action, reward, done) rows.

    Args:
        obs_size: length ``o`` of an observation.
        action_size: length ``a`` of an action.
        seed: seed of the sampler's PCG64 generator.
    """

    def __init__(self, obs_size: int, action_size: int, *, seed: int = 0) -> None:
        if obs_size < 1 or action_size < 1:
            raise ValueError(
                f"obs_size and action_size must be >= 1, got {obs_size} and {action_size}"
            )
        self.obs_size, self.action_size = obs_size, action_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._data = {
            "obs": np.zeros((0, obs_size), np.float32),
            "action": np.zeros((0, action_size), np.float32),
            "reward": np.zeros(0, np.float32),
            "done": np.zeros(0, np.bool_),
        }
        self._size = 0
        self._starts: list[int] = []  # first row of every episode, the open one included

    # ------------------------------------------------------------------ adding
    def start_episode(self, obs: np.ndarray) -> None:
        """Begin an episode with its first observation ``(o,)``; ends any unfinished one."""
        self._starts.append(self._size)
        self._append(obs, np.zeros(self.action_size, np.float32), 0.0, False)

    def add_step(self, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool) -> None:
        """Record one agent step of the open episode: ``action (a,)`` led to ``next_obs (o,)``."""
        if not self._starts or self._data["done"][self._size - 1]:
            raise ValueError("add_step needs an open episode: call start_episode(obs) first")
        self._append(next_obs, action, reward, done)

    def add_episode(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Add a whole finished episode: ``obs (T+1, o)``, ``actions (T, a)``, ``rewards (T,)``."""
        obs, actions = np.asarray(obs), np.asarray(actions)
        n = actions.shape[0]
        if obs.shape != (n + 1, self.obs_size) or actions.shape != (n, self.action_size):
            raise ValueError(
                f"obs must be (T+1, {self.obs_size}) and actions (T, {self.action_size}), "
                f"got {obs.shape} and {actions.shape}"
            )
        self.start_episode(obs[0])
        for t in range(n):
            self.add_step(actions[t], float(rewards[t]), obs[t + 1], t == n - 1)

    def _append(self, obs: np.ndarray, action: np.ndarray, reward: float, done: bool) -> None:
        obs, action = np.asarray(obs, np.float32), np.asarray(action, np.float32)
        if obs.shape != (self.obs_size,) or action.shape != (self.action_size,):
            raise ValueError(
                f"obs must be ({self.obs_size},) and action ({self.action_size},), "
                f"got {obs.shape} and {action.shape}"
            )
        for name, value in (("obs", obs), ("action", action), ("reward", reward)):
            if not np.isfinite(value).all():
                raise ValueError(f"{name} must be finite, got {value}")
        if self._size == len(self._data["reward"]):
            capacity = max(1024, 2 * self._size)
            for key, array in self._data.items():
                grown = np.zeros((capacity, *array.shape[1:]), array.dtype)
                grown[: self._size] = array[: self._size]
                self._data[key] = grown
        i = self._size
        self._data["obs"][i], self._data["action"][i] = obs, action
        self._data["reward"][i], self._data["done"][i] = reward, done
        self._size += 1

    # ---------------------------------------------------------------- sampling
    @property
    def num_steps(self) -> int:
        """Stored rows (observations)."""
        return self._size

    @property
    def num_episodes(self) -> int:
        """Stored episodes, the unfinished one included."""
        return len(self._starts)

    def observations(self) -> np.ndarray:
        """All stored observations, ``(N, o)`` float32 (a copy)."""
        return self._data["obs"][: self._size].copy()

    def episode_bounds(self) -> np.ndarray:
        """``(E, 2)`` int64 ``[start, end)`` rows of every episode."""
        starts = np.asarray(self._starts, np.int64)
        return np.stack([starts, np.append(starts[1:], self._size)], axis=1)

    def action_windows(self, length: int, last: int = 0) -> np.ndarray:
        """Every window of ``length`` consecutive executed actions of one episode,
        ``(M, length, a)`` float32 (a copy; episodes shorter than ``length`` give none);
        ``last > 0``: of the ``last`` most recent episodes only."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if last < 0:
            raise ValueError(f"last must be >= 0, got {last}")
        bounds = self.episode_bounds()[-last:] if last else self.episode_bounds()
        starts = [np.arange(s + 1, e - length + 1) for s, e in bounds]
        first = np.concatenate([np.zeros(0, np.int64), *starts])
        return self._data["action"][first[:, None] + np.arange(length)]

    def sample(self, batch_size: int = 50, seq_len: int = 50) -> dict[str, np.ndarray]:
        """``batch_size`` windows of ``seq_len`` consecutive rows of one episode, uniformly.

        Returns:
            Time-major arrays: ``obs (L, B, o)``, ``action (L, B, a)``, ``reward (L, B)``,
            ``done (L, B)``; ``action[t]`` led into ``obs[t]``.

        Raises:
            ValueError: no episode has ``seq_len`` rows.
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        bounds = self.episode_bounds() if self._starts else np.zeros((0, 2), np.int64)
        windows = np.maximum(bounds[:, 1] - bounds[:, 0] - seq_len + 1, 0)
        total = int(windows.sum())
        if total == 0:
            raise ValueError(f"seq_len={seq_len} exceeds every stored episode's length")
        pick = self.rng.integers(total, size=batch_size)
        cumulative = np.cumsum(windows)
        episode = np.searchsorted(cumulative, pick, side="right")
        start = bounds[episode, 0] + pick - (cumulative[episode] - windows[episode])
        rows = start[None, :] + np.arange(seq_len)[:, None]
        return {key: self._data[key][rows] for key in _FIELDS}

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only: the stored rows, the episode starts and the sampler's state.

        Store with ``np.savez`` or, through ``torch.from_numpy``, in a ``torch.save``
        checkpoint; ``load_state_dict`` accepts both forms.
        """
        state = {key: self._data[key][: self._size].copy() for key in _FIELDS}
        state["episode_starts"] = np.asarray(self._starts, np.int64)
        state["rng_state"] = _encode_pcg64(self.rng)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore rows, episodes and the sampler's state from ``state_dict()``'s arrays."""
        arrays = {key: np.asarray(state[key]) for key in (*_FIELDS, "episode_starts")}
        if arrays["obs"].ndim != 2 or arrays["obs"].shape[1] != self.obs_size:
            raise ValueError(
                f"state['obs'] must be (N, {self.obs_size}), got {arrays['obs'].shape}"
            )
        if arrays["action"].ndim != 2 or arrays["action"].shape[1] != self.action_size:
            raise ValueError(
                f"state['action'] must be (N, {self.action_size}), got {arrays['action'].shape}"
            )
        n = arrays["obs"].shape[0]
        if any(arrays[key].shape[0] != n for key in _FIELDS):
            raise ValueError("state arrays obs, action, reward and done must have equal lengths")
        dtypes = {"obs": np.float32, "action": np.float32, "reward": np.float32, "done": np.bool_}
        self._data = {key: arrays[key].astype(dtypes[key], copy=True) for key in _FIELDS}
        self._size = n
        self._starts = [int(s) for s in arrays["episode_starts"]]
        self.rng = _decode_pcg64(np.asarray(state["rng_state"]))


def _encode_pcg64(rng: np.random.Generator) -> np.ndarray:
    """PCG64 state as ``(6,)`` int64: 128-bit state and increment as 64-bit halves, then the
    buffered-uint32 flag and value (int64 so that ``torch.from_numpy`` accepts it)."""
    s = rng.bit_generator.state
    if s["bit_generator"] != "PCG64":
        raise ValueError(f"rng must be a PCG64 generator, got {s['bit_generator']}")
    mask = (1 << 64) - 1
    words = [s["state"]["state"] >> 64, s["state"]["state"] & mask]
    words += [s["state"]["inc"] >> 64, s["state"]["inc"] & mask, s["has_uint32"], s["uinteger"]]
    return np.asarray(words, np.uint64).view(np.int64)


def _decode_pcg64(words: np.ndarray) -> np.random.Generator:
    if words.shape != (6,):
        raise ValueError(f"rng_state must have shape (6,), got {words.shape}")
    w = [int(x) for x in words.astype(np.int64).view(np.uint64)]
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
        "has_uint32": w[4],
        "uinteger": w[5],
    }
    return np.random.Generator(bit_generator)
