"""How stable θ-space is across meta-model seeds: the same population, the same meta config, only
``meta.seed`` differs.

θ is identifiable only up to what the learned layers that read it can undo (shifts, rotations
and scales among them), so two seeds' θ are compared after orthogonal Procrustes: each (N, E) θ
is centred, scaled to unit Frobenius norm and rotated (reflections allowed) onto the reference's
(the first seed given). Per seed: k-means ARI against the groups (k = number of groups) and the silhouette of
the groups on θ's Euclidean distances, as the analysis report scores one run
(``comparison.py``'s helpers). Across seeds:

* ``pairwise.adjusted_rand``: ARI between two seeds' k-means clusterings (invariant to the
  rotation, so no alignment needed); ``seed_stability`` is its mean over pairs of seeds;
* ``pairwise.disparity``: Procrustes disparity ``1 - s^2`` of two unit-norm, centred θ
  (s: the sum of the singular values of their cross product); 0 = equal up to rotation and
  scale, 1 = nothing in common; symmetric;
* ``pairwise.distance_correlation``: Pearson correlation of two seeds' pairwise θ-distances
  (no alignment either); ``distance_stability`` is its mean over pairs;
* ``consensus``: the co-association matrix (how often two models share a k-means cluster over
  the seeds) clustered by average linkage into k clusters, with its ARI against the groups.

The seeds' runs are trained by the pipeline (``pipeline.seeds_stage``: the meta stage once per
seed, into ``<run_dir>/meta-seeds/seed-<s>/``); this module only reads finished runs.
:func:`run_seed_stability` writes, into ``<parent of the first run>/seed-stability/``
by default::

    seed_stability.json   every number above (strict JSON), per seed and pairwise
    seed_stability.md     the per-seed table, the pairwise matrices and the scores
    seed_stability.png    each seed's aligned θ in the reference's PCA plane, coloured by group

Shape legend: S seeds, N models, E embedding dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import fsio, store
from ..meta import outputs
from .comparison import kmeans, adjusted_rand, euclidean_distances, silhouette
from .geometry import EmbeddingGeometry, encode_labels

OUT_DIR = "seed-stability"
JSON_FILE = "seed_stability.json"
TABLE_FILE = "seed_stability.md"
FIGURE_FILE = "seed_stability.png"
# MetaConfig fields a finished seed run may have with other values and still be reused: the seed
# itself, where it is, and how it was executed (not what it learns)
RUNTIME_FIELDS = ("output_dir", "seed", "seeds", "device", "cache_bytes", "placement_timeout_s", "resize_check_s",
                  "max_failures", "min_workers")


# ---------------------------------------------------------------- alignment and consensus


def normalise(theta_NE: np.ndarray) -> np.ndarray:
    """θ centred (column means 0) and scaled to unit Frobenius norm; ValueError if all rows are equal."""
    x = np.asarray(theta_NE, dtype=np.float64)
    x = x - x.mean(axis=0)
    norm = np.linalg.norm(x)
    if not norm > 0:
        raise ValueError("theta: every model has the same embedding; nothing to align")
    return x / norm


def procrustes(reference_NE: np.ndarray, theta_NE: np.ndarray) -> tuple[np.ndarray, float]:
    """(aligned (N, E), disparity): ``normalise(theta)`` rotated (orthogonal, reflections allowed)
    onto ``normalise(reference)``, and the disparity ``1 - s^2`` in [0, 1] (as
    ``scipy.spatial.procrustes`` defines it; symmetric in its arguments). A narrower θ is padded
    with zero columns."""
    from scipy.linalg import orthogonal_procrustes

    a, b = normalise(reference_NE), normalise(theta_NE)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"theta: {b.shape[0]} models, the reference has {a.shape[0]}")
    width = max(a.shape[1], b.shape[1])
    a, b = (np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in (a, b))
    rotation, s = orthogonal_procrustes(b, a)
    return b @ rotation, float(np.clip(1.0 - s ** 2, 0.0, 1.0))


def coassociation(labelings_SN: np.ndarray) -> np.ndarray:
    """(N, N) fraction of the S clusterings in which two models share a cluster (cluster ids may differ
    between clusterings)."""
    lab = np.asarray(labelings_SN)
    return (lab[:, :, None] == lab[:, None, :]).mean(axis=0)


def consensus_clustering(labelings_SN: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) in 0..k-1, co-association (N, N)): average-linkage clustering of ``1 - co-association``
    cut into ``num_clusters`` clusters (fewer where ties merge them)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    co = coassociation(labelings_SN)
    tree = linkage(squareform(1.0 - co, checks=False), method="average")
    labels = fcluster(tree, t=num_clusters, criterion="maxclust")
    return encode_labels(labels), co


def _mean_off_diagonal(m_SS: np.ndarray) -> float:
    return float(m_SS[~np.eye(len(m_SS), dtype=bool)].mean())


class SeedStability:
    """Per-seed and cross-seed clustering of several meta runs' θ of the same models.

    Parameters
    ----------
    num_clusters : int | None -- k of every k-means and of the consensus (None: the number of groups).
    random_state : int | None -- k-means.

    Attributes (after ``fit``): num_seeds_, num_groups_, num_clusters_, aligned_ (S,N,E) every θ
    normalised and rotated onto the first's, disparity_ (S,S), coords_ (S,N,2) ``aligned_`` in the
    first seed's PCA plane, explained_variance_ratio_ (of that PCA), cluster_labels_ (S,N) k-means,
    adjusted_rand_ (S,) and silhouette_ (S,) against the groups (NaN with fewer than 2 groups),
    pairwise_adjusted_rand_ (S,S), distance_correlation_ (S,S), coassociation_ (N,N),
    consensus_labels_ (N,), consensus_adjusted_rand_, stability_ (mean pairwise ARI),
    distance_stability_ (mean pairwise distance correlation).
    """

    def __init__(self, num_clusters: int | None = None, random_state: int | None = None):
        self.num_clusters = num_clusters
        self.random_state = random_state

    def fit(self, thetas: Sequence[np.ndarray], labels: Sequence) -> "SeedStability":
        """``thetas``: S (N, E) embeddings of the same N models in the same order; ``labels`` (N,) their groups."""
        from threadpoolctl import threadpool_limits

        thetas = [np.asarray(t, dtype=np.float64) for t in thetas]
        codes = encode_labels(labels)
        n = len(codes)
        if len(thetas) < 2:
            raise ValueError(f"thetas: need at least 2 seeds to compare, got {len(thetas)}")
        bad = [i for i, t in enumerate(thetas) if t.ndim != 2 or t.shape[0] != n]
        if bad:
            raise ValueError(f"thetas: seeds {bad} are not (N, E) arrays with N={n} models (one per label); shapes "
                             f"{[thetas[i].shape for i in bad]}")
        self.num_seeds_ = s = len(thetas)
        self.num_groups_ = len(np.unique(codes))
        k = self.num_clusters_ = self.num_clusters if self.num_clusters is not None else self.num_groups_
        if not 2 <= k < n:
            raise ValueError(f"num_clusters: need 2 <= k < {n} models, got k={k}"
                             + ("" if self.num_clusters is not None else " (the number of groups)"))
        ref = normalise(thetas[0])
        self.aligned_ = np.zeros((s, n, max(t.shape[1] for t in thetas)))
        self.disparity_ = np.zeros((s, s))
        for i in range(s):
            self.aligned_[i], _ = procrustes(ref, thetas[i])
            for j in range(i + 1, s):
                self.disparity_[i, j] = self.disparity_[j, i] = procrustes(thetas[i], thetas[j])[1]
        geometry = EmbeddingGeometry().fit(self.aligned_[0])
        self.coords_ = np.stack([geometry.transform(a) for a in self.aligned_])
        self.explained_variance_ratio_ = geometry.explained_variance_ratio_
        distances = [euclidean_distances(t) for t in thetas]
        scorable = 2 <= self.num_groups_ < n
        with threadpool_limits(1):  # tiny k-means problems: threads only add start-up (comparison.py)
            self.cluster_labels_ = np.stack([kmeans(t, k, self.random_state).labels_ for t in thetas])
        self.adjusted_rand_ = np.array([adjusted_rand(codes, lab) if scorable else np.nan
                                        for lab in self.cluster_labels_])
        self.silhouette_ = np.array([silhouette(d, codes) if scorable else np.nan for d in distances])
        upper = np.triu_indices(n, 1)
        self.pairwise_adjusted_rand_ = np.eye(s)
        self.distance_correlation_ = np.eye(s)
        for i in range(s):
            for j in range(i + 1, s):
                self.pairwise_adjusted_rand_[i, j] = self.pairwise_adjusted_rand_[j, i] = adjusted_rand(
                    self.cluster_labels_[i], self.cluster_labels_[j])
                self.distance_correlation_[i, j] = self.distance_correlation_[j, i] = np.corrcoef(
                    distances[i][upper], distances[j][upper])[0, 1]
        self.consensus_labels_, self.coassociation_ = consensus_clustering(self.cluster_labels_, k)
        self.consensus_adjusted_rand_ = adjusted_rand(codes, self.consensus_labels_) if scorable else float("nan")
        self.stability_ = _mean_off_diagonal(self.pairwise_adjusted_rand_)
        self.distance_stability_ = _mean_off_diagonal(self.distance_correlation_)
        return self


# ---------------------------------------------------------------- meta runs: checks


def config_differences(a, b) -> dict[str, tuple]:
    """{field: (a's, b's)} of two MetaConfigs, leaving out ``RUNTIME_FIELDS``."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db))
            if k not in RUNTIME_FIELDS and da.get(k) != db.get(k)}


