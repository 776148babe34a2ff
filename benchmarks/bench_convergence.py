"""Emulation quality and theta-space structure against updates per model, for meta recipes side by side.

Issue 27's yardstick: how many updates of each model's theta_n/V_n (and how much wall time) a meta
recipe needs to reach a test agreement / hidden R^2, and how clean its theta-space is on the same
runs. For each ``--methods`` x ``--seeds`` it runs a single-process meta run (``DynamoTrainer``,
one intra-op thread, ``--jobs`` side by side) on a recorded population with the meta settings of
``--config``, scheduled for the largest ``--updates`` (``meta.updates_per_model``), and at every
``--updates`` point measures, on every model:

* ``agreement``, ``hidden_r2`` (test split means, ``meta.metrics``), ``seconds`` of training so far;
* theta structure (``analysis.geometry``): ``components_95`` (PCA components for 95% of theta's
  variance), ``silhouette`` of the population's groups on theta distances, ``ari`` of k-means
  (k = number of groups) against them.

Once per population: the CKA+MDS baseline's silhouette and ARI on the same models (probe
activations), and the base models' own behaviour on the test split (``function``: the groups'
silhouette on decision disagreement and on Jensen-Shannon distance, and how many MDS axes hold 95% of
each); per run, the Spearman correlation of theta's pairwise distances with those behaviour distances
(``theta_vs_function``); per method with several seeds: the ARI between the seeds' k-means labelings
at the last point. ``--updates-for METHOD:U1,U2`` gives one method its own schedule (the old recipe
at more updates than the new in the same command). JSON in ``benchmarks/results/``, a plot of the
curves and a markdown table beside it (``--table`` JSON...: only the tables of earlier results).

    python benchmarks/bench_convergence.py --population runs/demo/population --config configs/demo.yaml \\
        --methods varpro paper --updates 50 100 200 400 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def _structure(theta: np.ndarray, labels: list[str], seed: int) -> dict:
    from dynamo_dist.analysis.geometry import EmbeddingGeometry

    geo = EmbeddingGeometry(0.95, random_state=seed).fit(theta, labels)
    return {"components_95": int(geo.num_components_), "silhouette": geo.scores_["silhouette"],
            "ari": geo.scores_["adjusted_rand"]}


def _kmeans_labels(theta: np.ndarray, k: int, seed: int) -> list[int]:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(theta).labels_.tolist()


def _run(args: tuple) -> dict:
    import torch

    from dynamo_dist import config
    from dynamo_dist.meta.metrics import evaluate, summarize
    from dynamo_dist.meta.trainer import DynamoTrainer, load_population

    cfg_path, root, method, seed, updates, extra, label_key = args
    torch.set_num_threads(1)
    over = {**extra, "meta.method": method.split("@")[0], "meta.seed": seed, "meta.num_workers": 1,
            "meta.updates_per_model": max(updates)}
    data = load_population(root)
    cfg = config.load(cfg_path, overrides=over).meta.for_population(len(data.rows))
    per_step = min(cfg.models_per_step, len(data.rows))
    at_steps = {max(1, round(u * len(data.rows) / per_step)): u for u in updates}
    labels = [str(r[label_key]) for r in data.rows]
    trainer = DynamoTrainer(cfg, data)
    points, train_s = [], 0.0
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        trainer.train_step()
        train_s += time.perf_counter() - t0
        if trainer.step == cfg.steps and trainer.solves_maps:
            trainer.refit_maps()  # as the stage does before its last report (``fit_with_reports``)
        if trainer.step in at_steps or trainer.step == cfg.steps:
            means = summarize(evaluate(trainer, "test"))
            theta = trainer.embeddings.theta_matrix().cpu().double().numpy()
            points.append({"updates_per_model": trainer.step * per_step / len(data.rows), "step": trainer.step,
                           "seconds": train_s, "agreement": means["mean_agreement"],
                           "hidden_r2": means["mean_hidden_r2"], **_structure(theta, labels, seed),
                           "kmeans": _kmeans_labels(theta, len(set(labels)), seed)})
            print(json.dumps({"method": method, "seed": seed, **{k: v for k, v in points[-1].items()
                                                                  if k != "kmeans"}}), flush=True)
    return {"method": method, "seed": seed, "set": extra, "steps": cfg.steps, "points": points,
            "model_ids": data.model_ids, "theta": theta.tolist()}


def cka_baseline(root: str, label_key: str, seed: int, max_rows: int = 4096) -> dict:
    """The CKA+MDS baseline's silhouette (CKA distances) and k-means ARI (2-d MDS) on the population."""
    from dynamo_dist.analysis.baseline import RepresentationBaseline, activation_taps
    from dynamo_dist.meta.trainer import load_population

    data = load_population(root, with_test=False)
    taps = []
    for r in data.rows:
        traj = data.probe[r["model_id"]]
        lengths = data.probe_inputs[r["task"]].lengths
        taps.append(activation_taps([h.float() for h in traj.hiddens], data.family, lengths))
    labels = [str(r[label_key]) for r in data.rows]
    fit = RepresentationBaseline("cka", max_rows=max_rows, random_state=seed).fit(taps, labels)
    return {"silhouette": fit.scores_["silhouette"], "ari": fit.scores_["adjusted_rand"]}


