"""Tests of dcem.control: cartpole dynamics, rollouts, decoder, initial states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcem.control import (
    DT,
    U_LB,
    U_UB,
    ActionDecoder,
    CartpoleParams,
    reward,
    rollout,
    rollout_cost,
    sample_initial_states,
    step,
    validation_states,
)

F64 = torch.float64


def reference_step(state, u, g=9.8, m_c=1.0, m_p=0.1, l=0.5, dt=0.05):
    """Scalar transcription of docs/cartpole.md, independent of the library."""
    x, dx, cos_th, sin_th, dth = (float(v) for v in state)
    u = min(max(float(u), -100.0), 100.0)
    th = math.atan2(sin_th, cos_th)
    total = m_c + m_p
    a = (u + m_p * l * dth * dth * sin_th) / total
    th_acc = (g * sin_th - cos_th * a) / (l * (4.0 / 3.0 - m_p * cos_th * cos_th / total))
    x_acc = a - m_p * l * th_acc * cos_th / total
    th_new = th + dt * dth
    return np.array(
        [x + dt * dx, dx + dt * x_acc, math.cos(th_new), math.sin(th_new), dth + dt * th_acc]
    )


def state_from_angle(x, dx, th, dth, dtype=F64):
    return torch.tensor([x, dx, math.cos(th), math.sin(th), dth], dtype=dtype)


def random_states(n, seed, dtype=F64):
    return sample_initial_states(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- one step -------------------------------------------------------------------------------


def test_step_matches_scalar_reference():
    states = torch.cat([random_states(6, seed=1) * 3.0, validation_states(n=4, dtype=F64)])
    states[:, 2:4] = states[:, 2:4] / states[:, 2:4].norm(dim=-1, keepdim=True)
    controls = torch.tensor([0.0, 7.5, -42.0, 99.0, -3.0, 150.0, -250.0, 1.0, 0.0, 60.0], dtype=F64)
    got = step(states, controls[:, None])
    for state, u, row in zip(states, controls, got, strict=True):
        np.testing.assert_allclose(row.numpy(), reference_step(state, u), rtol=1e-12, atol=1e-12)


def test_step_matches_reference_with_other_params():
    params = (9.81, 2.0, 0.5, 0.8)
    states = random_states(5, seed=2)
    u = torch.linspace(-30, 30, 5, dtype=F64)[:, None]
    got = step(states, u, torch.tensor(params, dtype=F64))
    for state, u_i, row in zip(states, u, got, strict=True):
        np.testing.assert_allclose(row.numpy(), reference_step(state, u_i, *params), rtol=1e-12)


def test_step_hand_worked_push_from_upright_rest():
    # a = 100/11, θddot = -a / (0.5 (4/3 - 1/11)) = -600/41, xddot = 400/41.
    got = step(state_from_angle(0, 0, 0, 0), torch.tensor([10.0], dtype=F64))
    want = torch.tensor([0.0, DT * 400 / 41, 1.0, 0.0, -DT * 600 / 41], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_step_hand_worked_horizontal_pole_at_rest():
    # θ = π/2, u = 0: a = 0, θddot = g / (4/3 l) = 14.7, xddot = 0 (cos θ = 0).
    state = torch.tensor([0.3, -0.2, 0.0, 1.0, 0.0], dtype=F64)
    got = step(state, torch.zeros(1, dtype=F64))
    want = torch.tensor([0.3 - DT * 0.2, -0.2, 0.0, 1.0, DT * 14.7], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_step_keeps_unit_circle_and_follows_dtype():
    for dtype in (torch.float32, F64):
        states = random_states(8, seed=3, dtype=dtype)
        nxt = step(states, torch.full((8, 1), 20.0, dtype=dtype))
        assert nxt.dtype == dtype and nxt.shape == (8, 5)
        torch.testing.assert_close(nxt[:, 2] ** 2 + nxt[:, 3] ** 2, torch.ones(8, dtype=dtype))


def test_device_and_dtype_follow_the_inputs():
    # The meta device runs shapes/devices/dtypes only: any tensor hard-coded on the CPU fails.
    state = torch.zeros(3, 5, device="meta", dtype=F64)
    assert step(state, torch.zeros(3, 1, device="meta", dtype=F64)).device.type == "meta"
    cost = rollout_cost(state, torch.zeros(3, 4, 6, device="meta", dtype=F64))
    assert cost.device.type == "meta" and cost.dtype == F64 and cost.shape == (3, 4)
    traj = rollout(state.float(), torch.zeros(3, 6, device="meta"))
    assert traj.device.type == "meta" and traj.dtype == torch.float32
    assert sample_initial_states(2, device="meta").device.type == "meta"
    assert validation_states(device="meta", dtype=F64).dtype == F64


def test_step_broadcasts_one_state_over_many_controls():
    state = random_states(1, seed=4)
    u = torch.linspace(-50, 50, 7, dtype=F64)[:, None]
    got = step(state, u)
    assert got.shape == (7, 5)
    for i in range(7):
        torch.testing.assert_close(got[i], step(state[0], u[i]))


def test_control_is_clamped():
    states = random_states(4, seed=5)
    hi, lo = torch.full((4, 1), U_UB, dtype=F64), torch.full((4, 1), U_LB, dtype=F64)
    torch.testing.assert_close(step(states, hi * 3), step(states, hi))
    torch.testing.assert_close(step(states, lo * 10), step(states, lo))
    assert not torch.allclose(step(states, hi * 0.5), step(states, hi))
    u = torch.full((4, 1), 250.0, dtype=F64, requires_grad=True)
    step(states, u).sum().backward()
    assert torch.all(u.grad == 0)


# --- physics --------------------------------------------------------------------------------


def accelerations(state, u, params):
    """(xddot, θddot) recovered from one Euler step."""
    nxt = step(state, u, params)
    return (nxt[..., 1] - state[..., 1]) / DT, (nxt[..., 4] - state[..., 4]) / DT


@pytest.mark.parametrize("params", [(9.8, 1.0, 0.1, 0.5), (9.81, 0.7, 0.6, 1.3)])
def test_step_satisfies_the_equations_of_motion(params):
    # Lagrangian cartpole (rod of half-length l): horizontal momentum balance
    # M xddot + m_p l (θddot cos θ - θdot² sin θ) = u and the pole equation
    # (4/3) l θddot = g sin θ - xddot cos θ; together they conserve energy for u = 0.
    g, m_c, m_p, l = params
    states = random_states(16, seed=6) * torch.tensor([4, 4, 1, 1, 5], dtype=F64)
    u = torch.linspace(-80, 80, 16, dtype=F64)[:, None]
    x_acc, th_acc = accelerations(states, u, torch.tensor(params, dtype=F64))
    _, _, c, s, dth = states.unbind(-1)
    momentum_rate = (m_c + m_p) * x_acc + m_p * l * (th_acc * c - dth**2 * s)
    torch.testing.assert_close(momentum_rate, u[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(4 / 3 * l * th_acc, g * s - x_acc * c, rtol=1e-10, atol=1e-10)


def test_energy_rate_equals_power_of_the_force():
    g, m_c, m_p, l = CartpoleParams().g, 1.0, 0.1, 0.5
    states = random_states(16, seed=7) * torch.tensor([1, 3, 1, 1, 4], dtype=F64)
    u = torch.linspace(-20, 20, 16, dtype=F64)[:, None]
    x_acc, th_acc = accelerations(states, u, None)
    _, dx, c, s, dth = states.unbind(-1)
    # E = ½ M xdot² + m_p l xdot θdot cos θ + ⅔ m_p l² θdot² + m_p g l cos θ
    energy_rate = (
        (m_c + m_p) * dx * x_acc
        + m_p * l * (x_acc * dth * c + dx * th_acc * c - dx * dth**2 * s)
        + 4 / 3 * m_p * l**2 * dth * th_acc
        - m_p * g * l * dth * s
    )
    torch.testing.assert_close(energy_rate, u[:, 0] * dx, rtol=1e-10, atol=1e-10)


def test_massless_pole_leaves_the_cart_free():
    params = torch.tensor([9.8, 2.0, 0.0, 0.5], dtype=F64)
    states = random_states(10, seed=8) * torch.tensor([1, 4, 1, 1, 3], dtype=F64)
    u = torch.linspace(-60, 60, 10, dtype=F64)[:, None]
    x_acc, _ = accelerations(states, u, params)
    torch.testing.assert_close(x_acc, u[:, 0] / 2.0, rtol=1e-12, atol=1e-12)
    # Pole upright at rest, no force: the cart coasts at constant velocity.
    traj = rollout(
        torch.tensor([[0.1, 1.3, 1.0, 0.0, 0.0]], dtype=F64), torch.zeros(1, 30, dtype=F64), params
    )
    torch.testing.assert_close(traj[0, :, 1], torch.full((31,), 1.3, dtype=F64))
    torch.testing.assert_close(traj[0, -1, 0], torch.tensor(0.1 + 30 * DT * 1.3, dtype=F64))


@pytest.mark.parametrize("theta", [0.0, math.pi])
def test_equilibria_stay_put_without_force(theta):
    x_init = state_from_angle(0.2, 0.0, theta, 0.0)[None]
    traj = rollout(x_init, torch.zeros(1, 100, dtype=F64))
    torch.testing.assert_close(traj[0], x_init.expand(101, 5), rtol=0, atol=1e-12)


def test_pole_falls_away_from_upright():
    # A small tilt grows (unstable top); a push to the right tips the pole to the left.
    traj = rollout(state_from_angle(0, 0, 0.05, 0)[None], torch.zeros(1, 10, dtype=F64))
    rise = torch.diff(traj[0, :, 3])
    assert rise[0] == 0 and torch.all(rise[1:] > 0)  # Euler: θ moves one step after θdot
    nxt = step(state_from_angle(0, 0, 0, 0), torch.tensor([30.0], dtype=F64))
    assert nxt[1] > 0 and nxt[4] < 0


# --- gradients ------------------------------------------------------------------------------


def test_step_gradcheck_state_control_params():
    states = random_states(3, seed=9).requires_grad_()
    u = torch.tensor([[3.0], [-40.0], [70.0]], dtype=F64, requires_grad=True)
    params = torch.tensor([9.8, 1.0, 0.1, 0.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(step, (states, u, params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_rollout_cost_gradcheck_state_control_params():
    x_init = random_states(2, seed=10).requires_grad_()
    u = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * 60 - 30
    u.requires_grad_()
    params = torch.tensor([[9.8, 1.0, 0.1, 0.5], [9.0, 1.5, 0.3, 0.7]], dtype=F64)
    params.requires_grad_()
    assert torch.autograd.gradcheck(
        rollout_cost, (x_init, u, params), eps=1e-6, atol=1e-5, rtol=1e-5
    )


def test_rollout_cost_gradient_matches_central_differences_in_mass():
    x_init = random_states(1, seed=11)
    u = torch.full((1, 8), 15.0, dtype=F64)
    params = CartpoleParams().as_tensor(dtype=F64).requires_grad_()
    rollout_cost(x_init, u, params).sum().backward()
    eps = 1e-6
    bump = torch.tensor([0, 0, eps, 0], dtype=F64)
    fd = (rollout_cost(x_init, u, params + bump) - rollout_cost(x_init, u, params - bump)) / (
        2 * eps
    )
    assert params.grad[2].abs() > 1e-3
    torch.testing.assert_close(params.grad[2], fd.detach()[0], rtol=1e-6, atol=1e-8)


# --- reward and rollouts --------------------------------------------------------------------


def test_reward_by_hand():
    state = torch.tensor([[0.5, 9.0, 0.6, 0.8, -7.0], [0.0, 0.0, -1.0, 0.0, 0.0]], dtype=F64)
    u = torch.tensor([[20.0], [-100.0]], dtype=F64)
    want = torch.tensor([0.6 - 0.025 - 0.004, -1.0 - 0.1], dtype=F64)
    torch.testing.assert_close(reward(state, u), want)


def test_upright_centered_rollout_costs_minus_horizon():
    x_init = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(
        rollout_cost(x_init, torch.zeros(1, 20, dtype=F64)), -20 * torch.ones(1, dtype=F64)
    )


def test_rollout_cost_batch_equals_single_loops():
    x_init = random_states(3, seed=12)
    u = torch.rand(3, 4, 7, generator=torch.Generator().manual_seed(1), dtype=F64) * 600 - 300
    assert (u.abs() > U_UB).any()  # also beyond the bounds: clamped dynamics, full penalty
    params = CartpoleParams(m_p=0.3).as_tensor(dtype=F64)
    got = rollout_cost(x_init, u, params)
    assert got.shape == (3, 4)
    for b in range(3):
        for n in range(4):
            x, cost = x_init[b], 0.0
            for t in range(7):
                cost -= float(reward(x, u[b, n, t : t + 1]))
                x = step(x, u[b, n, t : t + 1], params)
            assert got[b, n].item() == pytest.approx(cost, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(rollout_cost(x_init, u[:, 2], params), got[:, 2])


def test_rollout_cost_uses_the_state_before_each_step():
    # H = 1: the cost is -r(x_init, u_0), whatever u_0 does to the next state.
    x_init = random_states(4, seed=13)
    u = torch.full((4, 1), 50.0, dtype=F64)
    torch.testing.assert_close(rollout_cost(x_init, u), -reward(x_init, u))


def test_rollout_cost_per_state_params():
    x_init = random_states(2, seed=14)
    u = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2), dtype=F64) * 40 - 20
    params = torch.tensor([[9.8, 1.0, 0.1, 0.5], [9.8, 1.0, 0.9, 0.5]], dtype=F64)
    got = rollout_cost(x_init, u, params)
    for b in range(2):
        torch.testing.assert_close(
            got[b], rollout_cost(x_init[b : b + 1], u[b : b + 1], params[b])[0]
        )
    assert not torch.allclose(got[1], rollout_cost(x_init[1:], u[1:], params[0])[0])


def test_rollout_matches_repeated_steps():
    x_init = random_states(2, seed=15)
    u = torch.rand(2, 5, generator=torch.Generator().manual_seed(3), dtype=F64) * 250
    traj = rollout(x_init, u)
    assert traj.shape == (2, 6, 5)
    x = x_init
    for t in range(5):
        x = step(x, u[:, t : t + 1])
        torch.testing.assert_close(traj[:, t + 1], x)


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (step, (torch.zeros(3, 4), torch.zeros(3, 1)), "state"),
        (step, (torch.zeros(3, 5), torch.zeros(3)), "u"),
        (step, (torch.zeros(3, 5), torch.zeros(2, 1)), "broadcast"),
        (step, (torch.zeros(3, 5), torch.zeros(3, 1), torch.ones(3)), "params"),
        (reward, (torch.zeros(3, 6), torch.zeros(3, 1)), "state"),
        (rollout_cost, (torch.zeros(3, 4), torch.zeros(3, 10)), "x_init"),
        (rollout_cost, (torch.zeros(5), torch.zeros(1, 10)), "x_init"),
        (rollout_cost, (torch.zeros(3, 5), torch.zeros(2, 10)), "batch size"),
        (rollout_cost, (torch.zeros(3, 5), torch.zeros(3, 0)), "horizon"),
        (rollout_cost, (torch.zeros(3, 5), torch.zeros(3, 2, 2, 10)), "u must"),
        (rollout, (torch.zeros(3, 5), torch.zeros(3, 4, 0)), "horizon"),
        (rollout_cost, (torch.zeros(3, 5), torch.zeros(3, 10), torch.ones(2, 4)), "params"),
        (rollout_cost, (torch.zeros(3, 5), torch.zeros(3, 2, 10), torch.ones(3, 5)), "params"),
    ],
)
def test_shape_errors_name_the_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# --- initial states -------------------------------------------------------------------------


def test_initial_state_distribution():
    states = sample_initial_states(4000, generator=torch.Generator().manual_seed(0), dtype=F64)
    x, dx, c, s, dth = states.unbind(-1)
    theta = torch.atan2(s, c)
    torch.testing.assert_close(c**2 + s**2, torch.ones_like(c))
    for values, half in ((x, 0.5), (dx, 0.5), (theta, math.pi), (dth, 1.0)):
        assert values.abs().max() <= half
        assert values.abs().max() > 0.98 * half  # covers the whole range
        assert abs(values.mean()) < 0.05 * half  # centred
        assert abs(values.var() - half**2 / 3) < 0.1 * half**2 / 3  # uniform variance
    assert (theta.abs() > math.pi / 2).float().mean() > 0.45  # half the poles start hanging


def test_initial_states_reproducible_and_validation_fixed():
    a = sample_initial_states(5, generator=torch.Generator().manual_seed(3))
    b = sample_initial_states(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.dtype == torch.get_default_dtype()
    torch.manual_seed(123)
    val = validation_states()
    torch.manual_seed(456)
    assert val.shape == (100, 5)
    torch.testing.assert_close(val, validation_states())
    torch.testing.assert_close(validation_states(dtype=F64).float(), val)
    assert not torch.allclose(val, validation_states(seed=1))
    with pytest.raises(ValueError, match="n must"):
        sample_initial_states(0)


# --- decoder --------------------------------------------------------------------------------


def test_decoder_shapes_bounds_and_architecture():
    torch.manual_seed(0)
    dec = ActionDecoder(3, horizon=7, hidden=16)
    z = torch.rand(4, 5, 3) * 2 - 1
    u = dec(z)
    assert u.shape == (4, 5, 7)
    assert dec(z[0, 0]).shape == (7,)
    assert torch.all(u > U_LB) and torch.all(u < U_UB)
    assert u.std() > 1.0  # not collapsed onto a constant
    big = dec(torch.full((2, 3), 1e4))
    assert torch.all(big >= U_LB) and torch.all(big <= U_UB)
    linears = [m for m in dec.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (3, 16),
        (16, 16),
        (16, 16),
        (16, 7),
    ]
    assert sum(isinstance(m, torch.nn.ELU) for m in dec.net) == 3


def test_decoder_custom_bounds_follow_sigmoid():
    torch.manual_seed(1)
    dec = ActionDecoder(2, horizon=4, hidden=8, n_layers=1, u_lb=-2.0, u_ub=5.0)
    z = torch.randn(6, 2)
    torch.testing.assert_close(dec(z), -2.0 + 7.0 * torch.sigmoid(dec.net(z)))
    assert dec(z).min() > -2.0 and dec(z).max() < 5.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(latent_dim=0), "latent_dim"),
        (dict(latent_dim=2, horizon=0), "horizon"),
        (dict(latent_dim=2, n_layers=0), "n_layers"),
        (dict(latent_dim=2, u_lb=1.0, u_ub=1.0), "u_lb"),
    ],
)
def test_decoder_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActionDecoder(**kwargs)


def test_decoder_rejects_wrong_latent_size():
    with pytest.raises(ValueError, match="z must"):
        ActionDecoder(2, horizon=3, hidden=4)(torch.zeros(5, 3))
