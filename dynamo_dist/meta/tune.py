"""Ray Tune sweeps over lambda (output-loss weight), d (embedding dimension) and the hidden distance.

``run_sweep`` validates everything first (search space, metric, tracking server, population
root, trial resources vs. the cluster) and only then starts a ``Tuner`` over a grid of
``output_weight`` x ``embedding_dim`` x ``hidden_distance`` (``num_samples`` repeats).

Each trial is one meta run and writes the standard meta-run outputs (``outputs`` module
docstring) into its own directory::

    <run_dir>/sweep/<sweep name>/trial-00003-lam1-d8-l2/   checkpoint/, embeddings.parquet, ...
    <run_dir>/sweep/<sweep name>/trials.json, trials.md     the trials table, best first
    <run_dir>/tune/<sweep name>/                            Tune's experiment state

Trials:

* ``workers_per_trial == 1``: the trial is the single-process meta stage
  (``local.run_meta_local``, 1 CPU, and 1 GPU when ``meta.device`` is cuda) calling
  ``tune.report`` at every report, so ASHA can stop it.
* ``workers_per_trial > 1``: the trial is a thin driver (Ray Train V2 / Tune interop)
  that builds ``ray_train.build_trainer(..., callbacks=[TuneReportCallback()])`` and fits
  it; the Train workers' reports reach Tune through the callback.

Every report carries ``step``, ``loss`` (mean training loss since the previous report),
``val_agreement`` (classifiers), ``val_output_r2`` (regression models) and ``val_hidden_r2``:
emulation metrics on held-out probe sequences (the tail of the probe split, never trained on),
comparable across lambda, unlike the loss. ASHA (``sweep.scheduler: asha``) ranks trials on
``sweep.metric`` with ``step`` as time; unset, it follows the population (``ranking_metric``).
With ASHA a single-worker trial rewrites its outputs before each report, so a trial
stopped early still leaves the outputs of its last report; a Ray Train trial stopped
early gets its outputs from its latest checkpoint (``ray_train.finalize`` in the driver,
test metrics recomputed there). ASHA + Ray Train trials need Ray's State API inside the
cluster (``_check_state_api``): without it Ray Train cannot release the workers of a
stopped trial and the sweep stalls, so ``run_sweep`` refuses that combination up front.

MLflow — one writer, no lost data
---------------------------------
All MLflow writes of a sweep come from the Tune driver process, through a Tune
``Callback`` (``_MlflowTrials``) that the Tune event loop calls one event at a time; the
trials themselves never talk to MLflow. So concurrent trials never write concurrently,
and the embedded SQLite store (which serialises writers and times out under contention)
is as safe as a tracking server (``tracking.tracking_uri: http://...``, needed only to share
the store between machines or users). Per run:

* the sweep's parent run (``sweep-<time>``): sweep + base meta params, and at the end the
  trials table (``trials.json``/``trials.md``), ``best_*`` metrics and tags;
* one child run per trial (tag ``mlflow.parentRunId``), created when the trial starts,
  with the meta config as params (``lambda``, ``embedding_dim``, ``hidden_distance``,
  ``population_root``, ``population_size``, ...). Each Tune report is logged as it
  arrives (``val_agreement`` or ``val_output_r2``, ``val_hidden_r2`` at ``step``: one entry per report); when
  the trial ends, the per-step training history (``loss``, ``loss_hidden``,
  ``loss_output``) is logged with one ``log_batch`` per 1000 metrics, then the test
  metrics (``test_*``), ``silhouette_group`` and the artifacts (embeddings.parquet,
  embedding_pca.png, model_metrics.parquet, history.parquet, summary.json, meta_config.yaml;
  the checkpoint stays in the trial's directory) via ``tracking.log_meta_results``.

The driver reads each trial's outputs from its directory, so on a multi-node cluster
``run_dir`` must be on storage every node sees — as the population root already must be.

Clustering: ``silhouette_group`` is the silhouette score of theta against the manifest's
``group`` labels (Euclidean, all d dimensions): near 1 when groups form tight, separate
clusters, near 0 when they overlap.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import MetaConfig, SweepConfig
from ..data import fsio, lock, store
from . import outputs

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes of Ray logical memory a multi-worker trial's driver reserves
METRIC_MODES = {"val_agreement": "max", "val_output_r2": "max", "val_hidden_r2": "max", "loss": "min"}
# the metric only one output kind reports: classifiers agreement, regression models output R^2 (meta.metrics)
METRIC_OUTPUT_KIND = {"val_agreement": "classification", "val_output_r2": "regression"}
SEARCH_KEYS = ("output_weight", "embedding_dim", "hidden_distance")
SWEEP_FILE = "sweep.json"   # <sweep_dir>/sweep.json: the configs and MLflow parent run of a sweep (resume)
FINISHED_DIR = "finished"   # <sweep_dir>/finished/<trial id>.json: the table row of each finished trial
TABLE_COLUMNS = ("rank", "trial", "output_weight", "embedding_dim", "hidden_distance", "status", "steps",
                 "num_reports", "val_agreement", "val_output_r2", "val_hidden_r2", "test_agreement",
                 "test_output_r2", "test_hidden_r2", "test_meta_accuracy", "silhouette_group", "wall_seconds")
BEST_KEYS = ("output_weight", "embedding_dim", "val_agreement", "val_output_r2", "val_hidden_r2", "test_agreement",
             "test_output_r2", "test_hidden_r2", "test_meta_accuracy", "silhouette_group")
VAL_KEYS = ("val_agreement", "val_output_r2", "val_hidden_r2")  # what a report carries that a trial logs


# ---------------------------------------------------------------- plain helpers (no Ray)


def trial_dirname(trial_id: str, params: dict) -> str:
    """``trial-<index>-lam<λ>-d<d>-<dist>``; the index is Tune's trial counter (unique per sweep)."""
    index = trial_id.rsplit("_", 1)[-1]
    return f"trial-{index}-lam{params['output_weight']:g}-d{params['embedding_dim']}-{params['hidden_distance']}"


