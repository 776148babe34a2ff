"""The θ landscape (Fig. 6): the meta-model's test accuracy over a grid in θ's PCA plane, relative to
the best base model, and whether its best point lies outside the base embeddings' hull."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..evaluate import accuracies
from ..html import Section
from ..landscape import ThetaLandscape
from .base import Context, Result, Results, file_name, metric_key, write_table
from .geometry import GeometryResult

KEY, TITLE = "landscape", "θ landscape"


@dataclass(kw_only=True)
class LandscapeResult(Result):
    fits: dict[str, tuple[ThetaLandscape, float]] = field(default_factory=dict)  # task -> (landscape, best base accuracy)


def run(ctx: Context, sec: Section, earlier: Results) -> LandscapeResult:
    from .. import figures

    geo = earlier.get(GeometryResult).geometry
    if geo is None:
        sec.skip("Needs the PCA plane of at least 2 embeddings.")
        return LandscapeResult.skipped("no embedding geometry")
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
                              ctx.labels, land.best_coords_, ctx.fig_dir / f"landscape_{file_name(task)}.png",
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
        key = f"landscape.{metric_key(task)}"
        head.update({f"{key}.best_accuracy": land.best_score_, f"{key}.best_base_accuracy": best_base,
                     f"{key}.best_relative": land.best_score_ / max(best_base, 1e-12),
                     f"{key}.best_inside_hull": land.best_inside_hull_, f"{key}.best_beats_best_base": gain})
    sec.table(rows)
    write_table(grid_rows, ctx.table_dir / "landscape.parquet")
    return LandscapeResult(fits=fits, headline=head)
