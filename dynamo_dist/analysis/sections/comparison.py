"""Methods compared like for like: DYNAMO's θ, the SVCCA/CKA baselines, raw weights and (as a
reference) the base models' outputs, all scored the same way on the same sampled models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...plots import group_colours
from ..baseline import classical_mds
from ..comparison import METRICS, MethodComparison, euclidean_distances, output_distances
from ..html import Section
from .base import Context, Result, Results, base_model, fmt, sample_text, write_table
from .baseline import BaselineResult
from .geometry import GeometryResult

KEY, TITLE = "comparison", "Methods compared like for like"
RAW_WEIGHT_BYTES = 512 * 2**20  # flattened float32 weights held for the method comparison's raw-weight distances
METHOD_NAMES = {"dynamo": "DYNAMO θ", "svcca": "SVCCA", "cka": "CKA", "raw_weights": "raw weights",
                "outputs": "base outputs (reference)"}


@dataclass(kw_only=True)
class ComparisonResult(Result):
    comparison: MethodComparison | None = None


def run(ctx: Context, sec: Section, earlier: Results) -> ComparisonResult:
    from .. import figures

    geo = earlier.get(GeometryResult).geometry
    if geo is None or len(ctx.ids) < 3:
        sec.skip("The method comparison needs at least 3 models.")
        return ComparisonResult.skipped("fewer than 3 models")
    idx = ctx.sample
    labels = [ctx.labels[i] for i in idx]
    d = ctx.run.cfg.embedding_dim
    distances = {"dynamo": euclidean_distances(ctx.theta[idx])}
    coords = {"dynamo": geo.coords_[idx]}
    shown = {"dynamo": (f"θ (d={d}), Euclidean", "PCA")}  # (distances, 2-D picture)
    baseline = earlier.get(BaselineResult)
    for m, f in baseline.fits.items():
        distances[m], coords[m] = f.distances_, f.embedding_
        shown[m] = ("SVCCA distance" if m == "svcca" else "1 − linear CKA", "metric MDS")
    if "svcca" not in distances:
        sec.note(f"No SVCCA/CKA rows: the baseline section was skipped ({baseline.note}).")
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
             f"models: {sample_text(ctx)}. Full: the method's distance matrix — silhouette on it, leave-one-out "
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
        return fmt(v) if math.isnan(lo) else f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"

    heads = {"silhouette_full": "silhouette (full)", "silhouette_2d": "silhouette (2-D)",
             "ari_full": "k-means ARI (full)", "ari_2d": "k-means ARI (2-D)", "nn_accuracy": "1-NN accuracy"}
    described = {m: f"{full}; 2-D: {flat}" for m, (full, flat) in shown.items()}
    sec.table([{"method": METHOD_NAMES[m], "representation": described[m], **{heads[k]: cell(m, k) for k in METRICS}}
               for m in cmp.scores_], caption=f"Recovering {ctx.cfg.color_by}: every method on the same terms")
    panels = [(f"{METHOD_NAMES[m]} ({shown[m][1]})\nsilhouette {fmt(cmp.scores_[m]['silhouette_2d'])}, "
               f"k-means ARI {fmt(cmp.scores_[m]['ari_2d'])}", cmp.coords_2d_[m]) for m in cmp.scores_]
    # the sample may lack groups: colours from every model's label keep each group's colour of the other figures
    p = figures.side_by_side(panels, labels, ctx.cfg.color_by, ctx.fig_dir / "baseline_side_by_side.png",
                             colours=group_colours(ctx.labels))
    sec.figure(p, ctx.out, "Each method's 2-D picture of the same models, titled with its 2-D scores (DYNAMO's PCA: "
                           "Fig. 3; SVCCA + MDS: Fig. 5). MDS axes carry no meaning.")
    write_table([{"method": row["method"], "representation": described[row["method"]], **row,
                  "num_bootstrap": ctx.cfg.bootstrap} for row in cmp.table_], ctx.table_dir / "method_comparison.parquet")
    head = {"comparison.num_models": len(idx), "comparison.num_bootstrap": ctx.cfg.bootstrap,
            "comparison.num_dims": min(d, len(idx) - 1)}
    for m in cmp.scores_:
        for metric in METRICS:
            key = f"comparison.{m}.{metric}"
            head[key] = cmp.scores_[m][metric]
            head[f"{key}.low"], head[f"{key}.high"] = cmp.intervals_[m][metric]
    return ComparisonResult(comparison=cmp, headline=head)


def _test_logits(ctx: Context) -> tuple[np.ndarray | None, str]:
    """(N, B, C) the sampled models' final-step outputs on the shared test inputs, or None and why not."""
    tasks = sorted({ctx.tasks[i] for i in ctx.sample})
    if len(tasks) > 1:
        return None, f"the models span tasks {tasks}, whose outputs are not distributions over the same classes"
    ids = [ctx.ids[i] for i in ctx.sample]
    n = min(ctx.pop.test[m].num_examples for m in ids)
    # RNN outputs are left-padded (N, T, C): the last step is every sequence's final output
    return np.stack([ctx.pop.test[m].outputs[:n, -1].float().numpy() for m in ids]), ""


def _raw_weights(ctx: Context) -> tuple[np.ndarray | None, str]:
    """(N, P) flattened parameters of the sampled models, or None and why they cannot be compared."""
    first_shapes, first_row, vectors = None, None, []
    for i in ctx.sample:
        r = ctx.run.rows[i]
        params = list(base_model(ctx, r).named_parameters())
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
