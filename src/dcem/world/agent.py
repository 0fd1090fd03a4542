"""The PlaNet agent (Hafner et al. 2019) with the paper's latent DCEM planner (§5.2.2).

An :class:`Agent` holds a world model (:class:`~dcem.world.rssm.RSSM`) and its optimizer, a
replay of episodes, the random generator of its planners and model updates, and, with the
``latent`` planner, an action decoder trained through DCEM (Algorithm 3, phase 2). It acts by
filtering its belief with each observation and planning from it; it learns by Adam updates
of PlaNet's bound on replay sequences. It knows nothing of environments' loops, files or
run folders: ``dcem.experiments.dmc`` drives it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcem.world.config import AgentConfig
from dcem.world.latent import ActionDecoder, latent_planning_cost, plan_latent
from dcem.world.planner import plan
from dcem.world.replay import ReplayBuffer
from dcem.world.rssm import RSSM, State

__all__ = ["Agent"]


class Agent:
    """World model, optimizer, replay and planners of one agent.

    Args:
        cfg: the agent's hyper-parameters.
        obs_size, action_size: lengths of an observation and an action vector.
        action_low, action_high: ``(action_size,)`` bounds of the actions.
        device: torch device of the model, the planners and the generator.
        model_seed: seed of the parameters' initialization (the global torch generator is
            left as it was). replay_seed: seed of the replay's sampler. generator_seed: seed
            of :attr:`generator` (planner samples, prior noise, exploration noise, batches).

    Attributes:
        model, optimizer, replay, generator, decoder (None with the ``cem`` planner),
        decoder_opt; ``planner``, ``cem_sizes`` and ``latent_sizes`` (``(n_sample, n_elite,
        n_iter)``) may be changed to act differently (evaluation); ``updates`` counts model
        updates; ``last_imagined_return`` is set by :meth:`act`.
    """

    def __init__(
        self, cfg: AgentConfig, obs_size: int, action_size: int, action_low: Any,
        action_high: Any, *, device: str | torch.device = "cpu", model_seed: int = 0,
        replay_seed: int = 0, generator_seed: int = 0,
    ) -> None:  # fmt: skip
        self.cfg, self.device = cfg, torch.device(device)
        self.low = torch.as_tensor(action_low, device=self.device, dtype=torch.float32)
        self.high = torch.as_tensor(action_high, device=self.device, dtype=torch.float32)
        if self.low.shape != (action_size,) or self.high.shape != (action_size,):
            raise ValueError(f"action_low and action_high must have shape ({action_size},), got "
                             f"{tuple(self.low.shape)} and {tuple(self.high.shape)}")  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            self.model = RSSM(
                obs_size, action_size, deter_size=cfg.deter_size, stoch_size=cfg.stoch_size,
                hidden_size=cfg.hidden_size,
            ).to(self.device)  # fmt: skip
            self.decoder: ActionDecoder | None = None
            if cfg.planner == "latent":
                self.decoder = ActionDecoder(
                    cfg.latent_dim, action_size, horizon=cfg.horizon,
                    hidden=cfg.decoder_hidden, action_low=self.low, action_high=self.high,
                ).to(self.device)  # fmt: skip
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        if self.decoder is not None:
            self.decoder_opt = torch.optim.Adam(self.decoder.parameters(), lr=cfg.decoder_lr)
        self.replay = ReplayBuffer(obs_size, action_size, seed=replay_seed)
        self.generator = torch.Generator(self.device).manual_seed(generator_seed)
        self.planner = cfg.planner
        self.cem_sizes = (cfg.plan_samples, cfg.plan_elites, cfg.plan_iter)
        self.latent_sizes = (cfg.latent_samples, cfg.latent_elites, cfg.latent_iter)
        self.updates = 0
        self.last_imagined_return: Tensor | None = None

    # ---------------------------------------------------------------- acting
    @torch.no_grad()
    def act(
        self, belief: State, prev_action: Tensor, obs: np.ndarray, *, explore: bool,
        generator: torch.Generator,
    ) -> tuple[State, Tensor]:  # fmt: skip
        """Filter the belief with ``obs`` and plan: returns the new belief and action ``(a,)``.

        ``belief``: the previous posterior ``(1)`` (``model.initial_state((1,))`` at an
        episode's start), ``prev_action (a,)`` the action since (zeros at the start), ``obs
        (o,)`` the raw observation. ``explore`` adds Gaussian noise of std
        ``cfg.explore_noise`` (clipped to the bounds).

        Sets :attr:`last_imagined_return`, a 0-dim tensor: the model's return of the chosen
        plan over the horizon (prior mean), to set against what the environment pays (a
        planner that exploits the model's errors is rated higher than it earns).
        """
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        belief = self.model.belief(belief, prev_action[None], obs_t, generator=generator)
        if self.planner == "latent":
            if self.decoder is None:
                raise ValueError("the latent planner needs an agent with planner='latent'")
            n_sample, n_elite, n_iter = self.latent_sizes
            first, actions = plan_latent(
                self.model, self.decoder, belief, n_sample=n_sample, n_elite=n_elite,
                n_iter=n_iter, tau=self.cfg.latent_tau, sample=self.cfg.plan_sample,
                generator=generator, return_plan=True,
            )  # fmt: skip
        else:
            n_sample, n_elite, n_iter = self.cem_sizes
            first, actions = plan(
                self.model, belief, action_low=self.low, action_high=self.high,
                horizon=self.cfg.horizon, n_iter=n_iter, n_sample=n_sample, n_elite=n_elite,
                sample=self.cfg.plan_sample, generator=generator, return_plan=True,
            )  # fmt: skip
        self.last_imagined_return = self.model.imagined_return(
            belief, actions.transpose(0, 1), sample=False
        )[0]
        action = first[0]
        if explore and self.cfg.explore_noise > 0:
            noise = torch.randn(action.shape, generator=generator, device=self.device)
            action = torch.maximum(torch.minimum(action + self.cfg.explore_noise * noise,
                                                 self.high), self.low)  # fmt: skip
        return belief, action

    def random_action(self) -> Tensor:
        """A uniformly random action ``(a,)`` from :attr:`generator`."""
        u = torch.rand(self.low.shape, generator=self.generator, device=self.device)
        return self.low + (self.high - self.low) * u

    # -------------------------------------------------------------- learning
    def can_update(self) -> bool:
        """Whether the replay holds an episode of at least ``seq_len`` rows."""
        bounds = self.replay.episode_bounds() if self.replay.num_episodes else None
        return bounds is not None and bool((bounds[:, 1] - bounds[:, 0] >= self.cfg.seq_len).any())

    def sample_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """A replay batch on the model's device: ``obs (L, B, o)``, ``actions``, ``rewards``."""
        batch = self.replay.sample(self.cfg.batch_size, self.cfg.seq_len)
        obs, actions, rewards = (torch.as_tensor(batch[k], device=self.device)
                                 for k in ("obs", "action", "reward"))  # fmt: skip
        return obs, actions, rewards

    def fit_obs_stats(self) -> None:
        """Set the model's observation statistics to those of every observation in the replay
        (the caller decides when: ``dcem dmc train`` refits before each round of updates
        until ``obs_stats_until`` environment steps, then keeps them)."""
        self.model.set_obs_stats(torch.as_tensor(self.replay.observations(), device=self.device))

    def update(self, n: int) -> dict[str, float]:
        """``n`` Adam updates of the model on replay batches (each followed, with the latent
        planner, by a decoder update every ``decoder_every``); the mean of each loss term.

        A model without observation statistics takes the replay's first (see
        :meth:`fit_obs_stats`). The loss terms stay on the device until the end of the round:
        one host sync per call.
        """
        keys = ("obs_loss", "reward_loss", "kl_loss", "kl_raw")
        sums = torch.zeros(len(keys), device=self.device)
        decoder_costs: list[Tensor] = []
        cfg = self.cfg
        if not self.model.has_obs_stats:
            self.fit_obs_stats()
        for _ in range(n):
            obs, actions, rewards = self.sample_batch()
            terms = self.model.loss(
                obs, actions, rewards, free_nats=cfg.free_nats, reward_scale=cfg.reward_scale,
                generator=self.generator,
            )  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            sums += torch.stack([terms.obs, terms.reward, terms.kl, terms.kl_raw]).detach()
            self.updates += 1
            if self.decoder is not None and self.updates % cfg.decoder_every == 0:
                decoder_costs.append(self.update_decoder(obs, actions))
        means = dict(zip(keys, (sums / n).tolist(), strict=True))
        if decoder_costs:
            means["decoder_cost"] = float(torch.stack(decoder_costs).mean())
        return means

    def update_decoder(self, obs: Tensor, actions: Tensor) -> Tensor:
        """One decoder step through DCEM on belief states of a replay batch ``(L, B, ·)``.

        The posteriors of the batch's first sequences (enough for ``decoder_batch`` states)
        are computed without gradient; ``decoder_batch`` of them, drawn uniformly, are the
        start states of the embedded control problem. Returns the mean imagined cost (a
        detached scalar tensor, so that a round of updates syncs with the host once).
        """
        if self.decoder is None:
            raise ValueError("decoder updates need an agent with planner='latent'")
        cfg = self.cfg
        seqs = min(obs.shape[1], -(-cfg.decoder_batch // obs.shape[0]) + 1)
        with torch.no_grad():
            post, _ = self.model.observe(obs[:, :seqs], actions[:, :seqs], generator=self.generator)
        flat = State(*(x.reshape(-1, x.shape[-1]) for x in post))
        pick = torch.randperm(flat.deter.shape[0], generator=self.generator,
                              device=self.device)[: cfg.decoder_batch]  # fmt: skip
        states = State(*(x[pick] for x in flat))
        cost = latent_planning_cost(
            self.model, self.decoder, states, n_sample=cfg.latent_samples,
            n_elite=cfg.latent_elites, n_iter=cfg.latent_iter, tau=cfg.latent_tau,
            generator=self.generator, backward=cfg.dcem_backward,  # type: ignore[arg-type]
        )  # fmt: skip
        self.decoder_opt.zero_grad(set_to_none=True)
        cost.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), cfg.grad_clip)
        self.decoder_opt.step()
        return cost.detach()

    @torch.no_grad()
    def cem_plans(self, n_states: int) -> Tensor:
        """Full-CEM plans ``(n_states, H, a)`` from belief states of replay sequences.

        The posteriors of replay batches (their first step, which has seen one observation
        only, left out) are drawn without replacement, a tenth of each batch's at most so that
        they spread over several batches, until there are ``n_states``; from each, CEM with
        the agent's sizes (``cem_sizes``), horizon and imagination (``plan_sample``) plans,
        50 states at a time. What ``dcem dmc train --decoder-pretrain-data plans`` fits the
        latent planner's decoder to.
        """
        if isinstance(n_states, bool) or not isinstance(n_states, int) or n_states < 1:
            raise ValueError(f"n_states must be an integer >= 1, got {n_states!r}")
        if not self.can_update():
            raise ValueError(f"the replay holds no sequence of seq_len = {self.cfg.seq_len} rows")
        cfg, parts, count = self.cfg, [], 0
        while count < n_states:
            obs, actions, _ = self.sample_batch()
            post, _ = self.model.observe(obs, actions, generator=self.generator)
            flat = State(*(x[1:].reshape(-1, x.shape[-1]) for x in post))
            take = min(n_states - count, max(1, flat.deter.shape[0] // 10))
            pick = torch.randperm(flat.deter.shape[0], generator=self.generator,
                                  device=self.device)[:take]  # fmt: skip
            parts.append(State(*(x[pick] for x in flat)))
            count += take
        states = State(*(torch.cat(xs) for xs in zip(*parts, strict=True)))
        n_sample, n_elite, n_iter = self.cem_sizes
        plans = []
        for i in range(0, n_states, 50):
            _, chunk = plan(
                self.model, State(*(x[i : i + 50] for x in states)), action_low=self.low,
                action_high=self.high, horizon=cfg.horizon, n_iter=n_iter, n_sample=n_sample,
                n_elite=n_elite, sample=cfg.plan_sample, generator=self.generator,
                return_plan=True,
            )  # fmt: skip
            plans.append(chunk)
        return torch.cat(plans)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: model, optimizer, replay arrays, generator state,
        decoder and its optimizer (latent planner) and the update count."""
        replay = {k: torch.from_numpy(v) for k, v in self.replay.state_dict().items()}
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "replay": replay, "generator": self.generator.get_state(), "updates": self.updates,
            **({"decoder": self.decoder.state_dict(), "decoder_opt": self.decoder_opt.state_dict()}
               if self.decoder is not None else {}),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``KeyError``/``RuntimeError``/``ValueError`` when it
        does not fit this agent (other sizes, another planner)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_replay(state)
        if self.decoder is not None:
            self.decoder.load_state_dict(state["decoder"])
            self.decoder_opt.load_state_dict(state["decoder_opt"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])

    def load_replay(self, state: dict[str, Any]) -> None:
        """Restore the replay alone from a :meth:`state_dict`'s ``"replay"`` tensors."""
        self.replay.load_state_dict({k: v.numpy() for k, v in state["replay"].items()})
