"""The DMC world-model experiment: ``dcem dmc train`` / ``dcem dmc eval`` through real runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dm_control.suite", reason="dm_control is not installed")

from dcem import cli  # noqa: E402
from dcem.experiments import common, dmc  # noqa: E402
from dcem.world import make_env  # noqa: E402

TASK = "cartpole-swingup"
QUICK = ["--quick", "--task", TASK, "--no-video"]
PHASE2 = [*QUICK, "--planner", "latent", "--seed-episodes", "0", "--decoder-warmup", "3"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcem", "dmc", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    return common.read_csv(out / "metrics.csv")


def _without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows without what depends on the machine's load (seconds, peak memory)."""
    return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_mb"))} for r in rows]


@pytest.fixture(scope="module")
def phase1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished quick phase-1 run (CEM planner); tests must not change it."""
    out = tmp_path_factory.mktemp("dmc") / "phase1"
    done = _cli("train", *QUICK, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def phase2(phase1: Path) -> Path:
    """A finished quick phase-2 run (latent planner) started from ``phase1``."""
    out = phase1.parent / "phase2"
    done = _cli("train", *PHASE2, "--init-from", phase1, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "phase 2 from" in done.stderr
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def test_quick_train_writes_the_run_folder_and_a_rerun_changes_nothing(phase1: Path) -> None:
    out = phase1
    for name in ("config.json", "metrics.csv", "summary.json", "training.png", "ckpt/latest.pt"):
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes().startswith(b"\x89PNG")
    rows = _rows(out)
    cfg = dmc.load_config(out)
    assert cfg.env_steps == dmc.QUICK["env_steps"] and cfg.task == TASK
    train = [r for r in rows if r["phase"] != "eval"]
    assert [r["phase"] for r in train] == ["seed"] + ["train"] * (len(train) - 1)
    assert int(train[-1]["env_step"]) >= cfg.env_steps
    steps = [int(r["env_step"]) for r in train]
    assert steps == sorted(steps) and steps[0] == cfg.episode_steps
    # the model was trained: loss terms logged for planner episodes, updates counted
    assert all(float(r["obs_loss"]) > 0 for r in train[1:])
    # what shows a planner exploiting the model, per planner episode and evaluation
    for r in [*train[1:], *(r for r in rows if r["phase"] == "eval")]:
        assert 0 <= float(r["saturated_fraction"]) <= 1
        assert math.isfinite(float(r["plan_imagined"])) and math.isfinite(float(r["plan_real"]))
    assert train[0]["saturated_fraction"] == ""  # random actions: no plan
    per_episode = -(-cfg.episode_steps // cfg.repeat) // max(1, cfg.update_every // cfg.repeat)
    assert int(train[-1]["updates"]) >= (len(train) - 1) * per_episode * cfg.updates_per_round
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in rows if r["phase"] == "eval"]
    assert evals and int(evals[-1]["env_step"]) == summary["env_steps"]
    assert summary["final_eval_return"] == pytest.approx(float(evals[-1]["return"]))
    assert summary["trajectories_per_decision"] == cfg.plan_samples * cfg.plan_iter
    # the same command again: already finished, nothing retrained, same rows
    again = _cli("train", *QUICK, "--out", out)
    assert again.returncode == 0, again.stderr
    assert _rows(out) == rows


def _start_and_kill_after_checkpoint(command: list[str], ckpt: Path) -> int:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())  # fmt: skip
    deadline = time.monotonic() + 90
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    return int(common.load_checkpoint(ckpt)["counters"]["episode"])


def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path: Path) -> None:
    args = [*QUICK, "--env-steps", "1400", "--eval-every", "600"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _cli("train", *args, "--out", straight)
    assert done.returncode == 0, done.stderr
    command = [sys.executable, "-m", "dcem", "dmc", "train", *args, "--out", str(killed)]
    at = _start_and_kill_after_checkpoint(command, killed / "ckpt" / "latest.pt")
    assert 1 <= at < 7, at
    kept = common.load_checkpoint(killed / "ckpt" / "latest.pt")
    resumed = _cli("train", *args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    assert _without_time(_rows(killed)) == _without_time(_rows(straight))
    # the data the checkpoint held is still there, first rows unchanged
    final = common.load_checkpoint(killed / "ckpt" / "latest.pt")
    n = kept["replay"]["obs"].shape[0]
    assert torch.equal(final["replay"]["obs"][:n], kept["replay"]["obs"])
    ref = common.load_checkpoint(straight / "ckpt" / "latest.pt")
    for key, value in ref["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=0)
    # the observation statistics were in the checkpoint that was cut off, and the resumed
    # run's are bit for bit the uninterrupted run's (the loop above, buffers included)
    assert int(kept["model"]["obs_count"]) > 0
    assert "obs_loc" in ref["model"] and int(ref["model"]["obs_count"]) > 0


def _stats(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return obs.mean(0), np.maximum(obs.std(0), 1e-2)


def test_observation_statistics_follow_the_replay_then_stay(phase1: Path, tmp_path: Path) -> None:
    """By default refit to the whole replay before each update round; with
    ``--obs-stats-until 0`` those of the seed episodes, kept."""
    state = common.load_checkpoint(phase1 / "ckpt" / "latest.pt")
    cfg = dmc.load_config(phase1)
    rows = cfg.agent_steps_per_episode + 1
    obs = state["replay"]["obs"].double().numpy()
    interval = max(1, cfg.update_every // cfg.repeat)  # rounds at agent steps 0, interval, ...
    last_t = (cfg.agent_steps_per_episode - 1) // interval * interval
    at_last_round = obs.shape[0] - rows + 1 + last_t
    assert int(state["model"]["obs_count"]) == at_last_round
    loc, scale = _stats(obs[:at_last_round])
    np.testing.assert_allclose(state["model"]["obs_loc"].numpy(), loc, atol=1e-5)
    np.testing.assert_allclose(state["model"]["obs_scale"].numpy(), scale, rtol=1e-5)
    # snapshots at each evaluation point hold the statistics of their time
    snapshots = sorted((phase1 / "ckpt").glob("env*.pt"))
    assert snapshots, "no checkpoint copies at evaluation points"
    first = common.load_checkpoint(snapshots[0])
    assert int(first["model"]["obs_count"]) < at_last_round
    out = tmp_path / "seed-stats"
    done = _cli("train", *QUICK, "--obs-stats-until", "0", "--out", out)
    assert done.returncode == 0, done.stderr
    state = common.load_checkpoint(out / "ckpt" / "latest.pt")
    seed_rows = cfg.seed_episodes * rows
    assert int(state["model"]["obs_count"]) == seed_rows
    loc, scale = _stats(state["replay"]["obs"][:seed_rows].double().numpy())
    np.testing.assert_allclose(state["model"]["obs_loc"].numpy(), loc, atol=1e-5)
    np.testing.assert_allclose(state["model"]["obs_scale"].numpy(), scale, rtol=1e-5)


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1.0 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def test_diagnose_on_a_quick_run_agrees_with_numpy(phase1: Path, tmp_path: Path) -> None:
    from scipy.stats import spearmanr

    out = _copy(phase1, tmp_path / "run")
    done = _cli("diagnose", out, "--episodes", "2", "--states", "4", "--sequences", "12")
    assert done.returncode == 0, done.stderr
    (path,) = (out / "diagnose").glob("*.json")
    record = json.loads(path.read_text())
    assert record["env_steps_trained"] >= dmc.load_config(out).env_steps
    arrays = np.load(path.with_suffix(".npz"))
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    cfg = dmc.load_config(out)
    n_obs = 2 * (cfg.agent_steps_per_episode + 1)
    assert arrays["obs_target"].shape == (n_obs, make_env(TASK).obs_size)
    np.testing.assert_allclose(record["obs_r2"],
                               _r2(arrays["obs_target"], arrays["obs_pred"]), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert record["reward_r2"] == pytest.approx(
        float(_r2(arrays["reward_target"], arrays["reward_pred"])), rel=1e-4, abs=1e-5
    )
    assert len(record["open_loop_reward_r2"]) == cfg.horizon
    np.testing.assert_allclose(record["open_loop_reward_r2"],
                               _r2(arrays["open_loop_target"].T, arrays["open_loop_pred"].T),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    rho = [spearmanr(i, t).statistic for i, t in
           zip(arrays["random_imagined"], arrays["random_true"], strict=True)]  # fmt: skip
    np.testing.assert_allclose(record["rank_correlation_per_state"], rho, rtol=1e-6, atol=1e-9)
    planner = record["planner"]
    assert planner["true_return"] == pytest.approx(float(arrays["plan_true"].mean()))
    assert planner["random_true_return_best"] == pytest.approx(
        float(arrays["random_true"].max(1).mean())
    )
    # the true returns are the simulator's: replaying a sequence from the state gives them
    assert arrays["random_true"].shape == (4, 12)
    bad = _cli("diagnose", out, "--ckpt", out / "nope.pt")
    assert bad.returncode == 2 and "nope.pt" in bad.stderr


def test_eval_command_writes_returns_json(phase1: Path, tmp_path: Path) -> None:
    out = _copy(phase1, tmp_path / "run")
    done = _cli("eval", out, "--episodes", "2")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    name = f"cem-{record['candidates']}x{record['iterations']}.json"
    assert record == json.loads((out / "eval" / name).read_text())
    assert len(record["returns"]) == 2 and record["task"] == TASK
    assert "2 / 2 episodes done" in done.stderr  # off a terminal: a line per episode
    assert record["mean"] == pytest.approx(sum(record["returns"]) / 2)
    assert record["median"] == pytest.approx(float(np.median(record["returns"])))
    lo, hi = record["median_ci95"]
    assert min(record["returns"]) <= lo <= record["median"] <= hi <= max(record["returns"])
    assert 0 <= record["saturated_fraction"] <= 1 and math.isfinite(record["plan_imagined"])
    # evaluation episodes are seeded: the first one equals the run's own first evaluation
    first_eval = next(r for r in _rows(out) if r["phase"] == "eval")
    assert int(first_eval["episode"]) == 0
    again = _cli("eval", out, "--episodes", "1")
    assert json.loads(again.stdout)["returns"] == record["returns"][:1]


def test_eval_in_two_worker_processes_equals_one(phase1: Path, tmp_path: Path) -> None:
    out = _copy(phase1, tmp_path / "run")
    one = _cli("eval", out, "--episodes", "3")
    two = _cli("eval", out, "--episodes", "3", "--workers", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    first, second = json.loads(one.stdout), json.loads(two.stdout)
    assert (first["workers"], second["workers"]) == (1, 2)
    assert second["returns"] == first["returns"]  # each episode seeded by its index
    for key in ("median_ci95", "saturated_fraction", "plan_imagined", "plan_real"):
        assert second[key] == first[key], key
    if importlib.util.find_spec("ray") is not None:  # the same episodes as Ray tasks
        ray = _cli("eval", out, "--episodes", "3", "--workers", "2", "--address", "local")
        assert ray.returncode == 0, ray.stderr
        assert json.loads(ray.stdout)["returns"] == first["returns"]


def test_plan_statistics_equal_a_hand_computation() -> None:
    rewards = [1.0, 0.0, 2.0, 3.0, 0.5]
    imagined = [torch.tensor(v) for v in (4.0, 5.0, 6.0, 7.0, 8.0)]
    stats = dmc._plan_stats(imagined, rewards, horizon=3)
    paid = [sum(rewards[t : t + 3]) for t in range(3)]  # decisions with 3 steps left
    assert stats["plan_real"] == pytest.approx(sum(paid) / 3)
    assert stats["plan_imagined"] == pytest.approx((4.0 + 5.0 + 6.0) / 3)
    assert dmc._plan_stats(imagined[:2], rewards[:2], horizon=3) == {
        "plan_imagined": "", "plan_real": ""}  # fmt: skip


def test_video_is_written_or_skipped_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _cli("train", "--quick", "--task", TASK, "--out", out)
    assert done.returncode == 0, done.stderr
    gif = out / "eval.gif"
    if gif.exists():
        assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    else:
        assert "no video:" in done.stderr, done.stderr


def test_unknown_task_lists_the_known_ones(tmp_path: Path) -> None:
    done = _cli("train", "--quick", "--task", "cheetah-fly", "--out", tmp_path / "x")
    assert done.returncode == 2
    assert "cheetah-fly" in done.stderr and "cheetah-run" in done.stderr
    assert "walker-walk" in done.stderr
    assert not (tmp_path / "x").exists()


def _main_error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """Run ``dcem dmc ARGS`` in this process; its exit status must be 2. Returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dmc", *map(str, args)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--env-steps", "0", "env_steps"), ("--plan-elites", "50", "plan_elites"),
     ("--seq-len", "500", "seq_len"), ("--lr", "-1", "lr")],
)  # fmt: skip
def test_bad_option_values_name_the_option(tmp_path, capsys, option, value, named) -> None:
    err = _main_error(capsys, "train", *QUICK, option, value, "--out", tmp_path / "x")
    assert named in err and len(err.strip().splitlines()[-1]) < 300, err
    assert not (tmp_path / "x").exists()


