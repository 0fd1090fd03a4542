"""Smoke test of benchmarks/phase2.py (the phase-2 decoder update per backward mode), tiny size."""

from __future__ import annotations

from conftest import run_benchmark

MODES = ("full", "checkpoint", "pruned")
KEYS = {"batch", "backward", "s_per_update", "peak_bytes", "cost", "time_ratio_vs_full",
        "memory_ratio_vs_full", "grad_rel_error_vs_full", "grad_bit_identical",
        "cost_vs_full"}  # fmt: skip


def test_phase2_benchmark_tiny(tmp_path):
    result = run_benchmark("phase2", tmp_path, timeout=120)
    assert result["tiny"] is True and result["threads"] == 1 and result["skipped"] == []
    batches = result["config"]["cpu_batches"]
    rows = {(r["batch"], r["backward"]): r for r in result["results"]}
    assert set(rows) == {(b, m) for b in batches for m in MODES}
    for (batch, mode), r in rows.items():
        assert set(r) == KEYS, (batch, mode)
        assert r["s_per_update"] > 0 and r["peak_bytes"] > 0
        full = rows[batch, "full"]
        assert r["time_ratio_vs_full"] == r["s_per_update"] / full["s_per_update"]
        assert r["memory_ratio_vs_full"] == r["peak_bytes"] / full["peak_bytes"]
        # checkpointing recomputes the same operations: the same gradient, bit for bit
        if mode == "checkpoint":
            assert r["grad_bit_identical"] and r["grad_rel_error_vs_full"] == 0.0
            assert r["cost_vs_full"] == 0.0
    # pruned approximates: a nonzero but bounded error (about 0.1-0.2 at these sizes)
    assert all(0 < rows[b, "pruned"]["grad_rel_error_vs_full"] < 1 for b in batches)
    # At the largest tiny batch the T = 3 iteration graphs of full dominate (5.3 MiB against
    # 1.8 MiB for checkpoint, same every run: the profiler's accounting is deterministic).
    largest = max(batches)
    assert rows[largest, "checkpoint"]["peak_bytes"] < 0.6 * rows[largest, "full"]["peak_bytes"]
