"""Benchmark of dcem.dcem / dcem.cem, eager and compiled, against the noise floor and a
reference-style baseline.

Measured side by side in one run (rounds that time every variant once, medians over rounds,
so a load change on a shared machine moves all of them together):
- DCEM forward+backward and CEM forward on a cheap quadratic cost at (B, d) in
  {(1, 2), (1024, 32)}, N=100, k=10, T=10: eager (the library's default) and with
  ``compile=True`` (one iteration as a ``torch.compile`` graph, dynamic shapes);
- the noise floor: T draws of B*N*d standard normals, which no implementation avoids,
  and the cost f alone on T sample sets (forward, and forward+backward);
- a baseline written the reference way (torch.distributions sampling, sort-and-bracket
  LML stopped at the reference dcem's lml_eps = 1e-3, argsort and Python loops over batch
  and elites for hard top-k, autograd through all);
- compile costs: the first compiled call (compile included) at each size, the first call at
  a new batch size (B / 2: does it compile again?), and the first call in a fresh process
  with the compile cache this run left warm (a subprocess; the run uses its own, initially
  empty, inductor cache folder);
- the share of DCEM's time spent outside f for the regression MLP cost (2-128-128-128-1
  Softplus, B=100, d=1), and peak memory and gradient error of the backward modes
  full / checkpoint / pruned (eager).

``--tiny`` runs small sizes, compiles at one size only and, unless ``--backend`` says
otherwise, with the ``aot_eager`` backend (dynamo and AOTAutograd without inductor's C++
code generation: seconds instead of a minute; the test suite runs it).

Usage: python benchmarks/optim.py [--out PATH] [--tiny] [--repeats R] [--threads T]
[--backend inductor|aot_eager]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch.distributions import Normal

import dcem
import dcem.optim
from common import ReferenceLML, median_time, parse_args, peak_memory_bytes, write_result

N, K, T = 100, 10, 10
SIZES = [(1, 2), (1024, 32)]
TINY_SIZES = [(1, 2), (8, 4)]
TARGETS = {"dcem_1024x32": 2.0, "cem_1024x32": 2.5, "dcem_1x2": 2.0}  # x faster than baseline


def cost_forms(p: torch.Tensor) -> dict:
    """The cost ``0.5 x'x + p'x`` written four ways, (B, N, d) -> (B, N); the benchmark
    uses ``mse_loss``. The first three compute ``0.5 (|x + p|^2 - |p|^2)``."""
    shift = p.unsqueeze(1)

    def mse_loss(x: torch.Tensor) -> torch.Tensor:  # one fused kernel each way per input
        target = p.neg().unsqueeze(1).expand_as(x)
        squares = torch.nn.functional.mse_loss(x, target, reduction="none").sum(-1)
        return 0.5 * (squares - p.square().sum(-1, keepdim=True))

    def square_sum(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x + shift).square().sum(-1) - p.square().sum(-1, keepdim=True))

    def norm(x: torch.Tensor) -> torch.Tensor:
        shifted = torch.linalg.vector_norm(x + shift, dim=-1)
        return 0.5 * (shifted.square() - p.square().sum(-1, keepdim=True))

    def three_pass(x: torch.Tensor) -> torch.Tensor:
        return (x * (0.5 * x + shift)).sum(-1)

    return {"mse_loss": mse_loss, "square_sum": square_sum, "norm": norm, "three_pass": three_pass}


def quadratic(p: torch.Tensor):
    """The benchmark's cost ``0.5 x'x + p'x``, written with ``mse_loss`` (one of
    :func:`cost_forms`); ``f_*_over_floor`` in the JSON give the cost's own share."""
    return cost_forms(p)["mse_loss"]


