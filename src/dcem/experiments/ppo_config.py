"""The settings of a ``dcem dmc ppo`` run (light: importing it does not import torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dcem.world.config import BACKWARDS, PARTS

__all__ = ["ADDED", "PARTS", "QUICK", "PPOConfig"]


def _doc(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class PPOConfig:
    """Phase 3 of Algorithm 3: PPO into the latent-DCEM controller of a phase-2 run."""

    init_from: str = field(default="", metadata=_doc("phase-2 run folder (--planner latent)"))
    seed: int = field(default=0, metadata=_doc("seed of the episodes and the policy's draws"))
    ppo_steps: int = field(default=100, metadata=_doc("PPO updates"))
    episodes_per_step: int = field(default=10, metadata=_doc("episodes collected per update"))
    passes: int = field(default=1, metadata=_doc("passes over each batch (paper: 1, 2, 4)"))
    minibatch: int = field(default=250, metadata=_doc("decisions per gradient step"))
    clip: float = field(default=0.2, metadata=_doc("PPO's ratio clip"))
    gamma: float = field(default=0.99, metadata=_doc("discount"))
    lam: float = field(default=0.95, metadata=_doc("GAE lambda"))
    lr: float = field(default=1e-4, metadata=_doc("Adam learning rate of the fine-tuned parts"))
    value_lr: float = field(default=1e-3, metadata=_doc("learning rate of value head and std"))
    max_grad_norm: float = field(default=0.5, metadata=_doc("gradient-norm clip"))
    target_kl: float = field(
        default=0.0,
        metadata=_doc(
            "stop a PPO step's minibatch updates once one's approximate KL to the collecting "
            "policy exceeds this (0: never; CleanRL's target_kl)"
        ),
    )
    fine_tune: str = field(
        default="reward,transition,decoder",
        metadata=_doc("parts the policy gradient trains, comma-separated (others frozen)"),
    )
    std: float = field(default=0.1, metadata=_doc("action noise std (initial if learned)"))
    learn_std: bool = field(default=False, metadata=_doc("learn the action noise std"))
    dcem_backward: str = field(
        default="checkpoint", metadata=_doc("DCEM backward mode in updates: " + "/".join(BACKWARDS))
    )
    episode_steps: int = field(default=0, metadata=_doc("env steps per episode (0: the run's)"))
    eval_every: int = field(default=5, metadata=_doc("PPO updates between evaluations"))
    eval_episodes: int = field(default=10, metadata=_doc("noise-free episodes per evaluation"))
    device: str = field(default="cpu", metadata=_doc("torch device"))

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ValueError("init_from: give the phase-2 run folder (--init-from RUN)")
        for name in ("ppo_steps", "episodes_per_step", "passes", "minibatch", "eval_every",
                     "eval_episodes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "episode_steps", "target_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip", "lr", "value_lr", "max_grad_norm", "std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"fine_tune must list some of {', '.join(PARTS)}, got "
                             f"{self.fine_tune!r}")  # fmt: skip
        if self.dcem_backward not in BACKWARDS:
            raise ValueError(f"dcem_backward must be one of {', '.join(BACKWARDS)}, got "
                             f"{self.dcem_backward!r}")  # fmt: skip

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.fine_tune.split(",") if p.strip())

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values, ``device`` left out (a run may move between devices)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "device"}


ADDED = {"target_kl": 0.0}
"""Fields added after the first PPO runs, with the value those runs used (their folders
resume)."""

QUICK = {"ppo_steps": 2, "episodes_per_step": 2, "minibatch": 16, "episode_steps": 40,
         "eval_every": 1, "eval_episodes": 1}  # fmt: skip
"""Tiny budget exercising every step (``dcem dmc ppo --quick``)."""
