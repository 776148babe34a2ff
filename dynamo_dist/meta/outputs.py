"""A meta run's outputs on disk, and the single-process meta stage that writes them.

Output directory (the contract later stages read)::

    <output_dir>/
      meta_config.yaml          the MetaConfig of the run
      checkpoint.pt             {"step", "meta": shared state_dict, "opt_meta", "shard": {model_id: theta/V/opt}}
                                (every worker's shard merged; torch.load(weights_only=True))
      embeddings.parquet        model_id, theta (list<float32>), theta_0..theta_{d-1}, manifest labels
      model_metrics.parquet     model_id, agreement, hidden_r2, meta_accuracy, base_accuracy (test split)
      history.parquet           step, loss, loss_hidden, loss_output (+ val_* rows where evaluated)
      summary.json              mean metrics, wall time, population size, mlflow run id
      embedding_pca.png         theta in its first two principal components, coloured by group
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import config as config_mod
from ..data import store
from ..config import MetaConfig
from .model import ModelEmbeddings, build_meta_model
from .metrics import evaluate, summarize
from .trainer import DynamoTrainer, PopulationData, load_population, output_sizes, spec_from_row

LABEL_COLUMNS = ("group", "task", "arch", "hidden_size", "train_fraction", "seed", "epoch", "test_accuracy")


def embeddings_table(theta_rows: list[dict], manifest: list[dict]) -> pa.Table:
    """embeddings.parquet: one row per model, theta as a list and as scalar columns, plus labels."""
    by_id = {r["model_id"]: r for r in manifest}
    rows = []
    for e in sorted(theta_rows, key=lambda r: r["model_id"]):
        labels = {k: by_id[e["model_id"]].get(k) for k in LABEL_COLUMNS if k in by_id[e["model_id"]]}
        rows.append({"model_id": e["model_id"], "theta": [float(v) for v in e["theta"]],
                     **{f"theta_{i}": float(v) for i, v in enumerate(e["theta"])}, **labels})
    table = pa.Table.from_pylist(rows)
    return table.set_column(table.schema.get_field_index("theta"), "theta",
                            pa.array([r["theta"] for r in rows], pa.list_(pa.float32())))


def write_outputs(cfg: MetaConfig, state: dict, theta_rows: list[dict], per_model: dict[str, dict],
                  history: list[dict], manifest: list[dict], extra_summary: dict | None = None) -> dict:
    """Write every output file of a meta run (each atomically); returns the summary."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_mod.dump(cfg, out / "meta_config.yaml")
    tmp = out / ".checkpoint.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "checkpoint.pt")
    emb = embeddings_table(theta_rows, manifest)
    store.write_table_atomic(emb, out / "embeddings.parquet")
    store.write_table_atomic(pa.Table.from_pylist([{"model_id": m, **v} for m, v in sorted(per_model.items())]),
                             out / "model_metrics.parquet")
    if history:
        keys = sorted({k for h in history for k in h})
        store.write_table_atomic(pa.Table.from_pylist([{k: h.get(k) for k in keys} for h in history]),
                                 out / "history.parquet")
    summary = {**summarize(per_model), "num_models": len(theta_rows), **(extra_summary or {})}
    store.write_json_atomic(summary, out / "summary.json")
    try:
        from ..plots import embedding_pca_plot

        embedding_pca_plot(emb, "group", out / "embedding_pca.png")
    except ImportError:  # matplotlib is optional for the core path
        pass
    return summary


def log_to_mlflow(cfg: MetaConfig, summary: dict, per_model: dict, history: list[dict], run_name: str = "meta",
                  parent_run_id: str | None = None, run=None) -> str:
    """Log params, metric histories and artifacts of a finished meta run; returns the run id."""
    from .. import tracking

    own = run is None
    if own:
        run = tracking.start_run(cfg.output_dir, cfg.experiment, run_name, cfg.tracking_uri, parent_run_id)
    try:
        params = cfg.model_dump(mode="json")
        params["population_size"] = summary.get("num_models")
        params["lambda"] = cfg.output_weight
        run.log_params(params)
        run.log_history(history)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_metrics({f"{m}.{k}": v for m, d in per_model.items() for k, v in d.items()})
        out = Path(cfg.output_dir)
        for name in ("embeddings.parquet", "model_metrics.parquet", "history.parquet", "summary.json",
                     "meta_config.yaml", "embedding_pca.png", "checkpoint.pt"):
            if (out / name).exists():
                run.log_artifact(out / name, "meta" if name == "checkpoint.pt" else None)
    except BaseException:
        if own:
            run.end("FAILED")
        raise
    if own:
        run.end("FINISHED")
    return run.run_id


