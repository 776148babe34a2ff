"""Model averaging (sections 5, C): the meta-model at each group's centroid θ and at midpoints of
pairs of models, against the members."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..averaging import ModelAveraging
from ..html import Section
from .base import Context, Result, Results, metric_key, write_table

KEY, TITLE = "averaging", "Model averaging"


@dataclass(kw_only=True)
class AveragingResult(Result):
    averaging: ModelAveraging | None = None


def run(ctx: Context, sec: Section, earlier: Results) -> AveragingResult:
    from .. import figures

    meta = ctx.run.meta
    avg = ModelAveraging().fit(meta, ctx.theta, ctx.ids, ctx.labels, ctx.tasks, ctx.test, ctx.base_acc)
    sec.text(f"The meta-model at the centroid θ of each {ctx.cfg.color_by} group and at midpoints of pairs of "
             "models, on the test split, vs the members: the base models themselves and the meta-model at their θ_n.")
    p = figures.averaging_bars(avg.table_, ctx.fig_dir / "averaging.png")
    sec.figure(p, ctx.out, "Accuracy at averaged embeddings vs the members' accuracies.")
    cols = ["kind", "name", "task", "num_members", "meta_accuracy", "member_base_mean", "member_base_max",
            "member_meta_mean"]
    sec.table(avg.table_, cols)
    write_table(avg.table_, ctx.table_dir / "averaging.parquet")
    head = {}
    for r in avg.table_:
        if r["kind"] == "centroid":
            key = f"averaging.{metric_key(r['name'])}"
            head[f"{key}.centroid_accuracy"] = r["meta_accuracy"]
            head[f"{key}.member_base_mean"] = r["member_base_mean"]
            head[f"{key}.member_meta_mean"] = r["member_meta_mean"]
    cen = [r for r in avg.table_ if r["kind"] == "centroid"]
    head["averaging.mean_centroid_minus_member_base"] = float(np.mean([r["meta_accuracy"] - r["member_base_mean"]
                                                                       for r in cen]))
    return AveragingResult(averaging=avg, headline=head)
