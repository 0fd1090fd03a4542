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

__all__ = [
    "DT",
    "U_LB",
    "U_UB",
    "ActionDecoder",
    "CartpoleParams",
    "reward",
    "rollout",
    "rollout_cost",
    "sample_initial_states",
    "step",
    "validation_states",
]
