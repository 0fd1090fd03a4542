"""The cartpole embedding experiment: config, solvers, CLI, run folder, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcem import cli
from dcem.control import ActionDecoder, rollout_cost, validation_states
from dcem.experiments import cartpole, common
from dcem.experiments.cartpole import CartpoleConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["improvement_factor.png", "convergence.png", "surfaces.png", "iterates.png"]


def _dcem_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcem", "cartpole", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- config and parts


def test_default_config_is_the_paper_protocol() -> None:
    cfg = CartpoleConfig()
    assert (cfg.latent_dims, cfg.taus, cfg.seeds) == ((2,), (1.0,), (0, 1, 2))
    assert (cfg.horizon, cfg.hidden, cfg.n_layers, cfg.lr, cfg.clip_norm) == (20, 256, 3, 5e-4, 1.0)
    assert (cfg.n_sample, cfg.n_elite, cfg.solver_iters, cfg.init_sigma) == (100, 10, 10, 0.5)
    assert cfg.normalize and cfg.eval_every == 100 and cfg.n_validation == 100
    grid = CartpoleConfig.grid()
    assert grid.latent_dims == (2, 8, 16) and grid.taus == (1.0, 0.1, 0.0)
    assert len(grid.runs()) == 27


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"latent_dims": (0,)}, "latent_dims"),
        ({"latent_dims": (2, 2)}, "latent_dims"),
        ({"taus": (-1.0,)}, "taus"),
        ({"taus": (float("nan"),)}, "taus"),
        ({"taus": (1.0, 1e-7)}, "taus"),
        ({"horizon": 0}, "horizon"),
        ({"n_iter": 0}, "n_iter"),
        ({"checkpoint_every": 150}, "checkpoint_every"),
        ({"n_elite": 100}, "n_elite"),
        ({"seeds": (-1,)}, "seeds"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CartpoleConfig(**kwargs)


def test_tau_zero_is_latent_cem_and_other_taus_are_dcem() -> None:
    cfg = CartpoleConfig()
    cem_solver = cartpole.train_solver(cfg, 0.0)
    assert cem_solver.method == "cem" and not cem_solver.return_best
    dcem_solver = cartpole.train_solver(cfg, 0.1)
    assert (dcem_solver.method, dcem_solver.tau) == ("dcem", 0.1)
    assert (dcem_solver.n_sample, dcem_solver.n_elite, dcem_solver.n_iter) == (100, 10, 10)
    assert dcem_solver.init_sigma == 0.5 and dcem_solver.normalize


@pytest.mark.parametrize("tau", [1.0, 0.0])
def test_one_training_step_updates_every_decoder_layer(tau: float) -> None:
    cfg = CartpoleConfig(hidden=16, n_sample=20, n_elite=4, solver_iters=3)
    job = cartpole._new_job(cfg, 2, tau, seed=0)
    before = [p.detach().clone() for p in job.decoder.parameters()]
    cost = cartpole._train_step(job, cartpole.train_solver(cfg, tau), cfg)
    assert np.isfinite(cost) and job.iteration == 1
    for old, new in zip(before, job.decoder.parameters(), strict=True):
        assert not torch.equal(old, new)


def test_compiled_training_steps_match_eager_ones_up_to_rounding(monkeypatch) -> None:
    import dcem.optim

    torch._dynamo.reset()
    monkeypatch.setattr(dcem.optim, "_COMPILED", {})
    monkeypatch.setattr(dcem.optim, "_BACKEND", "aot_eager")  # tracing without inductor
    cfg = CartpoleConfig(hidden=16, n_sample=20, n_elite=4, solver_iters=2, horizon=4)
    for tau in (1.0, 0.0):  # DCEM and latent CEM
        jobs = {mode: cartpole._new_job(cfg, 2, tau, seed=0) for mode in (False, True)}
        for mode, job in jobs.items():
            solver = dataclasses.replace(cartpole.train_solver(cfg, tau), compile=mode)
            costs = [cartpole._train_step(job, solver, cfg) for _ in range(3)]
            assert all(np.isfinite(costs))
        for eager, compiled in zip(jobs[False].decoder.parameters(),
                                   jobs[True].decoder.parameters(), strict=True):  # fmt: skip
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert {"_dcem_step", "_cem_step"} <= {k for k, v in dcem.optim._COMPILED.items() if v}
    torch._dynamo.reset()


def test_compile_option_reaches_every_job_and_is_not_part_of_the_config(
    tmp_path: Path, monkeypatch
) -> None:
    seen: list[bool] = []
    real_train = cartpole._train

    def train(job, cfg, out, progress, compile=False):  # noqa: A002  (the option's name)
        seen.append(compile)
        real_train(job, cfg, out, progress, compile=False)

    monkeypatch.setattr(cartpole, "_train", train)
    out = tmp_path / "run"
    argv = ["cartpole", "--quick", "--updates", "2", "--seeds", "0", "--taus", "1",
            "--out", str(out), "--workers", "1"]  # fmt: skip
    assert cli.main([*argv, "--compile"]) == 0
    assert seen == [True]
    record = json.loads((out / "config.json").read_text())
    assert "compile" not in json.dumps(record["config"])


def test_cost_surface_is_the_rollout_cost_of_the_decoded_grid() -> None:
    torch.manual_seed(0)
    decoder = ActionDecoder(2, hidden=8)
    states = validation_states(n=3)
    axis, surface = cartpole.cost_surface(decoder, states, grid=5)
    assert axis.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and surface.shape == (3, 5, 5)
    z = torch.tensor([[axis[1], axis[4]]])  # z1 = axis[1], z2 = axis[4] -> surface[:, 4, 1]
    with torch.no_grad():
        expected = rollout_cost(states, decoder(z).expand(3, -1))
    torch.testing.assert_close(surface[:, 4, 1], expected)
    with pytest.raises(ValueError, match="latent_dim"):
        cartpole.cost_surface(ActionDecoder(3, hidden=8), states, grid=5)


def test_validation_depends_on_the_decoder_only() -> None:
    torch.manual_seed(0)
    decoder = ActionDecoder(2, hidden=8)
    states, solver = validation_states(n=4), cartpole.train_solver(CartpoleConfig(), 1.0)
    first = cartpole.validation_costs(decoder, solver, states, eval_seed=3)
    torch.rand(5)  # the global RNG must not matter
    torch.testing.assert_close(cartpole.validation_costs(decoder, solver, states, 3), first)
    assert not torch.equal(cartpole.validation_costs(decoder, solver, states, 4), first)


# --------------------------------------------------------------------------- bad options


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cartpole", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--latent-dims", "0"], "--latent-dims"),
        (["--latent-dims", "2,x"], "--latent-dims"),
        (["--latent-dims", "2,2"], "--latent-dims"),
        (["--taus", "1,abc"], "--taus"),
        (["--taus", "-1"], "--taus"),
        (["--taus", "nan"], "--taus"),
        (["--taus", "1,1"], "--taus"),
        (["--taus", "1,1e-7"], "--taus"),  # overflows the gradients (used to end in NaN)
        (["--horizon", "0"], "--horizon"),
        (["--horizon", "x"], "--horizon"),
        (["--updates", "0"], "--updates"),
        (["--iterations", "0"], "--iterations"),  # the old name of --updates
        (["--seeds", "0,x"], "--seeds"),
        (["--workers", "0"], "--workers"),
        (["--quick", "--grid"], "--grid"),
    ],
)
def test_bad_option_values_exit_2_naming_the_option(
    argv: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _bad([*argv, "--out", str(out)], capsys)
    assert option in line
    assert not out.exists()


def test_out_folder_of_another_experiment_is_refused_and_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    record = '{"experiment": "regression", "config": {}}'
    (out / "config.json").write_text(record)
    (out / "summary.json").write_text("{}")
    line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and "regression" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "summary.json"]
    assert (out / "config.json").read_text() == record


def test_out_folder_with_another_cartpole_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    record = {"experiment": "cartpole", "config": CartpoleConfig.quick(n_iter=7).to_json()}
    (out / "config.json").write_text(json.dumps(record))
    common.save_checkpoint(out / "ckpt" / "d2-tau1-s0.pt", {"iteration": 5})  # a result
    line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and "different config" in line and "n_iter" in line
    assert "--overwrite" in line  # how to go on


def test_plot_only_without_results_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--plot-only" in _bad(["--plot-only", "--out", str(tmp_path)], capsys)


def test_grid_and_default_folders() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["cartpole", "--grid", "--seeds", "4"])
    cfg = cli._cartpole_config(args)
    assert cfg == CartpoleConfig.grid(seeds=(4,))
    assert cli._cartpole_out(args) == Path("runs/cartpole-grid")
    args = parser.parse_args(["cartpole"])
    assert cli._cartpole_config(args) == CartpoleConfig()
    assert cli._cartpole_out(args) == Path("runs/cartpole")


def test_real_process_exit_status_for_a_bad_option(tmp_path: Path) -> None:
    done = _dcem_cli("--latent-dims", "0", "--out", tmp_path / "run", timeout=60)
    assert done.returncode == 2
    assert "--latent-dims" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- real runs


def test_quick_run_writes_every_result_and_reruns_without_retraining(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    start = time.monotonic()
    done = _dcem_cli("--quick", "--out", out, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 180
    cfg = CartpoleConfig.quick()
    record = json.loads((out / "config.json").read_text())
    assert record["experiment"] == "cartpole" and record["config"] == cfg.to_json()
    assert cartpole.load_config(out) == cfg

    summary = json.loads((out / "summary.json").read_text())
    _check_summary(out, summary, cfg)
    _check_metrics(out, cfg)
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name

    jobs_before = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    expert_before = (out / "expert.json").stat().st_mtime_ns
    (out / "iterates.png").unlink()
    again = _dcem_cli("--quick", "--out", out, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == jobs_before
    assert (out / "expert.json").stat().st_mtime_ns == expert_before  # cached, not recomputed
    assert json.loads((out / "summary.json").read_text())["runs"] == summary["runs"]
    assert (out / "iterates.png").read_bytes().startswith(PNG_MAGIC)

    (out / "surfaces.png").unlink()
    assert cli.main(["cartpole", "--plot-only", "--out", str(out)]) == 0
    assert (out / "surfaces.png").read_bytes().startswith(PNG_MAGIC)


def _check_summary(out: Path, summary: dict, cfg: CartpoleConfig) -> None:
    expert = np.load(out / "expert.npz")
    assert summary["expert_reward"] == pytest.approx(-expert["expert_costs"].mean())
    assert summary["reference_expert_reward"] == pytest.approx(-expert["reference_costs"].mean())
    assert 5 < summary["expert_reward"] < 20 and 5 < summary["reference_expert_reward"] < 20
    assert summary["expert_best_sample_reward"] >= summary["expert_reward"]
    # 30 iterations converge further than 10 on the same held-out states
    assert summary["converged_expert_test_reward"] > summary["expert_test_reward"]
    runs = summary["runs"]
    assert [(r["latent_dim"], r["tau"], r["seed"]) for r in runs] == cfg.runs()
    for entry in runs:
        key = cartpole.run_key(entry["latent_dim"], entry["tau"], entry["seed"])
        with np.load(out / "jobs" / f"{key}.npz") as data:
            assert data["val_costs"].shape == (cfg.n_validation,)
            assert entry["best_val_reward"] == pytest.approx(-data["val_costs"].mean())
            assert data["surface_costs"].shape == (cfg.n_surface_states,) + (cfg.surface_grid,) * 2
            assert data["iterates_samples"].shape == (cfg.solver_iters, cfg.n_sample, 2)
            assert data["iterates_controls"].shape == (cfg.solver_iters, cfg.n_sample, cfg.horizon)
            assert entry["test_reward"] == pytest.approx(-data["test_costs"].mean())
        factor = entry["best_val_reward"] / summary["expert_reward"]
        assert entry["improvement_factor"] == pytest.approx(factor)
        test_factor = entry["test_reward"] / summary["expert_test_reward"]
        assert entry["test_improvement_factor"] == pytest.approx(test_factor)
        headline = entry["test_reward"] / -expert["converged_test_costs"].mean()
        assert entry["headline_improvement_factor"] == pytest.approx(headline)
        assert entry["iterations"] == cfg.n_iter and entry["seconds_per_iteration"] > 0
        state = common.load_checkpoint(out / "ckpt" / f"{key}.pt")
        assert state["iteration"] == cfg.n_iter
        assert -state["best_val"] == pytest.approx(entry["best_val_reward"])
    assert len(summary["improvement_factor"]) == len(cfg.latent_dims) * len(cfg.taus)


def _check_metrics(out: Path, cfg: CartpoleConfig) -> None:
    rows = common.read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["run", "latent_dim", "tau", "seed", *cartpole.METRIC_FIELDS]
    per_run = cfg.n_iter // cfg.eval_every
    assert len(rows) == len(cfg.runs()) * per_run
    its = [int(r["iteration"]) for r in rows if r["run"] == "d2-tau1-s0"]
    assert its == [cfg.eval_every * (i + 1) for i in range(per_run)]
    assert all(np.isfinite(float(r["val_cost"])) for r in rows)


def _start_and_kill_after(command: list[str], checkpoint: Path) -> int:
    """Start ``command``, SIGKILL it as soon as ``checkpoint`` exists; its iteration count."""
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    return int(common.load_checkpoint(checkpoint)["iteration"])


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["--quick", "--seeds", "0", "--taus", "1", "--updates", "100", "--workers", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _dcem_cli(*args, "--out", straight)
    assert done.returncode == 0, done.stderr
    command = [sys.executable, "-m", "dcem", "cartpole", *args, "--out", str(killed)]

    at = _start_and_kill_after(command, killed / "ckpt" / "d2-tau1-s0.pt")
    assert 0 < at < 100 and not (killed / "summary.json").exists()
    with open(killed / "jobs" / "d2-tau1-s0.csv", "a") as handle:  # rows past the checkpoint
        handle.write("100000,-1.0,-1.0,0.1\n100001,-2")  # and a torn line, as a crash leaves
    resumed = _dcem_cli(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    strip = ("seconds_per_iteration",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in a["runs"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in b["runs"]
    ]
    assert b["expert_reward"] == a["expert_reward"]
    assert (killed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    result = json.loads((killed / "jobs" / "d2-tau1-s0.json").read_text())
    assert result["resumed_from"] == at  # resumed from its checkpoint, not from scratch
