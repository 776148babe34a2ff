"""The population root on disk: the one module that knows paths and Parquet schemas.

Layout (schema version 1)::

    <root>/
      population.json                         schema_version, the spec that built it
      manifest.parquet                        one row per base model (MANIFEST_COLUMNS + group labels)
      weights/<model_id>.safetensors          weights + ArchSpec JSON metadata
      inputs/<task>/<split>.parquet           probe/test inputs shared by every model of a task
      trajectories/split=<split>/model_id=<model_id>/part-0.parquet

Trajectory schema (one row per example and tap, sorted by ``sample, step``):

    sample  int32       row index into inputs/<task>/<split>.parquet
    step    int16       time step t = 1..T (RNNs) or stage index 1..4 (ResNets)
    hidden  list<f32|f16>  base hidden state at that tap, flattened row-major
                        (shape per tap in the file metadata ``dynamo.hidden_shapes``)
    output  list<f32|f16>  base output G(h_t) at that step (ResNets: the logits, on every row)

File metadata: ``dynamo.schema_version``, ``dynamo.model_id``, ``dynamo.hidden_shapes``
(JSON list of per-tap shapes). Hive-style directories let pyarrow.dataset and DuckDB
read many models at once (``read_parquet('trajectories/*/*/*.parquet', hive_partitioning=1)``),
and a one-model read opens exactly one file. Every write goes to a temporary name in
the same directory and is renamed into place (on an object store: one put of the finished
object), so a crashed writer never leaves a file a reader can mistake for a complete one.
The root may be a local path or a URI (``s3://bucket/prefix``; ``fsio``).
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import family as families
from . import fsio
from .fsio import AnyPath
from .tasks import Split

SCHEMA_VERSION = 1
MANIFEST_COLUMNS = (
    "model_id", "group", "task", "arch", "hidden_size", "train_fraction", "seed", "epoch",
    "num_classes", "input_kind", "input_shape", "vocab_size", "test_accuracy",
    "weights_path", "probe_path", "test_path", "status", "error", "probe_bytes", "test_bytes", "weights_bytes",
)
# the recording settings of population.json every model of a root shares: a run that changes one is refused
RECORDING_FIELDS = ("data_seed", "num_examples", "num_probe", "num_test", "dtype")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DTYPES = {"float32": np.float32, "float16": np.float16}


def check_model_id(model_id: str) -> str:
    if not _ID_RE.match(model_id):
        raise ValueError(f"model_id {model_id!r} must match {_ID_RE.pattern} (it names files)")
    return model_id


@dataclass(frozen=True)
class Layout:
    """Paths under one population root. Relative paths are what the manifest stores."""

    root: AnyPath

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Layout":
        return cls(fsio.as_path(root))

    @property
    def manifest(self) -> AnyPath:
        return self.root / "manifest.parquet"

    @property
    def info(self) -> AnyPath:
        return self.root / "population.json"

    def weights_rel(self, model_id: str) -> str:
        return f"weights/{check_model_id(model_id)}.safetensors"

    def trajectory_rel(self, model_id: str, split: str) -> str:
        return f"trajectories/split={split}/model_id={check_model_id(model_id)}/part-0.parquet"

    def inputs_rel(self, task: str, split: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
        return f"inputs/{safe}/{split}.parquet"

    def path(self, rel: str) -> AnyPath:
        return self.root / rel


# ---------------------------------------------------------------- atomic writes


def write_table_atomic(table: pa.Table, path: AnyPath, compression: str = "zstd", **options) -> None:
    """Write a Parquet file under a temporary name and rename it into place, or as one put of the
    finished object on an object store (``options``: pq.write_table's)."""
    if isinstance(path, fsio.RemotePath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression, **options)
        path.write_bytes(sink.getvalue().to_pybytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression=compression, **options)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj``: NaN and +-inf become null (json.dumps would write the invalid
    ``NaN``/``Infinity`` tokens), numpy scalars become Python numbers, other objects ``str``."""
    return json.dumps(_jsonable(obj), indent=indent, allow_nan=False, default=str)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json_atomic(obj, path: AnyPath) -> None:
    """Write ``obj`` as strict JSON (:func:`to_json`) so no reader sees part of it (``fsio.write_bytes_atomic``)."""
    fsio.write_bytes_atomic(fsio.as_path(path), to_json(obj).encode())


def remove_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete temporary files (``.<name>*.tmp``) that writers killed mid-write left behind.

    Readers never see them (hidden names, no ``.parquet`` suffix); this only reclaims the
    space. Call it when no writer of this root is running. Returns the removed paths.
    """
    base = Layout.at(root).root
    if isinstance(base, fsio.RemotePath):
        return []  # objects are put whole: nothing is left half-written there
    stale = [p for p in base.rglob(".*.tmp") if p.is_file()] if base.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


absolute = fsio.absolute


def read_parquet(path: AnyPath, what: str, remedy: str = "delete it and re-run its stage") -> pa.Table:
    """Read a Parquet file; a missing one is FileNotFoundError, an unreadable one ValueError, both naming
    it (the latter ends with ``remedy``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        # One open handle: pq.read_table(path) opens the path more than once, so a writer's
        # os.replace between the opens gave readers a mix of two files (12 of 3,000 reads failed
        # against a rewriting thread); a handle keeps reading the file it opened.
        with fsio.open_input(path) as f:
            return pq.ParquetFile(f).read()  # one file: no dataset machinery (a third of a small read)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{what} {path} is not a readable Parquet file ({err}); {remedy}") from None


def repair_remedy(root: str | os.PathLike) -> str:
    """What to do about a damaged model file of ``root``: every integrity error ends with it."""
    return (f"run `dynamo-dist repair --root {root}` (it marks the damaged models failed; the next "
            "`dynamo-dist population` retrains them), then rerun the stage")


# ---------------------------------------------------------------- population info


def init_root(root: str | os.PathLike, spec: dict) -> Layout:
    """Create (or re-open) a population root, refusing one written by another schema version."""
    layout = Layout.at(root)
    fsio.check_writable(layout.root, "population root")
    if layout.info.exists():
        check_recording(layout.root, spec)
    else:
        write_json_atomic({"schema_version": SCHEMA_VERSION, "spec": spec}, layout.info)
    return layout


def check_recording(root: str | os.PathLike, spec: dict) -> None:
    """Refuse ``spec`` for an existing root whose ``population.json`` records other recording
    settings (``RECORDING_FIELDS``) or another schema version; nothing is written."""
    layout = Layout.at(root)
    if not layout.info.is_file():
        return
    stored = check_schema(layout).get("spec") or {}
    changed = [f for f in RECORDING_FIELDS if f in stored and f in spec and stored[f] != spec[f]]
    if changed:
        diff = ", ".join(f"population.{f} is {spec[f]!r} here but {stored[f]!r} in {layout.info}" for f in changed)
        raise ValueError(f"{diff}: every model of a root is recorded with the same settings; use the root's "
                         "values or a new population.root")


def check_schema(layout: Layout) -> dict:
    if not layout.info.is_file():
        raise FileNotFoundError(f"population root {layout.root} has no population.json; is it a population root?")
    info = json.loads(layout.info.read_text())
    ver = info.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise ValueError(
            f"population root {layout.root} was written with schema_version={ver}, this dynamo_dist reads "
            f"schema_version={SCHEMA_VERSION}; write a new population root or convert it"
        )
    return info


def read_spec(root: str | os.PathLike) -> dict:
    """The population spec a root was built with (``population.json``); {} when absent or unreadable."""
    layout = Layout.at(root)
    try:
        spec = json.loads(layout.info.read_text()).get("spec", {})
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


# ---------------------------------------------------------------- manifest


def read_manifest(root: str | os.PathLike) -> pa.Table:
    layout = Layout.at(root)
    check_schema(layout)
    if not layout.manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {layout.manifest}; if the models' files are still there, "
                                f"`dynamo-dist repair --root {layout.root}` rebuilds it from them")
    table = read_parquet(layout.manifest, "manifest")
    missing = [c for c in ("model_id", "task", "status") if c not in table.column_names]
    if missing:
        raise ValueError(f"manifest {layout.manifest} lacks column(s) {missing}")
    return table


def manifest_rows(root: str | os.PathLike, status: str | None = "complete") -> list[dict]:
    """Manifest rows as dicts, sorted by model_id; only ``status`` rows unless status is None."""
    rows = read_manifest(root).to_pylist()
    if status is not None:
        rows = [r for r in rows if r["status"] == status]
    return sorted(rows, key=lambda r: r["model_id"])


def upsert_manifest(root: str | os.PathLike, rows: list[dict]) -> pa.Table:
    """Merge rows (keyed by model_id) into the manifest and rewrite it atomically."""
    layout = Layout.at(root)
    existing = read_manifest(root).to_pylist() if layout.manifest.exists() else []
    by_id = {r["model_id"]: r for r in existing}
    for r in rows:
        by_id[r["model_id"]] = {**by_id.get(r["model_id"], {}), **r}
    merged = sorted(by_id.values(), key=lambda r: r["model_id"])
    keys = list(MANIFEST_COLUMNS) + sorted({k for r in merged for k in r} - set(MANIFEST_COLUMNS))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in merged])
    write_table_atomic(table, layout.manifest)
    return table


# ---------------------------------------------------------------- inputs


def write_inputs(root: str | os.PathLike, task: str, split: str, data: Split, limit: int | None = None) -> str:
    """Store a task split's inputs once per population (first ``limit`` examples); returns its relative path."""
    layout = Layout.at(root)
    rel = layout.inputs_rel(task, split)
    if layout.path(rel).exists():
        return rel
    n = len(data) if limit is None else min(limit, len(data))
    x = data.x[:n]
    flat = x.reshape(n, -1).numpy()
    meta = {"dynamo.schema_version": str(SCHEMA_VERSION), "dynamo.x_shape": json.dumps(list(x.shape[1:])),
            "dynamo.x_dtype": str(x.dtype).replace("torch.", "")}
    if data.y.is_floating_point():  # regression targets (N, K) or (N, T, K): a float list per example
        y = data.y[:n].reshape(n, -1).numpy().astype(np.float32)
        label = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1])
        meta["dynamo.y_shape"] = json.dumps(list(data.y.shape[1:]))
    else:
        label = pa.array(data.y[:n].numpy().astype(np.int64))
    table = pa.table({
        "sample": pa.array(np.arange(n, dtype=np.int32)),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
        "length": pa.array(data.lengths[:n].numpy().astype(np.int32)),
        "label": label,
    }).replace_schema_metadata(meta)
    write_table_atomic(table, layout.path(rel))
    return rel


