"""The report's first section: the meta run's emulation metrics and the base models by group.
Not one of the analyses: it has no status in ``analysis.json`` and no headline keys."""

from __future__ import annotations

import numpy as np

from ..html import Section
from .base import Context

KEY, TITLE = "overview", "Meta run"


def write(ctx: Context, sec: Section, summary: dict) -> None:
    """``summary``: the meta run's ``summary.json``."""
    keys = ("mean_agreement", "mean_hidden_r2", "mean_meta_accuracy", "mean_base_accuracy", "steps", "wall_seconds",
            "num_workers")
    sec.table([{"metric": k, "value": summary[k]} for k in keys if k in summary], ["metric", "value"],
              caption="Emulation metrics of the meta run (test split, meta-model at each θ_n)")
    per_group: dict[str, list[float]] = {}
    for m, lab in zip(ctx.ids, ctx.labels):
        per_group.setdefault(str(lab), []).append(ctx.base_acc[m])
    sec.table([{ctx.cfg.color_by: g, "models": len(v), "base test accuracy (mean)": float(np.mean(v)),
                "min": float(np.min(v)), "max": float(np.max(v))} for g, v in sorted(per_group.items())],
              caption=f"Base models by {ctx.cfg.color_by} (accuracy on the recorded test inputs)")
