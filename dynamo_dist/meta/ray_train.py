"""Algorithm 1 on Ray Train (V2): the shared meta-model data-parallel, theta_n/V_n sharded.

Each of W workers owns a disjoint, stable subset of the base models (``assign_shards``),
reads only their trajectories and holds only their ``ModelEmbeddings`` with its AdamW
state. The shared meta-model (F~, G~ heads) is data-parallel: its gradients are averaged
over the workers in one all-reduce before each optimizer step (``SharedGradients``; gloo on
CPU, NCCL with one GPU per worker, ``meta.device``), as ``DistributedDataParallel`` averages
them; the embeddings sit beside it, never reduced or broadcast. The maths is
``DynamoTrainer.train_step`` unchanged.

Every worker saves its shard of each checkpoint (``checkpoint.py`` has the format); shards
are keyed by model_id, so a restarted run (``FailureConfig``) or a run resumed with another
W re-assigns them. ``finalize`` turns the final checkpoint into the standard meta run
outputs (``outputs.write_outputs``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from torch import nn

from .. import config as config_mod
from ..config import MetaConfig
from ..data import fsio, lock, store
from ..ray_utils import init_ray, signal_handlers_kept, verbose
from . import checkpoint, outputs
from .metrics import evaluate
from .model import output_sizes
from .trainer import DynamoTrainer, check_population, fit_with_reports, load_population

# Worker progress goes through logging, not print: Ray Train V2 patches print in workers to
# log through the root logger *and*, because Ray workers' sys.stdout is a wrapper (not
# sys.__stdout__), also to write to stdout, so every printed line reached the driver twice
# (ray/train/v2/_internal/logging/patch_print.py). Train routes the root logger's INFO
# records to the console (streamed to the driver) and its app log file, once each.
_log = logging.getLogger(__name__)
# Ray Train's own INFO lines (a "checkpoint created" per worker per checkpoint, worker-group
# start-up) drown the progress lines on the console; warnings and errors still show, and
# Ray's system log files keep everything.
TRAIN_LOGGING = ray.train.LoggingConfig(log_level="WARNING")


# ---------------------------------------------------------------- sharding


def assign_shards(model_ids: list[str], num_workers: int) -> list[list[str]]:
    """Balanced, stable ownership: sorted ids dealt round-robin (shard sizes differ by <= 1).

    The same id set and W always give the same shards; every worker owns >= 1 model.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    ids = sorted(model_ids)
    dup = sorted({m for m in ids if ids.count(m) > 1})
    if dup:
        raise ValueError(f"model_ids: duplicate ids {dup[:5]}")
    if num_workers > len(ids):
        raise ValueError(f"num_workers={num_workers} exceeds the number of models ({len(ids)}); "
                         f"every worker must own at least one model, use num_workers <= {len(ids)}")
    return [ids[r::num_workers] for r in range(num_workers)]


# ---------------------------------------------------------------- validation


