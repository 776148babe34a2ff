"""The SVCCA / CKA baseline (Fig. 5): pairwise distances between the sampled models' hidden
activations on the same probe inputs, embedded in 2-D by metric MDS."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ... import family as families
from ...data import store
from ..baseline import RepresentationBaseline
from ..html import Section
from .base import Context, Result, Results, base_model, sample_text, write_table

KEY, TITLE = "baseline", "SVCCA / CKA baseline"


@dataclass(kw_only=True)
class BaselineResult(Result):
    fits: dict[str, RepresentationBaseline] = field(default_factory=dict)  # "svcca", "cka" (empty when skipped)


def run(ctx: Context, sec: Section, earlier: Results) -> BaselineResult:
    from .. import figures

    if not ctx.cfg.baseline:
        sec.skip("Disabled (analyze.baseline = false).")
        return BaselineResult.skipped("disabled by config")
    if len(ctx.ids) < 3:
        sec.skip("The pairwise baseline needs at least 3 models.")
        return BaselineResult.skipped("fewer than 3 models")
    ids = [ctx.ids[i] for i in ctx.sample]
    labels = [ctx.labels[i] for i in ctx.sample]
    taps, source = _activations(ctx)
    fits = {method: RepresentationBaseline(method=method, max_rows=ctx.cfg.baseline_rows,
                                           random_state=ctx.cfg.seed).fit(taps, labels)
            for method in ("svcca", "cka")}
    num_rows = fits["svcca"].num_rows_
    sec.text(f"Compared: {sample_text(ctx)}. Activations: {source}; {num_rows} rows per model, the same for every "
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
    write_table([{"model_id": m, ctx.cfg.color_by: str(lab), "svcca_mds_1": float(a[0]), "svcca_mds_2": float(a[1]),
                  "cka_mds_1": float(b[0]), "cka_mds_2": float(b[1])}
                 for m, lab, a, b in zip(ids, labels, fits["svcca"].embedding_, fits["cka"].embedding_)],
                ctx.table_dir / "baseline_mds.parquet")
    head = {"baseline.num_models": n, "baseline.num_rows": num_rows}
    for m, f in fits.items():
        head[f"{m}.silhouette"] = f.scores_.get("silhouette", float("nan"))
        head[f"{m}.adjusted_rand"] = f.scores_.get("adjusted_rand", float("nan"))
    return BaselineResult(fits=fits, headline=head)


def _activations(ctx: Context) -> tuple[list[list[np.ndarray]], str]:
    """The sampled models' hidden activations on the same probe inputs (``ctx.sample`` order).

    One task: the recorded probe trajectories. Several tasks (different probe sets): the
    models are re-run from their weights on the first task's probe inputs (DYNAMO requires
    a common input structure, so every model accepts them).
    """
    fam = families.get(ctx.run.family)
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
                hiddens[r["model_id"]] = base_model(ctx, r).trajectories(inputs.x)[0]
        source = (f"every model re-run from its weights on the probe inputs of task {tasks[0]!r} "
                  f"({n} examples; the models span tasks {tasks})")
    n = min(h[0].shape[0] for h in hiddens.values())
    taps, select = [], None
    for m in ids:
        model_taps = fam.activation_taps([x[:n] for x in hiddens[m]], inputs.lengths[:n])
        if fam.recurrent:  # rows are (example, step) pairs, many: the same random subset for every model
            if select is None:
                num_rows = model_taps[0].shape[0]
                keep = num_rows if ctx.cfg.baseline_rows is None else min(num_rows, ctx.cfg.baseline_rows)
                select = np.sort(rng.choice(num_rows, size=keep, replace=False))
            model_taps = [t[select] for t in model_taps]
        taps.append(model_taps)
    return taps, source
