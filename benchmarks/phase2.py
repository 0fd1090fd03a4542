"""Benchmark of the phase-2 decoder update (Algorithm 3 with DCEM) per backward mode; JSON out.

One *update* is the part of ``Agent.update_decoder`` (``dcem.experiments.dmc``) that depends
on the backward mode: ``dcem.world.latent_planning_cost`` on a decoder batch of ``B`` belief
states, then ``backward()``; nothing else (no posterior filtering, no gradient clipping, no
optimizer step, so every repeat computes the same update). Sizes are the paper's: RSSM with
GRU 200, stochastic 30, hidden layers 2 × 200, cheetah's 17-d observations and 6-d actions,
horizon 12; decoder from a 2-d latent box through 2 × 200 ELU units; DCEM with N = 100,
k = 10, T = 10, tau = 1. The belief states are posteriors of the model after filtering random
observation and action sequences.

For every ``B`` and backward mode (``full``, ``checkpoint``, ``pruned``; see ``dcem.dcem``):

* ``s_per_update``: median wall time of an update over ``--repeats`` runs (after one run that
  also records the gradient);
* ``peak_bytes``: peak memory of one update above what was allocated before it (CPU: replayed
  from the profiler's allocation records, which misses transients inside one operator; CUDA:
  ``torch.cuda.max_memory_allocated``); the decoder's ``.grad`` is unset before, so it counts;
* ``time_ratio_vs_full``, ``memory_ratio_vs_full``: the same quantity over full's at that B;
* ``grad_rel_error_vs_full``: ``||g - g_full|| / ||g_full||`` over all decoder parameters,
  with the same decoder, states and generator seed (hence the same DCEM and prior noise);
  ``grad_bit_identical`` says whether ``g == g_full`` exactly.

Batches: B in {4, 16, 64}. On CPU B = 64 is skipped unless asked for (``--batches 4 16 64``):
an update costs about 3 s at B = 4 and grows linearly in B on one core (about 12 s at 16, so
about 50 s at 64), each mode runs ``repeats + 2`` updates, and the full mode's graph at 64
holds several GB; the JSON lists skipped sizes under ``skipped``.

Usage: ``python benchmarks/phase2.py [--out PATH] [--tiny] [--threads N] [--repeats R]
[--device cpu|cuda] [--batches B ...]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common import median_time, peak_memory_bytes, write_result
from dcem.world import RSSM, ActionDecoder, State
from dcem.world.latent import latent_planning_cost

MODES = ("full", "checkpoint", "pruned")


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
    latent_dim: int = 2
    decoder_hidden: int = 200
    decoder_layers: int = 2
    n_sample: int = 100
    n_elite: int = 10
    n_iter: int = 10
    tau: float = 1.0
    filter_steps: int = 8
    batches: tuple[int, ...] = (4, 16, 64)
    cpu_batches: tuple[int, ...] = (4, 16)
    repeats: int = 3
    seed: int = 0


TINY = Config(obs_size=5, action_size=2, deter_size=16, stoch_size=4, hidden_size=16, horizon=3,
              decoder_hidden=16, n_sample=20, n_elite=4, n_iter=3, filter_steps=3,
              batches=(2, 8, 32), cpu_batches=(2, 8, 32), repeats=2)  # fmt: skip


def make_problem(c: Config, batch: int, device: torch.device) -> tuple[RSSM, ActionDecoder, State]:
    """World model, decoder and ``batch`` belief states (posteriors after random sequences)."""
    torch.manual_seed(c.seed)
    model = RSSM(c.obs_size, c.action_size, deter_size=c.deter_size, stoch_size=c.stoch_size,
                 hidden_size=c.hidden_size, n_layers=c.n_layers).to(device)  # fmt: skip
    decoder = ActionDecoder(c.latent_dim, c.action_size, horizon=c.horizon,
                            hidden=c.decoder_hidden, n_layers=c.decoder_layers)  # fmt: skip
    decoder = decoder.to(device)
    g = torch.Generator(device=device).manual_seed(c.seed)
    obs = torch.randn(c.filter_steps, batch, c.obs_size, generator=g, device=device)
    actions = torch.rand(c.filter_steps, batch, c.action_size, generator=g, device=device) * 2 - 1
    with torch.no_grad():
        post, _ = model.observe(obs, actions, generator=g)
    return model, decoder, State(*(x[-1] for x in post))


def bench_batch(c: Config, batch: int, device: torch.device) -> list[dict]:
    """Time, peak memory and decoder gradient of one update per backward mode at one B."""
    model, decoder, states = make_problem(c, batch, device)

    def update(mode: str) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(c.seed)
        cost = latent_planning_cost(model, decoder, states, n_sample=c.n_sample,
                                    n_elite=c.n_elite, n_iter=c.n_iter, tau=c.tau,
                                    generator=generator, backward=mode)  # fmt: skip
        cost.backward()
        return cost.detach()

    rows, grads = [], []
    for mode in MODES:
        decoder.zero_grad(set_to_none=True)
        cost = update(mode)  # also the warm-up
        grads.append(
            torch.cat([p.grad.flatten() for p in decoder.parameters() if p.grad is not None])
        )
        seconds = median_time(lambda mode=mode: update(mode), c.repeats, warmup=0)
        decoder.zero_grad(set_to_none=True)
        peak = peak_memory_bytes(lambda mode=mode: update(mode), device)
        rows.append({"batch": batch, "backward": mode, "s_per_update": seconds,
                     "peak_bytes": peak, "cost": float(cost)})  # fmt: skip
    full, full_grad = rows[0], grads[0]
    for row, grad in zip(rows, grads, strict=True):
        row["time_ratio_vs_full"] = row["s_per_update"] / full["s_per_update"]
        row["memory_ratio_vs_full"] = row["peak_bytes"] / full["peak_bytes"]
        row["grad_rel_error_vs_full"] = float((grad - full_grad).norm() / full_grad.norm())
        row["grad_bit_identical"] = bool(torch.equal(grad, full_grad))
        row["cost_vs_full"] = row["cost"] - full["cost"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="small sizes (for the test suite)")
    parser.add_argument("--repeats", type=int, default=None, help="timed updates per B and mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="decoder batches B (default: 4 16 on CPU, all on CUDA)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.batches is not None and min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    c = TINY if args.tiny else Config()
    if args.repeats is not None:
        c = replace(c, repeats=args.repeats)
    device = torch.device(args.device)
    default = c.cpu_batches if device.type == "cpu" else c.batches
    batches = sorted(set(args.batches or default))
    why = "not requested" if args.batches else f"slow on {device.type} (see the docstring)"
    skipped = [{"batch": b, "reason": f"{why}; --batches includes it"}
               for b in c.batches if b not in batches]  # fmt: skip
    rows = [row for b in batches for row in bench_batch(c, b, device)]
    for r in rows:
        print(f"B={r['batch']:3d} {r['backward']:>10}: {r['s_per_update']:8.3f} s "
              f"(x{r['time_ratio_vs_full']:.2f}), peak {r['peak_bytes'] / 2**20:9.1f} MiB "
              f"(x{r['memory_ratio_vs_full']:.3f}), grad error {r['grad_rel_error_vs_full']:.2e}",
              file=sys.stderr)  # fmt: skip
    return write_result(
        "phase2", rows, args.out, device=device.type, dtype="float32", tiny=args.tiny,
        config=asdict(c), skipped=skipped,
    )  # fmt: skip


if __name__ == "__main__":
    main()
