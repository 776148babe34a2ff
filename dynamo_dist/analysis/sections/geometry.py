"""Embedding geometry (Fig. 3): θ's PCA coloured by group, its spectrum, clustering scores, and what
its principal components follow among the manifest's numeric columns."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..geometry import EmbeddingGeometry, axis_correlations
from ..html import Section
from .base import Context, Result, Results, write_table

KEY, TITLE = "geometry", "Embedding geometry"
LABEL_CANDIDATES = ("group", "task", "arch", "hidden_size", "train_fraction", "epoch")  # extra PCA colourings
NUMERIC_AXES = ("train_fraction", "hidden_size", "epoch", "test_accuracy")  # manifest columns theta's axes are ranked against
NUM_AXES_TESTED = 3                                                        # principal components correlated with them
AXIS_PERMUTATIONS = 2000


@dataclass(kw_only=True)
class GeometryResult(Result):
    geometry: EmbeddingGeometry | None = None  # the PCA plane every later picture of θ uses


def run(ctx: Context, sec: Section, earlier: Results) -> GeometryResult:
    from .. import figures

    if len(ctx.ids) < 2:
        sec.skip("Embedding geometry needs at least 2 models.")
        return GeometryResult.skipped("fewer than 2 models")
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
        write_table(axes_rows, ctx.table_dir / "embedding_axes.parquet")
    table = [{"model_id": m, ctx.cfg.color_by: str(lab), "pc1": float(c[0]), "pc2": float(c[1]),
              "theta": [float(v) for v in th]} for m, lab, c, th in zip(ctx.ids, ctx.labels, coords, ctx.theta)]
    write_table(table, ctx.table_dir / "embedding_pca.parquet")
    return GeometryResult(geometry=geo, headline={
        "dynamo.num_components_95": geo.num_components_,
        "dynamo.pc1_variance_ratio": float(ratio[0]) if len(ratio) else float("nan"),
        "dynamo.silhouette": scores.get("silhouette", float("nan")),
        "dynamo.adjusted_rand": scores.get("adjusted_rand", float("nan")),
        **axes_head,
    })


def _axis_correlations(ctx: Context, geo: EmbeddingGeometry) -> tuple[list[dict], dict]:
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


def _varying_labels(ctx: Context, limit: int = 4) -> list[str]:
    out = []
    for col in LABEL_CANDIDATES:
        if col == ctx.cfg.color_by or col not in ctx.run.rows[0]:
            continue
        if len({str(r.get(col)) for r in ctx.run.rows}) > 1:
            out.append(col)
    return out[:limit]
