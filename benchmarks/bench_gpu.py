"""GPU benchmark (issue 14): stacked population training and the meta-model on one device.

One command, JSON to ``benchmarks/results/gpu.json`` (``--out``). Measured on ``--device``:

1. **Population, stacked vs one at a time, same device.** ``--models`` MNIST-1D GRUs of the
   ``bench_population.py`` recipe (hidden 32, 4 epochs, batch 128, 4,000 examples, 500 probe
   and 500 test sequences recorded; half on all data, half on half of it) trained and recorded
   as ONE stack (``train.train_and_record_stack``, K = ``--models``), wall time including
   recording. One at a time: ``--sequential-sample`` of the same models trained and recorded
   by ``train.train_and_record`` (the K=1 path), timed, and extrapolated to all of them
   (the JSON says so: ``sequential_extrapolated``). Goal: stacked >= 50x one at a time.
2. **Against the 2-core CPU machine**: the stacked models/s over the 2-Ray-actor models/s of
   the same recipe measured by ``bench_population.py`` on the 2-core machine
   (``benchmarks/results/population_throughput_100.json``; 100 models), as a ratio.
3. **Meta-model steps/s** of ``--meta-*`` (a GPU-sized config: hidden 256, 16 models x 128
   sequences per step) on the device, vs the same config on the 2-core CPU machine
   (``--cpu-reference``, written by this script run there with ``--device cpu --write-reference``).
   FLOPs per step are counted by ``torch.utils.flop_counter`` on a CPU trainer of the same config
   (the CPU GRU decomposes into counted matmuls; cuDNN's fused RNN would not be counted), and
   achieved FLOP/s is set against the device's dense float32 peak (``PEAK_FLOPS``, datasheet values).
   Goal: >= 20x the 2-core CPU run.
4. **Recording share**: recording time on the training thread + the wait for the last writes,
   over the stacked run's wall time. Goal <= 15%.

    python benchmarks/bench_gpu.py                       # on a GPU machine: < 8 min on one H200
    python benchmarks/bench_gpu.py --device cpu --small  # smoke sizes (CI runs this)
    python benchmarks/bench_gpu.py --device cpu --only meta --write-reference   # the 2-core CPU reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dynamo_dist.config import GroupSpec, MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.population import train

RESULTS = Path(__file__).resolve().parent / "results"
CPU_POPULATION = RESULTS / "population_throughput_100.json"
CPU_META = RESULTS / "gpu_cpu_reference.json"
PEAK_FLOPS = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L4": 30.3e12, "A10": 31.2e12}  # dense fp32 (no TF32)


def population_cfg(root: Path, models: int, epochs: int, num_examples: int, recorded: int, cpus: int,
                   stack: int, device: str) -> PopulationConfig:
    half = max(1, models // 2)
    groups = (GroupSpec(name="full", arch="gru", hidden_size=32, epochs=epochs, batch_size=128, num_seeds=half),
              GroupSpec(name="half", arch="gru", hidden_size=32, epochs=epochs, batch_size=128, num_seeds=models - half,
                        train_fraction=0.5))
    return PopulationConfig(root=str(root), groups=groups, num_examples=num_examples, num_probe=recorded,
                            num_test=recorded, device=device, cpus_per_actor=cpus, models_per_actor=stack)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_population(args, device: torch.device, work: Path) -> dict:
    cfg = population_cfg(work / "stacked", args.models, args.epochs, args.num_examples, args.recorded, args.writers,
                         args.models, device.type)
    train.init_population(cfg, progress=False)
    jobs = train.expand(cfg)
    train.task_for(cfg, "mnist1d")  # the dataset load is not what is measured
    warm = train.expand(cfg.replace(groups=(cfg.groups[0].replace(num_seeds=2, epochs=1),)))
    warm_cfg = cfg.replace(root=str(work / "warm"))
    train.init_population(warm_cfg, progress=False)
    train.train_and_record_stack(warm_cfg.root, warm_cfg, warm)  # CUDA start-up, allocator
    _sync(device)
    timings: dict = {}
    t0 = time.perf_counter()
    rows = train.train_and_record_stack(cfg.root, cfg, jobs, timings=timings)
    _sync(device)
    stacked_s = time.perf_counter() - t0
    store.upsert_manifest(cfg.root, rows)  # (the driver's part: the meta section reads this root)
    failed = [r["model_id"] for r in rows if r["status"] != "complete"]

    seq_cfg = cfg.replace(root=str(work / "sequential"), models_per_actor=1)
    train.init_population(seq_cfg, progress=False)
    half = len(jobs) // 2
    sample = (jobs[:args.sequential_sample // 2] + jobs[half:half + args.sequential_sample - args.sequential_sample // 2])
    train.train_and_record(seq_cfg.root, seq_cfg, sample[0])  # its cuDNN plans
    per_model = []
    for job in sample:
        _sync(device)
        t = time.perf_counter()
        train.train_and_record(seq_cfg.root, seq_cfg, job)
        _sync(device)
        per_model.append(time.perf_counter() - t)
    seq_per_model = sum(per_model) / len(per_model)
    sequential_s = seq_per_model * len(jobs)
    record_s = timings["record_s"] + timings["final_wait_s"]
    acc = [r["test_accuracy"] for r in rows if r["status"] == "complete"]
    return {
        "recipe": {"models": len(jobs), "arch": "gru", "hidden_size": 32, "epochs": args.epochs, "batch_size": 128,
                   "num_examples": args.num_examples, "recorded_probe": args.recorded, "recorded_test": args.recorded,
                   "groups": "train_fraction 1.0 and 0.5, half the models each", "writer_threads": args.writers},
        "stacked": {"K": len(jobs), "wall_seconds": stacked_s, "models_per_second": len(jobs) / stacked_s,
                    "timings": timings, "failed": failed, "mean_test_accuracy": sum(acc) / max(len(acc), 1)},
        "one_at_a_time": {"timed_models": len(sample), "seconds_per_model": per_model,
                          "sequential_extrapolated": True, "extrapolated_wall_seconds": sequential_s,
                          "models_per_second": 1 / seq_per_model},
        "speedup_stacked_vs_one_at_a_time": sequential_s / stacked_s,
        "recording_share_of_wall": record_s / stacked_s,
    }


def cpu_population_reference() -> dict | None:
    if not CPU_POPULATION.is_file():
        return None
    runs = json.loads(CPU_POPULATION.read_text())["throughput"]["runs"]
    ray = [r["ray_2_actors"] for r in runs]
    best = max(ray, key=lambda r: r["models_per_second"])
    return {"source": str(CPU_POPULATION.relative_to(RESULTS.parent.parent)), "what": "2 Ray actors, 1 thread each, "
            "on the 2-core CPU machine, 100 models of the same recipe", "models_per_second": best["models_per_second"],
            "steady_models_per_second": best["steady_models_per_second"]}


def meta_cfg(args, out: Path, device: str) -> MetaConfig:
    return MetaConfig(output_dir=str(out), hidden_size=args.meta_hidden, embedding_dim=16, batch_size=args.meta_batch,
                      models_per_step=args.meta_models_per_step, steps=args.meta_steps, eval_every=10 ** 9,
                      checkpoint_every=10 ** 9, cache_bytes=None, device=device, precision=args.precision,
                      val_models=4)


def bench_meta(args, device: torch.device, root: str, work: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dynamo_dist.meta.trainer import DynamoTrainer, load_population

    data = load_population(root)
    cfg = meta_cfg(args, work / "meta", device.type)
    trainer = DynamoTrainer(cfg, data)
    for _ in range(3):  # warm-up: allocator, cuDNN plans, the trajectory cache
        trainer.train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.meta_steps):
        trainer.train_step()
    _sync(device)
    secs = time.perf_counter() - t0
    cpu_trainer = DynamoTrainer(meta_cfg(args, work / "meta-flops", "cpu").replace(precision="float32"), data)
    with FlopCounterMode(display=False) as counter:
        cpu_trainer.train_step()
    flops = counter.get_total_flops()
    steps_per_s = args.meta_steps / secs
    out = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "embedding_dim", "batch_size", "models_per_step",
                                                  "precision", "device")},
           "steps_timed": args.meta_steps, "seconds": secs, "steps_per_second": steps_per_s,
           "flops_per_step": flops, "achieved_flops_per_second": flops * steps_per_s}
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is not None:
        out["device_peak_fp32_flops_per_second"] = peak
        out["fraction_of_peak"] = flops * steps_per_s / peak
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="smoke sizes: 8 models, 1 epoch, 600 examples, 3 meta steps")
    ap.add_argument("--only", choices=("population", "meta"), default=None)
    ap.add_argument("--models", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--num-examples", type=int, default=4000)
    ap.add_argument("--recorded", type=int, default=500)
    ap.add_argument("--sequential-sample", type=int, default=8)
    ap.add_argument("--writers", type=int, default=min(8, os.cpu_count() or 1), help="trajectory writer threads")
    ap.add_argument("--meta-hidden", type=int, default=256)
    ap.add_argument("--meta-batch", type=int, default=128)
    ap.add_argument("--meta-models-per-step", type=int, default=16)
    ap.add_argument("--meta-steps", type=int, default=100)
    ap.add_argument("--precision", default="float32", choices=("float32", "bf16"))
    ap.add_argument("--cpu-reference", default=str(CPU_META))
    ap.add_argument("--write-reference", action="store_true", help="store the meta result as the CPU reference")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json; gpu_small.json "
                                                "with --small)")
    args = ap.parse_args(argv)
    if args.small:
        args.models, args.epochs, args.num_examples, args.recorded = min(args.models, 8), 1, 600, 32
        args.sequential_sample, args.meta_steps, args.meta_hidden, args.meta_models_per_step = 2, 3, 32, 2
        args.meta_batch = 16
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: --device cuda but torch sees no GPU; run it on a GPU machine or pass --device cpu")
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))  # the 2-core machine's budget
    device = torch.device(args.device)
    out_path = Path(args.out) if args.out else RESULTS / ("gpu_small.json" if args.small else "gpu.json")
    result: dict = {"command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:]),
                    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.only in (None, "population"):
            result["population"] = pop = bench_population(args, device, work)
            cpu = None if args.small else cpu_population_reference()  # the reference is the full recipe
            if cpu is not None:
                pop["cpu_2_core_ray_2_actors"] = cpu
                pop["ratio_vs_cpu_2_core"] = pop["stacked"]["models_per_second"] / cpu["models_per_second"]
            print(f"population: {pop['stacked']['K']} models stacked in {pop['stacked']['wall_seconds']:.1f} s, "
                  f"{pop['speedup_stacked_vs_one_at_a_time']:.1f}x one at a time, recording "
                  f"{100 * pop['recording_share_of_wall']:.0f}% of the wall time", flush=True)
            root = str(work / "stacked")
        else:
            cfg = population_cfg(work / "meta-pop", args.models, args.epochs, args.num_examples, args.recorded,
                                 args.writers, args.models, device.type)
            train.init_population(cfg, progress=False)
            store.upsert_manifest(cfg.root, train.train_and_record_stack(cfg.root, cfg, train.expand(cfg)))
            root = cfg.root
        if args.only in (None, "meta"):
            result["meta"] = meta = bench_meta(args, device, root, work)
            ref = Path(args.cpu_reference)
            if args.write_reference:
                ref.write_text(json.dumps({**meta, "machine": result["machine"], "command": result["command"]}, indent=1))
            elif ref.is_file() and not args.small:
                cpu = json.loads(ref.read_text())
                same = cpu["config"]["hidden_size"] == meta["config"]["hidden_size"] and \
                    cpu["config"]["batch_size"] == meta["config"]["batch_size"] and \
                    cpu["config"]["models_per_step"] == meta["config"]["models_per_step"]
                meta["cpu_2_core_reference"] = {"source": str(ref), "steps_per_second": cpu["steps_per_second"],
                                                "same_config": same}
                meta["ratio_vs_cpu_2_core"] = meta["steps_per_second"] / cpu["steps_per_second"]
            print(f"meta: {meta['steps_per_second']:.1f} steps/s, {meta['achieved_flops_per_second'] / 1e12:.2f} "
                  "TFLOP/s achieved", flush=True)
    result["wall_seconds"] = time.perf_counter() - t_start
    goals = {}
    if "population" in result:
        goals["stacked_vs_one_at_a_time_ge_50x"] = result["population"]["speedup_stacked_vs_one_at_a_time"] >= 50
        goals["recording_share_le_15pct"] = result["population"]["recording_share_of_wall"] <= 0.15
    if "ratio_vs_cpu_2_core" in result.get("meta", {}):
        goals["meta_vs_cpu_2_core_ge_20x"] = result["meta"]["ratio_vs_cpu_2_core"] >= 20
    result["goals"] = goals
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
