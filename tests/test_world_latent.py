"""Tests of dcem.world.latent: decoder bounds and shapes, the latent planner on a toy optimum,
the policy gradient against finite differences, the decoder update on held-out belief states,
argument errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dcem.world import (
    RSSM,
    ActionDecoder,
    State,
    fit_decoder,
    latent_planning_cost,
    latent_policy,
    plan,
    plan_latent,
)
from test_world import peaked_model

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
SMALL = dict(n_sample=20, n_elite=4, n_iter=3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(action_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> RSSM:
    """A random tiny RSSM; ``action_scale`` strengthens the actions' and rewards' weights."""
    torch.manual_seed(0)
    model = RSSM(4, 2, deter_size=8, stoch_size=3, hidden_size=16).to(dtype)
    with torch.no_grad():
        model.input[0].weight[:, 3:] *= action_scale
        model.reward[-1].weight *= action_scale
    return model


def tiny_decoder(dtype: torch.dtype = torch.float32, **kwargs) -> ActionDecoder:
    torch.manual_seed(1)
    return ActionDecoder(2, 2, **{"horizon": 4, "hidden": 16, **kwargs}).to(dtype)


def random_states(n: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> State:
    """Belief-like states: deterministic part in (-1, 1), a stochastic sample and its Gaussian."""
    return State(
        torch.randn(n, 8, generator=g, dtype=dtype).tanh(),
        torch.randn(n, 3, generator=g, dtype=dtype),
        torch.zeros(n, 3, dtype=dtype),
        torch.ones(n, 3, dtype=dtype),
    )


# ----------------------------------------------------------------------------- decoder
def test_decoder_shapes_and_bounds():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([0.5, 2.0])
    decoder = tiny_decoder(action_low=low, action_high=high)
    z = 3.0 * torch.randn(5, 7, 2, generator=gen())
    u = decoder(z)
    assert u.shape == (5, 7, 4, 2)
    assert bool((u > low).all()) and bool((u < high).all())
    assert decoder(torch.zeros(2)).shape == (4, 2)
    assert set(dict(decoder.named_buffers())) == {"action_low", "action_high"}
    assert decoder.to(F64)(z.to(F64)).dtype == F64


def _circle_sequences(m: int, g: torch.Generator) -> torch.Tensor:
    """``(m, 4, 2)`` sequences on a one-parameter family: ``u_t = 0.8 (sin, cos)(phi + t)``."""
    phi = 6.2832 * torch.rand(m, 1, generator=g) + torch.arange(4.0)
    return 0.8 * torch.stack([phi.sin(), phi.cos()], -1)


def test_fit_decoder_reconstructs_a_family_of_sequences_from_the_latent_box():
    sequences = _circle_sequences(512, gen(3))
    decoder = tiny_decoder(hidden=64)
    losses = fit_decoder(decoder, sequences, steps=1500, batch_size=64, lr=3e-3, generator=gen())
    assert len(losses) == 1500 and losses[-1] < 0.05 * float(sequences.var(0).mean())
    # the family is inside the decoder's image over the box: latent search recovers each
    # held-out sequence nearly as well as the encoder did
    held_out = _circle_sequences(8, gen(4))
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 41)] * 2, indexing="ij"), -1)
    with torch.no_grad():
        decoded = decoder(grid.reshape(-1, 2))  # (41 * 41, 4, 2)
    errors = (decoded[None] - held_out[:, None]).square().mean((2, 3)).min(1).values
    assert float(errors.max()) < 0.05 * float(sequences.var(0).mean())
    # seeded: the same generator state gives the same fit
    again = tiny_decoder(hidden=64)
    same = fit_decoder(again, sequences, steps=1500, batch_size=64, lr=3e-3, generator=gen())
    assert same == losses


def test_fit_decoder_names_bad_arguments():
    decoder = tiny_decoder()
    good = torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match=r"sequences must be a \(M, 4, 2\)"):
        fit_decoder(decoder, torch.zeros(3, 5, 2), steps=1)
    with pytest.raises(ValueError, match="sequences must hold"):
        fit_decoder(decoder, torch.full((3, 4, 2), float("nan")), steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit_decoder(decoder, good, steps=0)
    with pytest.raises(ValueError, match="lr"):
        fit_decoder(decoder, good, steps=1, lr=0.0)


# ----------------------------------------------------------------------------- planner
def toy_decoder() -> ActionDecoder:
    """Decodes ``z`` to the constant sequence ``u_j = 2 sigmoid(3 elu(z_j)) - 1``, which is
    [0.5, -0.3] (the peaked model's optimum) at ``z = (log 3 / 3, log(1 + log(7/13) / 3))``."""
    decoder = ActionDecoder(2, 2, horizon=4, hidden=2, n_layers=1)
    first, last = decoder.net.net[0], decoder.net.net[2]
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(3.0 * torch.eye(2).repeat(4, 1))
        last.bias.zero_()
    return decoder


def test_plan_latent_finds_the_optimum_the_decoder_can_represent():
    model = peaked_model([0.5, -0.3])
    first, actions = plan_latent(
        model, toy_decoder(), model.initial_state((2,)), generator=gen(), return_plan=True
    )
    assert first.shape == (2, 2) and actions.shape == (2, 4, 2)
    target = torch.tensor([0.5, -0.3])
    torch.testing.assert_close(first, target.expand(2, 2), atol=0.03, rtol=0.0)
    torch.testing.assert_close(actions, target.expand(2, 4, 2), atol=0.03, rtol=0.0)


def test_plan_latent_and_latent_policy_solve_the_same_problem():
    model, decoder = tiny_model(3.0), tiny_decoder()
    state = random_states(3, gen(2))
    fast = plan_latent(model, decoder, state, generator=gen(7), **SMALL)
    differentiable = latent_policy(model, decoder, state, generator=gen(7), **SMALL)
    assert differentiable.requires_grad
    torch.testing.assert_close(fast, differentiable.detach(), atol=1e-5, rtol=0.0)
    other = plan_latent(model, decoder, state, generator=gen(8), **SMALL)
    assert not torch.equal(fast, other)


def test_plan_latent_checks_the_environment_bounds():
    model, decoder = tiny_model(), tiny_decoder(action_low=-0.5, action_high=0.5)
    state = random_states(1, gen())
    first = plan_latent(model, decoder, state, action_low=-1.0, action_high=1.0, **SMALL)
    assert bool((first.abs() < 0.5).all())
    with pytest.raises(ValueError, match="action_high"):
        plan_latent(model, decoder, state, action_high=torch.tensor([1.0, 0.4]), **SMALL)
    with pytest.raises(ValueError, match="action_low"):
        plan_latent(model, decoder, state, action_low=torch.zeros(3), **SMALL)


# ----------------------------------------------------------------------------- gradients
def _central_fd(fn, p: torch.Tensor, index: list[tuple[int, ...]], eps: float = 1e-6):
    grads = []
    for i in index:
        old = float(p[i].detach())
        with torch.no_grad():
            p[i] = old + eps
            plus = fn()
            p[i] = old - eps
            minus = fn()
            p[i] = old
        grads.append((plus - minus) / (2 * eps))
    return torch.stack(grads)


@pytest.mark.parametrize("backward", ["full", "checkpoint"])
def test_policy_gradient_matches_finite_differences(backward: str):
    model, decoder = tiny_model(3.0, F64), tiny_decoder(F64)
    state = random_states(2, gen(3), F64)
    weight = torch.randn(2, 2, generator=gen(4), dtype=F64)

    def objective() -> torch.Tensor:
        first = latent_policy(
            model, decoder, state, tau=1.0, generator=gen(5), backward=backward, **SMALL
        )
        return (first * weight).sum()

    objective().backward()
    params = {
        "decoder.first": (decoder.net.net[0].weight, [(0, 0), (3, 1), (7, 0)]),
        "decoder.last": (decoder.net.net[-1].bias, [(0,), (5,)]),
        "reward.out": (model.reward[-1].weight, [(0, 1), (0, 9)]),
        "transition.gru": (model.gru.weight_ih, [(2, 3), (17, 0)]),
        "transition.input": (model.input[0].weight, [(1, 3), (4, 4)]),
    }
    for name, (p, index) in params.items():
        fd = _central_fd(lambda: objective().detach(), p, index)
        grad = torch.stack([p.grad[i] for i in index])
        assert fd.abs().max() > 1e-6, name  # the check would be vacuous otherwise
        err = (grad - fd).norm() / fd.norm()
        assert err < 1e-4, (name, float(err))


def test_decoder_loss_leaves_the_model_without_gradients():
    model, decoder = tiny_model(3.0), tiny_decoder()
    states = random_states(4, gen())
    full = latent_planning_cost(model, decoder, states, generator=gen(1), **SMALL)
    full.backward()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    grads = [p.grad.clone() for p in decoder.parameters()]
    assert sum(float(g.abs().sum()) for g in grads) > 0
    decoder.zero_grad()
    ckpt = latent_planning_cost(
        model, decoder, states, generator=gen(1), backward="checkpoint", **SMALL
    )
    ckpt.backward()
    torch.testing.assert_close(ckpt, full)
    for g, p in zip(grads, decoder.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_decoder_update_decreases_the_held_out_planning_cost():
    """Phase 2 on a random model: 100 decoder steps through DCEM on training belief states
    close at least half of the held-out gap between the initial decoder and full CEM."""
    model, decoder = tiny_model(3.0), tiny_decoder(hidden=32, horizon=5)
    g = gen(0)
    train, held = random_states(256, g), random_states(64, g)
    kw = dict(n_sample=30, n_elite=5, n_iter=3, sample=False)

    def held_out_cost() -> float:
        with torch.no_grad():
            return float(latent_planning_cost(model, decoder, held, generator=gen(5), **kw))

    _, actions = plan(model, held, horizon=5, n_sample=300, n_elite=30, sample=False,
                      generator=gen(), return_plan=True)  # fmt: skip
    cem_cost = -float(model.imagined_return(held, actions.transpose(0, 1), sample=False).mean())
    before = held_out_cost()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(100):
        idx = torch.randint(0, 256, (16,), generator=g)
        loss = latent_planning_cost(model, decoder, State(*(x[idx] for x in train)), generator=g,
                                    **kw)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_cost()
    assert before - cem_cost > 0.05  # a real gap to close
    assert before - after >= 0.5 * (before - cem_cost), (before, after, cem_cost)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_sample=10, n_elite=10), "n_elite"),
        (dict(n_iter=0), "n_iter"),
        (dict(tau=0.0), "tau"),
        (dict(init_sigma=0.0), "init_sigma"),
    ],
)
def test_bad_solver_arguments(kwargs: dict, match: str):
    model, decoder, state = tiny_model(), tiny_decoder(), random_states(2, gen())
    for fn in (plan_latent, latent_policy, latent_planning_cost):
        with pytest.raises(ValueError, match=match):
            fn(model, decoder, state, **{**SMALL, **kwargs})


