"""Recurrent state-space model (PlaNet, Hafner et al. 2018) on proprioceptive observations.

The world model of the cheetah/walker experiment (paper §5.2.2, appendix D): PlaNet's RSSM
with fully connected encoder and decoder instead of pixel ones.

* deterministic path ``h_t = GRU(h_{t-1}, g(s_{t-1}, a_{t-1}))`` (``deter_size`` = 200 units);
* stochastic state with diagonal Gaussian prior ``p(s_t | h_t)`` and posterior
  ``q(s_t | h_t, e(o_t))``, std = softplus(·) + ``min_std`` (``stoch_size`` = 30);
* observation model ``p(o_t | h_t, s_t)`` and reward model ``p(r_t | h_t, s_t)``, both unit
  variance Gaussians around a predicted mean; the observation model lives in normalized
  units (see below);
* every other function (input ``g``, encoder ``e``, prior, posterior, decoder, reward) is
  ``n_layers`` = 2 fully connected ReLU layers of ``hidden_size`` = 200 units (followed by a
  linear output layer where the function has an output of its own).

Time alignment (the Dreamer convention, which the replay buffer stores directly): ``actions[t]``
is the action that led *into* ``obs[t]`` and ``rewards[t]`` the reward received with it; the
first action of an episode is zeros. ``observe(obs, actions)`` therefore computes
``h_t = GRU(h_{t-1}, g(s_{t-1}, actions[t]))`` and ``s_t ~ q(· | h_t, obs[t])`` from a zero
initial state.

Observation normalization: proprioceptive observations mix loud joint velocities (standard
deviations of 4-13 on cheetah and walker) with the quiet quantities the reward depends on
(root velocity, torso height: 0.2-0.7), and a unit-variance Gaussian summed over dimensions
would spend the model on the loud ones. The model therefore keeps per-dimension statistics
(buffers ``obs_loc``, ``obs_scale``; set once with :meth:`RSSM.set_obs_stats`, saved with the
``state_dict``) and works on ``(obs - obs_loc) / obs_scale`` everywhere it sees an
observation: the encoder's input and the observation term of the loss. Callers always pass
raw observations; :meth:`RSSM.predict_obs` returns normalized ones (:meth:`RSSM.normalize`
maps raw ones to the same units). Until the statistics are set they are the identity.

All tensors are time-major: ``(T, B, ·)``. Device and dtype follow the module's parameters;
inputs must match them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


class State(NamedTuple):
    """A (batch of) model state(s); leading dimensions ``...`` are any batch/time shape."""

    deter: Tensor
    """Deterministic GRU state ``h``: ``(..., deter_size)``."""
    stoch: Tensor
    """Sample of the stochastic state ``s``: ``(..., stoch_size)``."""
    mean: Tensor
    """Mean of the Gaussian ``s`` was drawn from: ``(..., stoch_size)``."""
    std: Tensor
    """Standard deviation of that Gaussian: ``(..., stoch_size)``."""


class LossTerms(NamedTuple):
    """Terms of the negative PlaNet bound, each a scalar averaged over time and batch."""

    total: Tensor
    """``obs + reward_scale * reward + kl``: the quantity to minimize."""
    obs: Tensor
    """Negative Gaussian (unit variance) log-likelihood of the normalized observations,
    summed over dims."""
    reward: Tensor
    """Negative Gaussian (unit variance) log-likelihood of the rewards."""
    kl: Tensor
    """Mean over time and batch of ``max(KL_t, free_nats)`` (PlaNet's clamp per element)."""
    kl_raw: Tensor
    """Mean over time and batch of ``KL(q(s_t|h_t,o_t) ‖ p(s_t|h_t))`` summed over dims."""


def mlp(
    in_size: int, hidden_size: int, n_layers: int, out_size: int | None = None
) -> nn.Sequential:
    """``n_layers`` Linear+ReLU layers of ``hidden_size`` units, then Linear to ``out_size``.

    With ``out_size=None`` the last ReLU layer is the output (size ``hidden_size``).
    """
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(in_size if i == 0 else hidden_size, hidden_size), nn.ReLU()]
    if out_size is not None:
        layers.append(nn.Linear(hidden_size if n_layers > 0 else in_size, out_size))
    return nn.Sequential(*layers)


def gaussian_log_likelihood(x: Tensor, mean: Tensor) -> Tensor:
    """``log N(x; mean, I)`` summed over the last dimension: ``(..., n) -> (...)``."""
    return -0.5 * ((x - mean).square().sum(-1) + x.shape[-1] * LOG_2PI)


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """``KL(N(mean_q, diag std_q²) ‖ N(mean_p, diag std_p²))``: ``(..., n) -> (...)``."""
    var_ratio = (std_q / std_p).square()
    mahalanobis = ((mean_q - mean_p) / std_p).square()
    return 0.5 * (var_ratio + mahalanobis - 1.0 - var_ratio.log()).sum(-1)


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


