"""Action decoder of the cartpole embedding experiment: latent box -> H bounded controls."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dcem.control.cartpole import U_LB, U_UB


class ActionDecoder(nn.Module):
    """MLP ``f_dec: [-1, 1]^d -> [u_lb, u_ub]^H`` (paper §5.2.1, reference configuration).

    ``n_layers`` hidden layers of ``hidden`` ELU units, a linear output layer of ``horizon``
    units, then ``u = u_lb + (u_ub - u_lb) * sigmoid(out)``, so every control lies within
    the bounds (strictly inside up to floating-point saturation). Inputs outside the latent
    box are accepted; the box is the optimizer's search space, not a network constraint.

    Args:
        latent_dim: latent dimension d, >= 1.
        horizon: number of controls H, >= 1 (default 20).
        hidden: width of each hidden layer, >= 1 (default 256).
        n_layers: number of hidden layers, >= 1 (default 3).
        u_lb: lower control bound (default -100).
        u_ub: upper control bound, > ``u_lb`` (default 100).

    Shapes:
        ``forward(z)``: ``z (..., d) -> u (..., H)``.
    """

    def __init__(
        self,
        latent_dim: int,
        *,
        horizon: int = 20,
        hidden: int = 256,
        n_layers: int = 3,
        u_lb: float = U_LB,
        u_ub: float = U_UB,
    ) -> None:
        super().__init__()
        for name, value in (
            ("latent_dim", latent_dim),
            ("horizon", horizon),
            ("hidden", hidden),
            ("n_layers", n_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, bound in (("u_lb", u_lb), ("u_ub", u_ub)):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(bound).__name__}")
            if not math.isfinite(bound):
                raise ValueError(f"{name} must be finite, got {bound}")
        if not u_lb < u_ub:
            raise ValueError(f"u_lb must be < u_ub, got u_lb={u_lb}, u_ub={u_ub}")
        self.latent_dim = latent_dim
        self.horizon = horizon
        self.u_lb = float(u_lb)
        self.u_ub = float(u_ub)
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        layers.append(nn.Linear(width, horizon))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Decode latents ``z (..., d)`` into controls ``(..., H)`` within ``[u_lb, u_ub]``."""
        if z.dim() < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        return self.u_lb + (self.u_ub - self.u_lb) * torch.sigmoid(self.net(z))
