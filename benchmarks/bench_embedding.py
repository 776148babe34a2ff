"""How the meta run's settings shape theta-space: group recovery, dimension and emulation.

For each population (``--population NAME=ROOT``, a recorded store) and each point of the grid
(``--alpha`` = ``meta.embedding_penalty``, ``--lam`` = ``meta.output_weight``, ``--steps``,
``--seeds``), one single-process meta run (the demo recipe's meta settings otherwise; one
intra-op thread, ``--jobs`` runs side by side) into ``--out/<population>/<point>/meta``; a
finished run there is reused. Measured per run, theta against the manifest's ``group``:

* the report's like-for-like scores (``comparison.MethodComparison``, no bootstrap):
  ``silhouette_full`` (theta's Euclidean distances), ``silhouette_2d`` (PCA-2), ``ari_full`` /
  ``ari_2d`` (k-means, k = groups, on theta / on PCA-2), ``nn_accuracy`` (leave-one-out 1-NN);
* ``ari_pc1``: k-means ARI on theta's first principal component alone; ``pc1_test_accuracy_spearman``
  (|rho|) and ``_p`` (permutation): how closely PC1 orders the models by their test accuracy;
* ``components_95``: principal components holding 95% of theta's variance;
* ``agreement`` / ``hidden_r2``: the run's test-split emulation means (``summary.json``);
* ``seconds``: this command's wall time for the run (None: a finished run of that point was
  reused); ``meta_seconds``: the run's own wall time (its ``summary.json``).

Per population, the same scores of the references on the same models: CKA distances (recorded
probe hidden states, 2,048 rows, as the report computes them; 2-D: classical MDS, where the
report draws metric MDS) and the base models' output distances (``comparison.output_distances``:
what the models compute).

    python benchmarks/bench_embedding.py --population demo=runs/demo/population \\
        --alpha 0 1 10 --steps 6000 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_META = dict(hidden_size=96, embedding_dim=8, models_per_step=4, batch_size=32, lr=3e-3, embedding_lr=1e-2,
                 eval_every=500, checkpoint_every=100_000)

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from dynamo_dist.config import MetaConfig
from dynamo_dist.meta import outputs
from dynamo_dist.meta.local import run_meta_local
cfg = MetaConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
if outputs.has_finished(cfg.output_dir):
    print(json.dumps({"seconds": None}))  # an earlier run of this point, reused
else:
    run_meta_local(cfg, sys.argv[2], progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _scores(distances, labels, num_dims: int) -> dict:
    """The report's like-for-like metrics (``comparison.MethodComparison``, no bootstrap): silhouette on the
    full distances and on the 2-D classical MDS (PCA-2 for theta), k-means ARI on the min(d, N-1)-D
    classical MDS and on the 2-D one, leave-one-out 1-NN group accuracy."""
    from dynamo_dist.analysis.comparison import MethodComparison

    fit = MethodComparison(num_dims=num_dims, num_bootstrap=0, random_state=0).fit({"m": distances}, labels)
    return {k: float(v) for k, v in fit.scores_["m"].items()}


def theta_scores(meta_dir: Path, root: str) -> dict:
    import pyarrow.parquet as pq

    from dynamo_dist.analysis import comparison
    from dynamo_dist.data import store

    from dynamo_dist.analysis.geometry import EmbeddingGeometry, axis_correlations

    rows = {r["model_id"]: r for r in store.manifest_rows(root)}
    emb = pq.read_table(meta_dir / "embeddings.parquet").to_pylist()
    theta = np.array([r["theta"] for r in emb], dtype=np.float64)
    labels = [rows[r["model_id"]]["group"] for r in emb]
    geo = EmbeddingGeometry().fit(theta)  # the report's PCA
    summary = json.loads((meta_dir / "summary.json").read_text())
    pc1 = (theta - geo.mean_) @ geo.components_[0]
    k = len(set(labels))
    pc1_labels = comparison.kmeans(pc1[:, None], k, 0).labels_
    acc = axis_correlations(pc1[:, None], [rows[r["model_id"]]["test_accuracy"] for r in emb])[0]
    return {**_scores(comparison.euclidean_distances(theta), labels, theta.shape[1]),
            "ari_pc1": float(comparison.adjusted_rand(comparison.encode_labels(labels), pc1_labels)),
            "pc1_test_accuracy_spearman": abs(acc["spearman"]), "pc1_test_accuracy_p": acc["p_value"],
            "components_95": geo.num_components_,
            "variance_ratio": [float(v) for v in geo.explained_variance_ratio_],
            "theta_norm_mean": float(np.linalg.norm(theta, axis=1).mean()),
            "agreement": summary["mean_agreement"], "hidden_r2": summary["mean_hidden_r2"],
            "meta_seconds": summary.get("wall_seconds")}


def references(root: str, num_dims: int, rows_per_model: int = 2048) -> dict:
    """The same metrics for CKA distances (recorded probe hidden states, as the report computes them)
    and for the base models' output distances (``comparison.output_distances``)."""
    from dynamo_dist.analysis import comparison
    from dynamo_dist.analysis.baseline import pairwise_distances
    from dynamo_dist.data import store
    from dynamo_dist.meta.objective import step_mask

    rows = store.manifest_rows(root)
    labels = [r["group"] for r in rows]
    probe = {r["model_id"]: store.read_trajectory(root, r["model_id"], "probe") for r in rows}
    inputs = store.read_inputs(root, rows[0]["task"], "probe")
    n = min(t.num_examples for t in probe.values())
    mask = step_mask(inputs.lengths[:n], next(iter(probe.values())).hiddens[0].shape[1])
    total = int(mask.sum())
    select = np.sort(np.random.default_rng(0).choice(total, size=min(total, rows_per_model), replace=False))
    taps = [[probe[r["model_id"]].hiddens[0][:n][mask][select].numpy()] for r in rows]
    test = [store.read_trajectory(root, r["model_id"], "test").outputs for r in rows]
    m = min(t.shape[0] for t in test)
    logits = np.stack([t[:m, -1].numpy() for t in test])
    return {"num_models": len(rows), "groups": {g: int(c) for g, c in zip(*np.unique(labels, return_counts=True))},
            "cka": _scores(pairwise_distances(taps, "cka"), labels, num_dims),
            "outputs": _scores(comparison.output_distances(logits), labels, num_dims)}


