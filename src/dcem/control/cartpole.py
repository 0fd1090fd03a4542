"""Batched, differentiable cartpole of the action-embedding experiment (paper §5.2.1).

The continuous cartpole of Barto et al. (1983) in the form of Amos et al. (2018,
"Differentiable MPC"), restated in ``docs/cartpole.md``:

* state ``(..., 5)`` = ``(x, xdot, cos θ, sin θ, θdot)``, θ = 0 is the pole pointing up;
* control ``(..., 1)`` = the force on the cart, clamped to ``[U_LB, U_UB]`` = ``[-100, 100]``;
* physical parameters ``(g, m_c, m_p, l)`` as a ``(..., 4)`` tensor, so gradients reach them;
* one explicit Euler step of ``DT = 0.05`` where every right-hand side uses the old values.

Everything is plain tensor arithmetic, so autograd differentiates it with respect to the
state, the control and the physical parameters. Device and dtype follow the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DT = 0.05
"""Integration time step in seconds."""
U_LB = -100.0
"""Lower bound of the force; the dynamics clamp to it."""
U_UB = 100.0
"""Upper bound of the force; the dynamics clamp to it."""
STATE_DIM = 5
"""Length of a state vector ``(x, xdot, cos θ, sin θ, θdot)``."""
N_PARAMS = 4
"""Length of a physical-parameter vector ``(g, m_c, m_p, l)``."""
VALIDATION_SEED = 0
"""Seed of the fixed validation set of initial states."""
N_VALIDATION = 100
"""Size of the fixed validation set of initial states."""


@dataclass(frozen=True)
class CartpoleParams:
    """Physical constants of the cartpole; ``as_tensor`` gives the ``(4,)`` tensor form."""

    g: float = 9.8
    """Gravity (m/s²)."""
    m_c: float = 1.0
    """Cart mass (kg)."""
    m_p: float = 0.1
    """Pole mass (kg)."""
    l: float = 0.5
    """Pole half-length (m)."""

    def __post_init__(self) -> None:
        for name in _PARAM_NAMES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} ({_PARAM_MEANING[name]}) must be finite, got {value}")
            low = _PARAM_LOW[name]
            if low is not None and not (value >= 0 if low == ">= 0" else value > 0):
                raise ValueError(f"{name} ({_PARAM_MEANING[name]}) must be {low}, got {value}")

    def as_tensor(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """The parameters as a ``(4,)`` tensor ``(g, m_c, m_p, l)``."""
        return torch.tensor([self.g, self.m_c, self.m_p, self.l], dtype=dtype, device=device)


_Components = tuple[Tensor, ...]
"""A state ``(x, xdot, cos θ, sin θ, θdot)`` or parameters ``(g, m_c, m_p, l)``, unbound."""

_PARAM_NAMES = ("g", "m_c", "m_p", "l")
_PARAM_MEANING = {"g": "gravity", "m_c": "cart mass", "m_p": "pole mass", "l": "pole half-length"}
# Beyond finiteness: the cart mass and pole length must be positive; the pole may be
# massless (the cart then moves freely); gravity may have any sign or be 0.
_PARAM_LOW: dict[str, str | None] = {"g": None, "m_c": "> 0", "m_p": ">= 0", "l": "> 0"}


def _require_tensor(name: str, value: object, what: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor {what}, got {type(value).__name__}")


def _check_param_values(params: Tensor) -> None:
    """Every parameter finite, ``m_c, l > 0`` and ``m_p >= 0``, with one host sync; raises a
    ValueError naming the first parameter that is not."""
    p = params.detach().reshape(-1, N_PARAMS)
    finite = torch.isfinite(p)
    signs = torch.stack([p[:, 0] == p[:, 0], p[:, 1] > 0, p[:, 2] >= 0, p[:, 3] > 0], 1)
    good = torch.stack([finite, signs], -1)  # (rows, 4, 2)
    ok = good.all(0).flatten().tolist()  # the one host sync
    if all(ok):
        return
    i = ok.index(False)
    name, column = _PARAM_NAMES[i // 2], p[:, i // 2]
    need = "finite" if i % 2 == 0 else _PARAM_LOW[name]
    bad = column[~good[:, i // 2, i % 2]]
    raise ValueError(
        f"params[..., {i // 2}] = {name} ({_PARAM_MEANING[name]}) must be {need}, "
        f"got {float(bad[0]):g}"
    )


def _params_like(params: Tensor | None, state: Tensor, check: bool = True) -> Tensor:
    """Default or validated ``(..., 4)`` parameter tensor on ``state``'s device and dtype.

    ``check`` tests the values (one host sync); callers that validated ``params`` once
    before a loop pass False."""
    if params is None:
        return CartpoleParams().as_tensor(dtype=state.dtype, device=state.device)
    _require_tensor("params", params, "(..., 4) = (g, m_c, m_p, l) or None (see CartpoleParams)")
    if not params.is_floating_point():
        params = params.to(torch.promote_types(state.dtype, torch.get_default_dtype()))
    if params.shape[-1:] != (N_PARAMS,):
        raise ValueError(
            f"params must have shape (..., {N_PARAMS}) = (g, m_c, m_p, l), "
            f"got {tuple(params.shape)}"
        )
    if check:
        _check_param_values(params)
    return params


def _check_state(state: Tensor, name: str = "state") -> None:
    _require_tensor(name, state, f"(..., {STATE_DIM})")
    if state.dim() < 1 or state.shape[-1] != STATE_DIM:
        raise ValueError(
            f"{name} must have shape (..., {STATE_DIM}) = (x, xdot, cos θ, sin θ, θdot), "
            f"got {tuple(state.shape)}"
        )


def _check_control(u: Tensor) -> None:
    _require_tensor("u", u, "(..., 1)")
    if u.dim() < 1 or u.shape[-1] != 1:
        raise ValueError(f"u must have shape (..., 1), got {tuple(u.shape)}")


def _constants(params: _Components) -> _Components:
    """``(g, (4/3) l, m_p l / M, 1 / M)`` from ``(g, m_c, m_p, l)``, computed once per call."""
    g, m_c, m_p, l = params
    inv_total_mass = 1.0 / (m_c + m_p)
    return g, (4.0 / 3.0) * l, m_p * l * inv_total_mass, inv_total_mass


def _euler(state: _Components, force_over_mass: Tensor, consts: _Components) -> _Components:
    """One Euler step on unbound state components ``(x, xdot, cos θ, sin θ, θdot)``.

    ``force_over_mass`` is the clamped force divided by ``M = m_c + m_p``; ``consts`` come
    from ``_constants``. Rearranged from the docstring of ``step`` to save operations:
    ``l (4/3 - m_p cos²θ / M) = (4/3) l - (m_p l / M) cos²θ``.
    """
    x, dx, cos_th, sin_th, dth = state
    g, four_thirds_l, pl_over_mass, _ = consts
    a = force_over_mass + pl_over_mass * dth**2 * sin_th
    th_acc = (g * sin_th - cos_th * a) / (four_thirds_l - pl_over_mass * cos_th**2)
    x_acc = a - pl_over_mass * th_acc * cos_th
    th = torch.atan2(sin_th, cos_th).add(dth, alpha=DT)
    return (
        x.add(dx, alpha=DT),
        dx.add(x_acc, alpha=DT),
        torch.cos(th),
        torch.sin(th),
        dth.add(th_acc, alpha=DT),
    )


def _reward(x: Tensor, cos_th: Tensor, u: Tensor) -> Tensor:
    return cos_th - 0.1 * x**2 - 1e-5 * u**2


def _stack(components: _Components) -> Tensor:
    return torch.stack(torch.broadcast_tensors(*components), dim=-1)


def step(state: Tensor, u: Tensor, params: Tensor | None = None) -> Tensor:
    """One explicit Euler step of ``DT`` of the cartpole.

    With ``M = m_c + m_p``, ``a = (u + m_p l θdot² sin θ) / M``,
    ``θddot = (g sin θ - cos θ a) / (l (4/3 - m_p cos²θ / M))`` and
    ``xddot = a - m_p l θddot cos θ / M``, the step is ``x += DT xdot``,
    ``xdot += DT xddot``, ``θ += DT θdot``, ``θdot += DT θddot`` (old values on every
    right-hand side), with ``θ = atan2(sin θ, cos θ)`` and cos/sin recomputed from the new θ.

    Args:
        state: ``(..., 5)`` states ``(x, xdot, cos θ, sin θ, θdot)``.
        u: ``(..., 1)`` forces, batch shape broadcastable with ``state``'s; clamped to
            ``[U_LB, U_UB]`` (so the gradient is zero outside the bounds).
        params: optional ``(..., 4)`` physical parameters ``(g, m_c, m_p, l)``, broadcastable
            with the batch; default ``CartpoleParams()``.

    Returns:
        ``(..., 5)`` next states, batch shape the broadcast of the inputs'. Differentiable in
        ``state``, ``u`` and ``params``.

    Raises:
        ValueError: bad shapes, or ``params`` with a non-finite entry or ``m_c``, ``m_p``
            or ``l`` not ``> 0`` (checked with one host sync when ``params`` is given).
        TypeError: ``state``, ``u`` or ``params`` not a tensor.
    """
    _check_state(state)
    _check_control(u)
    params = _params_like(params, state)
    try:
        torch.broadcast_shapes(state.shape[:-1], u.shape[:-1], params.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"batch shapes of state {tuple(state.shape)}, u {tuple(u.shape)} and params "
            f"{tuple(params.shape)} do not broadcast"
        ) from err
    consts = _constants(params.unbind(-1))
    force_over_mass = u.squeeze(-1).clamp(U_LB, U_UB) * consts[3]
    return _stack(_euler(state.unbind(-1), force_over_mass, consts))


def reward(state: Tensor, u: Tensor) -> Tensor:
    """Per-step reward ``r = cos θ - 0.1 x² - 1e-5 u²``.

    Args:
        state: ``(..., 5)`` states.
        u: ``(..., 1)`` forces, batch shape broadcastable with ``state``'s. Taken as given
            (not clamped), so forces beyond the bounds are penalized for their full size.

    Returns:
        ``(...)`` rewards (the broadcast batch shape).
    """
    _check_state(state)
    _check_control(u)
    return _reward(state[..., 0], state[..., 2], u[..., 0])


def _rollout_setup(
    x_init: Tensor, u: Tensor, params: Tensor | None, check: bool = True
) -> tuple[_Components, Tensor, _Components]:
    """Validate; return the initial state components, clamped forces / M and ``_constants``.

    The components get a trailing sample axis of size 1 when ``u`` is ``(B, N, H)``, so they
    broadcast against the ``(B, N)`` controls of each step without copies. ``check=False``
    skips the test of the parameter values (see ``_params_like``).
    """
    _require_tensor("x_init", x_init, f"(B, {STATE_DIM})")
    _require_tensor("u", u, "(B, H) or (B, N, H)")
    if x_init.dim() != 2 or x_init.shape[-1] != STATE_DIM:
        raise ValueError(f"x_init must have shape (B, {STATE_DIM}), got {tuple(x_init.shape)}")
    if u.dim() not in (2, 3):
        raise ValueError(f"u must have shape (B, H) or (B, N, H), got {tuple(u.shape)}")
    if u.shape[0] != x_init.shape[0]:
        raise ValueError(
            f"u and x_init must share the batch size B, got u {tuple(u.shape)} and "
            f"x_init {tuple(x_init.shape)}"
        )
    if u.shape[-1] < 1:
        raise ValueError(f"the horizon H = u.shape[-1] must be >= 1, got {tuple(u.shape)}")
    params = _params_like(params, x_init, check)
    if params.dim() > 2 or (params.dim() == 2 and params.shape[0] != x_init.shape[0]):
        raise ValueError(
            f"params must have shape (4,) or (B, 4) with B = {x_init.shape[0]}, "
            f"got {tuple(params.shape)}"
        )
    if u.dim() == 3:
        x_init = x_init.unsqueeze(1)
        params = params.unsqueeze(-2) if params.dim() == 2 else params
    consts = _constants(params.unbind(-1))
    force_over_mass = u.clamp(U_LB, U_UB) * consts[3].unsqueeze(-1)
    return x_init.unbind(-1), force_over_mass, consts


def rollout(x_init: Tensor, u: Tensor, params: Tensor | None = None) -> Tensor:
    """States visited by applying the control sequences ``u`` from ``x_init``.

    Args:
        x_init: ``(B, 5)`` initial states.
        u: ``(B, H)`` one sequence per initial state, or ``(B, N, H)`` N sequences each.
        params: optional ``(4,)`` or ``(B, 4)`` physical parameters.

    Returns:
        ``(B, H + 1, 5)`` or ``(B, N, H + 1, 5)`` states ``x_0 = x_init, ..., x_H``.

    Raises:
        ValueError, TypeError: as :func:`step`.
    """
    state, force_over_mass, consts = _rollout_setup(x_init, u, params)
    batch_shape = u.shape[:-1]
    states = [_stack(state).expand(*batch_shape, STATE_DIM)]
    for t in range(u.shape[-1]):
        state = _euler(state, force_over_mass[..., t], consts)
        states.append(_stack(state).expand(*batch_shape, STATE_DIM))
    return torch.stack(states, dim=-2)


def rollout_cost(x_init: Tensor, u: Tensor, params: Tensor | None = None) -> Tensor:
    """Control cost ``C = -Σ_{t<H} r(x_t, u_t)``, ``x_0 = x_init``, ``x_{t+1} = step(x_t, u_t)``.

    The reward is taken on the state before each step. Batched over initial states and
    samples; the only Python loop is over the H time steps, and the rewards of all steps
    are evaluated at once after it.

    Args:
        x_init: ``(B, 5)`` initial states.
        u: ``(B, H)`` one control sequence per initial state, or ``(B, N, H)`` N each.
        params: optional ``(4,)`` or ``(B, 4)`` physical parameters ``(g, m_c, m_p, l)``.

    Returns:
        ``(B,)`` or ``(B, N)`` costs (lower is better; -H for a pole upright and centered at
        every step with no force). Differentiable in ``x_init``, ``u`` and ``params``.

    Raises:
        ValueError, TypeError: as :func:`step`.
    """
    return _rollout_cost(x_init, u, params)


def _rollout_cost(x_init: Tensor, u: Tensor, params: Tensor | None, check: bool = True) -> Tensor:
    """:func:`rollout_cost`; ``check=False`` skips the test of the parameter values (for a
    cost function called at every optimizer iteration with parameters checked once)."""
    state, force_over_mass, consts = _rollout_setup(x_init, u, params, check)
    positions, cosines = [state[0]], [state[2]]
    for t in range(u.shape[-1] - 1):
        state = _euler(state, force_over_mass[..., t], consts)
        positions.append(state[0])
        cosines.append(state[2])
    x_t = torch.stack(torch.broadcast_tensors(*positions), dim=-1)
    cos_t = torch.stack(torch.broadcast_tensors(*cosines), dim=-1)
    return -_reward(x_t, cos_t, u).sum(-1)


def _angles_to_states(samples: Tensor) -> Tensor:
    """Map ``(n, 4)`` samples ``(x, xdot, θ, θdot)`` to ``(n, 5)`` states."""
    x, dx, th, dth = samples.unbind(-1)
    return torch.stack((x, dx, torch.cos(th), torch.sin(th), dth), dim=-1)


def sample_initial_states(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw initial states: x, xdot ~ U(-0.5, 0.5), θ ~ U(-π, π), θdot ~ U(-1, 1).

    Args:
        n: number of states, >= 1.
        generator: optional random generator (on ``device``) for reproducible draws.
        dtype: float dtype of the result; default ``torch.get_default_dtype()``.
        device: device of the result; default the generator's device, else CPU.

    Returns:
        ``(n, 5)`` states ``(x, xdot, cos θ, sin θ, θdot)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if device is None and generator is not None:
        device = generator.device
    half_width = torch.tensor([0.5, 0.5, math.pi, 1.0], dtype=dtype, device=device)
    unit = torch.rand(n, 4, generator=generator, dtype=dtype, device=device)
    return _angles_to_states((2.0 * unit - 1.0) * half_width)


def validation_states(
    *,
    n: int = N_VALIDATION,
    seed: int = VALIDATION_SEED,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The fixed validation set: ``n`` initial states drawn on the CPU from ``seed``.

    The draw does not depend on ``device`` or on the global random state.

    Returns:
        ``(n, 5)`` states, the same on every call with the same ``n`` and ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    states = sample_initial_states(n, generator=generator, dtype=torch.float64)
    return states.to(dtype=dtype or torch.get_default_dtype(), device=device)