def baseline(f, mu: torch.Tensor, sigma: torch.Tensor, soft: bool) -> torch.Tensor:
    """DCEM/CEM written the reference way (see the module docstring)."""
    n_batch = mu.shape[0]
    for _ in range(T):
        x = Normal(mu, sigma).rsample((N,)).transpose(0, 1).contiguous()
        fx = f(x)
        if soft:
            z = (fx - fx.mean(1, keepdim=True)) / (fx.std(1, keepdim=True) + 1e-6)
            weights = ReferenceLML.apply(-z, K, 1e-3).unsqueeze(2)  # the reference's lml_eps
        else:
            idx = fx.argsort(dim=1)[:, :K]
            weights = torch.zeros(n_batch, N, dtype=x.dtype)
            for j in range(n_batch):
                for v in idx[j]:
                    weights[j, v] = 1.0
            weights = weights.unsqueeze(2)
        mu = (weights * x).sum(1) / K
        sigma = ((weights * (x - mu.unsqueeze(1)) ** 2).sum(1) / K).sqrt()
    return mu


def problem(batch: int, d: int) -> tuple[Callable, Callable, Callable[..., None]]:
    """(dcem forward+backward, cem forward, noise draws) callables for a (batch, d) problem;
    the first two take ``compile``."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(batch, d, generator=gen).requires_grad_()
    mu0 = torch.zeros(batch, d)
    f = quadratic(p)
    kw = dict(n_sample=N, n_elite=K, n_iter=T, generator=gen)

    def dcem_fb(compile: bool = False) -> None:
        dcem.dcem(f, mu0, 1.0, compile=compile, **kw).sum().backward()

    def cem_f(compile: bool = False) -> None:
        dcem.cem(f, mu0, 1.0, compile=compile, **kw)

    def noise() -> None:
        for _ in range(T):
            torch.randn(batch, N, d, generator=gen)

    return dcem_fb, cem_f, noise


def timed_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds that run each once."""
    for fn in fns.values():
        fn()  # warm-up (and the compile, for compiled callables)
    rounds = [{name: timed_once(fn) for name, fn in fns.items()} for _ in range(repeats)]
    return {name: statistics.median(r[name] for r in rounds) for name in fns}


def bench_size(batch: int, d: int, repeats: int, compiled: bool) -> dict:
    """Eager (and compiled, when ``compiled``) DCEM/CEM against the baseline and floors."""
    dcem_fb, cem_f, noise = problem(batch, d)
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(batch, d, generator=gen).requires_grad_()
    f = quadratic(p)
    samples = [torch.randn(batch, N, d, generator=gen) for _ in range(T)]
    ones, zeros = torch.ones(batch, d), torch.zeros(batch, d)

    def base_cem() -> None:
        with torch.no_grad():
            baseline(f, zeros, ones, soft=False)

    def f_fwd() -> None:  # the cost alone on T sample sets, as CEM calls it
        with torch.no_grad():
            for x in samples:
                f(x)

    def f_fwd_bwd() -> None:
        for x in samples:
            torch.autograd.grad(f(x.requires_grad_()).sum(), (x, p))

    fns: dict[str, Callable[[], object]] = {
        "noise_floor_s": noise,
        "f_fwd_s": f_fwd,
        "f_fwd_bwd_s": f_fwd_bwd,
        "dcem_fwd_bwd_s": dcem_fb,
        "cem_fwd_s": cem_f,
        "baseline_dcem_fwd_bwd_s": lambda: baseline(f, zeros, ones, soft=True).sum().backward(),
        "baseline_cem_fwd_s": base_cem,
    }
    first: dict[str, float] = {}
    if compiled:  # the first compiled calls compile: timed alone, before the rounds
        first = {
            "dcem_first_call_s": timed_once(lambda: dcem_fb(True)),
            "cem_first_call_s": timed_once(lambda: cem_f(True)),
        }
        fns["compiled_dcem_fwd_bwd_s"] = lambda: dcem_fb(True)
        fns["compiled_cem_fwd_s"] = lambda: cem_f(True)
    t = paired(fns, repeats)
    row: dict = {"B": batch, "d": d, "N": N, "k": K, "T": T, **t}
    floor = t["noise_floor_s"]
    for name in ("f_fwd", "f_fwd_bwd"):
        row[f"{name}_over_floor"] = t[f"{name}_s"] / floor
    for mode in ("", "compiled_") if compiled else ("",):
        for solver, what in (("dcem", "fwd_bwd"), ("cem", "fwd")):
            own = t[f"{mode}{solver}_{what}_s"]
            row[f"{mode}{solver}_over_floor"] = own / floor
            row[f"{mode}{solver}_speedup_vs_baseline"] = t[f"baseline_{solver}_{what}_s"] / own
    if compiled:
        row["compile"] = {
            **first,
            "dcem_compile_s": first["dcem_first_call_s"] - t["compiled_dcem_fwd_bwd_s"],
            "cem_compile_s": first["cem_first_call_s"] - t["compiled_cem_fwd_s"],
        }
    return row


