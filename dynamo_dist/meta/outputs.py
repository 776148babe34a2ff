"""A meta run's directory: the only module that names its files, writing and reading them.

Output directory (the contract later stages read)::

    <output_dir>/
      meta_config.yaml          the MetaConfig of the run
      meta_run.json             where it came from and logs to: population_root, MLflow store
      checkpoint/               the final checkpoint, sharded as the workers wrote it (``checkpoint`` module):
                                shared.pt (meta-model weights, step, config) + shard-<rank>-s<step>.pt
                                ({model_id: theta/V/opt}); torch.load(weights_only=True). Runs written
                                before this layout have one merged checkpoint.pt instead (still read)
      embeddings.parquet        model_id, theta (list<float32>), theta_0..theta_{d-1}, manifest labels
      model_metrics.parquet     model_id, agreement, hidden_r2, meta_accuracy, base_accuracy (test split;
                                regression models: output_r2, output_mse in place of agreement/accuracies)
      history.parquet           step, loss, loss_hidden, loss_output (+ val_* rows where evaluated)
      summary.json              mean metrics, wall time, population size, mlflow run id
      embedding_pca.png         theta in its first two principal components, coloured by group
      ray_results/              Ray Train's storage (sharded checkpoints) of a Ray run
      analysis/                 the analysis stage's report (analysis.report)
      posthoc/                  post-hoc embeddings of new models (posthoc.py)

The directory may be an object-store URI (``fsio``): files are written in a local staging
directory and put one by one, ``summary.json`` (what says a run finished) last.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import torch
import yaml

from .. import config as config_mod
from ..config import MetaConfig
from ..data import fsio, store
from ..data.fsio import AnyPath
from . import checkpoint
from .metrics import summarize
from .model import ModelEmbeddings, build

LABEL_COLUMNS = ("group", "task", "arch", "hidden_size", "train_fraction", "seed", "epoch", "test_accuracy")
CONFIG_FILE = "meta_config.yaml"
CONTEXT_FILE = "meta_run.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"  # the merged checkpoint of runs written before CHECKPOINT_DIR
EMBEDDINGS_FILE = "embeddings.parquet"
METRICS_FILE = "model_metrics.parquet"
HISTORY_FILE = "history.parquet"
SUMMARY_FILE = "summary.json"
PCA_FILE = "embedding_pca.png"
# logged to MLflow in this order; not the checkpoint: the run's MLflow Model (meta/pyfunc.py) holds it
_ARTIFACTS = (EMBEDDINGS_FILE, METRICS_FILE, HISTORY_FILE, SUMMARY_FILE, CONFIG_FILE, PCA_FILE)


def ray_storage(output_dir: str | Path) -> AnyPath:
    """Ray Train's storage path of the run (a re-run with the same output_dir resumes from it)."""
    return fsio.as_path(output_dir) / "ray_results"


def ray_run_config_storage(output_dir: str | Path) -> dict:
    """``RunConfig`` keywords putting Ray Train's storage in ``ray_storage(output_dir)``: a local path,
    or the bucket's path with the same ``pyarrow.fs`` filesystem every stage uses (``storage_filesystem``)."""
    return fsio.ray_storage_kwargs(ray_storage(output_dir))


def analysis_dir(output_dir: str | Path) -> AnyPath:
    return fsio.as_path(output_dir) / "analysis"


def posthoc_dir(output_dir: str | Path) -> AnyPath:
    return fsio.as_path(output_dir) / "posthoc"


def embeddings_table(theta_rows: list[dict], manifest: list[dict]) -> pa.Table:
    """embeddings.parquet: one row per model, theta as a list and as scalar columns, plus labels."""
    by_id = {r["model_id"]: r for r in manifest}
    rows = []
    for e in sorted(theta_rows, key=lambda r: r["model_id"]):
        labels = {k: by_id[e["model_id"]].get(k) for k in LABEL_COLUMNS if k in by_id[e["model_id"]]}
        rows.append({"model_id": e["model_id"], "theta": [float(v) for v in e["theta"]],
                     **{f"theta_{i}": float(v) for i, v in enumerate(e["theta"])}, **labels})
    return theta_as_float32_list(pa.Table.from_pylist(rows))


def theta_as_float32_list(table: pa.Table) -> pa.Table:
    """The ``theta`` column as list<float32> (pylist round trips give doubles)."""
    i = table.schema.get_field_index("theta")
    return table.set_column(i, "theta", pa.array(table.column("theta").to_pylist(), pa.list_(pa.float32())))


def run_checkpoint(output_dir: str | Path) -> AnyPath:
    """The final checkpoint of a meta run: its ``checkpoint/`` directory, or an earlier run's ``checkpoint.pt``."""
    out = fsio.as_path(output_dir)
    legacy = out / CHECKPOINT_FILE
    return legacy if not (out / CHECKPOINT_DIR).is_dir() and legacy.is_file() else out / CHECKPOINT_DIR


