"""Differentiable cartpole, action decoder and CEM/DCEM horizon solves (paper §5.2.1).

Knows nothing of experiments: no configuration, files or printing.
"""

from dcem.control.cartpole import (
    DT,
    U_LB,
    U_UB,
    CartpoleParams,
    reward,
    rollout,
    rollout_cost,
    sample_initial_states,
    step,
    validation_states,
)
from dcem.control.decoder import ActionDecoder
from dcem.control.mpc import (
    EXPERT_CEM,
    LATENT_DCEM,
    REFERENCE_EXPERT_CEM,
    HorizonSolution,
    MPCResult,
    SolverConfig,
    run_mpc,
    solve_horizon,
)

__all__ = [
    "DT",
    "EXPERT_CEM",
    "LATENT_DCEM",
    "REFERENCE_EXPERT_CEM",
    "U_LB",
    "U_UB",
    "ActionDecoder",
    "CartpoleParams",
    "HorizonSolution",
    "MPCResult",
    "SolverConfig",
    "reward",
    "rollout",
    "rollout_cost",
    "run_mpc",
    "sample_initial_states",
    "solve_horizon",
    "step",
    "validation_states",
]
