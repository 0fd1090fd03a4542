"""PPO into the differentiable latent-DCEM controller (Algorithm 3, phase 3).

The controller of phase 2 is a policy: from a belief state ``x`` it solves the embedded
problem with DCEM over the decoder's latent space and acts with the first decoded action,

    a ~ N(mu_theta(x), sigma^2),   mu_theta(x) = f_dec(z*(x))_1   (:func:`latent_policy`),

with a fixed (the paper's 0.1) or learned ``sigma``. ``mu`` depends on DCEM's random draws, so
every decision records a seed and the update recomputes ``mu`` from the same draws
(:meth:`DCEMPolicy.noise`): before the first gradient step the probability ratio is exactly
the one it was when acting, up to rounding. The log-probability is that of the sample before
clipping to the action bounds.

Gradients of the PPO objective reach the parts chosen to be fine-tuned (``"reward"``: the
reward head; ``"transition"``: the input network, GRU and prior of the imagination;
``"decoder"``: the action decoder) through DCEM, and the value head on the belief features.

The pieces (:func:`gae`, :func:`clipped_surrogate`) follow the PPO paper and CleanRL's
``ppo_continuous_action.py``: clip 0.2, GAE with gamma 0.99 and lambda 0.95, advantages
normalized per minibatch, value loss ``0.5 (V - R)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from dcem.optim import Backward
from dcem.world.config import PARTS
from dcem.world.latent import ActionDecoder, latent_policy
from dcem.world.rssm import RSSM, State

__all__ = ["PARTS", "DCEMPolicy", "clipped_surrogate", "gae"]


def gae(
    rewards: Tensor, values: Tensor, last_value: Tensor, *, gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Generalized advantage estimates of episodes cut by a time limit.

    ``rewards``, ``values``: ``(T, E)`` for E episodes of T steps; ``last_value``: ``(E,)``,
    the value of the state after the last step (the episode is truncated, not ended, so the
    return is bootstrapped from it). ``delta_t = r_t + gamma V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma lam A_{t+1}``. Returns ``(advantages, returns = A + V)``, both
    ``(T, E)``, without gradients.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and values must both be (T, E), got {tuple(rewards.shape)} "
                         f"and {tuple(values.shape)}")  # fmt: skip
    if last_value.shape != rewards.shape[1:]:
        raise ValueError(f"last_value must be (E,) = {tuple(rewards.shape[1:])}, got "
                         f"{tuple(last_value.shape)}")  # fmt: skip
    rewards, values, last_value = rewards.detach(), values.detach(), last_value.detach()
    nxt = torch.cat([values[1:], last_value[None]])
    delta = rewards + gamma * nxt - values
    adv = torch.empty_like(delta)
    running = torch.zeros_like(last_value)
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = delta[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped objective as a loss to minimize, and statistics of the ratio.

    ``logp``: ``(M,)`` log-probabilities of the batch's actions under the current policy (with
    gradients), ``old_logp`` ``(M,)`` when they were taken, ``advantages`` ``(M,)`` (normalize
    them first if wanted). ``loss = -mean(min(rho A, clip(rho, 1 - c, 1 + c) A))`` with
    ``rho = exp(logp - old_logp)``. Statistics: ratio mean, min and max, the fraction of
    clipped ratios and ``approx_kl = mean((rho - 1) - log rho)`` (an estimate of
    KL(old || new) that is never negative).
    """
    log_ratio = logp - old_logp.detach()
    ratio = log_ratio.exp()
    adv = advantages.detach()
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "approx_kl": float(((ratio - 1) - log_ratio).mean()),
        }  # fmt: skip
    return loss, stats


