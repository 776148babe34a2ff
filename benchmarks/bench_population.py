"""Population-stage benchmarks; results go to benchmarks/results/population.json.

Sections (``--sections``, default all; each run updates only its own key of the JSON):

* ``throughput``: the same population (same models, same steps) trained and recorded by
  the plain sequential loop in one process (``population.run_local``, a fresh child
  process per baseline) and by 2 Ray actors (``population.actors.run_population``, 1 torch
  thread each, workers at the baseline's priority). Baselines: torch's default here
  (2 threads), 2 threads with OMP_WAIT_POLICY=PASSIVE, and 1 thread. Ray's cluster start
  is excluded and reported apart (a cluster is up before a population is submitted);
  actor start and each actor's data load are included. Goal: ratio >= 1.8.
* ``write``: ``store.write_trajectory`` (Parquet, zstd) vs ``numpy.save`` of the same
  arrays (real GRU trajectories), interleaved repeats, throughput in MB/s of float32
  input (both land in the page cache, no fsync). Goal: ratio >= 0.5.
* ``pop200``: ``configs/population-200.yaml`` (200 tiny RNNs) trained and recorded end to
  end with Ray actors: wall time and disk size.
* ``pipeline200`` (not in the default set, ~4 min): the whole pipeline on the same config --
  stage times, emulation metrics, group separation and centroid-vs-member accuracy.

The machine is shared: the 1-minute load average before and after each measurement is
stored beside it, so contaminated numbers can be recognised.

    python benchmarks/bench_population.py [--sections throughput write pop200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from dynamo_dist import config, zoo
from dynamo_dist.data import tasks as data
from dynamo_dist.population import train as population
from dynamo_dist.data import store
from dynamo_dist.config import GroupSpec, PopulationConfig
from dynamo_dist.population.actors import run_population
from dynamo_dist.ray_utils import init_ray

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "population.json"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _du(path: Path) -> dict[str, int]:
    """Bytes under each top-level entry of ``path`` and in total."""
    out = {}
    for child in sorted(path.iterdir()):
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        out[child.name] = sum(p.stat().st_size for p in files)
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------- (a) throughput


def throughput_cfg(root: str, num_models: int) -> PopulationConfig:
    gru = dict(task="mnist1d", arch="gru", hidden_size=32, epochs=4, batch_size=128, lr=1e-2)
    return PopulationConfig(root=root, num_examples=4000, num_probe=500, num_test=500, num_actors=2,
                            groups=(GroupSpec(name="full", train_fraction=1.0, num_seeds=num_models // 2, **gru),
                                    GroupSpec(name="half", train_fraction=0.5, num_seeds=num_models - num_models // 2,
                                              **gru)))


# Sequential baselines: (name, torch threads, extra environment). Each runs in a fresh process
# so OpenMP's wait policy can differ: with the default (spinning) policy, 2 threads on a
# machine that other jobs also load were measured 30-50x slower than 1 thread.
SEQUENTIAL_VARIANTS = {
    "sequential_2_threads": (2, {}),
    "sequential_2_threads_passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "sequential_1_thread": (1, {}),
}


def sequential_worker(spec: str) -> None:
    """Child process: train + record the population sequentially, print the measurement as JSON."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    cfg = throughput_cfg(args["root"], args["num_models"])
    load0, t0 = _load(), time.perf_counter()
    rows = population.run_local(cfg, progress=False)  # includes this process's one data load
    wall = time.perf_counter() - t0
    busy = sum(r["train_seconds"] for r in rows)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "env": args["env"], "wall_seconds": round(wall, 2),
                      "models_per_second": round(len(rows) / wall, 3),
                      "steady_models_per_second": round(len(rows) / busy, 3),  # data load excluded
                      "train_record_seconds_per_model": round(busy / len(rows), 3),
                      "load_before": load0, "load_after": _load()}))


