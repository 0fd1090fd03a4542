"""Shared helpers of the benchmarks: timing, peak memory, the reference LML solver, JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def parse_args(
    description: str,
    argv: list[str] | None,
    repeats: int,
    tiny_repeats: int,
    extra: Callable[[argparse.ArgumentParser], object] | None = None,
):
    """The options every benchmark takes (``extra`` adds a benchmark's own); sets the torch
    thread count and the repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="small sizes (for the test suite)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is robust on shared machines)"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (tiny_repeats if args.tiny else repeats)
    return args


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by PyTorch while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak. CPU: replayed from the profiler's
    allocation and free records in time order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's own allocations minus frees, at its start time (so a transient
    # allocated and freed inside one operator is not seen: a slight underestimate).
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


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


class ReferenceLML(torch.autograd.Function):
    """The reference projection with its closed-form backward; ``eps`` is the bracket width
    at which the search stops (the reference LML's default 1e-4; its dcem passes 1e-3)."""

    @staticmethod
    def forward(ctx, x, k, eps=1e-4):  # type: ignore[override]
        y = reference_lml(x, k, eps)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        h = 1.0 / (1.0 / y + 1.0 / (1.0 - y))
        dnu = (h * grad).sum(-1, keepdim=True) / h.sum(-1, keepdim=True)
        return h * (grad - dnu), None, None


def write_result(name: str, rows: list[dict], out: Path | None, **extra: object) -> dict:
    """Print and optionally write the benchmark's JSON (with the machine it ran on)."""
    result = {
        "benchmark": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        **extra,
        "results": rows,
    }
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    else:
        print(text)
    return result
