"""Finishing a meta run (``ray_train.finalize``): the driver's peak memory and time against the
size of the models' state, for one or more checkouts of dynamo_dist run side by side.

One synthetic population (real store files, ``bench_scale.write_population``) and one final
Ray Train checkpoint of it (``shared.pt`` plus one shard file per worker, each model with theta,
a V map of ``--base-hidden x --meta-hidden`` and AdamW moments, and the workers' test metrics)
are written once. Then, for each ``--checkout NAME=PATH`` in turn (default: this checkout), a
fresh process with that checkout first on ``sys.path`` finalizes the checkpoint into its own
output directory; measured there:

* ``seconds``: wall time of ``finalize`` (no MLflow);
* ``peak_rss_mb``: the process's VmHWM from /proc minus its VmRSS just before the call
  (imports and the population's manifest are already loaded then);
* ``output_mb``: what the run directory adds on disk (files hard-linked to the checkpoint's not counted);
* with ``--inference-copy``: ``copy_seconds`` and ``copy_peak_rss_mb`` (VmHWM reset before it) of
  ``checkpoint.write_inference_copy``, the MLflow Model's copy without optimiser state.

    python benchmarks/bench_finalize.py --models 2000 --checkout before=/tmp/old --checkout after=.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from dynamo_dist.config import MetaConfig
from dynamo_dist.data import store
from dynamo_dist.meta import ray_train

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])

root, ckpt, out = sys.argv[2], sys.argv[3], sys.argv[4]
cfg = MetaConfig(**json.loads(sys.argv[5]))
cfg = cfg.replace(output_dir=out)
manifest = store.manifest_rows(root)
before = status("VmRSS:")
t0 = time.perf_counter()
ray_train.finalize(cfg, root, ckpt, manifest=manifest)
seconds = time.perf_counter() - t0
got = {"seconds": seconds, "peak_rss_mb": (status("VmHWM:") - before) / 1024, "rss_before_mb": before / 1024}
if sys.argv[6] == "copy":  # the MLflow Model's copy of the run's checkpoint, without optimiser state
    from dynamo_dist.meta import checkpoint
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the copy's own peak
    before = status("VmRSS:")
    t0 = time.perf_counter()
    checkpoint.write_inference_copy(Path(out) / "checkpoint", Path(out) / "model-copy")
    got.update(copy_seconds=time.perf_counter() - t0, copy_peak_rss_mb=(status("VmHWM:") - before) / 1024)
print(json.dumps(got))
"""


def write_checkpoint(d: Path, ids: list[str], workers: int, dim: int, base_hidden: int, meta_hidden: int,
                     cfg: dict, table_form: bool = False) -> float:
    """A final sharded checkpoint of ``ids`` in ``d``; returns its size in MB. ``table_form``: shards
    as workers write them now (``ModelEmbeddings.table_state``), else a dict per model (earlier runs)."""
    import torch

    from dynamo_dist.meta import checkpoint, model

    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def adam(t):
        return {"step": torch.tensor(100.0), "exp_avg": torch.randn(t.shape, generator=g),
                "exp_avg_sq": torch.rand(t.shape, generator=g)}

    for r in range(workers):
        own = ids[r::workers]
        shard = {}
        if table_form:
            emb = model.ModelEmbeddings(own, dim, [meta_hidden], [[base_hidden]] * len(own), "rnn")
            for t in (emb.theta_table, emb.theta_exp_avg, emb.theta_exp_avg_sq, emb.maps_exp_avg, emb.maps_exp_avg_sq):
                t.copy_(torch.rand(t.shape, generator=g))
            emb.steps.fill_(100.0)
            shard = model.TableStates(emb.table_state(copy=False))
        for m in own if not table_form else ():
            theta = torch.randn(dim, generator=g)
            maps = {"0.weight": torch.randn(base_hidden, meta_hidden, generator=g),
                    "0.bias": torch.randn(base_hidden, generator=g)}
            shard[m] = {"theta": theta, "maps": maps, "opt": [adam(theta), adam(maps["0.weight"]), adam(maps["0.bias"])]}
        metrics = {m: {"agreement": 0.9, "hidden_r2": 0.9, "meta_accuracy": 0.5, "base_accuracy": 0.5} for m in own}
        shared = None
        if r == 0:
            shared = {"step": 100, "meta": {"w": torch.randn(meta_hidden, meta_hidden, generator=g)}, "opt_meta": {},
                      "history": [{"step": s, "loss": 1.0 / s} for s in range(1, 101)], "num_workers": workers,
                      "shards": [checkpoint.shard_file(k) for k in range(workers)], "model_ids": ids,
                      "mlflow_run_id": None, "config": cfg, "train_seconds": 1.0, "train_cpu_seconds": 1.0}
        checkpoint.write_shard(d, r, shard, metrics, shared)
        del shard
        emb = None
    return sum(f.stat().st_size for f in d.iterdir()) / 2 ** 20


