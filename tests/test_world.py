"""Tests of dcem.world: RSSM terms against torch.distributions, free nats, training, replay,
planner on a model with a known optimum. The dm_control wrapper is in test_world_envs.py."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from dcem.world import RSSM, ReplayBuffer, State, gaussian_kl, gaussian_log_likelihood, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(deter_size=8, stoch_size=3, hidden_size=16)


def tiny_model(obs_size: int = 5, action_size: int = 2, **kwargs) -> RSSM:
    torch.manual_seed(0)
    return RSSM(obs_size, action_size, **{**TINY, **kwargs})


def random_batch(t: int = 6, b: int = 4, o: int = 5, a: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(t, b, o, generator=g),
        torch.randn(t, b, a, generator=g),
        torch.randn(t, b, generator=g),
    )


# ----------------------------------------------------------------------------- RSSM
def test_observe_and_imagine_shapes():
    model = tiny_model()
    obs, actions, _ = random_batch()
    post, prior = model.observe(obs, actions)
    for st in (post, prior):
        assert st.deter.shape == (6, 4, 8)
        assert st.stoch.shape == st.mean.shape == st.std.shape == (6, 4, 3)
        assert bool((st.std >= model.min_std).all())
    assert torch.equal(post.deter, prior.deter)
    start = State(*(x[-1, :, None].expand(4, 7, -1) for x in post))  # B=4 states × N=7
    rewards = model.imagine(start, torch.randn(5, 4, 7, 2))
    assert rewards.shape == (5, 4, 7)
    assert model.imagined_return(start, torch.randn(5, 4, 7, 2)).shape == (4, 7)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("sample", [True, False])
def test_imagined_return_matches_imagine(n_layers, sample):
    model = tiny_model(n_layers=n_layers)
    g = torch.Generator().manual_seed(0)
    start = State(*(torch.randn(3, 4, n, generator=g) for n in (8, 3, 3, 3)))
    actions = torch.randn(5, 3, 4, 2, generator=g)
    expected = model.imagine(start, actions, sample=sample, generator=g.manual_seed(7)).sum(0)
    got = model.imagined_return(start, actions, sample=sample, generator=g.manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got.requires_grad  # the planner's cost: no graph kept


def test_gaussian_terms_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    expected = Normal(mean, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean), expected)
    mq, mp = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    sq, sp = torch.rand(7, 3, generator=g) + 0.1, torch.rand(7, 3, generator=g) + 0.1
    expected = kl_divergence(Independent(Normal(mq, sq), 1), Independent(Normal(mp, sp), 1))
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected)


def test_loss_terms_match_torch_distributions():
    model = tiny_model()
    obs, actions, rewards = random_batch()
    terms = model.loss(obs, actions, rewards, generator=torch.Generator().manual_seed(3))
    post, prior = model.observe(obs, actions, generator=torch.Generator().manual_seed(3))
    obs_nll = -Normal(model.predict_obs(post), 1.0).log_prob(obs).sum(-1).mean()
    reward_nll = -Normal(model.predict_reward(post), 1.0).log_prob(rewards).mean()
    kl = kl_divergence(
        Independent(Normal(post.mean, post.std), 1), Independent(Normal(prior.mean, prior.std), 1)
    ).mean()
    kl_elem = kl_divergence(
        Independent(Normal(post.mean, post.std), 1), Independent(Normal(prior.mean, prior.std), 1)
    )
    torch.testing.assert_close(terms.obs, obs_nll)
    torch.testing.assert_close(terms.reward, reward_nll)
    torch.testing.assert_close(terms.kl_raw, kl)
    torch.testing.assert_close(terms.kl, kl_elem.clamp(min=3.0).mean())
    torch.testing.assert_close(terms.total, obs_nll + 10.0 * reward_nll + terms.kl)


def test_free_nats_clamp_each_element_as_a_hand_computation():
    """A (T, B) = (2, 2) batch: PlaNet's mean over elements of max(KL, free nats)."""
    model = tiny_model()
    obs, actions, rewards = random_batch()
    obs, actions, rewards = obs[:2, :2], actions[:2, :2], rewards[:2, :2]
    post, prior = model.observe(obs, actions, generator=torch.Generator().manual_seed(3))
    mq, sq, mp, sp = (x.detach().double().numpy() for x in
                      (post.mean, post.std, prior.mean, prior.std))  # fmt: skip
    by_hand = 0.5 * ((sq / sp) ** 2 + ((mq - mp) / sp) ** 2 - 1 - np.log((sq / sp) ** 2)).sum(-1)
    free = float(np.median(by_hand))  # some elements below, some above
    assert (by_hand < free).any() and (by_hand > free).any()
    terms = model.loss(obs, actions, rewards, free_nats=free,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert terms.kl.item() == pytest.approx(np.maximum(by_hand, free).mean(), rel=1e-5)
    assert terms.kl_raw.item() == pytest.approx(by_hand.mean(), rel=1e-5)
    # the clamp of the batch mean (the old rule) is a different number here
    assert not np.isclose(max(by_hand.mean(), free), np.maximum(by_hand, free).mean(), rtol=1e-3)
    # gradient: the elements above the free nats alone
    params = list(model.parameters())
    post, prior = model.observe(obs, actions, generator=torch.Generator().manual_seed(3))
    kl = gaussian_kl(post.mean, post.std, prior.mean, prior.std)
    expected = torch.autograd.grad((kl * (kl > free)).sum() / kl.numel(), params,
                                   allow_unused=True)  # fmt: skip
    got = torch.autograd.grad(terms.kl, params, allow_unused=True)
    for gr, ex in zip(got, expected, strict=True):
        if ex is not None:
            torch.testing.assert_close(gr, ex)


def test_observation_statistics_normalize_encoder_input_and_target():
    model = tiny_model()
    obs, actions, rewards = random_batch()
    raw = obs * torch.linspace(0.5, 20.0, obs.shape[-1]) + 3.0
    assert not model.has_obs_stats
    model.set_obs_stats(raw.reshape(-1, raw.shape[-1]))
    assert model.has_obs_stats
    flat = raw.reshape(-1, raw.shape[-1]).double().numpy()
    np.testing.assert_allclose(model.obs_loc.numpy(), flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.obs_scale.numpy(), flat.std(0), rtol=1e-5)
    z = model.normalize(raw)
    torch.testing.assert_close(model.encode(raw), model.encoder(z))
    terms = model.loss(raw, actions, rewards, generator=torch.Generator().manual_seed(3))
    post, _ = model.observe(raw, actions, generator=torch.Generator().manual_seed(3))
    expected = -Normal(model.predict_obs(post), 1.0).log_prob(z).sum(-1).mean()
    torch.testing.assert_close(terms.obs, expected)
    state = model.state_dict()  # the statistics travel with the model
    clone = tiny_model()
    clone.load_state_dict(state)
    assert clone.has_obs_stats and torch.equal(clone.obs_scale, model.obs_scale)
    with pytest.raises(ValueError, match="finite"):
        model.set_obs_stats(torch.full((3, obs.shape[-1]), float("nan")))
    with pytest.raises(ValueError, match="obs"):
        model.set_obs_stats(raw[0, :1].reshape(1, -1))


def _kl_terms(model: RSSM, free_nats: float):
    obs, actions, rewards = random_batch()
    return model.loss(
        obs, actions, rewards, free_nats=free_nats, generator=torch.Generator().manual_seed(3)
    )


def test_free_nats():
    model = tiny_model()
    kl_raw = _kl_terms(model, 0.0).kl_raw.item()
    assert kl_raw > 0.0
    params = [p for p in model.parameters()]

    below = _kl_terms(model, 1e4 * kl_raw)  # every element's KL < free nats: no gradient
    assert below.kl.item() == pytest.approx(1e4 * kl_raw)
    grads = torch.autograd.grad(below.kl, params, allow_unused=True)
    assert all(gr is None or bool((gr == 0).all()) for gr in grads)

    above = _kl_terms(model, 0.0)  # every element above: the KL itself, with its gradient
    assert above.kl.item() == pytest.approx(kl_raw)
    grads = torch.autograd.grad(above.kl, params, allow_unused=True, retain_graph=True)
    expected = torch.autograd.grad(above.kl_raw, params, allow_unused=True)
    assert any(gr is not None and bool((gr != 0).any()) for gr in grads)
    for gr, ex in zip(grads, expected, strict=True):
        if ex is not None:
            torch.testing.assert_close(gr, ex)


def test_belief_matches_observe():
    model = tiny_model()
    obs, actions, _ = random_batch()
    post, _ = model.observe(obs, actions, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    state = model.initial_state((4,))
    for t in range(obs.shape[0]):
        state = model.belief(state, actions[t], obs[t], generator=g)
    torch.testing.assert_close(state.deter, post.deter[-1])
    torch.testing.assert_close(state.stoch, post.stoch[-1])


def test_shape_errors_name_the_argument():
    model = tiny_model()
    obs, actions, rewards = random_batch()
    with pytest.raises(ValueError, match="actions"):
        model.observe(obs, actions[..., :1])
    with pytest.raises(ValueError, match="rewards"):
        model.loss(obs, actions, rewards[:, :2])
    with pytest.raises(ValueError, match="free_nats"):
        model.loss(obs, actions, rewards, free_nats=-1.0)
    with pytest.raises(ValueError, match="stoch_size"):
        RSSM(5, 2, stoch_size=0)


def _rotation_data(n_seq: int, length: int, seed: int):
    """Rotating 2-D point pushed by the action; obs = (x, y, x², y²) + noise, reward = x."""
    rng = np.random.default_rng(seed)
    c, s = np.cos(0.3), np.sin(0.3)
    pos = rng.normal(size=(n_seq, 2))
    obs, actions, rewards = [], [], []
    for _ in range(length):
        u = rng.uniform(-1, 1, size=(n_seq, 1))
        pos = np.stack([c * pos[:, 0] - s * pos[:, 1], s * pos[:, 0] + c * pos[:, 1]], 1)
        pos = np.clip(pos + 0.3 * np.concatenate([u, np.zeros_like(u)], 1), -3, 3)
        actions.append(u)
        obs.append(np.concatenate([pos, pos**2], 1) + 0.05 * rng.normal(size=(n_seq, 4)))
        rewards.append(pos[:, 0])
    return tuple(torch.tensor(np.stack(x), dtype=torch.float32) for x in (obs, actions, rewards))


def test_training_predicts_held_out_rewards():
    torch.manual_seed(0)
    model = RSSM(4, 1, deter_size=32, stoch_size=4, hidden_size=32)
    obs, actions, rewards = _rotation_data(64, 20, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 64, (16,), generator=g)
        terms = model.loss(obs[:, idx], actions[:, idx], rewards[:, idx], free_nats=1.0)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    obs, actions, rewards = _rotation_data(32, 20, seed=1)
    with torch.no_grad():
        post, _ = model.observe(obs, actions)
        filtered = model.predict_reward(post)  # from the posterior at each step
        start = State(*(x[9] for x in post))  # open loop: 5 steps of the prior from t = 9
        imagined = model.imagine(start, actions[10:15], sample=False)
    constant = ((rewards - rewards.mean()) ** 2).mean()
    assert ((filtered - rewards) ** 2).mean() < 0.2 * constant
    assert ((imagined - rewards[10:15]) ** 2).mean() < 0.5 * constant


# ---------------------------------------------------------------------------- replay
def _filled_buffer(seed: int = 0) -> ReplayBuffer:
    """Episodes of lengths 30, 12 (too short for L = 20) and 45 rows, the last unfinished;
    obs = (episode, row within the episode, 0)."""
    buffer = ReplayBuffer(3, 2, seed=seed)
    for episode, rows in enumerate([30, 12]):
        obs = np.stack([[episode, t, 0.0] for t in range(rows)])
        buffer.add_episode(obs, np.full((rows - 1, 2), episode), np.arange(rows - 1))
    buffer.start_episode(np.array([2.0, 0.0, 0.0]))
    for t in range(1, 45):
        buffer.add_step(np.full(2, 2.0), float(t), np.array([2.0, t, 0.0]), False)
    return buffer


def test_replay_sampling_is_contiguous_within_episodes():
    buffer = _filled_buffer()
    assert buffer.num_steps == 30 + 12 + 45 and buffer.num_episodes == 3
    batch = buffer.sample(batch_size=200, seq_len=20)
    assert batch["obs"].shape == (20, 200, 3) and batch["obs"].dtype == np.float32
    assert batch["action"].shape == (20, 200, 2) and batch["reward"].shape == (20, 200)
    assert batch["done"].shape == (20, 200) and batch["done"].dtype == np.bool_
    episode, row = batch["obs"][..., 0], batch["obs"][..., 1]
    assert (episode == episode[:1]).all()  # one episode per window
    assert (np.diff(row, axis=0) == 1).all()  # consecutive rows
    assert set(np.unique(episode[0])) == {0.0, 2.0}  # the 12-row episode is too short
    first = row[0][episode[0] == 0]  # rows 0..10 start a window of episode 0
    assert first.min() == 0 and first.max() <= 10
    # rewards/actions are aligned with the observation they led into
    assert np.array_equal(batch["reward"][episode == 2], row[episode == 2])
    with pytest.raises(ValueError, match="seq_len"):
        buffer.sample(batch_size=2, seq_len=46)


def test_action_windows_are_every_run_of_executed_actions_within_an_episode():
    buffer = ReplayBuffer(3, 2)
    for episode, rows in enumerate([30, 4, 45]):  # the 4-row episode has 3 actions: no window
        obs = np.zeros((rows, 3))
        actions = np.stack([[episode, t] for t in range(1, rows)])  # action t led into obs t
        buffer.add_episode(obs, actions, np.zeros(rows - 1))
    windows = buffer.action_windows(5)
    expected = [[[e, t + i] for i in range(5)] for e, rows in enumerate([30, 4, 45])
                for t in range(1, rows - 4)]  # fmt: skip
    assert windows.dtype == np.float32 and windows.shape == (25 + 0 + 40, 5, 2)
    assert np.array_equal(windows, np.asarray(expected, np.float32))
    assert buffer.action_windows(45).shape == (0, 45, 2)
    # the last two episodes: the 4-row one (no window) and the 45-row one
    assert np.array_equal(buffer.action_windows(5, last=2), np.asarray(expected[25:], np.float32))
    assert np.array_equal(buffer.action_windows(5, last=3), windows)
    with pytest.raises(ValueError, match="length"):
        buffer.action_windows(0)
    with pytest.raises(ValueError, match="last"):
        buffer.action_windows(5, last=-1)


def test_replay_state_dict_round_trips_exactly():
    buffer = _filled_buffer(seed=3)
    buffer.sample(batch_size=5, seq_len=10)  # advance the sampler
    state = buffer.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    file = io.BytesIO()
    np.savez(file, **state)
    file.seek(0)
    with np.load(file, allow_pickle=False) as loaded:
        restored = ReplayBuffer(3, 2, seed=99)
        restored.load_state_dict(dict(loaded))
    via_torch = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, via_torch)
    via_torch.seek(0)
    restored_torch = ReplayBuffer(3, 2)
    restored_torch.load_state_dict(torch.load(via_torch, weights_only=True))
    for other in (restored, restored_torch):
        for key, value in buffer.state_dict().items():
            assert np.array_equal(other.state_dict()[key], value), key
        a, b = buffer.sample(8, 10), other.sample(8, 10)  # same stream continues
        assert all(np.array_equal(a[k], b[k]) for k in a)
        buffer.load_state_dict(state)


def test_replay_errors():
    buffer = ReplayBuffer(3, 2)
    with pytest.raises(ValueError, match="start_episode"):
        buffer.add_step(np.zeros(2), 0.0, np.zeros(3), False)
    with pytest.raises(ValueError, match="obs"):
        buffer.start_episode(np.zeros(4))


# --------------------------------------------------------------------------- planner
def peaked_model(target: list[float], coupling: list[float] | None = None) -> RSSM:
    """A model whose predicted reward at each step is -Σ_j |tanh(0.1 (a_j + k_j s)) -
    tanh(0.1 c_j)| for the action a just taken and the previous stochastic state s (scalar),
    so the best plan is a = c - k s. The prior is N(0, 0.79²): with its mean, s = 0 after the
    first step, and the best first action depends on the start state through k."""
    a = len(target)
    model = RSSM(3, a, deter_size=a, stoch_size=1, hidden_size=2 * a, n_layers=2)
    c = torch.tanh(0.1 * torch.tensor(target))
    eye = torch.eye(a)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.input[0].weight[:a, 1:] = eye  # x = relu(a + 2) = a + 2
        model.input[0].bias[:a] = 2.0
        if coupling is not None:
            model.input[0].weight[:a, 0] = torch.tensor(coupling)
        model.input[2].weight[:a, :a] = eye
        model.gru.bias_ih[a : 2 * a] = -30.0  # update gate z = 0: h = n
        model.gru.weight_ih[2 * a :, :a] = 0.1 * eye  # n = tanh(0.1 (x - 2)) = tanh(0.1 a)
        model.gru.bias_ih[2 * a :] = -0.2
        model.reward[0].weight[:, :a] = torch.cat([eye, -eye])  # relu(h - c), relu(c - h)
        model.reward[0].bias[:] = torch.cat([-c, c])
        model.reward[2].weight[:] = torch.eye(2 * a)
        model.reward[4].weight[:] = -1.0
    return model


def test_peaked_model_has_the_known_optimum():
    model = peaked_model([0.5, -0.3])
    start = model.initial_state((1,))
    best = torch.tensor([0.5, -0.3]).expand(4, 1, 2)
    assert model.imagine(start, best, sample=False).abs().max() < 1e-6
    worse = model.imagine(start, best + 0.2, sample=False)
    assert bool((worse < -1e-3).all())


def test_planner_finds_the_known_optimum():
    model = peaked_model([0.5, -0.3])
    state = model.initial_state((2,))
    first, actions = plan(
        model,
        state,
        horizon=4,
        n_sample=300,
        n_elite=30,
        n_iter=10,
        generator=torch.Generator().manual_seed(0),
        return_plan=True,
    )
    assert first.shape == (2, 2) and actions.shape == (2, 4, 2)
    torch.testing.assert_close(first, torch.tensor([[0.5, -0.3]] * 2), atol=0.05, rtol=0.0)
    torch.testing.assert_close(actions, torch.tensor([0.5, -0.3]).expand(2, 4, 2), atol=0.1, rtol=0)


def test_planner_keeps_start_states_apart():
    model = peaked_model([0.5, -0.3], coupling=[1.0, 0.0])
    state = model.initial_state((2,))
    state = state._replace(stoch=torch.tensor([[0.2], [-0.2]]))
    first, actions = plan(
        model,
        state,
        horizon=3,
        n_sample=300,
        n_elite=30,
        sample=False,
        generator=torch.Generator().manual_seed(0),
        return_plan=True,
    )
    expected = torch.tensor([[0.3, -0.3], [0.7, -0.3]])
    torch.testing.assert_close(first, expected, atol=0.05, rtol=0.0)
    torch.testing.assert_close(actions[:, 1:], torch.tensor([0.5, -0.3]).expand(2, 2, 2),
                               atol=0.1, rtol=0.0)  # fmt: skip


def test_planner_respects_bounds():
    model = peaked_model([1.5, -0.3])  # optimum outside the box: the bound is best
    first = plan(
        model,
        model.initial_state((1,)),
        action_low=torch.tensor([-1.0, -1.0]),
        action_high=torch.tensor([1.0, 1.0]),
        horizon=3,
        n_sample=300,
        n_elite=30,
        generator=torch.Generator().manual_seed(0),
    )
    assert bool((first.abs() <= 1.0).all())
    torch.testing.assert_close(first, torch.tensor([[1.0, -0.3]]), atol=0.05, rtol=0.0)
    with pytest.raises(ValueError, match="action_low"):
        plan(model, model.initial_state((1,)), action_low=torch.zeros(3), n_sample=10, n_elite=2)


# ------------------------------------------------------------------------- benchmark
def test_planner_benchmark_tiny(tmp_path):
    out = tmp_path / "planner.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "planner.py"), "--tiny", "--out", str(out),
         "--device", "cpu"],
        check=True,
        timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    (cpu,) = [r for r in result["results"] if r["device"] == "cpu"]
    for key in ("decisions_per_s", "s_per_decision", "floor_s_per_decision", "ratio_to_floor"):
        assert cpu[key] > 0, key
    config = result["config"]
    assert cpu["macs_per_decision"] == config["macs_per_transition"] * (
        config["n_sample"] * config["horizon"] * config["n_iter"]
    )
    for key in ("latent_decisions_per_s", "latent_floor_s_per_decision", "latent_ratio_to_floor",
                "speedup_latent_vs_cem", "speedup_latent_vs_cem_paired_median"):  # fmt: skip
        assert cpu[key] > 0, key
    per_candidate = config["horizon"] * config["macs_per_transition"] + config["decoder_macs"]
    assert cpu["latent_macs_per_decision"] == (
        config["n_iter"] * config["latent_n_sample"] * per_candidate + config["decoder_macs"]
    )
    assert cpu["speedup_latent_vs_cem"] == pytest.approx(
        cpu["s_per_decision"] / cpu["latent_s_per_decision"]
    )
    # eager and compiled side by side, with the compile's costs
    for key in ("mean_imagination_eager_s_per_decision",
                "mean_imagination_compiled_s_per_decision", "compile_s_first_call",
                "compile_s_new_batch_size", "compile_s_warm_cache"):  # fmt: skip
        assert cpu[key] > 0, key
    assert cpu["compiled_ratio_to_floor"] == pytest.approx(
        cpu["mean_imagination_compiled_s_per_decision"] / cpu["floor_s_per_decision"]
    )
    # dynamic shapes: another batch size does not compile again (a compile takes seconds)
    assert cpu["compile_s_new_batch_size"] < cpu["compile_s_first_call"] / 2


