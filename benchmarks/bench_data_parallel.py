"""The shared meta-model's data parallelism: ``DistributedDataParallel`` against ``SharedGradients``
(one flat all-reduce before the optimizer step, ``meta/ray_train.py``), step time and start cost.

Two gloo processes on this machine (``torch.multiprocessing``, no Ray: only the all-reduce differs),
each a ``DynamoTrainer`` on its shard of a recorded population with the demo recipe's meta settings,
one intra-op thread each. Per round and mode: ``--steps`` steps, the median step time of each rank
after ``--warmup`` steps, and the seconds the wrapper's construction took (DDP's imports
``torch._dynamo``). Modes alternate within each round (these machines drift); JSON in
``benchmarks/results/``.

    python benchmarks/bench_data_parallel.py --population runs/demo/population --rounds 3 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, mode: str, population: str, steps: int, warmup: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from dynamo_dist import config
    from dynamo_dist.data import store
    from dynamo_dist.meta.ray_train import SharedGradients, assign_shards
    from dynamo_dist.meta.trainer import DynamoTrainer, load_population

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = store.manifest_rows(population)
    shard = assign_shards([r["model_id"] for r in rows], world)[rank]
    cfg = config.recipe("demo").meta.replace(output_dir=tempfile.mkdtemp(), steps=steps, num_workers=world)
    trainer = DynamoTrainer(cfg, load_population(population, shard, manifest=rows), rows, rank)
    t = time.perf_counter()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        trainer.forward_module = DistributedDataParallel(trainer.meta)
    else:
        trainer.opt_meta.register_step_pre_hook(SharedGradients(trainer.meta, world))
    wrap_seconds = time.perf_counter() - t
    dist.barrier()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    dist.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps({"median_ms": 1000 * statistics.median(times[warmup:]),
                                                     "wrap_seconds": wrap_seconds}))
    dist.destroy_process_group()


def _one(mode: str, a) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, mode, a.population, a.steps, a.warmup, _free_port(), out), nprocs=2)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(2)]
    return {"step_ms": max(r["median_ms"] for r in ranks), "wrap_seconds": max(r["wrap_seconds"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", default="runs/demo/population")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "data_parallel.json"))
    a = ap.parse_args()
    rounds = []
    for i in range(a.rounds):
        order = ("ddp", "shared") if i % 2 == 0 else ("shared", "ddp")
        rounds.append({m: _one(m, a) for m in order})
        print(json.dumps(rounds[-1]), flush=True)
    summary = {m: {k: statistics.median(r[m][k] for r in rounds) for k in ("step_ms", "wrap_seconds")}
               for m in ("ddp", "shared")}
    summary["step_ratio_ddp_over_shared"] = summary["ddp"]["step_ms"] / summary["shared"]["step_ms"]
    doc = {"what": "demo meta step (2 gloo processes, 1 thread each): DistributedDataParallel vs SharedGradients",
           "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "summary": summary, "rounds": rounds}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