def validate_population(cfg: MetaConfig, population_root: str) -> list[dict]:
    """Check a population root before any training starts; returns its complete manifest rows.

    Root and schema, manifest, every row's trajectory paths, every trajectory file's footer
    (readable, row counts within the task inputs, the same recording settings for every model:
    ``store.check_same_recording``), the task inputs, consistent input/output sizes, and
    ``num_workers`` <= number of models. No values are decoded: the store refuses
    NaN/Inf when a trajectory is written, and a file whose size differs from the one recorded
    in the manifest at write time is the one file decoded here (NaN/Inf -> ValueError naming it).
    Raises FileNotFoundError / ValueError naming the path, model or field.
    """
    root = population_root
    if not fsio.as_path(root).is_dir():
        raise FileNotFoundError(f"population root not found: {root} (population.root)")
    rows = store.manifest_rows(root)  # checks population.json, schema version, manifest columns
    if not rows:
        raise ValueError(f"population_root {root}: the manifest has no complete models")
    if cfg.num_workers > len(rows):
        raise ValueError(f"num_workers={cfg.num_workers} exceeds the number of models ({len(rows)}) in {root}")
    check_population(rows, root)
    output_sizes(rows)
    layout = store.Layout.at(root)
    inputs = {}
    for task in sorted({r["task"] for r in rows}):
        for split in ("probe", "test"):
            inputs[task, split] = len(store.read_inputs(root, task, split))
    for r in rows:  # cheap checks first, so a missing file is reported before any data is read
        mid = r["model_id"]
        for split in ("probe", "test"):
            field = f"{split}_path"
            rel = r.get(field)
            if not rel:
                raise ValueError(f"manifest row of model {mid!r} has no {field} (no {split} trajectories recorded)")
            if not layout.path(rel).is_file():
                raise FileNotFoundError(f"{split} trajectory of model {mid!r} not found: {layout.path(rel)} "
                                        f"(manifest field {field})")
    infos = store.trajectory_infos(root, rows)  # footers only
    store.check_same_recording(root, list(infos.values()), {r["model_id"]: r["task"] for r in rows})
    counts = {k: info.num_examples for k, info in infos.items()}
    largest = max((infos[r["model_id"], "probe"] for r in rows), key=lambda i: i.decoded_bytes)
    if cfg.cache_bytes is not None and largest.decoded_bytes > cfg.cache_bytes:
        raise ValueError(f"meta.cache_bytes={cfg.cache_bytes} is smaller than one model's probe trajectory "
                         f"({largest.decoded_bytes} bytes decoded, model {largest.model_id!r}); raise it to at "
                         f"least {largest.decoded_bytes}")
    for r in rows:
        for split in ("probe", "test"):
            recorded, info = r.get(f"{split}_bytes"), infos[r["model_id"], split]
            if recorded is not None and int(recorded) != info.file_bytes:
                # changed since it was written: decode this one file (NaN/Inf -> ValueError naming it)
                store.read_trajectory(root, r["model_id"], split)
                _log.warning(f"{split} trajectory of model {r['model_id']!r} ({info.path}) changed since it was "
                             f"recorded ({recorded} -> {info.file_bytes} bytes); its values are finite, using it")
    for r in rows:
        for split in ("probe", "test"):
            mid, n = r["model_id"], counts[r["model_id"], split]
            if n == 0:
                raise ValueError(f"{split} trajectory of model {mid!r} ({layout.path(r[f'{split}_path'])}) is empty")
            if n > inputs[r["task"], split]:
                raise ValueError(f"{split} trajectory of model {mid!r} has {n} rows but the "
                                 f"{split} inputs of task {r['task']!r} have {inputs[r['task'], split]}")
    return rows


def for_cluster(cfg: MetaConfig, cluster: dict) -> MetaConfig:
    """``cfg`` with ``meta.device`` decided for a Ray cluster of resources ``cluster``
    (``ray.cluster_resources()``): cuda needs one GPU per Train worker, so it fails here, in the
    driver, naming what is missing; auto becomes cuda when there are that many GPUs, else cpu."""
    if cfg.device == "cpu":
        return cfg
    gpus = float(cluster.get("GPU", 0.0))
    if gpus >= cfg.num_workers:
        return cfg if cfg.device == "cuda" else cfg.replace(device="cuda")
    if cfg.device == "auto":
        return cfg.replace(device="cpu")
    raise ValueError(f"meta.device='cuda' needs one GPU per Ray Train worker (meta.num_workers={cfg.num_workers}) "
                     f"but the Ray cluster has {gpus:g} GPU(s) (ray.cluster_resources()); add GPU nodes, lower "
                     "meta.num_workers, or set meta.device to 'cpu' or 'auto'")


def worker_resources_text(cfg: MetaConfig) -> str:
    """What one Train worker asks Ray for, in words (placement messages)."""
    return "1 CPU and 1 GPU" if cfg.device == "cuda" else "1 CPU"


def start_attempts(cfg: MetaConfig) -> int:
    """Ray Train's worker-group start attempts (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
    60 s by default) that fit in ``meta.placement_timeout_s``; Ray's default is to retry forever."""
    each = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, math.ceil(cfg.placement_timeout_s / each))


def resolve_schedule(cfg: MetaConfig, num_models: int) -> MetaConfig:
    """``cfg.for_population``, given the config of the checkpoint a re-run of ``meta.output_dir``
    resumes (so a resume with another worker count keeps the schedule it started)."""
    if cfg.updates_per_model is None:
        return cfg
    latest = _latest_checkpoint(cfg)
    resumed = checkpoint.safe_load(latest / checkpoint.SHARED_FILE).get("config") if latest else None
    return cfg.for_population(num_models, resumed=resumed)


def check_resumable(cfg: MetaConfig, model_ids: list[str]) -> None:
    """The run's latest checkpoint in ``meta.output_dir`` (which a re-run resumes from) fits ``cfg``
    and the population: checked here, once, instead of in every Train worker after Ray started
    (where Ray Train would retry the error ``max_failures`` times)."""
    latest = _latest_checkpoint(cfg)
    if latest is None:
        return
    shared = checkpoint.safe_load(latest / checkpoint.SHARED_FILE)
    try:
        checkpoint.check_compatible(shared, cfg, model_ids, str(latest))
    except ValueError as err:
        raise ValueError(f"{err}. meta.output_dir {cfg.output_dir} holds that run and a re-run resumes it: give "
                         "another meta.output_dir to start a new one") from None


