"""dcem: the Differentiable Cross-Entropy Method (Amos & Yarats, ICML 2020) in PyTorch."""

from dcem.lml import LML, lml, topk_mask
from dcem.optim import DCEM, IterationInfo, Trace, cem, cem_step, dcem, dcem_step, unroll_gd

__all__ = [
    "DCEM",
    "LML",
    "IterationInfo",
    "Trace",
    "cem",
    "cem_step",
    "dcem",
    "dcem_step",
    "lml",
    "topk_mask",
    "unroll_gd",
]
__version__ = "0.1.0"
