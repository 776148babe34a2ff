"""The meta GRU's forward + backward pass: ``nn.GRU`` against the hand-written pass of ``meta/gru.py``.

One intra-op thread (as each Ray Train worker runs on these machines), the meta-model's shapes: a
batch of B sequences of T steps, D input features plus theta (E), H units, a loss reading every
state. The variants run interleaved, ``--rounds`` rounds of ``--reps`` passes each, and the median
of the rounds is reported (the machine is shared and noisy). JSON in ``benchmarks/results/``.

    python benchmarks/bench_gru.py --out gru.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from dynamo_dist.meta.gru import gru_sequence

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (B, T, D, E, H)
    "demo (4 models x 32 sequences, hidden 128)": (128, 40, 1, 8, 128),
    "population-1000 (8 models x 32 sequences, hidden 96)": (256, 40, 1, 8, 96),
}


def _module(cell, u, theta, gain):
    return cell(torch.cat([u, theta[:, None, :].expand(-1, u.shape[1], -1)], dim=-1))[0]


def _fused(cell, u, theta, gain):
    return gru_sequence(cell, u, theta)


def _fused_gain(cell, u, theta, gain):
    return gru_sequence(cell, u, theta, gain)


VARIANTS = {"nn.GRU": _module, "hand-written": _fused, "hand-written + theta gain": _fused_gain}


def measure(shape: tuple, rounds: int, reps: int) -> dict:
    B, T, D, E, H = shape
    torch.manual_seed(0)
    cell = nn.GRU(D + E, H, batch_first=True)
    gain = nn.Parameter(0.1 * torch.randn(3 * H, E))
    u, theta = torch.randn(B, T, D), torch.randn(B, E, requires_grad=True)
    weight = torch.randn(B, T, H)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        for name, fn in VARIANTS.items():
            (fn(cell, u, theta, gain) * weight).sum().backward()  # warm
            t = time.perf_counter()
            for _ in range(reps):
                (fn(cell, u, theta, gain) * weight).sum().backward()
            times[name].append((time.perf_counter() - t) / reps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": dict(zip("BTDEH", shape)), "ms_median": med, "ms_rounds": times,
            "speedup_vs_nn_gru": {k: med["nn.GRU"] / v for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="gru.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    doc = {"what": "meta GRU forward + backward, one thread: nn.GRU vs the hand-written pass (meta/gru.py)",
           "command": f"python benchmarks/bench_gru.py --rounds {a.rounds} --reps {a.reps} --out {a.out}",
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
           "results": {name: measure(shape, a.rounds, a.reps) for name, shape in SHAPES.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / a.out).write_text(json.dumps(doc, indent=1))
    for name, r in doc["results"].items():
        print(name, {k: f"{v:.1f} ms ({r['speedup_vs_nn_gru'][k]:.2f}x)" for k, v in r["ms_median"].items()})


if __name__ == "__main__":
    main()