def test_another_config_in_the_folder_is_refused(phase1: Path, capsys) -> None:
    before = (phase1 / "metrics.csv").read_bytes()
    err = _main_error(capsys, "train", *QUICK, "--horizon", "4", "--out", phase1)
    assert "horizon" in err
    assert (phase1 / "metrics.csv").read_bytes() == before


def test_checkpoint_of_another_task_is_refused() -> None:
    cfg = dmc.DMCConfig(**{**dmc.QUICK, "task": TASK})
    env = make_env(TASK, episode_steps=cfg.episode_steps)
    state = dmc.Agent(cfg, env).checkpoint()
    other = dmc.DMCConfig(**{**dmc.QUICK, "task": "reacher-easy"})
    agent = dmc.Agent(other, make_env("reacher-easy", episode_steps=cfg.episode_steps))
    with pytest.raises(common.CheckpointError, match="cartpole-swingup"):
        agent.restore(state, Path("x.pt"))
    bigger = dmc.DMCConfig(**{**dmc.QUICK, "task": TASK, "hidden_size": 32})
    with pytest.raises(common.CheckpointError, match="hidden_size"):
        dmc.Agent(bigger, env).restore(state, Path("x.pt"))


def test_truncated_checkpoint_is_detected_and_never_half_loaded(phase1, tmp_path) -> None:
    out = _copy(phase1, tmp_path / "run")
    ckpt = out / "ckpt" / "latest.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    done = _cli("train", *QUICK, "--out", out)
    assert done.returncode == 2 and "truncated" in done.stderr, done.stderr
    assert ckpt.read_bytes() == data[: len(data) // 2]
    done = _cli("eval", out, "--episodes", "1")
    assert done.returncode == 2 and "truncated" in done.stderr, done.stderr


def test_eval_of_a_folder_without_a_run_is_refused(tmp_path: Path, capsys) -> None:
    assert "config.json" in _main_error(capsys, "eval", tmp_path, "--episodes", "1")


def test_phase_two_starts_from_phase_one_and_trains_the_decoder(phase1, phase2, tmp_path) -> None:
    p1 = common.load_checkpoint(phase1 / "ckpt" / "latest.pt")
    p2 = common.load_checkpoint(phase2 / "ckpt" / "latest.pt")
    # the phase-1 replay is kept and extended; the decoder is saved with the model
    n = p1["replay"]["obs"].shape[0]
    assert torch.equal(p2["replay"]["obs"][:n], p1["replay"]["obs"])
    assert p2["replay"]["obs"].shape[0] > n and "decoder" in p2 and "decoder_opt" in p2
    assert p2["counters"]["warmup"] == 3  # decoder warm-up on the phase-1 replay, done once
    rows = [r for r in _rows(phase2) if r["phase"] == "train"]
    assert rows and all(r["decoder_cost"] != "" for r in rows)
    # phase 2 starts from phase 1's model and optimizer (or a fresh model on request)
    for reinit in (False, True):
        cfg = dataclasses.replace(dmc.load_config(phase2), reinit_model=reinit)
        agent = dmc.Agent(cfg, make_env(TASK, episode_steps=200))
        dmc._resume(agent, tmp_path / f"empty-{reinit}")
        same = [torch.equal(v, p1["model"][k]) for k, v in agent.model.state_dict().items()]
        assert all(same) if not reinit else not any(same[:4])
    # deleting the replay and re-initializing the model are options of their own
    other = tmp_path / "p2-fresh"
    args = [*PHASE2, "--init-from", phase1, "--no-keep-replay", "--reinit-model"]
    done = _cli("train", *args, "--out", other)
    assert done.returncode == 0, done.stderr
    kept = common.load_checkpoint(other / "ckpt" / "latest.pt")
    assert kept["replay"]["obs"].shape[0] < p2["replay"]["obs"].shape[0]


def test_decoder_pretraining_fits_the_replay_action_windows(phase1, phase2, tmp_path) -> None:
    def start(pretrain: int) -> dmc.Agent:
        cfg = dataclasses.replace(dmc.load_config(phase2), decoder_pretrain=pretrain)
        agent = dmc.Agent(cfg, make_env(TASK, episode_steps=200))
        dmc._resume(agent, tmp_path / f"empty-{pretrain}")
        return agent

    windows = torch.as_tensor(start(0).replay.action_windows(dmc.load_config(phase2).horizon))

    def error(agent: dmc.Agent) -> float:
        # reconstruction from the best of a grid of latents in the box
        assert agent.decoder is not None
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 21)] * 2, indexing="ij"), -1)
        with torch.no_grad():
            decoded = agent.decoder(grid.reshape(-1, 2))
        return float((decoded[None] - windows[:, None]).square().mean((2, 3)).min(1).values.mean())

    assert error(start(200)) < 0.7 * error(start(0))