def own_mb(d: Path, exclude: Path) -> float:
    """MB of the files under ``d`` that are not hard links to files under ``exclude``."""
    shared = {f.stat().st_ino for f in exclude.rglob("*") if f.is_file()}
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.stat().st_ino not in shared) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--base-hidden", type=int, default=128)
    ap.add_argument("--meta-hidden", type=int, default=256)
    ap.add_argument("--checkout", action="append", default=None, help="NAME=PATH of a dynamo_dist checkout")
    ap.add_argument("--table-form", action="store_true", help="shards in the table form workers write now")
    ap.add_argument("--inference-copy", action="store_true", help="also time write_inference_copy (the MLflow "
                    "Model's copy of the checkpoint) after finalize: copy_seconds, copy_peak_rss_mb")
    ap.add_argument("--out", default=str(RESULTS / "finalize.json"))
    args = ap.parse_args()
    checkouts = dict(c.split("=", 1) for c in (args.checkout or [f"this={HERE.parent}"]))

    sys.path.insert(0, str(HERE))
    from bench_scale import write_population

    from dynamo_dist.config import MetaConfig

    # the fields set here only: every checkout reads them (a newer one's other fields keep their defaults)
    cfg = {"hidden_size": args.meta_hidden, "embedding_dim": args.dim, "steps": 100}
    MetaConfig(**cfg)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-finalize-") as tmp:
        work = Path(tmp)
        write_population(work / "population", args.models, args.base_hidden, 8, 8)
        ids = [f"m-{i:05d}" for i in range(args.models)]
        ckpt_mb = write_checkpoint(work / "ckpt", ids, args.workers, args.dim, args.base_hidden, args.meta_hidden, cfg,
                                   args.table_form)
        for name, path in checkouts.items():
            out = work / f"out-{name}"
            res = subprocess.run([sys.executable, "-c", CHILD, str(Path(path).resolve()), str(work / "population"),
                                  str(work / "ckpt"), str(out), json.dumps(cfg),
                                  "copy" if args.inference_copy else "-"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(path).resolve())})
            if res.returncode != 0:
                raise SystemExit(f"checkout {name} ({path}) failed:\n{res.stderr[-3000:]}")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            got["output_mb"] = own_mb(out, exclude=work / "ckpt")
            runs[name] = got
            print(name, json.dumps(got), flush=True)
    result = {"what": "driver peak RSS and seconds of ray_train.finalize on one synthetic final checkpoint",
              "command": "python benchmarks/bench_finalize.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "models": args.models, "workers": args.workers, "checkpoint_mb": ckpt_mb, "runs": runs}
    names = list(runs)
    if len(names) == 2:
        a, b = (runs[n] for n in names)
        result["ratios"] = {f"peak_rss_{names[1]}_over_{names[0]}": b["peak_rss_mb"] / a["peak_rss_mb"],
                            f"seconds_{names[1]}_over_{names[0]}": b["seconds"] / a["seconds"]}
        if "copy_seconds" in a and "copy_seconds" in b:
            result["ratios"][f"copy_seconds_{names[1]}_over_{names[0]}"] = b["copy_seconds"] / a["copy_seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("ratios", {}), indent=1))


if __name__ == "__main__":
    main()