def write_outputs(cfg: MetaConfig, population_root: str, state: dict | Path, theta_rows: list[dict],
                  per_model: dict[str, dict], history: list[dict], manifest: list[dict],
                  extra_summary: dict | None = None, tracking_store: dict | None = None,
                  into: Path | None = None, files: dict[int, tuple[int, int]] | None = None) -> dict:
    """Write every output file of a meta run (each atomically); returns the summary.

    ``state``: the merged state of a single-process run, or a sharded checkpoint directory (Ray
    Train's final one), whose files are linked or copied into ``checkpoint/`` without loading them.
    ``files``: the merged state's tables that are files on disk (``ModelEmbeddings.table_files``),
    copied into the checkpoint file to file.

    ``tracking_store``: the MLflow store the run logs to (``tracking.Store`` as a dict), recorded so
    that later stages (analysis) log beside it. ``into``: a local directory the files go to instead
    of ``cfg.output_dir`` (``fsio.staged`` of it), which stays the directory they record.
    """
    if into is None and fsio.is_uri(cfg.output_dir):  # written locally, put file by file, summary.json last
        with fsio.staged(cfg.output_dir, last=(SUMMARY_FILE,)) as staging:
            return write_outputs(cfg, population_root, state, theta_rows, per_model, history, manifest,
                                 extra_summary, tracking_store, into=staging, files=files)
    out = fsio.as_path(into or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_mod.dump(cfg.replace(output_temperature=cfg.temperature), out / CONFIG_FILE)  # the T it trained at
    where = store.absolute(cfg.output_dir)
    store.write_json_atomic({"population_root": population_root, "output_dir": where,
                             "population_root_relative": fsio.relative(population_root, where),
                             "tracking": tracking_store}, out / CONTEXT_FILE)
    if isinstance(state, dict):
        checkpoint.write_run_checkpoint(out / CHECKPOINT_DIR, state=state, shared={
            "history": history, "config": cfg.model_dump(mode="json"), **(extra_summary or {})}, files=files)
    else:
        checkpoint.write_run_checkpoint(out / CHECKPOINT_DIR, state)
    emb = embeddings_table(theta_rows, manifest)
    store.write_table_atomic(emb, out / EMBEDDINGS_FILE)
    # every model's keys (classifiers: agreement; regression models: output_r2), null where a model has none
    metric_keys = list(dict.fromkeys(k for v in per_model.values() for k in v))
    store.write_table_atomic(pa.Table.from_pylist([{"model_id": m, **{k: v.get(k) for k in metric_keys}}
                                                   for m, v in sorted(per_model.items())]), out / METRICS_FILE)
    if history:
        keys = sorted({k for h in history for k in h})
        store.write_table_atomic(pa.Table.from_pylist([{k: h.get(k) for k in keys} for h in history]),
                                 out / HISTORY_FILE)
    summary = {**summarize(per_model), "num_models": len(theta_rows), **(extra_summary or {})}
    write_summary(out, summary)
    try:
        from ..plots import embedding_pca_plot

        embedding_pca_plot(emb, "group", out / PCA_FILE)
    except ImportError:  # matplotlib is optional for the core path
        pass
    return summary


def write_summary(output_dir: str | Path, summary: dict) -> None:
    """The one writer of ``summary.json`` (strict JSON: NaN/inf become null)."""
    store.write_json_atomic(summary, fsio.as_path(output_dir) / SUMMARY_FILE)


def read_summary(output_dir: str | Path) -> dict:
    """``summary.json`` of a run; {} when the run has not written one (yet)."""
    p = fsio.as_path(output_dir) / SUMMARY_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def has_finished(output_dir: str | Path) -> bool:
    return (fsio.as_path(output_dir) / SUMMARY_FILE).is_file()


def read_results(output_dir: str | Path) -> tuple[dict, dict[str, dict], list[dict], pa.Table | None]:
    """(summary, per-model metrics, history, embeddings table) of a run; empty where a file is absent."""
    out = fsio.as_path(output_dir)
    per_model, history, emb = {}, [], None
    if (out / METRICS_FILE).is_file():
        per_model = {r.pop("model_id"): r for r in store.read_parquet(out / METRICS_FILE, "model metrics").to_pylist()}
    if (out / HISTORY_FILE).is_file():
        history = store.read_parquet(out / HISTORY_FILE, "training history").to_pylist()
    if (out / EMBEDDINGS_FILE).is_file():
        emb = read_embeddings(out)
    return read_summary(out), per_model, history, emb


def read_embeddings(output_dir: str | Path) -> pa.Table:
    return store.read_parquet(fsio.as_path(output_dir) / EMBEDDINGS_FILE, "embeddings of the meta run")


def artifacts(output_dir: str | Path) -> list[tuple[Path, str | None]]:
    """The run's files worth logging, as (path, MLflow artifact dir); a local directory (its staging
    directory when the run's is on an object store)."""
    out = Path(output_dir)
    return [(out / n, None) for n in _ARTIFACTS if (out / n).exists()]


@dataclass
class MetaRun:
    """A finished meta run loaded back: shared meta-model + every model's theta/V."""

    cfg: MetaConfig
    meta: torch.nn.Module
    embeddings: ModelEmbeddings
    rows: list[dict]          # manifest rows, in embeddings order
    output_dir: AnyPath
    population_root: str
    tracking_store: dict | None  # the MLflow store the run logged to (tracking.Store fields)

    @property
    def family(self) -> str:
        return self.embeddings.family

    @property
    def model_ids(self) -> list[str]:
        return [r["model_id"] for r in self.rows]

    def theta(self) -> np.ndarray:
        return self.embeddings.theta_matrix().numpy()

    def summary(self) -> dict:
        return read_summary(self.output_dir)


def build_loaded(rows: list[dict], cfg: MetaConfig, meta_state: dict, per_model: dict[str, dict]
                 ) -> tuple[torch.nn.Module, ModelEmbeddings]:
    """The meta-model (eval mode) and embeddings of ``checkpoint.read_model_state``'s output; ``rows``:
    manifest rows holding at least those models."""
    ids = sorted(per_model)
    base_dims = [checkpoint.maps_base_dims(per_model[m]["maps"]) for m in ids]
    meta, emb = build(rows, cfg, ids, base_dims)
    meta.load_state_dict(meta_state)
    meta.eval()
    for i, m in enumerate(ids):
        emb.load_row_state(i, per_model[m])  # no optimiser state: read_model_state has none
    return meta, emb


def population_root_of(output_dir: AnyPath, context: dict) -> str:
    """The population a meta run reads: when the run directory was moved or copied together with its
    population (the relative path from it still finds a population root), that copy; else the
    population it was trained on, where it was."""
    recorded, rel = context["population_root"], context.get("population_root_relative")
    moved = context.get("output_dir") not in (None, store.absolute(output_dir))
    if moved and rel is not None:
        candidate = fsio.as_path(store.absolute(output_dir)) / rel
        if store.Layout.at(candidate).info.is_file():
            return store.absolute(candidate)
    return recorded


def tracking_store_of(output_dir: AnyPath, context: dict) -> dict | None:
    """The MLflow store later stages of a meta run (analyze) log to, as ``population_root_of`` finds its
    population: when the run directory was moved or copied together with its embedded store (the
    SQLite file and artifact folder at the same place relative to the meta directory as when it was
    written), that copy's store, so a copy never logs into the original's; else the recorded one."""
    recorded = context.get("tracking")
    old_out = context.get("output_dir")
    if not recorded or old_out in (None, store.absolute(output_dir)) or fsio.is_uri(old_out) or \
            not str(recorded.get("uri", "")).startswith("sqlite:///") or not recorded.get("artifact_root"):
        return recorded
    new_out = Path(store.absolute(output_dir))

    def moved(path: str) -> Path:
        return Path(os.path.normpath(new_out / os.path.relpath(path, old_out)))

    db = moved(recorded["uri"][len("sqlite:///"):])
    if not db.is_file():
        return recorded  # the meta directory alone was copied: its store stayed where it was
    artifacts = recorded["artifact_root"]
    artifacts = moved(unquote(urlparse(artifacts).path) if artifacts.startswith("file:") else artifacts).as_uri()
    return {**recorded, "uri": f"sqlite:///{db}", "artifact_root": artifacts}


def check_meta_run(output_dir: str | Path) -> AnyPath:
    """``output_dir`` as a path if it holds a finished meta run; FileNotFoundError naming what is missing."""
    out = fsio.as_path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"meta run directory not found: {out}")
    if not (out / CONTEXT_FILE).is_file():
        raise FileNotFoundError(f"{out / CONTEXT_FILE} not found: {out} is not a finished meta run "
                                "(written by dynamo-dist meta)")
    return out