def test_decoder_pretraining_on_the_last_episodes_fits_their_windows_only(
    phase1, phase2, tmp_path, monkeypatch
) -> None:
    fitted: list[torch.Tensor] = []
    monkeypatch.setattr(dmc, "fit_decoder", lambda decoder, windows, **kw: fitted.append(windows)
                        or [0.0])  # fmt: skip
    cfg = dataclasses.replace(dmc.load_config(phase2), decoder_pretrain=5,
                              decoder_pretrain_episodes=1)  # fmt: skip
    agent = dmc.Agent(cfg, make_env(TASK, episode_steps=200))
    dmc._resume(agent, tmp_path / "empty")
    replay = agent.replay.action_windows(cfg.horizon, last=1)
    assert 0 < len(replay) < len(agent.replay.action_windows(cfg.horizon))
    assert len(fitted) == 1 and torch.equal(fitted[0], torch.as_tensor(replay))


def test_decoder_pretraining_on_plans_fits_full_cem_plans_from_replay_states(
    phase1, phase2, tmp_path, monkeypatch
) -> None:
    fitted: list[torch.Tensor] = []
    monkeypatch.setattr(dmc, "fit_decoder", lambda decoder, seqs, **kw: fitted.append(seqs)
                        or [0.0])  # fmt: skip
    base = dmc.load_config(phase2)

    def start(**kw) -> dmc.Agent:
        agent = dmc.Agent(dataclasses.replace(base, **kw), make_env(TASK, episode_steps=200))
        dmc._resume(agent, tmp_path / f"empty-{len(kw)}")
        return agent

    agent = start(decoder_pretrain=5, decoder_pretrain_data="plans", decoder_pretrain_states=7)
    assert len(fitted) == 1 and fitted[0].shape == (7, base.horizon, agent.model.action_size)
    assert bool((fitted[0] >= agent.low).all() and (fitted[0] <= agent.high).all())
    # the same plans as the agent's cem_plans from the same replay and generator states
    fresh = start()
    assert torch.equal(fitted[0], fresh.cem_plans(7))
    # from different states: the plans differ (states drawn over several replay batches)
    plans = fresh.cem_plans(60)
    assert plans.shape[0] == 60 and float(plans.std(0).mean()) > 0.01
    with pytest.raises(ValueError, match="n_states"):
        fresh.cem_plans(0)