def _sequential(root: Path, num_models: int, threads: int, env: dict) -> dict:
    spec = json.dumps({"root": str(root), "num_models": num_models, "threads": threads, "env": env})
    out = subprocess.run([sys.executable, __file__, "--sequential-worker", spec], env={**os.environ, **env},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ray(root: Path, num_models: int) -> dict:
    # Ray starts its workers at nice 15, so wherever other jobs load the CPUs the actors would
    # yield to them and to the nice-0 baseline. Same priority for both: workers at nice 0.
    # (Linux autogroups still give Ray's session and the baseline's one fair share each.)
    os.environ["RAY_worker_niceness"] = "0"
    cfg = throughput_cfg(str(root), num_models)
    t0 = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - t0
    stamps: list[float] = []
    load0, t0 = _load(), time.perf_counter()
    rows = run_population(cfg, progress=False, on_progress=lambda r, a: stamps.extend([time.perf_counter()] * len(r)))
    wall = time.perf_counter() - t0
    ray.shutdown()  # the sequential baseline of the next repeat runs without Ray in the background
    busy = sum(r["train_seconds"] for r in rows)
    # steady state: completions after the first one over the time they took (actor start excluded)
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"num_actors": cfg.num_actors, "torch_threads_per_actor": 1, "worker_niceness": 0,
            "ray_init_seconds": round(ray_init, 2), "wall_seconds": round(wall, 2),
            "models_per_second": round(len(rows) / wall, 3), "first_model_after_seconds": round(stamps[0] - t0, 2),
            "steady_models_per_second": round(steady, 3),
            "train_record_seconds_per_model": round(busy / len(rows), 3), "load_before": load0, "load_after": _load()}


def bench_throughput(num_models: int, repeats: int, baselines: list[str], work: Path) -> dict:
    # Generate the task once so its on-disk cache is warm: every process, sequential or actor,
    # then loads it the same way (~0.03 s) and neither side pays the one-time synthesis.
    data.load_task("mnist1d", seed=0, num_examples=throughput_cfg(str(work), num_models).num_examples)
    runs = []
    for rep in range(repeats):
        res = {}
        for name in baselines + ["ray_2_actors"]:
            root = work / f"tp-{rep}-{name}"
            if name == "ray_2_actors":
                res[name] = _ray(root, num_models)
            else:
                res[name] = _sequential(root, num_models, *SEQUENTIAL_VARIANTS[name])
            shutil.rmtree(root)
            print(f"throughput repeat {rep}: {name}: {res[name]}", flush=True)
        par = res["ray_2_actors"]
        for name in baselines:
            seq = res[name]
            res[f"ratio_vs_{name}"] = round(seq["wall_seconds"] / par["wall_seconds"], 3)
            res[f"steady_ratio_vs_{name}"] = round(par["steady_models_per_second"] / seq["steady_models_per_second"], 3)
        runs.append(res)
    medians = {f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0] if "ratio" in k}
    return {
        "what": "same population trained + recorded: plain sequential loop (population.run_local) in one "
                "process vs 2 Ray actors (population.actors.run_population), 1 torch thread each",
        "population": {"num_models": num_models, "arch": "gru", "hidden_size": 32, "epochs": 4, "batch_size": 128,
                       "num_examples": 4000, "num_probe": 500, "num_test": 500,
                       "groups": "train_fraction 1.0 and 0.5, half the models each"},
        "baselines": {k: {"torch_threads": SEQUENTIAL_VARIANTS[k][0], "env": SEQUENTIAL_VARIANTS[k][1]}
                      for k in baselines},
        "ratio_definition": "ratio: sequential wall seconds / Ray wall seconds (Ray cluster start excluded, "
                            "actor start and data load included); steady_ratio: models/s once running "
                            "(Ray: first to last completion; sequential: models / summed train+record seconds)",
        "goal_ratio": 1.8,
        "runs": runs,
        **medians,
    }


# ---------------------------------------------------------------- (b) trajectory writes


def bench_write(work: Path, repeats: int = 15) -> dict:
    torch.manual_seed(0)
    task = data.load_task("mnist1d", seed=0, num_examples=4000)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=tuple(task.input_shape), num_classes=10,
                        hidden_size=64)
    model = zoo.build(spec).eval()
    hs, out = population.record(model, task.probe.x[:1000])
    h_np, o_np = hs[0].numpy(), out.numpy()
    nbytes = h_np.nbytes + o_np.nbytes
    result = {"arrays": {"hidden_NTH": list(h_np.shape), "output_NTC": list(o_np.shape), "float32_bytes": nbytes,
                         "source": "untrained GRU (hidden 64) on 1000 MNIST-1D probe sequences"},
              "repeats": repeats, "load_before": _load()}

    np_dir = work / "npy"
    np_dir.mkdir(parents=True)
    writers = {
        "numpy_save": lambda i: (np.save(np_dir / f"h{i}.npy", h_np), np.save(np_dir / f"o{i}.npy", o_np)),
        **{f"parquet_{dt}": (lambda i, dt=dt: store.write_trajectory(work / f"pq-{dt}", f"m{i}", "probe", hs, out,
                                                                     "rnn", dt))
           for dt in ("float32", "float16")},
    }
    # interleaved, so page-cache writeback and other jobs' load hit every writer alike
    times: dict[str, list[float]] = {k: [] for k in writers}
    for i in range(repeats):
        for name, fn in writers.items():
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
    sizes = {"numpy_save": (np_dir / "h0.npy").stat().st_size + (np_dir / "o0.npy").stat().st_size,
             **{f"parquet_{dt}": (work / f"pq-{dt}" / store.Layout.at(".").trajectory_rel("m0", "probe")).stat().st_size
                for dt in ("float32", "float16")}}
    t_np = statistics.median(times["numpy_save"])
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"median_seconds": round(t, 4), "min_seconds": round(min(ts), 4),
                        "mb_per_second": round(nbytes / t / 1e6, 1), "bytes_on_disk": sizes[name]}
        if name != "numpy_save":
            result[name]["ratio_vs_numpy_save"] = round(t_np / t, 3)
    result["load_after"] = _load()
    result["goal_ratio"] = 0.5
    result["ratio_definition"] = "Parquet write throughput / numpy.save throughput on the same float32 arrays"
    return result