def _last_outputs(outputs) -> "np.ndarray":
    """A model's class scores at the decision (the last step of an RNN's outputs), float64 (E, C)."""
    out = outputs.double().numpy()
    return out[:, -1] if out.ndim == 3 else out


def functional_baseline(root: str, label_key: str) -> dict | None:
    """How separated the groups are in what the base models themselves do, on the test split.

    Two distances between every pair of models: the fraction of test inputs on which their decisions
    differ (1 - agreement, the quantity the meta-model's agreement measures), and the mean
    Jensen-Shannon divergence of their output distributions. The groups' silhouette on each is the
    structure a theta-space that emulates behaviour faithfully can show; ``distances`` are kept for
    ``theta_vs_function``. None when the models do not share one task (no common inputs).
    """
    from dynamo_dist.analysis.geometry import clustering_scores
    from dynamo_dist.meta.trainer import load_population

    data = load_population(root, with_test=True)
    if len({r["task"] for r in data.rows}) != 1:
        return None
    logits = np.stack([_last_outputs(data.test[mid].outputs) for mid in data.model_ids])   # (N, E, C)
    decisions = logits.argmax(-1)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    logp = np.log(np.clip(probs, 1e-12, None))
    n = len(probs)
    disagree, js = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        disagree[i] = (decisions[i] != decisions).mean(-1)
        mix = 0.5 * (probs[i] + probs)
        logm = np.log(np.clip(mix, 1e-12, None))
        js[i] = 0.5 * ((probs[i] * (logp[i] - logm)).sum(-1) + (probs * (logp - logm)).sum(-1)).mean(-1)
    labels = [str(r[label_key]) for r in data.rows]
    js_distance = np.sqrt(np.clip(js, 0, None))
    return {"model_ids": data.model_ids,
            "silhouette_disagreement": clustering_scores(labels, distances=disagree)["silhouette"],
            "silhouette_js": clustering_scores(labels, distances=js_distance)["silhouette"],
            "components_95_disagreement": mds_components(disagree),
            "components_95_js": mds_components(js_distance),
            "distances": {"disagreement": disagree, "js": js}}


def mds_components(distances: np.ndarray, threshold: float = 0.95) -> int:
    """Classical MDS of a distance matrix: how many axes hold ``threshold`` of its (positive) variance,
    the counterpart of theta's ``components_95`` for points known only by their distances."""
    from dynamo_dist.analysis.baseline import classical_mds
    from dynamo_dist.analysis.geometry import num_components_for

    variance = (classical_mds(distances, len(distances)) ** 2).sum(axis=0)   # the positive eigenvalues, descending
    return num_components_for(variance / variance.sum(), threshold)


