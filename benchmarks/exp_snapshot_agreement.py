"""Experiment (issue 27): how alike are the base models themselves, against how well the meta-model emulates them.

Per group of a population recorded with several epochs of each training run (``every_epoch``), on the
test split: the decision agreement of a run's adjacent epoch snapshots, of its first and last recorded
epochs, and of the last epochs of two seeds; beside them, the mean test agreement of a finished meta run
with the group's models (its ``model_metrics.parquet``). A meta-model that emulates a model at agreement
a cannot tell apart two models that agree with each other at more than about a. JSON to ``--out``.

    python benchmarks/exp_snapshot_agreement.py --population runs/population-1000/population \\
        --meta-run /tmp/p1000_h192 --out benchmarks/results/pop1000_snapshot_agreement.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench_convergence import _last_outputs


def snapshot_agreement(root: str, meta_run: str | None) -> dict:
    import pyarrow.parquet as pq

    from dynamo_dist.meta.trainer import load_population

    data = load_population(root, with_test=True)
    decisions = {r["model_id"]: _last_outputs(data.test[r["model_id"]].outputs).argmax(-1) for r in data.rows}
    meta = None
    if meta_run:
        meta = pq.read_table(str(Path(meta_run) / "model_metrics.parquet")).to_pandas().set_index("model_id")["agreement"]
    out = {}
    for group in sorted({r["group"] for r in data.rows}):
        runs: dict[int, dict[int, str]] = {}
        for r in data.rows:
            if r["group"] == group:
                runs.setdefault(r["seed"], {})[r["epoch"]] = r["model_id"]
        agree = lambda a, b: float(np.mean(decisions[a] == decisions[b]))  # noqa: E731
        adjacent, ends, seeds = [], [], sorted(runs)
        for s in seeds:
            epochs = sorted(runs[s])
            adjacent += [agree(runs[s][a], runs[s][b]) for a, b in zip(epochs, epochs[1:])]
            ends.append(agree(runs[s][epochs[0]], runs[s][epochs[-1]]))
        other = [agree(runs[a][max(runs[a])], runs[b][max(runs[b])]) for a, b in zip(seeds, seeds[1:])]
        out[group] = {"models": sum(len(e) for e in runs.values()), "adjacent_epochs": float(np.mean(adjacent)),
                      "first_vs_last_epoch": float(np.mean(ends)), "other_seed": float(np.mean(other))}
        if meta is not None:
            ids = [m for e in runs.values() for m in e.values()]
            out[group]["meta_agreement"] = float(meta[ids].mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", required=True)
    ap.add_argument("--meta-run", help="a finished meta run's output directory on this population")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    doc = {"what": __doc__.splitlines()[0], "population": args.population, "meta_run": args.meta_run,
           "groups": snapshot_agreement(args.population, args.meta_run)}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["groups"], indent=1))


if __name__ == "__main__":
    main()
