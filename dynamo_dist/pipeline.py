"""population -> meta -> (sweep) -> analyze from one PipelineConfig.

Each stage reads only what the previous one wrote, and each is resumable: the population
stage skips completed models, so re-running a pipeline after a crash redoes only the
missing work. With no Ray address, Ray starts in-process. Every stage logs to one MLflow
store (``tracking_store``): the config's tracking server, else SQLite under ``run_dir``.
A pipeline is one MLflow run, ``pipeline``, with each stage's run nested under it (the sweep's
trials under the sweep's run); a stage run alone (``dynamo-dist meta``) is a top-level run.
Each stage's run starts when the stage does (``tracking.Store.for_stage``).
``seeds_stage`` trains the meta stage once per meta seed, for ``analysis.seeds`` to compare.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from .config import PipelineConfig
from .data import fsio, store
from .meta import outputs

SEEDS_DIR = "meta-seeds"  # <run_dir>/meta-seeds/seed-<s>: one meta run per seed (seeds_stage)


def tracking_store(cfg: PipelineConfig):
    """The one MLflow store and experiment of every stage of this pipeline (a ``tracking.Store``)."""
    from . import tracking

    return tracking.Store.at(cfg.run_dir, cfg.tracking)


def connect(address: str | None, mlflow_store) -> None:
    """Join the named Ray cluster and refuse, before any work, an MLflow store that its other nodes
    cannot reach (a SQLite file on one node's disk; ``tracking.check_cluster_store``). With no address
    Ray is this process's own, one node: nothing to check, and nothing started before the stage's own checks."""
    import os

    from . import tracking
    from .ray_utils import init_ray, num_nodes

    if not (address or os.environ.get("RAY_ADDRESS")):
        return
    init_ray(address)
    tracking.check_cluster_store(mlflow_store.uri, num_nodes())


def note(stage: str, cfg: PipelineConfig) -> str:
    """The MLflow note of a stage's run: what it does, on what."""
    pop, m = cfg.population, cfg.meta
    root = store.absolute(pop.root)
    if stage == "population":
        return f"population stage: train and record the groups {', '.join(g.name for g in pop.groups)} into {root}"
    if stage == "meta":
        return (f"meta stage: DYNAMO meta-model (d={m.embedding_dim}, lambda={m.output_weight}, {m.hidden_distance} "
                f"hidden distance, {m.num_workers} Ray Train workers) on population {root}")
    if stage == "sweep":
        sw = cfg.sweep
        grid = "default grid" if sw is None else (f"lambda {list(sw.output_weight)} x d {list(sw.embedding_dim)} "
                                                  f"x {list(sw.hidden_distance)}")
        return f"sweep stage: Ray Tune over {grid} on population {root}"
    if stage == "analyze":
        return f"analyze stage: analyses and report of the meta run {store.absolute(m.output_dir)}"
    stages = "population -> meta -> " + ("sweep -> " if cfg.sweep is not None else "") + "analyze"
    return f"pipeline {stages} in {store.absolute(cfg.run_dir)} (population {root})"


def meta_stage(cfg: PipelineConfig, address: str | None = None, progress: bool = True, *,
               parent_run_id: str | None = None, register_model: str | None = None) -> dict:
    """The meta stage on Ray Train; its run is nested under ``parent_run_id`` when given.
    ``register_model``: register the run's MLflow Model under this name (summary key
    ``registered_model``: ``models:/<name>/<version>``)."""
    from . import tracking
    from .meta.ray_train import run_meta

    started = time.time()
    if register_model is not None:
        tracking.check_model_name(register_model)  # before any work
    mlflow_store = tracking_store(cfg).for_stage(note("meta", cfg), parent_run_id, started)
    connect(address, mlflow_store)
    return run_meta(cfg.meta, cfg.population.root, address, progress, tracking_store=mlflow_store,
                    register_model=register_model)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); ValueError naming --seeds for anything else, or fewer than 2 distinct seeds."""
    try:
        seeds = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    return check_seeds(seeds, "--seeds")


def check_seeds(seeds: Sequence[int] | None, field: str = "meta.seeds") -> tuple[int, ...]:
    if seeds is None:
        raise ValueError("no seeds: give --seeds 0,1,2 (or meta.seeds in the config), or --meta-dirs of finished runs")
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) < 2 or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ValueError(f"{field}={list(seeds)}: need at least 2 distinct non-negative seeds to compare")
    return seeds


def seed_run_dir(cfg: PipelineConfig, seed: int) -> str:
    """Where seed ``seed``'s meta run of the pipeline ``cfg`` goes: ``<run_dir>/meta-seeds/seed-<s>``."""
    return str(fsio.as_path(cfg.run_dir) / SEEDS_DIR / f"seed-{seed}")


