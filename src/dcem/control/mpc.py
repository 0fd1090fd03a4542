"""Horizon solves and receding-horizon MPC on the cartpole with CEM / DCEM.

Two search spaces share one code path:

* full action space: ``u in [U_LB, U_UB]^H`` searched directly (``d = H``), initial
  σ = 0.5 (U_UB - U_LB) (the expert of the embedding experiment);
* a decoder's latent space: ``z in [-1, 1]^d`` and ``u = decoder(z)``, initial σ = 0.5
  (the reference configuration of latent DCEM).

``solve_horizon`` solves ``min C(u; x_init)`` once for a batch of initial states (what the
expert and Algorithm 2 training use); ``run_mpc`` applies it receding-horizon.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from dcem.control.cartpole import (
    STATE_DIM,
    U_LB,
    U_UB,
    _params_like,
    _rollout_cost,
    reward,
    step,
)
from dcem.control.decoder import ActionDecoder
from dcem.optim import Backward, cem, dcem

DEFAULT_HORIZON = 20
"""Planning horizon H of the embedding experiment."""
LATENT_LB = -1.0
"""Lower bound of the latent box."""
LATENT_UB = 1.0
"""Upper bound of the latent box."""
LATENT_INIT_SIGMA = 0.5
"""Initial σ of the search in the latent box (reference configuration)."""
FULL_INIT_SIGMA = 0.5 * (U_UB - U_LB)
"""Initial σ of the search in the full action space, 0.5 (upper - lower)."""


@dataclass(frozen=True)
class SolverConfig:
    """Optimizer settings for one horizon problem."""

    method: Literal["cem", "dcem"] = "dcem"
    """``"dcem"`` (differentiable, ``dcem.dcem``) or ``"cem"`` (no gradient, ``dcem.cem``)."""
    n_sample: int = 100
    """Samples per iteration."""
    n_elite: int = 10
    """Elites per iteration."""
    n_iter: int = 10
    """Iterations."""
    tau: float = 1.0
    """DCEM temperature in the paper's convention (divides the scores); ``"dcem"`` only."""
    init_sigma: float | None = None
    """Initial σ; None for the space's default (``FULL_INIT_SIGMA`` or ``LATENT_INIT_SIGMA``)."""
    normalize: bool = True
    """Standardize the costs per problem inside the optimizer."""
    return_best: bool = False
    """Return the best sample instead of the last mean; ``"cem"`` only."""
    backward: Backward = "full"
    """Backward mode passed to ``dcem.dcem``; ``"dcem"`` only."""
    compile: bool = False
    """Run each optimizer iteration as a ``torch.compile`` graph (``compile`` of
    ``dcem.dcem`` / ``dcem.cem``: the first solve compiles, for a minute or two on a CPU)."""


LATENT_DCEM = SolverConfig()
"""Latent DCEM of the paper: 100 samples, 10 elites, 10 iterations, τ = 1."""
EXPERT_CEM = SolverConfig(method="cem", n_sample=1000, n_elite=100, n_iter=10)
"""Full-space CEM expert of the paper's description: an order of magnitude more samples
than latent DCEM. Mean cost on ``validation_states()``, H = 20: about -8.5 (-9.5 with
``return_best=True``)."""
REFERENCE_EXPERT_CEM = SolverConfig(method="cem", n_sample=100, n_elite=10, n_iter=30)
"""Full-space CEM expert of the reference code: 100 samples, 10 elites, 30 iterations.
Mean cost on ``validation_states()``, H = 20: about -9.0 (the paper's expert line)."""


class HorizonSolution(NamedTuple):
    """Result of ``solve_horizon`` for B initial states."""

    z: Tensor
    """``(B, d)`` solution in the search space (``d = H`` in the full action space)."""
    u: Tensor
    """``(B, H)`` controls (``decoder(z)`` in a latent space, else ``z``)."""
    cost: Tensor
    """``(B,)`` control cost ``C(u; x_init)``."""


class MPCResult(NamedTuple):
    """Closed-loop trajectory of ``run_mpc`` for B initial states over T steps."""

    states: Tensor
    """``(B, T + 1, 5)`` visited states, ``states[:, 0] = x_init``."""
    controls: Tensor
    """``(B, T)`` applied controls (the first control of each plan)."""
    rewards: Tensor
    """``(B, T)`` rewards ``r(states[:, t], controls[:, t])``."""
    total_reward: Tensor
    """``(B,)`` sum of the rewards."""


