"""Bad input to the library, as a new user would give it: extreme but finite values get the
exact answer, anything else a ValueError/TypeError naming the argument, never a silent NaN."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

import dcem
from dcem.control import (
    ActionDecoder,
    CartpoleParams,
    SolverConfig,
    rollout,
    rollout_cost,
    run_mpc,
    sample_initial_states,
    solve_horizon,
    step,
)
from dcem.world import RSSM, latent_planning_cost, latent_policy, plan, plan_latent
from dcem.world import ActionDecoder as LatentDecoder

F64 = torch.float64


def reference_lml(x: list[float], k: float, tau: float = 1.0) -> list[float]:
    """Independent reference: bisection for nu in decimal arithmetic with enough digits for
    the largest |x / tau| to 1e-30 (the floats are converted exactly: no shift, no rounding
    of the scores, no overflow), then rounded to float."""
    with localcontext() as ctx:
        ctx.prec = 700  # enough for |x / tau| < 1e640
        t, kd = Decimal(tau), Decimal(k)
        zs = [Decimal(v) / t for v in x]
        ctx.prec = max([40] + [z.adjusted() + 40 for z in zs if z])

        def weights(nu: Decimal) -> list[Decimal]:
            out = []
            for z in zs:
                a = z + nu
                if abs(a) > 500:
                    out.append(Decimal(1 if a > 0 else 0))
                    continue
                with localcontext() as low:  # |a| <= 500: 40 digits are plenty for the sigmoid
                    low.prec = 40
                    out.append(1 / (1 + (-a).exp()))
            return out

        lo, hi = -max(zs) - 1000, -min(zs) + 1000
        while hi - lo > Decimal("1e-30"):
            mid = (lo + hi) / 2
            if sum(weights(mid)) < kd:
                lo = mid
            else:
                hi = mid
        return [float(w) for w in weights((lo + hi) / 2)]


# ----------------------------------------------------------------------------- 1. lml


@pytest.mark.parametrize(
    ("row", "k", "tau", "dtype"),
    [
        ([2e38] * 10, 3, 1.0, torch.float32),  # the example: k / n each
        ([1e308] * 10, 3, 1.0, F64),
        ([3e38, -3e38, 1e38, -1e38], 2, 1.0, torch.float32),  # huge gaps: hard top-k
        ([3.4e38, 3.4e38, -3.4e38, -3.4e38], 3, 1.0, torch.float32),  # ties share
        ([1.7e308, 1.7e308, -1.7e308, -1.7e308], 1, 1.0, F64),
        ([1.7e308, -1.7e308, 0.0, 5.0], 2, 1.0, F64),
        ([3e38, 3e38, 1e38, -3.4e38], 2.5, 1.0, torch.float32),  # fractional k
        ([3e38, -3e38, -3e38], 2.5, 1.0, torch.float32),
        ([1.7e308, 1.7e308, -1.7e308, 0.0], 1.5, 1.0, F64),
        ([1.7e308, -1.7e308, 1.0, -1.7e308, 0.0], 1.25, 1e-300, F64),
        ([1.0, 1.0 + 2**-23, 0.0, -3e38], 1.5, 1e-30, torch.float32),  # neighbouring floats
        ([3.4e38, 1e38, -3.4e38], 2, 1e38, torch.float32),  # tau brings it into range
        ([1.7e308, 1e308, -1.7e308, 0.0], 2, 1e308, F64),  # x - ref overflows, / tau does not
        ([1e30, 1e30, 0.0], 1, 1e-30, torch.float32),  # x / tau overflows: ties still share
        ([0.0, 0.0, 0.0], 1, 1e-50, torch.float32),  # tau underflows in float32
        ([-1e30, -1e30, 0.0], 2, 1e-30, torch.float32),
    ],
)
def test_lml_extreme_finite_inputs_are_exact(row: list, k: float, tau: float, dtype) -> None:
    x = torch.tensor([row], dtype=dtype)
    y = dcem.lml(x, k, tau)
    want = torch.tensor([reference_lml([float(v) for v in x[0]], k, tau)], dtype=dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, want, atol=atol, rtol=0)


def test_lml_k_equals_n_with_overflowing_scaled_scores() -> None:
    # x / tau = -inf for a finite x: every entry is still selected
    assert dcem.lml(torch.tensor([[-3e38, 0.0]]), 2, 0.1).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(("value", "dtype"), [(2e38, torch.float32), (1e308, F64)])
def test_lml_gradient_is_finite_and_exact_at_extremes(value: float, dtype) -> None:
    x = torch.full((2, 10), value, dtype=dtype, requires_grad=True)
    g = torch.arange(20, dtype=dtype).view(2, 10)
    (dcem.lml(x, 3) * g).sum().backward()
    # equal weights y = 0.3: the implicit gradient is y (1 - y) (g - mean(g)) per row
    want = 0.3 * 0.7 * (g - g.mean(-1, keepdim=True))
    torch.testing.assert_close(x.grad, want)


def test_lml_gradient_with_a_tau_that_underflows_in_float32_is_not_nan() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    y = dcem.lml(x, 1, 1e-50)  # 1e-50 is 0 in float32
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert y.tolist() == [[0.0, 0.0, 1.0]]
    assert x.grad.tolist() == [[0.0, 0.0, 0.0]]  # every weight saturated: h = y (1 - y) = 0


def test_lml_module_rejects_an_infinite_tau() -> None:
    with pytest.raises(ValueError, match="tau must be a finite number"):
        dcem.LML(1, math.inf)


# ----------------------------------------------------------------------------- 2. unroll_gd


def test_unroll_gd_raises_when_f_returns_nan() -> None:
    calls = []

    def f(y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        cost = (y * y).sum(-1)
        return cost * math.nan if len(calls) == 4 else cost

    with pytest.raises(ValueError, match=r"f returned a non-finite cost at step 3 "):
        dcem.unroll_gd(f, torch.ones(2, 3), n_iter=5, lr=0.1)


def test_unroll_gd_raises_when_the_iterates_diverge() -> None:
    # y <- y - 1.5 * 2y = -2y: |y_t| = 2^t, the cost 3 * 4^t overflows float32 at t = 64
    with pytest.raises(ValueError, match=r"non-finite cost at step 64 .*diverged, lr = 1.5"):
        dcem.unroll_gd(lambda y: (y * y).sum(-1), torch.ones(2, 3), n_iter=100, lr=1.5)
    # a finite cost and gradient whose step overflows: 0 - 1e10 * 1e30 = -inf in float32
    with pytest.raises(ValueError, match=r"y is not finite after step 0.*lr = 1e\+10"):
        dcem.unroll_gd(lambda y: (1e30 * y).sum(-1), torch.zeros(2, 3), n_iter=2, lr=1e10)


def test_unroll_gd_raises_on_a_non_finite_gradient_and_bad_start() -> None:
    with pytest.raises(ValueError, match="gradient of f is not finite at step 0"):
        dcem.unroll_gd(lambda y: y.abs().sqrt().sum(-1), torch.zeros(2, 3), n_iter=2, lr=0.1)
    with pytest.raises(ValueError, match="y0 must be finite"):
        dcem.unroll_gd(lambda y: (y * y).sum(-1), torch.full((2, 3), math.nan), n_iter=2, lr=0.1)
    with pytest.raises(ValueError, match="f must compute its costs from y"):
        dcem.unroll_gd(lambda y: torch.zeros(2), torch.ones(2, 3), n_iter=2, lr=0.1)
    with pytest.raises(TypeError, match="f must be a callable"):
        dcem.unroll_gd(3, torch.ones(2, 3), n_iter=2, lr=0.1)  # type: ignore[arg-type]


def test_unroll_gd_finite_result_is_unchanged() -> None:
    # y_T = (1 - 2 lr)^T y0 for f = |y|^2
    y = dcem.unroll_gd(lambda y: (y * y).sum(-1), torch.ones(2, 3, dtype=F64), n_iter=4, lr=0.1)
    torch.testing.assert_close(y, torch.full((2, 3), 0.8**4, dtype=F64), rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- 3.-6. cem, dcem


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sphere(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1)


@pytest.mark.parametrize("solver", ["cem", "dcem"])
def test_fewer_finite_costs_than_n_elite_raises(solver: str) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:  # finite on about 7% of the samples only
        return torch.where(x[..., 0] > 1.5, sphere(x), math.nan)

    with pytest.raises(ValueError, match=r"fewer finite costs than n_elite = 5 .*problem\(s\)"):
        getattr(dcem, solver)(f, torch.zeros(2, 3), n_sample=20, n_elite=5, generator=gen())


@pytest.mark.parametrize("tau", [1.0, 1e4])
def test_non_finite_costs_get_weight_exactly_zero(tau: float) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[..., 0] > 0.5, math.inf, sphere(x))

    seen: list = []
    dcem.dcem(
        f, torch.zeros(2, 3, dtype=F64), n_iter=2, tau=tau, generator=gen(), callback=seen.append
    )
    bad = ~torch.isfinite(seen[0].costs)
    assert bad.any()
    assert seen[0].weights[bad].abs().max() == 0  # even where tau makes the weights near-uniform
    torch.testing.assert_close(seen[0].weights.sum(-1), torch.full((2,), 10.0, dtype=F64))


@pytest.mark.parametrize("solver", ["cem", "dcem"])
def test_costs_of_another_dtype_are_cast_to_the_samples_dtype(solver: str) -> None:
    run = getattr(dcem, solver)
    p = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return ((x - p.unsqueeze(1)) ** 2).sum(-1)

    seen: list = []
    wide = run(lambda x: f(x).double(), torch.zeros(1, 3), generator=gen(), callback=seen.append)
    same = run(f, torch.zeros(1, 3), generator=gen())  # float32 costs: the reference
    assert wide.dtype == torch.float32 and seen[0].costs.dtype == torch.float32
    assert torch.equal(wide.detach(), same.detach())
    if solver == "dcem":  # the gradient goes through the cast
        (g_wide,) = torch.autograd.grad(wide.sum(), p)
        (g_same,) = torch.autograd.grad(same.sum(), p)
        assert torch.equal(g_wide, g_same)


@pytest.mark.parametrize("solver", ["cem", "dcem"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_mu=torch.full((2, 3), math.nan)), "init_mu must be finite"),
        (dict(init_mu=torch.tensor([[0.0, math.inf, 0.0]])), "init_mu must be finite"),
        (dict(init_sigma=math.nan), "init_sigma must be finite"),
        (dict(init_sigma=math.inf), "init_sigma must be finite"),
        (dict(init_sigma=torch.tensor([1.0, math.nan, 1.0])), "init_sigma must be finite"),
        (dict(init_sigma=-1.0), "init_sigma must be > 0"),
        (dict(lb=math.nan), "lb must not be NaN"),
        (dict(lb=math.inf), "lb must not be NaN or \\+inf"),
        (dict(ub=-math.inf), "ub must not be NaN or -inf"),
        (dict(lb=1.0, ub=-1.0), "lb must be < ub"),
        (dict(n_sample=5, n_elite=10), "n_elite must be < n_sample"),
        (dict(n_sample=100.0), "n_sample must be an integer"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(
    solver: str, kwargs: dict, match: str
) -> None:
    kw = dict(init_mu=torch.zeros(2, 3), generator=gen()) | kwargs
    with pytest.raises(ValueError, match=match):
        getattr(dcem, solver)(sphere, **kw)


@pytest.mark.parametrize("solver", ["cem", "dcem"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(generator=123), "generator must be a torch.Generator or None"),
        (dict(lb="a"), "lb must be a number or a floating tensor"),
        (dict(init_sigma="a"), "init_sigma must be a number or a floating tensor"),
        (dict(normalize="yes"), "normalize must be True or False"),
        (dict(callback=3), "callback must be a callable or None"),
        (dict(f=3), "f must be a callable"),
    ],
)
def test_bad_types_raise_type_error_naming_the_argument(
    solver: str, kwargs: dict, match: str
) -> None:
    kw = dict(f=sphere, init_mu=torch.zeros(2, 3)) | kwargs
    with pytest.raises(TypeError, match=match):
        getattr(dcem, solver)(kw.pop("f"), **kw)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tau=math.nan), "tau must be a finite number"),
        (dict(tau=math.inf), "tau must be a finite number"),
        (dict(n_sample=10, n_elite=10), "n_elite must be < n_sample"),
        (dict(backward="sometimes"), "backward"),
    ],
)
def test_dcem_module_checks_its_settings_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dcem.DCEM(**kwargs)
    with pytest.raises(TypeError, match="normalize"):
        dcem.DCEM(normalize=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("tau", [1e-50, 1e-300])
def test_dcem_with_a_tau_below_float32_range_has_no_nan_gradient(tau: float) -> None:
    # tau -> 0 is hard CEM: every weight is 0 or 1, so the cost parameters get no gradient
    p = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    out = dcem.dcem(
        lambda x: ((x - p.unsqueeze(1)) ** 2).sum(-1), torch.zeros(1, 3), tau=tau, generator=gen()
    )
    (g,) = torch.autograd.grad(out.sum(), p)
    assert torch.isfinite(out).all()
    assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------- 8. control

PARAMS = torch.tensor([9.8, 1.0, 0.1, 0.5], dtype=F64)  # (g, m_c, m_p, l)


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (1, -1.0, r"m_c \(cart mass\) must be > 0, got -1"),
        (1, 0.0, r"m_c \(cart mass\) must be > 0, got 0"),
        (2, -0.1, r"m_p \(pole mass\) must be >= 0, got -0.1"),
        (3, 0.0, r"l \(pole half-length\) must be > 0, got 0"),
        (3, math.nan, r"l \(pole half-length\) must be finite"),
        (0, math.inf, r"g \(gravity\) must be finite"),
        (1, math.nan, r"m_c \(cart mass\) must be finite"),
    ],
)
def test_cartpole_rejects_unphysical_params(index: int, value: float, match: str) -> None:
    params = PARAMS.clone()
    params[index] = value
    x, u = torch.zeros(2, 5, dtype=F64), torch.zeros(2, 4, dtype=F64)
    for call in (
        lambda: step(x, u[:, :1], params),
        lambda: rollout(x, u, params),
        lambda: rollout_cost(x, u, params),
        lambda: rollout_cost(x, u, params.expand(2, 4)),
        lambda: solve_horizon(x, horizon=4, params=params),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_cartpole_params_dataclass_checks_its_fields() -> None:
    with pytest.raises(ValueError, match=r"m_c \(cart mass\) must be > 0"):
        CartpoleParams(m_c=-1.0)
    with pytest.raises(ValueError, match=r"l \(pole half-length\) must be finite"):
        CartpoleParams(l=math.inf)
    with pytest.raises(TypeError, match="g must be a number"):
        CartpoleParams(g="9.8")  # type: ignore[arg-type]
    assert CartpoleParams(m_p=0.0).m_p == 0.0  # a massless pole is allowed (tested physics)


def test_cartpole_valid_params_give_the_same_costs_as_before() -> None:
    x = torch.tensor([[0.1, 0.0, 1.0, 0.0, 0.0]], dtype=F64)
    u = torch.zeros(1, 3, dtype=F64)
    default = rollout_cost(x, u)
    given = rollout_cost(x, u, CartpoleParams().as_tensor(dtype=F64))
    assert torch.equal(default, given)


def test_control_type_errors_name_the_argument() -> None:
    x = torch.zeros(1, 5)
    with pytest.raises(TypeError, match="x_init must be a tensor"):
        rollout([[0.0] * 5], torch.zeros(1, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params must be a tensor"):
        rollout(x, torch.zeros(1, 4), [9.8, 1.0, 0.1, 0.5])  # type: ignore[arg-type]
    small = SolverConfig(n_iter=1, n_sample=10, n_elite=2)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        solve_horizon(x, horizon=3, solver=small, generator=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        sample_initial_states(2, generator=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x_init must be finite"):
        solve_horizon(torch.full((1, 5), math.nan), horizon=3, solver=small)
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        run_mpc(x, n_steps=1.5, solver=small)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be an integer"):
        sample_initial_states(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latent_dim must be an integer"):
        ActionDecoder(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="u_lb must be finite"):
        ActionDecoder(2, u_lb=math.nan)


# ----------------------------------------------------------------------------- 6.-7. world


@pytest.fixture(scope="module")
def world() -> tuple:
    torch.manual_seed(0)
    model = RSSM(5, 2, deter_size=8, stoch_size=3, hidden_size=16)
    return model, model.initial_state((2,)), LatentDecoder(2, 2, horizon=3, hidden=8)


SMALL = dict(n_sample=10, n_elite=2, n_iter=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(action_low=1.0, action_high=-1.0), r"action_low must be < action_high.*action_low"),
        (dict(action_low=torch.tensor([0.0, 2.0])), r"action_low must be < action_high"),
        (dict(action_low=math.nan), "action_low must be finite"),
        (dict(action_high=math.inf), "action_high must be finite"),
        (dict(horizon=2.5), "horizon must be an integer"),
        (dict(n_elite=10), "n_elite must be < n_sample"),
        (dict(init_sigma=math.nan), "init_sigma must be finite"),
    ],
)
def test_plan_value_errors_name_the_public_argument(world: tuple, kwargs: dict, match: str) -> None:
    model, state, _ = world
    with pytest.raises(ValueError, match=match) as info:
        plan(model, state, **{"horizon": 3, **SMALL, **kwargs})
    assert not any(internal in str(info.value) for internal in ("lb ", "ub ", " lb", " ub"))


def test_world_generator_type_errors(world: tuple) -> None:
    model, state, decoder = world
    match = "generator must be a torch.Generator or None"
    with pytest.raises(TypeError, match=match):
        plan(model, state, horizon=3, generator=123, **SMALL)  # type: ignore[arg-type]
    for fn in (plan_latent, latent_policy, latent_planning_cost):
        with pytest.raises(TypeError, match=match):
            fn(model, decoder, state, generator=123, **SMALL)  # type: ignore[operator]
    with pytest.raises(TypeError, match="action_low must be a number"):
        plan(model, state, horizon=3, action_low="a", **SMALL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state must be a State"):
        plan(model, tuple(state), horizon=3, **SMALL)  # type: ignore[arg-type]


def test_latent_decoder_and_bounds_checks() -> None:
    with pytest.raises(ValueError, match="horizon must be an integer"):
        LatentDecoder(2, 2, horizon=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latent_bound must be a finite number"):
        LatentDecoder(2, 2, latent_bound=math.inf)
    with pytest.raises(ValueError, match="action_low must be finite"):
        LatentDecoder(2, 2, action_low=math.nan)


def test_plan_with_valid_bounds_respects_them(world: tuple) -> None:
    model, state, _ = world
    low, high = torch.tensor([-1.0, -0.25]), torch.tensor([0.5, 0.25])
    first, actions = plan(
        model, state, horizon=3, action_low=low, action_high=high, return_plan=True, **SMALL
    )
    assert actions.shape == (2, 3, 2)
    assert bool(((actions >= low) & (actions <= high)).all())


# ----------------------------------------------------------------------------- more gaps


@pytest.mark.parametrize("max_iter", [0, -1, 2.5])
def test_lml_rejects_a_bad_max_iter(max_iter) -> None:
    with pytest.raises(ValueError, match="max_iter must be None or an integer >= 1"):
        dcem.lml(torch.randn(2, 5), 2, max_iter=max_iter)


def test_one_step_functions_check_shapes_n_elite_and_tau() -> None:
    mu, sigma = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"eps of shape \(B, N, d\).*eps \(2, 10, 4\)"):
        dcem.dcem_step(sphere, mu, sigma, torch.randn(2, 10, 4), n_elite=2, tau=1.0)
    with pytest.raises(ValueError, match="tau must be a finite number"):
        dcem.dcem_step(sphere, mu, sigma, torch.randn(2, 10, 3), n_elite=2, tau=math.nan)
    with pytest.raises(ValueError, match="n_elite must be < N"):
        dcem.cem_step(sphere, mu, sigma, torch.randn(2, 10, 3), n_elite=20)
    # valid arguments: the same step as before, weights summing to n_elite
    out = dcem.dcem_step(
        sphere, mu, sigma, torch.randn(2, 10, 3, generator=gen()), n_elite=2, tau=1.0
    )
    torch.testing.assert_close(out[4].sum(-1), torch.full((2,), 2.0))


def test_sample_initial_states_rejects_an_integer_dtype() -> None:
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        sample_initial_states(3, dtype=torch.int64)