def _latest_checkpoint(cfg: MetaConfig) -> fsio.AnyPath | None:
    """The checkpoint folder a re-run of ``meta.output_dir`` resumes from (the latest listed one with
    its shared file), or None."""
    listed, _ = _checkpoint_folders(cfg)
    found = [p for p in listed if (p / checkpoint.SHARED_FILE).is_file()]
    return found[-1] if found else None


def _checkpoint_folders(cfg: MetaConfig) -> tuple[list[fsio.AnyPath], list[fsio.AnyPath]]:
    """(listed, unlisted): the checkpoint folders of ``meta.output_dir``'s Ray Train run that Ray's
    checkpoint manager snapshot lists (what a re-run resumes from) and those it does not: folders an
    interrupted run was still writing (its workers upload their files into the folder before the
    controller registers it). Both sorted by name (= time). An unreadable snapshot lists them all
    (Ray reports it; nothing is taken for half-written)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    run_dir = outputs.ray_storage(cfg.output_dir) / "meta"
    folders = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=str) if run_dir.is_dir() else []
    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if not folders or not snapshot.is_file():
        return [], folders
    try:
        state = json.loads(snapshot.read_text())
    except ValueError:
        return folders, []
    results = state.get("checkpoint_results", []) + state.get("pending_training_results", []) + \
        [state.get("latest_checkpoint_result") or {}]
    names = {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    return [p for p in folders if p.name in names], [p for p in folders if p.name not in names]


def remove_partial_checkpoints(cfg: MetaConfig) -> list[fsio.AnyPath]:
    """Delete the checkpoint folders an interrupted run left half-written (``_checkpoint_folders``'
    unlisted ones): Ray resumes from listed checkpoints only and never deletes the others, so they
    would stay forever. Call with the output directory's lock held (no writer). Returns them."""
    _, stale = _checkpoint_folders(cfg)
    for p in stale:
        fsio.remove_tree(p)
    return stale


# ---------------------------------------------------------------- the worker


