"""Benchmark of the PlaNet agent's two costs per episode, acting and learning, with 1 and with
more torch threads; JSON out.

One *decision* is ``Agent.act`` (filter the belief, then CEM in the model: by default the CPU
planner of ``dcem dmc train``, 300 candidates, 30 elites, 8 iterations, horizon 12, prior
mean); one *update* is ``Agent.update(1)`` (a 50 x 50 replay batch through PlaNet's bound, its
backward and an Adam step), both at PlaNet's model sizes on cheetah's observation (17) and
action (6) sizes, eager. An episode of ``dcem dmc train --task cheetah-run`` is 250 decisions
and 100 updates, so ``episode_s = 250 decision_s + 100 update_s`` (physics is below 1%).
For each thread count the best of ``repeats`` timings is kept; ``speedup`` is the time with
one thread over the time with ``threads``.

Usage: ``python benchmarks/agent.py --out benchmarks/out/agent.json [--tiny] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dcem.world import Agent, AgentConfig


@dataclass(frozen=True)
class Config:
    obs_size: int = 17
    action_size: int = 6
    episode_rows: int = 251
    episodes: int = 5
    repeats: int = 5
    decisions_per_episode: int = 250
    updates_per_episode: int = 100


TINY = Config(episode_rows=12, episodes=2, repeats=2)
TINY_AGENT = AgentConfig(deter_size=16, stoch_size=4, hidden_size=16, batch_size=4, seq_len=8,
                         horizon=3, plan_samples=20, plan_elites=4, plan_iter=2)  # fmt: skip


def _agent(c: Config, cfg: AgentConfig) -> Agent:
    agent = Agent(cfg, c.obs_size, c.action_size, -np.ones(c.action_size),
                  np.ones(c.action_size), model_seed=0)  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(c.episodes):
        agent.replay.add_episode(
            rng.normal(size=(c.episode_rows, c.obs_size)).astype(np.float32),
            rng.uniform(-1, 1, (c.episode_rows - 1, c.action_size)).astype(np.float32),
            rng.normal(size=c.episode_rows - 1).astype(np.float32),
        )
    return agent


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(c: Config, cfg: AgentConfig, threads: int) -> dict:
    torch.set_num_threads(threads)
    agent = _agent(c, cfg)
    belief = agent.model.initial_state((1,))
    obs = np.zeros(c.obs_size, np.float32)
    g = torch.Generator().manual_seed(0)
    decision = _best(lambda: agent.act(belief, torch.zeros(c.action_size), obs, explore=True,
                                       generator=g), c.repeats)  # fmt: skip
    update = _best(lambda: agent.update(1), c.repeats)
    episode = c.decisions_per_episode * decision + c.updates_per_episode * update
    return {"threads": threads, "decision_s": decision, "update_s": update, "episode_s": episode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="test-sized run")
    parser.add_argument("--threads", type=int, default=2, help="threads to compare with 1")
    args = parser.parse_args(argv)
    c, cfg = (TINY, TINY_AGENT) if args.tiny else (Config(), AgentConfig())
    one = measure(c, cfg, 1)
    many = measure(c, cfg, args.threads)
    report = {
        "benchmark": "agent", "torch": torch.__version__, "machine": platform.machine(),
        "python": sys.version.split()[0], "config": asdict(c),
        "agent": asdict(cfg), "results": [one, many],
        "speedup_decision": one["decision_s"] / many["decision_s"],
        "speedup_update": one["update_s"] / many["update_s"],
        "speedup_episode": one["episode_s"] / many["episode_s"],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in (one, many):
        print(f"{r['threads']} thread(s): decision {r['decision_s'] * 1e3:.1f} ms, update "
              f"{r['update_s'] * 1e3:.1f} ms, episode {r['episode_s']:.1f} s")  # fmt: skip
    print(
        f"speedup with {args.threads} threads: decision {report['speedup_decision']:.2f}x, "
        f"update {report['speedup_update']:.2f}x, episode {report['speedup_episode']:.2f}x"
    )


if __name__ == "__main__":
    main()
