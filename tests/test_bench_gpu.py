"""Smoke test of benchmarks/bench_gpu.py at small sizes on the CPU (the GPU run is done on a GPU machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_bench_gpu_runs_on_cpu_at_small_sizes_and_writes_its_json(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_gpu.main(["--device", "cpu", "--small", "--out", str(tmp_path / "gpu.json"),
                               "--workdir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "gpu.json").read_text())
    pop, meta = out["population"], out["meta"]
    assert out["device"] == "cpu" and pop["stacked"]["K"] == 8 and not pop["stacked"]["failed"]
    assert pop["one_at_a_time"]["timed_models"] == 2 and pop["one_at_a_time"]["sequential_extrapolated"]
    assert 0 < pop["recording_share_of_wall"] < 1 and pop["speedup_stacked_vs_one_at_a_time"] > 0
    assert meta["steps_timed"] == 3 and meta["steps_per_second"] > 0 and meta["flops_per_step"] > 0
    assert "ratio_vs_cpu_2_core" not in pop  # small sizes are not the reference recipe
    assert set(out["goals"]) == {"stacked_vs_one_at_a_time_ge_50x", "recording_share_le_15pct"}
