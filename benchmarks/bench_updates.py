"""How test agreement grows with the updates each model's theta/V gets (issue 12's 0.90 goal at N ~ 1,000).

A meta run over N models with ``models_per_step`` m per worker and W workers gives each model
``steps x m x W / N`` updates on average (``meta.updates_per_model``). At a fixed step budget a
larger population means fewer updates per model. This benchmark separates the two: for each ``--per-group`` K it
draws a sub-population of K members per group from a recorded population (seeded; files
hard-linked, nothing decoded or rewritten) and runs single-process meta runs
(``meta.run_meta_local``, one intra-op thread each, ``--jobs`` side by side) with the meta
settings of ``--config`` at each ``--updates`` x ``--embedding-lr`` point. ``--steps S`` adds, for
each K, the run of S steps (the updates per model S x m / N that S steps give there): with
several K it compares populations of different N at one step budget.

Measured per run (test split, every model of the sub-population): ``agreement``, ``hidden_r2``
and ``meta_accuracy`` means from the run's ``summary.json``, its ``steps`` and wall ``seconds``.

    python benchmarks/bench_updates.py --population runs/population-1000/population \\
        --config configs/population-1000.yaml --per-group 8 32 --updates 100 400 --steps 6400 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links (copies across filesystems) of every file under ``src`` in ``dst``."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)


def sub_population(src: str, dest: Path, per_group: int, seed: int) -> list[str]:
    """A population root at ``dest`` holding ``per_group`` members of every group of ``src`` (drawn with
    ``seed``), its inputs and their trajectory files; the model ids. An existing ``dest`` is reused."""
    from dynamo_dist.data import store

    if (dest / "manifest.parquet").is_file():
        return [r["model_id"] for r in store.manifest_rows(dest)]
    rows = store.manifest_rows(src)
    rng = np.random.default_rng(seed)
    chosen = []
    for g in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == g]
        if len(members) < per_group:
            raise ValueError(f"--per-group {per_group}: group {g!r} of {src} has {len(members)} members")
        chosen += [members[i] for i in sorted(rng.choice(len(members), size=per_group, replace=False))]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    store.init_root(tmp, store.read_spec(src))
    _link_tree(Path(src) / "inputs", tmp / "inputs")
    for r in chosen:
        for key in ("probe_path", "test_path"):
            target = tmp / r[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(Path(src) / r[key], target)
    store.upsert_manifest(tmp, chosen)
    tmp.rename(dest)
    return [r["model_id"] for r in chosen]


def _run(args: tuple) -> dict:
    import torch

    from dynamo_dist import config
    from dynamo_dist.meta.local import run_meta_local

    cfg_path, root, out, updates, emb_lr, per_group, num_models, extra = args
    torch.set_num_threads(1)
    over = {**extra, "meta.output_dir": str(out), "meta.num_workers": 1, "meta.updates_per_model": updates}
    if emb_lr is not None:
        over["meta.embedding_lr"] = emb_lr
    cfg = config.load(cfg_path, overrides=over).meta
    t0 = time.perf_counter()
    summary = run_meta_local(cfg, root, progress=False)
    return {"per_group": per_group, "num_models": num_models, "updates_per_model": updates, "set": extra,
            "embedding_lr": cfg.embedding_lr, "steps": summary["steps"],
            "agreement": summary["mean_agreement"], "hidden_r2": summary["mean_hidden_r2"],
            "meta_accuracy": summary["mean_meta_accuracy"], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", required=True, help="a recorded population root")
    ap.add_argument("--config", required=True, help="pipeline YAML whose meta section is used")
    ap.add_argument("--per-group", type=int, nargs="+", default=[8])
    ap.add_argument("--seed", type=int, default=0, help="seed of the members drawn")
    ap.add_argument("--updates", type=int, nargs="+", default=[100, 400])
    ap.add_argument("--steps", type=int, help="also a run of this many steps for each --per-group")
    ap.add_argument("--embedding-lr", type=float, nargs="+", default=[None])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a meta field for every run (e.g. output_weight=30); repeatable")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/bench_updates")
    ap.add_argument("--out", default=str(RESULTS / "updates.json"))
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from dynamo_dist import config

    extra = {f"meta.{k}": yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    tag = "".join(f"-{k[5:]}{v}" for k, v in sorted(extra.items()))
    meta = config.load(args.config, overrides=extra).meta
    points, sizes = [], {}
    for k in args.per_group:
        root = work / f"sub-{k}-s{args.seed}"
        sizes[k] = len(sub_population(args.population, root, k, args.seed))
        updates = set(args.updates)
        if args.steps:
            updates.add(max(1, round(args.steps * meta.models_per_step / sizes[k])))
        points += [(args.config, str(root), work / f"meta-k{k}-u{u}-elr{e}{tag}", u, e, k, sizes[k], extra)
                   for e in args.embedding_lr for u in updates]
    points.sort(key=lambda p: -p[3] * p[6])  # longest first: the pool's jobs end together
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = []
        for rec in pool.map(_run, points):
            print(json.dumps(rec), flush=True)
            runs.append(rec)
    doc = {"what": "test agreement against updates per model (single-process meta runs on a sub-population)",
           "command": "python benchmarks/bench_updates.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "population": args.population, "num_models": sizes, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
