"""population -> meta -> (sweep) -> analyze from one PipelineConfig.

Each stage reads only what the previous one wrote, and each is resumable: the population
stage skips completed models, so re-running a pipeline after a crash redoes only the
missing work. With no Ray address, Ray starts in-process. Every stage logs to one MLflow
store (``tracking_store``): the config's tracking server, else SQLite under ``run_dir``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import PipelineConfig
from .data import store
from .meta import outputs


def tracking_store(cfg: PipelineConfig):
    """The one MLflow store and experiment of every stage of this pipeline (a ``tracking.Store``)."""
    from . import tracking

    return tracking.Store.at(cfg.run_dir, cfg.tracking)


def meta_stage(cfg: PipelineConfig, address: str | None = None, progress: bool = True) -> dict:
    from .meta.ray_train import run_meta

    return run_meta(cfg.meta, cfg.population.root, address, progress, tracking_store=tracking_store(cfg))


def sweep_stage(cfg: PipelineConfig, address: str | None = None) -> list[dict]:
    from .config import SweepConfig
    from .meta.tune import run_sweep

    return run_sweep(cfg.meta, cfg.sweep or SweepConfig(), cfg.run_dir, cfg.population.root, address,
                     tracking_store=tracking_store(cfg))


def run_pipeline(cfg: PipelineConfig, address: str | None = None, progress: bool = True) -> dict:
    """Run every stage; returns a summary with the paths of the results."""
    t0 = time.perf_counter()
    timings = {}
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    rows = population_stage(cfg, address=address, progress=progress)
    timings["population_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    meta_summary = meta_stage(cfg, address=address, progress=progress)
    timings["meta_seconds"] = time.perf_counter() - t

    sweep_trials = None
    if cfg.sweep is not None:
        t = time.perf_counter()
        sweep_trials = sweep_stage(cfg, address=address)
        timings["sweep_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    from .analysis import run_analysis

    analysis = run_analysis(cfg.meta.output_dir, cfg.analyze, progress=progress)
    timings["analyze_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - t0

    summary = {
        "run_dir": str(run_dir.resolve()),
        "num_models": len(rows),
        "manifest": str(store.Layout.at(store.absolute(cfg.population.root)).manifest),
        "embeddings": str(Path(store.absolute(cfg.meta.output_dir)) / outputs.EMBEDDINGS_FILE),
        "report": analysis.get("report") if isinstance(analysis, dict) else None,
        "meta": {k: v for k, v in meta_summary.items() if isinstance(v, (int, float, str))},
        "sweep_trials": len(sweep_trials) if sweep_trials is not None else None,
        "tracking_uri": tracking_store(cfg).uri,
        **timings,
    }
    store.write_json_atomic(summary, run_dir / "pipeline_summary.json")
    _print_summary(cfg, summary)
    return summary


def population_stage(cfg: PipelineConfig, address: str | None = None, progress: bool = True) -> list[dict]:
    """The population stage on Ray, then its MLflow run (``log_population``) in the pipeline's store.

    A tracking server that does not answer fails here, before any model is trained.
    """
    from .population.actors import run_population
    from .population.train import check_spec

    check_spec(cfg.population)  # bad input fails before a tracking run records a failed stage
    tracking_store(cfg).check_reachable()
    t = time.perf_counter()
    try:
        rows = run_population(cfg.population, address=address, progress=progress)
    except ValueError as err:  # e.g. more failed models than allowed: what was done is in the manifest
        if store.Layout.at(cfg.population.root).manifest.is_file():
            try:
                log_population(cfg, store.manifest_rows(cfg.population.root), time.perf_counter() - t, error=str(err))
            except Exception as log_err:  # noqa: BLE001 -- never hide the stage's own error behind a logging one
                print(f"warning: could not log the failed population stage to MLflow: {log_err}")
        raise
    log_population(cfg, rows, time.perf_counter() - t)
    return rows


def log_population(cfg: PipelineConfig, rows: list[dict], seconds: float, error: str | None = None) -> str:
    """A run named "population" in the pipeline's MLflow experiment: the spec, per-group
    accuracy, the manifest as CSV and a per-group accuracy plot. Returns the run id.

    ``error``: the stage failed with this message; the run ends FAILED with it as tag
    ``dynamo.error`` (``rows`` are then the models completed before the failure)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.csv

    from . import plots
    from .population.train import group_summary

    pop = cfg.population
    all_rows = store.manifest_rows(pop.root, status=None)
    tags = {"dynamo.population_root": store.absolute(pop.root), **({"dynamo.error": error[:5000]} if error else {})}
    with tracking_store(cfg).run("population", tags=tags) as run:
        if error:
            run.end_status = "FAILED"
        run.log_params({"num_models": len(rows), "dtype": pop.dtype, "num_probe": pop.num_probe,
                        "num_test": pop.num_test, "num_examples": pop.num_examples, "data_seed": pop.data_seed,
                        **{f"group.{g.name}": g.model_dump_json(exclude={"name"}) for g in pop.groups}})
        metrics = {"population_seconds": seconds,
                   "failed_models": sum(r["status"] == "failed" for r in all_rows)}
        for g in group_summary(rows):
            metrics.update({f"{g['group']}.count": g["count"], f"{g['group']}.test_accuracy_mean": g["mean_accuracy"],
                            f"{g['group']}.test_accuracy_std": g["std_accuracy"]})
        run.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            keep = [c for c in store.MANIFEST_COLUMNS if c not in ("input_shape",)]
            table = pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in all_rows])
            pyarrow.csv.write_csv(table, Path(tmp) / "manifest.csv")
            if rows:
                plots.population_accuracy_plot(rows, Path(tmp) / "population_accuracy.png")
            run.log_artifact(tmp, "population")
    return run.run_id


def _print_summary(cfg: PipelineConfig, s: dict) -> None:
    m = s["meta"]
    print("\n== dynamo_dist pipeline finished in {:.0f} s ==".format(s["total_seconds"]))
    print(f"  models trained and recorded : {s['num_models']}  ({s['manifest']})")
    if "mean_agreement" in m:
        print(f"  meta-model emulation (test) : agreement {m['mean_agreement']:.3f}, hidden R^2 "
              f"{m.get('mean_hidden_r2', float('nan')):.3f}, meta accuracy {m.get('mean_meta_accuracy', float('nan')):.3f}")
    print(f"  model embeddings            : {s['embeddings']}")
    if s.get("report"):
        print(f"  analysis report             : {s['report']}")
    print(f"  MLflow store                : {s['tracking_uri']}")
    if s["tracking_uri"].startswith("sqlite:"):
        from .tracking import ui_url

        print(f"  MLflow UI                   : dynamo-dist ui {cfg.run_dir}   (then open {ui_url()})")
