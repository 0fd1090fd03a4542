"""Benchmark of ``dcem.lml`` forward+backward against an elementwise pass and a reference solver.

Each time is the median of repeated runs and is also given as a ratio to one
elementwise pass over the same input (``torch.sigmoid(x).sum(-1)``), so that
figures compare across machines. The baseline re-implements the public
reference's algorithm: a full sort, then a 10-point bracketing grid search on
the dual with tolerance 1e-4, and the same closed-form backward.

Usage: python benchmarks/lml.py [--out PATH] [--tiny] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dcem

SIZES = [(1, 100, 10), (100, 100, 10), (1000, 100, 10), (1000, 1000, 100)]
TINY_SIZES = [(1, 100, 10), (8, 100, 10)]


def reference_lml(x: torch.Tensor, k: int, eps: float = 1e-4, branch: int = 10) -> torch.Tensor:
    """Sort + 10-point bracketing search on the dual (the public reference's algorithm)."""
    x_sorted = x.sort(dim=-1, descending=True).values
    lower = -x_sorted[:, k - 1] - 7.0
    upper = -x_sorted[:, k] + 7.0
    grid = torch.linspace(0, 1, branch, dtype=x.dtype, device=x.device)
    for _ in range(100):
        width = upper - lower
        active = width > eps
        if not bool(active.any()):
            break
        nus = width[active].unsqueeze(1) * grid + lower[active].unsqueeze(1)
        fs = torch.sigmoid(x[active].unsqueeze(1) + nus.unsqueeze(2)).sum(-1) - k
        i_lo = ((fs < 0).sum(1) - 1).clamp(min=0).unsqueeze(1)
        lower[active] = nus.gather(1, i_lo).squeeze(1)
        upper[active] = nus.gather(1, i_lo + 1).squeeze(1)
    nu = 0.5 * (lower + upper)
    return torch.sigmoid(x + nu.unsqueeze(1))


class _ReferenceLML(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):  # type: ignore[override]
        y = reference_lml(x, k)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        h = 1.0 / (1.0 / y + 1.0 / (1.0 - y))
        dnu = (h * grad).sum(-1, keepdim=True) / h.sum(-1, keepdim=True)
        return h * (grad - dnu), None


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def bench_size(batch: int, n: int, k: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, generator=gen)
    grad = torch.randn(batch, n, generator=gen)

    def ours() -> None:
        xr = x.detach().requires_grad_()
        dcem.lml(xr, k, 1.0).backward(grad)

    def reference() -> None:
        xr = x.detach().requires_grad_()
        _ReferenceLML.apply(xr, k).backward(grad)

    elementwise = median_time(lambda: torch.sigmoid(x).sum(-1), repeats)
    t_ours = median_time(ours, repeats)
    t_ref = median_time(reference, max(3, repeats // 4))
    y = dcem.lml(x, k, 1.0)
    return {
        "batch": batch,
        "n": n,
        "k": k,
        "elementwise_s": elementwise,
        "lml_fwd_bwd_s": t_ours,
        "lml_in_elementwise_passes": t_ours / elementwise,
        "reference_fwd_bwd_s": t_ref,
        "reference_in_elementwise_passes": t_ref / elementwise,
        "speedup_vs_reference": t_ref / t_ours,
        "max_constraint_error": float((y.sum(-1) - k).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="small sizes (for the test suite)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per size")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.tiny else 50)
    rows = [bench_size(b, n, k, repeats) for b, n, k in (TINY_SIZES if args.tiny else SIZES)]
    result = {
        "benchmark": "lml",
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": rows,
    }
    for r in rows:
        size = f"(B={r['batch']:5d}, n={r['n']:5d}, k={r['k']:4d})"
        ours = (
            f"lml {r['lml_fwd_bwd_s'] * 1e6:9.1f} us = {r['lml_in_elementwise_passes']:5.1f} passes"
        )
        ref = f"reference {r['reference_fwd_bwd_s'] * 1e6:9.1f} us"
        print(
            f"{size}  {ours} | {ref} | speedup {r['speedup_vs_reference']:5.1f}x", file=sys.stderr
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
