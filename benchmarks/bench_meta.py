"""Meta-stage benchmark; results go to benchmarks/results/meta.json.

One command measures, on one population and one MetaConfig (same steps, same per-worker
batch: ``models_per_step`` models x ``batch_size`` sequences per worker per step):

* ``plain``: the single-process ``DynamoTrainer.fit`` in this process, 1 torch thread;
* ``ray_w1``: the Ray Train job (``meta.ray_train.build_trainer``) with 1 worker;
* ``ray_w2``: the Ray Train job with 2 workers (1 CPU and 1 torch thread each, DDP/gloo).

Throughput is meta-model samples (probe sequences through forward + backward) per second
of training-loop time: the time the workers (or the plain loop) spend in training steps,
DDP all-reduce included; Ray's cluster start, worker start-up, data loading, evaluation
and checkpoint writes are excluded there and reported apart as end-to-end wall time.
2 workers process 2x the samples per step (data-parallel, per-worker batch fixed).
``samples_per_cpu_s_per_worker`` (rank 0's process CPU time in the same loop) is stored
beside it: it shows the per-sample compute overhead of Ray/DDP largely independent of
contention, but it is not a throughput; the goals are judged on wall-clock samples/s.

Goals: ray_w2 / ray_w1 >= 1.6; ray_w1 / plain >= 0.9. The machine is shared with other
engineers' test runs: the three runs are repeated ``--repeats`` times in interleaved order,
the best of each is compared (contention only ever slows a run down), and the 1-minute
load average before and after each run is stored so contaminated numbers can be spotted.

Priorities: Ray starts its workers at niceness 15 by default (``RAY_worker_niceness``),
which on a machine busy with other nice-0 jobs starves them against the plain trainer; the
benchmark sets it to 0 so all three runs get the same priority. The kernel here schedules
by autogroup (``/proc/sys/kernel/sched_autogroup_enabled``): CPU is shared fairly between
login sessions, so every concurrent session caps this one's share and plain ``nice`` has no
effect across sessions. ``--nice`` (default -15, needs root) sets this session's autogroup
niceness (and the process niceness) for the duration of the benchmark, restoring the
autogroup's afterwards, so the measurement sees the machine's two cores. The settings and
the load averages are stored in the JSON.

    python benchmarks/bench_meta.py [--steps 150] [--repeats 2] [--nice -15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from dynamo_dist.meta import checkpoint
from dynamo_dist.meta import ray_train as meta_ray
from dynamo_dist.data import store
from dynamo_dist.config import GroupSpec, MetaConfig, PopulationConfig
from dynamo_dist.population.train import run_local
from dynamo_dist.meta.trainer import DynamoTrainer, load_population

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "meta.json"
GROUPS = (
    GroupSpec(name="full", task="mnist1d", arch="gru", hidden_size=32, num_seeds=4, epochs=1, batch_size=64),
    GroupSpec(name="quarter", task="mnist1d", arch="gru", hidden_size=32, train_fraction=0.25, num_seeds=4,
              epochs=1, batch_size=64),
)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _population(root: Path) -> str:
    if not (root / "manifest.parquet").is_file():
        run_local(PopulationConfig(root=str(root), groups=GROUPS, num_examples=2000, num_probe=512, num_test=64),
                  progress=False)
    return str(root)


def _samples(cfg: MetaConfig, workers: int) -> int:
    return cfg.steps * workers * cfg.models_per_step * cfg.batch_size


def run_plain(cfg: MetaConfig, root: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load0, t0 = _load(), time.perf_counter()
        trainer = DynamoTrainer(cfg, load_population(root))
        t1, c1 = time.perf_counter(), time.process_time()
        trainer.fit()
        t2, c2 = time.perf_counter(), time.process_time()
    finally:
        torch.set_num_threads(threads)
    return {"train_seconds": t2 - t1, "train_cpu_seconds": c2 - c1, "wall_seconds": t2 - t0,
            "samples": _samples(cfg, 1), "samples_per_s": _samples(cfg, 1) / (t2 - t1),
            "samples_per_cpu_s_per_worker": _samples(cfg, 1) / (c2 - c1), "final_loss": trainer.history[-1]["loss"],
            "load_before": load0, "load_after": _load()}


def run_ray(cfg: MetaConfig, root: str, workers: int) -> dict:
    cfg = cfg.replace(num_workers=workers)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    load0, t0 = _load(), time.perf_counter()
    result = meta_ray.build_trainer(cfg, root, progress=False).fit()
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        shared, _, _ = checkpoint.read_sharded(d)
    secs, cpu = float(shared["train_seconds"]), float(shared["train_cpu_seconds"])
    return {"train_seconds": secs, "train_cpu_seconds": cpu, "wall_seconds": wall, "samples": _samples(cfg, workers),
            "samples_per_s": _samples(cfg, workers) / secs, "samples_per_cpu_s_per_worker": _samples(cfg, 1) / cpu,
            "final_loss": shared["history"][-1]["loss"],
            "load_before": load0, "load_after": _load()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models-per-step", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="population + run directories (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--nice", type=int, default=-15, help="niceness increment of this process and its children")
    args = ap.parse_args(argv)
    autogroup = Path("/proc/self/autogroup")
    old_group_nice = _autogroup_nice(autogroup)
    try:
        niceness = os.nice(args.nice)
        autogroup.write_text(str(args.nice))
    except (PermissionError, OSError):
        niceness = os.nice(0)
    group_nice = _autogroup_nice(autogroup)
    os.environ["RAY_worker_niceness"] = "0"  # Ray workers inherit this process's priority
    try:
        return _run(args, niceness, group_nice)
    finally:
        if old_group_nice is not None and group_nice != old_group_nice:
            autogroup.write_text(str(old_group_nice))


def _autogroup_nice(path: Path) -> int | None:
    try:
        return int(path.read_text().split("nice")[-1])
    except (OSError, ValueError):
        return None


def _run(args, niceness: int, group_nice: int | None) -> int:

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-meta-"))
    t = time.perf_counter()
    root = _population(work / "population")
    pop_seconds = time.perf_counter() - t
    cfg = MetaConfig(output_dir=str(work / "meta"), hidden_size=args.hidden_size,
                     embedding_dim=8, steps=args.steps, batch_size=args.batch_size,
                     models_per_step=args.models_per_step, checkpoint_every=args.steps, eval_every=args.steps)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray_start = time.perf_counter() - t
    runs: dict[str, list[dict]] = {"plain": [], "ray_w1": [], "ray_w2": []}
    try:
        for rep in range(args.repeats):
            order = ["plain", "ray_w1", "ray_w2"] if rep % 2 == 0 else ["ray_w2", "ray_w1", "plain"]
            for name in order:
                rec = run_plain(cfg, root) if name == "plain" else run_ray(cfg, root, 1 if name == "ray_w1" else 2)
                rec["repeat"] = rep
                runs[name].append(rec)
                print(f"{name:7s} rep {rep}: {rec['samples_per_s']:8.1f} samples/s "
                      f"(train {rec['train_seconds']:.1f}s, wall {rec['wall_seconds']:.1f}s, "
                      f"load {rec['load_before']}->{rec['load_after']})", flush=True)
    finally:
        ray.shutdown()
    best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in runs.items()}
    scaling = best["ray_w2"]["samples_per_s"] / best["ray_w1"]["samples_per_s"]
    overhead = best["ray_w1"]["samples_per_s"] / best["plain"]["samples_per_s"]
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "config": {"steps": cfg.steps, "hidden_size": cfg.hidden_size, "embedding_dim": cfg.embedding_dim,
                   "batch_size": cfg.batch_size, "models_per_step_per_worker": cfg.models_per_step,
                   "num_models": len(store.manifest_rows(root)), "sequence_length": 40,
                   "torch_threads_per_worker": 1},
        "priority": {"niceness": niceness, "autogroup_niceness": group_nice, "RAY_worker_niceness": 0,
                     "sched_autogroup_enabled": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
                     if Path("/proc/sys/kernel/sched_autogroup_enabled").exists() else None},
        "population_build_seconds": pop_seconds,
        "ray_start_seconds": ray_start,
        "runs": runs,
        "best_samples_per_s": {k: v["samples_per_s"] for k, v in best.items()},
        "ratio_ray_w2_vs_w1": scaling,
        "ratio_ray_w1_vs_plain": overhead,
        "goals": {"w2_vs_w1_ge_1.6": scaling >= 1.6, "ray_w1_vs_plain_ge_0.9": overhead >= 0.9},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("best_samples_per_s", "ratio_ray_w2_vs_w1", "ratio_ray_w1_vs_plain",
                                           "goals")}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