def check_finished_runs(meta_dirs: Sequence[str]) -> list:
    """``fsio`` paths of ``meta_dirs``, each a finished meta run (FileNotFoundError naming one that is not),
    at least two, none given twice."""
    if len(meta_dirs) < 2:
        raise ValueError(f"--meta-dirs: need at least 2 meta runs to compare, got {len(meta_dirs)}")
    dirs = [outputs.check_meta_run(d) for d in meta_dirs]
    for d in dirs:
        if not outputs.has_finished(d):
            raise FileNotFoundError(f"{d / outputs.SUMMARY_FILE} not found: {d} is not a finished meta run")
    where = [store.absolute(d) for d in dirs]
    twice = sorted({w for w in where if where.count(w) > 1})
    if twice:
        raise ValueError(f"--meta-dirs: {twice} given more than once")
    return dirs


def check_same_models(runs: Sequence) -> None:
    """The runs (``MetaRun``s) embed the same models of the same population; ValueError naming the first that differs."""
    first = runs[0]
    for r in runs[1:]:
        if store.absolute(r.population_root) != store.absolute(first.population_root):
            raise ValueError(f"meta runs of different populations: {first.output_dir} embeds {first.population_root}, "
                             f"{r.output_dir} embeds {r.population_root}")
        if r.model_ids != first.model_ids:
            a, b = set(first.model_ids), set(r.model_ids)
            raise ValueError(f"meta runs of different model sets: {r.output_dir} lacks {sorted(a - b)[:5]} and has "
                             f"{sorted(b - a)[:5]} compared with {first.output_dir}")