# ---------------------------------------------------------------- (c) 200 models end to end


def bench_pop200(work: Path) -> dict:
    cfg = config.load(REPO / "configs" / "population-200.yaml").population.replace(root=str(work / "pop200"))
    t0 = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - t0
    load0, t0 = _load(), time.perf_counter()
    rows = run_population(cfg, progress=True)
    wall = time.perf_counter() - t0
    ray.shutdown()
    groups = population.group_summary(rows)
    sizes = _du(Path(cfg.root))
    return {
        "config": "configs/population-200.yaml", "num_models": len(rows), "num_actors": "one per CPU (2)",
        "ray_init_seconds": round(ray_init, 2), "wall_seconds": round(wall, 2),
        "models_per_second": round(len(rows) / wall, 3),
        "disk_bytes": sizes, "disk_mib_total": round(sizes["total"] / 2**20, 2),
        "groups": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in g.items()} for g in groups],
        "load_before": load0, "load_after": _load(),
    }


def bench_pipeline200(work: Path) -> dict:
    """The whole pipeline (population -> meta -> analyze) on configs/population-200.yaml."""
    from dynamo_dist.pipeline import run_pipeline

    cfg = config.load(REPO / "configs" / "population-200.yaml", overrides={"run_dir": str(work / "pipeline200")})
    load0 = _load()
    summary = run_pipeline(cfg, progress=False)
    analysis = json.loads((Path(cfg.meta.output_dir) / "analysis" / "analysis.json").read_text())["headline"]
    keep = ("dynamo.silhouette", "dynamo.adjusted_rand", "svcca.silhouette", "cka.silhouette",
            "averaging.mean_centroid_minus_member_base")
    return {
        "config": "configs/population-200.yaml", "num_models": summary["num_models"],
        **{k: round(summary[k], 1) for k in ("population_seconds", "meta_seconds", "analyze_seconds", "total_seconds")},
        "meta": {k: summary["meta"][k] for k in ("mean_agreement", "mean_hidden_r2", "mean_meta_accuracy",
                                                  "mean_base_accuracy", "num_workers", "steps")},
        "analysis": {k: analysis.get(k) for k in keep},
        "centroid_vs_members": {g: [analysis.get(f"averaging.{g}.centroid_accuracy"),
                                    analysis.get(f"averaging.{g}.member_base_mean")]
                                for g in sorted({k.split(".")[1] for k in analysis if k.startswith("averaging.")
                                                 and k.endswith(".centroid_accuracy")})},
        "load_before": load0, "load_after": _load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["throughput", "write", "pop200"],
                    choices=["throughput", "write", "pop200", "pipeline200"])
    ap.add_argument("--num-models", type=int, default=40, help="models in the throughput population")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the throughput comparison")
    ap.add_argument("--baselines", nargs="+", choices=list(SEQUENTIAL_VARIANTS),
                    default=["sequential_2_threads_passive", "sequential_1_thread"],
                    help="sequential baselines (torch's default here is 2 threads, spinning OpenMP waits)")
    ap.add_argument("--sequential-worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.sequential_worker:
        return sequential_worker(args.sequential_worker)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": ray.__version__, "default_torch_threads": torch.get_num_threads(),
                          "note": "shared 2-core machine: other test suites may run concurrently (see load_*)"}
    with tempfile.TemporaryDirectory(prefix="bench_population-") as tmp:
        work = Path(tmp)
        for section in args.sections:
            t0 = time.strftime("%Y-%m-%dT%H:%M:%S")
            if section == "throughput":
                res = bench_throughput(args.num_models, args.repeats, args.baselines, work)
            elif section == "write":
                res = bench_write(work)
            elif section == "pipeline200":
                res = bench_pipeline200(work)
            else:
                res = bench_pop200(work)
            results[section] = {"measured_at": t0, **res}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps({section: results[section]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
