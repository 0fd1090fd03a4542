"""Benchmark of the world-model planners (full CEM, latent DCEM) against their dense-matmul
floors; JSON out.

One *decision* is one call of ``dcem.world.plan`` for one start state at the paper's sizes
(horizon 12, 10 iterations, 1000 candidates, 100 elites; RSSM with GRU 200, stochastic 30,
hidden layers 2 × 200; cheetah's 17-d observations and 6-d actions). A *latent decision* is
one call of ``dcem.world.plan_latent`` (DCEM over a 2-d latent box, 100 candidates, 10 elites,
tau = 1, 10 iterations; decoder with 2 hidden layers of 200 ELU units to the 12 × 6 action
sequence): a tenth of the trajectories.

The *floor* is the time the planner's multiply-accumulates would take at the dense matmul
throughput measured in the same run (a large square ``torch.mm``, same device, dtype and
threads). Per imagined transition the planner multiplies through the input layers
``g(s, a)``, the GRU cell (input and hidden projections), the prior and the reward model;
a decision has ``n_sample × horizon × n_iter`` transitions. ``ratio_to_floor`` =
measured time / floor. For comparison the same rollouts are timed with ``RSSM.imagine`` (a
plain per-layer PyTorch loop).
The latent decision's floor counts its transitions and the decoder's multiply-accumulates
(one decoding per candidate and iteration, and one of the final mean).
``speedup_latent_vs_cem`` = full CEM decision time / latent DCEM decision time.

Eager and compiled side by side: the same decisions after ``model.compile()`` (the RSSM's
imagination rollout through ``torch.compile``, ``--compile-mode``), with the first call's
time (the compile), the first call at another batch size (``n_sample / 2``: does it compile
again?), and the first call in a fresh process with the compile cache left warm by this one
(``compile_s_warm_cache``).

Usage: ``python benchmarks/planner.py --out benchmarks/out/planner.json [--tiny]
[--device cpu|cuda|all] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dcem.world import RSSM, ActionDecoder, State, plan, plan_latent


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run."""

    obs_size: int = 17
    action_size: int = 6
    deter_size: int = 200
    stoch_size: int = 30
    hidden_size: int = 200
    n_layers: int = 2
    horizon: int = 12
    n_iter: int = 10
    n_sample: int = 1000
    n_elite: int = 100
    latent_dim: int = 2
    latent_n_sample: int = 100
    latent_n_elite: int = 10
    latent_tau: float = 1.0
    decoder_hidden: int = 200
    decoder_layers: int = 2
    gemm_size: int = 2048
    repeats: int = 7


TINY = Config(deter_size=16, stoch_size=4, hidden_size=16, horizon=3, n_iter=2, n_sample=50,
              n_elite=5, latent_n_sample=10, latent_n_elite=2, decoder_hidden=16, gemm_size=256,
              repeats=2)  # fmt: skip


def macs_per_transition(c: Config) -> int:
    """Multiply-accumulates of one imagined step of one candidate."""
    hidden_stack = (c.n_layers - 1) * c.hidden_size**2
    inputs = (c.stoch_size + c.action_size) * c.hidden_size + hidden_stack
    gru = 3 * c.deter_size * (c.hidden_size + c.deter_size)
    prior = c.deter_size * c.hidden_size + hidden_stack + c.hidden_size * 2 * c.stoch_size
    reward = (c.deter_size + c.stoch_size) * c.hidden_size + hidden_stack + c.hidden_size
    return inputs + gru + prior + reward


def decoder_macs(c: Config) -> int:
    """Multiply-accumulates of decoding one latent into a ``horizon × action_size`` sequence."""
    hidden = c.latent_dim * c.decoder_hidden + (c.decoder_layers - 1) * c.decoder_hidden**2
    return hidden + c.decoder_hidden * c.horizon * c.action_size