def _search_space(decoder: ActionDecoder | None, horizon: int) -> tuple[int, float, float, float]:
    """``(d, lb, ub, default init σ)`` of the full action space or the decoder's latent box."""
    if decoder is None:
        return horizon, U_LB, U_UB, FULL_INIT_SIGMA
    return decoder.latent_dim, LATENT_LB, LATENT_UB, LATENT_INIT_SIGMA


def _resolve_horizon(decoder: ActionDecoder | None, horizon: int | None) -> int:
    if decoder is None:
        horizon = DEFAULT_HORIZON if horizon is None else horizon
    elif horizon is None:
        horizon = decoder.horizon
    elif horizon != decoder.horizon:
        raise ValueError(f"horizon={horizon} differs from decoder.horizon={decoder.horizon}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    return horizon


def _check_solver(solver: SolverConfig) -> None:
    if not isinstance(solver, SolverConfig):
        raise TypeError(f"solver must be a SolverConfig, got {type(solver).__name__}")
    if solver.method not in ("cem", "dcem"):
        raise ValueError(f"solver.method must be 'cem' or 'dcem', got {solver.method!r}")
    if solver.return_best and solver.method != "cem":
        raise ValueError("solver.return_best is only available with solver.method='cem'")


def _optimize(
    f: Callable[[Tensor], Tensor],
    init_mu: Tensor,
    init_sigma: float,
    lb: float,
    ub: float,
    solver: SolverConfig,
    generator: torch.Generator | None,
) -> Tensor:
    """Run ``dcem.cem`` or ``dcem.dcem`` on ``f: (B, N, d) -> (B, N)`` from ``init_mu (B, d)``."""
    if solver.method == "dcem":
        return dcem(
            f,
            init_mu,
            init_sigma,
            n_sample=solver.n_sample,
            n_elite=solver.n_elite,
            n_iter=solver.n_iter,
            tau=solver.tau,
            lb=lb,
            ub=ub,
            normalize=solver.normalize,
            generator=generator,
            backward=solver.backward,
            compile=solver.compile,
        )
    return cem(
        f,
        init_mu,
        init_sigma,
        n_sample=solver.n_sample,
        n_elite=solver.n_elite,
        n_iter=solver.n_iter,
        lb=lb,
        ub=ub,
        normalize=solver.normalize,
        generator=generator,
        return_best=solver.return_best,
        compile=solver.compile,
    )


def solve_horizon(
    x_init: Tensor,
    *,
    decoder: ActionDecoder | None = None,
    horizon: int | None = None,
    solver: SolverConfig = LATENT_DCEM,
    init_mu: Tensor | None = None,
    params: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HorizonSolution:
    """Solve ``min_z C(u(z); x_init)`` for each initial state with CEM or DCEM.

    ``C = rollout_cost`` over H steps. Without a decoder the search is over the full action
    space ``u = z in [U_LB, U_UB]^H``; with one it is over the latent box ``z in [-1, 1]^d``
    with ``u = decoder(z)``. Both ``cem`` and ``dcem`` keep samples in the box.

    Gradients: with ``solver.method="dcem"`` the solution is differentiable through the
    optimizer (into the decoder's weights, ``x_init`` and ``params``), so
    ``solution.cost.mean().backward()`` is the update of Algorithm 2. With ``"cem"``, ``z``
    carries no gradient, but ``u = decoder(z)`` and ``cost`` stay differentiable in the
    decoder's weights with ``z`` held constant (the paper's τ = 0 baseline).

    Args:
        x_init: ``(B, 5)`` initial states.
        decoder: optional action decoder ``(..., d) -> (..., H)``; None for the full space.
        horizon: H; default ``decoder.horizon``, or ``DEFAULT_HORIZON`` without a decoder.
        solver: optimizer settings; default ``LATENT_DCEM`` (see also ``EXPERT_CEM``).
        init_mu: optional ``(B, d)`` initial mean; default zeros (the centre of the box).
        params: optional ``(4,)`` or ``(B, 4)`` physical parameters.
        generator: optional random generator for the optimizer's samples.

    Returns:
        ``HorizonSolution(z (B, d), u (B, H), cost (B,))``.

    Raises:
        ValueError: bad shapes, non-finite ``x_init``, bad ``params`` (as
            :func:`dcem.control.step`; checked once here, not at every cost evaluation),
            bad solver settings (as :func:`dcem.dcem` / :func:`dcem.cem`).
        TypeError: ``generator`` not a ``torch.Generator`` or None, ``solver`` not a
            ``SolverConfig``, a tensor argument that is not a tensor.
    """
    _check_x_init(x_init)
    _check_solver(solver)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    params = None if params is None else _params_like(params, x_init)  # checked once here
    horizon = _resolve_horizon(decoder, horizon)
    d, lb, ub, default_sigma = _search_space(decoder, horizon)
    batch = x_init.shape[0]
    if init_mu is None:
        init_mu = x_init.new_zeros(batch, d)
    elif not isinstance(init_mu, Tensor):
        raise TypeError(f"init_mu must be a tensor of shape (B, d) or None, got {type(init_mu)}")
    elif init_mu.shape != (batch, d):
        raise ValueError(
            f"init_mu must have shape (B, d) = {(batch, d)}, got {tuple(init_mu.shape)}"
        )
    init_sigma = default_sigma if solver.init_sigma is None else solver.init_sigma

    def to_controls(z: Tensor) -> Tensor:
        return z if decoder is None else decoder(z)

    def f(z: Tensor) -> Tensor:  # called at every iteration: params were checked above
        return _rollout_cost(x_init, to_controls(z), params, check=False)

    z = _optimize(f, init_mu, init_sigma, lb, ub, solver, generator)
    u = to_controls(z)
    return HorizonSolution(z=z, u=u, cost=_rollout_cost(x_init, u, params, check=False))


def _check_x_init(x_init: Tensor) -> None:
    """Shape and finiteness (one host sync) of the initial states."""
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a tensor of shape (B, {STATE_DIM}), got {type(x_init)}")
    if x_init.dim() != 2 or x_init.shape[-1] != STATE_DIM:
        raise ValueError(f"x_init must have shape (B, {STATE_DIM}), got {tuple(x_init.shape)}")
    if not x_init.is_floating_point():
        raise ValueError(f"x_init must be a floating tensor, got {x_init.dtype}")
    if not bool(torch.isfinite(x_init.detach()).all()):
        raise ValueError("x_init must be finite (it has NaN or inf entries)")


@torch.no_grad()
def run_mpc(
    x_init: Tensor,
    *,
    n_steps: int,
    decoder: ActionDecoder | None = None,
    horizon: int | None = None,
    solver: SolverConfig = EXPERT_CEM,
    warm_start: bool = False,
    params: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MPCResult:
    """Receding-horizon control: re-solve the H-step problem at every step, apply its first control.

    Runs without gradients. The same ``params`` are used to plan and to simulate.

    Args:
        x_init: ``(B, 5)`` initial states, controlled in parallel.
        n_steps: number of closed-loop steps T, >= 1.
        decoder: optional action decoder; None to plan in the full action space.
        horizon: planning horizon H (see ``solve_horizon``).
        solver: optimizer settings; default ``EXPERT_CEM``.
        warm_start: start each solve from the previous plan shifted by one step (its last
            control repeated); full action space only.
        params: optional ``(4,)`` or ``(B, 4)`` physical parameters.
        generator: optional random generator for the optimizer's samples.

    Returns:
        ``MPCResult(states (B, T + 1, 5), controls (B, T), rewards (B, T), total_reward (B,))``.

    Raises:
        ValueError, TypeError: ``n_steps`` not an integer ``>= 1``, and as
            :func:`solve_horizon`.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    _check_x_init(x_init)
    params = None if params is None else _params_like(params, x_init)  # checked once here
    if warm_start and decoder is not None:
        raise ValueError("warm_start shifts a plan of controls; it needs decoder=None")
    x, init_mu = x_init, None
    states, controls, rewards = [x_init], [], []
    for _ in range(n_steps):
        plan = solve_horizon(
            x,
            decoder=decoder,
            horizon=horizon,
            solver=solver,
            init_mu=init_mu,
            params=params,
            generator=generator,
        )
        u_t = plan.u[:, :1]
        rewards.append(reward(x, u_t))
        x = step(x, u_t, params)
        states.append(x)
        controls.append(u_t.squeeze(-1))
        if warm_start:
            init_mu = torch.cat((plan.z[:, 1:], plan.z[:, -1:]), dim=-1)
    reward_seq = torch.stack(rewards, dim=1)
    return MPCResult(
        states=torch.stack(states, dim=1),
        controls=torch.stack(controls, dim=1),
        rewards=reward_seq,
        total_reward=reward_seq.sum(dim=1),
    )