def theta_vs_function(runs: list[dict], functional: dict | None) -> None:
    """Per run, the Spearman correlation of theta's pairwise distances with the base models' functional
    distances (upper triangle): does a pair that is near in theta also behave alike? In place."""
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import spearmanr

    if functional is None:
        return
    for run in runs:
        order = [run["model_ids"].index(m) for m in functional["model_ids"]]
        d_theta = squareform(pdist(np.asarray(run["theta"])[order]))
        upper = np.triu_indices(len(order), 1)
        run["theta_vs_function"] = {name: float(spearmanr(d_theta[upper], d[upper]).statistic)
                                    for name, d in functional["distances"].items()}


def between_seed_ari(runs: list[dict]) -> dict[str, float]:
    """Per method, the mean (and min) ARI between the k-means labelings of its seeds at the last point."""
    from sklearn.metrics import adjusted_rand_score

    out = {}
    for method in sorted({r["method"] for r in runs}):
        labs = [r["points"][-1]["kmeans"] for r in runs if r["method"] == method]
        pairs = [adjusted_rand_score(a, b) for a, b in itertools.combinations(labs, 2)]
        if pairs:
            out[method] = {"mean": float(np.mean(pairs)), "min": float(np.min(pairs))}
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colours = {}
    for run in doc["runs"]:
        c = colours.setdefault(run["method"], f"C{len(colours)}")
        u = [p["updates_per_model"] for p in run["points"]]
        s = [p["seconds"] for p in run["points"]]
        lab = f"{run['method']} seed {run['seed']}"
        axes[0].plot(u, [p["agreement"] for p in run["points"]], "o-", color=c, label=lab, alpha=0.8)
        axes[1].plot(s, [p["agreement"] for p in run["points"]], "o-", color=c, alpha=0.8)
        axes[2].plot(u, [p["hidden_r2"] for p in run["points"]], "o-", color=c, alpha=0.8)
        axes[3].plot(u, [p["silhouette"] for p in run["points"]], "o-", color=c, alpha=0.8)
    axes[3].axhline(doc["cka_mds"]["silhouette"], color="k", ls="--", label="CKA-MDS")
    for ax, (xl, yl) in zip(axes, [("updates per model", "test agreement"), ("training seconds", "test agreement"),
                                   ("updates per model", "test hidden R²"), ("updates per model", "θ silhouette")]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"{doc['population']} ({doc['num_models']} models)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def markdown(doc: dict) -> str:
    """The runs as one table: per method and point, the mean over seeds (min-max where seeds differ)."""
    def cell(values: list[float], fmt: str = "{:.3f}") -> str:
        lo, hi, mean = min(values), max(values), sum(values) / len(values)
        return fmt.format(mean) if len(values) == 1 or hi - lo < 5e-4 else \
            f"{fmt.format(mean)} ({fmt.format(lo)}-{fmt.format(hi)})"

    lines = [f"{doc['population']} ({doc['num_models']} models); CKA-MDS silhouette "
             f"{doc['cka_mds']['silhouette']:.3f}, ARI {doc['cka_mds']['ari']:.2f}",
             "", "| method | seeds | updates/model | seconds | agreement | hidden R2 | components 95% | silhouette | "
             "k-means ARI |", "|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in doc["runs"]):
        runs = [r for r in doc["runs"] if r["method"] == method]
        for k, p in enumerate(runs[0]["points"]):
            pts = [r["points"][k] for r in runs]
            lines.append(f"| {method} | {len(runs)} | {p['updates_per_model']:.0f} | {cell([q['seconds'] for q in pts], '{:.0f}')} | "
                         f"{cell([q['agreement'] for q in pts])} | {cell([q['hidden_r2'] for q in pts])} | "
                         f"{cell([q['components_95'] for q in pts], '{:.1f}')} | {cell([q['silhouette'] for q in pts])} | "
                         f"{cell([q['ari'] for q in pts], '{:.2f}')} |")
    for method, v in doc["between_seed_ari"].items():
        lines.append(f"\nbetween-seed ARI of k-means ({method}): mean {v['mean']:.2f}, min {v['min']:.2f}")
    if doc.get("function"):
        f = doc["function"]
        lines.append(f"\nthe base models' own behaviour (test split): groups' silhouette on decision disagreement "
                     f"{f['silhouette_disagreement']:.3f}, on Jensen-Shannon distance {f['silhouette_js']:.3f}; "
                     f"MDS components for 95% {f.get('components_95_disagreement', '-')} / {f.get('components_95_js', '-')}")
        for method in dict.fromkeys(r["method"] for r in doc["runs"]):
            rs = [r["theta_vs_function"] for r in doc["runs"] if r["method"] == method and "theta_vs_function" in r]
            if rs:
                lines.append(f"{method}: Spearman of theta distances with disagreement "
                             f"{cell([r['disagreement'] for r in rs], '{:.2f}')}, with JS {cell([r['js'] for r in rs], '{:.2f}')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", help="a recorded population root")
    ap.add_argument("--config", help="pipeline YAML whose meta section is used")
    ap.add_argument("--methods", nargs="+", default=["varpro", "paper"],
                    help="meta.method values; METHOD@NAME is a variant of METHOD (its own --set-for METHOD@NAME:...)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--updates", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a meta field for every run (e.g. maps_ridge=0.3); repeatable")
    ap.add_argument("--set-for", action="append", default=[], metavar="METHOD:FIELD=VALUE",
                    help="a meta field for one method's runs (e.g. paper:lr=0.003, the old recipe's value); repeatable")
    ap.add_argument("--updates-for", action="append", default=[], metavar="METHOD:U1,U2,...",
                    help="one method's own --updates (its schedule ends at the largest); repeatable")
    ap.add_argument("--label", default="group", help="manifest column whose values are the groups")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "convergence.json"))
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown tables of these results and stop")
    args = ap.parse_args(argv)
    if args.table:
        for path in args.table:
            print(markdown(json.loads(Path(path).read_text())))
        return 0

    if not (args.population and args.config):
        ap.error("--population and --config are required (unless --table)")
    extra = {f"meta.{k}": yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    t0 = time.perf_counter()
    per_method = {m: dict(extra) for m in args.methods}
    for item in args.set_for:
        method, kv = item.split(":", 1)
        if method not in per_method:
            raise SystemExit(f"--set-for {item}: method {method!r} is not in --methods {args.methods}")
        k, v = kv.split("=", 1)
        per_method[method][f"meta.{k}"] = yaml.safe_load(v)
    updates = {m: sorted(args.updates) for m in args.methods}
    for item in args.updates_for:
        method, values = item.split(":", 1)
        if method not in updates:
            raise SystemExit(f"--updates-for {item}: method {method!r} is not in --methods {args.methods}")
        updates[method] = sorted(int(v) for v in values.split(","))
    points = [(args.config, args.population, m, s, updates[m], per_method[m], args.label)
              for m in args.methods for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(_run, points))
    from dynamo_dist.data import store

    functional = functional_baseline(args.population, args.label)
    theta_vs_function(runs, functional)
    doc = {"what": "test agreement, hidden R2 and theta structure against updates per model, per meta method",
           "command": "python benchmarks/bench_convergence.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "population": args.population, "num_models": len(store.manifest_rows(args.population)),
           "cka_mds": cka_baseline(args.population, args.label, args.seeds[0]),
           "function": None if functional is None else {k: v for k, v in functional.items()
                                                        if k.startswith(("silhouette", "components"))},
           "between_seed_ari": between_seed_ari(runs), "runs": runs, "wall_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(doc))
    print(json.dumps({k: doc[k] for k in ("cka_mds", "function", "between_seed_ari", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