def run_meta_local(cfg: MetaConfig, progress: bool = True, log: bool = True) -> dict:
    """Train the meta-model over the whole population in this process and write the outputs."""
    t0 = time.perf_counter()
    data = load_population(cfg.population_root)
    trainer = DynamoTrainer(cfg, data)
    val_history: list[dict] = []

    def on_step(tr, rec):
        if tr.step % cfg.eval_every == 0 or tr.step == cfg.steps:
            v = summarize(evaluate(tr, "val"))
            rec.update({f"val_{k.removeprefix('mean_')}": x for k, x in v.items()})
            val_history.append(rec)

    trainer.fit(progress=progress, callback=on_step)
    per_model = evaluate(trainer, "test")
    wall = time.perf_counter() - t0
    state = trainer.state_dict()
    summary = write_outputs(cfg, state, trainer.embedding_rows(), per_model, trainer.history, data.rows,
                            {"wall_seconds": wall, "num_workers": 1, "steps": trainer.step})
    if log:
        summary["mlflow_run_id"] = log_to_mlflow(cfg, summary, per_model, trainer.history)
        store.write_json_atomic(summary, Path(cfg.output_dir) / "summary.json")
    return summary


@dataclass
class MetaRun:
    """A finished meta run loaded back: shared meta-model + every model's theta/V."""

    cfg: MetaConfig
    meta: torch.nn.Module
    embeddings: ModelEmbeddings
    rows: list[dict]          # manifest rows, in embeddings order
    output_dir: Path

    @property
    def family(self) -> str:
        return self.embeddings.family

    def theta(self) -> np.ndarray:
        return self.embeddings.theta_matrix().numpy()

    def embeddings_table(self) -> pa.Table:
        return pq.read_table(self.output_dir / "embeddings.parquet")

    def population(self, with_test: bool = True) -> PopulationData:
        return load_population(self.cfg.population_root, [r["model_id"] for r in self.rows], with_test=with_test)


def load_meta_run(output_dir: str | Path) -> MetaRun:
    """Load a meta run's checkpoint (eval mode). FileNotFoundError names a missing file."""
    out = Path(output_dir)
    cfg = config_mod.load(out / "meta_config.yaml", MetaConfig)
    ckpt_path = out / "checkpoint.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"meta run checkpoint not found: {ckpt_path}")
    state = torch.load(ckpt_path, weights_only=True)
    all_rows = store.manifest_rows(cfg.population_root)
    by_id = {r["model_id"]: r for r in all_rows}
    ids = sorted(state["shard"])
    rows = [by_id[m] for m in ids]
    family = "cnn" if rows[0]["arch"].startswith("resnet") else "rnn"
    meta = build_meta_model(family, spec_from_row(all_rows[0]), output_sizes(all_rows),
                            embedding_dim=cfg.embedding_dim, hidden_size=cfg.hidden_size,
                            embed_dim=cfg.embed_dim, resnet_arch=cfg.resnet_arch)
    meta.load_state_dict(state["meta"])
    meta.eval()
    base_dims = [[v["weight"].shape[0] for v in _maps_by_tap(state["shard"][m]["maps"])] for m in ids]
    emb = ModelEmbeddings(ids, cfg.embedding_dim, meta.tap_dims, base_dims, family)
    with torch.no_grad():
        for i, m in enumerate(ids):
            emb.theta[i].copy_(state["shard"][m]["theta"])
            emb.maps[i].load_state_dict(state["shard"][m]["maps"])
    return MetaRun(cfg=cfg, meta=meta, embeddings=emb, rows=rows, output_dir=out)


def _maps_by_tap(maps_state: dict) -> list[dict]:
    taps: dict[int, dict] = {}
    for k, v in maps_state.items():
        i, name = k.split(".", 1)
        taps.setdefault(int(i), {})[name] = v
    return [taps[i] for i in sorted(taps)]


def read_summary(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())
