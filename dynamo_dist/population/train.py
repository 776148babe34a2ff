"""Base-model populations in plain PyTorch: expand a spec, train, record trajectories.

Each function works on one model in one process; ``actors.py`` runs them in
Ray actors, and ``run_local`` runs them in a loop (the sequential baseline and the
notebook path). The manifest row returned by ``train_and_record`` is the unit of work:
a model is complete when its weights and trajectory files exist and its row says so.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .. import adapters, zoo
from . import stacked
from ..data import lock, store
from ..config import GroupSpec, PopulationConfig
from ..data.tasks import TaskData, fraction_subset, load_task  # noqa: F401 -- load_task: population.load_task in tests
from .repair import recover_lost_manifest
# the spec's meaning, named here too for this module's callers (train.expand, train.pending_jobs, ...)
from .spec import (ROW_KEY, ModelJob, accuracy, arch_spec, as_member, build_member,  # noqa: F401
                   check_factories, check_spec, completed_ids, epoch_model_id, expand, pending_jobs, plan, task_for)


@torch.no_grad()
def regression_scores(model: torch.nn.Module, split, batch_size: int = 256) -> dict[str, float]:
    """``test_mse`` and ``test_r2`` of a regression model's outputs against ``split``'s targets: (N, T, K)
    targets against the outputs at every step, (N, K) against the last step's; R^2 = 1 - SSE/SST,
    SST around each output's mean, pooled over outputs (and steps)."""
    _, y_NTK = record(model, split.x, batch_size)
    target = split.y.float()
    pred = y_NTK if target.dim() == 3 else y_NTK[:, -1]
    if pred.shape != target.shape:
        raise ValueError(f"outputs {tuple(pred.shape)} do not match the targets {tuple(target.shape)}")
    sse = float((pred - target).pow(2).sum())
    sst = float((target - target.reshape(-1, target.shape[-1]).mean(0)).pow(2).sum())
    return {"test_mse": sse / max(target.numel(), 1), "test_r2": 1.0 - sse / max(sst, 1e-12)}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when this process sees a GPU, else cpu; ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("population.device is 'cuda' but this process sees no GPU (on Ray, set "
                         "population.gpus_per_actor > 0 so actors are given one)")
    return torch.device(device)


def train_model(group: GroupSpec, task: TaskData, seed: int, on_epoch=None,
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """Train one base model on ``group.train_fraction`` of the base-training split.

    AdamW + cosine (freq 7/32) as the paper's Table 1, on ``member_loss``. ``on_epoch(epoch, model)``
    is called after every epoch (used for training-trajectory populations). A factory group's model
    is the user's module as its factory built it (``spec.as_member`` makes it a base model).
    """
    torch.manual_seed(seed)
    data = fraction_subset(task.base_train, group.train_fraction, seed=seed)
    x, y = data.x.to(device), data.y.to(device)  # the (small) training set moves once, not per batch
    model = build_member(group, task).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=group.lr, weight_decay=group.weight_decay)
    steps_per_epoch = math.ceil(len(data) / group.batch_size)
    total = steps_per_epoch * group.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.cos(7 * math.pi * s / (16 * total)))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, group.epochs + 1):
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        for s in range(0, len(data), group.batch_size):
            idx = perm[s:s + group.batch_size].to(device)
            loss = member_loss(model(x[idx]), y[idx], task.output_kind, group.name)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model.eval()