# ---------------------------------------------------------------- the analysis and its files


def run_seed_stability(meta_dirs: Sequence[str], out_dir: str | None = None, color_by: str = "group",
                       random_state: int | None = 0) -> dict:
    """Load the finished meta runs ``meta_dirs`` (the first is the reference), fit :class:`SeedStability`
    on their θ against the manifest column ``color_by`` and write its files into ``out_dir``
    (default ``<parent of the first run>/seed-stability``). Returns the contents of seed_stability.json
    plus ``out_dir``."""
    dirs = check_finished_runs(meta_dirs)
    runs = [outputs.load_meta_run(d) for d in dirs]
    check_same_models(runs)
    if color_by not in runs[0].rows[0]:
        raise ValueError(f"color_by: manifest has no column {color_by!r}; columns: {sorted(runs[0].rows[0])}")
    labels = [r.get(color_by) for r in runs[0].rows]
    fit = SeedStability(random_state=random_state).fit([r.theta() for r in runs], labels)
    seeds = [r.cfg.seed for r in runs]
    reference = outputs.read_summary(dirs[0])
    differences = {str(r.output_dir): {k: list(v) for k, v in config_differences(runs[0].cfg, r.cfg).items()}
                   for r in runs[1:]}
    result = {
        "color_by": color_by, "num_models": len(labels), "num_groups": fit.num_groups_,
        "num_clusters": fit.num_clusters_, "reference_seed": seeds[0], "seeds": seeds,
        "meta_dirs": [store.absolute(d) for d in dirs],
        "seed_stability": fit.stability_, "distance_stability": fit.distance_stability_,
        "consensus_adjusted_rand": fit.consensus_adjusted_rand_,
        "mean_adjusted_rand": float(np.mean(fit.adjusted_rand_)), "min_adjusted_rand": float(np.min(fit.adjusted_rand_)),
        "std_adjusted_rand": float(np.std(fit.adjusted_rand_)), "mean_silhouette": float(np.mean(fit.silhouette_)),
        "mean_disparity": _mean_off_diagonal(fit.disparity_),
        "per_seed": [{"seed": s, "meta_dir": store.absolute(d), "adjusted_rand": float(a), "silhouette": float(sil),
                      "disparity_to_reference": float(fit.disparity_[0, i]),
                      **{k: outputs.read_summary(d).get(k) for k in ("mean_agreement", "mean_hidden_r2")}}
                     for i, (s, d, a, sil) in enumerate(zip(seeds, dirs, fit.adjusted_rand_, fit.silhouette_))],
        "pairwise": {"adjusted_rand": fit.pairwise_adjusted_rand_.tolist(), "disparity": fit.disparity_.tolist(),
                     "distance_correlation": fit.distance_correlation_.tolist()},
        "consensus_labels": dict(zip(runs[0].model_ids, fit.consensus_labels_.tolist())),
        "config_differences": differences,
        "reference_summary": {k: reference.get(k) for k in ("mean_agreement", "mean_hidden_r2", "num_models")},
    }
    if len(set(seeds)) < len(seeds):
        result["warning"] = f"some runs share a meta seed ({seeds}): they differ by nondeterminism only"
    out = fsio.as_path(out_dir) if out_dir is not None else fsio.as_path(dirs[0]).parent / OUT_DIR
    with fsio.staged(out) as local:
        store.write_json_atomic(result, local / JSON_FILE)
        (local / TABLE_FILE).write_text(markdown(result))
        _figure(fit, labels, seeds, color_by, local / FIGURE_FILE)
    return {**result, "out_dir": str(out)}


