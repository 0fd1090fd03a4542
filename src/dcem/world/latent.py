"""Latent DCEM inside the world model: action-sequence decoder, planner, decoder objective, policy.

The embedded control problem of the paper (§5.2.2, eq. 8; Algorithm 3 with DCEM): for each
start state ``x`` (a posterior from ``RSSM.belief``) and a decoder ``u = f_dec(z)`` from a latent
box ``Z = [-c, c]^d`` to action sequences ``u in [low, high]^{H x a}``,

    z* = argmin_{z in Z}  C(z; x) = -sum_{t=1}^{H} r̂_t(x, f_dec(z)_{1:t}),

solved with :func:`dcem.dcem` (standardized costs, ``lb = -c``, ``ub = c``, initial mean 0 and
standard deviation 1). Every DCEM iteration evaluates the ``N`` candidates of all ``B`` start
states as one batch of ``B * N`` rollouts; there is no Python loop over candidates.

The imagination noise: with ``sample=True`` the rollouts draw the stochastic state from the
prior as PlaNet does, but the noise is drawn once per call, one draw per (start state,
candidate slot), and every DCEM iteration reuses it (common random numbers). ``C`` is then a
fixed function during a solve, so the checkpointed backward mode recomputes exactly, the
finite-difference checks are well defined, and the fast ``no_grad`` path
(:func:`plan_latent`, ``RSSM.imagined_return``) and the differentiable one
(:func:`latent_policy`, ``RSSM.imagine``) solve the same problem for the same ``generator``.

Paper settings: horizon 12, 100 candidates, 10 elites, ``tau = 1``, 10 iterations (3 and 5 in
the ablations): 1,000 imagined trajectories per decision against full CEM's 10,000.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dcem.control.decoder import ActionDecoder as _UnitDecoder
from dcem.optim import Backward, dcem
from dcem.world.rssm import RSSM, State

__all__ = ["ActionDecoder", "fit_decoder", "latent_planning_cost", "latent_policy", "plan_latent"]


class ActionDecoder(nn.Module):
    """MLP ``f_dec: [-c, c]^d -> [low, high]^{H x a}`` from a latent box to action sequences.

    ``n_layers`` hidden layers of ``hidden`` ELU units and a linear output layer of ``H * a``
    units (the network of :class:`dcem.control.ActionDecoder`), then
    ``u = low + (high - low) * sigmoid(out)`` per action dimension, so every action lies
    within the bounds (strictly inside up to floating-point saturation of the sigmoid).
    ``latent_bound = c`` sets the box the planners search (``lb = -c``, ``ub = c``); the
    network accepts any input.

    Args:
        latent_dim: latent dimension d, >= 1.
        action_size: action dimension a, >= 1.
        horizon: planning horizon H, >= 1 (paper: 12).
        hidden: width of each hidden layer, >= 1 (default 200, the size of the world model's
            functions).
        n_layers: number of hidden layers, >= 1 (default 2).
        action_low, action_high: bounds, floats or ``(a,)`` tensors, ``low < high``
            (default -1 and 1, the control suite's); kept as buffers (they follow ``.to``).
        latent_bound: half-width ``c > 0`` of the latent box (default 1).

    Shapes:
        ``forward(z)``: ``z (..., d) -> u (..., H, a)``.
    """

    action_low: Tensor
    action_high: Tensor

    def __init__(
        self,
        latent_dim: int,
        action_size: int,
        *,
        horizon: int = 12,
        hidden: int = 200,
        n_layers: int = 2,
        action_low: float | Tensor = -1.0,
        action_high: float | Tensor = 1.0,
        latent_bound: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in [("latent_dim", latent_dim), ("action_size", action_size),
                            ("horizon", horizon)]:  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(latent_bound, bool) or not isinstance(latent_bound, (int, float)):
            raise TypeError(f"latent_bound must be a number, got {type(latent_bound).__name__}")
        if not 0 < latent_bound < math.inf:
            raise ValueError(f"latent_bound must be a finite number > 0, got {latent_bound}")
        width = horizon * action_size
        # the cartpole decoder's network with bounds (0, 1): its output is sigmoid(out)
        self.net = _UnitDecoder(
            latent_dim, horizon=width, hidden=hidden, n_layers=n_layers, u_lb=0.0, u_ub=1.0
        )
        self.latent_dim, self.action_size, self.horizon = latent_dim, action_size, horizon
        self.latent_bound = float(latent_bound)
        low = _action_bound("action_low", action_low, action_size)
        high = _action_bound("action_high", action_high, action_size)
        if not bool((low < high).all()):
            raise ValueError(f"action_low must be < action_high, got {low} and {high}")
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

    def forward(self, z: Tensor) -> Tensor:
        """Decode latents ``z (..., d)`` into action sequences ``(..., H, a)`` within bounds."""
        unit = self.net(z).unflatten(-1, (self.horizon, self.action_size))
        return torch.addcmul(self.action_low, self.action_high - self.action_low, unit)


def _action_bound(name: str, value: float | Tensor, size: int) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or an (a,) tensor, got {type(value).__name__}")
    bound = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach()
    if bound.dim() == 0:
        bound = bound.expand(size)
    elif bound.shape != (size,):
        raise ValueError(f"{name} must be a float or of shape ({size},), got {tuple(bound.shape)}")
    if not bool(torch.isfinite(bound).all()):
        raise ValueError(f"{name} must be finite, got {bound.tolist()}")
    return bound.clone()


# ----------------------------------------------------------------------------- the problem


def _check(
    model: RSSM, decoder: ActionDecoder, state: State, generator: torch.Generator | None
) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if not isinstance(state, State) or state.deter.dim() != 2:
        shape = tuple(state.deter.shape) if isinstance(state, State) else type(state)
        raise ValueError(f"state must be a State with one batch dimension (B), got deter {shape}")
    if decoder.action_size != model.action_size:
        raise ValueError(
            f"decoder decodes actions of size {decoder.action_size}, "
            f"the model takes {model.action_size}"
        )


def _check_inside(
    decoder: ActionDecoder, action_low: float | Tensor | None, action_high: float | Tensor | None
) -> None:
    """Raise unless the decoder's bounds lie within the environment's (None: no check)."""
    low, high = decoder.action_low, decoder.action_high
    checks: list[tuple[str, float | Tensor | None, Callable[[Tensor], Tensor]]] = [
        ("action_low", action_low, lambda bound: low >= bound),
        ("action_high", action_high, lambda bound: high <= bound),
    ]
    for name, value, inside in checks:
        if value is None:
            continue
        bound = _action_bound(name, value, decoder.action_size).to(low)
        if not bool(inside(bound).all()):
            raise ValueError(
                f"the decoder's bounds [{low.tolist()}, {high.tolist()}] exceed "
                f"{name} = {bound.tolist()}"
            )


def _costs(
    model: RSSM,
    decoder: ActionDecoder,
    state: State,
    *,
    sample: bool,
    generator: torch.Generator | None,
    differentiable: bool,
) -> Callable[[Tensor], Tensor]:
    """The batched DCEM objective ``z (B, N, d) -> C (B, N)`` for start states ``state (B)``.

    The prior noise comes from a private generator seeded once from ``generator`` (or the
    global RNG) and re-seeded at every call, so each call with ``N`` candidates sees the same
    ``(H, B, N, stoch)`` noise. ``differentiable`` picks ``RSSM.imagine`` over the fast
    ``RSSM.imagined_return``.
    """
    device = state.deter.device
    seed = 0  # no prior noise to draw with sample=False: the generator is left as it is
    if sample:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())

    def cost(z: Tensor) -> Tensor:
        n = z.shape[1]
        start = State(*(x.unsqueeze(1).expand(-1, n, -1) for x in state))
        actions = decoder(z).permute(2, 0, 1, 3)  # (H, B, N, a)
        noise = torch.Generator(device=device).manual_seed(seed)
        if differentiable:
            return -model.imagine(start, actions, sample=sample, generator=noise).sum(0)
        return -model.imagined_return(start, actions, sample=sample, generator=noise)

    return cost


def _solve(
    cost: Callable[[Tensor], Tensor], decoder: ActionDecoder, state: State, **kw: Any
) -> Tensor:
    """DCEM over the decoder's latent box from mean 0; returns ``z* (B, d)``.

    ``kw``: the remaining arguments of :func:`dcem.dcem` (``init_sigma``, sizes, ``tau``,
    ``generator``, ``backward``).
    """
    c = decoder.latent_bound
    mu = state.deter.new_zeros(state.deter.shape[0], decoder.latent_dim)
    return dcem(cost, mu, lb=-c, ub=c, normalize=True, **kw)


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def plan_latent(
    model: RSSM,
    decoder: ActionDecoder,
    state: State,
    *,
    action_low: float | Tensor | None = None,
    action_high: float | Tensor | None = None,
    n_sample: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    tau: float = 1.0,
    init_sigma: float = 1.0,
    sample: bool = True,
    generator: torch.Generator | None = None,
    return_plan: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plan with DCEM over the decoder's latent space (no gradient); returns the first actions.

    The acting path: ``dcem.dcem`` under ``no_grad`` with the fast ``RSSM.imagined_return``.
    The same solve as :func:`latent_policy` for the same ``generator`` state.

    Args:
        model: the world model. decoder: the latent action decoder (its ``horizon`` is the
            planning horizon ``H``).
        state: start states of shape ``(B)`` (tensors ``(B, ·)``).
        action_low, action_high: the environment's bounds, floats or ``(a,)`` tensors; the
            decoder's bounds must lie within them (checked; None skips the check).
        n_sample: candidates per iteration ``N`` (100). n_elite: soft elites ``k < N`` (10).
        n_iter: DCEM iterations (10). tau: DCEM temperature (1).
        init_sigma: initial standard deviation in latent space (1); the mean is 0.
        sample: imagine with samples from the prior (PlaNet); False uses the prior mean.
        generator: source of the DCEM noise and of the seed of the prior noise.
        return_plan: also return the whole decoded plan.

    Returns:
        ``(B, a)``, the first action of the decoded final DCEM mean; with ``return_plan`` also
        the plan ``(B, H, a)``.

    Raises:
        ValueError: a state without one batch dimension, a decoder of another action size,
            decoder bounds outside ``action_low``/``action_high`` (non-finite ones named),
            and the errors of :func:`dcem.dcem` (sizes, ``tau``, ``init_sigma``).
        TypeError: ``generator`` not a ``torch.Generator`` or None (also in
            :func:`latent_policy` and :func:`latent_planning_cost`).
    """
    _check(model, decoder, state, generator)
    _check_inside(decoder, action_low, action_high)
    cost = _costs(model, decoder, state, sample=sample, generator=generator, differentiable=False)
    kw = dict(n_sample=n_sample, n_elite=n_elite, n_iter=n_iter, tau=tau, generator=generator)
    z = _solve(cost, decoder, state, init_sigma=init_sigma, **kw)
    actions = decoder(z)
    return (actions[:, 0], actions) if return_plan else actions[:, 0]


def latent_policy(
    model: RSSM,
    decoder: ActionDecoder,
    state: State,
    *,
    n_sample: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    tau: float = 1.0,
    init_sigma: float = 1.0,
    sample: bool = True,
    generator: torch.Generator | None = None,
    backward: Backward = "full",
    return_plan: bool = False,
    noise: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The differentiable controller: belief state -> first action of the decoded DCEM solution.

    ``pi(x) = f_dec(z*(x))_1`` with ``z*`` from :func:`dcem.dcem` on the rollouts of
    ``RSSM.imagine``. Gradients reach the decoder, every model parameter the rollouts use
    (input, transition, prior and reward networks) and ``state`` where it requires them: through
    the decoder at ``z*`` and through the solve (reparameterized samples, soft top-k, refits).
    Arguments as in :func:`plan_latent`; ``backward`` is passed to :func:`dcem.dcem`
    (``"checkpoint"`` is exact; ``"pruned"`` approximates, and with ``sample=True`` its graph
    pass sees the noise of the first ``n_keep + n_anchor + 1`` candidate slots rather than
    the kept ones'). ``noise``: DCEM's draws ``(n_iter, B, n_sample, latent_dim)`` instead
    of drawing them from ``generator`` (see :func:`dcem.dcem`; with ``sample=False``, the
    answer for a state is then the same whatever batch it is solved in).

    Returns:
        ``(B, a)``; with ``return_plan`` also the decoded plan ``(B, H, a)``.
    """
    _check(model, decoder, state, generator)
    cost = _costs(model, decoder, state, sample=sample, generator=generator, differentiable=True)
    kw = dict(n_sample=n_sample, n_elite=n_elite, n_iter=n_iter, tau=tau, generator=generator,
              noise=noise)  # fmt: skip
    z = _solve(cost, decoder, state, init_sigma=init_sigma, backward=backward, **kw)
    actions = decoder(z)
    return (actions[:, 0], actions) if return_plan else actions[:, 0]


def latent_planning_cost(
    model: RSSM,
    decoder: ActionDecoder,
    states: State,
    *,
    n_sample: int = 100,
    n_elite: int = 10,
    n_iter: int = 10,
    tau: float = 1.0,
    init_sigma: float = 1.0,
    sample: bool = True,
    generator: torch.Generator | None = None,
    backward: Backward = "full",
) -> Tensor:
    """The decoder's training loss (Algorithm 3, phase 2): mean imagined cost of ``f_dec(z*)``.

    Solves the embedded problem with DCEM on a batch of belief states (e.g. the posteriors of
    a replay batch, flattened to ``(B)``) and returns ``mean_b C(z*_b; x_b)``, a scalar whose
    ``backward()`` gives ``grad_theta sum_b C_theta(z*_b)`` for the decoder parameters
    ``theta``, differentiated through DCEM (``backward`` as in :func:`latent_policy`).

    The world model is held fixed: ``states`` are detached and the rollouts run on a copy of
    ``model`` whose parameters do not require gradients, so ``loss.backward()`` neither
    computes nor accumulates a ``.grad`` for the model (and ``model`` itself is not touched,
    also not in the checkpointed mode, whose recomputation runs during ``backward``); an
    optimizer over the decoder's parameters alone takes the decoder step.

    Returns:
        A scalar: the mean over ``B`` of the negative imagined return of the decoded solution
        (one rollout per state, its prior noise drawn from the solve's seeded stream).
    """
    _check(model, decoder, states, generator)
    states = State(*(x.detach() for x in states))
    fixed = copy.deepcopy(model).requires_grad_(False)
    cost = _costs(fixed, decoder, states, sample=sample, generator=generator, differentiable=True)
    kw = dict(n_sample=n_sample, n_elite=n_elite, n_iter=n_iter, tau=tau, generator=generator)
    z = _solve(cost, decoder, states, init_sigma=init_sigma, backward=backward, **kw)
    return cost(z.unsqueeze(1)).mean()


def fit_decoder(
    decoder: ActionDecoder,
    sequences: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int = 200,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fit ``decoder`` as the decoding half of an autoencoder of action sequences.

    An encoder MLP (two hidden layers of ``hidden`` ELU units, then ``c * tanh`` so that every
    code lies in the latent box ``[-c, c]^d`` the planners search) and ``decoder`` are trained
    together with Adam on the mean squared reconstruction error of minibatches drawn from
    ``sequences``; the encoder is discarded. On the executed action windows of a phase-1
    replay this gives the latent planner a decoder whose image is the action sequences the
    data holds, a start for phase 2 where the model is accurate (the paper trains the decoder
    through DCEM from a random initialization instead).

    Args:
        decoder: the decoder, trained in place (its device and dtype are used).
        sequences: ``(M, H, a)`` action sequences within the decoder's bounds, ``M >= 1``.
        steps: Adam steps, >= 1. batch_size: sequences per step, >= 1 (drawn with
            replacement). lr: learning rate, > 0. hidden: encoder width, >= 1.
        generator: source of the encoder's initialization and of the minibatches.

    Returns:
        The reconstruction error (mean squared, per action component) of every step.

    Raises:
        ValueError: ``sequences`` of another shape than ``(M, decoder.horizon,
            decoder.action_size)``, empty or not finite; a bad ``steps``, ``batch_size``,
            ``lr`` or ``hidden``.
    """
    h, a = decoder.horizon, decoder.action_size
    if not isinstance(sequences, Tensor) or sequences.dim() != 3 or sequences.shape[1:] != (h, a):
        shape = tuple(sequences.shape) if isinstance(sequences, Tensor) else type(sequences)
        raise ValueError(f"sequences must be a (M, {h}, {a}) tensor, got {shape}")
    if sequences.shape[0] < 1 or not bool(torch.isfinite(sequences).all()):
        raise ValueError("sequences must hold at least one sequence, all finite")
    for name, value in [("steps", steps), ("batch_size", batch_size), ("hidden", hidden)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    param = next(decoder.parameters())
    device = param.device
    sequences = sequences.to(device=device, dtype=param.dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the encoder's initialization, seeded
        torch.manual_seed(seed)
        encoder = nn.Sequential(
            nn.Linear(h * a, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
            nn.Linear(hidden, decoder.latent_dim), nn.Tanh(),
        ).to(device=device, dtype=param.dtype)  # fmt: skip
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        pick = torch.randint(sequences.shape[0], (batch_size,), generator=gen).to(device)
        batch = sequences[pick]
        code = decoder.latent_bound * encoder(batch.flatten(1))
        loss = (decoder(code) - batch).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(x) for x in torch.stack(losses).cpu()]
