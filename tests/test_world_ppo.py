"""Tests of dcem.world.ppo: GAE and the clipped objective against hand computations, the
ratio of recorded decisions, which parts the gradient reaches, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from dcem.world import DCEMPolicy, State
from dcem.world.ppo import PARTS, clipped_surrogate, gae
from test_world_latent import random_states, tiny_decoder, tiny_model

SMALL = dict(n_sample=20, n_elite=4, n_iter=3)


def test_gae_equals_the_discounted_sum_of_td_errors() -> None:
    g = torch.Generator().manual_seed(0)
    T, E, gamma, lam = 6, 3, 0.9, 0.8
    rewards, values = torch.randn(T, E, generator=g), torch.randn(T, E, generator=g)
    last = torch.randn(E, generator=g)
    adv, ret = gae(rewards, values, last, gamma=gamma, lam=lam)
    v_next = [values[t + 1] if t + 1 < T else last for t in range(T)]
    delta = [rewards[t] + gamma * v_next[t] - values[t] for t in range(T)]
    for t in range(T):  # A_t = sum_l (gamma lam)^l delta_{t+l}, written out
        expected = sum((gamma * lam) ** (l - t) * delta[l] for l in range(t, T))
        torch.testing.assert_close(adv[t], expected)
    torch.testing.assert_close(ret, adv + values)
    # lambda = 1: the bootstrapped discounted return minus the value
    adv1, _ = gae(rewards, values, last, gamma=gamma, lam=1.0)
    ret0 = sum(gamma**l * rewards[l] for l in range(T)) + gamma**T * last
    torch.testing.assert_close(adv1[0], ret0 - values[0])
    with pytest.raises(ValueError, match="last_value must be"):
        gae(rewards, values, last[:2])


def test_clipped_objective_on_a_constructed_batch() -> None:
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 1.5])
    adv = torch.tensor([1.0, -2.0, 3.0, 1.0, 2.0, -1.0])
    old = torch.zeros(6)
    logp = ratios.log().requires_grad_()
    loss, stats = clipped_surrogate(logp, old, adv, clip=0.2)
    # min(rho A, clip(rho) A) by hand: 0.5, -1.8, 3, 1.1, 2.4 (clipped), -1.5 (unclipped)
    terms = [0.5 * 1, max(-1.8, -1.8), 3.0, 1.1, 1.2 * 2.0, -1.5]
    assert loss.item() == pytest.approx(-sum(terms) / 6)
    assert stats["clip_fraction"] == pytest.approx(3 / 6)  # 0.5, 1.5, 1.5 are outside
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    kl = sum((r - 1) - math.log(r) for r in ratios.tolist()) / 6
    assert stats["approx_kl"] == pytest.approx(kl)
    (g,) = torch.autograd.grad(loss, logp)
    # no gradient where the clipped term is the minimum (ratio 1.5, A = 2 > 0)
    assert g[4] == 0 and g[5] != 0 and g[0] != 0


def _policy(**kw) -> DCEMPolicy:
    return DCEMPolicy(tiny_model(), tiny_decoder(), **SMALL, value_hidden=8, **kw)


def _states(n: int, seed: int = 1) -> State:
    return random_states(n, torch.Generator().manual_seed(seed))


def test_recorded_decisions_give_ratio_one_in_a_batch() -> None:
    policy = _policy()
    gen = torch.Generator().manual_seed(3)
    states = _states(5)
    taken = [policy.act(State(*(x[i : i + 1] for x in states)), gen) for i in range(5)]
    seeds = torch.cat([d["seed"] for d in taken])
    actions = torch.cat([d["action"] for d in taken])
    old = torch.cat([d["logp"] for d in taken])
    logp, value = policy.evaluate(states, seeds, actions)  # one batch of the five
    torch.testing.assert_close(logp, old, rtol=0, atol=1e-5)
    _, stats = clipped_surrogate(logp, old, torch.ones(5))
    assert abs(stats["ratio_min"] - 1) < 1e-5 and abs(stats["ratio_max"] - 1) < 1e-5
    torch.testing.assert_close(value, torch.cat([d["value"] for d in taken]))
    # other draws give another mean: the recorded seed matters
    other = policy.evaluate(states, seeds + 1, actions)[0]
    assert (other - old).abs().max() > 1e-3


@pytest.mark.parametrize("parts", [("decoder",), ("reward",), ("transition",), PARTS])
def test_gradients_reach_exactly_the_parts_fine_tuned(parts) -> None:
    policy = _policy(learn_std=True)
    policy.fine_tune(parts)
    gen = torch.Generator().manual_seed(4)
    states = _states(3)
    d = policy.act(states, gen)
    logp, value = policy.evaluate(states, d["seed"], d["action"])
    loss, _ = clipped_surrogate(logp, d["logp"] - 0.05, torch.tensor([1.0, -1.0, 0.5]))
    (loss + 0.5 * (value - 1.0).square().mean()).backward()
    chosen = {id(p) for p in policy.part_parameters(parts)}
    for name, p in [*policy.model.named_parameters(), *policy.decoder.named_parameters()]:
        if id(p) in chosen:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # frozen: never touched
    assert policy.log_std.grad is not None and policy.value[0].weight.grad is not None


def test_fixed_std_is_not_a_parameter_and_bad_arguments_are_named() -> None:
    policy = _policy(std=0.1)
    assert "log_std" not in dict(policy.named_parameters())
    torch.testing.assert_close(policy.log_std.exp(), torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="std must be"):
        _policy(std=0.0)
    with pytest.raises(ValueError, match="parts must be among"):
        policy.fine_tune(["encoder"])
