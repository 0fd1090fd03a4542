"""Hyper-parameters of the PlaNet agent (:class:`dcem.world.agent.Agent`), without torch.

Defaults are PlaNet's and the paper's, except where a field's help says what a CPU uses
instead. Kept free of torch so that the ``dcem`` command can build its options from the
fields (name, type, help) without importing it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BACKWARDS", "PARTS", "PLANNERS", "AgentConfig"]

PLANNERS = ("cem", "latent")
"""``cem``: CEM over the full action sequence (phase 1); ``latent``: latent DCEM over a
learned action decoder (phase 2)."""
BACKWARDS = ("full", "checkpoint", "pruned")
"""Backward modes of ``dcem.dcem`` for the decoder update."""
PARTS = ("reward", "transition", "decoder")
"""The parts of the latent-DCEM controller that phase 3 (PPO) may fine-tune."""


def _doc(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class AgentConfig:
    """The world model, its training, the planners and the action decoder of an agent."""

    planner: str = field(
        default="cem",
        metadata=_doc(
            "planner used to act: cem (full action space, phase 1) or latent (latent DCEM over a "
            "learned action decoder, phase 2)"
        ),
    )
    batch_size: int = field(default=50, metadata=_doc("sequences per model batch"))
    seq_len: int = field(default=50, metadata=_doc("steps per sequence"))
    lr: float = field(default=1e-3, metadata=_doc("Adam learning rate"))
    adam_eps: float = field(default=1e-4, metadata=_doc("Adam epsilon"))
    grad_clip: float = field(default=1000.0, metadata=_doc("gradient-norm clip"))
    free_nats: float = field(
        default=1.0, metadata=_doc("KL free nats, clamped per (time, batch) element as PlaNet")
    )
    reward_scale: float = field(
        default=10.0, metadata=_doc("weight of the reward term of the bound (PlaNet: 10)")
    )
    deter_size: int = field(default=200, metadata=_doc("GRU units"))
    stoch_size: int = field(default=30, metadata=_doc("stochastic state size"))
    hidden_size: int = field(default=200, metadata=_doc("units of every other layer"))
    horizon: int = field(default=12, metadata=_doc("planning horizon (agent steps)"))
    plan_iter: int = field(
        default=8, metadata=_doc("CEM iterations per decision (paper: 10; 8 for a CPU)")
    )
    plan_samples: int = field(
        default=300, metadata=_doc("CEM candidates per iteration (paper: 1000; 300 for a CPU)")
    )
    plan_elites: int = field(
        default=30, metadata=_doc("CEM elites per iteration (paper: 100; 30 for a CPU)")
    )
    plan_sample: bool = field(
        default=False,
        metadata=_doc("imagine with samples of the prior (PlaNet) instead of its mean"),
    )
    explore_noise: float = field(default=0.3, metadata=_doc("std of the exploration noise"))
    latent_dim: int = field(default=2, metadata=_doc("latent planner: latent dimension"))
    latent_samples: int = field(default=100, metadata=_doc("latent planner: DCEM candidates"))
    latent_elites: int = field(default=10, metadata=_doc("latent planner: DCEM soft elites"))
    latent_iter: int = field(default=10, metadata=_doc("latent planner: DCEM iterations"))
    latent_tau: float = field(default=1.0, metadata=_doc("latent planner: DCEM temperature"))
    decoder_hidden: int = field(default=200, metadata=_doc("decoder hidden units (2 layers)"))
    decoder_lr: float = field(default=1e-3, metadata=_doc("decoder Adam learning rate"))
    decoder_every: int = field(
        default=1, metadata=_doc("a decoder update after every this many model updates (paper: 1)")
    )
    decoder_batch: int = field(
        default=16, metadata=_doc("belief states from the replay batch per decoder update")
    )
    dcem_backward: str = field(
        default="full",
        metadata=_doc(
            "backward mode of dcem.dcem for the decoder update: full, checkpoint or pruned"
        ),
    )

    def __post_init__(self) -> None:
        if self.planner not in PLANNERS:
            raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {self.planner!r}")
        for name in ("batch_size", "seq_len", "deter_size", "stoch_size", "hidden_size",
                     "horizon", "plan_iter", "plan_samples", "plan_elites", "latent_dim",
                     "latent_samples", "latent_elites", "latent_iter", "decoder_hidden",
                     "decoder_every", "decoder_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
        for name in ("lr", "adam_eps", "grad_clip", "latent_tau", "decoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("reward_scale", "free_nats", "explore_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.plan_elites >= self.plan_samples:
            raise ValueError(
                f"plan_elites must be < plan_samples, got {self.plan_elites} >= {self.plan_samples}"
            )
        if self.latent_elites >= self.latent_samples:
            raise ValueError(
                f"latent_elites must be < latent_samples, got {self.latent_elites} >= "
                f"{self.latent_samples}"
            )
        if self.dcem_backward not in BACKWARDS:
            raise ValueError(
                f"dcem_backward must be one of {', '.join(BACKWARDS)}, got {self.dcem_backward!r}"
            )

    def trajectories_per_decision(self, planner: str | None = None) -> int:
        """Imagined trajectories one decision of ``planner`` (default: the agent's) evaluates."""
        if (planner or self.planner) == "latent":
            return self.latent_samples * self.latent_iter
        return self.plan_samples * self.plan_iter
