"""CEM planning over action sequences inside the world model (PlaNet; paper §5.2.2).

For each start state ``x`` (a posterior from ``RSSM.belief``) the planner solves

    min_{u_{1:H} in [low, high]^H}  -sum_{t=1}^{H} r̂_t(x, u_{1:t})

where ``r̂_t`` are the rewards the model predicts along the prior rollout under ``u``. The
action sequence is flattened to ``d = H * a`` and handed to ``dcem.cem`` (no gradient), whose
samples are clipped to the bounds. Every CEM iteration evaluates all ``N`` candidates of all
``B`` start states as one batch of ``N * B`` rollouts (``RSSM.imagined_return``); there is no
Python loop over candidates.

Paper / PlaNet settings: horizon 12, 10 iterations, 1000 candidates, 100 elites, initial mean 0
and standard deviation 1 (the actions live in ``[-1, 1]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcem.optim import cem
from dcem.world.rssm import RSSM, State


def _bound(value: float | Tensor, name: str, like: Tensor) -> Tensor:
    """A scalar or ``(a,)`` bound as an ``(a,)`` tensor on ``like``'s device and dtype."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or an (a,) tensor, got {type(value).__name__}")
    bound = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bound.dim() == 0:
        return bound.expand(like.shape[-1])
    if bound.shape != like.shape[-1:]:
        raise ValueError(
            f"{name} must be a float or of shape ({like.shape[-1]},), got {tuple(bound.shape)}"
        )
    return bound


def _check_bounds(low: Tensor, high: Tensor) -> None:
    """Finite action bounds with ``action_low < action_high`` (one host sync)."""
    ok = torch.stack([torch.isfinite(low).all(), torch.isfinite(high).all(), (low < high).all()])
    finite_low, finite_high, ordered = ok.tolist()
    if not finite_low:
        raise ValueError(f"action_low must be finite, got {low.tolist()}")
    if not finite_high:
        raise ValueError(f"action_high must be finite, got {high.tolist()}")
    if not ordered:
        raise ValueError(
            f"action_low must be < action_high in every dimension, got action_low = "
            f"{low.tolist()} and action_high = {high.tolist()}"
        )


@torch.no_grad()
def plan(
    model: RSSM,
    state: State,
    *,
    action_low: float | Tensor = -1.0,
    action_high: float | Tensor = 1.0,
    horizon: int = 12,
    n_iter: int = 10,
    n_sample: int = 1000,
    n_elite: int = 100,
    init_sigma: float = 1.0,
    sample: bool = True,
    generator: torch.Generator | None = None,
    return_plan: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plan with CEM in ``model`` from a batch of start states; returns the first actions.

    Args:
        model: the world model.
        state: start states of shape ``(B)`` (tensors ``(B, ·)``).
        action_low, action_high: bounds, floats or ``(a,)`` tensors; samples are clipped.
        horizon: planning horizon ``H`` (12).
        n_iter: CEM iterations (10).
        n_sample: candidates per iteration ``N`` (1000).
        n_elite: elites per iteration (100).
        init_sigma: initial standard deviation of the sampling Gaussian (1); its mean is 0.
        sample: imagine with samples from the prior (PlaNet); False uses the prior mean.
        generator: source of the CEM samples and of the prior noise.
        return_plan: also return the whole plan.

    Returns:
        ``(B, a)``, the first action of the final CEM mean; with ``return_plan`` also the plan
        ``(B, H, a)``.

    Raises:
        ValueError: non-finite action bounds or ``action_low >= action_high`` in a dimension
            (named as such, checked at the call), sizes that are not integers ``>= 1``, and
            the errors of :func:`dcem.cem` (``n_elite < n_sample``, ``init_sigma``).
        TypeError: ``generator`` not a ``torch.Generator`` or None, ``state`` not a
            ``State``, bounds neither numbers nor tensors, ``sample`` not a bool.
    """
    if not isinstance(state, State):
        raise TypeError(f"state must be a State, got {type(state).__name__}")
    if state.deter.dim() != 2:
        raise ValueError(
            f"state must have one batch dimension, got deter of shape {tuple(state.deter.shape)}"
        )
    for name, value in [
        ("horizon", horizon),
        ("n_sample", n_sample),
        ("n_iter", n_iter),
        ("n_elite", n_elite),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be True or False, got {sample!r}")
    batch, a = state.deter.shape[0], model.action_size
    like = state.deter.new_empty(a)
    low, high = _bound(action_low, "action_low", like), _bound(action_high, "action_high", like)
    _check_bounds(low, high)
    start = State(*(x.repeat_interleave(n_sample, dim=0) for x in state))

    def cost(x: Tensor) -> Tensor:  # (B, N, H * a) -> (B, N)
        actions = x.view(batch, n_sample, horizon, a).permute(2, 0, 1, 3).reshape(horizon, -1, a)
        returns = model.imagined_return(start, actions, sample=sample, generator=generator)
        return -returns.view(batch, n_sample)

    mu = cem(
        cost,
        state.deter.new_zeros(batch, horizon * a),
        init_sigma,
        n_sample=n_sample,
        n_elite=n_elite,
        n_iter=n_iter,
        lb=low.repeat(horizon),
        ub=high.repeat(horizon),
        generator=generator,
    )
    actions = mu.view(batch, horizon, a)
    return (actions[:, 0], actions) if return_plan else actions[:, 0]