def new_batch_size(batch: int, d: int, repeats: int) -> dict:
    """The first compiled DCEM call at a batch size not seen before, after ``bench_size``
    compiled another: its time, the steady time at that size and whether it compiled."""
    from torch._dynamo.utils import counters

    dcem_fb, _, _ = problem(batch, d)
    graphs = counters["stats"]["unique_graphs"]
    first = timed_once(lambda: dcem_fb(True))
    recompiled = counters["stats"]["unique_graphs"] > graphs
    steady = paired({"s": lambda: dcem_fb(True)}, repeats)["s"]
    return {"B": batch, "d": d, "first_call_s": first, "steady_s": steady,
            "recompiled": recompiled}  # fmt: skip


def warm_cache_probe(batch: int, d: int) -> dict:
    """In a fresh process (``--probe``): the first compiled DCEM and CEM calls, with the
    compile cache the parent run left."""
    dcem_fb, cem_f, _ = problem(batch, d)
    return {
        "B": batch,
        "d": d,
        "dcem_first_call_s": timed_once(lambda: dcem_fb(True)),
        "cem_first_call_s": timed_once(lambda: cem_f(True)),
    }


def mlp_problem(batch: int, hidden: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(2, hidden), torch.nn.Softplus()]
    for _ in range(2):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.Softplus()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 1)).to(dtype)
    xs = torch.linspace(0, 2 * math.pi, batch, dtype=dtype).unsqueeze(-1)
    target = xs * torch.sin(xs)

    def f(y: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([xs.unsqueeze(1).expand(-1, y.shape[1], -1), y], -1)
        return net(inp).squeeze(-1)

    return net, f, torch.zeros(batch, 1, dtype=dtype), target


def bench_mlp(batch: int, hidden: int, repeats: int) -> dict:
    """Time outside f, and memory / gradient error of the backward modes (eager)."""
    net, f, y0, target = mlp_problem(batch, hidden)
    samples: list[torch.Tensor] = []

    def solve(mode: str, record: bool = False) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        cb = (lambda info: samples.append(info.samples)) if record else None
        out = dcem.dcem(
            f, y0, 7.0, n_sample=N, n_elite=K, n_iter=T, generator=gen, backward=mode, callback=cb
        )
        return ((out - target) ** 2).mean()

    def grad(mode: str) -> torch.Tensor:
        net.zero_grad()
        solve(mode).backward()
        return torch.cat([q.grad.flatten() for q in net.parameters()])

    solve("full", record=True)

    def f_only() -> None:  # f's own forward and backward on the same samples
        for x in samples:
            f(x.requires_grad_()).sum().backward()

    # Paired: the share is taken per round, so a load change moves both numbers of a round.
    rounds = [
        (median_time(lambda: solve("full").backward(), 1, 0), median_time(f_only, 1, 0))
        for _ in range(repeats + 1)
    ][1:]  # the first round warms up
    share = statistics.median(max(0.0, (t - i) / t) for t, i in rounds)
    g_full = grad("full")
    modes = {}
    for mode in ["full", "checkpoint", "pruned"]:
        g = grad(mode)
        modes[mode] = {
            "peak_bytes": peak_memory_bytes(lambda mode=mode: solve(mode).backward()),
            "grad_rel_error": float((g - g_full).norm() / g_full.norm()),
            "fwd_bwd_s": median_time(
                lambda mode=mode: solve(mode).backward(), max(3, repeats // 2)
            ),
        }
    for mode in modes.values():
        mode["peak_vs_full"] = mode["peak_bytes"] / modes["full"]["peak_bytes"]
    return {
        "B": batch,
        "hidden": hidden,
        "dcem_fwd_bwd_s": statistics.median(t for t, _ in rounds),
        "f_fwd_bwd_s": statistics.median(i for _, i in rounds),
        "share_outside_f": share,
        "backward_modes": modes,
        "pruned_n_keep": 3 * K,
        "pruned_n_anchor": K,
    }


def targets(rows: list[dict]) -> dict:
    """The speedups over the baseline that the library's default (eager) and compile=True
    reach at the target sizes, with the target (absent sizes are left out)."""
    out = {}
    for r in rows:
        for solver in ("dcem", "cem"):
            name = f"{solver}_{r['B']}x{r['d']}"
            if name in TARGETS:
                out[name] = {
                    "target": TARGETS[name],
                    "eager_default": r[f"{solver}_speedup_vs_baseline"],
                    "compiled": r.get(f"compiled_{solver}_speedup_vs_baseline"),
                }
    return out


def print_summary(rows: list[dict], mlp: dict) -> None:
    for r in rows:
        text = f"(B={r['B']:4d}, d={r['d']:2d}) floor {r['noise_floor_s'] * 1e3:8.2f} ms"
        for mode in ("", "compiled_"):
            if f"{mode}dcem_fwd_bwd_s" in r:
                text += (
                    f" | {mode or 'eager_'}dcem {r[f'{mode}dcem_fwd_bwd_s'] * 1e3:8.2f} ms"
                    f" {r[f'{mode}dcem_speedup_vs_baseline']:4.1f}x base,"
                    f" cem {r[f'{mode}cem_fwd_s'] * 1e3:8.2f} ms"
                    f" {r[f'{mode}cem_speedup_vs_baseline']:4.1f}x base"
                )
        print(text, file=sys.stderr)
        if "compile" in r:
            c = r["compile"]
            print(f"  compile: dcem {c['dcem_compile_s']:.1f} s, cem {c['cem_compile_s']:.1f} s",
                  file=sys.stderr)  # fmt: skip
    print(f"MLP cost: {100 * mlp['share_outside_f']:.1f}% of DCEM time outside f", file=sys.stderr)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=["inductor", "aot_eager"], default=None,
        help="torch.compile backend of the compiled runs (default inductor; aot_eager with --tiny)",
    )  # fmt: skip
    parser.add_argument("--probe", nargs=2, type=int, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, repeats=10, tiny_repeats=3, extra=options)
    args.backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    dcem.optim._BACKEND = args.backend  # what compile=True uses
    if args.probe:  # the fresh process of the warm-cache measurement
        print(json.dumps(warm_cache_probe(*args.probe)))
        return {}
    load = os.getloadavg()
    sizes = TINY_SIZES if args.tiny else SIZES
    with tempfile.TemporaryDirectory(prefix="dcem-bench-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # compile from an empty cache
        rows = [
            bench_size(b, d, args.repeats, compiled=not args.tiny or (b, d) == sizes[-1])
            for b, d in sizes
        ]
        big = sizes[-1]
        fresh = new_batch_size(big[0] // 2, big[1], args.repeats)
        command = [sys.executable, __file__, "--probe", str(big[0]), str(big[1]),
                   "--threads", str(args.threads), "--backend", args.backend]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"the warm-cache probe failed:\n{done.stderr[-2000:]}")
        warm = json.loads(done.stdout.strip().splitlines()[-1])
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    mlp = bench_mlp(8, 16, args.repeats) if args.tiny else bench_mlp(100, 128, args.repeats)
    print_summary(rows, mlp)
    return write_result(
        "optim", rows, args.out, device="cpu", dtype="float32", default="eager",
        compile_backend=args.backend,
        load_average_1min={"start": load[0], "end": os.getloadavg()[0]},
        targets=targets(rows), new_batch_size=fresh, warm_cache_process=warm, mlp=mlp,
    )  # fmt: skip


if __name__ == "__main__":
    main()
