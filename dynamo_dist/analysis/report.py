"""``run_analysis``: every applicable analysis of a finished meta run -> plots, tables, report, MLflow.

Output directory (default ``<meta_dir>/analysis``)::

    report.html                 the report, self-contained (the figures/ PNGs embedded)
    analysis.json               headline numbers, per-section status/notes, paper comparison
    figures/*.png
    tables/*.parquet            embedding coordinates, distances, averaging, landscape grid,
                                SSL path, fixed points, word valence

Analyses that do not apply are skipped with a note: the SVCCA/CKA baseline with fewer
than 3 models, fixed points and word valence for ResNet (CNN) populations, word valence
for non-token or non-sentiment tasks.

At scale, everything that compares models pairwise (SVCCA, CKA, raw weights, the method
comparison) runs on ``analyze.baseline_models`` models drawn stratified by
``analyze.color_by`` (all of them when there are no more); embedding geometry uses all models.

Each analysis is one module of ``sections/`` (``sections/base.py`` says what a section is); this
module runs them in the order of ``SECTIONS``, between the overview and the paper comparison, and
writes what they leave: the report, ``analysis.json`` and the MLflow run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import AnalyzeConfig
from ..data import fsio, lock, store
from ..meta import outputs
from ..meta.outputs import MetaRun, load_meta_run
from .html import Report
from .sections import averaging, baseline, comparison, fixed_points, geometry, landscape, overview, paper, ssl, valence
from .sections.base import Results, build_context

# the analyses in the order they run: a section reads only the results of those before it
SECTIONS = (geometry, baseline, comparison, averaging, landscape, ssl, fixed_points, valence)


def run_analysis(meta_dir: str, cfg: AnalyzeConfig, out_dir: str | None = None, log: bool = True,
                 progress: bool = False) -> dict:
    """Run every applicable analysis of the meta run in ``meta_dir``; returns headline numbers + ``report``.

    Writes figures, Parquet tables, ``analysis.json`` and ``report.html`` under ``out_dir``
    (default ``<meta_dir>/analysis``) and, with ``log``, logs them as a run named "analyze"
    to the meta run's MLflow experiment and store.
    """
    meta_path = outputs.check_meta_run(meta_dir)  # before any directory is created for its outputs
    out = fsio.as_path(out_dir) if out_dir is not None else outputs.analysis_dir(meta_path)
    with lock.hold(meta_path, "analyze", shared=True, what="meta run directory"), \
            lock.hold(out, "analyze", what="analysis directory"):
        run = load_meta_run(meta_path)
        store.check_intact(run.population_root, run.rows)  # damaged model files: refused before any work
        if log:  # a store that does not answer, or one copied from another run dir: refused before any work
            _tracking_store(run, meta_path).check_reachable()
        # Written whole: in a staging directory (on a bucket: a local one, put file by file,
        # analysis.json last), published only when every section is done. A failed analysis
        # leaves the earlier one where it was and no partial files.
        with fsio.staged(out, last=("analysis.json",), whole=True) as local:
            result = _analyze(run, meta_path, cfg, local, log, progress)
            earlier = _keep_earlier(out)
        if earlier is not None and progress:
            print(f"the earlier analysis in {out} is kept in {earlier}", flush=True)
        for key in ("report", "analysis_json"):
            result[key] = str(out / Path(result[key]).relative_to(local))
        return result


def _keep_earlier(out: fsio.AnyPath) -> fsio.AnyPath | None:
    """Move an earlier analysis in ``out`` to ``out/earlier/<its time>/`` (never overwritten); its path."""
    doc = out / "analysis.json"
    if not doc.is_file():
        return None
    dest = out / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.localtime(doc.stat().st_mtime))
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    dest.mkdir(parents=True)
    for name in ("report.html", "analysis.json", "figures", "tables"):
        if (out / name).exists():
            fsio.move(out / name, dest / name)
    return dest


def _analyze(run: MetaRun, meta_path: fsio.AnyPath, cfg: AnalyzeConfig, out: Path, log: bool,
             progress: bool) -> dict:
    t0, started = time.perf_counter(), time.time()
    ctx = build_context(run, cfg, out)
    ctx.fig_dir.mkdir(parents=True, exist_ok=True)
    ctx.table_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    summary = run.summary()
    report = Report(
        title=f"DYNAMO analysis — {meta_path.name}",
        subtitle=(f"meta run {meta_path} · population {run.population_root} · {len(ctx.ids)} models · "
                  f"family {run.family} · d={run.cfg.embedding_dim} · λ={run.cfg.output_weight} · "
                  f"{run.cfg.steps} steps · hidden distance {run.cfg.hidden_distance}"),
    )
    headline: dict = {"num_models": len(ctx.ids), "embedding_dim": run.cfg.embedding_dim}
    status: dict[str, dict] = {}
    results = Results()

    overview.write(ctx, report.section(overview.KEY, overview.TITLE), summary)
    from tqdm.auto import tqdm

    bar = tqdm(SECTIONS, desc="analyze", unit="section", disable=not progress, dynamic_ncols=True)
    for section in bar:
        bar.set_postfix_str(section.TITLE)
        t = time.perf_counter()
        res = section.run(ctx, report.section(section.KEY, section.TITLE), results)
        results.add(section.KEY, res)
        headline.update(res.headline)
        status[section.KEY] = {"status": res.status, "note": res.note, "seconds": round(time.perf_counter() - t, 2)}
    claims = paper.write(ctx, report.section(paper.KEY, paper.TITLE), results)
    headline["analysis_seconds"] = round(time.perf_counter() - t0, 2)

    report_path = report.write(out / "report.html")
    doc = {"meta_dir": str(meta_path), "config": cfg.model_dump(mode="json"), "headline": headline,
           "sections": status, "paper_comparison": claims}
    store.write_json_atomic(doc, out / "analysis.json")  # strict JSON: NaN/inf -> null
    result = {**headline, "report": str(report_path), "analysis_json": str(out / "analysis.json")}
    if log:
        result["mlflow_run_id"] = _log_mlflow(run, meta_path, cfg, headline, out, summary, started)
    return result


def _tracking_store(run: MetaRun, meta_dir: fsio.AnyPath):
    """The store the analysis logs to: the meta run's (``outputs.tracking_store_of``), else its run dir's."""
    from .. import tracking

    return tracking.Store(**run.tracking_store) if run.tracking_store else tracking.Store.at(meta_dir.parent)


def _log_mlflow(run: MetaRun, meta_dir: Path, cfg: AnalyzeConfig, headline: dict, out: Path, summary: dict,
                started: float) -> str:
    """A run named "analyze" in the meta run's store and experiment, nested under the meta run when known,
    starting when the analyses did (``started``, ``time.time()``): its duration is theirs."""
    stage = _tracking_store(run, meta_dir).for_stage(f"analyses and report of the meta run {meta_dir}",
                                                     summary.get("mlflow_run_id"), started)
    with stage.run("analyze", tags={"dynamo.meta_dir": str(meta_dir)}) as mrun:
        mrun.log_params({**cfg.model_dump(mode="json"), "meta_dir": str(meta_dir)})
        metrics = {}
        for k, v in headline.items():
            if isinstance(v, bool):
                metrics[k] = float(v)
            elif isinstance(v, (int, float, np.integer, np.floating)) and not math.isnan(float(v)):
                metrics[k] = float(v)
        mrun.log_metrics(metrics)
        for name in ("report.html", "analysis.json", "figures", "tables"):  # not earlier/ analyses, nor the lock
            if (out / name).is_file():
                mrun.log_artifact(out / name, "analysis")
            elif (out / name).is_dir():
                mrun.log_artifact(out / name, f"analysis/{name}")
    return mrun.run_id
