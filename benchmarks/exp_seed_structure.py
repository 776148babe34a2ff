"""Experiment (issue 27): the structure goals on the product path, per meta seed.

Reads the runs of ``dynamo-dist seeds`` (Ray Train, the recipe as a user runs it: ``<run_dir>/meta-seeds/
seed-<s>/``) and scores every seed as ``bench_convergence.py`` scores a run: test agreement and hidden R^2
(the run's ``summary.json``), components for 95% of theta's variance, silhouette and k-means ARI of the
groups on theta, the ARI between the seeds' k-means labelings (the seeds command's own
``seed-stability/seed_stability.json``), and the Spearman correlation of theta's
distances with the base models' own behaviour distances; the CKA-MDS and behaviour baselines beside them.

    python benchmarks/exp_seed_structure.py --run-dir /tmp/seeds_lr-conditions \\
        --population runs/lr-conditions/population --out benchmarks/results/seeds_structure_lr-conditions.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench_convergence import _structure, cka_baseline, functional_baseline, theta_vs_function


def main() -> None:
    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="the run_dir given to `dynamo-dist seeds`")
    ap.add_argument("--population", required=True)
    ap.add_argument("--label", default="group")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = []
    for seed_dir in sorted(Path(args.run_dir, "meta-seeds").glob("seed-[0-9]*")):
        emb = pq.read_table(str(seed_dir / "embeddings.parquet")).to_pandas()
        theta = np.stack(emb["theta"].to_numpy()).astype(np.float64)
        labels = [str(v) for v in emb[args.label]]
        summary = json.loads((seed_dir / "summary.json").read_text())
        seed = int(seed_dir.name.split("-")[1])
        runs.append({"seed": seed, "agreement": summary["mean_agreement"], "hidden_r2": summary["mean_hidden_r2"],
                     "steps": summary["steps"], "wall_seconds": summary["wall_seconds"],
                     **_structure(theta, labels, seed),
                     "model_ids": emb["model_id"].tolist(), "theta": theta.tolist()})
    functional = functional_baseline(args.population, args.label)
    theta_vs_function(runs, functional)
    stability = json.loads(Path(args.run_dir, "meta-seeds", "seed-stability", "seed_stability.json").read_text())
    pairwise = np.asarray(stability["pairwise"]["adjusted_rand"], dtype=np.float64)
    pairs = pairwise[np.triu_indices(len(pairwise), 1)]
    doc = {"what": __doc__.splitlines()[0], "run_dir": args.run_dir, "population": args.population,
           "cka_mds": cka_baseline(args.population, args.label, 0),
           "function": {k: v for k, v in functional.items() if k.startswith(("silhouette", "components"))},
           "between_seed_ari": {"mean": float(np.mean(pairs)), "min": float(np.min(pairs))},
           "runs": [{k: v for k, v in r.items() if k not in ("model_ids", "theta")} for r in runs]}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("cka_mds", "function", "between_seed_ari", "runs")}, indent=1))


if __name__ == "__main__":
    main()
