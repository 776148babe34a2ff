"""``run_analysis``: every applicable analysis of a finished meta run -> plots, tables, report, MLflow.

Output directory (default ``<meta_dir>/analysis``)::

    report.html                 the report, self-contained (the figures/ PNGs embedded)
    analysis.json               headline numbers, per-section status/notes, paper comparison
    figures/*.png
    tables/*.parquet            embedding coordinates, distances, averaging, landscape grid,
                                SSL path, fixed points, word valence

Analyses that do not apply are skipped with a note: the SVCCA/CKA baseline with fewer
than 3 models, fixed points and word valence for ResNet (CNN) populations, word valence
for non-token or non-sentiment tasks.

At scale, everything that compares models pairwise (SVCCA, CKA, raw weights, the method
comparison) runs on ``analyze.baseline_models`` models drawn stratified by
``analyze.color_by`` (all of them when there are no more); embedding geometry uses all models.

Shape legend: N models, E embedding dim, K points.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..data import fsio, lock, store
from ..config import AnalyzeConfig
from ..data.tasks import UNK_ID, Split, load_task, token_id
from ..meta import outputs
from ..meta.objective import step_mask
from ..meta.outputs import MetaRun, load_meta_run
from ..meta.trainer import PopulationData, load_population
from ..plots import group_colours
from .averaging import ModelAveraging
from .baseline import RepresentationBaseline, activation_taps, classical_mds
from .comparison import METRICS, MethodComparison, euclidean_distances, output_distances
from .evaluate import accuracies, base_accuracy
from .fixed_points import FixedPointFinder, base_dynamics, base_visited_states, meta_dynamics, meta_visited_states
from .geometry import EmbeddingGeometry, axis_correlations, stratified_sample
from .html import Report, Section
from .landscape import ThetaLandscape
from .ssl import SemiSupervisedTheta
from .valence import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, WordValence

LABEL_CANDIDATES = ("group", "task", "arch", "hidden_size", "train_fraction", "epoch")  # extra PCA colourings
NUMERIC_AXES = ("train_fraction", "hidden_size", "epoch", "test_accuracy")  # manifest columns theta's axes are ranked against
NUM_AXES_TESTED = 3                                                        # principal components correlated with them
AXIS_PERMUTATIONS = 2000
NUM_FP_PROBE = 64             # probe sequences whose visited states seed fixed-point searches
MAX_META_FP_THETAS = 8        # meta-model thetas analysed for fixed points (Fig. 8)
MAX_BASE_FP_MODELS = 4        # base models analysed for fixed points
RAW_WEIGHT_BYTES = 512 * 2**20  # flattened float32 weights held for the method comparison's raw-weight distances
VALENCE_GRID = 5              # grid points per axis of the word-valence map (a fixed-point search each)
NEUTRAL_TOL = 0.25            # |G(h*)| (logit difference) below which the chosen fixed point counts as neutral
_METHOD_NAMES = {"dynamo": "DYNAMO θ", "svcca": "SVCCA", "cka": "CKA", "raw_weights": "raw weights",
                 "outputs": "base outputs (reference)"}


@dataclass
class _Ctx:
    """What every section reads: the meta run, its population and derived per-model data."""

    run: MetaRun
    cfg: AnalyzeConfig
    out: Path
    pop: PopulationData
    ids: list[str]
    theta: np.ndarray
    labels: list
    tasks: list[str]
    test: dict[str, Split]
    base_acc: dict[str, float]
    sample: np.ndarray  # indices of the models compared pairwise (analyze.baseline_models, stratified)

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    @property
    def table_dir(self) -> Path:
        return self.out / "tables"


def run_analysis(meta_dir: str, cfg: AnalyzeConfig, out_dir: str | None = None, log: bool = True,
                 progress: bool = False) -> dict:
    """Run every applicable analysis of the meta run in ``meta_dir``; returns headline numbers + ``report``.

    Writes figures, Parquet tables, ``analysis.json`` and ``report.html`` under ``out_dir``
    (default ``<meta_dir>/analysis``) and, with ``log``, logs them as a run named "analyze"
    to the meta run's MLflow experiment and store.
    """
    meta_path = outputs.check_meta_run(meta_dir)  # before any directory is created for its outputs
    out = fsio.as_path(out_dir) if out_dir is not None else outputs.analysis_dir(meta_path)
    with lock.hold(meta_path, "analyze", shared=True, what="meta run directory"), \
            lock.hold(out, "analyze", what="analysis directory"):
        run = load_meta_run(meta_path)
        store.check_intact(run.population_root, run.rows)  # damaged model files: refused before any work
        if log:  # a store that does not answer, or one copied from another run dir: refused before any work
            _tracking_store(run, meta_path).check_reachable()
        # Written whole: in a staging directory (on a bucket: a local one, put file by file,
        # analysis.json last), published only when every section is done. A failed analysis
        # leaves the earlier one where it was and no partial files.
        with fsio.staged(out, last=("analysis.json",), whole=True) as local:
            result = _analyze(run, meta_path, cfg, local, log, progress)
            earlier = _keep_earlier(out)
        if earlier is not None and progress:
            print(f"the earlier analysis in {out} is kept in {earlier}", flush=True)
        for key in ("report", "analysis_json"):
            result[key] = str(out / Path(result[key]).relative_to(local))
        return result


def _keep_earlier(out: fsio.AnyPath) -> fsio.AnyPath | None:
    """Move an earlier analysis in ``out`` to ``out/earlier/<its time>/`` (never overwritten); its path."""
    doc = out / "analysis.json"
    if not doc.is_file():
        return None
    dest = out / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.localtime(doc.stat().st_mtime))
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    dest.mkdir(parents=True)
    for name in ("report.html", "analysis.json", "figures", "tables"):
        if (out / name).exists():
            fsio.move(out / name, dest / name)
    return dest


def _analyze(run: MetaRun, meta_path: fsio.AnyPath, cfg: AnalyzeConfig, out: Path, log: bool,
             progress: bool) -> dict:
    t0, started = time.perf_counter(), time.time()
    ctx = _context(run, cfg, out)
    ctx.fig_dir.mkdir(parents=True, exist_ok=True)
    ctx.table_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    summary = run.summary()
    report = Report(
        title=f"DYNAMO analysis — {meta_path.name}",
        subtitle=(f"meta run {meta_path} · population {run.population_root} · {len(ctx.ids)} models · "
                  f"family {run.family} · d={run.cfg.embedding_dim} · λ={run.cfg.output_weight} · "
                  f"{run.cfg.steps} steps · hidden distance {run.cfg.hidden_distance}"),
    )
    headline: dict = {"num_models": len(ctx.ids), "embedding_dim": run.cfg.embedding_dim}
    status: dict[str, dict] = {}
    results: dict = {}

    _overview(ctx, report.section("overview", "Meta run"), summary)
    steps = [
        ("geometry", "Embedding geometry", _geometry),
        ("baseline", "SVCCA / CKA baseline", _baseline),
        ("comparison", "Methods compared like for like", _comparison),
        ("averaging", "Model averaging", _averaging),
        ("landscape", "θ landscape", _landscape),
        ("ssl", "Semi-supervised θ", _ssl),
        ("fixed_points", "Fixed points", _fixed_points),
        ("valence", "Word valence", _valence),
    ]
    from tqdm.auto import tqdm

    bar = tqdm(steps, desc="analyze", unit="section", disable=not progress, dynamic_ncols=True)
    for key, title, fn in bar:
        bar.set_postfix_str(title)
        sec = report.section(key, title)
        t = time.perf_counter()
        res = fn(ctx, sec, results)
        results[key] = res
        headline.update(res.get("headline", {}))
        status[key] = {"status": res.get("status", "ok"), "note": res.get("note"),
                       "seconds": round(time.perf_counter() - t, 2)}
    comparison = _paper_comparison(ctx, results)
    sec = report.section("paper", "Paper claims vs this run")
    sec.text("Numbers as measured on this population, side by side with what the paper reports "
             "(its populations are IMDB/AG News GRUs and CIFAR ResNets; ours may differ in task and scale).")
    sec.table(comparison, ["claim", "paper", "measured"])
    headline["analysis_seconds"] = round(time.perf_counter() - t0, 2)

    report_path = report.write(out / "report.html")
    doc = {"meta_dir": str(meta_path), "config": cfg.model_dump(mode="json"), "headline": headline,
           "sections": status, "paper_comparison": comparison}
    store.write_json_atomic(doc, out / "analysis.json")  # strict JSON: NaN/inf -> null
    result = {**headline, "report": str(report_path), "analysis_json": str(out / "analysis.json")}
    if log:
        result["mlflow_run_id"] = _log_mlflow(run, meta_path, cfg, headline, out, summary, started)
    return result


# ---------------------------------------------------------------- context


def _context(run: MetaRun, cfg: AnalyzeConfig, out: Path) -> _Ctx:
    rows = run.rows
    if cfg.color_by not in rows[0]:
        cols = sorted(k for k in rows[0] if not k.endswith("_path"))
        raise ValueError(f"color_by: manifest has no column {cfg.color_by!r}; columns: {cols}")
    pop = load_population(run.population_root, run.model_ids, with_test=True, manifest=run.rows)
    ids = [r["model_id"] for r in rows]
    tasks = [r["task"] for r in rows]
    test = {t: pop.test_inputs[t] for t in sorted(set(tasks))}
    base_acc = {m: base_accuracy(pop.test[m].outputs.float(), test[t].y) for m, t in zip(ids, tasks)}
    # the recorded test trajectories may cover fewer rows than the stored inputs
    for t in test:
        n = min(pop.test[m].num_examples for m, tt in zip(ids, tasks) if tt == t)
        test[t] = test[t].subset(slice(0, n))
    labels = [r.get(cfg.color_by) for r in rows]
    return _Ctx(run=run, cfg=cfg, out=out, pop=pop, ids=ids, theta=run.theta().astype(np.float64),
                labels=labels, tasks=tasks, test=test, base_acc=base_acc,
                sample=stratified_sample(labels, cfg.baseline_models, cfg.seed))


def _overview(ctx: _Ctx, sec: Section, summary: dict) -> None:
    keys = ("mean_agreement", "mean_hidden_r2", "mean_meta_accuracy", "mean_base_accuracy", "steps", "wall_seconds",
            "num_workers")
    sec.table([{"metric": k, "value": summary[k]} for k in keys if k in summary], ["metric", "value"],
              caption="Emulation metrics of the meta run (test split, meta-model at each θ_n)")
    per_group: dict[str, list[float]] = {}
    for m, lab in zip(ctx.ids, ctx.labels):
        per_group.setdefault(str(lab), []).append(ctx.base_acc[m])
    sec.table([{ctx.cfg.color_by: g, "models": len(v), "base test accuracy (mean)": float(np.mean(v)),
                "min": float(np.min(v)), "max": float(np.max(v))} for g, v in sorted(per_group.items())],
              caption=f"Base models by {ctx.cfg.color_by} (accuracy on the recorded test inputs)")


# ---------------------------------------------------------------- sections


def _geometry(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    if len(ctx.ids) < 2:
        sec.skip("Embedding geometry needs at least 2 models.")
        return {"status": "skipped", "note": "fewer than 2 models"}
    geo = EmbeddingGeometry(variance_threshold=0.95, random_state=ctx.cfg.seed).fit(ctx.theta, ctx.labels)
    ratio = geo.explained_variance_ratio_
    coords = geo.coords_
    p = figures.embedding_scatter(coords, ctx.labels, ctx.fig_dir / "embedding_pca.png",
                                  "DYNAMO model embeddings (PCA)", ctx.cfg.color_by, ratio)
    sec.figure(p, ctx.out, f"θ_n in their first two principal components, coloured by {ctx.cfg.color_by} (Fig. 3, row 1).")
    for col in _varying_labels(ctx):
        vals = [r.get(col) for r in ctx.run.rows]
        p = figures.embedding_scatter(coords, vals, ctx.fig_dir / f"embedding_pca_by_{col}.png",
                                      f"model embeddings by {col}", col, ratio)
        sec.figure(p, ctx.out, f"The same PCA plane coloured by {col}.")
    p = figures.spectrum(ratio, geo.num_components_, 0.95, ctx.fig_dir / "embedding_spectrum.png")
    sec.figure(p, ctx.out, "Eigen-spectrum of the embeddings' covariance; dotted: components for 95% of the "
                           "variance (Fig. 3, row 2).")
    scores = geo.scores_
    sec.table([{"statistic": "components for 95% variance", "value": geo.num_components_},
               {"statistic": "PC1 / PC2 variance ratio", "value": [float(r) for r in ratio[:2]]},
               {"statistic": f"silhouette of {ctx.cfg.color_by} (θ, Euclidean)", "value": scores.get("silhouette")},
               {"statistic": f"k-means adjusted Rand index vs {ctx.cfg.color_by}", "value": scores.get("adjusted_rand")}],
              ["statistic", "value"])
    axes_rows, axes_head = _axis_correlations(ctx, geo)
    if axes_rows:
        sec.table(axes_rows, ["column", "component", "spearman", "p_value", "num_models"],
                  caption="What θ's principal components follow: Spearman rank correlation with each varying "
                          "numeric manifest column (test_accuracy: the base model's recorded test accuracy), "
                          f"two-sided permutation p over {AXIS_PERMUTATIONS} shuffles (seed {ctx.cfg.seed}); "
                          "a p near its floor 1/(shuffles+1) is as strong as the test can show")
        _write_table(axes_rows, ctx.table_dir / "embedding_axes.parquet")
    table = [{"model_id": m, ctx.cfg.color_by: str(lab), "pc1": float(c[0]), "pc2": float(c[1]),
              "theta": [float(v) for v in th]} for m, lab, c, th in zip(ctx.ids, ctx.labels, coords, ctx.theta)]
    _write_table(table, ctx.table_dir / "embedding_pca.parquet")
    return {"geometry": geo, "headline": {
        "dynamo.num_components_95": geo.num_components_,
        "dynamo.pc1_variance_ratio": float(ratio[0]) if len(ratio) else float("nan"),
        "dynamo.silhouette": scores.get("silhouette", float("nan")),
        "dynamo.adjusted_rand": scores.get("adjusted_rand", float("nan")),
        **axes_head,
    }}


def _axis_correlations(ctx: _Ctx, geo: EmbeddingGeometry) -> tuple[list[dict], dict]:
    """Rows (column, component, rho, p) and headline keys ``dynamo.axes.<column>.pc<k>.spearman``
    / ``.p_value`` for the numeric manifest columns that vary across the models (``geo``: the
    section's PCA of θ)."""
    k = min(NUM_AXES_TESTED, len(geo.components_))
    if k == 0:
        return [], {}
    coords = (ctx.theta - geo.mean_) @ geo.components_[:k].T
    rows, head = [], {}
    for col in NUMERIC_AXES:
        values = [r.get(col) for r in ctx.run.rows]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in values):
            continue
        if len(set(values)) < 2:
            continue
        for c in axis_correlations(coords, values, AXIS_PERMUTATIONS, ctx.cfg.seed):
            rows.append({"column": col, "component": f"PC{c['component']}", "spearman": c["spearman"],
                         "p_value": c["p_value"], "num_models": len(values)})
            head[f"dynamo.axes.{col}.pc{c['component']}.spearman"] = c["spearman"]
            head[f"dynamo.axes.{col}.pc{c['component']}.p_value"] = c["p_value"]
    return rows, head