@pytest.mark.parametrize("n_iter", [3, 5])
def test_the_dcem_iterations_ablation_sets_the_iterations_of_acting_and_decoder_updates(
    phase1, phase2, tmp_path, monkeypatch, n_iter: int
) -> None:
    import dcem.world.latent as latent

    used: list[int] = []
    real = latent.dcem

    def recording(*args, **kw):
        used.append(kw["n_iter"])
        return real(*args, **kw)

    monkeypatch.setattr(latent, "dcem", recording)
    cfg = dataclasses.replace(dmc.load_config(phase2), latent_iter=n_iter)
    env = make_env(TASK, episode_steps=200)
    agent = dmc.Agent(cfg, env)
    dmc._resume(agent, tmp_path / "empty")
    belief = agent.model.initial_state((1,))
    obs = env.reset(seed=0)
    agent.act(belief, torch.zeros(agent.model.action_size), obs, explore=False,
              generator=torch.Generator().manual_seed(0))  # fmt: skip
    agent.update_decoder(*agent.sample_batch()[:2])
    assert used == [n_iter, n_iter]


def test_phase_two_refuses_a_phase_one_run_of_another_task(phase1, tmp_path, capsys) -> None:
    err = _main_error(capsys, "train", "--quick", "--task", "reacher-easy", "--planner",
                      "latent", "--init-from", phase1, "--out", tmp_path / "p2")  # fmt: skip
    assert "cartpole-swingup" in err and "reacher-easy" in err, err


