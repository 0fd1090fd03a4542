"""Tests of dcem.control.mpc: horizon solves with CEM / DCEM and receding-horizon MPC."""

from __future__ import annotations

import pytest
import torch

from dcem.control import (
    U_LB,
    U_UB,
    ActionDecoder,
    reward,
    rollout,
    rollout_cost,
    step,
    validation_states,
)
from dcem.control.mpc import (
    FULL_INIT_SIGMA,
    REFERENCE_EXPERT_CEM,
    SolverConfig,
    run_mpc,
    solve_horizon,
)

F64 = torch.float64
SMALL_CEM = SolverConfig(method="cem", n_sample=200, n_elite=20, n_iter=5)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_full_space_cem_beats_zero_control():
    x_init = validation_states(n=8, dtype=F64)
    sol = solve_horizon(x_init, horizon=10, solver=SMALL_CEM, generator=gen())
    zero = rollout_cost(x_init, torch.zeros(8, 10, dtype=F64))
    assert sol.z.shape == sol.u.shape == (8, 10) and sol.cost.shape == (8,)
    assert torch.equal(sol.u, sol.z)
    assert torch.all(sol.u >= U_LB) and torch.all(sol.u <= U_UB)
    torch.testing.assert_close(sol.cost, rollout_cost(x_init, sol.u))
    assert sol.cost.mean() < zero.mean() - 1.0
    assert (sol.cost < zero + 0.1).all()


def test_reference_expert_reaches_the_papers_expert_cost():
    # Paper appendix, Fig. 9: the full-space expert scores about -9 over random starts;
    # zero control scores about +5.6 on the same states (half of the poles start hanging).
    x_init = validation_states()
    cost = solve_horizon(x_init, solver=REFERENCE_EXPERT_CEM, generator=gen()).cost
    assert -10.0 < cost.mean() < -8.5
    assert rollout_cost(x_init, torch.zeros(100, 20)).mean() > 0.0


def test_more_cem_effort_does_not_hurt():
    x_init = validation_states(n=8, dtype=F64)
    weak = SolverConfig(method="cem", n_sample=20, n_elite=5, n_iter=1)
    cost_weak = solve_horizon(x_init, horizon=10, solver=weak, generator=gen()).cost
    cost_strong = solve_horizon(x_init, horizon=10, solver=SMALL_CEM, generator=gen()).cost
    assert cost_strong.mean() < cost_weak.mean()


