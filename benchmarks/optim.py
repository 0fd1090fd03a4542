"""Benchmark of dcem.dcem / dcem.cem against the noise floor and a reference-style baseline.

Measured side by side in one run:
- DCEM forward+backward and CEM forward on a cheap quadratic cost at
  (B, d) in {(1, 2), (64, 32), (1024, 32)}, N=100, k=10, T=10;
- the noise floor: T draws of B*N*d standard normals, which no implementation avoids;
- a baseline written the reference way (torch.distributions sampling, sort-and-bracket
  LML stopped at the reference dcem's lml_eps = 1e-3, argsort and Python loops over batch
  and elites for hard top-k, autograd through all);
- the share of DCEM's time spent outside f for the regression MLP cost (2-128-128-128-1
  Softplus, B=100, d=1);
- peak memory and gradient error of the backward modes full / checkpoint / pruned.

Usage: python benchmarks/optim.py [--out PATH] [--tiny]
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys

import torch
from torch.distributions import Normal

import dcem
from common import ReferenceLML, median_time, parse_args, peak_memory_bytes, write_result
from dcem import _native

N, K, T = 100, 10, 10
SIZES = [(1, 2), (64, 32), (1024, 32)]
TINY_SIZES = [(1, 2), (8, 4)]


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
    """The benchmark's cost ``0.5 x'x + p'x``, written with ``mse_loss``: usually the
    cheapest of :func:`cost_forms` forward and backward (the JSON's
    ``cost_forms_fwd_bwd_over_floor`` times each form alone; ``f_*_over_floor`` give the
    cost's share of the times)."""
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


def bench_quadratic(batch: int, d: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(batch, d, generator=gen).requires_grad_()
    mu0 = torch.zeros(batch, d)
    f = quadratic(p)

    def dcem_fb() -> None:
        dcem.dcem(f, mu0, 1.0, n_sample=N, n_elite=K, n_iter=T, generator=gen).sum().backward()

    def cem_f() -> None:
        dcem.cem(f, mu0, 1.0, n_sample=N, n_elite=K, n_iter=T, generator=gen)

    def base_dcem() -> None:
        baseline(f, mu0, torch.ones(batch, d), soft=True).sum().backward()

    def base_cem() -> None:
        with torch.no_grad():
            baseline(f, mu0, torch.ones(batch, d), soft=False)

    def noise() -> None:
        for _ in range(T):
            torch.randn(batch, N, d, generator=gen)

    samples = [torch.randn(batch, N, d, generator=gen) for _ in range(T)]

    def f_fwd() -> None:  # the cost alone on T sample sets, as CEM calls it
        with torch.no_grad():
            for x in samples:
                f(x)

    def cost_alone(f) -> float:
        def run() -> None:
            for x in samples:
                torch.autograd.grad(f(x.requires_grad_()).sum(), (x, p))

        return median_time(run, repeats) / floor

    floor = median_time(noise, repeats)
    forms = {name: cost_alone(form) for name, form in cost_forms(p).items()}
    times = {
        "f_fwd_s": median_time(f_fwd, repeats),
        "f_fwd_bwd_s": forms["mse_loss"] * floor,
        "dcem_fwd_bwd_s": median_time(dcem_fb, repeats),
        "cem_fwd_s": median_time(cem_f, repeats),
        "baseline_dcem_fwd_bwd_s": median_time(base_dcem, max(3, repeats // 2)),
        "baseline_cem_fwd_s": median_time(base_cem, max(3, repeats // 2)),
    }
    return {
        "B": batch,
        "d": d,
        "N": N,
        "k": K,
        "T": T,
        "noise_floor_s": floor,
        **times,
        "dcem_over_floor": times["dcem_fwd_bwd_s"] / floor,
        "cem_over_floor": times["cem_fwd_s"] / floor,
        "f_fwd_over_floor": times["f_fwd_s"] / floor,
        "f_fwd_bwd_over_floor": times["f_fwd_bwd_s"] / floor,
        "cost_forms_fwd_bwd_over_floor": forms,
        "dcem_speedup_vs_baseline": times["baseline_dcem_fwd_bwd_s"] / times["dcem_fwd_bwd_s"],
        "cem_speedup_vs_baseline": times["baseline_cem_fwd_s"] / times["cem_fwd_s"],
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
    """Time outside f, and memory / gradient error of the backward modes."""
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

    # Paired: each round times DCEM and then f alone, and the share is taken per round, so
    # a load change on a shared machine moves both numbers of a round together.
    rounds = [
        (median_time(lambda: solve("full").backward(), 1, 0), median_time(f_only, 1, 0))
        for _ in range(repeats + 1)
    ][1:]  # the first round warms up
    total = statistics.median(t for t, _ in rounds)
    inside = statistics.median(i for _, i in rounds)
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
        "dcem_fwd_bwd_s": total,
        "f_fwd_bwd_s": inside,
        "share_outside_f": share,
        "backward_modes": modes,
        "pruned_n_keep": 3 * K,
        "pruned_n_anchor": K,
    }


def bench_parts(batch: int, d: int, repeats: int) -> dict:
    """The library's own hot pieces against the plain way, side by side at (B, N, d):
    CEM's elite selection, the standardization's std, a single row's soft top-k solve,
    and the three passes over the noise in C loops vs PyTorch blocks (times in seconds;
    C entries only where the loops could be built). Each call repeats 20 times."""
    optim, lml = importlib.import_module("dcem.optim"), importlib.import_module("dcem.lml")
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(batch, N, generator=gen)
    eps = torch.randn(batch, N, d, generator=gen)
    g = torch.randn(batch, N, d, generator=gen)
    w, g_a, g_q = torch.rand(batch, N), torch.randn(batch, d), torch.randn(batch, d)
    row = v[:1].numpy()

    def timed(fn) -> float:
        return median_time(lambda: [fn() for _ in range(20)], repeats) / 20

    parts = {
        "elites_topk_s": timed(lambda: v.topk(K, dim=-1, largest=False, sorted=False)),
        "elites_lowest_s": timed(lambda: optim._lowest(v, K)),
        "std_torch_std_mean_s": timed(lambda: torch.std_mean(v, dim=-1, keepdim=True)),
        "std_two_pass_s": timed(lambda: optim._std_mean(v)),
        "lml_row_batched_form_s": timed(lambda: lml._stage1_batched(row, K, N, 4)),
        "lml_row_scalar_form_s": timed(lambda: lml._stage1_row(row, K, N, 4)),
    }
    passes = {
        "moments": lambda: optim._noise_moments(w, eps),
        "moments_vjp": lambda: optim._noise_moments_vjp(eps, g_a, g_q),
        "sample_vjp": lambda: optim._sample_sums(g, eps),
    }
    library = _native.library
    for name, fn in passes.items():
        if library() is not None:
            parts[f"{name}_c_s"] = timed(fn)
        _native.library = lambda: None  # the PyTorch blocks
        try:
            parts[f"{name}_blocks_s"] = timed(fn)
        finally:
            _native.library = library
    return {"B": batch, "N": N, "d": d, **parts}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, repeats=10, tiny_repeats=3)
    repeats = args.repeats
    rows = [bench_quadratic(b, d, repeats) for b, d in (TINY_SIZES if args.tiny else SIZES)]
    mlp = bench_mlp(8, 16, repeats) if args.tiny else bench_mlp(100, 128, repeats)
    parts = bench_parts(*(TINY_SIZES[-1] if args.tiny else SIZES[-1]), repeats)
    for r in rows:
        print(
            f"(B={r['B']:4d}, d={r['d']:2d}) dcem {r['dcem_fwd_bwd_s'] * 1e3:8.2f} ms"
            f" = {r['dcem_over_floor']:5.2f}x floor, {r['dcem_speedup_vs_baseline']:5.1f}x faster"
            f" than baseline | cem {r['cem_fwd_s'] * 1e3:8.2f} ms = {r['cem_over_floor']:5.2f}x"
            f" floor, {r['cem_speedup_vs_baseline']:5.1f}x faster | f alone"
            f" {r['f_fwd_over_floor']:.2f}x (fwd), {r['f_fwd_bwd_over_floor']:.2f}x (fwd+bwd)",
            file=sys.stderr,
        )
    print(f"MLP cost: {100 * mlp['share_outside_f']:.1f}% of DCEM time outside f", file=sys.stderr)
    for name, m in mlp["backward_modes"].items():
        peak = f"peak {m['peak_bytes'] / 2**20:8.1f} MiB ({m['peak_vs_full']:.2f} of full)"
        print(f"  {name:10s} {peak}, grad error {m['grad_rel_error']:.2e}", file=sys.stderr)
    native = _native.library() is not None  # the C loops, or PyTorch blocks (DCEM_NATIVE=0)
    print(f"C loops over the noise: {'yes' if native else 'no (PyTorch blocks)'}", file=sys.stderr)
    return write_result(
        "optim", rows, args.out, mlp=mlp, device="cpu", dtype="float32",
        keep_freed_memory=args.keep_freed_memory, native_loops=native, parts=parts,
    )  # fmt: skip


if __name__ == "__main__":
    main()
