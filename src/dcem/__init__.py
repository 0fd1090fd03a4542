"""dcem: the Differentiable Cross-Entropy Method (Amos & Yarats, ICML 2020) in PyTorch.

The names below are imported on first use (PEP 562), so that ``import dcem.cli`` and
``dcem --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcem.lml import LML, lml, topk_mask
    from dcem.optim import (
        DCEM,
        IterationInfo,
        Trace,
        cem,
        cem_step,
        dcem,
        dcem_step,
        unroll_gd,
    )

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

_HOME = {"LML": "lml", "lml": "lml", "topk_mask": "lml"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dcem' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dcem.{_HOME.get(name, 'optim')}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """Keeps ``dcem.lml`` the function: loading the submodule ``dcem.lml`` (by whichever
    import comes first) binds it on the package under the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "lml" and isinstance(value, types.ModuleType):
            value = value.lml
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
