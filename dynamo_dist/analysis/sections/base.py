"""What every section of the report reads (``Context``), what each leaves for the later ones
(its ``Result``), and the small helpers their tables and keys share.

A section is a module with ``KEY`` (its ``analysis.json`` ``sections`` key and report anchor),
``TITLE`` and ``run(ctx, sec, earlier) -> Result``: it writes its figures and tables, fills its
part of the report (``sec``) and returns a ``Result`` dataclass of its own. A later section reads
an earlier one's by type, ``earlier.get(GeometryResult).geometry``: importing that type from the
earlier section's module is the declaration of what it reads.

Shape legend: N models, E embedding dim.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from ...config import AnalyzeConfig
from ...data import store
from ...data.tasks import Split, load_task
from ...meta.outputs import MetaRun
from ...meta.trainer import PopulationData, load_population
from ..evaluate import base_accuracy
from ..geometry import stratified_sample


@dataclass
class Context:
    """What every section reads: the meta run, its population and derived per-model data."""

    run: MetaRun
    cfg: AnalyzeConfig
    out: Path
    pop: PopulationData
    ids: list[str]
    theta: np.ndarray   # (N, E) float64
    labels: list        # the manifest's analyze.color_by column
    tasks: list[str]
    test: dict[str, Split]
    base_acc: dict[str, float]
    sample: np.ndarray  # indices of the models compared pairwise (analyze.baseline_models, stratified)

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    @property
    def table_dir(self) -> Path:
        return self.out / "tables"


def build_context(run: MetaRun, cfg: AnalyzeConfig, out: Path) -> Context:
    rows = run.rows
    if cfg.color_by not in rows[0]:
        cols = sorted(k for k in rows[0] if not k.endswith("_path"))
        raise ValueError(f"color_by: manifest has no column {cfg.color_by!r}; columns: {cols}")
    pop = load_population(run.population_root, run.model_ids, with_test=True, manifest=run.rows)
    ids = [r["model_id"] for r in rows]
    tasks = [r["task"] for r in rows]
    test = {t: pop.test_inputs[t] for t in sorted(set(tasks))}
    base_acc = {m: base_accuracy(pop.test[m].outputs.float(), test[t].y) for m, t in zip(ids, tasks)}
    # the recorded test trajectories may cover fewer rows than the stored inputs
    for t in test:
        n = min(pop.test[m].num_examples for m, tt in zip(ids, tasks) if tt == t)
        test[t] = test[t].subset(slice(0, n))
    labels = [r.get(cfg.color_by) for r in rows]
    return Context(run=run, cfg=cfg, out=out, pop=pop, ids=ids, theta=run.theta().astype(np.float64),
                   labels=labels, tasks=tasks, test=test, base_acc=base_acc,
                   sample=stratified_sample(labels, cfg.baseline_models, cfg.seed))


@dataclass(kw_only=True)
class Result:
    """What a section returns; subclasses add what later sections read (None or empty when skipped)."""

    headline: dict = field(default_factory=dict)  # analysis.json's headline keys and MLflow metrics
    status: str = "ok"                            # "ok" | "skipped"
    note: str | None = None                       # why it was skipped

    @classmethod
    def skipped(cls, note: str):
        return cls(status="skipped", note=note)


R = TypeVar("R", bound=Result)


class Results:
    """The results of the sections run so far, by section key, in the order they ran."""

    def __init__(self) -> None:
        self._by_key: dict[str, Result] = {}

    def add(self, key: str, result: Result) -> None:
        self._by_key[key] = result

    def get(self, kind: type[R]) -> R:
        """The result of type ``kind``, or an empty one (every field at its default) when that section did not run."""
        return next((r for r in self._by_key.values() if type(r) is kind), None) or kind()

    def headline(self) -> dict:
        """Every section's headline keys, in section order."""
        out: dict = {}
        for r in self._by_key.values():
            out.update(r.headline)
        return out


# ---------------------------------------------------------------- shared by several sections


def sample_text(ctx: Context) -> str:
    """How many models the pairwise analyses compare, and how they were drawn."""
    n, total = len(ctx.sample), len(ctx.ids)
    if n == total:
        return f"all {total} models"
    counts = Counter(str(ctx.labels[i]) for i in ctx.sample)
    per = (", ".join(f"{g}: {c}" for g, c in sorted(counts.items())) if len(counts) <= 12 else
           f"{min(counts.values())} to {max(counts.values())} per group")
    return (f"{n} of {total} models, drawn at random within each {ctx.cfg.color_by} group in proportion to its "
            f"size (analyze.baseline_models = {ctx.cfg.baseline_models}, seed {ctx.cfg.seed}; {per})")


def base_model(ctx: Context, row: dict):
    """A base model of the run rebuilt from its weights file; a damaged file's error says what to do."""
    from ... import adapters

    root = ctx.run.population_root
    try:
        return adapters.load(store.Layout.at(root).path(row["weights_path"]))
    except ValueError as err:
        raise ValueError(f"{err}; {store.repair_remedy(root)}") from None


def population_task(ctx: Context, task: str):
    """The task exactly as the population stage built it, or None when that cannot be reproduced."""
    spec = store.read_spec(ctx.run.population_root)
    if "data_seed" not in spec:
        return None
    try:
        td = load_task(task, seed=int(spec["data_seed"]), num_examples=spec.get("num_examples"))
    except (ValueError, FileNotFoundError, OSError):
        return None
    row = next(r for r in ctx.run.rows if r["task"] == task)
    if tuple(td.input_shape) != tuple(row["input_shape"]) or (td.vocab_size or None) != (row.get("vocab_size") or None):
        return None
    return td


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def metric_key(name: str) -> str:
    """A metric-name-safe form (MLflow allows alphanumerics, _ - . / and spaces)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-./") else "_" for c in str(name))


def file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_table(rows: list[dict], path: Path) -> None:
    if rows:
        store.write_table_atomic(pa.Table.from_pylist(rows), path)
