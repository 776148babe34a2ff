"""The meta stage in one process (no Ray): the notebook path, and a single-worker Tune trial.

``run_meta_local`` trains over the whole population with ``trainer.fit_with_reports``,
writes the meta-run outputs (``outputs.py``) and, with a ``tracking.Store``, logs one
MLflow run. ``on_report`` (a Tune trial's ``tune.report``) gets every validation report.
"""

from __future__ import annotations

import time

from ..config import MetaConfig
from ..data import fsio, lock, store
from .metrics import evaluate
from .outputs import artifacts, write_outputs, write_summary
from .trainer import DynamoTrainer, fit_with_reports, load_population, resolve_device, validation_means


def run_meta_local(cfg: MetaConfig, population_root: str, *, progress: bool = True, tracking_store=None,
                   on_report=None, write_every_report: bool = False) -> dict:
    """Train the meta-model over the whole population in this process and write the outputs.

    ``tracking_store``: a ``tracking.Store`` to log the run to (None: no MLflow). ``on_report(metrics)``
    is called at every report with ``step``, ``loss`` (mean since the previous report) and
    ``val_*``; with ``write_every_report`` the outputs are rewritten before each report, so a
    run stopped early (ASHA) leaves those of its last report. Returns the summary.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg)  # a GPU asked for and missing: fail before reading or writing anything
    root = store.absolute(population_root)
    with lock.hold(root, "meta", shared=True, what="population root"):
        data = load_population(root, cache_bytes=cfg.cache_bytes, spill_bytes=cfg.spill_bytes)
        with lock.hold(cfg.output_dir, "meta", what="meta output directory"):
            return _train_and_write(cfg.for_population(len(data.rows)), root, data, device, t0, progress,
                                    tracking_store, on_report, write_every_report)


def _train_and_write(cfg: MetaConfig, root: str, data, device, t0: float, progress: bool, tracking_store, on_report,
                     write_every_report: bool) -> dict:
    trainer = DynamoTrainer(cfg, data, device=device)
    store_dict = None if tracking_store is None else tracking_store.as_dict()

    summary: dict = {}
    per_model: dict[str, dict] = {}

    def save() -> None:
        nonlocal summary, per_model
        per_model = evaluate(trainer, "test")
        # the live tables, written before training goes on (tables on disk: file to file, never copied)
        state = {**trainer.shared_state(), "shard": trainer.shard_state(copy=False)}
        summary = write_outputs(cfg, root, state, trainer.embedding_rows(), per_model,
                                trainer.history, data.rows,
                                {"wall_seconds": time.perf_counter() - t0, "num_workers": 1, "steps": trainer.step},
                                tracking_store=store_dict, files=trainer.embeddings.table_files())

    def report(records: list[dict], final: bool) -> None:
        val = validation_means(trainer)
        if records:
            records[-1].update(val)  # history.parquet keeps the val_* rows
        if write_every_report or final:
            save()
        if on_report is not None:
            loss = sum(r["loss"] for r in records) / len(records) if records else float("nan")
            on_report({"step": trainer.step, "loss": loss, **val})

    fit_with_reports(trainer, report, progress=progress)
    if tracking_store is not None:
        from .. import tracking
        from . import pyfunc

        # MLflow logs local files: a bucket output_dir is read back into a temporary copy
        with fsio.local_copy(fsio.as_path(cfg.output_dir)) as local, tracking_store.run("meta") as run:
            run.log_params(tracking.meta_params(cfg, root, len(data.rows)))
            tracking.log_meta_results(run, summary, per_model, trainer.history, artifacts(local))
            summary["mlflow_model_uri"] = pyfunc.log(run, local, data.rows)
        summary["mlflow_run_id"] = run.run_id
        write_summary(cfg.output_dir, summary)
    return summary

