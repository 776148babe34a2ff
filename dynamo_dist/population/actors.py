"""Population stage on Ray: actors train base models and record their trajectories.

The per-model work is the plain code in ``train.py``; this module only spreads it
over a Ray cluster. Each ``PopulationWorker`` actor holds ``cpus_per_actor`` CPUs (or a
GPU fraction) and runs ``train.run_unit`` for one work unit per call (one job, or up to
``models_per_actor`` jobs trained stacked), writing its models' weights and trajectory files
itself, so no weights travel through the driver.

The driver is the only writer of ``manifest.parquet``. It keeps every actor busy with a
short queue, collects results with ``ray.wait``, upserts finished rows in batches, and
replaces an actor that dies, re-running the jobs it held (a bounded number of times).
A model that fails on its own (a ValueError such as a NaN trajectory) is recorded with
status 'failed' and the others go on; more than ``max_failed_models`` failures stop new
work and fail the stage once the running jobs are in.
A model enters the manifest only once all its files are in place, so an interrupted run
re-run with the same spec trains only ``train.pending_jobs``.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Callable

import ray
import torch
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from . import train
from .. import adapters
from ..data import lock, store
from ..config import PopulationConfig
from .train import ModelJob
from ..ray_utils import init_ray

QUEUE_PER_ACTOR = 2     # one job running, one waiting: an actor never idles on a driver round trip
FLUSH_SECONDS = 1.0     # finished rows wait at most this long before the manifest is rewritten
WAIT_SECONDS = 5.0      # the driver looks at unplaced actors at least this often
_ACTOR_LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError)

ProgressHook = Callable[[list[dict], list["ray.actor.ActorHandle"]], None]


@ray.remote(max_restarts=0)  # the driver replaces dead actors itself and re-runs their jobs
class PopulationWorker:
    """Trains and records base models, one job per call, in its own process."""

    def __init__(self, cfg: PopulationConfig, num_threads: int, search_paths: tuple[str, ...] = ()):
        # One intra-op thread per held CPU: on CPU, several 1-thread models beat one
        # multi-threaded model (tiny RNN steps do not parallelise inside an op).
        torch.set_num_threads(num_threads)
        self._cfg = cfg
        # where the driver imports users' model factories from (appended: what is installed here wins)
        sys.path.extend(p for p in search_paths if p not in sys.path)

    def ready(self) -> bool:
        """Answers once the actor is placed and constructed (the scheduler gives it jobs from then on)."""
        return True

    def train_and_record(self, unit: tuple[ModelJob, ...]) -> list[dict]:
        """Train a work unit (one job, or up to ``models_per_actor`` stacked), write its weights +
        trajectories under the root; return manifest rows (``train.run_unit``)."""
        return train.run_unit(self._cfg.root, self._cfg, unit)


def num_actors_for(cfg: PopulationConfig, num_jobs: int) -> int:
    """``cfg.num_actors``, else as many as the cluster's free CPUs (and GPUs) hold; never more than
    ``num_jobs`` (work units)."""
    if cfg.num_actors is not None:
        n = cfg.num_actors
    else:
        free = ray.available_resources()
        n = int(free.get("CPU", 0) // cfg.cpus_per_actor)
        if cfg.gpus_per_actor > 0:
            n = min(n, int(free.get("GPU", 0) // cfg.gpus_per_actor))
        n = max(n, 1)
    return max(1, min(n, num_jobs))


def run_population(cfg: PopulationConfig, address: str | None = None, progress: bool = True, *,
                   max_retries: int = 3, on_progress: ProgressHook | None = None) -> list[dict]:
    """Train and record every pending model of ``cfg`` with Ray actors; returns the complete manifest rows.

    address: Ray cluster address (default ``$RAY_ADDRESS``, else Ray starts in-process).
    progress: show a progress bar (models done / total, rate, ETA) and a per-group summary.
    max_retries: times a job is re-run after the actor running it died before giving up.
    on_progress: called after each batch of finished models with their manifest rows and
        the live actor handles (monitoring, and fault injection in tests).

    The root must be a path every actor can write (one machine, or a shared filesystem).
    """
    if cfg.device == "cuda" and cfg.gpus_per_actor <= 0:
        raise ValueError("population.device is 'cuda' but population.gpus_per_actor is 0: Ray gives actors no GPU; "
                         "set gpus_per_actor (e.g. 0.25 for four actors per GPU)")
    root = store.absolute(cfg.root)
    cfg = cfg.replace(root=root)
    train.check_factories(cfg)  # users' model factories build and fit their tasks, before the root is touched
    with lock.hold(root, "population", what="population root"):
        train.init_population(cfg)  # validates ids, root and schema version before Ray starts
        jobs = train.pending_jobs(root, cfg, report=progress)
        total = sum(len(j.member_ids()) for j in train.expand(cfg))
        todo = sum(len(j.member_ids()) for j in jobs)
        failed: dict[str, str] = {}
        if jobs:
            init_ray(address)
            from tqdm.auto import tqdm

            with tqdm(total=total, initial=total - todo, desc="population", unit="model", disable=not progress,
                      dynamic_ncols=True) as bar:
                failed = _Scheduler(cfg, train.work_units(cfg, jobs), max_retries, bar, on_progress).run()
        rows = store.manifest_rows(root)
        if progress:
            for g in train.group_summary(rows):
                print(f"{g['group']}: {g['count']} models, test accuracy "
                      f"{g['mean_accuracy']:.3f} ± {g['std_accuracy']:.3f}")
            if failed:
                print(f"failed: {len(failed)} model(s), status 'failed' in the manifest, e.g. "
                      f"{next(iter(failed))}: {next(iter(failed.values()))}")
        train.check_failures(root, cfg, failed)
        return rows


class _Scheduler:
    """The driver loop: submit with a bounded queue per actor, collect with ray.wait, replace dead actors."""

    def __init__(self, cfg: PopulationConfig, units: list[tuple[ModelJob, ...]], max_retries: int, bar, on_progress):
        self.cfg = cfg
        self.queue: collections.deque[tuple[ModelJob, ...]] = collections.deque(units)
        self.max_retries = max_retries
        self.bar = bar
        self.on_progress = on_progress
        self.actors: list = []  # per slot: an actor handle, or None once released
        self.ready: set[int] = set()  # slots whose actor is placed and takes jobs
        self.starting: dict[ray.ObjectRef, int] = {}  # ready() ref -> slot, of actors not yet placed
        self.started_at: dict[int, float] = {}
        self.inflight: dict[ray.ObjectRef, tuple[int, tuple[ModelJob, ...]]] = {}  # ref -> (actor slot, unit)
        self.retries: collections.Counter[str] = collections.Counter()
        self.finished: list[dict] = []  # rows not yet in the manifest
        self.failed: dict[str, str] = {}  # model_id -> error, of models that failed on their own data/numbers
        self.last_flush = time.monotonic()
        found = (adapters.factory_search_path(g.factory) for g in cfg.groups if g.factory is not None)
        self.search_paths = tuple(dict.fromkeys(p for p in found if p))

    def run(self) -> dict[str, str]:
        """Run every job; returns the failed models (model_id -> error)."""
        try:
            for slot in range(num_actors_for(self.cfg, len(self.queue))):
                self.actors.append(None)
                self._start_actor(slot)
            while self.inflight or self.queue:
                refs = list(self.inflight) + list(self.starting)
                ready, rest = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
                if ready and rest:  # take everything else that is already done, without waiting
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                done_rows: list[dict] = []
                for ref in ready:
                    if ref in self.starting:
                        self._placed(ref)
                    elif ref in self.inflight:  # refs of a replaced actor were already re-queued
                        done_rows += self._collect(ref)
                if done_rows:
                    self.finished += done_rows
                    self.bar.update(len(done_rows))
                    if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
                        self._flush()
                    if self.on_progress is not None:
                        self.on_progress(done_rows, [a for a in self.actors if a is not None])
                if len(self.failed) > self.cfg.max_failed_models and not self.inflight:
                    break  # the stage fails anyway: what ran is in, start nothing new
                self._fill()
                self._release_idle()
                self._check_placement()
        finally:
            self._flush()
            for actor in self.actors:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            store.remove_temp_files(self.cfg.root)  # leftovers of actors killed mid-write
        return self.failed

    def _start_actor(self, slot: int) -> None:
        """A fresh actor in ``slot``; it takes jobs once placed (``_placed``)."""
        opts = {"num_cpus": self.cfg.cpus_per_actor, "num_gpus": self.cfg.gpus_per_actor}
        actor = PopulationWorker.options(**opts).remote(self.cfg, max(1, int(self.cfg.cpus_per_actor)),
                                                        self.search_paths)
        self.actors[slot] = actor
        self.starting[actor.ready.remote()] = slot
        self.started_at[slot] = time.monotonic()

    def _placed(self, ref: ray.ObjectRef) -> None:
        slot = self.starting.pop(ref)
        try:
            ray.get(ref)
        except _ACTOR_LOST:  # died before its first job (e.g. its node went away): try again
            ray.kill(self.actors[slot], no_restart=True)
            self._start_actor(slot)
            return
        self.ready.add(slot)

    def _fill(self) -> None:
        """Give queued jobs to placed actors (a dead actor's jobs go to whichever live actor has room)."""
        if len(self.failed) > self.cfg.max_failed_models:
            return  # the stage fails anyway: let what runs finish, start nothing new
        load = collections.Counter(slot for slot, _ in self.inflight.values())
        for slot in sorted(self.ready):
            while self.queue and load[slot] < QUEUE_PER_ACTOR:
                unit = self.queue.popleft()
                self.inflight[self.actors[slot].train_and_record.remote(unit)] = (slot, unit)
                load[slot] += 1

    def _release_idle(self) -> None:
        """Once the queue is empty, actors with nothing to do give their CPUs back (a replacement
        waiting for a CPU elsewhere, or another job, can have them); unplaced ones are cancelled."""
        if self.queue:
            return
        busy = {slot for slot, _ in self.inflight.values()}
        for slot in [s for s in self.ready if s not in busy]:
            self.ready.discard(slot)
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = None
        for ref, slot in list(self.starting.items()):
            del self.starting[ref]
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = None

    def _check_placement(self) -> None:
        """Jobs are queued but no actor is placed: after ``placement_timeout_s`` fail, naming what is missing."""
        if not self.queue or self.ready or not self.starting:
            return
        waited = time.monotonic() - min(self.started_at[s] for s in self.starting.values())
        if waited > self.cfg.placement_timeout_s:
            need = {"CPU": self.cfg.cpus_per_actor, **({"GPU": self.cfg.gpus_per_actor} if self.cfg.gpus_per_actor else {})}
            free = {k: v for k, v in ray.available_resources().items() if k in need}
            total = {k: v for k, v in ray.cluster_resources().items() if k in need}
            raise RuntimeError(
                f"no population actor could be placed for {waited:.0f} s (population.placement_timeout_s="
                f"{self.cfg.placement_timeout_s}): each needs {need}; the cluster has {free} free of {total}. "
                f"{sum(len(u) for u in self.queue)} model job(s) are still queued; completed models are kept in {self.cfg.root}: "
                "add a node or lower population.cpus_per_actor / gpus_per_actor, then re-run")

    def _collect(self, ref: ray.ObjectRef) -> list[dict]:
        slot, unit = self.inflight.pop(ref)
        try:
            rows = ray.get(ref)
        except _ACTOR_LOST as err:
            self._replace_actor(slot, unit, err)
            return []
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, Exception) else err
            if not isinstance(cause, train.MODEL_ERRORS):
                raise RuntimeError(f"model {unit[0].model_id} failed in its population actor: {cause!r}") from err
            rows = [r for job in unit for r in train.failed_rows(job, str(cause))]  # its data or numbers (e.g. NaN)
        failed = {r["model_id"]: r["error"] for r in rows if r["status"] == "failed"}
        if failed:
            self.failed.update(failed)
            self.bar.set_postfix(failed=len(self.failed))
        return rows

    def _replace_actor(self, slot: int, unit: tuple[ModelJob, ...], err: Exception) -> None:
        """Start a fresh actor in ``slot`` and re-queue every unit the dead one held."""
        held = [r for r, (s, _) in self.inflight.items() if s == slot]
        lost = [unit] + [self.inflight.pop(r)[1] for r in held]
        for j in (j for u in lost for j in u):
            self.retries[j.model_id] += 1
            n = self.retries[j.model_id]
            if n > self.max_retries:
                raise RuntimeError(f"model {j.model_id}: lost its population actor {n} time(s) "
                                   f"(max_retries={self.max_retries}); last error: {err}") from err
        ray.kill(self.actors[slot], no_restart=True)
        self.ready.discard(slot)
        self._start_actor(slot)
        self.queue.extendleft(reversed(lost))

    def _flush(self) -> None:
        if self.finished:
            store.upsert_manifest(self.cfg.root, self.finished)
            self.finished = []
        self.last_flush = time.monotonic()


__all__ = ["PopulationWorker", "run_population", "num_actors_for"]