def read_inputs(root: str | os.PathLike, task: str, split: str) -> Split:
    layout = Layout.at(root)
    path = layout.path(layout.inputs_rel(task, split))
    table = read_parquet(path, f"{split} inputs of task {task!r}")
    meta = table.schema.metadata or {}
    shape = json.loads(meta[b"dynamo.x_shape"])
    dtype = getattr(torch, meta[b"dynamo.x_dtype"].decode())
    n = table.num_rows
    flat = table.column("x").combine_chunks().values.to_numpy(zero_copy_only=False)
    x = torch.from_numpy(np.array(flat).reshape([n] + shape)).to(dtype)
    if b"dynamo.y_shape" in meta:  # regression targets
        y_flat = table.column("label").combine_chunks().values.to_numpy(zero_copy_only=False)
        y = torch.from_numpy(np.array(y_flat, dtype=np.float32).reshape([n] + json.loads(meta[b"dynamo.y_shape"])))
    else:
        y = torch.from_numpy(table.column("label").to_numpy().copy())
    return Split(x=x, y=y,
                 lengths=torch.from_numpy(table.column("length").to_numpy().astype(np.int64)))


# ---------------------------------------------------------------- trajectories


@dataclass
class Trajectory:
    """One model's recorded trajectories on one split.

    hiddens: per tap, float32 (N, T, H) for RNNs (one tap) or (N, C, H, W) per stage for ResNets.
    outputs: float32 (N, T, C) for RNNs, (N, 1, C) for ResNets.
    """

    model_id: str
    hiddens: list[torch.Tensor]
    outputs: torch.Tensor

    @property
    def num_examples(self) -> int:
        return self.outputs.shape[0]


