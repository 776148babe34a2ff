"""A population root's manifest checked against its files, and rebuilt from them when lost.

Every weights file carries its model's manifest row (metadata ``spec.ROW_KEY``, written
with the sizes of the model's trajectory files), so the manifest is an index that can be
rebuilt, never the only record of what was trained. ``repair`` (``dynamo-dist repair``):

- a lost manifest is rebuilt from the files: each model whose three files pass
  ``store.damage`` is complete again; nothing is retrained or overwritten;
- rows lost from a manifest (a model whose files exist but whose row does not) come back;
- complete rows whose files are damaged become status 'failed' with the reason, so later
  stages leave them out and the next ``population`` run retrains them.

Weights written before rows were recorded in them get their labels from the root's spec
(group, seed, epoch from the model id) and their test accuracy recomputed.
"""

from __future__ import annotations

import json

from ..config import PopulationConfig
from ..data import lock, store
from .spec import ROW_KEY, ModelJob, accuracy, completed_ids, expand, task_for


def _weights_row(root: str, model_id: str, spec_jobs: dict[str, tuple[ModelJob, int]],
                 cfg: PopulationConfig | None) -> tuple[dict | None, str | None]:
    """(manifest row, None) of one weights file, or (None, why not)."""
    layout = store.Layout.at(root)
    path = layout.path(layout.weights_rel(model_id))
    try:
        meta = store.safetensors_header(path).get("__metadata__") or {}
    except Exception as err:  # noqa: BLE001 -- Arrow, JSON and the header checks raise their own types
        return None, f"weights file {path} is unreadable ({str(err).splitlines()[0][:200]})"
    if ROW_KEY in meta:
        row = json.loads(meta[ROW_KEY])
    elif model_id in spec_jobs and cfg is not None:  # written before rows were recorded in weights files
        from .. import adapters  # noqa: PLC0415

        job, epoch = spec_jobs[model_id]
        g = job.group
        task = task_for(cfg, g.task)
        model = adapters.load(path)
        spec = model.spec
        row = {"model_id": model_id, "group": g.name, "task": g.task, "arch": spec.arch,
               "hidden_size": spec.hidden_size, "train_fraction": g.train_fraction, "seed": job.seed, "epoch": epoch,
               "num_classes": spec.num_classes, "input_kind": spec.input_kind, "input_shape": list(spec.input_shape),
               "vocab_size": spec.vocab_size, "test_accuracy": accuracy(model, task.test.x, task.test.y)}
    else:
        return None, f"weights file {path} records no manifest row and its id is not in the root's spec"
    row.update(model_id=model_id, weights_path=layout.weights_rel(model_id), status="complete", error=None,
               probe_path=layout.trajectory_rel(model_id, "probe"), test_path=layout.trajectory_rel(model_id, "test"),
               weights_bytes=path.stat().st_size)
    problem = store.damage(root, row)
    return (None, problem) if problem else (row, None)


def _spec_jobs(root: str) -> tuple[dict[str, tuple[ModelJob, int]], PopulationConfig | None]:
    spec = store.read_spec(root)
    try:
        cfg = PopulationConfig.model_validate({**spec, "root": root})
    except ValueError:
        return {}, None
    out = {}
    for job in expand(cfg):
        for e, mid in enumerate(job.member_ids(), start=job.group.first_recorded_epoch):
            out[mid] = (job, e if job.group.every_epoch else job.group.epochs)
    return out, cfg


def repair(root: str, progress: bool = True) -> dict:
    """Check ``root``'s manifest against its files and mend it (module docstring); returns counts.

    Holds the root's lock (refused while a stage writes or reads it). Keys: ``rebuilt`` (the
    manifest was absent), ``restored`` (rows brought back from weights files), ``damaged``
    (complete rows marked failed: model_id -> reason), ``unrecoverable`` (weights files that
    could not be indexed: model_id -> reason), ``complete`` (complete models afterwards).
    """
    root = store.absolute(root)
    layout = store.Layout.at(root)
    store.check_schema(layout)
    with lock.hold(root, "repair", what="population root"):
        return _repair(root, layout, progress)


def _repair(root: str, layout: store.Layout, progress: bool) -> dict:
    rebuilt = not layout.manifest.is_file()
    rows = {} if rebuilt else {r["model_id"]: r for r in store.manifest_rows(root, status=None)}
    damaged: dict[str, str] = {}
    complete = completed_ids(root, damaged) if not rebuilt else set()
    spec_jobs, cfg = _spec_jobs(root)
    restored, unrecoverable = [], {}
    weights = sorted(p.stem for p in (layout.root / "weights").glob("*.safetensors")) \
        if (layout.root / "weights").is_dir() else []
    for mid in weights:
        if mid in complete:
            continue
        row, why = _weights_row(root, mid, spec_jobs, cfg)
        if row is not None:
            restored.append(row)
            damaged.pop(mid, None)
        elif mid not in rows:
            unrecoverable[mid] = why
    marked = [{"model_id": m, "status": "failed", "error": f"damaged: {why}"} for m, why in damaged.items()]
    if restored or marked or rebuilt:
        store.upsert_manifest(root, restored + marked)
    result = {"rebuilt": rebuilt, "restored": len(restored), "damaged": damaged, "unrecoverable": unrecoverable,
              "complete": len(store.manifest_rows(root)) if layout.manifest.is_file() else 0}
    if progress:
        what = "rebuilt the manifest from the files" if rebuilt else "checked the manifest against the files"
        print(f"{root}: {what}: {result['complete']} complete model(s), {len(restored)} row(s) restored, "
              f"{len(damaged)} damaged (marked failed; the next population run retrains them)", flush=True)
        for mid, why in sorted(damaged.items()):
            print(f"  damaged {mid}: {why}")
        for mid, why in sorted(unrecoverable.items()):
            print(f"  not indexed {mid}: {why}")
    return result


def recover_lost_manifest(root: str, progress: bool = True) -> None:
    """Before a resume would retrain models over their files: rebuild the manifest of a root that has
    weights files but no manifest, and index models whose files were written whole but whose rows
    never reached the manifest (a stage stopped between the two). One listing of ``weights/``, a
    header read per unindexed file. The caller holds the root's lock."""
    layout = store.Layout.at(root)
    weights_dir = layout.root / "weights"
    files = sorted(p.stem for p in weights_dir.glob("*.safetensors")) if weights_dir.is_dir() else []
    if not files:
        return
    if not layout.manifest.is_file():
        if progress:
            print(f"{layout.manifest} is missing but {weights_dir} holds models: rebuilding it from the files",
                  flush=True)
        _repair(store.absolute(root), layout, progress)
        return
    indexed = {r["model_id"] for r in store.manifest_rows(root, status=None)}
    unindexed = [m for m in files if m not in indexed]
    if not unindexed:
        return
    spec_jobs, cfg = _spec_jobs(root)
    found = [row for row, _ in (_weights_row(root, m, spec_jobs, cfg) for m in unindexed) if row is not None]
    if found:
        store.upsert_manifest(root, found)
        if progress:
            print(f"{len(found)} model(s) written whole before the last run stopped are indexed, not retrained",
                  flush=True)


__all__ = ["repair", "recover_lost_manifest"]
