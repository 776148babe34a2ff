"""Word valence (Fig. 11, eq. 8): for a token sentiment task, how the meta-model's readout moves
after one word from the neutral fixed point, scored at the base θ_n and over θ's PCA plane."""

from __future__ import annotations

import numpy as np

from ... import family as families
from ...data.tasks import UNK_ID, token_id
from ...plots import group_colours
from ..evaluate import accuracies
from ..fixed_points import FixedPointFinder
from ..html import Section
from ..landscape import ThetaLandscape
from ..valence import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, WordValence
from .base import Context, Result, Results, file_name, metric_key, population_task, write_table
from .fixed_points import NUM_FP_PROBE
from .geometry import GeometryResult

KEY, TITLE = "valence", "Word valence"
VALENCE_GRID = 5              # grid points per axis of the word-valence map (a fixed-point search each)
NEUTRAL_TOL = 0.25            # |G(h*)| (logit difference) below which the chosen fixed point counts as neutral


def run(ctx: Context, sec: Section, earlier: Results) -> Result:
    from .. import figures

    reason = _inapplicable(ctx)
    if reason:
        sec.skip(reason)
        return Result.skipped(reason)
    meta = ctx.run.meta
    head, rows = {}, []
    geo = earlier.get(GeometryResult).geometry
    for task in sorted(set(ctx.tasks)):
        td = population_task(ctx, task)
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
                    grid_scores[key] = _fit(ctx, meta, th, word_ids, task, pos, neg).scores_
                return grid_scores[key]

            land.fit(ctx.theta[mem], score_fn, geometry=geo)
        wv = _fit(ctx, meta, np.array(thetas), word_ids, task, pos, neg)
        sec.text(f"{task}: G(h) = logit(positive) − logit(negative); per θ the fixed point with the most neutral "
                 f"readout is h*. Words used: {sum(len(v) for v in wv.words_.values())} of "
                 f"{len(POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS)} (missing from the vocabulary: "
                 f"{', '.join(wv.missing_words_) or 'none'}).")
        if land is not None:
            p = figures.landscape(land.axis_a_, land.axis_b_, land.scores_, land.base_coords_,
                                  [ctx.labels[i] for i in mem], land.best_coords_,
                                  ctx.fig_dir / f"valence_map_{file_name(task)}.png", f"word-valence score, eq. 8 ({task})",
                                  cbar_label="score", colours=group_colours(ctx.labels))
            sec.figure(p, ctx.out, "Eq. 8 score over the θ plane (Fig. 11); × marks the best grid point.")
        best = int(np.argmax(wv.scores_))
        cats = [c for c in ("positive", "negative", "neutral") for _ in wv.words_[c]]
        p = figures.word_values(wv.word_order_, wv.values_[best], cats, ctx.fig_dir / f"valence_words_{file_name(task)}.png",
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
        head[f"valence.{metric_key(task)}.mean_score"] = float(np.mean(wv.scores_))
        head[f"valence.{metric_key(task)}.fraction_neutral"] = float(neutral.mean())
        if land is not None:
            head[f"valence.{metric_key(task)}.best_grid_score"] = float(land.best_score_)
    if rows:
        sec.table(rows, caption="Eq. 8 score at the base models' θ_n")
        write_table(rows, ctx.table_dir / "valence.parquet")
        accs = np.array([r["meta_accuracy"] for r in rows])
        scs = np.array([r["score"] for r in rows])
        if len(rows) >= 3 and accs.std() > 0 and scs.std() > 0:
            head["valence.score_accuracy_correlation"] = float(np.corrcoef(scs, accs)[0, 1])
    return Result(headline=head)


def _inapplicable(ctx: Context) -> str | None:
    if not families.get(ctx.run.family).recurrent:
        return "Word valence needs a recurrent model reading tokens; this is a ResNet (CNN) population."
    kinds = {r["input_kind"] for r in ctx.run.rows}
    if kinds != {"tokens"}:
        return f"Word valence needs token inputs (words); this population's inputs are {sorted(kinds)}."
    if not ctx.cfg.fixed_points:
        return "Word valence needs the fixed-point search (analyze.fixed_points = false)."
    for task in sorted(set(ctx.tasks)):
        td = population_task(ctx, task)
        if td is not None and {"positive", "negative"} <= set(td.class_names):
            return None
    return "Word valence needs a sentiment task with 'positive' and 'negative' classes."


def _fit(ctx: Context, meta, thetas: np.ndarray, word_ids: dict, task: str, pos: int, neg: int) -> WordValence:
    probe = ctx.pop.probe_inputs[task]
    finder = FixedPointFinder(num_initial=min(64, ctx.cfg.fixed_point_states), max_iter=ctx.cfg.fixed_point_iters,
                              random_state=ctx.cfg.seed)
    return WordValence(finder=finder, num_probe=NUM_FP_PROBE, random_state=ctx.cfg.seed).fit(
        meta, thetas, word_ids, task, pos, neg, probe.x, probe.lengths)
