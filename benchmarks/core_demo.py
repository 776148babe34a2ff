"""Single-process DYNAMO on three real populations (no Ray): the core's quality numbers.

    python benchmarks/core_demo.py [--only mnist1d|tweets|digits] [--out benchmarks/results/core_demo.json]

* mnist1d: the demo recipe (12 GRUs, 100% vs 25% of the base-training pool);
* tweets: 8 GRUs on binary tweet sentiment (100% vs 25%);
* digits: 4 small ResNets (resnet10) on scikit-learn digits (100% vs 25%).
For each: population wall time, meta wall time, mean test agreement / hidden R^2 / meta and
base accuracy, silhouette of theta against the groups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import silhouette_score

from dynamo_dist import config
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.population import train as population


def cases(root: Path) -> dict[str, config.PipelineConfig]:
    demo = config.recipe("demo").model_dump()
    demo["run_dir"] = str(root / "mnist1d")
    for k in ("population", "meta"):
        for p in ("root", "output_dir"):
            demo[k].pop(p, None)
    tweet = dict(task="tweets", arch="gru", hidden_size=32, embed_dim=32, num_seeds=4, epochs=4, lr=3e-3,
                 batch_size=64)
    tweets = {
        "run_dir": str(root / "tweets"),
        "population": {"groups": [{**tweet, "name": "gru-full", "train_fraction": 1.0},
                                  {**tweet, "name": "gru-quarter", "train_fraction": 0.25}],
                       "num_probe": 1000, "num_test": 500},
        "meta": {"steps": 1500, "hidden_size": 128, "embed_dim": 64, "embedding_dim": 8, "batch_size": 64},
    }
    res = dict(task="digits", arch="resnet10", num_seeds=2, epochs=8, lr=3e-3, batch_size=64)
    digits = {
        "run_dir": str(root / "digits"),
        "population": {"groups": [{**res, "name": "resnet-full", "train_fraction": 1.0},
                                  {**res, "name": "resnet-quarter", "train_fraction": 0.25}],
                       "num_probe": 600, "num_test": 300},
        "meta": {"steps": 400, "embedding_dim": 4, "batch_size": 32, "models_per_step": 2, "resnet_arch": "resnet10",
                 "eval_every": 100},
    }
    return {"mnist1d": config.parse(config.PipelineConfig, demo),
            "tweets": config.parse(config.PipelineConfig, tweets),
            "digits": config.parse(config.PipelineConfig, digits)}


def run_case(cfg: config.PipelineConfig) -> dict:
    t = time.perf_counter()
    rows = population.run_local(cfg.population, progress=False)
    pop_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_meta_local(cfg.meta, cfg.population.root, progress=False)
    meta_s = time.perf_counter() - t
    emb = pq.read_table(Path(cfg.meta.output_dir) / "embeddings.parquet")
    theta = np.array(emb.column("theta").to_pylist())
    groups = emb.column("group").to_pylist()
    sil = float(silhouette_score(theta, groups)) if len(set(groups)) > 1 else float("nan")
    return {"num_models": len(rows), "population_seconds": round(pop_s, 1), "meta_seconds": round(meta_s, 1),
            "groups": population.group_summary(rows), "silhouette_theta_vs_group": sil,
            **{k: v for k, v in summary.items() if k.startswith("mean_")},
            "meta_steps": cfg.meta.steps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["mnist1d", "tweets", "digits"], action="append")
    ap.add_argument("--root", default="runs/core_demo")
    ap.add_argument("--out", default="benchmarks/results/core_demo.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name, cfg in cases(Path(args.root)).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        results[name] = run_case(cfg)
        print(json.dumps(results[name], indent=1), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