class RSSM(nn.Module):
    """PlaNet's recurrent state-space model with fully connected encoder and decoder.

    Args:
        obs_size: length ``o`` of an observation vector.
        action_size: length ``a`` of an action vector.
        deter_size: GRU units of the deterministic path (PlaNet: 200).
        stoch_size: dimension of the stochastic state (PlaNet: 30).
        hidden_size: units of every other hidden layer (PlaNet: 200).
        n_layers: hidden ReLU layers per function (paper: 2).
        min_std: lower bound added to the softplus std of prior and posterior (PlaNet: 0.1).
    """

    def __init__(
        self,
        obs_size: int,
        action_size: int,
        *,
        deter_size: int = 200,
        stoch_size: int = 30,
        hidden_size: int = 200,
        n_layers: int = 2,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in [
            ("obs_size", obs_size),
            ("action_size", action_size),
            ("deter_size", deter_size),
            ("stoch_size", stoch_size),
            ("hidden_size", hidden_size),
            ("n_layers", n_layers),
            ("min_std", min_std),
        ]:
            _positive(name, value)
        self.obs_size, self.action_size = obs_size, action_size
        self.deter_size, self.stoch_size = deter_size, stoch_size
        self.min_std = float(min_std)
        feat = deter_size + stoch_size
        self._input_size = stoch_size + action_size
        self.encoder = mlp(obs_size, hidden_size, n_layers)
        self.input = mlp(stoch_size + action_size, hidden_size, n_layers)
        self.gru = nn.GRUCell(hidden_size, deter_size)
        self.prior = mlp(deter_size, hidden_size, n_layers, 2 * stoch_size)
        self.posterior = mlp(deter_size + hidden_size, hidden_size, n_layers, 2 * stoch_size)
        self.decoder = mlp(feat, hidden_size, n_layers, obs_size)
        self.reward = mlp(feat, hidden_size, n_layers, 1)
        self.register_buffer("obs_loc", torch.zeros(obs_size))
        self.register_buffer("obs_scale", torch.ones(obs_size))
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.long))

    # --------------------------------------------------------- normalization
    obs_loc: Tensor
    obs_scale: Tensor
    obs_count: Tensor

    @property
    def has_obs_stats(self) -> bool:
        """Whether :meth:`set_obs_stats` has been called (on this model or the one loaded)."""
        return bool(self.obs_count > 0)

    @torch.no_grad()
    def set_obs_stats(self, obs: Tensor, *, min_scale: float = 1e-2) -> None:
        """Freeze the observation statistics to those of ``obs``: ``(N, o)`` raw observations.

        ``obs_loc`` is their mean and ``obs_scale`` their standard deviation (population), at
        least ``min_scale`` so that a constant dimension stays finite. Raises ``ValueError``
        for fewer than two rows, the wrong width or non-finite values.
        """
        if obs.dim() != 2 or obs.shape[-1] != self.obs_size or obs.shape[0] < 2:
            raise ValueError(
                f"obs must have shape (N >= 2, {self.obs_size}), got {tuple(obs.shape)}"
            )
        if not bool(torch.isfinite(obs).all()):
            raise ValueError("obs must be finite to compute normalization statistics")
        obs = obs.to(self.obs_loc)
        self.obs_loc.copy_(obs.mean(0))
        self.obs_scale.copy_(obs.std(0, correction=0).clamp_min(min_scale))
        self.obs_count.fill_(obs.shape[0])

    def normalize(self, obs: Tensor) -> Tensor:
        """Raw observations ``(..., o)`` in the model's units: ``(obs - obs_loc) / obs_scale``."""
        self._check_last("obs", obs, self.obs_size)
        return (obs - self.obs_loc) / self.obs_scale

    # ----------------------------------------------------------------- one step
    def initial_state(self, batch_shape: tuple[int, ...] | torch.Size) -> State:
        """All-zero state of shape ``(*batch_shape, ·)`` (std = 1) on the model's device/dtype."""
        p = self.gru.weight_hh
        zeros = p.new_zeros((*batch_shape, self.stoch_size))
        return State(p.new_zeros((*batch_shape, self.deter_size)), zeros, zeros, zeros + 1.0)

    def _gaussian(
        self, stats: Tensor, noise: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, raw_std = stats.chunk(2, dim=-1)
        std = F.softplus(raw_std) + self.min_std
        if noise is None:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
        return mean + std * noise, mean, std

    def transition(
        self,
        state: State,
        action: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> State:
        """One prior step: ``h' = GRU(h, g(s, action))``, ``s' ~ p(s' | h')``.

        Args:
            state: previous state, leading shape ``(...)``.
            action: ``(..., a)``, the action taken from ``state``.
            noise: optional standard normal ``(..., stoch_size)`` for the sample; drawn from
                ``generator`` when None.

        Returns:
            The prior state ``(...)``.
        """
        self._check_last("action", action, self.action_size)
        batch = action.shape[:-1]
        x = self.input(torch.cat([state.stoch, action], -1).reshape(-1, self._input_size))
        deter = self.gru(x, state.deter.reshape(-1, self.deter_size)).reshape(*batch, -1)
        stoch, mean, std = self._gaussian(self.prior(deter), noise, generator)
        return State(deter, stoch, mean, std)

    def posterior_step(
        self,
        prior: State,
        embed: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> State:
        """Posterior ``s ~ q(s | h, embed)`` with ``h = prior.deter``.

        ``embed = encode(obs)``: ``(..., hidden_size)``; returns a ``State`` of shape ``(...)``.
        """
        stats = self.posterior(torch.cat([prior.deter, embed], -1))
        stoch, mean, std = self._gaussian(stats, noise, generator)
        return State(prior.deter, stoch, mean, std)

    def encode(self, obs: Tensor) -> Tensor:
        """Embedding of raw observations (normalized first): ``(..., o) -> (..., hidden_size)``."""
        return self.encoder(self.normalize(obs))

    def belief(
        self,
        state: State,
        prev_action: Tensor,
        obs: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> State:
        """Online filtering step for acting: posterior after ``prev_action`` and then ``obs``.

        Args:
            state: previous posterior ``(...)`` (``initial_state`` at an episode start).
            prev_action: ``(..., a)``, the action applied since (zeros at an episode start).
            obs: ``(..., o)``, the observation received.

        Returns:
            The posterior state ``(...)``, the start state of the planner.
        """
        prior = self.transition(state, prev_action, generator=generator)
        return self.posterior_step(prior, self.encode(obs), generator=generator)

    def features(self, state: State) -> Tensor:
        """``[h, s]``: ``(..., deter_size + stoch_size)``, input of decoder and reward model."""
        return torch.cat([state.deter, state.stoch], -1)

    def predict_reward(self, state: State) -> Tensor:
        """Mean of ``p(r | h, s)``: ``(...)``."""
        return self.reward(self.features(state)).squeeze(-1)

    def predict_obs(self, state: State) -> Tensor:
        """Mean of ``p(o | h, s)`` in normalized units (see :meth:`normalize`): ``(..., o)``."""
        return self.decoder(self.features(state))

    # ------------------------------------------------------------- sequences
    def observe(
        self,
        obs: Tensor,
        actions: Tensor,
        state: State | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[State, State]:
        """Filter a batch of sequences: posterior and prior states at every step.

        Args:
            obs: ``(T, B, o)`` observations.
            actions: ``(T, B, a)``; ``actions[t]`` led into ``obs[t]`` (see the module docstring).
            state: state before the first step, ``(B)``; zeros when None.

        Returns:
            ``(posterior, prior)``, each a ``State`` of ``(T, B, ·)`` tensors. Samples use the
            reparameterization trick, so gradients reach every parameter.
        """
        self._check_sequences(obs, actions)
        if state is None:
            state = self.initial_state(obs.shape[1:2])
        embed = self.encode(obs)
        posts, priors = [], []
        for t in range(obs.shape[0]):
            prior = self.transition(state, actions[t], generator=generator)
            state = self.posterior_step(prior, embed[t], generator=generator)
            priors.append(prior)
            posts.append(state)
        return _stack(posts), _stack(priors)

    def imagine(
        self,
        state: State,
        actions: Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Roll the prior forward under ``actions`` and predict the rewards (differentiable).

        Each horizon step is one batched model step over all leading dimensions, so ``N``
        candidate sequences for ``B`` start states are one batch of ``N * B``.

        Args:
            state: start state, leading shape ``(...)`` (e.g. a posterior from ``belief``).
            actions: ``(H, ..., a)``; ``actions[t]`` is applied at step ``t``.
            sample: draw ``s_t`` from the prior (PlaNet); False uses the prior mean.
            generator: source of the prior noise, drawn as one ``(H, ..., stoch_size)`` tensor.

        Returns:
            ``(H, ...)``: predicted reward after each action.
        """
        return self(state, actions, self._imagination_noise(state, actions, sample, generator))

    def forward(self, state: State, actions: Tensor, noise: Tensor) -> Tensor:
        """The imagination rollout of :meth:`imagine` with its prior noise given.

        ``state (...)``, ``actions (H, ..., a)``, ``noise (H, ..., stoch_size)`` (zeros: the
        prior mean) ``-> (H, ...)`` predicted rewards. This is the planners' hot loop, and what
        ``model.compile()`` (PyTorch's ``nn.Module.compile``) compiles in place: an opt-in
        that pays for a long planning run, not for a few calls (measured in
        ``benchmarks/planner.py``).
        """
        rewards = []
        for t in range(actions.shape[0]):
            state = self.transition(state, actions[t], noise=noise[t])
            rewards.append(self.predict_reward(state))
        return torch.stack(rewards)

    @torch.no_grad()
    def imagined_return(
        self,
        state: State,
        actions: Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``imagine(state, actions, ...).sum(0)`` without autograd: the planner's cost.

        Args:
            state: start state, leading shape ``(...)``.
            actions: ``(H, ..., a)``.
            sample: draw ``s_t`` from the prior; False uses the prior mean.
            generator: source of the prior noise.

        Returns:
            ``(...)``: the sum over the horizon of the predicted rewards.
        """
        return self.imagine(state, actions, sample=sample, generator=generator).sum(0)

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        obs: Tensor,
        actions: Tensor,
        rewards: Tensor,
        *,
        free_nats: float = 3.0,
        reward_scale: float = 10.0,
        state: State | None = None,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Negative multi-step variational bound of PlaNet (one-step KL, no overshooting).

        ``total = obs + reward_scale * reward + mean_{t,b} max(KL_{t,b}, free_nats)`` where
        each term is averaged over time and batch, the observation term (in normalized units)
        is summed over observation dimensions and the KL over the stochastic state. As in
        PlaNet the free nats clamp each (time, batch) element's KL, so an element below
        ``free_nats`` contributes the constant ``free_nats`` and no gradient while the others
        keep theirs.

        Args:
            obs: raw ``(T, B, o)``; actions: ``(T, B, a)``; rewards: ``(T, B)`` (aligned as in
                the module docstring).
            free_nats: KL values below this are not penalized (PlaNet: 3).
            reward_scale: weight of the reward term (PlaNet: 10).
            state: state before the first step, ``(B)``; zeros when None.

        Returns:
            ``LossTerms(total, obs, reward, kl, kl_raw)``, scalars.
        """
        if not math.isfinite(free_nats) or free_nats < 0:
            raise ValueError(f"free_nats must be finite and >= 0, got {free_nats}")
        if not math.isfinite(reward_scale) or reward_scale < 0:
            raise ValueError(f"reward_scale must be finite and >= 0, got {reward_scale}")
        if rewards.shape != obs.shape[:2]:
            raise ValueError(
                f"rewards must have shape (T, B) = {tuple(obs.shape[:2])}, "
                f"got {tuple(rewards.shape)}"
            )
        post, prior = self.observe(obs, actions, state, generator=generator)
        target = self.normalize(obs)
        obs_nll = -gaussian_log_likelihood(target, self.predict_obs(post)).mean()
        reward_nll = -gaussian_log_likelihood(
            rewards.unsqueeze(-1), self.predict_reward(post).unsqueeze(-1)
        ).mean()
        kl_elem = gaussian_kl(post.mean, post.std, prior.mean, prior.std)  # (T, B)
        kl = kl_elem.clamp(min=free_nats).mean()
        total = obs_nll + reward_scale * reward_nll + kl
        return LossTerms(total, obs_nll, reward_nll, kl, kl_elem.mean())

    # ------------------------------------------------------------- checks
    def _imagination_noise(
        self, state: State, actions: Tensor, sample: bool, generator: torch.Generator | None
    ) -> Tensor:
        self._check_last("actions", actions, self.action_size)
        if actions.dim() < 2 or actions.shape[1:-1] != state.deter.shape[:-1]:
            raise ValueError(
                f"actions must have shape (H, ..., {self.action_size}) with ... = the state's "
                f"batch shape {tuple(state.deter.shape[:-1])}, got {tuple(actions.shape)}"
            )
        shape = (*actions.shape[:-1], self.stoch_size)
        if not sample:
            return actions.new_zeros(shape)
        return torch.randn(shape, generator=generator, device=actions.device, dtype=actions.dtype)

    def _check_last(self, name: str, x: Tensor, size: int) -> None:
        if x.dim() < 1 or x.shape[-1] != size:
            raise ValueError(f"{name} must have shape (..., {size}), got {tuple(x.shape)}")

    def _check_sequences(self, obs: Tensor, actions: Tensor) -> None:
        if obs.dim() != 3 or obs.shape[-1] != self.obs_size:
            raise ValueError(f"obs must have shape (T, B, {self.obs_size}), got {tuple(obs.shape)}")
        if actions.shape != (*obs.shape[:2], self.action_size):
            raise ValueError(
                f"actions must have shape (T, B, a) = {(*obs.shape[:2], self.action_size)}, "
                f"got {tuple(actions.shape)}"
            )


def _stack(states: list[State]) -> State:
    return State(*(torch.stack(parts) for parts in zip(*states, strict=True)))
