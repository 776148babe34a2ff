"""MLflow tracking: the module that talks to MLflow (``meta/pyfunc.py`` imports it only to define and
save the MLflow Model, which it logs through a ``Run`` of this module), and the one that decides what
each stage logs (``meta_params``, ``log_meta_results``; population, sweep and analysis runs are logged
through ``Store.run``). It imports nothing above ``config`` and ``data``: the stages call it.

Every run carries where it came from (``source_tags``: the entry point, the git commit of the
working directory, the user) and a note saying what it is. A stage's run spans the stage:
``Store.for_stage`` fixes its start when the stage starts, and in a pipeline its parent (the
``pipeline`` run), so the run's duration is the stage's, not that of the logging at its end.

Stage runs carry MLflow system metrics (``system/*``: CPU, memory, disk, network) sampled by
MLflow's monitor in the process that started the run, stopped when the run ends; a meta run has
the population manifest as its dataset input (``log_population_input``).

Embedded default: a SQLite store ``mlflow.db`` (+ ``mlartifacts/``) under the pipeline's run
directory, shared by every stage.
A ``http(s)://`` URI switches to a tracking server, which is what concurrent writers
(Tune trials, several jobs) should use: SQLite serialises writers and can time out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import mlflow.data
import pyarrow as pa
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from .config import MetaConfig, TrackingConfig
from .data import fsio, store


def resolve_uri(run_dir: str | os.PathLike, tracking_uri: str | None) -> str:
    """The tracking URI to use: the given one, $MLFLOW_TRACKING_URI, or SQLite under ``run_dir``."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if fsio.is_uri(run_dir):
        raise ValueError(f"run_dir {run_dir} is an object store, where the default MLflow store (a SQLite file under "
                         "run_dir) cannot live: give tracking.tracking_uri (--tracking-uri http://host:5000, an MLflow "
                         "server every node reaches) or set MLFLOW_TRACKING_URI")
    path = Path(run_dir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        in_way = "; a file is in the way" if path.exists() or err.errno == errno.ENOTDIR else ""
        raise ValueError(f"run_dir {path} (the MLflow store's home) is not writable: cannot create it "
                         f"({err.strerror}{in_way})") from None
    return f"sqlite:///{path / 'mlflow.db'}"


def experiment_name(run_dir: str | os.PathLike) -> str:
    """The default experiment of a run directory: its name (``runs/demo`` -> ``demo``; a bucket URI's last
    part), ``dynamo`` for a root without one."""
    return fsio.as_path(store.absolute(run_dir)).name or "dynamo"


def artifact_root(run_dir: str | os.PathLike) -> str:
    return (Path(run_dir).resolve() / "mlartifacts").as_uri()


def _local_path(location: str) -> Path:
    """A local artifact location (a ``file:`` URI or a path) as a path."""
    return Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)


def check_cluster_store(uri: str, num_nodes: int) -> None:
    """Refuse a file-based store (SQLite, ./mlruns) on a cluster of more than one node, before any work:
    Ray Train workers and Tune trials on other nodes would each write a store of their own disk's.
    One MLflow server is the store of a cluster (cluster/README.md)."""
    if num_nodes > 1 and not uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"the MLflow store {uri} is a file on one node's disk, and the Ray cluster has {num_nodes} "
                         "nodes whose workers log too: give tracking.tracking_uri (--tracking-uri http://host:5000, "
                         "an MLflow server every node reaches) or set MLFLOW_TRACKING_URI")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (ValueError naming the URI) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise ValueError(f"tracking_uri {uri} answered HTTP {r.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"tracking_uri {uri} is unreachable ({err}); start the server or fix the URI") from None


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's source tags of this process: ``mlflow.source.name`` (the entry point, e.g.
    ``dynamo-dist`` or ``pipeline.py``), the whole command line (``dynamo.command``), the user,
    and ``mlflow.source.git.commit``/``.dirty`` when the working directory is a git checkout
    (no git, or no checkout: no git tags)."""
    import getpass

    argv = sys.argv or [""]
    tags = {"mlflow.source.name": Path(argv[0]).name or "python", "mlflow.source.type": "LOCAL",
            "dynamo.command": shlex.join([Path(argv[0]).name, *argv[1:]])[:5000]}
    with contextlib.suppress(Exception):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        if dirty is not None:
            tags["mlflow.source.git.dirty"] = str(bool(dirty)).lower()
    return tags


def _git(*args: str) -> str | None:
    """``git <args>`` in the working directory: its output, or None without git or a checkout."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {"artifact_location": artifact_location} if artifact_location else {}
    try:
        return client.create_experiment(name, **kwargs)
    except mlflow.exceptions.MlflowException:  # created concurrently by another writer
        return client.get_experiment_by_name(name).experiment_id