def test_eval_of_both_planners_draws_the_box_plot(phase1, phase2, tmp_path) -> None:
    phase2 = _copy(phase2, tmp_path / "p2")
    plot = tmp_path / "box.png"
    done = _cli("eval", phase2, "--episodes", "2", "--planner", "cem,latent", "--plot", plot)
    assert done.returncode == 0, done.stderr
    cem, latent = json.loads(done.stdout)
    assert (cem["planner"], latent["planner"]) == ("cem", "latent")
    cfg = dmc.load_config(phase2)
    assert cem["trajectories_per_decision"] == cfg.plan_samples * cfg.plan_iter
    assert latent["trajectories_per_decision"] == cfg.latent_samples * cfg.latent_iter
    assert "trajectories per decision" in done.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")
    # other planner sizes for the evaluation, recorded in the file name and the record
    done = _cli("eval", phase2, "--episodes", "1", "--planner", "cem", "--plan-samples", "30",
                "--plan-elites", "3", "--plan-iter", "2")  # fmt: skip
    assert json.loads(done.stdout)["trajectories_per_decision"] == 60
    assert (phase2 / "eval" / "cem-30x2.json").is_file()
    assert len(dmc.eval_records([phase2])) == 3  # what --plot draws: every record kept
    # a phase-1 run has no decoder: the latent planner is refused with a clear message
    done = _cli("eval", phase1, "--episodes", "1", "--planner", "latent")
    assert done.returncode == 2 and "--planner latent" in done.stderr