def log_mlflow(result: dict, tracking_store, started: float | None = None) -> str:
    """A run named "seed-stability" in ``tracking_store`` (a ``tracking.Store``): the headline scores
    as metrics, each seed's as ``seed.<metric>`` at step = seed, the per-seed rows as a table and,
    when ``result["out_dir"]`` is local, its files as artifacts. Returns the run id."""
    head = ("seed_stability", "distance_stability", "consensus_adjusted_rand", "mean_adjusted_rand",
            "min_adjusted_rand", "std_adjusted_rand", "mean_silhouette", "mean_disparity")
    stage = tracking_store.for_stage(f"theta-space stability over meta seeds {result['seeds']}", started=started)
    with stage.run("seed-stability", tags={"dynamo.stage": "seeds"}) as run:
        run.log_params({"seeds": result["seeds"], "color_by": result["color_by"], "num_models": result["num_models"],
                        "num_clusters": result["num_clusters"], "reference_seed": result["reference_seed"],
                        "meta_dirs": result["meta_dirs"]})
        run.log_metrics({k: result[k] for k in head})
        for row in result["per_seed"]:
            run.log_metrics({f"seed.{k}": row[k] for k in ("adjusted_rand", "silhouette", "disparity_to_reference",
                                                           "mean_agreement", "mean_hidden_r2")}, step=row["seed"])
        run.log_table(result["per_seed"], "seed_stability_per_seed.json")
        out = result.get("out_dir")
        if out and not fsio.is_uri(out):
            for name in (JSON_FILE, TABLE_FILE, FIGURE_FILE):
                run.log_artifact(fsio.as_path(out) / name, "seed-stability")
    return run.run_id