def seed_config(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    """The pipeline ``cfg`` whose meta stage trains seed ``seed`` into :func:`seed_run_dir`."""
    return cfg.replace(meta=cfg.meta.replace(seed=seed, output_dir=seed_run_dir(cfg, seed)))


def seeds_stage(cfg: PipelineConfig, seeds: Sequence[int], address: str | None = None,
                progress: bool = True) -> list[str]:
    """One meta run per seed (``meta_stage`` of :func:`seed_config`); returns their directories.

    Checked for every seed before any training: the seeds, the population (``validate_population``),
    a finished run's config, population and models (it is reused, not retrained), an unfinished
    run's checkpoint (it is resumed). ValueError/FileNotFoundError name the field or directory.
    """
    from .meta.ray_train import check_resumable, resolve_schedule, validate_population

    seeds = check_seeds(seeds)
    root = store.absolute(cfg.population.root)
    manifest_ids = [r["model_id"] for r in validate_population(cfg.meta, root)]
    ids = sorted(manifest_ids)
    todo = []
    for s in seeds:
        c = seed_config(cfg, s)
        meta = resolve_schedule(c.meta, len(ids))
        if outputs.has_finished(meta.output_dir):
            _check_finished_seed(meta, root, ids)
        else:
            check_resumable(meta, manifest_ids)
            todo.append(c)
    for c in todo:
        meta_stage(c, address=address, progress=progress)
    return [seed_run_dir(cfg, s) for s in seeds]


def _check_finished_seed(meta, root: str, ids: list[str]) -> None:
    """A finished seed run may be reused: the same meta config but for ``analysis.seeds.RUNTIME_FIELDS``,
    the same population and models; ValueError saying what differs otherwise."""
    from .analysis.seeds import config_differences

    out = fsio.as_path(meta.output_dir)
    # as written (the output temperature resolved) against what this config resolves to
    diff = config_differences(outputs.run_config(out), meta.replace(output_temperature=meta.temperature))
    if diff:
        raise ValueError(f"{out} holds a finished meta run with other settings ("
                         + ", ".join(f"meta.{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "): remove it to retrain that seed, or give another run_dir")
    context = json.loads((out / outputs.CONTEXT_FILE).read_text())
    there = outputs.population_root_of(out, context)
    if store.absolute(there) != root:
        raise ValueError(f"{out} holds a finished meta run of the population {there}, not {root} (population.root): "
                         "remove it to retrain that seed, or give another run_dir")
    trained_ids = sorted(outputs.read_embeddings(out).column("model_id").to_pylist())
    if trained_ids != ids:
        extra, missing = sorted(set(trained_ids) - set(ids)), sorted(set(ids) - set(trained_ids))
        raise ValueError(f"{out} holds a finished meta run of other models than {root} has now (missing there: "
                         f"{missing[:5]}, no longer in the population: {extra[:5]}): remove it to retrain that seed")


def sweep_stage(cfg: PipelineConfig, address: str | None = None, *, parent_run_id: str | None = None) -> list[dict]:
    from .config import SweepConfig
    from .meta.tune import run_sweep

    mlflow_store = tracking_store(cfg).for_stage(note("sweep", cfg), parent_run_id)
    connect(address, mlflow_store)
    return run_sweep(cfg.meta, cfg.sweep or SweepConfig(), cfg.run_dir, cfg.population.root, address,
                     tracking_store=mlflow_store)


def run_pipeline(cfg: PipelineConfig, address: str | None = None, progress: bool = True,
                 register_model: str | None = None) -> dict:
    """Run every stage under one MLflow run ``pipeline`` (FAILED with the error when a stage
    fails); returns a summary with the paths of the results (also ``pipeline_summary.json``,
    logged to that run). ``register_model``: register the meta run's MLflow Model under this name."""
    from . import tracking
    from .population.spec import check_spec

    check_spec(cfg.population)  # bad input fails before the pipeline's run is recorded
    if register_model is not None:
        tracking.check_model_name(register_model)
    run_dir = fsio.as_path(cfg.run_dir)
    fsio.check_writable(run_dir, "run_dir")
    mlflow_store = tracking_store(cfg)
    with mlflow_store.for_stage(note("pipeline", cfg)).run("pipeline", tags={"dynamo.stage": "pipeline"}) as parent:
        parent.log_params({"run_dir": store.absolute(run_dir), "population_root": store.absolute(cfg.population.root),
                           "meta_output_dir": store.absolute(cfg.meta.output_dir), "sweep": cfg.sweep is not None,
                           **({"register_model": register_model} if register_model else {})})
        parent.log_dict(cfg.model_dump(mode="json"), "pipeline_config.json")
        summary = _run_stages(cfg, address, progress, register_model, parent.run_id, mlflow_store)
        summary["mlflow_run_id"] = parent.run_id
        with fsio.staged(run_dir) as out:
            store.write_json_atomic(summary, out / "pipeline_summary.json")
            parent.log_metrics({k: v for k, v in summary.items() if k.endswith("_seconds") or k == "num_models"})
            parent.log_artifact(out / "pipeline_summary.json")
    _print_summary(cfg, summary)
    return summary


def _run_stages(cfg: PipelineConfig, address: str | None, progress: bool, register_model: str | None,
                parent_run_id: str, mlflow_store) -> dict:
    t0 = time.perf_counter()
    timings = {}

    t = time.perf_counter()
    rows = population_stage(cfg, address=address, progress=progress, parent_run_id=parent_run_id)
    timings["population_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    meta_summary = meta_stage(cfg, address=address, progress=progress, parent_run_id=parent_run_id,
                              register_model=register_model)
    timings["meta_seconds"] = time.perf_counter() - t

    sweep_trials = None
    if cfg.sweep is not None:
        t = time.perf_counter()
        sweep_trials = sweep_stage(cfg, address=address, parent_run_id=parent_run_id)
        timings["sweep_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    from .analysis import run_analysis

    analysis = run_analysis(cfg.meta.output_dir, cfg.analyze, progress=progress)
    if isinstance(analysis, dict) and analysis.get("mlflow_run_id"):
        # the analysis logs its own run under the meta run; in a pipeline it is a stage like the others
        mlflow_store.adopt(analysis["mlflow_run_id"], parent_run_id, note("analyze", cfg),
                           tags={"dynamo.meta_run_id": meta_summary.get("mlflow_run_id", "")})
    timings["analyze_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - t0

    return {
        "run_dir": store.absolute(cfg.run_dir),
        "num_models": len(rows),
        "manifest": str(store.Layout.at(store.absolute(cfg.population.root)).manifest),
        "embeddings": str(fsio.as_path(store.absolute(cfg.meta.output_dir)) / outputs.EMBEDDINGS_FILE),
        "report": analysis.get("report") if isinstance(analysis, dict) else None,
        "meta": {k: v for k, v in meta_summary.items() if isinstance(v, (int, float, str))},
        "sweep_trials": len(sweep_trials) if sweep_trials is not None else None,
        "tracking_uri": mlflow_store.uri,
        **timings,
    }


def population_stage(cfg: PipelineConfig, address: str | None = None, progress: bool = True, *,
                     parent_run_id: str | None = None) -> list[dict]:
    """The population stage on Ray, then its MLflow run (``log_population``) in the pipeline's store,
    nested under ``parent_run_id`` when given.

    A tracking server that does not answer fails here, before any model is trained.
    """
    from .population.actors import run_population
    from .population.spec import check_spec

    started = time.time()
    check_spec(cfg.population)  # bad input fails before run_dir (the store's home) or a failed run is made
    mlflow_store = tracking_store(cfg).for_stage(note("population", cfg), parent_run_id, started)
    mlflow_store.check_reachable()
    connect(address, mlflow_store)
    t = time.perf_counter()
    try:
        rows = run_population(cfg.population, address=address, progress=progress)
    except ValueError as err:  # e.g. more failed models than allowed: what was done is in the manifest
        if store.Layout.at(cfg.population.root).manifest.is_file():
            try:
                log_population(cfg, store.manifest_rows(cfg.population.root), time.perf_counter() - t,
                               mlflow_store, error=str(err))
            except Exception as log_err:  # noqa: BLE001 -- never hide the stage's own error behind a logging one
                print(f"warning: could not log the failed population stage to MLflow: {log_err}")
        raise
    log_population(cfg, rows, time.perf_counter() - t, mlflow_store)
    return rows


def log_population(cfg: PipelineConfig, rows: list[dict], seconds: float, mlflow_store,
                   error: str | None = None) -> str:
    """A run named "population" in the pipeline's MLflow experiment: the spec, per-group
    accuracy, the manifest as CSV and a per-group accuracy plot. Returns the run id.

    ``error``: the stage failed with this message; the run ends FAILED with it as tag
    ``dynamo.error`` (``rows`` are then the models completed before the failure).
    ``mlflow_store``: the stage's ``tracking.Store`` (``for_stage``: the run starts when the stage did)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.csv

    from . import plots
    from .population.train import group_summary

    pop = cfg.population
    all_rows = store.manifest_rows(pop.root, status=None)
    tags = {"dynamo.population_root": store.absolute(pop.root), **({"dynamo.error": error[:5000]} if error else {})}
    with mlflow_store.run("population", tags=tags) as run:
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
    if m.get("registered_model"):
        print(f"  registered MLflow model     : {m['registered_model']}")
    if s.get("report"):
        print(f"  analysis report             : {s['report']}")
    print(f"  MLflow store                : {s['tracking_uri']}")
    if s["tracking_uri"].startswith("sqlite:"):
        from .tracking import ui_url

        print(f"  MLflow UI                   : dynamo-dist ui {cfg.run_dir}   (then open {ui_url()})")