def _step_rows(family: str) -> bool:
    """Whether ``family``'s trajectories take a row per (example, step) (one tap), not per (example, tap)."""
    return families.get(family).trajectory_rows == families.STEP_ROWS


def write_trajectory(root: str | os.PathLike, model_id: str, split: str, hiddens: list[torch.Tensor],
                     outputs: torch.Tensor, family: str, dtype: str = "float32") -> str:
    """Write one model's trajectories (layout above); returns the relative path."""
    layout = Layout.at(root)
    rel = layout.trajectory_rel(model_id, split)
    np_type = _DTYPES[dtype]
    n = outputs.shape[0]
    steps = _step_rows(family)
    if steps:  # one tap, a row per (example, step)
        h = hiddens[0].detach().cpu().numpy().astype(np_type, copy=False)  # (N, T, H)
        t_len = h.shape[1]
        hidden_rows = h.reshape(n * t_len, -1)
        out_rows = outputs.detach().cpu().numpy().astype(np_type, copy=False).reshape(n * t_len, -1)
        shapes = [list(h.shape[2:])]
        hidden_col = _list_column(hidden_rows.reshape(-1), np.full(n * t_len, hidden_rows.shape[1]))
    else:  # a row per (example, tap); the one output repeated on each
        t_len = len(hiddens)
        per_tap = [hh.detach().cpu().numpy().astype(np_type).reshape(n, -1) for hh in hiddens]
        shapes = [list(hh.shape[1:]) for hh in hiddens]
        # interleave taps per example so rows sort by (sample, step)
        flat = np.concatenate([np.concatenate([p[i] for p in per_tap]) for i in range(n)]) if n else np.zeros(0, np_type)
        sizes = np.tile([p.shape[1] for p in per_tap], n)
        hidden_col = _list_column(flat, sizes)
        logits = outputs.detach().cpu().numpy().astype(np_type).reshape(n, -1)
        out_rows = np.repeat(logits, t_len, axis=0)
    if not np.isfinite(hidden_rows if steps else flat).all() or not np.isfinite(out_rows).all():
        raise ValueError(f"trajectory of model {model_id!r} ({split}) contains NaN/Inf; not written")
    table = pa.table({
        "sample": pa.array(np.repeat(np.arange(n, dtype=np.int32), t_len)),
        "step": pa.array(np.tile(np.arange(1, t_len + 1, dtype=np.int16), n)),
        "hidden": hidden_col,
        "output": _list_column(out_rows.reshape(-1), np.full(n * t_len, out_rows.shape[1])),
    }).replace_schema_metadata({
        "dynamo.schema_version": str(SCHEMA_VERSION),
        "dynamo.model_id": model_id,
        "dynamo.family": family,
        "dynamo.hidden_shapes": json.dumps(shapes),
        "dynamo.num_examples": str(n),
        "dynamo.num_steps": str(t_len),
    })
    # Float lists are neither dictionary-encoded nor given min/max statistics: both cost more
    # than the write itself and help no reader (filters go on sample/step, which keep them).
    write_table_atomic(table, layout.path(rel), use_dictionary=["sample", "step"],
                       write_statistics=["sample", "step"])
    return rel


