"""Fixed points and line attractors (Fig. 8): the meta-model's fixed points at x* for several θ of
interest, a few base models' for comparison, and the fixed points continued along a path in θ."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ... import family as families
from ...data import store
from ..fixed_points import FixedPointFinder, base_dynamics, base_visited_states, meta_dynamics, meta_visited_states
from ..html import Section
from .base import Context, Result, Results, base_model, metric_key, write_table
from .geometry import GeometryResult
from .landscape import LandscapeResult
from .ssl import SSLResult

KEY, TITLE = "fixed_points", "Fixed points"
NUM_FP_PROBE = 64             # probe sequences whose visited states seed fixed-point searches
MAX_META_FP_THETAS = 8        # meta-model thetas analysed for fixed points (Fig. 8)
MAX_BASE_FP_MODELS = 4        # base models analysed for fixed points


@dataclass(kw_only=True)
class FixedPointsResult(Result):
    table: list[dict] = field(default_factory=list)  # one row per meta-model θ analysed
    base: list[dict] = field(default_factory=list)   # one row per base model analysed


def run(ctx: Context, sec: Section, earlier: Results) -> FixedPointsResult:
    from .. import figures

    if not families.get(ctx.run.family).recurrent:
        sec.skip("Fixed points are defined for recurrent dynamics; this is a ResNet (CNN) population.")
        return FixedPointsResult.skipped("CNN population")
    if not ctx.cfg.fixed_points:
        sec.skip("Disabled (analyze.fixed_points = false).")
        return FixedPointsResult.skipped("disabled by config")
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
    points = _thetas_of_interest(ctx, earlier)
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
    write_table(table, ctx.table_dir / "fixed_points_meta.parquet")
    write_table(points_rows, ctx.table_dir / "fixed_points_meta_points.parquet")
    path_head = _fixed_point_path(ctx, sec, finder)

    # base models from the zoo: each in its own hidden space
    base_rows, base_panels = [], []
    for r in _base_models(ctx):
        model = base_model(ctx, r)
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
        write_table(base_rows, ctx.table_dir / "fixed_points_base.parquet")
    head = {}
    for row in table:
        key = f"fixed_points.{metric_key(row['theta'])}"
        head.update({f"{key}.num_fixed_points": row["num_fixed_points"], f"{key}.converged": row["converged"],
                     f"{key}.pc1_variance_ratio": row["pc1_variance_ratio"],
                     f"{key}.mean_num_near_unit": row["mean_num_near_unit"]})
    head.update(path_head)
    return FixedPointsResult(table=table, base=base_rows, headline=head)


_PATH_EVENT_SCHEMA = pa.schema([("kind", pa.string()), ("branch", pa.int64()), ("step", pa.int64()),
                                ("s_before", pa.float64()), ("s_after", pa.float64()), ("s", pa.float64()),
                                ("num_before", pa.int64()), ("num_after", pa.int64()), ("stable_before", pa.bool_()),
                                ("stable_after", pa.bool_()), ("pc1", pa.float64()), ("pc2", pa.float64())])


def _fixed_point_path(ctx: Context, sec: Section, finder: FixedPointFinder) -> dict:
    """Fixed points continued along θ(s) = (1 − s) θ_a + s θ_b between the two centroids farthest apart."""
    from .. import figures
    from ..continuation import FixedPointContinuation, meta_path

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
    write_table([{"path": name, **r} for r in cont.points_], ctx.table_dir / "fixed_point_continuation.parquet")
    write_table(cont.steps_, ctx.table_dir / "fixed_point_continuation_steps.parquet")
    store.write_table_atomic(pa.Table.from_pylist(cont.events_, schema=_PATH_EVENT_SCHEMA),
                             ctx.table_dir / "fixed_point_continuation_events.parquet")
    return {"fixed_points.path.num_count_changes": len(cont.count_changes_),
            "fixed_points.path.num_stability_changes": cont.num_stability_changes_,
            "fixed_points.path.num_events": len(cont.events_),
            "fixed_points.path.num_branches": len({p["branch"] for p in cont.points_})}


def _thetas_of_interest(ctx: Context, earlier: Results) -> list[tuple[str, np.ndarray, str]]:
    """Fig. 8's points: group centroids, the two extreme members of each group along PC1,
    the best landscape point, the SSL theta and the midpoint of two centroids."""
    pts: list[tuple[str, np.ndarray, str]] = []
    keys = [str(v) for v in ctx.labels]
    geo = earlier.get(GeometryResult).geometry
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
    land = earlier.get(LandscapeResult).fits.get(task0)
    if land is not None:
        pts.append(("best landscape point", land[0].best_theta_, task0))
    ssl = earlier.get(SSLResult).fits.get(task0)
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


def _base_models(ctx: Context) -> list[dict]:
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