def _varying_labels(ctx: _Ctx, limit: int = 4) -> list[str]:
    out = []
    for col in LABEL_CANDIDATES:
        if col == ctx.cfg.color_by or col not in ctx.run.rows[0]:
            continue
        if len({str(r.get(col)) for r in ctx.run.rows}) > 1:
            out.append(col)
    return out[:limit]


def _baseline(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    if not ctx.cfg.baseline:
        sec.skip("Disabled (analyze.baseline = false).")
        return {"status": "skipped", "note": "disabled by config"}
    if len(ctx.ids) < 3:
        sec.skip("The pairwise baseline needs at least 3 models.")
        return {"status": "skipped", "note": "fewer than 3 models"}
    ids = [ctx.ids[i] for i in ctx.sample]
    labels = [ctx.labels[i] for i in ctx.sample]
    taps, source = _baseline_activations(ctx)
    fits = {method: RepresentationBaseline(method=method, max_rows=ctx.cfg.baseline_rows,
                                           random_state=ctx.cfg.seed).fit(taps, labels)
            for method in ("svcca", "cka")}
    num_rows = fits["svcca"].num_rows_
    sec.text(f"Compared: {_sample_text(ctx)}. Activations: {source}; {num_rows} rows per model, the same for every "
             "model (analyze.baseline_rows). SVCCA keeps the singular directions holding 99% of each model's "
             "variance (at most rows/10), and reports sqrt(mean 2(1-ρ_i)), the RMS L2 distance between matched "
             "unit-variance canonical variates; CKA distance is 1 - linear CKA. Both are embedded in 2-D with metric "
             "MDS (precomputed dissimilarities). DYNAMO and every baseline are scored the same way in the next section.")
    order = sorted(range(len(ids)), key=lambda k: (figures.sort_key(str(labels[k])), ids[k]))
    for method, f in fits.items():
        p = figures.distance_matrix(f.distances_[np.ix_(order, order)], [ids[k] for k in order],
                                    f"{method.upper()} distances", ctx.fig_dir / f"baseline_{method}_distances.png",
                                    groups=[str(labels[k]) for k in order])
        sec.figure(p, ctx.out, f"Pairwise {method.upper()} distances, models grouped by {ctx.cfg.color_by}.")
    sec.table([{"method": m.upper(), "mds_stress": f.stress_, "silhouette (distances)": f.scores_.get("silhouette"),
                "k-means ARI (MDS-2)": f.scores_.get("adjusted_rand")} for m, f in fits.items()],
              caption=f"MDS stress, and the scores kept as the headline keys svcca.silhouette / svcca.adjusted_rand "
                      f"(cka.* alike): silhouette of {ctx.cfg.color_by} on the distance matrix, k-means ARI on the "
                      "2-D MDS coordinates")
    n = len(ids)
    store.write_table_atomic(pa.table({"model_a": np.repeat(ids, n), "model_b": np.tile(ids, n),
                                       "svcca": fits["svcca"].distances_.ravel(), "cka": fits["cka"].distances_.ravel()}),
                             ctx.table_dir / "baseline_distances.parquet")
    _write_table([{"model_id": m, ctx.cfg.color_by: str(lab), "svcca_mds_1": float(a[0]), "svcca_mds_2": float(a[1]),
                   "cka_mds_1": float(b[0]), "cka_mds_2": float(b[1])}
                  for m, lab, a, b in zip(ids, labels, fits["svcca"].embedding_, fits["cka"].embedding_)],
                 ctx.table_dir / "baseline_mds.parquet")
    head = {"baseline.num_models": n, "baseline.num_rows": num_rows}
    for m, f in fits.items():
        head[f"{m}.silhouette"] = f.scores_.get("silhouette", float("nan"))
        head[f"{m}.adjusted_rand"] = f.scores_.get("adjusted_rand", float("nan"))
    return {"fits": fits, "headline": head}


def _sample_text(ctx: _Ctx) -> str:
    """How many models the pairwise analyses compare, and how they were drawn."""
    n, total = len(ctx.sample), len(ctx.ids)
    if n == total:
        return f"all {total} models"
    counts = Counter(str(ctx.labels[i]) for i in ctx.sample)
    per = (", ".join(f"{g}: {c}" for g, c in sorted(counts.items())) if len(counts) <= 12 else
           f"{min(counts.values())} to {max(counts.values())} per group")
    return (f"{n} of {total} models, drawn at random within each {ctx.cfg.color_by} group in proportion to its "
            f"size (analyze.baseline_models = {ctx.cfg.baseline_models}, seed {ctx.cfg.seed}; {per})")


def _baseline_activations(ctx: _Ctx) -> tuple[list[list[np.ndarray]], str]:
    """The sampled models' hidden activations on the same probe inputs (``ctx.sample`` order).

    One task: the recorded probe trajectories. Several tasks (different probe sets): the
    models are re-run from their weights on the first task's probe inputs (DYNAMO requires
    a common input structure, so every model accepts them).
    """
    family = ctx.run.family
    ids = [ctx.ids[i] for i in ctx.sample]
    tasks = sorted({ctx.tasks[i] for i in ctx.sample})
    rng = np.random.default_rng(ctx.cfg.seed)
    if len(tasks) == 1:
        inputs = ctx.pop.probe_inputs[tasks[0]]
        hiddens = {m: [h.float() for h in ctx.pop.probe[m].hiddens] for m in ids}
        source = f"recorded probe trajectories of task {tasks[0]!r}"
    else:
        inputs = ctx.pop.probe_inputs[tasks[0]]
        n = min(len(inputs), 512)
        inputs = inputs.subset(slice(0, n))
        hiddens = {}
        for i in ctx.sample:
            r = ctx.run.rows[i]
            with torch.no_grad():
                hiddens[r["model_id"]] = _base_model(ctx, r).trajectories(inputs.x)[0]
        source = (f"every model re-run from its weights on the probe inputs of task {tasks[0]!r} "
                  f"({n} examples; the models span tasks {tasks})")
    n = min(h[0].shape[0] for h in hiddens.values())
    if family == "rnn":
        t_len = next(iter(hiddens.values()))[0].shape[1]
        mask = step_mask(inputs.lengths[:n], t_len)
        num_rows = int(mask.sum())
        keep = num_rows if ctx.cfg.baseline_rows is None else min(num_rows, ctx.cfg.baseline_rows)
        select = np.sort(rng.choice(num_rows, size=keep, replace=False))
        taps = [[h[0][:n][mask][select].float().numpy()] for h in (hiddens[m] for m in ids)]
    else:
        taps = [activation_taps([x[:n] for x in hiddens[m]], family) for m in ids]
    return taps, source


def _comparison(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    geo = results.get("geometry", {}).get("geometry")
    if geo is None or len(ctx.ids) < 3:
        sec.skip("The method comparison needs at least 3 models.")
        return {"status": "skipped", "note": "fewer than 3 models"}
    idx = ctx.sample
    labels = [ctx.labels[i] for i in idx]
    d = ctx.run.cfg.embedding_dim
    distances = {"dynamo": euclidean_distances(ctx.theta[idx])}
    coords = {"dynamo": geo.coords_[idx]}
    shown = {"dynamo": (f"θ (d={d}), Euclidean", "PCA")}  # (distances, 2-D picture)
    for m, f in results.get("baseline", {}).get("fits", {}).items():
        distances[m], coords[m] = f.distances_, f.embedding_
        shown[m] = ("SVCCA distance" if m == "svcca" else "1 − linear CKA", "metric MDS")
    if "svcca" not in distances:
        sec.note(f"No SVCCA/CKA rows: the baseline section was skipped ({results.get('baseline', {}).get('note')}).")
    weights, why = _raw_weights(ctx)
    if weights is not None:
        distances["raw_weights"] = euclidean_distances(weights)
        shown["raw_weights"] = (f"{weights.shape[1]} flattened parameters, Euclidean", "PCA")
    else:
        sec.note(f"Raw weights: not compared: {why}.")
    logits, why = _test_logits(ctx)
    if logits is not None:
        distances["outputs"] = output_distances(logits)
        coords["outputs"] = classical_mds(distances["outputs"], 2)
        shown["outputs"] = (f"√ mean Jensen–Shannon divergence of the test outputs ({logits.shape[1]} examples)",
                            "classical MDS")
    else:
        sec.note(f"Base outputs: no reference row: {why}.")
    cmp = MethodComparison(num_dims=d, num_bootstrap=ctx.cfg.bootstrap, random_state=ctx.cfg.seed).fit(
        distances, labels, coords)
    sec.text(f"Every method scored the same way against {ctx.cfg.color_by} ({cmp.num_groups_} groups) on the same "
             f"models: {_sample_text(ctx)}. Full: the method's distance matrix — silhouette on it, leave-one-out "
             f"1-nearest-neighbour accuracy on it, and k-means (k = {cmp.num_groups_}) on its classical MDS in "
             f"min(d, N−1) = {min(d, len(idx) - 1)} dimensions (for θ that is θ itself up to a rotation; the baselines "
             "get as many dimensions as DYNAMO). 2-D: the plotted coordinates — silhouette and k-means on them. "
             + (f"Brackets: {cmp.confidence:.0%} percentile bootstrap intervals over {ctx.cfg.bootstrap} resamples "
                f"of the models within each group (seed {ctx.cfg.seed}); k-means on a resample restarts from the "
                "centres found on all models." if ctx.cfg.bootstrap else "No intervals (analyze.bootstrap = 0)."))
    if "outputs" in distances:
        sec.text("The base-outputs row is a reference, not a method: distances between what the base models "
                 "compute (their output distributions on the test inputs), never their states or weights. It "
                 "shows how far the groups differ in function, so how high a silhouette a function-based "
                 "embedding such as DYNAMO's can fairly be asked for.")
    sec.text("The headline keys dynamo.silhouette / dynamo.adjusted_rand (θ, all models) and svcca.silhouette / "
             "svcca.adjusted_rand (distance matrix / MDS-2, as before) keep their meaning; the like-for-like numbers "
             "are comparison.<method>.<metric>.")

    def cell(m: str, metric: str) -> str:
        v, (lo, hi) = cmp.scores_[m][metric], cmp.intervals_[m][metric]
        return _f(v) if math.isnan(lo) else f"{_f(v)} [{_f(lo)}, {_f(hi)}]"

    heads = {"silhouette_full": "silhouette (full)", "silhouette_2d": "silhouette (2-D)",
             "ari_full": "k-means ARI (full)", "ari_2d": "k-means ARI (2-D)", "nn_accuracy": "1-NN accuracy"}
    described = {m: f"{full}; 2-D: {flat}" for m, (full, flat) in shown.items()}
    sec.table([{"method": _METHOD_NAMES[m], "representation": described[m], **{heads[k]: cell(m, k) for k in METRICS}}
               for m in cmp.scores_], caption=f"Recovering {ctx.cfg.color_by}: every method on the same terms")
    panels = [(f"{_METHOD_NAMES[m]} ({shown[m][1]})\nsilhouette {_f(cmp.scores_[m]['silhouette_2d'])}, "
               f"k-means ARI {_f(cmp.scores_[m]['ari_2d'])}", cmp.coords_2d_[m]) for m in cmp.scores_]
    # the sample may lack groups: colours from every model's label keep each group's colour of the other figures
    p = figures.side_by_side(panels, labels, ctx.cfg.color_by, ctx.fig_dir / "baseline_side_by_side.png",
                             colours=group_colours(ctx.labels))
    sec.figure(p, ctx.out, "Each method's 2-D picture of the same models, titled with its 2-D scores (DYNAMO's PCA: "
                           "Fig. 3; SVCCA + MDS: Fig. 5). MDS axes carry no meaning.")
    _write_table([{"method": row["method"], "representation": described[row["method"]], **row,
                   "num_bootstrap": ctx.cfg.bootstrap} for row in cmp.table_], ctx.table_dir / "method_comparison.parquet")
    head = {"comparison.num_models": len(idx), "comparison.num_bootstrap": ctx.cfg.bootstrap,
            "comparison.num_dims": min(d, len(idx) - 1)}
    for m in cmp.scores_:
        for metric in METRICS:
            key = f"comparison.{m}.{metric}"
            head[key] = cmp.scores_[m][metric]
            head[f"{key}.low"], head[f"{key}.high"] = cmp.intervals_[m][metric]
    return {"comparison": cmp, "headline": head}


def _test_logits(ctx: _Ctx) -> tuple[np.ndarray | None, str]:
    """(N, B, C) the sampled models' final-step outputs on the shared test inputs, or None and why not."""
    tasks = sorted({ctx.tasks[i] for i in ctx.sample})
    if len(tasks) > 1:
        return None, f"the models span tasks {tasks}, whose outputs are not distributions over the same classes"
    ids = [ctx.ids[i] for i in ctx.sample]
    n = min(ctx.pop.test[m].num_examples for m in ids)
    # RNN outputs are left-padded (N, T, C): the last step is every sequence's final output
    return np.stack([ctx.pop.test[m].outputs[:n, -1].float().numpy() for m in ids]), ""


def _base_model(ctx: _Ctx, row: dict):
    """A base model of the run rebuilt from its weights file; a damaged file's error says what to do."""
    from .. import zoo

    root = ctx.run.population_root
    try:
        return zoo.load(store.Layout.at(root).path(row["weights_path"]))
    except ValueError as err:
        raise ValueError(f"{err}; {store.repair_remedy(root)}") from None


def _raw_weights(ctx: _Ctx) -> tuple[np.ndarray | None, str]:
    """(N, P) flattened parameters of the sampled models, or None and why they cannot be compared."""
    first_shapes, first_row, vectors = None, None, []
    for i in ctx.sample:
        r = ctx.run.rows[i]
        params = list(_base_model(ctx, r).named_parameters())
        shapes = [(k, tuple(p.shape)) for k, p in params]
        if first_shapes is None:
            first_shapes, first_row = shapes, r
            size = sum(p.numel() for _, p in params) * len(ctx.sample) * 4
            if size > RAW_WEIGHT_BYTES:
                return None, (f"{len(ctx.sample)} models' weights take {size / 2**20:.0f} MiB, over the "
                              f"{RAW_WEIGHT_BYTES / 2**20:.0f} MiB held for them (lower analyze.baseline_models)")
        elif shapes != first_shapes:
            return None, (f"the models' parameter shapes differ ({_arch(first_row)} vs {_arch(r)}); flattened "
                          "weights are comparable only between models of one shape")
        vectors.append(torch.cat([p.detach().reshape(-1) for _, p in params]).float().numpy())
    return np.stack(vectors), ""


def _arch(row: dict) -> str:
    return f"{row['model_id']}: {row.get('arch')}, hidden size {row.get('hidden_size')}"


def _averaging(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    meta = ctx.run.meta
    avg = ModelAveraging().fit(meta, ctx.theta, ctx.ids, ctx.labels, ctx.tasks, ctx.test, ctx.base_acc)
    sec.text(f"The meta-model at the centroid θ of each {ctx.cfg.color_by} group and at midpoints of pairs of "
             "models, on the test split, vs the members: the base models themselves and the meta-model at their θ_n.")
    p = figures.averaging_bars(avg.table_, ctx.fig_dir / "averaging.png")
    sec.figure(p, ctx.out, "Accuracy at averaged embeddings vs the members' accuracies.")
    cols = ["kind", "name", "task", "num_members", "meta_accuracy", "member_base_mean", "member_base_max",
            "member_meta_mean"]
    sec.table(avg.table_, cols)
    _write_table(avg.table_, ctx.table_dir / "averaging.parquet")
    head = {}
    for r in avg.table_:
        if r["kind"] == "centroid":
            key = f"averaging.{_key(r['name'])}"
            head[f"{key}.centroid_accuracy"] = r["meta_accuracy"]
            head[f"{key}.member_base_mean"] = r["member_base_mean"]
            head[f"{key}.member_meta_mean"] = r["member_meta_mean"]
    cen = [r for r in avg.table_ if r["kind"] == "centroid"]
    head["averaging.mean_centroid_minus_member_base"] = float(np.mean([r["meta_accuracy"] - r["member_base_mean"]
                                                                       for r in cen]))
    return {"averaging": avg, "headline": head}


def _landscape(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    geo = results.get("geometry", {}).get("geometry")
    if geo is None:
        sec.skip("Needs the PCA plane of at least 2 embeddings.")
        return {"status": "skipped", "note": "no embedding geometry"}
    meta = ctx.run.meta
    sec.text(f"Test accuracy of the meta-model on a {ctx.cfg.landscape_grid}×{ctx.cfg.landscape_grid} grid in the "
             "PCA plane of θ (through the mean embedding, extending half the embeddings' range beyond them), "
             "relative to the best base model of the task (Fig. 6). The convex hull is that of the base "
             "embeddings projected onto the plane.")
    fits, head, rows, grid_rows = {}, {}, [], []
    for task in sorted(set(ctx.tasks)):
        split = ctx.test[task]
        land = ThetaLandscape(grid_size=ctx.cfg.landscape_grid).fit(
            ctx.theta, lambda th, task=task, split=split: accuracies(meta, th, task, split), geometry=geo)
        best_base = max(ctx.base_acc[m] for m, t in zip(ctx.ids, ctx.tasks) if t == task)
        fits[task] = (land, best_base)
        p = figures.landscape(land.axis_a_, land.axis_b_, land.scores_ / max(best_base, 1e-12), land.base_coords_,
                              ctx.labels, land.best_coords_, ctx.fig_dir / f"landscape_{_safe(task)}.png",
                              f"meta test accuracy / best base ({task})")
        gain = land.best_score_ > best_base  # only then is "the best θ lies outside the hull" a finding
        where = "inside" if land.best_inside_hull_ else "outside"
        verdict = (f"{where} the hull, above the best base model ({land.best_score_:.3f} vs {best_base:.3f})" if gain else
                   f"{where} the hull, but no better than the best base model ({land.best_score_:.3f} vs "
                   f"{best_base:.3f}): no gain from moving in θ, and its place on the grid says nothing")
        sec.figure(p, ctx.out, f"Relative test accuracy over the θ plane, task {task}; × marks the best grid point "
                               f"({verdict}).")
        rows.append({"task": task, "best_grid_accuracy": land.best_score_, "best_base_accuracy": best_base,
                     "relative": land.best_score_ / max(best_base, 1e-12),
                     "best_meta_at_base_theta": float(land.base_scores_[[t == task for t in ctx.tasks]].max()),
                     "best_inside_hull": land.best_inside_hull_, "best_beats_best_base": gain,
                     "best_pc1": float(land.best_coords_[0]),
                     "best_pc2": float(land.best_coords_[1])})
        for (b, a), s in np.ndenumerate(land.scores_):
            grid_rows.append({"task": task, "pc1": float(land.axis_a_[a]), "pc2": float(land.axis_b_[b]),
                              "accuracy": float(s), "inside_hull": bool(land.inside_hull_[b, a]),
                              "theta": [float(v) for v in land.grid_thetas_[b * len(land.axis_a_) + a]]})
        key = f"landscape.{_key(task)}"
        head.update({f"{key}.best_accuracy": land.best_score_, f"{key}.best_base_accuracy": best_base,
                     f"{key}.best_relative": land.best_score_ / max(best_base, 1e-12),
                     f"{key}.best_inside_hull": land.best_inside_hull_, f"{key}.best_beats_best_base": gain})
    sec.table(rows)
    _write_table(grid_rows, ctx.table_dir / "landscape.parquet")
    return {"fits": fits, "headline": head}


def _ssl_labelled(ctx: _Ctx, task: str) -> tuple[Split, str]:
    """ssl_fraction of the training pool, labelled, disjoint from test (and from the probe set when possible).

    Rebuilds the population's task split (population.json's data_seed / num_examples) and
    draws from base_train; falls back to the stored probe inputs' labels when the task
    cannot be rebuilt identically (e.g. users' own models).
    """
    rng = np.random.default_rng([ctx.cfg.seed, 7])
    row = next(r for r in ctx.run.rows if r["task"] == task)
    num_classes = int(row["num_classes"])
    probe = ctx.pop.probe_inputs[task]
    td = _population_task(ctx, task)
    if td is not None:
        pool = len(td.base_train) + len(td.probe)
        n = min(len(td.base_train), max(num_classes, int(round(ctx.cfg.ssl_fraction * pool))))
        idx = np.sort(rng.choice(len(td.base_train), size=n, replace=False))
        return td.base_train.subset(idx), (f"{n} labelled examples ({ctx.cfg.ssl_fraction:.1%} of the {pool}-example "
                                           "training pool, at least one per class) drawn from the base-training half")
    pool = 2 * len(probe)
    n = min(len(probe), max(num_classes, int(round(ctx.cfg.ssl_fraction * pool))))
    idx = np.sort(rng.choice(len(probe), size=n, replace=False))
    return probe.subset(idx), (f"{n} labelled examples drawn from the stored probe inputs (the task could not be "
                               "rebuilt from population.json)")


def _population_task(ctx: _Ctx, task: str):
    """The task exactly as the population stage built it, or None when that cannot be reproduced."""
    spec = store.read_spec(ctx.run.population_root)
    if "data_seed" not in spec:
        return None
    try:
        td = load_task(task, seed=int(spec["data_seed"]), num_examples=spec.get("num_examples"))
    except (ValueError, FileNotFoundError, OSError):
        return None
    row = next(r for r in ctx.run.rows if r["task"] == task)
    if tuple(td.input_shape) != tuple(row["input_shape"]) or (td.vocab_size or None) != (row.get("vocab_size") or None):
        return None
    return td


def _ssl(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    meta = ctx.run.meta
    geo = results.get("geometry", {}).get("geometry")
    lands = results.get("landscape", {}).get("fits", {})
    scale = float(np.sqrt((ctx.theta ** 2).sum(axis=1).mean())) or 1.0
    lr = 0.05 * max(scale, 0.1)
    sec.text(f"The meta-model is frozen; θ starts at 0 and {ctx.cfg.ssl_steps} Adam iterates (lr {lr:.3g}: 5% of the "
             "RMS norm of the base embeddings, at least 0.005) minimise the cross-entropy of the final-step output on "
             "a small labelled set disjoint from the test split (Fig. 7).")
    rows, head, fits = [], {}, {}
    for task in sorted(set(ctx.tasks)):
        labelled, source = _ssl_labelled(ctx, task)
        fit = SemiSupervisedTheta(num_steps=ctx.cfg.ssl_steps, lr=lr, random_state=ctx.cfg.seed).fit(meta, task, labelled)
        acc = fit.score(meta, task, ctx.test[task])
        best_base = max(ctx.base_acc[m] for m, t in zip(ctx.ids, ctx.tasks) if t == task)
        fits[task] = fit
        sec.note(f"{task}: {source}.")
        if geo is not None:
            path2 = geo.transform(fit.path_)
            if task in lands:
                land, _ = lands[task]
                land = _cover(land, path2, ctx, geo, task)
                p = figures.landscape(land.axis_a_, land.axis_b_, land.scores_ / max(best_base, 1e-12),
                                      land.base_coords_, ctx.labels, land.best_coords_,
                                      ctx.fig_dir / f"ssl_path_{_safe(task)}.png",
                                      f"SSL iterates over the accuracy landscape ({task})", path_S2=path2)
                sec.figure(p, ctx.out, f"Red: θ iterates from 0 (projected on the PCA plane), task {task}.")
        p = figures.ssl_loss(fit.losses_, ctx.fig_dir / f"ssl_loss_{_safe(task)}.png", f"SSL loss ({task})")
        sec.figure(p, ctx.out, "Labelled-set loss per iterate.")
        d_to_base = np.linalg.norm(ctx.theta - fit.theta_, axis=1)
        nearest = ctx.ids[int(np.argmin(d_to_base))]
        rows.append({"task": task, "num_labelled": len(labelled), "ssl_test_accuracy": acc,
                     "best_base_accuracy": best_base, "difference": acc - best_base,
                     "labelled_accuracy": fit.train_accuracy_, "nearest_base_model": nearest,
                     "theta_norm": float(np.linalg.norm(fit.theta_))})
        key = f"ssl.{_key(task)}"
        head.update({f"{key}.test_accuracy": acc, f"{key}.best_base_accuracy": best_base,
                     f"{key}.num_labelled": len(labelled)})
        _write_table([{"task": task, "step": i, "theta": [float(v) for v in th],
                       "loss": float(fit.losses_[i - 1]) if i else float("nan")} for i, th in enumerate(fit.path_)],
                     ctx.table_dir / f"ssl_path_{_safe(task)}.parquet")
    sec.table(rows)
    return {"fits": fits, "headline": head}


def _cover(land: ThetaLandscape, path_S2: np.ndarray, ctx: _Ctx, geo: EmbeddingGeometry, task: str) -> ThetaLandscape:
    """The landscape itself, or one re-evaluated on a grid that also covers the SSL iterates."""
    lo = np.array([land.axis_a_.min(), land.axis_b_.min()])
    hi = np.array([land.axis_a_.max(), land.axis_b_.max()])
    if (path_S2.min(axis=0) >= lo).all() and (path_S2.max(axis=0) <= hi).all():
        return land
    new_lo, new_hi = np.minimum(lo, path_S2.min(axis=0)), np.maximum(hi, path_S2.max(axis=0))
    pad = 0.05 * (new_hi - new_lo)
    bounds = [(new_lo[d] - pad[d], new_hi[d] + pad[d]) for d in range(2)]
    return ThetaLandscape(grid_size=land.grid_size).fit(
        ctx.theta, lambda th: accuracies(ctx.run.meta, th, task, ctx.test[task]), geometry=geo, bounds=bounds)


def _fixed_points(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    if ctx.run.family != "rnn":
        sec.skip("Fixed points are defined for recurrent dynamics; this is a ResNet (CNN) population.")
        return {"status": "skipped", "note": "CNN population"}
    if not ctx.cfg.fixed_points:
        sec.skip("Disabled (analyze.fixed_points = false).")
        return {"status": "skipped", "note": "disabled by config"}
    meta = ctx.run.meta
    sec.text("Golub & Sussillo: L-BFGS on q(h) = ½‖F(θ, x*, h) − h‖² from hidden states visited on "
             f"{NUM_FP_PROBE} probe sequences ({ctx.cfg.fixed_point_states} candidates, "
             f"{ctx.cfg.fixed_point_iters} iterations, each candidate with its own history and line search); "
             "points with q ≤ 1e-6 are kept and merged within 0.01, and points more than twice as far from the "
             "candidates' centroid as the farthest candidate are dropped (saturated gates make q vanish far "
             "outside the visited region). "
             "x* = 0: the zero input vector, or for token inputs the <pad> embedding (kept at zero by the "
             "padding index). Line-attractor statistics: share of the fixed points' variance on their first "
             "principal component, and the mean number of Jacobian eigenvalues with ||λ| − 1| ≤ 0.05.")
    finder = FixedPointFinder(num_initial=ctx.cfg.fixed_point_states, max_iter=ctx.cfg.fixed_point_iters,
                              random_state=ctx.cfg.seed)
    points = _thetas_of_interest(ctx, results)
    fits, table, points_rows = [], [], []
    for name, theta, task in points:
        probe = ctx.pop.probe_inputs[task].subset(slice(0, NUM_FP_PROBE))
        visited = meta_visited_states(meta, torch.tensor(theta, dtype=torch.float32), probe.x, probe.lengths)
        f = _clone(finder).fit(meta_dynamics(meta, torch.tensor(theta, dtype=torch.float32), group=task), visited)
        fits.append((name, theta, task, f, visited.numpy()))
        table.append({"theta": name, "task": task, **{k: v for k, v in f.stats_.items()},
                      "min_q": float(f.speeds_.min()) if len(f.speeds_) else float("nan")})
    # a common projection: the meta-model's hidden space is shared by every theta
    pooled = np.concatenate([f.fixed_points_ for _, _, _, f, _ in fits])
    mean, plane = _pca_plane(pooled)
    panels, trajs = [], []
    for name, theta, task, f, visited in fits:
        proj = (f.fixed_points_ - mean) @ plane.T
        panels.append((name, proj, _readout_colour(f.readouts_), f.stats_))
        vis = visited[np.random.default_rng(0).choice(len(visited), size=min(400, len(visited)), replace=False)]
        trajs.append((vis - mean) @ plane.T)
        points_rows += [{"theta": name, "pc1": float(c[0]), "pc2": float(c[1]), "q": float(q)}
                        for c, q in zip(proj, f.speeds_)]
    p = figures.fixed_point_panels(panels, ctx.fig_dir / "fixed_points_meta.png",
                                   "meta-model fixed points at x* (common PCA of all fixed points)", trajs, share=True)
    sec.figure(p, ctx.out, "Fixed points of h ↦ F̃(θ, x*, h) for several θ (Fig. 8), coloured by the readout "
                           "(2 classes: logit difference; more: predicted class); grey: visited states.")
    p = figures.eigenvalue_panels([(n, f.eigenvalues_) for n, _, _, f, _ in fits], ctx.fig_dir / "fixed_points_eigenvalues.png",
                                  "Jacobian eigenvalues at the fixed points")
    sec.figure(p, ctx.out, "Eigenvalues of dF̃/dh at the fixed points; dotted: unit circle.")
    cols = ["theta", "task", "num_fixed_points", "converged", "num_slow_points", "pc1_variance_ratio", "pc1_variance",
            "pc1_extent", "mean_num_near_unit", "mean_max_abs_eigenvalue", "min_q"]
    unconverged = [row["theta"] for row in table if not row["converged"]]
    if unconverged:
        sec.text(f"No candidate reached q ≤ 1e-6 for {len(unconverged)} of {len(table)} θ ({', '.join(unconverged[:6])}"
                 f"{', …' if len(unconverged) > 6 else ''}): they have 0 fixed points found; what is plotted and "
                 "described for them are the slowest states the search reached (slow points, min_q in the table), "
                 "not fixed points. More iterations (analyze.fixed_point_iters) may find some.")
    sec.table(table, cols, caption="Meta-model")
    _write_table(table, ctx.table_dir / "fixed_points_meta.parquet")
    _write_table(points_rows, ctx.table_dir / "fixed_points_meta_points.parquet")
    path_head = _fixed_point_path(ctx, sec, finder)

    # base models from the zoo: each in its own hidden space
    base_rows, base_panels = [], []
    for r in _base_models_for_fp(ctx):
        model = _base_model(ctx, r)
        probe = ctx.pop.probe_inputs[r["task"]].subset(slice(0, NUM_FP_PROBE))
        visited = base_visited_states(model, probe.x, probe.lengths)
        f = _clone(finder).fit(base_dynamics(model), visited)
        m, pl = _pca_plane(f.fixed_points_ if len(f.fixed_points_) >= 2 else visited.numpy())
        base_panels.append((f"{r['model_id']} ({r['arch']})", (f.fixed_points_ - m) @ pl.T,
                            _readout_colour(f.readouts_), f.stats_))
        base_rows.append({"model_id": r["model_id"], "arch": r["arch"], ctx.cfg.color_by: str(r.get(ctx.cfg.color_by)),
                          **f.stats_})
    if base_panels:
        p = figures.fixed_point_panels(base_panels, ctx.fig_dir / "fixed_points_base.png",
                                       "base-model fixed points at x* (each in its own PCA)")
        sec.figure(p, ctx.out, "Fixed points of a few base models, for comparison with the meta-model at their θ_n.")
        sec.table(base_rows, ["model_id", "arch", ctx.cfg.color_by, "num_fixed_points", "converged", "num_slow_points",
                              "pc1_variance_ratio",
                              "pc1_extent", "mean_num_near_unit", "mean_max_abs_eigenvalue"], caption="Base models")
        _write_table(base_rows, ctx.table_dir / "fixed_points_base.parquet")
    head = {}
    for row in table:
        key = f"fixed_points.{_key(row['theta'])}"
        head.update({f"{key}.num_fixed_points": row["num_fixed_points"], f"{key}.converged": row["converged"],
                     f"{key}.pc1_variance_ratio": row["pc1_variance_ratio"],
                     f"{key}.mean_num_near_unit": row["mean_num_near_unit"]})
    head.update(path_head)
    return {"table": table, "base": base_rows, "headline": head}


_PATH_EVENT_SCHEMA = pa.schema([("kind", pa.string()), ("branch", pa.int64()), ("step", pa.int64()),
                                ("s_before", pa.float64()), ("s_after", pa.float64()), ("s", pa.float64()),
                                ("num_before", pa.int64()), ("num_after", pa.int64()), ("stable_before", pa.bool_()),
                                ("stable_after", pa.bool_()), ("pc1", pa.float64()), ("pc2", pa.float64())])


def _fixed_point_path(ctx: _Ctx, sec: Section, finder: FixedPointFinder) -> dict:
    """Fixed points continued along θ(s) = (1 − s) θ_a + s θ_b between the two centroids farthest apart."""
    from . import figures
    from .continuation import FixedPointContinuation, meta_path

    steps = ctx.cfg.fixed_point_path_steps
    if steps == 0:
        sec.note("Fixed-point continuation along a path in θ-space: disabled (analyze.fixed_point_path_steps = 0).")
        return {}
    keys = [str(v) for v in ctx.labels]
    cents = []
    for g in sorted(set(keys)):
        task = ctx.tasks[keys.index(g)]
        mem = [i for i, k in enumerate(keys) if k == g and ctx.tasks[i] == task]
        cents.append((g, task, ctx.theta[mem].mean(axis=0)))
    pairs = [(float(np.linalg.norm(a[2] - b[2])), a, b) for i, a in enumerate(cents) for b in cents[i + 1:]
             if a[1] == b[1]]
    if not pairs:
        sec.note(f"Fixed-point continuation: needs two {ctx.cfg.color_by} groups of one task; there are none.")
        return {}
    dist, (ga, task, theta_a), (gb, _, theta_b) = max(pairs, key=lambda p: p[0])
    meta = ctx.run.meta
    probe = ctx.pop.probe_inputs[task].subset(slice(0, NUM_FP_PROBE))

    def visited(s: float) -> torch.Tensor:
        theta = torch.tensor((1.0 - s) * theta_a + s * theta_b, dtype=torch.float32)
        return meta_visited_states(meta, theta, probe.x, probe.lengths)

    cont = FixedPointContinuation(finder, num_steps=steps, random_state=ctx.cfg.seed).fit(
        meta_path(meta, theta_a, theta_b, group=task), visited)
    name = f"centroid {ga} → centroid {gb}"
    sec.text(f"Continuation along θ(s) = (1 − s)·θ_a + s·θ_b, θ_a = centroid {ga}, θ_b = centroid {gb} (the two "
             f"{ctx.cfg.color_by} centroids of task {task} farthest apart, ‖θ_a − θ_b‖ = {dist:.3g}), on {steps} "
             "evenly spaced s. At each s the search starts from the previous step's fixed points (each continues "
             "its branch) and from states visited at θ(s); a backward sweep seeded the same way follows branches "
             "first met at a later s back to where they exist. Fixed points of consecutive steps are matched by "
             "minimum total distance; unmatched ones are branches born or dying (the count changes), and a matched "
             "branch whose spectral radius max|λ| of dF̃/dh crosses 1 changes stability. Only converged fixed "
             "points (q ≤ 1e-6) are tracked, and fixed points joined by a segment along which q stays ≤ 1e-6 count "
             "as one (a line attractor's samples are one continuum; at a bifurcation a flat neighbourhood meets "
             "the tolerance). Events are located to within one grid step.")
    p = figures.fixed_point_continuation(cont.points_, cont.events_, ctx.fig_dir / "fixed_point_continuation.png",
                                         f"meta-model fixed points along {name}", xlabel=f"s ({ga} → {gb})")
    sec.figure(p, ctx.out, "Fixed points along the path, projected on the first two principal axes of all of "
                           "them (filled: stable, open: unstable); dashed lines: the number of fixed points "
                           "changes (a branch born or dying), dotted: a branch changes stability.")
    unconverged = [r for r in cont.steps_ if not r["converged"]]
    if unconverged:
        at = ", ".join(f"{r['s']:.2f}" for r in unconverged[:8])
        sec.text(f"No fixed point converged at {len(unconverged)} of {steps} steps (s = "
                 f"{at}{', …' if len(unconverged) > 8 else ''}); "
                 "their slowest q is min_q (slow points, not tracked).")
    sec.table(cont.steps_, ["step", "s", "num_fixed_points", "num_stable", "converged", "min_q"],
              caption=f"Continuation {name}: fixed points per step")
    if cont.events_:
        sec.table(cont.events_[:30], ["kind", "branch", "s_before", "s_after", "num_before", "num_after",
                                      "stable_before", "stable_after"],
                  caption=f"Events ({len(cont.events_)}{', first 30' if len(cont.events_) > 30 else ''})")
    else:
        sec.text("No event: the number and stability of the fixed points stay the same along the path.")
    _write_table([{"path": name, **r} for r in cont.points_], ctx.table_dir / "fixed_point_continuation.parquet")
    _write_table(cont.steps_, ctx.table_dir / "fixed_point_continuation_steps.parquet")
    store.write_table_atomic(pa.Table.from_pylist(cont.events_, schema=_PATH_EVENT_SCHEMA),
                             ctx.table_dir / "fixed_point_continuation_events.parquet")
    return {"fixed_points.path.num_count_changes": len(cont.count_changes_),
            "fixed_points.path.num_stability_changes": cont.num_stability_changes_,
            "fixed_points.path.num_events": len(cont.events_),
            "fixed_points.path.num_branches": len({p["branch"] for p in cont.points_})}


def _thetas_of_interest(ctx: _Ctx, results: dict) -> list[tuple[str, np.ndarray, str]]:
    """Fig. 8's points: group centroids, the two extreme members of each group along PC1,
    the best landscape point, the SSL theta and the midpoint of two centroids."""
    pts: list[tuple[str, np.ndarray, str]] = []
    keys = [str(v) for v in ctx.labels]
    geo = results.get("geometry", {}).get("geometry")
    groups = sorted(set(keys))
    cents = {}
    for g in groups:
        mem = [i for i, k in enumerate(keys) if k == g]
        task = ctx.tasks[mem[0]]
        mem = [i for i in mem if ctx.tasks[i] == task]
        cents[g] = (ctx.theta[mem].mean(axis=0), task)
        pts.append((f"centroid {g}", cents[g][0], task))
    for g in groups:
        mem = [i for i, k in enumerate(keys) if k == g]
        if geo is not None and len(mem) >= 2:
            pc1 = geo.coords_[mem, 0]
            for i in (mem[int(np.argmin(pc1))], mem[int(np.argmax(pc1))]):
                pts.append((ctx.ids[i], ctx.theta[i], ctx.tasks[i]))
        else:
            pts.append((ctx.ids[mem[0]], ctx.theta[mem[0]], ctx.tasks[mem[0]]))
    task0 = sorted(set(ctx.tasks))[0]
    land = results.get("landscape", {}).get("fits", {}).get(task0)
    if land is not None:
        pts.append(("best landscape point", land[0].best_theta_, task0))
    ssl = results.get("ssl", {}).get("fits", {}).get(task0)
    if ssl is not None:
        pts.append(("SSL theta", ssl.theta_, task0))
    if len(groups) >= 2 and cents[groups[0]][1] == cents[groups[1]][1]:
        pts.append((f"midpoint {groups[0]}|{groups[1]}", 0.5 * (cents[groups[0]][0] + cents[groups[1]][0]),
                    cents[groups[0]][1]))
    seen, out = set(), []
    for name, th, task in pts:
        if name not in seen:
            seen.add(name)
            out.append((name, np.asarray(th, dtype=np.float64), task))
    if len(out) <= MAX_META_FP_THETAS:
        return out
    # trimming: the centroids and special points first, then base members
    special = [p for p in out if p[0] not in ctx.ids]
    members = [p for p in out if p[0] in ctx.ids]
    num_special = min(len(special), max(MAX_META_FP_THETAS // 2, MAX_META_FP_THETAS - len(members)))
    return special[:num_special] + members[: MAX_META_FP_THETAS - num_special]


def _base_models_for_fp(ctx: _Ctx) -> list[dict]:
    """The first model of each group, then the second ones, up to MAX_BASE_FP_MODELS."""
    by: dict[str, list[dict]] = {}
    for r, lab in zip(ctx.run.rows, ctx.labels):
        by.setdefault(str(lab), []).append(r)
    out = []
    for k in range(max(len(v) for v in by.values())):
        for g in sorted(by):
            if k < len(by[g]) and len(out) < MAX_BASE_FP_MODELS:
                out.append(by[g][k])
    return out


def _clone(finder: FixedPointFinder) -> FixedPointFinder:
    return FixedPointFinder(**{k: v for k, v in vars(finder).items() if not k.endswith("_")})


def _pca_plane(points_KS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (2,S) first two principal axes of a point cloud (zero rows where rank < 2)."""
    pts = np.asarray(points_KS, dtype=np.float64)
    mean = pts.mean(axis=0) if len(pts) else np.zeros(pts.shape[1])
    plane = np.zeros((2, pts.shape[1]))
    if len(pts) >= 2:
        vt = np.linalg.svd(pts - mean, full_matrices=False)[2]
        plane[: min(2, len(vt))] = vt[:2]
    return mean, plane


def _readout_colour(readouts_PC: np.ndarray | None) -> np.ndarray | None:
    if readouts_PC is None or len(readouts_PC) == 0:
        return None
    if readouts_PC.shape[1] == 2:
        return readouts_PC[:, 1] - readouts_PC[:, 0]
    return readouts_PC.argmax(axis=1).astype(np.float64)


def _valence(ctx: _Ctx, sec: Section, results: dict) -> dict:
    from . import figures

    reason = _valence_inapplicable(ctx)
    if reason:
        sec.skip(reason)
        return {"status": "skipped", "note": reason}
    meta = ctx.run.meta
    head, rows = {}, []
    geo = results.get("geometry", {}).get("geometry")
    for task in sorted(set(ctx.tasks)):
        td = _population_task(ctx, task)
        if td is None:
            sec.skip(f"{task}: the task's vocabulary cannot be rebuilt from population.json.")
            continue
        names = list(td.class_names)
        pos, neg = names.index("positive"), names.index("negative")
        word_ids = {}
        for w in POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS:
            i = token_id(td, w)
            if i != UNK_ID:
                word_ids[w] = i
        mem = [i for i, t in enumerate(ctx.tasks) if t == task]
        thetas = [ctx.theta[i] for i in mem]
        names_k = [ctx.ids[i] for i in mem]
        land = None
        if geo is not None:
            land = ThetaLandscape(grid_size=min(ctx.cfg.landscape_grid, VALENCE_GRID))
            grid_scores = {}

            def score_fn(th, task=task):
                key = th.tobytes()
                if key not in grid_scores:
                    grid_scores[key] = _valence_fit(ctx, meta, th, word_ids, task, pos, neg).scores_
                return grid_scores[key]

            land.fit(ctx.theta[mem], score_fn, geometry=geo)
        wv = _valence_fit(ctx, meta, np.array(thetas), word_ids, task, pos, neg)
        sec.text(f"{task}: G(h) = logit(positive) − logit(negative); per θ the fixed point with the most neutral "
                 f"readout is h*. Words used: {sum(len(v) for v in wv.words_.values())} of "
                 f"{len(POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS)} (missing from the vocabulary: "
                 f"{', '.join(wv.missing_words_) or 'none'}).")
        if land is not None:
            p = figures.landscape(land.axis_a_, land.axis_b_, land.scores_, land.base_coords_,
                                  [ctx.labels[i] for i in mem], land.best_coords_,
                                  ctx.fig_dir / f"valence_map_{_safe(task)}.png", f"word-valence score, eq. 8 ({task})",
                                  cbar_label="score", colours=group_colours(ctx.labels))
            sec.figure(p, ctx.out, "Eq. 8 score over the θ plane (Fig. 11); × marks the best grid point.")
        best = int(np.argmax(wv.scores_))
        cats = [c for c in ("positive", "negative", "neutral") for _ in wv.words_[c]]
        p = figures.word_values(wv.word_order_, wv.values_[best], cats, ctx.fig_dir / f"valence_words_{_safe(task)}.png",
                                f"G(F(x, h*)) per word at {names_k[best]}")
        sec.figure(p, ctx.out, "Readout after one word from the neutral fixed point (green positive, red negative, "
                               "grey neutral words).")
        for k, m in enumerate(names_k):
            rows.append({"model_id": m, "task": task, "score": float(wv.scores_[k]),
                         "neutral_readout": float(wv.neutral_readout_[k]),
                         "neutral": bool(wv.neutral_readout_[k] <= NEUTRAL_TOL),
                         "num_fixed_points": int(wv.num_fixed_points_[k]),
                         "meta_accuracy": float(accuracies(meta, thetas[k], task, ctx.test[task])[0])})
        neutral = wv.neutral_readout_ <= NEUTRAL_TOL
        if not neutral.all():
            sec.note(f"{task}: at {int((~neutral).sum())} of {len(neutral)} base embeddings no fixed point has a "
                     f"neutral readout (|G(h*)| > {NEUTRAL_TOL}): eq. 8 then starts from a biased state, and the "
                     "dynamics there are not a line attractor through G = 0.")
        head[f"valence.{_key(task)}.mean_score"] = float(np.mean(wv.scores_))
        head[f"valence.{_key(task)}.fraction_neutral"] = float(neutral.mean())
        if land is not None:
            head[f"valence.{_key(task)}.best_grid_score"] = float(land.best_score_)
    if rows:
        sec.table(rows, caption="Eq. 8 score at the base models' θ_n")
        _write_table(rows, ctx.table_dir / "valence.parquet")
        accs = np.array([r["meta_accuracy"] for r in rows])
        scs = np.array([r["score"] for r in rows])
        if len(rows) >= 3 and accs.std() > 0 and scs.std() > 0:
            head["valence.score_accuracy_correlation"] = float(np.corrcoef(scs, accs)[0, 1])
    return {"headline": head, "rows": rows}


def _valence_inapplicable(ctx: _Ctx) -> str | None:
    if ctx.run.family != "rnn":
        return "Word valence needs a recurrent model reading tokens; this is a ResNet (CNN) population."
    kinds = {r["input_kind"] for r in ctx.run.rows}
    if kinds != {"tokens"}:
        return f"Word valence needs token inputs (words); this population's inputs are {sorted(kinds)}."
    if not ctx.cfg.fixed_points:
        return "Word valence needs the fixed-point search (analyze.fixed_points = false)."
    for task in sorted(set(ctx.tasks)):
        td = _population_task(ctx, task)
        if td is not None and {"positive", "negative"} <= set(td.class_names):
            return None
    return "Word valence needs a sentiment task with 'positive' and 'negative' classes."


def _valence_fit(ctx: _Ctx, meta, thetas: np.ndarray, word_ids: dict, task: str, pos: int, neg: int) -> WordValence:
    probe = ctx.pop.probe_inputs[task]
    finder = FixedPointFinder(num_initial=min(64, ctx.cfg.fixed_point_states), max_iter=ctx.cfg.fixed_point_iters,
                              random_state=ctx.cfg.seed)
    return WordValence(finder=finder, num_probe=NUM_FP_PROBE, random_state=ctx.cfg.seed).fit(
        meta, thetas, word_ids, task, pos, neg, probe.x, probe.lengths)


# ---------------------------------------------------------------- paper comparison


def _paper_comparison(ctx: _Ctx, results: dict) -> list[dict]:
    h = {}
    for r in results.values():
        h.update(r.get("headline", {}))
    rows = []
    if "dynamo.silhouette" in h:
        if "comparison.dynamo.silhouette_full" in h:  # like for like: every method's full distances
            methods = [m for m in _METHOD_NAMES if f"comparison.{m}.silhouette_full" in h]
            measured = "; ".join(f"{title} " + ", ".join(f"{_METHOD_NAMES[m]} {_f(h[f'comparison.{m}.{metric}'])}"
                                                         for m in methods)
                                 for metric, title in (("silhouette_full", "silhouette"), ("ari_full", "k-means ARI"),
                                                       ("nn_accuracy", "1-NN accuracy")))
            measured += f" (the same {h['comparison.num_models']} models, full representations)"
        else:
            measured = (f"silhouette DYNAMO {_f(h['dynamo.silhouette'])}; "
                        f"k-means ARI DYNAMO {_f(h['dynamo.adjusted_rand'])}")
        rows.append({"claim": f"Embeddings separate the groups ({ctx.cfg.color_by}); clearer than SVCCA + MDS",
                     "paper": "clear clusters in DYNAMO's PCA (Fig. 3); less apparent with SVCCA-MDS (Fig. 5)",
                     "measured": measured})
        rows.append({"claim": "Components explaining 95% of the embedding variance", "paper": "2 to 6 (Fig. 3)",
                     "measured": f"{h['dynamo.num_components_95']} of d={ctx.run.cfg.embedding_dim} "
                                 f"({len(ctx.ids)} models)"})
    avg = results.get("averaging", {}).get("averaging")
    if avg is not None:
        cen = [r for r in avg.table_ if r["kind"] == "centroid"]
        rows.append({"claim": "Meta-model at a cluster centroid performs like the cluster's members",
                     "paper": "centroid models perform similarly to the cluster (sections 5, C)",
                     "measured": "; ".join(f"{r['name']}: {_f(r['meta_accuracy'])} vs members {_f(r['member_base_mean'])}"
                                           for r in cen)})
    for task, (land, best_base) in results.get("landscape", {}).get("fits", {}).items():
        rows.append({"claim": f"Best θ on the accuracy landscape lies outside the base hull ({task})",
                     "paper": "outside the convex hull (Fig. 6)",
                     "measured": f"{'inside' if land.best_inside_hull_ else 'outside'}; best {_f(land.best_score_)} "
                                 f"vs best base {_f(best_base)}" + ("" if land.best_score_ > best_base else
                                                                    " (no better than the best base: not supported)")})
    for task, fit in results.get("ssl", {}).get("fits", {}).items():
        acc = h.get(f"ssl.{_key(task)}.test_accuracy")
        rows.append({"claim": f"SSL in θ beats the best base model ({task})",
                     "paper": "86.4% vs 80.3% (IMDB, 1% labelled)",
                     "measured": f"{_f(acc)} vs {_f(h.get(f'ssl.{_key(task)}.best_base_accuracy'))} "
                                 f"({h.get(f'ssl.{_key(task)}.num_labelled')} labelled)"})
    fp = results.get("fixed_points", {}).get("table")
    if fp:
        cen = [r for r in fp if r["theta"].startswith("centroid")]
        rows.append({"claim": f"Line-attractor structure of the meta-model at x* ({', '.join(sorted(set(ctx.tasks)))})",
                     "paper": "line attractors, elongated with more training data (Fig. 8)",
                     "measured": "; ".join(f"{r['theta']}: {r['num_fixed_points']} fp, PC1 share "
                                           f"{_f(r['pc1_variance_ratio'])}, |λ|≈1 {_f(r['mean_num_near_unit'])}"
                                           if r["converged"] else
                                           f"{r['theta']}: no fixed point found ({r['num_slow_points']} slow points, "
                                           f"min q {_f(r['min_q'])})" for r in cen)})
    for key, val in h.items():
        if key.endswith("score_accuracy_correlation"):
            rows.append({"claim": "Word-valence score highest near the best θ", "paper": "noisy but discernible trend (Fig. 11)",
                         "measured": f"correlation of score with meta accuracy over θ_n: {_f(val)}"})
    return rows


def _f(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


# ---------------------------------------------------------------- outputs


def _key(name: str) -> str:
    """A metric-name-safe form (MLflow allows alphanumerics, _ - . / and spaces)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-./") else "_" for c in str(name))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_table(rows: list[dict], path: Path) -> None:
    if rows:
        store.write_table_atomic(pa.Table.from_pylist(rows), path)


def _tracking_store(run: MetaRun, meta_dir: fsio.AnyPath):
    """The store the analysis logs to: the meta run's (``outputs.tracking_store_of``), else its run dir's."""
    from .. import tracking

    return tracking.Store(**run.tracking_store) if run.tracking_store else tracking.Store.at(meta_dir.parent)


def _log_mlflow(run: MetaRun, meta_dir: Path, cfg: AnalyzeConfig, headline: dict, out: Path, summary: dict,
                started: float) -> str:
    """A run named "analyze" in the meta run's store and experiment, nested under the meta run when known,
    starting when the analyses did (``started``, ``time.time()``): its duration is theirs."""
    stage = _tracking_store(run, meta_dir).for_stage(f"analyses and report of the meta run {meta_dir}",
                                                     summary.get("mlflow_run_id"), started)
    with stage.run("analyze", tags={"dynamo.meta_dir": str(meta_dir)}) as mrun:
        mrun.log_params({**cfg.model_dump(mode="json"), "meta_dir": str(meta_dir)})
        metrics = {}
        for k, v in headline.items():
            if isinstance(v, bool):
                metrics[k] = float(v)
            elif isinstance(v, (int, float, np.integer, np.floating)) and not math.isnan(float(v)):
                metrics[k] = float(v)
        mrun.log_metrics(metrics)
        for name in ("report.html", "analysis.json", "figures", "tables"):  # not earlier/ analyses, nor the lock
            if (out / name).is_file():
                mrun.log_artifact(out / name, "analysis")
            elif (out / name).is_dir():
                mrun.log_artifact(out / name, f"analysis/{name}")
    return mrun.run_id
