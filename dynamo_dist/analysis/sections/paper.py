"""The report's last section: the paper's claims side by side with what this run measured, from
the headline keys and results of the sections before it (``analysis.json``'s ``paper_comparison``)."""

from __future__ import annotations

from ..html import Section
from .averaging import AveragingResult
from .base import Context, Results, fmt, metric_key
from .comparison import METHOD_NAMES
from .fixed_points import FixedPointsResult
from .landscape import LandscapeResult
from .ssl import SSLResult

KEY, TITLE = "paper", "Paper claims vs this run"


def write(ctx: Context, sec: Section, earlier: Results) -> list[dict]:
    """The comparison's rows (claim, paper, measured), also written into ``sec``."""
    rows = comparison(ctx, earlier)
    sec.text("Numbers as measured on this population, side by side with what the paper reports "
             "(its populations are IMDB/AG News GRUs and CIFAR ResNets; ours may differ in task and scale).")
    sec.table(rows, ["claim", "paper", "measured"])
    return rows


def comparison(ctx: Context, earlier: Results) -> list[dict]:
    h = earlier.headline()
    rows = []
    if "dynamo.silhouette" in h:
        if "comparison.dynamo.silhouette_full" in h:  # like for like: every method's full distances
            methods = [m for m in METHOD_NAMES if f"comparison.{m}.silhouette_full" in h]
            measured = "; ".join(f"{title} " + ", ".join(f"{METHOD_NAMES[m]} {fmt(h[f'comparison.{m}.{metric}'])}"
                                                         for m in methods)
                                 for metric, title in (("silhouette_full", "silhouette"), ("ari_full", "k-means ARI"),
                                                       ("nn_accuracy", "1-NN accuracy")))
            measured += f" (the same {h['comparison.num_models']} models, full representations)"
        else:
            measured = (f"silhouette DYNAMO {fmt(h['dynamo.silhouette'])}; "
                        f"k-means ARI DYNAMO {fmt(h['dynamo.adjusted_rand'])}")
        rows.append({"claim": f"Embeddings separate the groups ({ctx.cfg.color_by}); clearer than SVCCA + MDS",
                     "paper": "clear clusters in DYNAMO's PCA (Fig. 3); less apparent with SVCCA-MDS (Fig. 5)",
                     "measured": measured})
        rows.append({"claim": "Components explaining 95% of the embedding variance", "paper": "2 to 6 (Fig. 3)",
                     "measured": f"{h['dynamo.num_components_95']} of d={ctx.run.cfg.embedding_dim} "
                                 f"({len(ctx.ids)} models)"})
    avg = earlier.get(AveragingResult).averaging
    if avg is not None:
        cen = [r for r in avg.table_ if r["kind"] == "centroid"]
        rows.append({"claim": "Meta-model at a cluster centroid performs like the cluster's members",
                     "paper": "centroid models perform similarly to the cluster (sections 5, C)",
                     "measured": "; ".join(f"{r['name']}: {fmt(r['meta_accuracy'])} vs members {fmt(r['member_base_mean'])}"
                                           for r in cen)})
    for task, (land, best_base) in earlier.get(LandscapeResult).fits.items():
        rows.append({"claim": f"Best θ on the accuracy landscape lies outside the base hull ({task})",
                     "paper": "outside the convex hull (Fig. 6)",
                     "measured": f"{'inside' if land.best_inside_hull_ else 'outside'}; best {fmt(land.best_score_)} "
                                 f"vs best base {fmt(best_base)}" + ("" if land.best_score_ > best_base else
                                                                    " (no better than the best base: not supported)")})
    for task, fit in earlier.get(SSLResult).fits.items():
        acc = h.get(f"ssl.{metric_key(task)}.test_accuracy")
        rows.append({"claim": f"SSL in θ beats the best base model ({task})",
                     "paper": "86.4% vs 80.3% (IMDB, 1% labelled)",
                     "measured": f"{fmt(acc)} vs {fmt(h.get(f'ssl.{metric_key(task)}.best_base_accuracy'))} "
                                 f"({h.get(f'ssl.{metric_key(task)}.num_labelled')} labelled)"})
    fp = earlier.get(FixedPointsResult).table
    if fp:
        cen = [r for r in fp if r["theta"].startswith("centroid")]
        rows.append({"claim": f"Line-attractor structure of the meta-model at x* ({', '.join(sorted(set(ctx.tasks)))})",
                     "paper": "line attractors, elongated with more training data (Fig. 8)",
                     "measured": "; ".join(f"{r['theta']}: {r['num_fixed_points']} fp, PC1 share "
                                           f"{fmt(r['pc1_variance_ratio'])}, |λ|≈1 {fmt(r['mean_num_near_unit'])}"
                                           if r["converged"] else
                                           f"{r['theta']}: no fixed point found ({r['num_slow_points']} slow points, "
                                           f"min q {fmt(r['min_q'])})" for r in cen)})
    for key, val in h.items():
        if key.endswith("score_accuracy_correlation"):
            rows.append({"claim": "Word-valence score highest near the best θ", "paper": "noisy but discernible trend (Fig. 11)",
                         "measured": f"correlation of score with meta accuracy over θ_n: {fmt(val)}"})
    return rows
