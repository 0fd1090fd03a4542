"""Benchmark of ``dcem.lml`` forward+backward against an elementwise pass and a reference solver.

Each time is the median of repeated runs and is also given as a ratio to one
elementwise pass over the same input (``torch.sigmoid(x).sum(-1)``), so that
figures compare across machines. The baseline re-implements the public
reference's algorithm: a full sort, then a 10-point bracketing grid search on
the dual with tolerance 1e-4, and the same closed-form backward.

Usage: python benchmarks/lml.py [--out PATH] [--tiny] [--repeats R]
"""

from __future__ import annotations

import sys

import torch

import dcem
from common import ReferenceLML, median_time, parse_args, write_result

SIZES = [(1, 100, 10), (100, 100, 10), (1000, 100, 10), (1000, 1000, 100)]
TINY_SIZES = [(1, 100, 10), (8, 100, 10)]


def bench_size(batch: int, n: int, k: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, generator=gen)
    grad = torch.randn(batch, n, generator=gen)

    def ours() -> None:
        xr = x.detach().requires_grad_()
        dcem.lml(xr, k, 1.0).backward(grad)

    def reference() -> None:
        xr = x.detach().requires_grad_()
        ReferenceLML.apply(xr, k).backward(grad)

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
    args = parse_args(__doc__.splitlines()[0], argv, repeats=50, tiny_repeats=5)
    repeats = args.repeats
    rows = [bench_size(b, n, k, repeats) for b, n, k in (TINY_SIZES if args.tiny else SIZES)]
    result = write_result("lml", rows, args.out, dtype="float32", device="cpu")
    for r in rows:
        size = f"(B={r['batch']:5d}, n={r['n']:5d}, k={r['k']:4d})"
        ours = (
            f"lml {r['lml_fwd_bwd_s'] * 1e6:9.1f} us = {r['lml_in_elementwise_passes']:5.1f} passes"
        )
        ref = f"reference {r['reference_fwd_bwd_s'] * 1e6:9.1f} us"
        print(
            f"{size}  {ours} | {ref} | speedup {r['speedup_vs_reference']:5.1f}x", file=sys.stderr
        )
    return result


if __name__ == "__main__":
    main()
