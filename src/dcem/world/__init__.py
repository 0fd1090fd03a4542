"""World-model control from proprioception (paper §5.2.2): DMC tasks, replay, RSSM, planners.

Knows nothing of experiments: no configuration, files or printing. ``dm_control`` is imported
only when an environment is made, and the names below on first use (PEP 562), so that the
task table (``dcem.world.envs``) can be read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcem.world.agent import Agent
    from dcem.world.config import AgentConfig
    from dcem.world.envs import (
        EPISODE_STEPS,
        TASKS,
        DMCEnv,
        RenderUnavailableError,
        TaskSpec,
        flatten_observation,
        make_env,
        task_spec,
    )
    from dcem.world.latent import (
        ActionDecoder,
        fit_decoder,
        latent_planning_cost,
        latent_policy,
        plan_latent,
    )
    from dcem.world.planner import plan
    from dcem.world.ppo import DCEMPolicy
    from dcem.world.replay import ReplayBuffer
    from dcem.world.rssm import RSSM, LossTerms, State, gaussian_kl, gaussian_log_likelihood

_HOME = {
    "EPISODE_STEPS": "envs", "TASKS": "envs", "DMCEnv": "envs", "RenderUnavailableError": "envs",
    "TaskSpec": "envs", "flatten_observation": "envs", "make_env": "envs", "task_spec": "envs",
    "ActionDecoder": "latent", "fit_decoder": "latent", "latent_planning_cost": "latent",
    "latent_policy": "latent", "plan_latent": "latent", "plan": "planner",
    "ReplayBuffer": "replay", "RSSM": "rssm",
    "LossTerms": "rssm", "State": "rssm", "gaussian_kl": "rssm",
    "gaussian_log_likelihood": "rssm", "Agent": "agent", "AgentConfig": "config",
    "DCEMPolicy": "ppo",
}  # fmt: skip

__all__ = [
    "EPISODE_STEPS", "RSSM", "Agent", "AgentConfig", "TASKS", "ActionDecoder", "DCEMPolicy",
    "DMCEnv", "LossTerms",
    "RenderUnavailableError", "ReplayBuffer", "State", "TaskSpec", "flatten_observation",
    "fit_decoder", "gaussian_kl", "gaussian_log_likelihood", "latent_planning_cost",
    "latent_policy", "make_env", "plan", "plan_latent", "task_spec",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'dcem.world' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dcem.world.{_HOME[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