def _value(text: str):
    """A --set value: a number when it reads as one (YAML 1.1 takes 3e-3 for a string), else YAML."""
    import yaml

    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", action="append", required=True, help="NAME=ROOT of a recorded population")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.0], help="meta.embedding_penalty values")
    ap.add_argument("--lam", type=float, nargs="+", default=[10.0], help="meta.output_weight values")
    ap.add_argument("--steps", type=int, nargs="+", default=[6000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="another meta setting for every run (YAML value), e.g. embedding_lr=3e-3")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (one thread each)")
    ap.add_argument("--out", default="/tmp/bench_embedding", help="where the meta runs go (reused when finished)")
    ap.add_argument("--json", default=str(RESULTS / "embedding.json"))
    args = ap.parse_args(argv)
    pops = dict(p.split("=", 1) for p in args.population)
    fixed = {k: _value(v) for k, v in (a.split("=", 1) for a in args.set)}
    tag = "".join(f"-{k}{v}" for k, v in sorted(fixed.items()))
    grid = list(itertools.product(pops, args.alpha, args.lam, args.steps, args.seeds))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started, results, queue = time.time(), [], list(grid)
    running: list[tuple[tuple, subprocess.Popen, Path]] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            point = queue.pop(0)
            name, alpha, lam, steps, seed = point
            meta_dir = Path(args.out) / name / f"a{alpha:g}-l{lam:g}-t{steps}{tag}-s{seed}" / "meta"
            cfg = {**DEMO_META, **fixed, "steps": steps, "seed": seed, "output_weight": lam, "embedding_penalty": alpha,
                   "output_dir": str(meta_dir)}
            proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), pops[name]], env=env,
                                    stdout=subprocess.PIPE, text=True)
            running.append((point, proc, meta_dir))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            (name, alpha, lam, steps, seed), proc, meta_dir = item
            out = proc.stdout.read()
            if proc.returncode != 0:
                print(f"failed: {item[0]}", file=sys.stderr)
                continue
            rec = {"population": name, **fixed, "alpha": alpha, "lambda": lam, "steps": steps, "seed": seed,
                   "seconds": json.loads(out.strip().splitlines()[-1])["seconds"],
                   **theta_scores(meta_dir, pops[name])}
            results.append(rec)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                              if k != "variance_ratio"}), flush=True)
    doc = {"what": "theta-space group recovery, dimension and emulation against meta settings",
           "command": "python benchmarks/bench_embedding.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "meta": {**DEMO_META, **fixed},
           "references": {name: references(root, DEMO_META["embedding_dim"]) for name, root in pops.items()},
           "runs": sorted(results, key=lambda r: (r["population"], r["alpha"], r["lambda"], r["steps"], r["seed"])),
           "wall_seconds": time.time() - started}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["references"], indent=1))
    print(f"written: {args.json}")
    return 0 if len(results) == len(grid) else 1


if __name__ == "__main__":
    sys.exit(main())