def test_benchmark_counts_every_weight_of_a_transition_once(monkeypatch):
    path = ROOT / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("planner_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "planner_bench", bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    config = bench.Config(deter_size=12, stoch_size=5, hidden_size=7, n_layers=3, action_size=2)
    model = RSSM(4, 2, deter_size=12, stoch_size=5, hidden_size=7, n_layers=3)
    weights = [
        p
        for module in (model.input, model.gru, model.prior, model.reward)
        for name, p in module.named_parameters()
        if "weight" in name
    ]
    assert bench.macs_per_transition(config) == sum(p.numel() for p in weights)


def test_agent_is_library_code_that_leaves_the_global_generator_alone():
    """``dcem.world.Agent``: seeded initialization without touching torch's global state."""
    from dcem.world import Agent, AgentConfig

    cfg = AgentConfig(deter_size=8, stoch_size=3, hidden_size=8, batch_size=2, seq_len=3,
                      plan_samples=12, plan_elites=3, plan_iter=2, horizon=2)  # fmt: skip
    before = torch.random.get_rng_state()
    a = Agent(cfg, 5, 2, -torch.ones(2), torch.ones(2), model_seed=3)
    b = Agent(cfg, 5, 2, -torch.ones(2), torch.ones(2), model_seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(p, q), name
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, 5)).astype(np.float32)
    a.replay.add_episode(obs, rng.uniform(-1, 1, (3, 2)), rng.normal(size=3))
    assert a.can_update()
    terms = a.update(2)
    assert a.updates == 2 and a.model.has_obs_stats and terms["obs_loss"] > 0
    belief, action = a.act(a.model.initial_state((1,)), torch.zeros(2), obs[0], explore=True,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert action.shape == (2,) and bool((action.abs() <= 1).all())
    b.load_state_dict(a.state_dict())
    assert b.updates == 2 and torch.equal(b.model.obs_loc, a.model.obs_loc)
    with pytest.raises(ValueError, match="action_low"):
        Agent(cfg, 5, 2, -torch.ones(3), torch.ones(2))


def test_agent_benchmark_tiny(tmp_path):
    out = tmp_path / "agent.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "agent.py"), "--tiny", "--out",
                    str(out)], check=True, timeout=300)  # fmt: skip
    result = json.loads(out.read_text())
    one, two = result["results"]
    assert (one["threads"], two["threads"]) == (1, 2)
    for r in (one, two):
        assert r["decision_s"] > 0 and r["update_s"] > 0
        assert r["episode_s"] == pytest.approx(250 * r["decision_s"] + 100 * r["update_s"])
    assert result["speedup_episode"] == pytest.approx(one["episode_s"] / two["episode_s"])