class SharedGradients:
    """Data parallelism for the shared meta-model: an optimizer pre-step hook that averages its
    gradients over the workers in one all-reduce, as ``DistributedDataParallel`` averages them.

    Why not DDP itself: its constructor imports ``torch._dynamo`` (~2 s of every worker's start on
    2 cores), and on CPU its bucketed all-reduce, overlapped with backward on a communication thread,
    gave steps ~6% slower than this single flat all-reduce after backward (2 gloo processes on the
    demo's meta step, 2 cores). One all-reduce carries every gradient and a used flag per parameter:
    a parameter no worker gave a gradient this step (a head whose output group no rank sampled)
    gets ``grad=None``, as in the single-process trainer, so AdamW leaves it alone; one used on some
    workers gets the mean with zeros from the others, as DDP gives it.
    """

    def __init__(self, meta: nn.Module, world: int):
        import torch.distributed as dist

        self.params = [p for p in meta.parameters() if p.requires_grad]
        self.world = world
        # the shared initialisation is identical on every worker by seed; rank 0's is made the one (as
        # DDP broadcasts it), also after a restore
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            dist.broadcast(flat, 0)
            self._unflatten(flat, [p.data for p in self.params])

    @staticmethod
    def _unflatten(flat: torch.Tensor, into: list[torch.Tensor]) -> None:
        offset = 0
        for t in into:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def __call__(self, optimizer, args, kwargs) -> None:
        import torch.distributed as dist

        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        used = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [used])
        dist.all_reduce(flat)
        flat[:-len(params)] /= self.world
        offset = 0
        for p, n_used in zip(params, flat[-len(params):].tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if n_used else None
            offset += n


def _sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _debug_hooks(debug: dict, trainer: DynamoTrainer, rank: int) -> None:
    """Test-only hooks: parameter checksums per step, and a worker that dies once."""
    if debug.get("checksum_dir"):
        rec = {"step": trainer.step, "rank": rank, "model_ids": trainer.embeddings.model_ids,
               "shared": _sha(trainer.meta.state_dict().values()),
               "embeddings": _sha(trainer.embeddings.state_dict().values())}
        Path(debug["checksum_dir"], f"step{trainer.step:05d}-rank{rank}.json").write_text(json.dumps(rec))
    if debug.get("fail_rank") == rank and debug.get("fail_step") == trainer.step:
        marker = Path(debug["fail_marker"])
        if not marker.exists():
            marker.write_text(f"rank {rank} exited at step {trainer.step}\n")
            os._exit(1)


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    # NCCL reduces GPU tensors only (Ray Train has set this worker's current device)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _population_means(per_model: dict[str, dict], keys: tuple[str, ...], prefix: str) -> dict[str, float]:
    """Means over every worker's models of per-model metrics (all_reduce of sums and counts), each over the
    models that have it (classifiers: agreement; regression models: output_r2); a key no model has is left out."""
    sums = [sum(m[k] for m in per_model.values() if k in m) for k in keys]
    counts = [float(sum(k in m for m in per_model.values())) for k in keys]
    tot = _all_reduce(sums + counts)
    return {f"{prefix}_{k}": tot[i] / tot[len(keys) + i] for i, k in enumerate(keys) if tot[len(keys) + i]}


def _open_run(mlcfg: dict, run_id: str | None, cfg: MetaConfig, root: str, num_models: int):
    """A future of rank 0's MLflow run (attached to ``run_id``, or started with the stage's params),
    opened in a thread; its errors are raised where the run is first used."""
    from concurrent.futures import ThreadPoolExecutor

    def open_run():
        from .. import tracking

        tracking_store = tracking.Store(**mlcfg["store"])
        if run_id:
            return tracking_store.attach(run_id)
        run = tracking_store.start_run(mlcfg["run_name"], mlcfg["parent_run_id"])
        run.log_params(tracking.meta_params(cfg, root, num_models))
        return run

    pool = ThreadPoolExecutor(1, thread_name_prefix="meta-mlflow")
    future = pool.submit(open_run)
    pool.shutdown(wait=False)  # the thread runs to its end; the caller waits on the future
    return future


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: one shard of (theta_n, V_n), the shared meta-model data-parallel (``SharedGradients``).

    ``config`` is built by ``build_trainer``: ``meta`` (MetaConfig as a dict),
    ``population_root``, ``mlflow`` (store: a ``tracking.Store`` as a dict or None, run_id,
    parent_run_id, run_name), ``resume_from`` (a ray.train.Checkpoint or None),
    ``torch_threads``, ``progress``, ``debug`` (test hooks; empty in real runs).
    Reports at every ``eval_every`` and ``checkpoint_every`` step and at the end:
    ``step``, ``loss`` (population mean over the steps since the last report),
    ``loss_hidden``, ``loss_output``, ``val_agreement``, ``val_hidden_r2`` (population
    means on held-out probe sequences); the final report adds ``test_*`` means.
    """
    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_mod.parse(MetaConfig, config["meta"], source="train_loop_config['meta']")
    root = config["population_root"]
    debug = config["debug"]
    torch.set_num_threads(config["torch_threads"])

    all_rows = store.manifest_rows(root)
    ids = [r["model_id"] for r in all_rows]
    shard_ids = assign_shards(ids, world)[rank]
    data = load_population(root, shard_ids, manifest=all_rows, cache_bytes=cfg.cache_bytes,
                           spill_bytes=cfg.spill_bytes)  # this shard's files only
    # build_trainer decided meta.device for the cluster: cuda means Ray Train gave this worker a GPU
    if cfg.device == "cuda":
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    trainer = DynamoTrainer(cfg, data, all_rows, rank, device=device)
    del all_rows  # the other workers' rows are not needed again (~2 KB a model)

    shared = None
    own_ckpt = ray.train.get_checkpoint()  # this run's latest, after a worker failure or a re-run
    ckpt = own_ckpt or config["resume_from"]
    if ckpt is not None:
        with ckpt.as_directory() as d:
            shared, per_model, _ = checkpoint.read_sharded(d, model_ids=shard_ids)  # this worker's models only
        checkpoint.check_compatible(shared, cfg, ids, ckpt.path)
        trainer.step = int(shared["step"])
        trainer.meta.load_state_dict(shared["meta"])
        trainer.opt_meta.load_state_dict(shared["opt_meta"])
        trainer.load_shard_state(per_model)  # this worker's models, read one at a time
    history: list[dict] = list(shared["history"]) if shared else []
    train_seconds = float(shared["train_seconds"]) if shared else 0.0
    train_cpu_seconds = float(shared.get("train_cpu_seconds", 0.0)) if shared else 0.0

    # rank 0's (identical) shared state is broadcast here; theta/V stay outside it, never reduced
    trainer.opt_meta.register_step_pre_hook(SharedGradients(trainer.meta, world))

    mlcfg = config["mlflow"]
    # a restart continues its own MLflow run; a run seeded from another run's checkpoint starts one
    run_id = mlcfg["run_id"] or (shared["mlflow_run_id"] if own_ckpt is not None else None)
    # rank 0 opens its MLflow run beside the first steps: importing mlflow and opening its store take
    # seconds that every worker would otherwise wait out at the first all-reduce
    opening = _open_run(mlcfg, run_id, cfg, root, len(ids)) if rank == 0 and mlcfg["store"] is not None else None
    run = None

    def tracked():
        """Rank 0's MLflow run once open (None without a store); its id goes into every checkpoint."""
        nonlocal run, run_id, opening
        if opening is not None:
            run, opening = opening.result(), None
            run_id = run.run_id
        return run

    token = uuid.uuid4().hex[:8]  # distinct checkpoint dir names per attempt (rank 0's is used)
    t_steps, cpu_steps = time.perf_counter(), time.process_time()
    steps_done = 0

    queue = config.get("progress_queue") if rank == 0 else None
    tick = max(1, cfg.eval_every // 25)  # the bar moves between reports too (step count only)

    def tell(update: dict) -> None:
        try:
            queue.put_nowait(update)
        except Exception:  # noqa: BLE001 -- a full or gone queue costs the bar an update, never the run
            pass

    def count_step(tr: DynamoTrainer) -> None:
        nonlocal steps_done
        steps_done += 1
        if debug:
            _debug_hooks(debug, tr, rank)
        if queue is not None and tr.step % tick == 0:
            tell({"step": tr.step})

    def report(pending: list[dict], final: bool) -> None:
        nonlocal train_seconds, train_cpu_seconds, t_steps, cpu_steps
        train_seconds += time.perf_counter() - t_steps
        train_cpu_seconds += time.process_time() - cpu_steps
        if pending:
            flat = _all_reduce([v for r in pending for v in (r["loss"], r["loss_hidden"], r["loss_output"])])
            recs = [{"step": r["step"], "loss": flat[3 * i] / world, "loss_hidden": flat[3 * i + 1] / world,
                     "loss_output": flat[3 * i + 2] / world} for i, r in enumerate(pending)]
        else:
            recs = []
        val = _population_means(evaluate(trainer, "val"), ("agreement", "output_r2", "hidden_r2"), "val")
        metrics = {"step": trainer.step, **val}
        if recs:
            recs[-1].update(val, train_seconds=train_seconds)  # report rows: val metrics, cumulative train time
            for k in ("loss", "loss_hidden", "loss_output"):
                metrics[k] = float(np.mean([r[k] for r in recs]))
        history.extend(recs)
        test = None
        if final:
            test = evaluate(trainer, "test")
            metrics.update(_population_means(test, ("agreement", "output_r2", "hidden_r2", "meta_accuracy"), "test"))
        if tracked() is not None and recs:
            run.log_history(recs)
        checkpoint_due = final or trainer.step % cfg.checkpoint_every == 0
        if rank == 0 and config["progress"]:
            _log.info(f"[meta] step {trainer.step}/{cfg.steps} " + " ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if k != "step"))
        if queue is not None:
            tell({"step": trainer.step, **metrics})
        if not checkpoint_due:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory(prefix="dynamo-ckpt-") as tmp:
                shared_state = None
                if rank == 0:
                    shared_state = {
                        **trainer.shared_state(), "history": history, "num_workers": world,
                        "shards": [checkpoint.shard_file(r) for r in range(world)], "model_ids": ids,
                        "mlflow_run_id": run_id, "config": cfg.model_dump(mode="json"),
                        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds}
                # the live tables themselves: they are written before the next step changes them
                checkpoint.write_shard(tmp, rank, trainer.shard_state(copy=False), test, shared_state,
                                       files=trainer.embeddings.table_files())  # tables on disk: file to file
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{trainer.step:08d}_{token}")
        t_steps, cpu_steps = time.perf_counter(), time.process_time()

    if queue is not None:  # the workers are up and training: the driver stops waiting for them
        tell({"step": trainer.step, "started": True})
    # resumed at the end (e.g. with another W), fit re-saves so the final checkpoint matches this run
    fit_with_reports(trainer, report, also_every=cfg.checkpoint_every, after_step=count_step)
    if rank == 0 and config["progress"]:
        _log.info(f"[meta] worker 0 done: {steps_done} steps in {time.perf_counter() - t_start:.1f}s")


# ---------------------------------------------------------------- driver side


def build_trainer(cfg: MetaConfig, population_root: str, *, run_config=None, callbacks=None,
                  resume_from_checkpoint=None, tracking_store=None, mlflow_run_id: str | None = None,
                  parent_run_id: str | None = None, progress: bool = True, debug: dict | None = None,
                  manifest: list[dict] | None = None, progress_queue=None):
    """A ``TorchTrainer`` running ``train_loop_per_worker`` with ``cfg.num_workers`` workers of 1 CPU
    (and 1 GPU each, NCCL, when ``meta.device`` is cuda, or auto on a cluster with enough GPUs).

    Default RunConfig: storage ``outputs.ray_storage(output_dir)``, name ``meta`` (so re-running
    the same output_dir resumes from its latest checkpoint), ``FailureConfig(cfg.max_failures)``,
    ``CheckpointConfig(num_to_keep=2)``. ``callbacks`` (e.g. Tune's ``TuneReportCallback()``)
    are appended to the given or default RunConfig. ``resume_from_checkpoint`` (a
    ``ray.train.Checkpoint`` or a directory path of one) seeds a fresh run; a checkpoint of
    the run itself (after a worker failure) takes precedence. ``tracking_store`` (a
    ``tracking.Store``) makes rank 0 log to MLflow: into ``mlflow_run_id`` when given,
    otherwise into a new run (a child of ``parent_run_id`` if given). ``debug``: test hooks.
    ``manifest``: the root's complete manifest rows when the caller has read them already.
    ``progress_queue``: a ``ray.util.queue.Queue`` rank 0 puts every report's metrics into
    (``fit_bounded`` shows them as the driver's progress bar).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root, cfg = store.absolute(population_root), cfg.replace(output_dir=store.absolute(cfg.output_dir))
    # fail here, not in every worker of every retry (assign_shards names W and the model count)
    manifest = store.manifest_rows(root) if manifest is None else manifest
    assign_shards([r["model_id"] for r in manifest], cfg.num_workers)
    cfg = cfg.for_population(len(manifest))
    if cfg.device != "cpu":
        cfg = for_cluster(cfg, ray.cluster_resources())
    if run_config is None:
        run_config = RunConfig(name="meta", **outputs.ray_run_config_storage(cfg.output_dir),
                               failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                             controller_failure_limit=start_attempts(cfg)),
                               checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=TRAIN_LOGGING)
    if callbacks:
        run_config = dataclasses.replace(run_config, callbacks=[*(run_config.callbacks or []), *callbacks])
    resume_from_checkpoint = _as_checkpoint(resume_from_checkpoint)
    resources = {"CPU": 1}  # with use_gpu, ScalingConfig adds {"GPU": 1}
    use_gpu = cfg.device == "cuda"
    loop_config = {
        "meta": cfg.model_dump(mode="json"),
        "population_root": root,
        "mlflow": {"store": None if tracking_store is None else tracking_store.as_dict(), "run_id": mlflow_run_id,
                   "parent_run_id": parent_run_id, "run_name": f"meta-w{cfg.num_workers}"},
        "resume_from": resume_from_checkpoint,
        "torch_threads": int(resources["CPU"]),
        "progress": progress,
        "progress_queue": progress_queue,
        "debug": dict(debug or {}),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=_worker_range(cfg), use_gpu=use_gpu, resources_per_worker=resources,
                                     **({} if cfg.min_workers is None
                                        else {"elastic_resize_monitor_interval_s": cfg.resize_check_s})),
        run_config=run_config,
    )


def _worker_range(cfg: MetaConfig) -> int | tuple[int, int]:
    """Ray Train V2's worker count: fixed, or (min, max) for elastic training. Workers shard by the
    world size of each (re)start, so a changed count re-shards theta/V from the checkpoint."""
    if cfg.min_workers is None or cfg.min_workers == cfg.num_workers:
        return cfg.num_workers
    return (cfg.min_workers, cfg.num_workers)


def _as_checkpoint(obj):
    # ray.train.Checkpoint is itself os.PathLike: test for it first
    if obj is None or isinstance(obj, ray.train.Checkpoint):
        return obj
    return ray.train.Checkpoint.from_directory(os.fspath(obj))


def finalize(cfg: MetaConfig, population_root: str, result, *, tracking_store=None,
             wall_seconds: float | None = None, manifest: list[dict] | None = None,
             register_model: str | None = None) -> dict:
    """Write the standard meta run outputs from the final checkpoint, without merging its shards.

    ``result`` is the ``ray.train.Result`` of ``fit()`` (or anything with a ``checkpoint``
    attribute, or a checkpoint directory path). The shard files are linked or copied into the
    run's ``checkpoint/`` as they are and only theta is read from them (``checkpoint.read_thetas``),
    so the driver's memory does not grow with the models' V maps and optimiser state. Test metrics
    come from the workers; if the checkpoint lacks them (not a final one, e.g. a trial ASHA stopped)
    they are computed here, from the whole state. With a ``tracking_store``, the summary, per-model
    metrics and artifacts go to the run rank 0 logged into (ended FINISHED), or to a new run with
    the full history when training did not log; ``register_model`` registers its MLflow Model under
    that name before the run ends (summary key ``registered_model``). Returns the summary.
    """
    root, cfg = store.absolute(population_root), cfg.replace(output_dir=store.absolute(cfg.output_dir))
    ckpt = _as_checkpoint(result if isinstance(result, (str, os.PathLike)) else getattr(result, "checkpoint", None))
    if ckpt is None:
        raise ValueError("finalize: the training result has no checkpoint (did training report one?)")
    manifest = store.manifest_rows(root) if manifest is None else manifest
    with ckpt.as_directory() as d:
        return _finalize_from(cfg, root, Path(d), ckpt.path, manifest, tracking_store, wall_seconds, register_model)


def _finalize_from(cfg: MetaConfig, root: str, d: Path, ckpt_path: str, manifest: list[dict], tracking_store,
                   wall_seconds: float | None, register_model: str | None) -> dict:
    shared = checkpoint.safe_load(d / checkpoint.SHARED_FILE)
    thetas = checkpoint.read_thetas(d)
    test_metrics = checkpoint.read_test_metrics(d, shared)
    if test_metrics is None or set(test_metrics) != set(thetas):
        shared, per_model_state, _ = checkpoint.read_sharded(d)
        test_metrics = _evaluate_state(cfg, root, checkpoint.merged_state(shared, per_model_state), manifest)
        del per_model_state
    theta_rows = [{"model_id": m, "theta": t.tolist()} for m, t in sorted(thetas.items())]
    history = list(shared["history"])
    extra = {"num_workers": shared["num_workers"], "steps": shared["step"], "train_seconds": shared["train_seconds"],
             "ray_checkpoint": ckpt_path}
    if wall_seconds is not None:
        extra["wall_seconds"] = wall_seconds
    # written locally and put file by file when output_dir is a bucket, summary.json last
    with fsio.staged(cfg.output_dir, last=(outputs.SUMMARY_FILE,)) as out:
        summary = outputs.write_outputs(cfg, root, d, theta_rows, test_metrics, history, manifest, extra,
                                        tracking_store=None if tracking_store is None
                                        else tracking_store.location().as_dict(), into=out)
        if tracking_store is not None:
            from .. import tracking
            from . import pyfunc

            run_id = shared.get("mlflow_run_id")
            if run_id:  # rank 0's run: params and the history are logged already
                run, logged = tracking_store.attach(run_id), []
            else:
                run = tracking_store.start_run(f"meta-w{cfg.num_workers}")
                run.log_params(tracking.meta_params(cfg, root, len(thetas)))
                logged = history
            with tracking.ending(run):
                tracking.log_meta_results(run, summary, test_metrics, logged, outputs.artifacts(out))
                summary["mlflow_model_uri"] = pyfunc.log(run, out, manifest)
                if register_model is not None:  # part of the stage: inside its run's span
                    summary["registered_model"] = tracking.register_meta_model(tracking_store, summary, register_model)
            summary["mlflow_run_id"] = run.run_id
            outputs.write_summary(out, summary)
    return summary


def _evaluate_state(cfg: MetaConfig, population_root: str, state: dict, manifest: list[dict]) -> dict[str, dict]:
    """Per-model test metrics of a merged state, in this process (fallback for non-final checkpoints)."""
    # on the driver's CPU: the driver need not have the workers' GPUs, and the state is on the CPU
    trainer = DynamoTrainer(cfg, load_population(population_root, sorted(state["shard"]), manifest=manifest,
                                                 cache_bytes=cfg.cache_bytes, spill_bytes=cfg.spill_bytes),
                           device="cpu")
    trainer.load_state_dict(state)
    return evaluate(trainer, "test")


def run_meta(cfg: MetaConfig, population_root: str, address: str | None = None, progress: bool = True, *,
             tracking_store=None, register_model: str | None = None) -> dict:
    """Validate the population, train on Ray Train (``cfg.num_workers`` workers), write the outputs.

    Re-running with the same ``output_dir`` resumes from that run's latest checkpoint.
    ``tracking_store``: the ``tracking.Store`` to log to (None: no MLflow); ``register_model``: register
    the run's MLflow Model under this name (needs a store; checked before any work).
    Returns the summary (also ``<output_dir>/summary.json``).
    """
    t0 = time.perf_counter()
    if register_model is not None:
        from .. import tracking

        tracking.check_registrable(tracking_store, register_model)
    root = store.absolute(population_root)
    with lock.hold(root, "meta", shared=True, what="population root"):
        manifest = validate_population(cfg, root)  # read once here, passed down
        cfg = resolve_schedule(cfg, len(manifest))
        check_resumable(cfg, [r["model_id"] for r in manifest])
        if tracking_store is not None:
            tracking_store.check_reachable()
        if cfg.device != "cpu":  # the cluster's GPUs decide; a missing one fails before the output
            cfg = for_cluster(cfg, init_ray(address))  # directory is created (its lock) or written
        with lock.hold(cfg.output_dir, "meta", what="meta output directory"):
            stale = remove_partial_checkpoints(cfg)
            if stale and progress:
                print(f"removed {len(stale)} checkpoint folder(s) an interrupted run left half-written: "
                      f"{', '.join(p.name for p in stale)}", flush=True)
            init_ray(address)
            queue = _progress_queue() if progress else None
            trainer = build_trainer(cfg, root, tracking_store=tracking_store, progress=progress and verbose(),
                                    manifest=manifest, progress_queue=queue)
            result = fit_bounded(trainer, cfg, queue)
            return finalize(cfg, root, result, tracking_store=tracking_store, wall_seconds=time.perf_counter() - t0,
                            manifest=manifest, register_model=register_model)


HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.25
WAIT_NOTICE_S = 60.0  # a meta run with no report for this long says what it waits for, again every period


def _progress_queue():
    """The queue rank 0 reports progress into, on the driver's node (as Ray Train's controller is):
    a node that dies takes its workers, never the driver's progress or the run with it."""
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _show_progress(cfg: MetaConfig, queue, done) -> None:
    """The driver's meta progress bar: steps, with the latest loss and val metrics, until ``done`` is set."""
    from ray.util.queue import Empty
    from tqdm.auto import tqdm

    started, said, training = time.monotonic(), 0.0, False
    with tqdm(total=cfg.steps, desc="meta", unit="step", dynamic_ncols=True) as bar:
        while True:
            try:
                m = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    break
                waited = time.monotonic() - started
                if not training and waited - said >= WAIT_NOTICE_S:  # no worker training yet: say what it waits for
                    said = waited
                    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                    held = "" if free.get("CPU", 0) else (
                        "; every CPU is held: by this stage's workers while they start and read the population "
                        "before their first step (minutes on a loaded machine or at large N), or by other work")
                    bar.write(f"meta: no report after {waited:.0f} s; waiting for {cfg.num_workers} Ray Train "
                              f"worker(s) of {worker_resources_text(cfg)} each to start (free now: {free}{held}; "
                              f"the stage fails after meta.placement_timeout_s={cfg.placement_timeout_s:.0f} s "
                              "if they cannot be placed)")
                continue
            except Exception:  # noqa: BLE001 -- the queue's actor is gone: the run is over
                break
            training = True
            bar.update(max(0, int(m["step"]) - bar.n))
            bar.set_postfix({k.removeprefix("val_"): f"{m[k]:.3f}" for k in ("loss", "val_agreement",
                                                                            "val_hidden_r2") if k in m})


def fit_bounded(trainer, cfg: MetaConfig, progress_queue=None):
    """``trainer.fit()``, with a worker group that cannot be placed (e.g. after a node died) turned
    into an error naming the resources, after Ray Train's start attempts (``build_trainer``:
    ``meta.placement_timeout_s``) are used up. With ``progress_queue`` (``build_trainer``'s), a
    progress bar in this process shows rank 0's reports while fit runs in a thread."""
    import threading

    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    # Ray Train's controller polls its workers every 2 s by default, and a finished run waits for that
    # poll: from the workers' end to fit()'s return took 4.1 s in a demo stage, 1.0 s at 0.25 s. A poll
    # is two tiny actor calls. A user's value wins.
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, str(HEALTH_CHECK_INTERVAL_S))
    try:
        if progress_queue is None:
            with signal_handlers_kept():
                return trainer.fit()
        done, out = threading.Event(), {}

        def fit():
            try:
                out["result"] = trainer.fit()
            except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread
                out["error"] = err
            finally:
                done.set()

        thread = threading.Thread(target=fit, name="meta-fit", daemon=True)
        thread.start()
        _show_progress(cfg, progress_queue, done)  # Ctrl-C here leaves the (daemon) thread to the exit
        thread.join()
        progress_queue.shutdown()
        if "error" in out:
            raise out["error"]
        return out["result"]
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise RuntimeError(f"meta: {cfg.num_workers} Ray Train worker(s) of {worker_resources_text(cfg)} each could "
                           "not be placed within "
                           f"meta.placement_timeout_s={cfg.placement_timeout_s} s; the cluster has {free} free of "
                           f"{total}. Add a node or lower meta.num_workers, then re-run: it resumes from the latest "
                           f"checkpoint in {cfg.output_dir}") from None


__all__ = ["assign_shards", "validate_population", "for_cluster", "remove_partial_checkpoints", "train_loop_per_worker",
           "build_trainer", "finalize", "run_meta"]