def _list_column(values: np.ndarray, sizes: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    # No ``type=``: from a float32/float16 array pyarrow infers the type and wraps the buffer
    # without a copy; passing the (same) type sends it through a cast that copies (~3 ms/MB).
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values)))


@dataclass(frozen=True)
class TrajectoryInfo:
    """What a trajectory file's footer says, without decoding it."""

    model_id: str
    split: str
    path: AnyPath
    family: str
    num_examples: int
    num_steps: int
    hidden_shapes: list[tuple[int, ...]]  # per tap, per example (RNN: (H,) per step; ResNet: (C, H, W))
    num_outputs: int
    dtype: str                            # storage precision: float32 | float16
    file_bytes: int

    @property
    def decoded_bytes(self) -> int:
        """Memory of the decoded trajectory in its storage precision (hidden + output values)."""
        steps = _step_rows(self.family)
        per_row = math.prod(self.hidden_shapes[0]) if steps else sum(math.prod(s) for s in self.hidden_shapes)
        rows = self.num_examples * (self.num_steps if steps else 1)
        outs = self.num_examples * (self.num_steps if steps else 1) * self.num_outputs
        return (rows * per_row + outs) * np.dtype(self.dtype).itemsize


def trajectory_info(root: str | os.PathLike, model_id: str, split: str = "probe") -> TrajectoryInfo:
    """Footer-only facts of one model's trajectory file: sizes, shapes, precision (no values decoded).

    FileNotFoundError / ValueError name the file, as ``read_trajectory``.
    """
    layout = Layout.at(root)
    path = layout.path(layout.trajectory_rel(model_id, split))
    what = f"trajectory of model {model_id!r} ({split})"
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with fsio.open_input(path) as f:
            pf = pq.ParquetFile(f)
            md, schema = pf.metadata, pf.schema_arrow
            meta = schema.metadata or {}
            step_max = _footer_max(md, "step")
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{what} {path} is not a readable Parquet file ({err}); {repair_remedy(root)}") from None
    try:
        shapes = [tuple(s) for s in json.loads(meta[b"dynamo.hidden_shapes"])]
        family = meta[b"dynamo.family"].decode()
    except KeyError as err:
        raise ValueError(f"trajectory file {path} lacks metadata {err}; not written by dynamo_dist") from None
    num_steps = int(meta[b"dynamo.num_steps"]) if b"dynamo.num_steps" in meta else (
        step_max if _step_rows(family) else len(shapes))
    num_examples = int(meta[b"dynamo.num_examples"]) if b"dynamo.num_examples" in meta else (
        md.num_rows // max(num_steps, 1))
    value_type = schema.field("hidden").type.value_type
    dtype = "float16" if value_type == pa.float16() else "float32"
    out_sizes = _footer_list_size(md, "output")
    return TrajectoryInfo(model_id, split, path, family, num_examples, num_steps, shapes, out_sizes, dtype,
                          path.stat().st_size)


def trajectory_infos(root: str | os.PathLike, rows: list[dict]) -> dict[tuple[str, str], TrajectoryInfo]:
    """``trajectory_info`` of every listed model's probe and test files, keyed (model_id, split): footers
    only, read by parallel threads (file opens dominate on network filesystems)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [(r["model_id"], split) for r in rows for split in ("probe", "test")]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(keys, pool.map(lambda k: trajectory_info(root, *k), keys)))


def check_same_recording(root: str | os.PathLike, infos: list[TrajectoryInfo],
                         tasks: dict[str, str]) -> None:
    """Refuse a root whose models were recorded with different settings, from their footers only.

    ``infos``: every model's ``trajectory_info`` (probe and test); ``tasks``: model_id -> task (the
    manifest's). Per task and split every model must have the same number of examples (rows of the
    task's inputs) and steps; the storage precision must be one for the whole root. ``population``
    refuses to create such a root, but one assembled by hand or by ``add-models`` with other
    settings would otherwise train silently on mismatched probe sets. ValueError names the models
    and the setting.
    """
    fields = (("num_examples", "rows"), ("num_steps", "steps"))
    for split in ("probe", "test"):
        for task in sorted(set(tasks.values())):
            group = [i for i in infos if i.split == split and tasks.get(i.model_id) == task]
            for field, what in fields:
                _refuse_mixed(root, group, field, f"{split} trajectory {what} (dynamo.{field}) of task {task!r}")
    _refuse_mixed(root, list(infos), "dtype", "trajectory precision (population.dtype)")


def _refuse_mixed(root, infos: list[TrajectoryInfo], field: str, what: str) -> None:
    by: dict = {}
    for i in infos:
        by.setdefault(getattr(i, field), set()).add(i.model_id)
    if len(by) < 2:
        return
    # the most common value is the root's; the others are the odd ones out
    ranked = sorted(by.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
    detail = "; ".join(f"{v!r} for {_some(ids)}" for v, ids in ranked)
    raise ValueError(f"population root {root}: models disagree on the {what}: {detail}. Every model of a root must "
                     "be recorded with the same settings: record the odd models again with the root's "
                     "population.json settings, or give them a population root of their own")


def _some(ids: set[str], shown: int = 5) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} model(s) {ids[:shown]}{more}"


def _footer_max(md: pq.FileMetaData, column: str) -> int:
    """Largest value of an integer column from its row-group statistics (0 when absent)."""
    best = 0
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            if col.path_in_schema == column and col.statistics is not None and col.statistics.has_min_max:
                best = max(best, int(col.statistics.max))
    return best


def _footer_list_size(md: pq.FileMetaData, column: str) -> int:
    """Values per row of a fixed-size list column: leaf values / rows, from the footer."""
    values = 0
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            if col.path_in_schema.split(".")[0] == column:
                values += col.num_values
    return values // max(md.num_rows, 1)


def read_trajectory(root: str | os.PathLike, model_id: str, split: str = "probe",
                    dtype: str | None = "float32") -> Trajectory:
    """Read one model's trajectories; opens only that model's file. NaN -> ValueError naming the file.

    ``dtype``: the tensors' precision; None keeps the storage precision (float16 stays float16,
    half the memory, until a batch is built from it).
    """
    layout = Layout.at(root)
    path = layout.path(layout.trajectory_rel(model_id, split))
    table = read_parquet(path, f"trajectory of model {model_id!r} ({split})", repair_remedy(root))
    meta = table.schema.metadata or {}
    try:
        shapes = [tuple(s) for s in json.loads(meta[b"dynamo.hidden_shapes"])]
        family = meta[b"dynamo.family"].decode()
    except KeyError as err:
        raise ValueError(f"trajectory file {path} lacks metadata {err}; not written by dynamo_dist") from None
    step = table.column("step").to_numpy()
    t_len = int(step.max()) if len(step) else 0
    n = table.num_rows // max(t_len, 1)
    hidden = table.column("hidden").combine_chunks().values.to_numpy(zero_copy_only=False)
    output = table.column("output").combine_chunks().values.to_numpy(zero_copy_only=False)
    # owned, writable arrays (Arrow's zero-copy views are read-only), in the asked precision
    hidden = hidden.astype(dtype or hidden.dtype, copy=not hidden.flags.writeable or dtype not in (None, hidden.dtype))
    output = output.astype(dtype or output.dtype, copy=not output.flags.writeable or dtype not in (None, output.dtype))
    if not (np.isfinite(hidden).all() and np.isfinite(output).all()):
        raise ValueError(f"trajectory file {path} contains NaN/Inf values (model {model_id!r}); {repair_remedy(root)}")
    if _step_rows(family):
        hiddens = [torch.from_numpy(hidden.reshape((n, t_len) + shapes[0]))]
        outputs = torch.from_numpy(output.reshape(n, t_len, -1))
    else:
        sizes = [int(np.prod(s)) for s in shapes]
        per_example = hidden.reshape(n, sum(sizes))
        bounds = np.cumsum([0] + sizes)
        hiddens = [torch.from_numpy(np.ascontiguousarray(per_example[:, a:b]).reshape((n,) + s))
                   for a, b, s in zip(bounds[:-1], bounds[1:], shapes)]
        outputs = torch.from_numpy(output.reshape(n, t_len, -1)[:, :1])
    return Trajectory(model_id=model_id, hiddens=hiddens, outputs=outputs)


def damage(root: str | os.PathLike, row: dict) -> str | None:
    """Why a complete model's files cannot be trusted, or None when they can (cheap: no values decoded).

    Each file must exist with the size recorded when it was written (rows written before sizes
    were recorded skip that check); trajectory files must have a readable Parquet footer and the
    weights a readable safetensors header covering the whole file (truncation shows there).
    """
    layout = Layout.at(root)
    for kind in ("weights", "probe", "test"):
        rel = row.get(f"{kind}_path")
        if not rel:
            return f"no {kind}_path in its manifest row"
        path = layout.path(rel)
        if not path.is_file():
            return f"{kind} file {path} is missing"
        recorded = row.get(f"{kind}_bytes")
        if recorded is not None and int(recorded) != path.stat().st_size:
            return f"{kind} file {path} has {path.stat().st_size} bytes, {int(recorded)} when it was written"
        try:
            if kind == "weights":
                safetensors_header(path)
            else:
                with fsio.open_input(path) as f:
                    pq.ParquetFile(f)
        except Exception as err:  # noqa: BLE001 -- safetensors and Arrow raise their own error types
            return f"{kind} file {path} is unreadable ({str(err).splitlines()[0][:200]})"
    return None


def check_intact(root: str | os.PathLike, rows: list[dict]) -> None:
    """Refuse, before a stage does any work, models whose files cannot be trusted (``damage``: sizes,
    headers and footers; nothing decoded). ValueError names each damaged file and the remedy."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # file opens dominate on network filesystems
        problems = list(pool.map(lambda r: damage(root, r), rows))
    bad = [f"model {r['model_id']!r}: {why}" for r, why in zip(rows, problems) if why]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} model(s) of population root {root} have damaged files: "
                         f"{'; '.join(bad[:5])}{more}; {repair_remedy(root)}")


def safetensors_header(path: AnyPath) -> dict:
    """The JSON header of a safetensors file (``__metadata__`` holds its string metadata), read without
    its tensors, also from an object store. ValueError when the file is not whole: the header must
    parse and the tensors must end where the file does (what ``safe_open`` checks)."""
    with fsio.open_input(path) as f:
        size = f.size()
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size}")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"tensors end at byte {8 + n + end}, the file at {size} (truncated or padded)")
    return header


def file_bytes(root: str | os.PathLike, rel: str) -> int:
    """Size of a file of the root (recorded in the manifest when it is written, checked on resume)."""
    return Layout.at(root).path(rel).stat().st_size


def trajectory_glob(root: str | os.PathLike, split: str = "probe") -> str:
    """A glob DuckDB/pyarrow can read all models' trajectories of a split from."""
    return str(Layout.at(root).root / "trajectories" / f"split={split}" / "*" / "*.parquet")
