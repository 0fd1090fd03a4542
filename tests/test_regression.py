"""The energy-based regression experiment: model, config, CLI, run folder, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dcem as dcem_lib
from dcem import cli
from dcem.experiments import common, regression
from dcem.experiments.regression import EnergyNet, RegressionConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["convergence.png", "ablation.png", "predictions.png", "energy_surfaces.png"]


def _dcem_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcem", "regression", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- model and config


def test_energy_net_is_the_mlp_on_concatenated_inputs() -> None:
    torch.manual_seed(0)
    net = EnergyNet(n_hidden=16)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    h = F.softplus(F.linear(torch.cat((x, y), -1), net.inp.weight, net.inp.bias))
    for layer in net.hidden:
        h = F.softplus(layer(h))
    expected = net.out(h).squeeze(-1)
    torch.testing.assert_close(net(x, y), expected)
    torch.testing.assert_close(net.energy_fn(x)(y), expected)
    ys = torch.randn(5, 7, 1)  # many candidates per x, as DCEM evaluates them
    torch.testing.assert_close(net.energy_fn(x)(ys), net(x.unsqueeze(1).expand(-1, 7, -1), ys))


@pytest.mark.parametrize("method", regression.METHODS)
def test_predict_shape_and_gradient_reach_every_parameter(method: str) -> None:
    cfg = RegressionConfig()
    torch.manual_seed(0)
    net = EnergyNet(n_hidden=16)
    x = torch.linspace(0.0, 6.0, 4).unsqueeze(1)
    y_hat = regression.predict(net, x, method, cfg, 3, torch.Generator().manual_seed(0))
    assert y_hat.shape == (4, 1)
    y_hat.square().sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    offset = grads.pop("out.bias")  # an energy offset never moves the argmin
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    largest = max(float(g.abs().max()) for g in grads.values())
    assert offset is None or float(offset.abs().max()) < 1e-3 * largest


def test_batched_energy_is_each_nets_own_energy() -> None:
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(EnergyNet(n_hidden=16))
    x = torch.rand(3, 4, 1) * 6.0  # 4 points for each of the 3 nets
    energy = regression.batched_energy_fn(regression.stack_params(nets), x)
    ys = torch.randn(12, 7, 1)  # (net, point) problems with 7 candidates each
    expected = [nets[s].energy_fn(x[s])(ys[4 * s : 4 * s + 4]) for s in range(3)]
    torch.testing.assert_close(energy(ys), torch.cat(expected))
    y = torch.randn(12, 1)
    torch.testing.assert_close(
        energy(y), torch.cat([nets[s](x[s], y[4 * s : 4 * s + 4]) for s in range(3)])
    )


@pytest.mark.parametrize("method", regression.METHODS)
def test_batched_evaluation_matches_each_net_alone(method: str) -> None:
    cfg = RegressionConfig()
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(EnergyNet(n_hidden=16))
    x = torch.linspace(0.0, 6.0, 5).unsqueeze(1)
    together = regression.evaluate_batch(nets, x, method, cfg, 4)
    for net, preds in zip(nets, together, strict=True):
        alone = regression.predict(
            net, x, method, cfg, 4, torch.Generator().manual_seed(cfg.eval_seed)
        )
        torch.testing.assert_close(preds, alone.detach(), rtol=1e-4, atol=1e-4)


def test_a_gd_seed_in_a_batch_takes_the_updates_it_takes_alone() -> None:
    """GD seeds share the arithmetic, nothing else (no common gradient norm, optimizer,
    schedule or data order): seed 1 in the batch (0, 1, 2) moves as seed 1 alone, to rounding.
    (A DCEM batch also shares its noise generator, so its seeds move differently alone.)"""
    cfg = RegressionConfig(n_updates=10**6, eval_every=10**6)
    data = regression._dataset(cfg)
    together = regression._new_job(cfg, "gd", (0, 1, 2))
    alone = regression._new_job(cfg, "gd", (1,))
    for _ in range(2):
        regression._sample_step(together, data, cfg)
        regression._sample_step(alone, data, cfg)
    pairs = zip(together.models[1].parameters(), alone.models[0].parameters(), strict=True)
    for batched, single in pairs:
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert not torch.equal(together.models[0].hidden[0].weight, together.models[1].hidden[0].weight)


def test_batched_gd_seeds_train_as_if_each_ran_alone(tmp_path: Path) -> None:
    """A whole GD run with the seeds batched gives each seed the numbers of one job per seed
    (to rounding: Adam divides each gradient entry by its own running scale, so entries that
    are rounding noise take full-size steps whose sign follows the rounding)."""
    method = "gd"
    base = RegressionConfig.quick(
        methods=(method,), seeds=(0, 1), n_updates=60, eval_every=20, checkpoint_every=30,
        ablation_steps=(5, 10), grid_size=8,
    )  # fmt: skip
    runs = {}
    for batch in (1, 2):
        cfg = dataclasses.replace(base, gd_seed_batch=batch, dcem_seed_batch=batch)
        runs[batch] = regression.run(cfg, tmp_path / f"batch{batch}", workers=1, progress=False)
    alone, together = runs[1], runs[2]
    for seed in ("0", "1"):
        a = alone["ablation_per_seed"][method][seed]
        b = together["ablation_per_seed"][method][seed]
        assert b == pytest.approx(a, rel=2e-2)
    rows = {b: common.read_csv(tmp_path / f"batch{b}" / "metrics.csv") for b in (1, 2)}
    assert [r["update"] for r in rows[1]] == [r["update"] for r in rows[2]]
    for r1, r2 in zip(rows[1], rows[2], strict=True):
        assert float(r2["train_mse"]) == pytest.approx(float(r1["train_mse"]), rel=2e-2)
    finals = together["final_mse_per_seed"][method]
    assert finals["0"] != finals["1"]  # and the seeds are not copies of each other


def test_gd_prediction_is_plain_gradient_descent_on_the_energy() -> None:
    cfg = RegressionConfig(gd_lr=0.1)
    torch.manual_seed(1)
    net = EnergyNet(n_hidden=8)
    x = torch.tensor([[0.5], [2.0]])
    y = torch.zeros(2, 1, requires_grad=True)
    for _ in range(4):
        (g,) = torch.autograd.grad(net(x, y).sum(), y)
        y = (y - 0.1 * g).detach().requires_grad_()
    torch.testing.assert_close(regression.predict(net, x, "gd", cfg, 4), y.detach())


def _nets(n_nets: int, n_hidden: int, dtype: torch.dtype = torch.float32) -> list[EnergyNet]:
    nets = []
    for seed in range(n_nets):
        torch.manual_seed(seed)
        nets.append(EnergyNet(n_hidden=n_hidden).to(dtype))
    return nets


@pytest.mark.parametrize("method", regression.METHODS)
def test_training_prediction_gradient_matches_finite_differences(method: str) -> None:
    """The gradient of a batched training prediction w.r.t. every stacked parameter (DCEM
    through dcem.dcem's iterations, GD through unroll_gd's steps: second derivatives of the
    energy) against central differences, float64, with the same DCEM noise in every call."""
    cfg = RegressionConfig(dcem_n_sample=12, dcem_n_elite=3, gd_lr=0.2)
    nets = _nets(2, 4, torch.float64)
    with torch.no_grad():
        for net in nets:
            net.out.weight *= 10.0  # GD steps that move y
    x = torch.rand(2, 2, 1, dtype=torch.float64) * 6.0
    params = {k: v.detach().requires_grad_() for k, v in regression.stack_params(nets).items()}

    def solve(*values: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        return regression.predict_batch(
            dict(zip(params, values, strict=True)), x, method, cfg, 3, gen
        )

    assert torch.autograd.gradcheck(solve, tuple(params.values()), eps=1e-6, atol=1e-6,
                                    rtol=1e-4)  # fmt: skip
    y_hat = solve(*params.values())
    grads = torch.autograd.grad(
        y_hat.sum(), list(params.values()), allow_unused=True, materialize_grads=True
    )
    moved = [k for k, g in zip(params, grads, strict=True) if float(g.abs().max()) > 0]
    assert set(params) - set(moved) <= {"out.bias"}  # an energy offset never moves the argmin


@pytest.mark.parametrize("compile", [True, False])
def test_compile_reaches_every_dcem_solve(compile: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile`` is dcem.dcem's: every DCEM solve of training and evaluation gets it
    (the library compiles an iteration and falls back to eager with one warning)."""
    seen = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["compile"])
        return real(*args, **{**kwargs, "compile": False})

    real = regression.dcem.dcem
    monkeypatch.setattr(regression.dcem, "dcem", spy)
    cfg = RegressionConfig(n_updates=10**6, eval_every=2, n_hidden=8, compile=compile)
    job = regression._new_job(cfg, "dcem", (0, 1))
    for _ in range(2):
        regression._sample_step(job, regression._dataset(cfg), cfg)
    assert seen == [compile] * 4  # two updates, then one evaluation per net


