"""One trajectory read back: Parquet decode (``store.read_trajectory``) vs a spilled raw copy
(``data.cache.SpillRing.get``; ``SpillFiles`` in checkouts before it), on a synthetic population
written through the real store API (``bench_scale.write_population``: float16 GRU-shaped
trajectories). The two are interleaved over ``--repeats`` passes over every model (the machine's
load hits both alike); medians per model. ``put_ms``: writing one copy (the first pass), also paid
by every first read of a model in a meta worker with ``meta.spill_bytes``; ``*_cpu_ms``: the
process's CPU time for the same, what a step pays for it on a machine whose cores are busy.

    python benchmarks/bench_spill.py [--models 200] [--hidden 16] [--num-probe 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402

from dynamo_dist.data import store  # noqa: E402
from dynamo_dist.data import cache as cache_mod  # noqa: E402

Spill = getattr(cache_mod, "SpillRing", None) or cache_mod.SpillFiles

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--num-probe", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "spill_reads.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-spill-"))
    try:
        root = str(work / "pop")
        bench_scale.write_population(Path(root), args.models, args.hidden, args.num_probe, 32)
        ids = [r["model_id"] for r in store.manifest_rows(root)]
        spill = Spill(10 ** 12, str(work))
        trajs = {m: store.read_trajectory(root, m, "probe", dtype=None) for m in ids}
        t, c = time.perf_counter(), time.process_time()
        for m in ids:
            spill.put((m, "probe"), trajs[m])
        put, put_cpu = ((time.perf_counter() - t) / len(ids) * 1e3, (time.process_time() - c) / len(ids) * 1e3)
        del trajs
        decode, raw, decode_cpu, raw_cpu = [], [], [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            for m in ids:
                store.read_trajectory(root, m, "probe", dtype=None)
            decode.append((time.perf_counter() - t) / len(ids) * 1e3)
            decode_cpu.append((time.process_time() - c) / len(ids) * 1e3)
            t, c = time.perf_counter(), time.process_time()
            for m in ids:
                assert spill.get((m, "probe")) is not None
            raw.append((time.perf_counter() - t) / len(ids) * 1e3)
            raw_cpu.append((time.process_time() - c) / len(ids) * 1e3)
        one = store.read_trajectory(root, ids[0], "probe", dtype=None)
        nbytes = sum(h.numel() * h.element_size() for h in one.hiddens) + one.outputs.numel() * one.outputs.element_size()
        spill.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"what": "one trajectory read: Parquet decode vs spilled raw copy (ms per model, median of passes)",
           "command": "python benchmarks/bench_spill.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "decoded_bytes_per_model": nbytes, "models": args.models,
           "spill_class": Spill.__name__, "put_ms": put, "put_cpu_ms": put_cpu,
           "decode_ms": statistics.median(decode), "spill_ms": statistics.median(raw),
           "decode_cpu_ms": statistics.median(decode_cpu), "spill_cpu_ms": statistics.median(raw_cpu),
           "spill_over_decode": statistics.median(raw) / statistics.median(decode),
           "passes": {"decode_ms": decode, "spill_ms": raw}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("spill_class", "decoded_bytes_per_model", "put_ms", "put_cpu_ms", "decode_ms",
                                          "spill_ms", "decode_cpu_ms", "spill_cpu_ms", "spill_over_decode")}))


if __name__ == "__main__":
    main()
