"""Semi-supervised θ (Fig. 7): the frozen meta-model, θ fitted from 0 to a small labelled set, its
test accuracy against the best base model, and its path over the accuracy landscape."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...data.tasks import Split
from ..evaluate import accuracies
from ..geometry import EmbeddingGeometry
from ..html import Section
from ..landscape import ThetaLandscape
from ..ssl import SemiSupervisedTheta
from .base import Context, Result, Results, file_name, metric_key, population_task, write_table
from .geometry import GeometryResult
from .landscape import LandscapeResult

KEY, TITLE = "ssl", "Semi-supervised θ"


@dataclass(kw_only=True)
class SSLResult(Result):
    fits: dict[str, SemiSupervisedTheta] = field(default_factory=dict)  # task -> fitted θ


def run(ctx: Context, sec: Section, earlier: Results) -> SSLResult:
    from .. import figures

    meta = ctx.run.meta
    geo = earlier.get(GeometryResult).geometry
    lands = earlier.get(LandscapeResult).fits
    scale = float(np.sqrt((ctx.theta ** 2).sum(axis=1).mean())) or 1.0
    lr = 0.05 * max(scale, 0.1)
    sec.text(f"The meta-model is frozen; θ starts at 0 and {ctx.cfg.ssl_steps} Adam iterates (lr {lr:.3g}: 5% of the "
             "RMS norm of the base embeddings, at least 0.005) minimise the cross-entropy of the final-step output on "
             "a small labelled set disjoint from the test split (Fig. 7).")
    rows, head, fits = [], {}, {}
    for task in sorted(set(ctx.tasks)):
        labelled, source = _labelled(ctx, task)
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
                                      ctx.fig_dir / f"ssl_path_{file_name(task)}.png",
                                      f"SSL iterates over the accuracy landscape ({task})", path_S2=path2)
                sec.figure(p, ctx.out, f"Red: θ iterates from 0 (projected on the PCA plane), task {task}.")
        p = figures.ssl_loss(fit.losses_, ctx.fig_dir / f"ssl_loss_{file_name(task)}.png", f"SSL loss ({task})")
        sec.figure(p, ctx.out, "Labelled-set loss per iterate.")
        d_to_base = np.linalg.norm(ctx.theta - fit.theta_, axis=1)
        nearest = ctx.ids[int(np.argmin(d_to_base))]
        rows.append({"task": task, "num_labelled": len(labelled), "ssl_test_accuracy": acc,
                     "best_base_accuracy": best_base, "difference": acc - best_base,
                     "labelled_accuracy": fit.train_accuracy_, "nearest_base_model": nearest,
                     "theta_norm": float(np.linalg.norm(fit.theta_))})
        key = f"ssl.{metric_key(task)}"
        head.update({f"{key}.test_accuracy": acc, f"{key}.best_base_accuracy": best_base,
                     f"{key}.num_labelled": len(labelled)})
        write_table([{"task": task, "step": i, "theta": [float(v) for v in th],
                      "loss": float(fit.losses_[i - 1]) if i else float("nan")} for i, th in enumerate(fit.path_)],
                    ctx.table_dir / f"ssl_path_{file_name(task)}.parquet")
    sec.table(rows)
    return SSLResult(fits=fits, headline=head)


def _labelled(ctx: Context, task: str) -> tuple[Split, str]:
    """ssl_fraction of the training pool, labelled, disjoint from test (and from the probe set when possible).

    Rebuilds the population's task split (population.json's data_seed / num_examples) and
    draws from base_train; falls back to the stored probe inputs' labels when the task
    cannot be rebuilt identically (e.g. users' own models).
    """
    rng = np.random.default_rng([ctx.cfg.seed, 7])
    row = next(r for r in ctx.run.rows if r["task"] == task)
    num_classes = int(row["num_classes"])
    probe = ctx.pop.probe_inputs[task]
    td = population_task(ctx, task)
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


def _cover(land: ThetaLandscape, path_S2: np.ndarray, ctx: Context, geo: EmbeddingGeometry, task: str) -> ThetaLandscape:
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