class DCEMPolicy(nn.Module):
    """The latent-DCEM controller as a Gaussian policy with a value head.

    Args:
        model: the world model (its transition and reward networks plan).
        decoder: the action decoder of phase 2.
        n_sample, n_elite, n_iter, tau: DCEM's settings (the paper's 100, 10, 10, 1).
        std: the initial (or fixed) standard deviation of the actions (0.1).
        learn_std: learn ``log std`` (one per action dimension) or keep it fixed.
        value_hidden: width of the value head's two hidden layers.
        backward: :func:`dcem.dcem`'s backward mode in updates (``"checkpoint"`` keeps the
            memory of a minibatch bounded by one iteration's graph).

    The policy imagines with the prior mean (``sample=False``): DCEM's draws are then all the
    randomness of ``mu``, and a recorded seed per decision recomputes it exactly.
    """

    def __init__(
        self, model: RSSM, decoder: ActionDecoder, *, n_sample: int = 100, n_elite: int = 10,
        n_iter: int = 10, tau: float = 1.0, std: float = 0.1, learn_std: bool = False,
        value_hidden: int = 200, backward: Backward = "checkpoint",
    ) -> None:  # fmt: skip
        super().__init__()
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite number > 0, got {std!r}")
        self.model, self.decoder = model, decoder
        self.sizes = (n_sample, n_elite, n_iter)
        self.tau, self.backward = float(tau), backward
        log_std = torch.full((decoder.action_size,), math.log(std),
                             device=_device(decoder))  # fmt: skip
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)
        feat = model.deter_size + model.stoch_size
        self.value = nn.Sequential(
            nn.Linear(feat, value_hidden), nn.Tanh(), nn.Linear(value_hidden, value_hidden),
            nn.Tanh(), nn.Linear(value_hidden, 1),
        ).to(_device(decoder))  # fmt: skip

    # ------------------------------------------------------------ parts
    def part_parameters(self, parts: Iterable[str]) -> list[nn.Parameter]:
        """Parameters of the named parts (of :data:`PARTS`)."""
        groups: dict[str, list[nn.Module]] = {
            "reward": [self.model.reward],
            "transition": [self.model.input, self.model.gru, self.model.prior],
            "decoder": [self.decoder],
        }
        params: list[nn.Parameter] = []
        for part in parts:
            if part not in groups:
                raise ValueError(f"parts must be among {', '.join(PARTS)}, got {part!r}")
            params += [p for module in groups[part] for p in module.parameters()]
        return params

    def fine_tune(self, parts: Sequence[str]) -> None:
        """Let gradients reach only ``parts`` of the controller (and the value head, and
        ``log_std`` if learned): every other parameter of the world model and the decoder
        is frozen (``requires_grad=False``)."""
        chosen = {id(p) for p in self.part_parameters(parts)}
        for p in [*self.model.parameters(), *self.decoder.parameters()]:
            p.requires_grad_(id(p) in chosen)

    # ------------------------------------------------------------ acting
    def features(self, state: State) -> Tensor:
        """Belief features ``(B, deter + stoch)`` for the value head."""
        return torch.cat([state.deter, state.stoch], -1)

    def noise(self, seeds: Tensor) -> Tensor:
        """DCEM's draws ``(n_iter, B, n_sample, latent_dim)`` for decisions with ``seeds``
        ``(B,)``: each decision's own stream, whatever the batch. (A generator per decision:
        torch has no public batched counter-based generator; the draws are small, ``n_iter *
        n_sample * latent_dim`` numbers each.)"""
        n_sample, _, n_iter = self.sizes
        device = _device(self.decoder)
        draws = [torch.randn((n_iter, n_sample, self.decoder.latent_dim), device=device,
                             generator=torch.Generator(device).manual_seed(int(s)))
                 for s in seeds.tolist()]  # fmt: skip
        return torch.stack(draws, 1)

    def mean(self, state: State, seeds: Tensor) -> Tensor:
        """``mu(x)``: the first decoded action of DCEM's solution, ``(B, a)``, with the
        recorded draws; differentiable in the parts that require gradients."""
        n_sample, n_elite, n_iter = self.sizes
        return latent_policy(
            self.model, self.decoder, state, n_sample=n_sample, n_elite=n_elite, n_iter=n_iter,
            tau=self.tau, sample=False, backward=self.backward, noise=self.noise(seeds),
        )  # type: ignore[return-value]  # fmt: skip

    def log_prob(self, mean: Tensor, actions: Tensor) -> Tensor:
        """Log-density ``(B,)`` of unclipped ``actions (B, a)`` under ``N(mean, std^2)``."""
        return torch.distributions.Normal(mean, self.log_std.exp()).log_prob(actions).sum(-1)

    @torch.no_grad()
    def act(
        self, state: State, generator: torch.Generator, *, explore: bool = True
    ) -> dict[str, Tensor]:
        """Sample actions for belief states ``state (B)`` (``explore=False``: the mean).

        Returns ``seed (B,)`` (int64, the DCEM draws), ``action (B, a)`` (the sample, before
        any clipping to the bounds: clip it to step the environment), ``logp (B,)`` and
        ``value (B,)``.
        """
        batch = state.deter.shape[0]
        device = state.deter.device
        seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=device)
        mean = action = self.mean(state, seeds)
        if explore:
            noise = torch.randn(mean.shape, generator=generator, device=device)
            action = mean + self.log_std.exp() * noise
        return {"seed": seeds, "action": action, "logp": self.log_prob(mean, action),
                "value": self.value(self.features(state))[..., 0]}  # fmt: skip

    def evaluate(self, state: State, seeds: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """``(logp (B,), value (B,))`` of recorded decisions, with gradients."""
        logp = self.log_prob(self.mean(state, seeds), actions)
        return logp, self.value(self.features(state).detach())[..., 0]


def _device(decoder: ActionDecoder) -> torch.device:
    """The device of a decoder's parameters."""
    return next(decoder.parameters()).device