def test_gd_is_never_compiled() -> None:
    """Unrolled GD differentiates the energy twice, which torch.compile does not support;
    dcem.unroll_gd has no compile option, and the results say so."""
    assert regression.COMPILED_METHODS == ("dcem",)
    assert "compile" not in inspect.signature(dcem_lib.unroll_gd).parameters


@pytest.mark.slow
def test_compiled_dcem_updates_match_eager_ones_to_rounding() -> None:
    """Compiled DCEM iterations (about a minute to compile) give the eager updates to float
    rounding (but out.bias: its gradient is rounding noise, as an energy offset does not move
    the argmin, and Adam turns that into full-size steps of either sign)."""
    base = RegressionConfig(n_updates=10**6, eval_every=10**6, n_hidden=16)
    data = regression._dataset(base)
    compiled = regression._new_job(base, "dcem", (0, 1))
    eager = regression._new_job(dataclasses.replace(base, compile=False), "dcem", (0, 1))
    for _ in range(3):
        regression._sample_step(compiled, data, base)
        regression._sample_step(eager, data, dataclasses.replace(base, compile=False))
    for a, b in zip(compiled.models, eager.models, strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            if name != "out.bias":
                torch.testing.assert_close(
                    p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
                )


def test_dcem_evaluation_is_reproducible_and_uses_its_own_seed() -> None:
    torch.manual_seed(0)
    net = EnergyNet(n_hidden=16)
    x = torch.linspace(0.0, 6.0, 5).unsqueeze(1)
    cfg = RegressionConfig()
    first = regression.evaluate_batch([net], x, "dcem", cfg, 3)
    torch.rand(10)  # the global RNG must not matter
    torch.testing.assert_close(regression.evaluate_batch([net], x, "dcem", cfg, 3), first)
    other = RegressionConfig(eval_seed=cfg.eval_seed + 1)
    assert not torch.equal(regression.evaluate_batch([net], x, "dcem", other, 3), first)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_updates": 0}, "n_updates"),
        ({"methods": ("gd", "newton")}, "methods"),
        ({"seeds": (0, 0)}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"dcem_n_elite": 100}, "dcem_n_elite"),
        ({"gd_lr": math.nan}, "gd_lr"),
        ({"ablation_steps": ()}, "ablation_steps"),
        ({"compile": 1}, "compile"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RegressionConfig(**kwargs)


def test_default_config_is_the_paper_protocol() -> None:
    cfg = RegressionConfig()
    assert (cfg.n_updates, cfg.n_inner_update, cfg.n_points, cfg.n_hidden) == (60000, 1, 100, 128)
    assert (cfg.lr, cfg.clip_norm, cfg.eval_every, cfg.plateau_patience) == (1e-3, 1.0, 100, 20)
    assert (cfg.n_inner_iter, cfg.gd_lr, cfg.dcem_n_sample, cfg.dcem_n_elite) == (10, 0.1, 100, 10)
    assert (cfg.dcem_tau, cfg.dcem_init_sigma, cfg.dcem_normalize) == (1.0, 7.0, True)
    assert cfg.seeds == (0, 1, 2) and cfg.ablation_steps == tuple(range(1, 21))
    assert cfg.compile and not RegressionConfig.quick().compile  # compile amortizes on 60k
    assert regression.load_config  # config.json round-trips (checked in the run test)


# --------------------------------------------------------------------------- bad options


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["regression", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--updates", "0"], "--updates"),
        (["--updates", "-5"], "--updates"),
        (["--updates", "ten"], "--updates"),
        (["--methods", "gd,newton"], "--methods"),
        (["--methods", "gd,gd"], "--methods"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--seeds", "-3"], "--seeds"),
        (["--workers", "0"], "--workers"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
    ],
)
def test_bad_option_values_exit_2_naming_the_option(
    argv: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _bad([*argv, "--out", str(out)], capsys)
    assert option in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "compile"),
    [([], True), (["--no-compile"], False), (["--quick"], False), (["--quick", "--compile"], True)],
)
def test_compile_option(argv: list[str], compile: bool) -> None:
    args = cli.build_parser().parse_args(["regression", *argv])
    assert cli._regression_config(args).compile is compile


def _occupied(folder: Path, record: dict) -> dict[str, tuple[bytes, int]]:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(record))
    (folder / "summary.json").write_text('{"final_mse": {"gd": 0.001}}')
    (folder / "metrics.csv").write_text("method,seed,update,train_mse,lr\n")
    return _snapshot(folder)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"experiment": "cartpole", "config": {}}, "cartpole"),
        ({"experiment": "regression", "config": RegressionConfig(n_updates=123).to_json()},
         "different config"),
    ],
)  # fmt: skip
def test_out_folder_with_other_results_is_refused_and_untouched(
    record: dict, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    before = _occupied(out, record)
    line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and reason in line
    assert _snapshot(out) == before


def test_out_folder_without_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and "no config.json" in line
    assert _listing_names(out) == ["todo.txt"]


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and "not a folder" in line
    assert out.read_text() == "keep me"


def test_out_folder_in_use_by_a_running_process_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with common.lock_folder(out):  # as a concurrent `dcem regression --out run` would hold it
        line = _bad(["--quick", "--out", str(out)], capsys)
    assert "--out" in line and "in use" in line
    assert _listing_names(out) == [".lock"]


def test_plot_only_without_results_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--plot-only" in _bad(["--plot-only", "--out", str(tmp_path)], capsys)


def test_real_process_exit_status_for_a_bad_option(tmp_path: Path) -> None:
    done = _dcem_cli("--updates", "-1", "--out", tmp_path / "run", timeout=60)
    assert done.returncode == 2
    assert "--updates" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def _listing_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- real runs


def test_quick_run_writes_every_result_and_reruns_without_retraining(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    done = _dcem_cli("--quick", "--out", out, "--workers", "2")
    assert done.returncode == 0, done.stderr
    cfg = RegressionConfig.quick()
    record = json.loads((out / "config.json").read_text())
    assert record["experiment"] == "regression" and record["config"] == cfg.to_json()
    assert "git_commit" in record and record["config"]["seeds"] == [0, 1]
    assert regression.load_config(out) == cfg

    summary = json.loads((out / "summary.json").read_text())
    _check_summary(summary, cfg)
    _check_metrics(out, summary, cfg)
    _check_job_files(out, summary, cfg)
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name

    jobs_before = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    (out / "ablation.png").unlink()
    again = _dcem_cli("--quick", "--out", out, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == jobs_before
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["final_mse_per_seed"] == summary["final_mse_per_seed"]
    assert (out / "ablation.png").read_bytes().startswith(PNG_MAGIC)

    (out / "energy_surfaces.png").unlink()
    assert cli.main(["regression", "--plot-only", "--out", str(out)]) == 0
    assert (out / "energy_surfaces.png").read_bytes().startswith(PNG_MAGIC)


def _check_summary(summary: dict, cfg: RegressionConfig) -> None:
    for key in ("final_mse", "final_mse_per_seed", "ablation", "ablation_per_seed",
                "updates", "wall_seconds", "ms_per_update"):  # fmt: skip
        assert key in summary, key
    assert summary["updates"] == cfg.n_updates
    steps = [str(k) for k in cfg.ablation_steps]
    for method in cfg.methods:
        per_seed = summary["final_mse_per_seed"][method]
        assert sorted(per_seed) == ["0", "1"]
        assert all(0 < v < 100 for v in per_seed.values())
        assert summary["final_mse"][method] == pytest.approx(np.mean(list(per_seed.values())))
        assert list(summary["ablation"][method]) == steps
        for seed, table in summary["ablation_per_seed"][method].items():
            assert list(table) == steps
            assert table["10"] == per_seed[seed]  # the training step count is the final MSE
        assert summary["wall_seconds"][method] > 0 and summary["ms_per_update"][method] > 0
        assert summary["first_update_seconds"][method] > 0
    assert summary["wall_seconds"]["total"] == pytest.approx(
        sum(summary["wall_seconds"][m] for m in cfg.methods)
    )


def _check_metrics(out: Path, summary: dict, cfg: RegressionConfig) -> None:
    rows = common.read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["method", "seed", "update", "train_mse", "lr"]
    per_job = cfg.n_updates // cfg.eval_every
    assert len(rows) == len(cfg.methods) * len(cfg.seeds) * per_job
    for method in cfg.methods:
        for seed in cfg.seeds:
            job = [r for r in rows if r["method"] == method and r["seed"] == str(seed)]
            assert [int(r["update"]) for r in job] == [cfg.eval_every * (i + 1) for i in range(6)]
            assert float(job[-1]["lr"]) == cfg.lr
            # the last logged train MSE is the final MSE (same model, same evaluation noise)
            assert float(job[-1]["train_mse"]) == summary["final_mse_per_seed"][method][str(seed)]


def _check_job_files(out: Path, summary: dict, cfg: RegressionConfig) -> None:
    for method in cfg.methods:
        state = common.load_checkpoint(out / "ckpt" / f"{method}-0_1.pt")  # one batch of seeds
        assert state["update"] == cfg.n_updates and state["method"] == method
        assert state["seeds"] == [0, 1] and sorted(state["per_seed"]) == ["0", "1"]
        for seed in cfg.seeds:
            key = f"{method}-{seed}"
            with np.load(out / "jobs" / f"{key}.npz") as data:
                preds, target = data["predictions"], data["y_target"]
                assert preds.shape == (len(cfg.ablation_steps), cfg.n_points)
                assert data["energy"].shape == (cfg.grid_size, cfg.grid_size)
                i = list(data["steps"]).index(cfg.n_inner_iter)
                mse = float(np.mean((preds[i] - target) ** 2))
                assert mse == pytest.approx(summary["final_mse_per_seed"][method][str(seed)])
            result = json.loads((out / "jobs" / f"{key}.json").read_text())
            assert result["compiled"] is False  # --quick trains eagerly
            assert not list((out / "ckpt").glob("*.tmp")) and not list(out.glob(".*.tmp"))


def _start_and_kill_after(command: list[str], checkpoint: Path) -> int:
    """Start ``command``, SIGKILL it as soon as ``checkpoint`` exists; its update count."""
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    return int(common.load_checkpoint(checkpoint)["update"])


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["--quick", "--seeds", "0", "--updates", "300", "--workers", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _dcem_cli(*args, "--out", straight)
    assert done.returncode == 0, done.stderr
    command = [sys.executable, "-m", "dcem", "regression", *args, "--out", str(killed)]

    # Jobs run longest first: dcem-0, then gd-0. Kill 1: inside dcem-0, after a checkpoint.
    dcem_at = _start_and_kill_after(command, killed / "ckpt" / "dcem-0.pt")
    assert 0 < dcem_at < 300 and not (killed / "summary.json").exists()
    with open(killed / "jobs" / "dcem-0.csv", "a") as handle:  # rows past the checkpoint and
        handle.write("100000,0.5,0.001\n100001,0.4")  # a torn line, as a crash can leave
    # Kill 2: the rerun resumes dcem-0, finishes it, and is killed inside gd-0.
    gd_at = _start_and_kill_after(command, killed / "ckpt" / "gd-0.pt")
    assert 0 < gd_at < 300 and (killed / "jobs" / "dcem-0.json").exists()
    finished = (killed / "jobs" / "dcem-0.json").stat().st_mtime_ns

    resumed = _dcem_cli(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["final_mse_per_seed"] == a["final_mse_per_seed"]
    assert b["ablation_per_seed"] == a["ablation_per_seed"]
    assert (killed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    # They resumed from their checkpoints (not from scratch); the finished job was skipped.
    assert json.loads((killed / "jobs" / "dcem-0.json").read_text())["resumed_from"] == dcem_at
    assert json.loads((killed / "jobs" / "gd-0.json").read_text())["resumed_from"] == gd_at
    assert (killed / "jobs" / "dcem-0.json").stat().st_mtime_ns == finished


def test_progress_off_a_terminal_logs_sparse_lines_instead_of_a_bar(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level("INFO", logger="dcem.experiments.regression"):
        with regression._Progress({"gd-0": 0, "dcem-0": 100}, 600, True, log_every=0.0) as report:
            report("gd-0", 300)
            report("dcem-0", 250)
        with regression._Progress({"gd-0": 0}, 300, True, log_every=3600.0) as report:
            report("gd-0", 300)
    assert [r.getMessage() for r in caplog.records] == [
        "regression: 400 / 600 updates",  # dcem-0 had 100 from a checkpoint
        "regression: 550 / 600 updates",
    ]
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal here: no bar