def trial_config(base: MetaConfig, params: dict, sweep_dir: str | Path, trial_id: str,
                 workers_per_trial: int) -> MetaConfig:
    """The MetaConfig of one trial: ``base`` with the trial's λ, d, distance and output dir."""
    return base.replace(output_weight=float(params["output_weight"]), embedding_dim=int(params["embedding_dim"]),
                        hidden_distance=params["hidden_distance"], num_workers=workers_per_trial,
                        output_dir=str(fsio.as_path(sweep_dir) / trial_dirname(trial_id, params)))


def silhouette_by(emb, label: str = "group") -> float | None:
    """Silhouette score of theta (embeddings.parquet table) against manifest column ``label``.

    None when it is undefined (fewer than 2 labels, or every model its own label).
    """
    import numpy as np
    from sklearn.metrics import silhouette_score

    if label not in emb.column_names:
        return None
    theta_NE = np.asarray(emb.column("theta").to_pylist(), dtype=np.float64)
    labels = [str(v) for v in emb.column(label).to_pylist()]
    if not 2 <= len(set(labels)) <= len(labels) - 1:
        return None
    return float(silhouette_score(theta_NE, labels, metric="euclidean"))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def rank_trials(rows: list[dict], metric: str) -> list[dict]:
    """Rows best first by ``metric`` (its mode from METRIC_MODES); trials without it last."""
    sign = -1.0 if METRIC_MODES[metric] == "max" else 1.0

    def key(r):
        v = r.get(metric)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, 0.0 if missing else sign * v, r["trial"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


# ---------------------------------------------------------------- validation


def num_trials(sweep_cfg: SweepConfig) -> int:
    """Trials a sweep runs: the grid's size times num_samples, or num_samples draws."""
    if sweep_cfg.search == "grid":
        return sweep_cfg.num_samples * math.prod(len(getattr(sweep_cfg, k)) for k in SEARCH_KEYS)
    return sweep_cfg.num_samples


def search_space(sweep_cfg: SweepConfig) -> dict:
    """Tune's param_space: grid_search over the lists, or choices of them (λ log-uniform with
    ``output_weight_range``) for a search algorithm to draw from."""
    from ray import tune

    if sweep_cfg.search == "grid":
        return {k: tune.grid_search(list(getattr(sweep_cfg, k))) for k in SEARCH_KEYS}
    space = {k: tune.choice(list(getattr(sweep_cfg, k))) for k in SEARCH_KEYS}
    if sweep_cfg.output_weight_range is not None:
        space["output_weight"] = tune.loguniform(*sweep_cfg.output_weight_range)
    return space


def search_algorithm(sweep_cfg: SweepConfig, seed: int):
    """None for a grid; Tune's seeded random variant generator; or Optuna's TPE (seeded)."""
    if sweep_cfg.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if sweep_cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    return None


def ranking_metric(metric: str | None, rows: list[dict], population_root: str) -> str:
    """``sweep.metric``, or by the population's output kinds when None: ``val_agreement`` when it holds
    classifiers, else (regression models only) ``val_output_r2``. A metric that no model of the
    population reports (agreement of regression models, output R^2 of classifiers) is a ValueError."""
    from ..zoo import output_kind_of

    kinds = {output_kind_of(r) for r in rows}
    if metric is None:
        return "val_agreement" if "classification" in kinds else "val_output_r2"
    if METRIC_OUTPUT_KIND.get(metric, next(iter(kinds))) not in kinds:
        other = next(m for m, k in METRIC_OUTPUT_KIND.items() if k in kinds)
        raise ValueError(f"sweep.metric: {metric!r} is reported for {METRIC_OUTPUT_KIND[metric]} models only, and "
                         f"the models of population {population_root} are {' and '.join(sorted(kinds))}; use "
                         f"{other!r} (or leave sweep.metric unset: it follows the population)")
    return metric


def validate(meta_cfg: MetaConfig, sweep_cfg: SweepConfig, population_root: str,
             tracking_store) -> tuple[SweepConfig, list[dict]]:
    """Everything that can be checked before a trial starts; returns (sweep config, manifest rows).

    ValueError / FileNotFoundError name the offending field, URI or path.
    """
    from .trainer import check_population

    # Re-validate: a config built with model_construct() or mutated skips pydantic's checks.
    sweep_cfg = config_mod.parse(SweepConfig, sweep_cfg.model_dump(), source="sweep")
    if sweep_cfg.metric is not None and sweep_cfg.metric not in METRIC_MODES:
        raise ValueError(f"sweep.metric: {sweep_cfg.metric!r} is not reported by trials; "
                         f"choose one of {sorted(METRIC_MODES)}")
    for name in SEARCH_KEYS:  # the grid must produce valid MetaConfigs too
        for value in getattr(sweep_cfg, name):
            meta_cfg.replace(**{name: value})
    for value in sweep_cfg.output_weight_range or ():
        meta_cfg.replace(output_weight=value)
    if sweep_cfg.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ValueError("sweep.search 'optuna' needs the optuna package (pip install optuna), or use search 'random'")
    tracking_store.check_reachable()
    rows = store.manifest_rows(population_root)
    check_population(rows, population_root)
    sweep_cfg = sweep_cfg.model_copy(update={"metric": ranking_metric(sweep_cfg.metric, rows, population_root)})
    infos = store.trajectory_infos(population_root, rows)  # footers only: every trial would train on them
    store.check_same_recording(population_root, list(infos.values()), {r["model_id"]: r["task"] for r in rows})
    return sweep_cfg, rows


def _trial_resources(sweep_cfg: SweepConfig, cluster: dict, device: str = "cpu") -> tuple[dict, int]:
    """Per-trial resource request and the number of trials that fit at once.

    One worker: the trial itself trains, 1 CPU (and 1 GPU when ``device`` is cuda). More: the
    trial is a thin Train driver and its Train workers take 1 CPU (and 1 GPU) each, in their own
    placement group, so a trial needs ``w`` CPUs. The driver's own bundle holds no CPU (Ray Tune
    needs a non-empty bundle: it reserves ``TRIAL_DRIVER_MEMORY`` of Ray's logical memory), so
    a 2-worker trial fits a cluster of two 1-CPU nodes, one worker on each.
    ``device``: the trials' ``meta.device``, decided for the cluster (``ray_train.for_cluster``).
    """
    cpus = float(cluster.get("CPU", 0.0))
    w = sweep_cfg.workers_per_trial
    need = float(w)
    if need > cpus:
        what = "1 CPU" if w == 1 else f"{w} CPUs (1 per Ray Train worker)"
        raise ValueError(f"sweep.workers_per_trial={w}: a trial needs {what} but the Ray cluster has "
                         f"{cpus:g}; lower workers_per_trial or connect to a larger cluster (--address)")
    resources = {"cpu": 1.0} if w == 1 else {"cpu": 0.0, "memory": TRIAL_DRIVER_MEMORY}
    fit = max(1, int(cpus // need))
    if device == "cuda":
        if w == 1:
            resources["gpu"] = 1.0
        fit = min(fit, max(1, int(float(cluster.get("GPU", 0.0)) // w)))
    return resources, min(sweep_cfg.max_concurrent_trials, fit)


def _state_api_error() -> str | None:
    """Runs inside the cluster, like Ray Train's PlacementGroupCleaner: None when the State API answers."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - any failure means the cleaner would fail the same way
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def _check_state_api() -> None:
    """ASHA stops Ray Train trials by killing their driver; Ray Train V2 then releases the workers'
    placement group through its PlacementGroupCleaner actor, which needs Ray's State API (the
    dashboard, reachable from inside the cluster). Without it the CPUs of every stopped trial
    leak and later trials wait forever (ray-project/ray#54305), so refuse up front."""
    import ray

    error = ray.get(ray.remote(num_cpus=0)(_state_api_error).remote())
    if error and "multiple active Ray instances" in error:
        error += ("; more than one Ray runs on a node of this cluster: start its nodes with RAY_ADDRESS set to the "
                  "cluster's address so that its processes ask the right one")
    if error:
        raise ValueError("sweep.scheduler=asha with sweep.workers_per_trial > 1 needs Ray's State API inside the "
                         "cluster (a cluster with the dashboard, e.g. `ray start --head` + --address) so that "
                         "trials stopped early release their Train workers; use workers_per_trial=1 or "
                         f"scheduler=fifo on this Ray ({error})")


# ---------------------------------------------------------------- trainables (run inside Ray)


def _report_local(cfg: MetaConfig, population_root: str, write_every_report: bool) -> None:
    """One trial, one process: the single-process meta stage, each report going to ``tune.report``."""
    import torch
    from ray import tune

    from .local import run_meta_local

    torch.set_num_threads(1)  # the trial holds 1 CPU
    run_meta_local(cfg, population_root, progress=False, on_report=tune.report, write_every_report=write_every_report)


def _report_ray_train(cfg: MetaConfig, population_root: str, experiment_dir: str) -> None:
    """One trial, a Ray Train run: this process only drives the TorchTrainer (Train V2 / Tune interop).

    Rank 0's reports reach Tune through ``TuneReportCallback``; the workers do not log to
    MLflow (the sweep's driver does), and ``finalize`` writes the outputs without logging.
    """
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from . import ray_train

    trial_id = tune.get_context().get_trial_id()
    run_config = ray.train.RunConfig(name=f"train-{trial_id}", **fsio.ray_storage_kwargs(experiment_dir),
                                     failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                     logging_config=ray_train.TRAIN_LOGGING)
    trainer = ray_train.build_trainer(cfg, population_root, run_config=run_config,
                                      callbacks=[TuneReportCallback()], progress=False)
    ray_train.finalize(cfg, population_root, trainer.fit())


def _trainable(params: dict, *, base: dict, population_root: str, sweep_dir: str, experiment_dir: str,
               workers_per_trial: int, write_every_report: bool) -> None:
    from ray import tune

    cfg = trial_config(MetaConfig.model_validate(base), params, sweep_dir, tune.get_context().get_trial_id(),
                       workers_per_trial)
    if workers_per_trial == 1:
        _report_local(cfg, population_root, write_every_report)
    else:
        _report_ray_train(cfg, population_root, experiment_dir)


# ---------------------------------------------------------------- MLflow from the driver


class _MlflowTrials:
    """Tune callback (built by ``_make_callback``): all MLflow writes of a sweep, in the driver.

    Also builds the trials table. See the module docstring for why the driver logs.
    """

    def __init__(self, base: MetaConfig, sweep_cfg: SweepConfig, population_root: str, tracking_store,
                 sweep_dir: str, parent_run_id: str, population_size: int):
        self.base, self.sweep_cfg, self.population_root = base, sweep_cfg, population_root
        self.tracking_store, self.sweep_dir = tracking_store, sweep_dir
        self.parent_run_id, self.population_size = parent_run_id, population_size
        self.rows: dict[str, dict] = {}
        self._runs: dict[str, Any] = {}
        self._t0: dict[str, float] = {}
        self._checkpoints: dict[str, str] = {}  # trial -> latest Ray Train checkpoint (workers_per_trial > 1)

    def __getstate__(self):  # Tune pickles its run config; MLflow clients stay in the driver
        state = dict(self.__dict__)
        state["_runs"] = {}
        return state

    def _cfg(self, trial) -> MetaConfig:
        return trial_config(self.base, trial.config, self.sweep_dir, trial.trial_id, self.sweep_cfg.workers_per_trial)

    def on_trial_start(self, trial) -> None:
        from .. import tracking

        if trial.trial_id in self._runs:  # restarted after a failure: keep logging into the same run
            return
        cfg = self._cfg(trial)
        run = self.tracking_store.start_run(fsio.as_path(cfg.output_dir).name, self.parent_run_id,
                                            tags={"dynamo.stage": "sweep-trial", "dynamo.trial_id": trial.trial_id},
                                            description=f"sweep trial: lambda={cfg.output_weight}, "
                                            f"d={cfg.embedding_dim}, {cfg.hidden_distance} hidden distance, "
                                            f"{cfg.steps} steps on population {self.population_root}")
        run.log_params(tracking.meta_params(cfg, self.population_root, self.population_size))
        self._runs[trial.trial_id] = run
        self._t0[trial.trial_id] = time.time()
        self.rows[trial.trial_id] = {
            "trial": fsio.as_path(cfg.output_dir).name, "trial_id": trial.trial_id, "output_weight": cfg.output_weight,
            "embedding_dim": cfg.embedding_dim, "hidden_distance": cfg.hidden_distance, "status": "RUNNING",
            "steps": 0, "num_reports": 0, "output_dir": cfg.output_dir, "mlflow_run_id": run.run_id}

    def on_trial_result(self, trial, result: dict) -> None:
        row = self.rows[trial.trial_id]
        metrics = {k: result[k] for k in VAL_KEYS if result.get(k) is not None}
        step = int(result.get("step", result.get("training_iteration", 0)))
        self._runs[trial.trial_id].log_metrics(metrics, step=step)
        row.update(metrics, steps=step, loss=result.get("loss"))
        row["num_reports"] += 1
        if result.get("checkpoint_path"):  # added by TuneReportCallback when the workers saved one
            self._checkpoints[trial.trial_id] = result["checkpoint_path"]

    def on_trial_end(self, trial, failed: bool) -> None:
        from .. import tracking

        row, run = self.rows[trial.trial_id], self._runs.pop(trial.trial_id)
        cfg = self._cfg(trial)
        ckpt = self._checkpoints.pop(trial.trial_id, None)
        if not outputs.has_finished(cfg.output_dir) and ckpt and not failed:
            # a Ray Train trial stopped by ASHA before its own finalize: outputs of its last checkpoint
            from . import ray_train

            ray_train.finalize(cfg, self.population_root, ckpt)
        summary, per_model, history, emb = outputs.read_results(cfg.output_dir)
        if failed:
            row["status"] = "ERROR"
        else:
            row["status"] = "TERMINATED" if row["steps"] >= cfg.steps else "STOPPED_EARLY"
        row["wall_seconds"] = time.time() - self._t0.pop(trial.trial_id)
        if failed:
            run.end_status = "FAILED"  # ASHA stops show in the dynamo.trial_status tag
        with tracking.ending(run):
            if emb is not None:
                row["silhouette_group"] = silhouette_by(emb, "group")
                row.update(test_agreement=summary.get("mean_agreement"), test_hidden_r2=summary.get("mean_hidden_r2"),
                           test_meta_accuracy=summary.get("mean_meta_accuracy"))
                if summary.get("mean_output_r2") is not None:  # regression models in the population
                    row["test_output_r2"] = summary["mean_output_r2"]
                extra = {"silhouette_group": row["silhouette_group"], "num_reports": row["num_reports"]}
                # val_* were logged per report as they arrived; the history adds the per-step losses.
                train_history = [{k: v for k, v in h.items() if not k.startswith("val_")} for h in history]
                with fsio.local_copy(fsio.as_path(cfg.output_dir)) as local:  # MLflow logs local files
                    tracking.log_meta_results(run, {**summary, **{k: v for k, v in extra.items() if v is not None}},
                                              per_model, train_history, outputs.artifacts(local))
            run.set_tags({"dynamo.trial_status": row["status"]})
        # one file per finished trial: the table of a sweep resumed after its driver died includes it
        store.write_json_atomic(row, fsio.as_path(self.sweep_dir) / FINISHED_DIR / f"{trial.trial_id}.json")


def _make_callback(*args, **kwargs):
    """A ``ray.tune.Callback`` forwarding to ``_MlflowTrials`` (keeps Ray imports lazy)."""
    from ray import tune

    class MlflowTrialsCallback(tune.Callback):
        def __init__(self):
            self.impl = _MlflowTrials(*args, **kwargs)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.impl.on_trial_start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.impl.on_trial_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.trial_id in self.impl._runs:
                self.impl.on_trial_end(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.impl._runs:
                self.impl.on_trial_end(trial, failed=True)

    return MlflowTrialsCallback()


# ---------------------------------------------------------------- the sweep


def _sweep_name(root: fsio.AnyPath) -> str:
    name = time.strftime("sweep-%Y%m%d-%H%M%S")
    i = 1
    while (root / "sweep" / name).exists() or (root / "tune" / name).exists():
        i += 1
        name = time.strftime("sweep-%Y%m%d-%H%M%S") + f"-{i}"
    return name


def run_sweep(meta_cfg: MetaConfig, sweep_cfg: SweepConfig, run_dir: str, population_root: str,
              address: str | None = None, tracking_store=None) -> list[dict]:
    """Tune ``meta_cfg`` over the grid of ``sweep_cfg``; returns the trials table, best first.

    ``tracking_store``: the pipeline's ``tracking.Store`` (default: the SQLite store under
    ``run_dir``). Each row: trial, output_weight, embedding_dim, hidden_distance, status (TERMINATED,
    STOPPED_EARLY by ASHA, ERROR), steps, num_reports, the last val_agreement/val_hidden_r2,
    test_agreement/test_hidden_r2/test_meta_accuracy (test split), silhouette_group,
    wall_seconds, output_dir, mlflow_run_id, rank. Raises ValueError/FileNotFoundError
    before any trial starts on bad input, RuntimeError when every trial failed.
    """
    population_root = store.absolute(population_root)
    with lock.hold(population_root, "sweep", shared=True, what="population root"):
        return _sweep(meta_cfg, sweep_cfg, fsio.as_path(store.absolute(run_dir)), population_root, address,
                      tracking_store)


def _sweep(meta_cfg: MetaConfig, sweep_cfg: SweepConfig, root: Path, population_root: str, address: str | None,
           tracking_store) -> list[dict]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .. import tracking
    from ..ray_utils import init_ray, signal_handlers_kept

    tracking_store = tracking_store or tracking.Store.at(root)
    sweep_cfg, rows = validate(meta_cfg, sweep_cfg, population_root, tracking_store)
    meta_cfg = meta_cfg.for_population(len(rows))
    cluster = init_ray(address)
    if meta_cfg.device != "cpu":  # every trial trains where the cluster allows (cuda: a GPU per Train worker)
        from .ray_train import for_cluster

        trial_device = for_cluster(meta_cfg.replace(num_workers=sweep_cfg.workers_per_trial), cluster).device
        meta_cfg = meta_cfg.replace(device=trial_device)
    resources, concurrency = _trial_resources(sweep_cfg, cluster, meta_cfg.device)
    if sweep_cfg.scheduler == "asha" and sweep_cfg.workers_per_trial > 1:
        _check_state_api()

    record = {"meta": meta_cfg.model_dump(mode="json"), "sweep": sweep_cfg.model_dump(mode="json"),
              "population_root": population_root}
    resumed = _resumable(root, record)
    name = resumed["name"] if resumed else _sweep_name(root)
    sweep_dir, experiment_dir = root / "sweep" / name, root / "tune"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    mode = METRIC_MODES[sweep_cfg.metric]
    space = search_space(sweep_cfg)
    trials = num_trials(sweep_cfg)
    # Tune saves its experiment state (what a resume restores) every TUNE_GLOBAL_CHECKPOINT_S seconds; its
    # default ("auto") waited for the end of a 3-trial sweep here, so a killed driver lost every finished
    # trial. Every 5 s, a trial finished earlier than that before its driver died is never run again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    if resumed:
        print(f"resuming sweep {name} ({len(_finished_rows(sweep_dir))} of {trials} trials finished; those are not "
              "run again)", flush=True)
        parent_run = tracking.ending(tracking_store.attach(resumed["parent_run_id"]))
    else:
        parent_run = tracking_store.run(name, tags={"dynamo.stage": "sweep", "dynamo.sweep_dir": str(sweep_dir)})

    with parent_run as parent:
        if not resumed:
            store.write_json_atomic({**record, "name": name, "parent_run_id": parent.run_id}, sweep_dir / SWEEP_FILE)
        parent.log_params({**{f"sweep.{k}": v for k, v in sweep_cfg.model_dump(mode="json").items()},
                           **{f"meta.{k}": v for k, v in meta_cfg.model_dump(mode="json").items()},
                           "population_root": population_root, "population_size": len(rows),
                           "num_trials": trials, "max_concurrent_trials_effective": concurrency,
                           "trial_resources": resources, "tune_experiment": str(experiment_dir / name)})
        callback = _make_callback(meta_cfg, sweep_cfg, population_root, tracking_store, str(sweep_dir),
                                  parent.run_id, len(rows))
        scheduler = None
        if sweep_cfg.scheduler == "asha":
            grace = min(meta_cfg.steps, max(meta_cfg.eval_every, meta_cfg.steps // 4))
            # max_t one past the last step: ASHA would otherwise STOP every trial at its final report,
            # killing a Ray Train trial before its own finalize and clean shutdown.
            scheduler = ASHAScheduler(time_attr="step", max_t=meta_cfg.steps + 1, grace_period=grace,
                                      reduction_factor=2)
        # Re-using a trial's actor skips re-importing torch, but Tune errors a trial whose actor
        # does not reset within 2 s: only safe when every trial's function has returned (FIFO,
        # in-process trials). ASHA stops trials mid-report; Train drivers wind down slowly.
        reuse = scheduler is None and sweep_cfg.workers_per_trial == 1
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, base=meta_cfg.model_dump(mode="json"), population_root=population_root,
                                 sweep_dir=str(sweep_dir), experiment_dir=str(experiment_dir / name),
                                 workers_per_trial=sweep_cfg.workers_per_trial,
                                 write_every_report=scheduler is not None),
            resources)
        if resumed:  # the experiment as its checkpoint left it: finished trials stay finished
            where = fsio.ray_storage_kwargs(experiment_dir / name)
            tuner = tune.Tuner.restore(where["storage_path"], trainable=trainable, param_space=space,
                                       resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=where.get("storage_filesystem"))
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=sweep_cfg.metric, mode=mode, scheduler=scheduler,
                                            search_alg=search_algorithm(sweep_cfg, meta_cfg.seed),
                                            num_samples=sweep_cfg.num_samples, max_concurrent_trials=concurrency,
                                            reuse_actors=reuse),
                # a trial whose node died (or whose process did) is run again, up to meta.max_failures times
                run_config=tune.RunConfig(name=name, **fsio.ray_storage_kwargs(experiment_dir), callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=meta_cfg.max_failures),
                                          verbose=1))
        with signal_handlers_kept():
            results = tuner.fit()
        table = rank_trials(_finished_rows(sweep_dir), sweep_cfg.metric)
        _log_summary(parent, table, sweep_cfg.metric, sweep_dir)
        ok = [r for r in table if r["status"] != "ERROR"]
        if not ok:
            parent.end_status = "FAILED"
    if not ok:
        errors = [str(e) for e in results.errors][:1]
        raise RuntimeError(f"every trial of sweep {name} failed; first error: {errors}")
    return table


def _resumable(root: fsio.AnyPath, record: dict) -> dict | None:
    """The latest sweep of ``root`` that did not finish (no trials.json) and ran these very configs on
    this population, when Tune can restore its experiment: re-running the command resumes it."""
    from ray import tune

    sweeps = root / "sweep"
    started = [d for d in sweeps.iterdir() if (d / SWEEP_FILE).is_file()] if sweeps.is_dir() else []
    if not started:
        return None
    latest = max(started, key=str)
    if (latest / "trials.json").is_file():
        return None
    saved = json.loads((latest / SWEEP_FILE).read_text())
    if {k: saved.get(k) for k in record} != json.loads(store.to_json(record)):
        return None  # other settings: a new sweep
    where = fsio.ray_storage_kwargs(root / "tune" / saved["name"])
    if tune.Tuner.can_restore(where["storage_path"], storage_filesystem=where.get("storage_filesystem")):
        return saved
    return None


def _finished_rows(sweep_dir: fsio.AnyPath) -> list[dict]:
    d = sweep_dir / FINISHED_DIR
    return [json.loads(p.read_text()) for p in d.glob("*.json")] if d.is_dir() else []


def _log_summary(parent, table: list[dict], metric: str, sweep_dir: fsio.AnyPath) -> None:
    """Print the trials table and put it (JSON + markdown) and the best trial's metrics on the parent run."""
    md = markdown_table(table)
    print(f"\nsweep trials, best {metric} first ({sweep_dir}):\n{md}\n", flush=True)
    with fsio.staged(sweep_dir) as out:  # local files for MLflow, put on a bucket sweep_dir after
        store.write_json_atomic(table, out / "trials.json")
        (out / "trials.md").write_text(md + "\n")
        parent.log_artifact(out / "trials.json")
        parent.log_artifact(out / "trials.md")
    best = table[0] if table else {}
    parent.log_metrics({f"best_{k}": best[k] for k in BEST_KEYS if best.get(k) is not None})
    parent.log_metrics({"num_trials_finished": sum(r["status"] == "TERMINATED" for r in table),
                        "num_trials_stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in table),
                        "num_trials_failed": sum(r["status"] == "ERROR" for r in table)})
    if best:
        parent.set_tags({"best_trial": best["trial"], "best_run_id": best["mlflow_run_id"]})
