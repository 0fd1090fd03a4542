"""The settings of a ``dcem dmc train`` run (light: importing it does not import torch).

``DMCConfig`` is the one description of a run: ``dcem dmc train`` generates its options from
the fields (name, type, help), run folders record it in ``config.json``, checkpoints refuse
another one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcem.world.config import BACKWARDS, PLANNERS, AgentConfig
from dcem.world.envs import TASKS, task_spec

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKWARDS", "DEFAULTS", "PLANNERS", "PRETRAIN_DATA", "QUICK", "TASKS", "DMCConfig",
    "check_device",
]  # fmt: skip

PRETRAIN_DATA = ("windows", "plans")
"""What ``decoder_pretrain`` fits: the replay's action windows or full-CEM plans."""


# --------------------------------------------------------------------------- config


def _doc(text: str) -> Any:
    return {"help": text}


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if it can hold a run here; ValueError naming what is wrong."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} is not available (this PyTorch sees no CUDA device)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} is not available "
                         f"({torch.cuda.device_count()} CUDA devices)")  # fmt: skip
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device: {name!r} cannot hold a run (it stores no data); use cpu or cuda")
    if device.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if device.type == "mps" else None
        available = backend.is_available() if backend is not None else hasattr(torch, "xpu") and \
            torch.xpu.is_available()  # fmt: skip
        if not available:
            raise ValueError(f"device: {name!r} is not available in this PyTorch")
    return device


@dataclass(frozen=True)
class DMCConfig(AgentConfig):
    """A ``dcem dmc train`` run: the agent's settings (:class:`AgentConfig`) and the run's."""

    task: str = field(default="cheetah-run", metadata=_doc("control-suite task"))
    seed: int = field(default=0, metadata=_doc("seed of episodes, model init and planner"))
    env_steps: int = field(default=1_000_000, metadata=_doc("environment steps to train for"))
    action_repeat: int = field(default=0, metadata=_doc("0: the task's PlaNet value"))
    episode_steps: int = field(default=1000, metadata=_doc("environment steps per episode"))
    seed_episodes: int = field(default=5, metadata=_doc("random-action episodes first"))
    obs_stats_until: int = field(
        default=100_000,
        metadata=_doc(
            "observation statistics: refit to the whole replay before each round of model "
            "updates until this many env steps, then kept (0: those of the seed episodes)"
        ),
    )
    update_every: int = field(default=1000, metadata=_doc("env steps between model rounds"))
    updates_per_round: int = field(default=100, metadata=_doc("model updates per round"))
    eval_every: int = field(default=10_000, metadata=_doc("env steps between evaluations"))
    eval_episodes: int = field(default=5, metadata=_doc("episodes per evaluation"))
    video: bool = field(default=True, metadata=_doc("render eval.gif at the end"))
    init_from: str = field(
        default="",
        metadata=_doc(
            "phase-1 run folder to start from (its latest checkpoint): model, optimizer, replay"
        ),
    )
    keep_replay: bool = field(default=True, metadata=_doc("with init_from: keep its replay"))
    reinit_model: bool = field(
        default=False,
        metadata=_doc("with init_from: re-initialize the world model instead of loading it"),
    )
    decoder_warmup: int = field(
        default=0, metadata=_doc("decoder updates on the replay before the first episode")
    )
    decoder_pretrain: int = field(
        default=0,
        metadata=_doc(
            "with init_from and the latent planner: autoencoder steps fitting the decoder to "
            "action sequences (decoder_pretrain_data) before phase 2 (0: none, as the paper)"
        ),
    )
    decoder_pretrain_data: str = field(
        default="windows",
        metadata=_doc(
            "with decoder_pretrain, the sequences fitted: 'windows', the replay's executed "
            "action windows; 'plans', full-CEM plans (the run's plan_* sizes) from belief "
            "states of replay sequences"
        ),
    )
    decoder_pretrain_states: int = field(
        default=1500,
        metadata=_doc("with decoder_pretrain_data plans: belief states planned from"),
    )
    decoder_pretrain_episodes: int = field(
        default=0,
        metadata=_doc(
            "with decoder_pretrain: fit the windows of the replay's last N episodes only "
            "(0: all of them)"
        ),
    )
    device: str = field(default="cpu", metadata=_doc("torch device of model and planner"))
    compile: bool = field(
        default=True,
        metadata=_doc(
            "compile the model's imagination rollout (torch.compile, dynamic shapes; "
            "about a minute once, then faster planning)"
        ),  # fmt: skip
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        task_spec(self.task)  # unknown names raise, listing the known ones
        for name in ("env_steps", "episode_steps", "update_every", "updates_per_round",
                     "eval_every", "eval_episodes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("action_repeat", "seed_episodes", "seed", "decoder_warmup",
                     "decoder_pretrain", "decoder_pretrain_episodes",
                     "obs_stats_until"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len > self.agent_steps_per_episode + 1:
            raise ValueError(
                f"seq_len must be at most the {self.agent_steps_per_episode + 1} rows of an "
                f"episode, got {self.seq_len}"
            )
        if self.decoder_pretrain and not (
            self.planner == "latent" and self.init_from and self.keep_replay
        ):
            raise ValueError(
                "decoder_pretrain needs planner latent, init_from and a kept "
                "replay (the action windows it fits come from it)"
            )
        if self.decoder_pretrain_episodes and not self.decoder_pretrain:
            raise ValueError("decoder_pretrain_episodes needs decoder_pretrain > 0")
        if self.decoder_pretrain_data not in PRETRAIN_DATA:
            raise ValueError(f"decoder_pretrain_data must be one of {PRETRAIN_DATA}, got "
                             f"{self.decoder_pretrain_data!r}")  # fmt: skip
        if self.decoder_pretrain_data == "plans" and self.decoder_pretrain_episodes:
            raise ValueError("decoder_pretrain_episodes selects action windows; it does not "
                             "apply to decoder_pretrain_data plans")  # fmt: skip
        if self.decoder_pretrain_states < 1:
            raise ValueError(f"decoder_pretrain_states must be >= 1, got "
                             f"{self.decoder_pretrain_states}")  # fmt: skip
        if self.device != "cpu":  # "cpu" is always there (and needs no torch import)
            check_device(self.device)

    @property
    def repeat(self) -> int:
        """The action repeat in force (the task's PlaNet value when ``action_repeat`` is 0)."""
        return self.action_repeat or task_spec(self.task).action_repeat

    @property
    def agent_steps_per_episode(self) -> int:
        return math.ceil(self.episode_steps / self.repeat)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values, ``device`` left out (a run may move between devices)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "device"}


DEFAULTS = DMCConfig().to_json()
"""Default values: they stand in for fields a run folder recorded before they existed."""

QUICK = {
    "latent_dim": 2, "latent_samples": 10, "latent_elites": 3, "latent_iter": 2,
    "decoder_hidden": 16, "decoder_batch": 4, "env_steps": 600, "episode_steps": 200,
    "seed_episodes": 1, "update_every": 100,
    "updates_per_round": 3, "batch_size": 4, "seq_len": 8, "deter_size": 16, "stoch_size": 4,
    "hidden_size": 16, "horizon": 3, "plan_iter": 2, "plan_samples": 20, "plan_elites": 4,
    "eval_every": 400, "eval_episodes": 1, "compile": False,
}  # fmt: skip
"""Tiny budget exercising every step (the smoke test; ``dcem dmc train --quick``); no compile,
which would take longer than the run."""