def test_bad_states_decoders_and_latents():
    model, decoder, state = tiny_model(), tiny_decoder(), random_states(2, gen())
    unbatched = State(*(x[0] for x in state))
    for fn in (plan_latent, latent_policy, latent_planning_cost):
        with pytest.raises(ValueError, match="state"):
            fn(model, decoder, unbatched, **SMALL)
    with pytest.raises(ValueError, match="decoder"):
        plan_latent(model, ActionDecoder(2, 3, horizon=4, hidden=8), state, **SMALL)
    with pytest.raises(ValueError, match="z must"):
        decoder(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="action_low"):
        ActionDecoder(2, 2, action_low=1.0, action_high=1.0)
    with pytest.raises(ValueError, match="action_high"):
        ActionDecoder(2, 2, action_high=torch.ones(3))
    for name in ("latent_dim", "action_size", "latent_bound"):
        with pytest.raises(ValueError, match=name):
            ActionDecoder(**{"latent_dim": 2, "action_size": 2, name: 0})


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_counts_every_decoder_weight_once(monkeypatch):
    path = ROOT / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("planner_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "planner_bench", bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    config = bench.Config(latent_dim=3, decoder_hidden=7, decoder_layers=3, horizon=5)
    decoder = ActionDecoder(3, config.action_size, horizon=5, hidden=7, n_layers=3)
    weights = [p for name, p in decoder.named_parameters() if "weight" in name]
    assert bench.decoder_macs(config) == sum(p.numel() for p in weights)