def member_loss(out, y: torch.Tensor, output_kind: str, group: str) -> torch.Tensor:
    """The training loss of a model's ``forward`` output against the targets: cross-entropy of the last
    step's logits for classes; MSE for regression targets, (B, T, K) against every step, (B, K) against the
    last. ``out``: (B, C), (B, T, C), or a tuple whose first element is one of those (a user's forward)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    if output_kind == "classification":
        return F.cross_entropy(out[:, -1] if out.dim() == 3 else out, y)
    if y.dim() == 3 and out.dim() != 3:
        raise ValueError(f"group {group!r}: the task's targets are per step {tuple(y.shape)}, but forward returns "
                         f"{tuple(out.shape)}: return outputs at every step (B, T, K)")
    return F.mse_loss(out[:, -1] if out.dim() == 3 and y.dim() == 2 else out, y.float())


@torch.no_grad()
def record(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden taps and outputs of ``model`` on inputs ``x`` (batched, eval mode, on the model's
    device); returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    hs, outs = [], []
    for s in range(0, x.shape[0], batch_size):
        h, o = model.trajectories(x[s:s + batch_size].to(device))
        hs.append([t.cpu() for t in h])
        outs.append(o.cpu())
    return [torch.cat(t) for t in zip(*hs)], torch.cat(outs)


def record_member(root: str, cfg: PopulationConfig, model_id: str, model: torch.nn.Module, task_name: str,
                  labels: dict, started: float | None = None) -> dict:
    """Save weights, record probe/test trajectories, return the member's manifest row
    (``started``: ``write_member``'s)."""
    task = task_for(cfg, task_name)
    recorded = {split: record(model, data.x[:n]) for split, data, n in recorded_splits(cfg, task)}
    if task.output_kind == "regression":  # no accuracy: the row says so and carries the fit to the targets
        return write_member(root, cfg, model_id, model, task_name,
                            {**labels, "output_kind": "regression", **regression_scores(model, task.test)},
                            recorded, None, started)
    return write_member(root, cfg, model_id, model, task_name, labels, recorded,
                        accuracy(model, task.test.x, task.test.y), started)


def recorded_splits(cfg: PopulationConfig, task: TaskData) -> list[tuple[str, object, int]]:
    """(split, data, examples recorded) of the probe and test splits under ``cfg``'s recording settings."""
    n_probe = len(task.probe) if cfg.num_probe is None else min(cfg.num_probe, len(task.probe))
    n_test = len(task.test) if cfg.num_test is None else min(cfg.num_test, len(task.test))
    return [("probe", task.probe, n_probe), ("test", task.test, n_test)]


def write_member(root: str, cfg: PopulationConfig, model_id: str, model: torch.nn.Module, task_name: str,
                 labels: dict, recorded: dict[str, tuple[list[torch.Tensor], torch.Tensor]],
                 test_accuracy: float | None, started: float | None = None) -> dict:
    """Write a member's trajectories (``recorded``: split -> (hiddens, outputs)) and weights; its manifest row.

    The weights file is written last, carrying the row: a model is on disk once it is.
    ``started``: ``time.perf_counter()`` when its training began; the row's ``train_seconds`` is
    the time from then to its weights being written (None: no ``train_seconds``, a model trained elsewhere).
    """
    task = task_for(cfg, task_name)
    layout = store.Layout.at(root)
    spec = model.spec
    store.write_inputs(root, task_name, "probe", task.probe, cfg.num_probe)
    store.write_inputs(root, task_name, "test", task.test, cfg.num_test)
    paths = {split: store.write_trajectory(root, model_id, split, hs, outs, spec.family, cfg.dtype)
             for split, (hs, outs) in recorded.items()}
    wrel = layout.weights_rel(model_id)
    row = {
        "model_id": model_id, "task": task_name, "arch": spec.arch, "hidden_size": spec.hidden_size,
        "num_classes": spec.num_classes, "input_kind": spec.input_kind, "input_shape": list(spec.input_shape),
        "vocab_size": spec.vocab_size, "test_accuracy": test_accuracy,
        "weights_path": wrel, "probe_path": paths["probe"], "test_path": paths["test"], "status": "complete",
        "error": None, "probe_bytes": store.file_bytes(root, paths["probe"]),
        "test_bytes": store.file_bytes(root, paths["test"]),
        **labels,
    }
    if started is not None:
        row["train_seconds"] = time.perf_counter() - started
    # the row travels in the weights file too: a lost manifest is rebuilt from the files (repair.py)
    zoo.save(model, layout.path(wrel), extra={"model_id": model_id, ROW_KEY: store.to_json(row, indent=None)})
    row["weights_bytes"] = store.file_bytes(root, wrel)
    return row


def train_and_record(root: str, cfg: PopulationConfig, job: ModelJob) -> list[dict]:
    """Train one job's model and record every member it yields; returns manifest rows."""
    g = job.group
    task = task_for(cfg, g.task)
    labels = {"group": g.name, "train_fraction": g.train_fraction, "seed": job.seed}
    rows: list[dict] = []
    t0 = time.perf_counter()

    def record_as(model_id: str, model, epoch: int) -> None:
        member = as_member(g, task, model, f"model {model_id!r}")
        rows.append(record_member(root, cfg, model_id, member, g.task,
                                  {**labels, "epoch": epoch, **adapters.manifest_labels(member)}, t0))

    def on_epoch(epoch, model):
        if g.every_epoch and epoch >= g.first_recorded_epoch:
            record_as(epoch_model_id(g.name, job.seed, epoch), model, epoch)

    model = train_model(g, task, job.seed, on_epoch=on_epoch, device=resolve_device(cfg.device))
    if not g.every_epoch:
        record_as(job.model_id, model, g.epochs)
    return rows


def work_units(cfg: PopulationConfig, jobs: list[ModelJob]) -> list[tuple[ModelJob, ...]]:
    """Jobs as what one call trains: up to ``cfg.models_per_actor`` jobs that stack
    (``stacked.stack_key``) trained together, every other job alone. Order follows ``jobs``."""
    k = cfg.models_per_actor
    units: list[list[ModelJob]] = []
    open_unit: dict[tuple, list[ModelJob]] = {}  # stack key -> the unit still filling
    for job in jobs:
        key = stacked.stack_key(job.group) if k > 1 else None
        if key is None:
            units.append([job])
            continue
        unit = open_unit.get(key)
        if unit is None or len(unit) == k:
            unit = open_unit[key] = []
            units.append(unit)
        unit.append(job)
    return [tuple(u) for u in units]


def run_unit(root: str, cfg: PopulationConfig, unit: tuple[ModelJob, ...]) -> list[dict]:
    """Train and record one work unit; a lone job's model error raises (``MODEL_ERRORS``), a
    stack's failed members come back as rows with status 'failed' (the others are kept)."""
    if len(unit) == 1:
        return train_and_record(root, cfg, unit[0])
    return train_and_record_stack(root, cfg, list(unit))


RECORD_CHUNK_BYTES = 256 * 1024 ** 2  # trajectories of a stack held at once while its writes run


def train_and_record_stack(root: str, cfg: PopulationConfig, jobs: list[ModelJob], timings: dict | None = None
                           ) -> list[dict]:
    """Train ``jobs`` as one stack (``stacked.train_stack``) and record every member they yield.

    Trajectories are computed on the training thread (batched over the stack) and encoded and
    written by ``cpus_per_actor`` writer threads (pyarrow writes without the GIL), so training
    the next epoch overlaps the previous one's writes. A member whose files cannot be written
    (e.g. NaN) gets a failed row; the others are kept. ``timings`` (optional) receives seconds
    spent training (``train_s``), recording on the training thread (``record_s``: trajectories,
    accuracies, waits for writers to catch up) and waiting for the last writes (``final_wait_s``).
    """
    task = task_for(cfg, jobs[0].group.task)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    clock = {"train_s": 0.0, "record_s": 0.0, "final_wait_s": 0.0}
    futures: list = []  # (job, model_id, future) in submission order
    with ThreadPoolExecutor(max(1, int(cfg.cpus_per_actor)), thread_name_prefix="trajectory-writer") as writer:

        def snapshot(stack: stacked.StackedRNN, epoch: int) -> None:
            t = time.perf_counter()
            splits = recorded_splits(cfg, task)
            accs = stack.accuracy(task.test.x, task.test.y)
            per_model = sum(n * (stack.spec.hidden_size + task.num_classes) for _, _, n in splits) * 4 * task.input_shape[0]
            chunk = max(1, RECORD_CHUNK_BYTES // max(per_model, 1))
            for k0 in range(0, len(stack), chunk):
                models = slice(k0, min(k0 + chunk, len(stack)))
                recorded = {split: stack.trajectories(data.x[:n], models) for split, data, n in splits}
                for i, k in enumerate(range(models.start, models.stop)):
                    job = jobs[k]
                    g = job.group
                    mid = epoch_model_id(g.name, job.seed, epoch) if g.every_epoch else job.model_id
                    labels = {"group": g.name, "train_fraction": g.train_fraction, "seed": job.seed, "epoch": epoch}
                    member = {split: ([hs[i]], outs[i]) for split, (hs, outs) in recorded.items()}
                    futures.append((job, mid, writer.submit(write_member, root, cfg, mid, stack.model(k), g.task,
                                                            labels, member, accs[k], t0)))  # model(k): a CPU copy
                _wait_all(futures[:-chunk])  # at most two chunks of trajectories held at once
            clock["record_s"] += time.perf_counter() - t

        def on_epoch(epoch, stack):
            if jobs[0].group.every_epoch and epoch >= jobs[0].group.first_recorded_epoch:
                snapshot(stack, epoch)

        stack = stacked.train_stack([j.group for j in jobs], task, [j.seed for j in jobs], device, on_epoch=on_epoch)
        if not jobs[0].group.every_epoch:
            snapshot(stack, jobs[0].group.epochs)
        clock["train_s"] = time.perf_counter() - t0 - clock["record_s"]
        w = time.perf_counter()
        _wait_all(futures)
        clock["final_wait_s"] = time.perf_counter() - w
    rows = []
    for job, mid, fut in futures:
        try:
            row = fut.result()
        except MODEL_ERRORS as err:
            row = {**failed_rows(job, str(err))[0], "model_id": mid, "train_seconds": time.perf_counter() - t0}
        rows.append(row)
    if timings is not None:
        timings.update(clock)
    return rows


def _wait_all(futures: list) -> None:
    for _, _, fut in futures:
        fut.exception()  # waits; errors are collected per member afterwards


MODEL_ERRORS = (ValueError, FileNotFoundError)  # one model's data or numbers: fail that model, not the stage


def failed_rows(job: ModelJob, error: str) -> list[dict]:
    """Manifest rows recording that ``job``'s models failed (``status`` 'failed', the message in ``error``)."""
    g = job.group
    return [{"model_id": mid, "group": g.name, "task": g.task, "arch": g.arch, "hidden_size": g.hidden_size,
             "train_fraction": g.train_fraction, "seed": job.seed, "status": "failed", "error": error}
            for mid in job.member_ids()]


def check_failures(root: str, cfg: PopulationConfig, failed: dict[str, str]) -> None:
    """Raise if more models failed than ``cfg.max_failed_models`` allows (``failed``: model_id -> error)."""
    if len(failed) > cfg.max_failed_models:
        first = next(iter(failed))
        raise ValueError(f"{len(failed)} model(s) failed (population.max_failed_models={cfg.max_failed_models}); "
                         f"first: model {first}: {failed[first]}. Completed models are kept in {root}; failed ones "
                         "have status 'failed' in its manifest and are retried by a re-run")


def init_population(cfg: PopulationConfig, progress: bool = True, with_groups: bool = True) -> store.Layout:
    """Create or re-open ``cfg.root`` (ids, schema, recording settings checked; a lost manifest
    rebuilt from the files, ``repair.recover_lost_manifest``). The caller holds the root's lock.

    ``with_groups=False``: a new root's ``population.json`` records the data and recording
    settings only (add-models: the models are the user's, not a recipe's groups)."""
    expand(cfg)  # validate ids before touching disk
    spec = cfg.model_dump(mode="json")
    if not with_groups:
        spec["groups"] = []
    layout = store.init_root(cfg.root, spec)
    recover_lost_manifest(cfg.root, progress)
    return layout


def run_local(cfg: PopulationConfig, progress: bool = True) -> list[dict]:
    """Train and record the whole population sequentially in this process (resumable)."""
    resolve_device(cfg.device)  # a GPU asked for but absent fails before any work
    check_factories(cfg)  # users' model factories build and fit their tasks, before the root is touched
    with lock.hold(cfg.root, "population", what="population root"):
        init_population(cfg)
        jobs = pending_jobs(cfg.root, cfg, report=progress)
        from tqdm.auto import tqdm

        failed: dict[str, str] = {}
        with tqdm(total=sum(len(j.member_ids()) for j in jobs), desc="population", unit="model",
                  disable=not progress) as bar:
            for unit in work_units(cfg, jobs):
                if len(failed) > cfg.max_failed_models:
                    break  # the stage fails anyway: stop training, keep what is done
                try:
                    rows = run_unit(cfg.root, cfg, unit)
                except MODEL_ERRORS as err:
                    rows = failed_rows(unit[0], str(err))
                failed.update({r["model_id"]: r["error"] for r in rows if r["status"] == "failed"})
                store.upsert_manifest(cfg.root, rows)
                bar.update(len(rows))
        check_failures(cfg.root, cfg, failed)
        return store.manifest_rows(cfg.root)


def group_summary(rows: list[dict]) -> list[dict]:
    """Per group: count and mean +- std test accuracy."""
    import numpy as np

    out = []
    for g in sorted({r["group"] for r in rows}):
        acc = np.array([r["test_accuracy"] for r in rows if r["group"] == g])
        out.append({"group": g, "count": len(acc), "mean_accuracy": float(acc.mean()), "std_accuracy": float(acc.std())})
    return out


__all__ = ["ModelJob", "expand", "train_and_record", "run_local", "pending_jobs", "group_summary"]
