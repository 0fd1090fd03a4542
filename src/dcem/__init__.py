"""dcem: the Differentiable Cross-Entropy Method (Amos & Yarats, ICML 2020) in PyTorch."""

from dcem.lml import LML, lml, topk_mask

__all__ = ["LML", "lml", "topk_mask"]
__version__ = "0.1.0"
