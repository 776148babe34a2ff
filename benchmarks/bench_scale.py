"""Scale benchmark of the meta stage: memory and time against the population size N.

For each N, a synthetic population is written through the real store API (real Parquet
trajectory files, manifest, inputs; random float16 values of one small RNN shape), then
the meta stage runs on Ray Train with ``--workers`` workers exactly as ``dynamo-dist meta``
runs it (pre-flight, on-demand trajectory reads under ``meta.cache_bytes``, checkpoints).
Measured, per N:

* ``preflight_seconds``: ``validate_population`` (footers and manifest only);
* ``worker_peak_rss_mb``: each Train worker's peak resident set (VmHWM from /proc, sampled
  every 0.2 s while it lives), and ``driver_peak_rss_mb`` (this process, getrusage);
  ``worker_peak_rss_anon_mb``: the peak of its anonymous part (RssAnon), without the pages of
  mapped files, which are shared between processes (importing the CUDA build of torch alone
  maps ~690 MB of its libraries into every worker's resident set);
* ``cold_seconds_per_step`` (first report interval: every model read for the first time),
  ``warm_seconds_per_step`` (the rest), ``interval_seconds_per_step`` (each report interval)
  and ``steady_seconds_per_step`` (the last one), from the per-report ``train_seconds`` the
  workers record in ``history.parquet``. A worker of M models sampling k a step has read about
  1 - exp(-k s / M) of them after s steps: "warm" after the first interval still includes
  first reads (Parquet decodes) unless s >> M / k; the last interval of a run of several M / k
  steps is the steady state (``--steps 9000`` for M = 5,000, k = 4);
* ``resume_seconds``: wall time of a run resumed from the final checkpoint for
  ``--eval-every`` more steps (Ray Train start, every worker loading its shards, the steps).

``--spill-mb A B ...`` repeats every size but the smallest with each ``meta.spill_bytes`` (0 =
none): a model evicted from the in-memory cache and sampled again is then read back raw from
local disk instead of decoded from Parquet. Run enough steps for models to be sampled again
(``--steps`` of several times N / (4 x workers)) to see it.

Goals (issue 12): at the largest N, worker peak RSS within cache budget + 1 GB and at most
1.2x its value at the smallest N; seconds per step within 1.3x; pre-flight <= 30 s.

    python benchmarks/bench_scale.py --sizes 100 1000 10000 [--steps 300] [--cache-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dynamo_dist.config import MetaConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import Split
from dynamo_dist.meta import ray_train

RESULTS = Path(__file__).resolve().parent / "results"
T, D, C = 40, 1, 10  # MNIST-1D-shaped sequences and classes


def write_population(root: Path, num_models: int, hidden: int, num_probe: int, num_test: int) -> float:
    """N synthetic GRU-shaped models through the store API; returns the seconds it took."""
    t0 = time.perf_counter()
    store.init_root(root, {"synthetic": True, "num_models": num_models})
    g = torch.Generator().manual_seed(0)
    for split, n in (("probe", num_probe), ("test", num_test)):
        x = torch.randn(n, T, D, generator=g)
        store.write_inputs(root, "synthetic", split, Split(x, torch.randint(0, C, (n,), generator=g),
                                                           torch.full((n,), T, dtype=torch.long)))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_models):
        mid = f"m-{i:05d}"
        row = {"model_id": mid, "group": f"g{i % 4}", "task": "synthetic", "arch": "gru", "hidden_size": hidden,
               "train_fraction": 1.0, "seed": i, "epoch": None, "num_classes": C, "input_kind": "sequence",
               "input_shape": [T, D], "vocab_size": None, "test_accuracy": 0.5, "weights_path": None,
               "status": "complete", "error": None}
        for split, n in (("probe", num_probe), ("test", num_test)):
            h = torch.from_numpy(rng.standard_normal((n, T, hidden), dtype=np.float32))
            o = torch.from_numpy(rng.standard_normal((n, T, C), dtype=np.float32))
            rel = store.write_trajectory(root, mid, split, [h], o, "rnn", "float16")
            row[f"{split}_path"], row[f"{split}_bytes"] = rel, store.file_bytes(root, rel)
        rows.append(row)
    store.upsert_manifest(root, rows)
    return time.perf_counter() - t0


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is among the parents of ``pid`` (from /proc/<pid>/stat)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False


class WorkerMemory:
    """Samples VmHWM of this process's Ray Train workers (cmdline 'ray::RayTrainWorker', started by
    the local Ray this process runs: other Ray clusters on the machine are not counted) until stopped."""

    def __init__(self, interval: float = 0.2, timeline: bool = False):
        self.peak_kb: dict[int, int] = {}
        self.t0 = time.perf_counter()
        # with ``timeline``: per worker, [seconds, VmRSS, RssAnon, RssFile] (MB) about once a second
        self.timeline: dict[int, list[list[float]]] | None = {} if timeline else None
        self.peak_anon_kb: dict[int, int] = {}  # RssAnon: without the pages of mapped files (torch's libraries)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"RayTrainWorker" not in cmd or not _descends_from(int(pid), os.getpid()):
                        continue
                    kb = {line.split(":")[0]: int(line.split()[1]) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:"))}
                except OSError:
                    continue
                pid = int(pid)
                if "VmHWM" in kb:  # not a zombie
                    self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), kb["VmHWM"])
                if "RssAnon" in kb:
                    self.peak_anon_kb[pid] = max(self.peak_anon_kb.get(pid, 0), kb["RssAnon"])
                if self.timeline is not None:
                    self._sample(pid, kb)
            self._stop.wait(interval)

    def _sample(self, pid: int, kb: dict[str, int]) -> None:
        t = time.perf_counter() - self.t0
        series = self.timeline.setdefault(pid, [])
        if series and t - series[-1][0] < 1.0:
            return
        series.append([round(t, 1), *(round(kb.get(k, 0) / 1024, 1) for k in ("VmRSS", "RssAnon", "RssFile"))])


def step_seconds(out: Path) -> tuple[float, float, list[float]]:
    """(cold, warm, per report interval) seconds per step from the report rows of history.parquet."""
    hist = pq.read_table(out / "history.parquet").to_pylist()
    marks = [(0, 0.0)] + [(h["step"], h["train_seconds"]) for h in hist if h.get("train_seconds") is not None]
    intervals = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    if not intervals:
        return float("nan"), float("nan"), []
    if len(intervals) < 2:
        return intervals[0], float("nan"), intervals
    warm = (marks[-1][1] - marks[1][1]) / (marks[-1][0] - marks[1][0])
    return intervals[0], warm, intervals


def run_size(work: Path, n: int, args, spill_mb: int = 0) -> dict:
    root, out = work / f"pop-{n}", work / f"meta-{n}-spill{spill_mb}"
    shutil.rmtree(out, ignore_errors=True)
    write_seconds = write_population(root, n, args.hidden, args.num_probe, args.num_test) if not (
        root / "manifest.parquet").is_file() else None
    cfg = MetaConfig(output_dir=str(out), hidden_size=32, embedding_dim=4, steps=args.steps, batch_size=16,
                     models_per_step=4, num_workers=args.workers, eval_every=args.eval_every,
                     checkpoint_every=args.steps, cache_bytes=args.cache_mb * 2 ** 20, val_models=args.val_models,
                     spill_bytes=spill_mb * 2 ** 20 or None,
                     **({} if args.table_mb is None else {"table_bytes": args.table_mb * 2 ** 20}))
    t = time.perf_counter()
    manifest = ray_train.validate_population(cfg, str(root))
    preflight = time.perf_counter() - t
    t = time.perf_counter()
    with WorkerMemory(timeline=args.timeline) as mem:
        result = ray_train.build_trainer(cfg, str(root), progress=False, manifest=manifest).fit()
        ray_train.finalize(cfg, str(root), result, manifest=manifest)
    fit_seconds = time.perf_counter() - t
    cold, warm, intervals = step_seconds(out)
    resumed = cfg.replace(output_dir=str(work / f"meta-{n}-spill{spill_mb}-resumed"), steps=args.steps + args.eval_every)
    t = time.perf_counter()
    with WorkerMemory() as mem_resume:
        ray_train.build_trainer(resumed, str(root), progress=False, manifest=manifest,
                                resume_from_checkpoint=result.checkpoint).fit()
    resume_seconds = time.perf_counter() - t
    disk = sum(p.stat().st_size for p in (root / "trajectories").rglob("*.parquet"))
    rec = {
        "num_models": n, "spill_mb": spill_mb, "write_seconds": write_seconds, "trajectory_disk_mb": disk / 2 ** 20,
        "preflight_seconds": preflight, "fit_and_finalize_seconds": fit_seconds,
        "cold_seconds_per_step": cold, "warm_seconds_per_step": warm, "resume_seconds": resume_seconds,
        # the last interval: steady state once every model has been read (and spilled) at least once
        "interval_seconds_per_step": intervals, "steady_seconds_per_step": intervals[-1] if intervals else None,
        "worker_peak_rss_mb": sorted(kb / 1024 for kb in mem.peak_kb.values()),
        "worker_peak_rss_anon_mb": sorted(kb / 1024 for kb in mem.peak_anon_kb.values()),
        "resume_worker_peak_rss_mb": sorted(kb / 1024 for kb in mem_resume.peak_kb.values()),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if mem.timeline is not None:  # [seconds since fit started, VmRSS, RssAnon, RssFile] per worker
        rec["worker_timeline_mb"] = list(mem.timeline.values())
    print(json.dumps({k: v for k, v in rec.items() if k != "worker_timeline_mb"}), flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"meta-{n}-spill{spill_mb}-resumed", ignore_errors=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-models", type=int, default=32)
    ap.add_argument("--cache-mb", type=int, default=256)
    ap.add_argument("--spill-mb", type=int, nargs="+", default=[0], help="meta.spill_bytes in MiB (0 = none); "
                    "each value runs at every size but the smallest (which fits the cache: nothing to spill)")
    ap.add_argument("--table-mb", type=int, help="meta.table_bytes in MiB (default: the config's)")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--num-probe", type=int, default=64)
    ap.add_argument("--num-test", type=int, default=32)
    ap.add_argument("--workdir", help="keep populations here between runs (default: a temp dir, removed)")
    ap.add_argument("--timeline", action="store_true", help="record each worker's VmRSS/RssAnon/RssFile about once "
                    "a second (worker_timeline_mb)")
    ap.add_argument("--keep", action="store_true", help="keep the meta outputs")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = ap.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        runs = [run_size(work, n, args, spill) for i, n in enumerate(args.sizes)
                for spill in (args.spill_mb if i else args.spill_mb[:1])]
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    small = runs[0]
    ratios = {}
    for spill in args.spill_mb:
        large = [r for r in runs if r["num_models"] == args.sizes[-1] and r["spill_mb"] == spill][-1]
        tag = "" if spill == args.spill_mb[0] else f"_spill{spill}"
        ratios |= {
            f"worker_peak_rss_largest_over_smallest{tag}": max(large["worker_peak_rss_mb"]) / max(small["worker_peak_rss_mb"]),
            f"worker_peak_rss_anon_largest_over_smallest{tag}":
                max(large["worker_peak_rss_anon_mb"]) / max(small["worker_peak_rss_anon_mb"]),
            f"warm_step_largest_over_smallest{tag}": large["warm_seconds_per_step"] / small["warm_seconds_per_step"],
            f"cold_step_largest_over_smallest{tag}": large["cold_seconds_per_step"] / small["cold_seconds_per_step"],
            f"steady_step_largest_over_smallest{tag}": large["steady_seconds_per_step"] / small["steady_seconds_per_step"],
        }
    doc = {"what": "meta stage memory and time against N (synthetic float16 trajectories, real store files)",
           "command": "python benchmarks/bench_scale.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k not in ("out", "workdir", "keep", "timeline") and v is not None),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "cache_mb": args.cache_mb, "runs": runs, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