def markdown(result: dict) -> str:
    """The per-seed table, the pairwise matrices and the scores of a :func:`run_seed_stability` result."""
    f = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    seeds = result["seeds"]
    lines = [f"# θ-space stability over meta seeds {', '.join(map(str, seeds))}", "",
             f"{result['num_models']} models, {result['num_groups']} groups by `{result['color_by']}`, k-means with "
             f"k = {result['num_clusters']}; θ Procrustes-aligned to seed {result['reference_seed']}.", "",
             "| seed | k-means ARI vs groups | silhouette | disparity to reference | agreement | hidden R² |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {f(r['adjusted_rand'])} | {f(r['silhouette'])} | {f(r['disparity_to_reference'])} | "
              f"{f(r['mean_agreement'])} | {f(r['mean_hidden_r2'])} |" for r in result["per_seed"]]
    lines += ["", f"- seed stability (mean pairwise ARI of the seeds' clusterings): **{f(result['seed_stability'])}**",
              f"- distance stability (mean correlation of pairwise θ distances): {f(result['distance_stability'])}",
              f"- consensus clustering ARI vs groups: {f(result['consensus_adjusted_rand'])}",
              f"- per-seed ARI: mean {f(result['mean_adjusted_rand'])}, min {f(result['min_adjusted_rand'])}, "
              f"std {f(result['std_adjusted_rand'])}; mean Procrustes disparity {f(result['mean_disparity'])}"]
    for name, m in result["pairwise"].items():
        lines += ["", f"pairwise {name.replace('_', ' ')}:", "", "| seed | " + " | ".join(map(str, seeds)) + " |",
                  "|---:|" + "---:|" * len(seeds)]
        lines += [f"| {s} | " + " | ".join(f(v) for v in row) + " |" for s, row in zip(seeds, m)]
    if result.get("warning"):
        lines += ["", f"warning: {result['warning']}"]
    return "\n".join(lines) + "\n"


def _figure(fit: SeedStability, labels: Sequence, seeds: Sequence[int], color_by: str, path) -> None:
    """Small multiples, one per seed, on shared axes: the reference's PCA plane, so that where a model
    lies can be compared between panels."""
    try:
        import matplotlib.pyplot as plt

        from ..plots import group_colours, save, scatter_groups
    except ImportError:  # matplotlib is optional for the core path
        return
    cols = min(len(seeds), 4)
    rows = -(-len(seeds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), sharex=True, sharey=True, squeeze=False)
    colours = group_colours(labels)
    ratio = list(fit.explained_variance_ratio_[:2]) + [0.0] * 2
    for i, ax in enumerate(axes.flat):
        if i >= len(seeds):
            ax.set_visible(False)
            continue
        scatter_groups(ax, fit.coords_[i], labels, color_by if i == 0 else None, colours=colours)
        if i > 0:
            ax.get_legend().remove()
        ax.set_title(f"seed {seeds[i]}: ARI {fit.adjusted_rand_[i]:.2f}, disparity {fit.disparity_[0, i]:.2f}",
                     fontsize=9)
        ax.set_xlabel(f"PC1 of seed {seeds[0]} ({ratio[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%})", fontsize=8)
    fig.suptitle(f"θ of each meta seed, Procrustes-aligned to seed {seeds[0]}", fontsize=10)
    save(fig, path)