def test_compare_plans_rates_both_planners_plans_under_the_model(phase1, phase2) -> None:
    result = dmc.compare_plans(phase2, states=3)
    assert result["states"] == 3
    for name in ("cem", "latent", "zero"):
        entry = result[name]
        assert math.isfinite(entry["imagined_return"])
        assert 0.0 <= entry["saturated_fraction"] <= 1.0
        assert 0.0 <= entry["mean_abs_action"] <= 1.0  # plans stay inside the action box
    assert result["zero"]["mean_abs_action"] == 0.0 and result["cem"]["mean_abs_action"] > 0.0
    assert result["zero"]["saturated_fraction"] == 0.0
    with pytest.raises(ValueError, match="--planner latent"):
        dmc.compare_plans(phase1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--lr", "inf"], "lr"),
        (["--free-nats", "nan"], "free_nats"),
        (["--explore-noise", "nan"], "explore_noise"),
        (["--reward-scale", "-1"], "reward_scale"),
        (["--device", "meta"], "--device"),
        (["--device", "cuda:7"], "--device"),
        (["--device", "nonsense"], "--device"),
        (["--task", "cheetah-fly"], "--task"),
        (["--planner", "mppi"], "--planner"),
        (["--plan-elites", "400"], "plan_elites"),
        (["--decoder-pretrain", "10"], "decoder_pretrain"),
        (["--decoder-pretrain-episodes", "3"], "decoder_pretrain"),
        (["--decoder-pretrain-data", "frames"], "--decoder-pretrain-data"),
        (["--decoder-pretrain-states", "0"], "decoder_pretrain_states"),
    ],
)
def test_bad_train_options_exit_2_with_one_line_and_write_nothing(
    args: list[str], named: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = _cli("train", *QUICK, "--out", out, *args, timeout=60)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert named in last and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


def test_a_wrong_init_from_leaves_no_folder_that_blocks_the_corrected_command(
    phase1: Path, tmp_path: Path
) -> None:
    out = tmp_path / "phase2"
    wrong = _cli("train", *PHASE2, "--init-from", tmp_path / "nowhere", "--out", out,
                 "--env-steps", "200")  # fmt: skip
    assert wrong.returncode == 2 and "--init-from" in wrong.stderr.strip().splitlines()[-1]
    assert "Traceback" not in wrong.stderr
    assert not (out / "config.json").exists()
    right = _cli("train", *PHASE2, "--init-from", phase1, "--out", out, "--env-steps", "200")
    assert right.returncode == 0, right.stderr


def test_a_hand_edited_config_is_refused_by_eval_in_one_line(phase1: Path, tmp_path: Path) -> None:
    out = _copy(phase1, tmp_path / "run")
    record = json.loads((out / "config.json").read_text())
    for value in ("many", -3):
        record["config"]["plan_samples"] = value
        (out / "config.json").write_text(json.dumps(record))
        done = _cli("eval", out, "--episodes", "1")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "plan_samples" in done.stderr.strip().splitlines()[-1]
    (out / "config.json").write_text("{not json")
    done = _cli("eval", out, "--episodes", "1")
    assert done.returncode == 2 and "config.json" in done.stderr and "Traceback" not in done.stderr


def test_an_unwritable_out_is_refused_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = _cli("train", *QUICK, "--out", blocker / "run", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--out" in done.stderr.strip().splitlines()[-1]


def test_quiet_by_default_and_help_lists_the_tasks(tmp_path: Path) -> None:
    done = _cli("train", "-h")
    assert done.returncode == 0 and "cheetah-run" in done.stdout and "walker-walk" in done.stdout
    done = _cli("train", *QUICK, "--env-steps", "200", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    for chatter in ("OpenGL", "MuJoCo library version", "settotalmass"):
        assert chatter not in done.stderr, done.stderr


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` in the process table (Linux /proc)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            for child in map(int, task.read_text().split()):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_ends_cleanly_and_resumes(sig: int, tmp_path: Path) -> None:
    args = [*QUICK, "--env-steps", "1000", "--eval-every", "600"]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dcem", "dmc", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    deadline = time.monotonic() + 90
    while not (out / "ckpt" / "latest.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    children = _children(proc.pid)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run ended before it could be interrupted"
    assert "Traceback" not in stderr, stderr
    if sig == signal.SIGINT:
        assert stderr.strip().splitlines()[-1].startswith("interrupted"), stderr
    assert not [p for p in children if Path(f"/proc/{p}").exists()]
    resumed = _cli("train", *args, "--out", out)
    assert resumed.returncode == 0 and "resumed" in resumed.stderr, resumed.stderr
    straight = tmp_path / "straight"
    assert _cli("train", *args, "--out", straight).returncode == 0
    assert _without_time(_rows(out)) == _without_time(_rows(straight))


def test_a_compiled_run_trains_and_says_nothing_about_falling_back(tmp_path: Path) -> None:
    done = _cli("train", *QUICK, "--compile", "--env-steps", "400", "--out", tmp_path / "run",
                timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "torch.compile failed" not in done.stderr
    assert dmc.load_config(tmp_path / "run").compile
    rows = [r for r in _rows(tmp_path / "run") if r["phase"] == "train"]
    assert rows and float(rows[0]["plan_seconds"]) > 0


# --------------------------------------------------------------------------- phase 3: PPO


def test_ppo_quick_run_resumes_after_a_kill_to_the_rows_of_an_uninterrupted_run(
    phase1: Path, phase2: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    done = _cli("ppo", "--quick", "--init-from", phase2, "--out", whole)
    assert done.returncode == 0, done.stderr
    rows = _rows(whole)
    assert [(r["ppo_step"], r["phase"]) for r in rows] == [
        ("0", "eval"),
        ("0", "train"),
        ("1", "eval"),
        ("1", "train"),
        ("2", "eval"),
    ]
    for r in (r for r in rows if r["phase"] == "train"):
        # the recorded DCEM draws give the acting policy back before the first gradient step
        assert float(r["ratio_first_max_dev"]) < 1e-4
        assert float(r["std"]) == pytest.approx(0.1) and math.isfinite(float(r["value_loss"]))
    assert (whole / "ppo.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["eval_return_before"] == pytest.approx(float(rows[0]["return"]))
    # before and after are the same evaluation episodes (paired): as many, from the same starts
    assert len(summary["eval_returns_before"]) == len(summary["eval_returns_after"]) == 1
    # dcem dmc eval takes a PPO run like any other: figure 4's third row, on the same episodes
    plot = tmp_path / "box.png"
    done = _cli("eval", whole, "--episodes", "2", "--workers", "2", "--plot", plot)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["planner"] == "ppo" and len(record["returns"]) == 2
    assert record["returns"][0] == pytest.approx(summary["eval_returns_after"][0], abs=0.006)
    assert plot.read_bytes().startswith(b"\x89PNG") and (whole / "eval" / "ppo-10x2.json").exists()
    done = _cli("eval", whole, "--episodes", "1", "--planner", "cem")
    assert done.returncode == 2 and "PPO run" in done.stderr, done.stderr
    # dcem report: the PPO section and figure 4 from the eval records
    report = subprocess.run([sys.executable, "-m", "dcem", "report", str(whole), "--out",
                             str(tmp_path / "docs" / "r.md")], capture_output=True, text=True,
                            env=_env())  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "docs" / "r.md").read_text()
    assert f"| before PPO | 1 | {summary['eval_return_before']:.1f} |" in text
    assert "| ppo | 20 | 2 |" in text and "![Figure 4" in text
    assert (tmp_path / "docs" / "img" / "figure4.png").read_bytes().startswith(b"\x89PNG")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "dcem", "dmc", "ppo", "--quick", "--init-from", str(phase2),
               "--out", str(killed)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())  # fmt: skip
    deadline = time.monotonic() + 90
    while not (killed / "metrics.csv").exists() or len(_rows(killed)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = _cli("ppo", "--quick", "--init-from", phase2, "--out", killed)
    assert again.returncode == 0, again.stderr
    assert _without_time(_rows(killed)) == _without_time(rows)


def test_ppo_target_kl_stops_the_minibatch_updates(phase2: Path, tmp_path: Path) -> None:
    taken = {}
    for target in ("0", "1e-12"):
        out = tmp_path / f"kl-{target}"
        done = _cli("ppo", "--quick", "--init-from", phase2, "--minibatch", "2", "--ppo-steps",
                    "1", "--target-kl", target, "--out", out)  # fmt: skip
        assert done.returncode == 0, done.stderr
        taken[target] = [int(r["minibatches"]) for r in _rows(out) if r["phase"] == "train"]
    # 2 episodes of 5 decisions in minibatches of 2: 5 steps; the first minibatch's ratio is 1
    # (KL 0), the second's is not, so a tiny target stops after it
    assert taken == {"0": [5], "1e-12": [2]}


def test_ppo_refuses_a_phase_one_run_and_bad_parts(phase1: Path, tmp_path: Path) -> None:
    done = _cli("ppo", "--quick", "--init-from", phase1, "--out", tmp_path / "x")
    assert done.returncode == 2 and "--init-from" in done.stderr and "--planner latent" in (
        done.stderr)  # fmt: skip
    assert not (tmp_path / "x").exists()
    done = _cli("ppo", "--quick", "--init-from", phase1, "--fine-tune", "encoder")
    assert done.returncode == 2 and "fine_tune must list some of" in done.stderr


def test_episode_plan_statistics_of_a_fixed_plan_equal_a_hand_count() -> None:
    """Saturation share and imagined-vs-real gap of a fixed plan, counted by hand."""
    from types import SimpleNamespace

    horizon, plan = 3, [1.0, -0.99, 0.5, 0.96, -0.2]  # |a| > 0.95 for 3 of 5
    env = make_env(TASK, episode_steps=80)  # cartpole repeats 8: 10 agent steps, 1-dim action
    paid: list[float] = []
    step = env.step

    def recording_step(action):
        obs, reward, done = step(action)
        paid.append(reward)
        return obs, reward, done

    env.step = recording_step  # type: ignore[method-assign]

    class Fixed:
        cfg = SimpleNamespace(horizon=horizon)
        device = torch.device("cpu")
        generator = torch.Generator()
        model = SimpleNamespace(initial_state=lambda shape: None)
        last_imagined_return: torch.Tensor | None = None
        t = 0

        def act(self, belief, action, obs, explore, generator):
            self.last_imagined_return = torch.tensor(10.0 * self.t + 1.5)  # what the model says
            a = torch.tensor([plan[self.t % len(plan)]])
            self.t += 1
            return belief, a

    stats: dict[str, float] = {}
    total = dmc.run_episode(Fixed(), env, mode="eval", seed=0, plans=stats)  # type: ignore[arg-type]
    n_steps = len(paid)
    assert n_steps == 10 and total == pytest.approx(sum(paid))
    saturated = sum(abs(plan[t % 5]) > 0.95 for t in range(n_steps))
    assert stats["saturated_fraction"] == saturated / n_steps == 6 / 10
    decisions = range(n_steps - horizon + 1)  # those with H steps left
    assert stats["plan_imagined"] == pytest.approx(sum(10.0 * t + 1.5 for t in decisions) / 8)
    real = [sum(paid[t : t + horizon]) for t in decisions]
    assert stats["plan_real"] == pytest.approx(sum(real) / len(real))
    env.close()


def test_ppo_summary_pairs_the_evaluations_before_and_after(tmp_path: Path) -> None:
    """The paired difference and its Student-t interval, computed by hand with scipy."""
    from scipy import stats

    from dcem.experiments import ppo

    before, after = [10.0, 12.0, 9.0, 15.0], [11.0, 15.0, 8.5, 19.0]
    rows = [{"ppo_step": 0, "phase": "eval", "return": np.mean(before),
             "eval_returns": " ".join(map(str, before))},
            {"ppo_step": 0, "phase": "train", "return": 3.0},
            {"ppo_step": 1, "phase": "eval", "return": np.mean(after),
             "eval_returns": " ".join(map(str, after))}]  # fmt: skip
    common.append_csv(tmp_path / "metrics.csv", ppo.METRIC_FIELDS, rows)
    summary = ppo._summary(tmp_path)
    diff = np.subtract(after, before)
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert summary["paired_difference"] == pytest.approx(1.875)
    assert summary["paired_difference_t95"] == pytest.approx([lo, hi], rel=1e-6)
    b_lo, b_hi = summary["paired_difference_bootstrap95"]
    assert min(diff) <= b_lo < 1.875 < b_hi <= max(diff)
    # dcem dmc eval of the run pairs its episodes with the evaluation before PPO the same way
    paired = ppo._paired_with_start(tmp_path, [*after, 30.0])  # one episode more: left out
    assert paired["before_returns"] == before
    for key in ("paired_difference", "paired_difference_t95", "paired_difference_bootstrap95"):
        assert paired[key] == summary[key], key