def test_latent_dcem_gradient_reaches_the_decoder_and_dynamics():
    torch.manual_seed(0)
    decoder = ActionDecoder(2, horizon=8, hidden=16).double()
    x_init = validation_states(n=2, dtype=F64).requires_grad_()
    params = torch.tensor([9.8, 1.0, 0.1, 0.5], dtype=F64, requires_grad=True)
    solver = SolverConfig(n_sample=20, n_elite=4, n_iter=3)
    sol = solve_horizon(x_init, decoder=decoder, solver=solver, params=params, generator=gen())
    assert sol.z.shape == (2, 2) and sol.u.shape == (2, 8)
    assert sol.z.requires_grad  # the solution itself depends on the decoder
    sol.cost.sum().backward()
    for tensor in [*decoder.parameters(), x_init, params]:
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_tau0_update_treats_the_solution_as_constant():
    torch.manual_seed(0)
    decoder = ActionDecoder(2, horizon=8, hidden=16).double()
    x_init = validation_states(n=2, dtype=F64)
    solver = SolverConfig(method="cem", n_sample=20, n_elite=4, n_iter=3)
    sol = solve_horizon(x_init, decoder=decoder, solver=solver, generator=gen())
    assert not sol.z.requires_grad
    sol.cost.sum().backward()
    grads = [p.grad.clone() for p in decoder.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    decoder.zero_grad()
    rollout_cost(x_init, decoder(sol.z)).sum().backward()
    for g, p in zip(grads, decoder.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_dcem_solution_gradient_matches_finite_differences():
    # Same noise every call (fresh generator), so the solve is a smooth function of params.
    x_init = validation_states(n=1, dtype=F64)
    solver = SolverConfig(n_sample=10, n_elite=3, n_iter=2)

    def cost(params):
        sol = solve_horizon(x_init, horizon=4, solver=solver, params=params, generator=gen(3))
        return sol.cost

    params = torch.tensor([9.8, 1.0, 0.1, 0.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cost, (params,), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_mpc_trajectory_is_consistent():
    x_init = validation_states(n=3, dtype=F64)
    solver = SolverConfig(method="cem", n_sample=50, n_elite=5, n_iter=2)
    res = run_mpc(x_init, n_steps=4, horizon=6, solver=solver, generator=gen())
    assert res.states.shape == (3, 5, 5) and res.controls.shape == res.rewards.shape == (3, 4)
    torch.testing.assert_close(res.states[:, 0], x_init)
    for t in range(4):
        u_t = res.controls[:, t : t + 1]
        torch.testing.assert_close(res.states[:, t + 1], step(res.states[:, t], u_t))
        torch.testing.assert_close(res.rewards[:, t], reward(res.states[:, t], u_t))
    torch.testing.assert_close(res.total_reward, res.rewards.sum(1))
    assert not res.states.requires_grad


def test_mpc_balances_a_nearly_upright_pole():
    x_init = torch.tensor([[0.0, 0.0, 0.995, 0.0999, 0.3]], dtype=F64)
    x_init[:, 2:4] /= x_init[:, 2:4].norm()
    free = rollout(x_init, torch.zeros(1, 30, dtype=F64))
    assert free[0, :, 2].min() < 0.0  # without control the pole falls below horizontal
    res = run_mpc(
        x_init, n_steps=30, horizon=10, solver=SMALL_CEM, warm_start=True, generator=gen()
    )
    assert (res.states[0, :, 2] > 0.9).all()
    assert res.total_reward[0] > 26.0


def test_mpc_with_decoder_runs():
    torch.manual_seed(0)
    decoder = ActionDecoder(2, horizon=5, hidden=8)
    solver = SolverConfig(n_sample=10, n_elite=3, n_iter=2)
    res = run_mpc(validation_states(n=2), n_steps=3, decoder=decoder, solver=solver)
    assert res.controls.shape == (2, 3)
    assert torch.isfinite(res.total_reward).all()


def test_warm_start_shifts_the_previous_plan(monkeypatch):
    import dcem.control.mpc as mpc

    seen = []
    real = mpc.solve_horizon

    def spy(x, **kwargs):
        seen.append(kwargs["init_mu"])
        out = real(x, **kwargs)
        seen.append(out.z)
        return out

    monkeypatch.setattr(mpc, "solve_horizon", spy)
    solver = SolverConfig(method="cem", n_sample=20, n_elite=4, n_iter=1)
    mpc.run_mpc(validation_states(n=2), n_steps=2, horizon=4, solver=solver, warm_start=True)
    first_init, first_plan, second_init = seen[0], seen[1], seen[2]
    assert first_init is None
    torch.testing.assert_close(second_init[:, :3], first_plan[:, 1:])
    torch.testing.assert_close(second_init[:, 3], first_plan[:, 3])


def test_full_space_default_sigma_is_half_the_range():
    assert FULL_INIT_SIGMA == 0.5 * (U_UB - U_LB)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x_init=torch.zeros(2, 4)), "x_init"),
        (dict(init_mu=torch.zeros(2, 3)), "init_mu"),
        (dict(horizon=0), "horizon"),
        (dict(decoder=ActionDecoder(2, horizon=5, hidden=4), horizon=6), "horizon"),
        (dict(solver=SolverConfig(method="sgd")), "method"),  # type: ignore[arg-type]
        (dict(solver=SolverConfig(method="dcem", return_best=True)), "return_best"),
    ],
)
def test_solve_horizon_rejects_bad_arguments(kwargs, match):
    kwargs = {"x_init": torch.zeros(2, 5), "horizon": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        solve_horizon(kwargs.pop("x_init"), **kwargs)


def test_run_mpc_rejects_bad_arguments():
    x_init = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="n_steps"):
        run_mpc(x_init, n_steps=0)
    with pytest.raises(ValueError, match="warm_start"):
        run_mpc(x_init, n_steps=2, decoder=ActionDecoder(2, horizon=5, hidden=4), warm_start=True)