class Run:
    """A handle on one MLflow run, logging through ``MlflowClient`` (no global active-run state,
    so several runs, e.g. Tune trials in one process, can log side by side)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.end_status = "FINISHED"  # what ``ending`` ends the run with when its body returns
        self._stop_monitor = None  # weakref.finalize stopping the system-metrics monitor (watch_system)

    def watch_system(self, interval_s: float) -> None:
        """Log MLflow's system metrics (``system/*``) into this run every ``interval_s`` seconds from
        this process, until ``end`` or until this handle is dropped (a Ray Train rank 0 hands its run
        to the driver, which ends it; the monitor also stops by itself once it sees the run ended)."""
        if self._stop_monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:  # psutil missing (a dependency of dynamo_dist): no system metrics, nothing else lost
            return
        # its INFO lines (started, stopped, no GPU) and the warning it gives when a run ends between a
        # sample and its upload ("expected if the run is already terminated") are not the user's business
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.client.tracking_uri)
        monitor.start()
        self._stop_monitor = weakref.finalize(self, monitor.finish)

    def log_params(self, params: Mapping[str, object]) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for s in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[s:s + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(str(k), float(v), ts, int(step or 0)) for k, v in metrics.items() if v is not None]
        for s in range(0, len(items), 1000):  # batch logging: one request per 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[s:s + 1000])

    def log_history(self, history: list[dict], step_key: str = "step") -> None:
        """Log a list of per-step dicts as full metric histories in few requests."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(rec[step_key])) for rec in history for k, v in rec.items()
                 if k != step_key and isinstance(v, (int, float))]
        for s in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[s:s + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """Rows as an MLflow table (JSON artifact the UI previews; ``mlflow.load_table`` reads it)."""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)

    def log_dict(self, obj: dict, name: str) -> None:
        self.client.log_text(self.run_id, store.to_json(obj), name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        if self._stop_monitor is not None:
            self._stop_monitor()  # its last samples land before the run ends, and nothing after
        # rounded up, as the start is rounded down: the run spans at least what it measured
        self.client.set_terminated(self.run_id, status=status, end_time=math.ceil(time.time() * 1000))


@dataclass(frozen=True)
class Store:
    """One MLflow store and experiment: where every stage of a run logs.

    ``Store.at(run_dir, cfg)`` resolves a ``TrackingConfig`` once: a tracking server URI, or
    $MLFLOW_TRACKING_URI, or the embedded default ``sqlite:///<run_dir>/mlflow.db`` with
    artifacts in ``<run_dir>/mlartifacts``. Plain data, so it travels to Ray workers as a dict.

    A store handed to a stage (``for_stage``) also says how that stage's run starts: the run
    started through it without an explicit parent (the stage's own run, wherever it is created:
    rank 0 of Ray Train, the Tune driver) starts at ``started_ms``, under ``parent_run_id``
    (the pipeline's run; None: a top-level run), with the note ``description``. Runs nested
    explicitly (sweep trials) start when they are created. ``source``: the stage's process's
    ``source_tags``, which runs created in Ray workers carry instead of the workers' own.
    ``system_metrics_s``: every stage's run gets MLflow's system metrics sampled at this interval
    (seconds) by the process that starts it (``Run.watch_system``); None: none.
    """

    uri: str
    experiment: str = "dynamo"
    artifact_root: str | None = None  # local stores only; a tracking server has its own
    parent_run_id: str | None = None
    started_ms: int | None = None  # ms since the epoch
    description: str | None = None
    source: dict[str, str] = field(default_factory=dict)
    system_metrics_s: float | None = None

    @classmethod
    def at(cls, run_dir: str | os.PathLike, cfg: TrackingConfig | None = None) -> Store:
        cfg = cfg or TrackingConfig()
        uri = resolve_uri(run_dir, cfg.tracking_uri)
        remote = uri.startswith(("http://", "https://"))
        return cls(uri, cfg.experiment or experiment_name(run_dir), None if remote else artifact_root(run_dir),
                   system_metrics_s=cfg.system_metrics_interval_s if cfg.system_metrics else None)

    def for_stage(self, description: str, parent_run_id: str | None = None, started: float | None = None) -> Store:
        """This store for a stage (class docstring) that started at ``started`` (``time.time()``;
        default now): its run starts then, under ``parent_run_id``, with ``description`` as its note."""
        started_ms = math.floor((time.time() if started is None else started) * 1000)
        return dataclasses.replace(self, parent_run_id=parent_run_id, started_ms=started_ms, description=description,
                                   source=dict(source_tags()))

    def location(self) -> Store:
        """Only where and how this store logs (no stage): what a meta run records for later stages."""
        return type(self)(self.uri, self.experiment, self.artifact_root, system_metrics_s=self.system_metrics_s)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check_reachable(self) -> None:
        """A tracking server that does not answer, or a run directory's store copied from another
        (``check_home``): ValueError naming the store(s), before any work."""
        check_reachable(self.uri)
        self.check_home()

    def check_home(self) -> None:
        """Refuse a run directory's embedded store (``mlflow.db`` beside ``mlartifacts``) with an
        experiment that keeps its artifacts in another run directory's ``mlartifacts``: a store copied
        (``cp -a``) or moved from there. MLflow records an experiment's artifact folder as an absolute
        path, so a run logged through the copy (a new one in that experiment, or a resumed one) would
        add its files to the original's ``mlartifacts``."""
        from mlflow.entities import ViewType

        if not self.artifact_root or not self.uri.startswith("sqlite:///"):
            return
        db, home = Path(self.uri[len("sqlite:///"):]), _local_path(self.artifact_root)
        if db.parent != home.parent or not db.is_file():
            return  # a store the user named, shared by run dirs; or a new one
        # only folders of this layout: MLflow's own Default experiment points at ./mlruns
        foreign = sorted({_local_path(e.artifact_location) for e in self.client().search_experiments(
            view_type=ViewType.ALL)} - {home}, key=str)
        foreign = [p for p in foreign if p.name == home.name]
        if foreign:
            raise ValueError(f"the MLflow store {db} was copied or moved from another run directory: its experiments "
                             f"keep their artifacts in {foreign[0]}, not in {home} beside it, so this run would "
                             "write into that store's artifacts. Log to a store of its own (--tracking-uri "
                             "sqlite:///<path>/other.db, or a tracking server), or do not log (analyze --no-log)")

    def start_run(self, run_name: str, parent_run_id: str | None = None,
                  tags: Mapping[str, str] | None = None, description: str | None = None) -> Run:
        """A new run; without ``parent_run_id``, the stage's run (class docstring). ``description``
        (default: the stage's, else one made of the name and the ``dynamo.*`` tags) is its note."""
        self.check_reachable()
        client = self.client()
        exp_id = _experiment_id(client, self.experiment, self.artifact_root)
        stage_run = parent_run_id is None
        parent_run_id = parent_run_id or self.parent_run_id
        tags = dict(tags or {})
        note = description or (self.description if stage_run else None) or " ".join(
            [run_name, *(f"{k.removeprefix('dynamo.')}={v}" for k, v in tags.items() if k.startswith("dynamo."))])
        all_tags = {**(self.source or source_tags()), "mlflow.runName": run_name, "mlflow.note.content": note, **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = Run(client, client.create_run(exp_id, start_time=self.started_ms if stage_run else None, tags=all_tags,
                                            run_name=run_name).info.run_id)
        if stage_run and self.system_metrics_s:  # not sweep trials: they share the sweep's process and node
            run.watch_system(self.system_metrics_s)
        return run

    def attach(self, run_id: str) -> Run:
        """A handle on an existing run of this store (e.g. one rank 0 created)."""
        return Run(self.client(), run_id)

    def run(self, run_name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
            description: str | None = None) -> contextlib.AbstractContextManager[Run]:
        """``with store.run(name) as run:`` -- a new run, ended by ``ending``."""
        return ending(self.start_run(run_name, parent_run_id, tags, description))

    def adopt(self, run_id: str, parent_run_id: str, description: str | None = None,
              tags: Mapping[str, str] | None = None) -> None:
        """Nest an existing run (one a library call started on its own: the analysis) under
        ``parent_run_id``, with ``description`` as its note and ``tags`` added."""
        note = {"mlflow.note.content": description} if description else {}
        self.attach(run_id).set_tags({"mlflow.parentRunId": parent_run_id, **note, **(tags or {})})


@contextlib.contextmanager
def ending(run: Run) -> Iterator[Run]:
    """End ``run`` when the body is done: FAILED when it raises (the error as tag ``dynamo.error``),
    else ``run.end_status`` (FINISHED unless the body set it, e.g. to FAILED for a stage that
    records its own failure)."""
    try:
        yield run
    except BaseException as err:
        try:
            run.set_tags({"dynamo.error": f"{type(err).__name__}: {err}"})
            run.end("FAILED")
        except Exception as log_err:  # noqa: BLE001 -- never hide the body's error behind a logging one
            print(f"warning: could not mark MLflow run {run.run_id} FAILED: {log_err}", file=sys.stderr)
        raise
    run.end(run.end_status)


def meta_params(cfg: MetaConfig, population_root: str, num_models: int) -> dict:
    """The params of a meta run (the stage, a Ray Train run and a sweep trial log the same)."""
    return {**cfg.model_dump(mode="json"), "population_root": population_root, "population_size": num_models,
            "lambda": cfg.output_weight, "output_temperature": cfg.temperature,
            "steps": cfg.for_population(num_models).steps,
            "updates_per_model": round(cfg.updates_a_model(num_models), 1)}


def meta_metrics(summary: dict) -> dict[str, float]:
    """The numbers of a meta run's summary as MLflow metrics, named by their split: the summary's
    ``mean_*`` (population means on the test split) become ``test_*`` (``test_agreement``), as
    the Ray Train reports, the sweep table and ``val_*`` name them."""
    return {(f"test_{k[len('mean_'):]}" if k.startswith("mean_") else k): v for k, v in summary.items()
            if isinstance(v, (int, float))}


def log_meta_results(run: Run, summary: dict, per_model: dict[str, dict], history: list[dict],
                     artifacts: list[tuple[Path, str | None]]) -> None:
    """What a finished meta run logs: its history, summary metrics (``meta_metrics``), artifacts,
    the per-model metrics as one table (``model_metrics.json``), not one metric key per model
    (4N keys bury ``loss`` and ``val_agreement`` at scale), the embeddings as one too
    (``embeddings.json``: model_id, theta_0..theta_{d-1}, labels), and the population it trained on as its
    dataset input (``log_population_input`` of its ``population_root`` param, ``meta_params``)."""
    root = run.client.get_run(run.run_id).data.params.get("population_root")
    if root:
        log_population_input(run, root)
    run.log_history(history)
    run.log_metrics(meta_metrics(summary))
    if per_model:
        run.log_table([{"model_id": m, **d} for m, d in sorted(per_model.items())], "model_metrics.json")
    for path, artifact_path in artifacts:
        run.log_artifact(path, artifact_path)
        if path.name == "embeddings.parquet":  # the UI previews a table, not Parquet: theta_i and the labels
            emb = store.read_parquet(path, "embeddings of the meta run")
            run.log_table(emb.drop_columns(["theta"]).to_pylist(), "embeddings.json")


def log_population_input(run: Run, population_root: str) -> Dataset:
    """Log the population at ``population_root`` (a path or URI) as the run's MLflow dataset input
    (context ``training``): the complete models' manifest rows, which a meta run trains on, named
    after the root's directory, with the root as its source, the manifest's columns as its schema
    and a digest of the root and every row's content: meta runs on the same models of a root share
    it, a changed manifest changes it. (MLflow identifies a dataset of an experiment by name and
    digest, and shows the source the first run logged: the same models in another root of the same
    name are another dataset.) Returns the dataset."""
    rows = store.manifest_rows(population_root)
    df = pa.Table.from_pylist(rows).to_pandas()
    content = store.to_json({"root": str(population_root), "rows": rows}, indent=None)
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    name = fsio.as_path(population_root).name or str(population_root)
    with warnings.catch_warnings():
        # "can be interpreted in multiple ways" (two registrations of the local source) and the schema
        # inference's hint on integer columns; neither says anything about this dataset
        warnings.simplefilter("ignore")
        try:
            info = mlflow.data.from_pandas(df, source=str(population_root), name=name, digest=digest).to_dict()
        except mlflow.exceptions.MlflowException:  # a scheme without an MLflow dataset source (abfs://): the URI
            info = {**mlflow.data.from_pandas(df, source=os.sep, name=name, digest=digest).to_dict(),
                    "source_type": "uri", "source": json.dumps({"uri": str(population_root)})}
    dataset = Dataset(info["name"], info["digest"], info["source_type"], info["source"], info.get("schema"),
                      info.get("profile"))
    context = InputTag(MLFLOW_DATASET_CONTEXT, "training")
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(dataset, tags=[context])])
    return dataset