def latent_macs_per_decision(c: Config) -> int:
    """Transitions and decodings of one latent DCEM decision (plus decoding the final mean)."""
    per_candidate = c.horizon * macs_per_transition(c) + decoder_macs(c)
    return c.n_iter * c.latent_n_sample * per_candidate + decoder_macs(c)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def gemm_flops_per_s(c: Config, device: torch.device, dtype: torch.dtype):
    """A timer of a square ``torch.mm`` of size ``gemm_size``: each call returns FLOP/s."""
    n = c.gemm_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    reps = max(1, int(1e10 // (2 * n**3)))  # about 0.1 s per timing on a 100 GFLOP/s core
    torch.mm(a, b, out=out)
    return lambda: (
        2 * n**3 * reps / _timed(lambda: [torch.mm(a, b, out=out) for _ in range(reps)], device)
    )


def bench_device(c: Config, device: torch.device, dtype: torch.dtype) -> dict:
    """Time decisions, the plain loop and the matmul throughput, interleaved per repeat.

    Other processes on a shared machine slow all three alike within one repeat, so besides
    best-versus-best the per-repeat (paired) ratios are reported.
    """
    model, g, state = _setup(c, device, dtype)
    start = State(*(x.expand(c.n_sample, -1) for x in state))
    decoder = ActionDecoder(c.latent_dim, c.action_size, horizon=c.horizon,
                            hidden=c.decoder_hidden, n_layers=c.decoder_layers)  # fmt: skip
    decoder = decoder.to(device, dtype)
    actions = torch.randn(c.horizon, c.n_sample, c.action_size, device=device, dtype=dtype)

    def decide() -> None:
        plan(model, state, horizon=c.horizon, n_iter=c.n_iter, n_sample=c.n_sample,
             n_elite=c.n_elite, generator=g)  # fmt: skip

    def decide_latent() -> None:
        plan_latent(model, decoder, state, n_iter=c.n_iter, n_sample=c.latent_n_sample,
                    n_elite=c.latent_n_elite, tau=c.latent_tau, generator=g)  # fmt: skip

    @torch.no_grad()
    def plain() -> None:  # the rollouts of one decision with the per-layer loop
        for _ in range(c.n_iter):
            model.imagine(start, actions, generator=g).sum(0)

    gemm = gemm_flops_per_s(c, device, dtype)
    decide()  # warm-up
    decide_latent()
    plain()
    runs = [
        (_timed(decide, device), _timed(decide_latent, device), _timed(plain, device), gemm())
        for _ in range(c.repeats)
    ]
    times, latent_times, plain_times, flops = (list(x) for x in zip(*runs, strict=True))
    macs = macs_per_transition(c) * c.n_sample * c.horizon * c.n_iter
    floor = 2 * macs / max(flops)
    best = min(times)
    latent_macs = latent_macs_per_decision(c)
    latent_floor, latent_best = 2 * latent_macs / max(flops), min(latent_times)
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "decisions_per_s": 1.0 / best,
        "s_per_decision": best,
        "s_per_decision_median": statistics.median(times),
        "macs_per_decision": macs,
        "gemm_flops_per_s": max(flops),
        "floor_s_per_decision": floor,
        "ratio_to_floor": best / floor,
        "ratio_to_floor_paired_median": statistics.median(
            t * f / (2 * macs) for t, f in zip(times, flops, strict=True)
        ),
        "plain_imagine_s_per_decision": min(plain_times),
        "plain_ratio_to_floor": min(plain_times) / floor,
        "plain_ratio_to_floor_paired_median": statistics.median(
            t * f / (2 * macs) for t, f in zip(plain_times, flops, strict=True)
        ),
        "trajectories_per_decision": c.n_sample * c.n_iter,
        "latent_trajectories_per_decision": c.latent_n_sample * c.n_iter,
        "latent_decisions_per_s": 1.0 / latent_best,
        "latent_s_per_decision": latent_best,
        "latent_s_per_decision_median": statistics.median(latent_times),
        "latent_macs_per_decision": latent_macs,
        "latent_floor_s_per_decision": latent_floor,
        "latent_ratio_to_floor": latent_best / latent_floor,
        "latent_ratio_to_floor_paired_median": statistics.median(
            t * f / (2 * latent_macs) for t, f in zip(latent_times, flops, strict=True)
        ),
        "speedup_latent_vs_cem": best / latent_best,
        "speedup_latent_vs_cem_paired_median": statistics.median(
            t / lt for t, lt in zip(times, latent_times, strict=True)
        ),
    }


def _setup(c: Config, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = RSSM(c.obs_size, c.action_size, deter_size=c.deter_size, stoch_size=c.stoch_size,
                 hidden_size=c.hidden_size, n_layers=c.n_layers).to(device, dtype)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    sizes = (c.deter_size, c.stoch_size, c.stoch_size, c.stoch_size)
    state = State(*(torch.randn(1, n, device=device, dtype=dtype, generator=g) for n in sizes))
    return model, g, state


def compile_probe(c: Config, device: torch.device, mode: str) -> dict:
    """Compile the model and time its first and second decisions."""
    model, g, state = _setup(c, device, torch.float32)
    model.compile(mode=mode, dynamic=True)

    def decide() -> None:
        plan(model, state, horizon=c.horizon, n_iter=c.n_iter, n_sample=c.n_sample,
             n_elite=c.n_elite, sample=False, generator=g)  # fmt: skip

    first = _timed(decide, device)
    return {"first_call_s": first, "second_call_s": _timed(decide, device)}


def bench_compiled(c: Config, device: torch.device, args: argparse.Namespace, eager: dict) -> dict:
    """Compiled decisions (prior-mean imagination) against eager ones, and compile costs."""
    import subprocess

    model, g, state = _setup(c, device, torch.float32)

    def decide(m: RSSM, n: int) -> None:
        plan(m, state, horizon=c.horizon, n_iter=c.n_iter, n_sample=n,
             n_elite=min(c.n_elite, n // 2), sample=False, generator=g)  # fmt: skip

    eager_model, _, _ = _setup(c, device, torch.float32)
    model.compile(mode=args.compile_mode, dynamic=True)
    compile_s = _timed(lambda: decide(model, c.n_sample), device)
    decide(model, c.n_sample)
    half = max(2 * c.n_elite, c.n_sample // 2)
    new_size_s = _timed(lambda: decide(model, half), device)
    runs = [
        (_timed(lambda: decide(eager_model, c.n_sample), device),
         _timed(lambda: decide(model, c.n_sample), device))
        for _ in range(c.repeats)
    ]  # fmt: skip
    eager_t, comp_t = (list(x) for x in zip(*runs, strict=True))
    command = [
        sys.executable,
        __file__,
        "--out",
        "-",
        "--probe",
        "--device",
        device.type,
        "--threads",
        str(torch.get_num_threads()),
        "--compile-mode",
        args.compile_mode,
    ]
    if args.tiny:
        command.append("--tiny")
    probe = json.loads(subprocess.run(command, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1])  # fmt: skip
    floor = eager["floor_s_per_decision"]
    return {
        "compile_mode": args.compile_mode,
        "mean_imagination_eager_s_per_decision": min(eager_t),
        "mean_imagination_compiled_s_per_decision": min(comp_t),
        "compiled_ratio_to_floor": min(comp_t) / floor,
        "eager_mean_ratio_to_floor": min(eager_t) / floor,
        "compiled_speedup_paired_median": statistics.median(
            e / t for e, t in zip(eager_t, comp_t, strict=True)
        ),
        "compile_s_first_call": compile_s,
        "compile_s_new_batch_size": new_size_s,
        "compile_new_batch_size": half,
        "compile_s_warm_cache": probe["first_call_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="test-sized run")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all': the CPU and, when available, CUDA")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decisions per device")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode (reduce-overhead: CUDA graphs on a GPU)",
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TINY if args.tiny else Config()
    if args.repeats is not None:
        config = replace(config, repeats=args.repeats)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        parser.error("--device cuda requested but CUDA is not available")
    if args.probe:  # the fresh process of compile_s_warm_cache: one compiled decision
        print(json.dumps(compile_probe(config, torch.device(devices[0]), args.compile_mode)))
        return
    results = [bench_device(config, torch.device(d), torch.float32) for d in devices]
    if not args.no_compile:
        for r, d in zip(results, devices, strict=True):
            r.update(bench_compiled(config, torch.device(d), args, r))
    report = {
        "benchmark": "planner",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "config": {
            **asdict(config),
            "macs_per_transition": macs_per_transition(config),
            "decoder_macs": decoder_macs(config),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        if "compile_s_first_call" in r:
            print(f"{r['device']} compiled ({r['compile_mode']}): "
                  f"{r['mean_imagination_compiled_s_per_decision']:.3f} s vs eager "
                  f"{r['mean_imagination_eager_s_per_decision']:.3f} s per decision "
                  f"(ratio to floor {r['compiled_ratio_to_floor']:.2f} vs "
                  f"{r['eager_mean_ratio_to_floor']:.2f}); "
                  f"compile {r['compile_s_first_call']:.1f} s, "
                  f"new batch size {r['compile_s_new_batch_size']:.1f} s, warm cache "
                  f"{r['compile_s_warm_cache']:.1f} s")  # fmt: skip
        print(
            f"{r['device']}: {r['decisions_per_s']:.3f} decisions/s "
            f"({r['s_per_decision']:.3f} s; floor {r['floor_s_per_decision']:.3f} s; "
            f"ratio {r['ratio_to_floor']:.2f}, paired median "
            f"{r['ratio_to_floor_paired_median']:.2f}; plain loop {r['plain_ratio_to_floor']:.2f}, "
            f"{r['plain_ratio_to_floor_paired_median']:.2f})\n"
            f"{r['device']} latent DCEM: {r['latent_decisions_per_s']:.3f} decisions/s "
            f"({r['latent_s_per_decision']:.3f} s; floor {r['latent_floor_s_per_decision']:.3f} s; "
            f"ratio {r['latent_ratio_to_floor']:.2f}, paired median "
            f"{r['latent_ratio_to_floor_paired_median']:.2f}); speedup over CEM "
            f"{r['speedup_latent_vs_cem']:.2f}, paired median "
            f"{r['speedup_latent_vs_cem_paired_median']:.2f}"
        )


if __name__ == "__main__":
    main()