def run_config(out: Path) -> MetaConfig:
    """The MetaConfig a finished run in ``out`` trained with, fields it predates at what trained it then."""
    cfg = config_mod.load(out / CONFIG_FILE, MetaConfig)
    written = yaml.safe_load((out / CONFIG_FILE).read_text()) or {}
    if "method" not in written:
        cfg = cfg.replace(method="paper")  # written before meta.method existed: Algorithm 1 trained it
    if "output_temperature" not in written:
        cfg = cfg.replace(output_temperature=1.0)  # written before it existed: eq. 1 at T = 1 trained it
    return cfg


def load_meta_run(output_dir: str | Path) -> MetaRun:
    """Load a meta run's checkpoint (eval mode). FileNotFoundError names a missing file."""
    out = check_meta_run(output_dir)
    # the directory as it is now (it may have been moved or copied), not where it was written
    cfg = run_config(out).replace(output_dir=store.absolute(out))
    context = json.loads((out / CONTEXT_FILE).read_text())
    meta_state, per_model = checkpoint.read_model_state(run_checkpoint(out))
    root = population_root_of(out, context)
    all_rows = store.manifest_rows(root)
    by_id = {r["model_id"]: r for r in all_rows}
    ids = sorted(per_model)
    missing = [m for m in ids if m not in by_id]
    if missing:
        raise ValueError(f"meta run {out}: models {missing[:5]} are no longer complete in {root}")
    meta, emb = build_loaded(all_rows, cfg, meta_state, per_model)
    return MetaRun(cfg=cfg, meta=meta, embeddings=emb, rows=[by_id[m] for m in ids], output_dir=out,
                   population_root=root, tracking_store=tracking_store_of(out, context))