def check_model_name(name: str) -> str:
    """``name`` if the Model Registry can hold it (MLflow's rule: not blank, no '/' or ':'), checked
    before any work; ValueError naming it otherwise."""
    if not name or not name.strip() or any(c in name for c in "/:"):
        raise ValueError(f"--register-model {name!r}: a registered model name must be non-blank, "
                         "without '/' or ':'")
    return name


def check_registrable(store: Store | None, name: str) -> None:
    """ValueError unless ``name`` is a registered model's name and there is a store to register in."""
    check_model_name(name)
    if store is None:
        raise ValueError(f"--register-model {name}: the meta run was not logged to MLflow (tracking is off), "
                         "so there is no model to register; run it with a tracking store")


def register_meta_model(store: Store | None, summary: dict, name: str) -> str:
    """Register the MLflow Model a meta run logged (``summary["mlflow_model_uri"]``) in the store's
    Model Registry under ``name`` (created when new; each call adds a version). Returns
    ``models:/<name>/<version>``. ValueError when the run was not logged to MLflow."""
    check_registrable(store if summary.get("mlflow_model_uri") else None, name)
    client = store.client()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    run_id, model_path = summary["mlflow_model_uri"].removeprefix("runs:/").split("/", 1)
    # the artifact location itself (file:// or mlflow-artifacts:/), as mlflow.register_model resolves runs:/ URIs
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{model_path}"
    version = client.create_model_version(name, source, run_id=run_id, await_creation_for=0,
                                          description=f"DYNAMO meta-model of run {run_id}")
    return f"models:/{name}/{version.version}"


def ui_command(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000,
               tracking_uri: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for a run's store, bound to ``host`` (127.0.0.1 default)."""
    uri = resolve_uri(run_dir, tracking_uri)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--default-artifact-root", artifact_root(run_dir), "--host", host, "--port", str(port)]


def ui_url(host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's experiment list in its classic-ML view.

    MLflow 3 opens the GenAI view by default; its hash-routed frontend reads the view from the
    ``workflowType`` query parameter (``genai`` | ``machine_learning``) of ``#/experiments``
    (checked in mlflow 3.17's bundled JS: ``WorkflowTypeProvider`` reads ``workflowType`` from
    the URL before the value it stored in the browser).
    """
    return f"http://{host}:{port}/#/experiments?workflowType=machine_learning"


def serve_ui(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI in the foreground until interrupted."""
    db = Path(run_dir) / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}: give the pipeline's run_dir (the directory that holds "
                                "mlflow.db, e.g. runs/demo), or set MLFLOW_TRACKING_URI")
    return subprocess.call(ui_command(run_dir, host, port))
