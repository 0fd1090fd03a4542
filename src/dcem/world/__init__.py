"""World-model control from proprioception (paper §5.2.2): DMC tasks, replay, RSSM, planners.

Knows nothing of experiments: no configuration, files or printing. ``dm_control`` is imported
only when an environment is made.
"""

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
from dcem.world.latent import ActionDecoder, latent_planning_cost, latent_policy, plan_latent
from dcem.world.planner import plan
from dcem.world.replay import ReplayBuffer
from dcem.world.rssm import RSSM, LossTerms, State, gaussian_kl, gaussian_log_likelihood

__all__ = [
    "ActionDecoder",
    "EPISODE_STEPS",
    "RSSM",
    "TASKS",
    "DMCEnv",
    "LossTerms",
    "RenderUnavailableError",
    "ReplayBuffer",
    "State",
    "TaskSpec",
    "flatten_observation",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "latent_planning_cost",
    "latent_policy",
    "make_env",
    "plan",
    "plan_latent",
    "task_spec",
]
