"""What a population spec means: its jobs and model ids, its tasks and architectures, and how far a
root has come along it (complete models, pending jobs, the plan). Read by the trainer (``train``),
the repair of a root's manifest (``repair``) and the stage's checks; writes nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import adapters, zoo
from ..config import GroupSpec, PopulationConfig
from ..data import store
from ..data.tasks import TaskData, load_task


@dataclass(frozen=True)
class ModelJob:
    """One base model to train (or, with every_epoch, one training run yielding several models)."""

    model_id: str       # id of the final model (every_epoch: of the last epoch)
    group: GroupSpec
    seed: int

    def member_ids(self) -> list[str]:
        """Population members this job produces."""
        if self.group.every_epoch:
            return [epoch_model_id(self.group.name, self.seed, e)
                    for e in range(self.group.first_recorded_epoch, self.group.epochs + 1)]
        return [self.model_id]


def epoch_model_id(group: str, seed: int, epoch: int) -> str:
    return f"{group}-s{seed:03d}-e{epoch:03d}"


def expand(cfg: PopulationConfig) -> list[ModelJob]:
    """The spec as a list of jobs with stable, readable, unique model ids."""
    jobs = []
    for g in cfg.groups:
        for seed in range(g.seed_offset, g.seed_offset + g.num_seeds):
            mid = epoch_model_id(g.name, seed, g.epochs) if g.every_epoch else f"{g.name}-s{seed:03d}"
            jobs.append(ModelJob(model_id=mid, group=g, seed=seed))
    ids = [m for j in jobs for m in j.member_ids()]
    dup = sorted({m for m in ids if ids.count(m) > 1})
    if dup:
        raise ValueError(f"groups: duplicate model ids {dup[:5]}; give groups distinct names or seed ranges")
    return jobs


def task_for(cfg: PopulationConfig, task: str) -> TaskData:
    return load_task(task, seed=cfg.data_seed, num_examples=cfg.num_examples)


def arch_spec(group: GroupSpec, task: TaskData) -> zoo.ArchSpec:
    if task.output_kind != "classification":  # the zoo's models are trained by cross-entropy
        raise ValueError(f"group {group.name!r}: task {task.name!r} has {task.output_kind} targets; the population "
                         "stage trains classifiers only: train regression models in your own code and bring them "
                         "in with add-models, or give the group your model's factory as arch "
                         "('package.module:function')")
    return zoo.ArchSpec(arch=group.arch, input_kind=task.input_kind, input_shape=tuple(task.input_shape),
                        num_classes=task.num_classes, hidden_size=group.hidden_size, embed_dim=group.embed_dim,
                        vocab_size=task.vocab_size)


def build_member(group: GroupSpec, task: TaskData) -> torch.nn.Module:
    """A fresh, untrained model of ``group``: the zoo's for a zoo arch, else what the user's factory returns
    (``group.arch`` an import path, called with ``group.kwargs``), to be trained with its own ``forward``."""
    if group.factory is None:
        return zoo.build(arch_spec(group, task))
    return adapters.build_from_factory(group.factory, group.kwargs, field=f"group {group.name!r}: arch")


def as_member(group: GroupSpec, task: TaskData, model: torch.nn.Module, what: str) -> torch.nn.Module:
    """A trained model of ``group`` as a base model to record: a zoo model as it is; a user's module read
    through hooks (``adapters.hooked``: ``group.hidden``/``readout``, checked on the task), its factory stored
    with it so that ``adapters.load`` rebuilds it. ValueError naming ``what`` (the model) when it does not fit."""
    if group.factory is None:
        return model
    return adapters.hooked(model, task, hidden=list(group.hidden) if group.hidden else None, readout=group.readout,
                           factory=group.factory, kwargs=group.kwargs, what=what)


def check_factories(cfg: PopulationConfig) -> None:
    """Every factory group's model, built once and run through its hooks on the task's first probe examples
    (``as_member``) before any work: a factory that cannot be imported or fails, hooks that capture nothing,
    outputs of the wrong width are ValueErrors naming the group; nothing is written."""
    for g in cfg.groups:
        if g.factory is not None:
            task = task_for(cfg, g.task)
            torch.manual_seed(0)
            as_member(g, task, build_member(g, task), f"group {g.name!r} (its factory's untrained model)")


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum(int((model(x[s:s + batch_size].to(device)).argmax(-1).cpu() == y[s:s + batch_size]).sum())
                  for s in range(0, len(y), batch_size))
    return correct / max(len(y), 1)


ROW_KEY = "dynamo.manifest_row"  # weights-file metadata holding the model's manifest row


def completed_ids(root: str, damaged: dict[str, str] | None = None) -> set[str]:
    """Models whose manifest row is complete and whose files pass ``store.damage`` (resume skips them).

    ``damaged``: filled with model_id -> what is wrong, for complete rows whose files do not pass.
    Files are checked by parallel threads (opens dominate on network filesystems).
    """
    layout = store.Layout.at(root)
    if not layout.manifest.exists():
        return set()
    rows = store.manifest_rows(root)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda r: store.damage(root, r), rows))
    if damaged is not None:
        damaged.update({r["model_id"]: p for r, p in zip(rows, problems) if p})
    return {r["model_id"] for r, p in zip(rows, problems) if not p}


def pending_jobs(root: str, cfg: PopulationConfig, report: bool = False) -> list[ModelJob]:
    """Jobs of ``cfg`` with a member not complete in ``root``; ``report`` prints a line per damaged model."""
    damaged: dict[str, str] = {}
    done = completed_ids(root, damaged)
    jobs = [j for j in expand(cfg) if not set(j.member_ids()) <= done]
    if report:
        wanted = {m for j in jobs for m in j.member_ids()}
        for mid, problem in sorted(damaged.items()):
            print(f"model {mid}: {problem}; " + ("retraining it" if mid in wanted else
                                                 "not in this spec, left as it is"), flush=True)
    return jobs


def plan(cfg: PopulationConfig) -> list[dict]:
    """Per group: models the spec expands to, how many are complete or failed in the root, how
    many a run would train. Reads the manifest only; writes nothing."""
    done = completed_ids(cfg.root)
    layout = store.Layout.at(cfg.root)
    failed = ({r["model_id"] for r in store.manifest_rows(cfg.root, status="failed")}
              if layout.manifest.exists() else set())
    jobs = expand(cfg)
    out = []
    for g in cfg.groups:
        ids = [m for j in jobs if j.group.name == g.name for m in j.member_ids()]
        out.append({"group": g.name, "models": len(ids), "complete": sum(m in done for m in ids),
                    "failed": sum(m in failed for m in ids), "to_train": sum(m not in done for m in ids)})
    return out


def check_spec(cfg: PopulationConfig) -> None:
    """What can be checked about ``cfg`` against its root before any work, writing nothing:
    unique ids, the root's schema version and recording settings, users' factories."""
    expand(cfg)
    check_factories(cfg)
    store.check_recording(cfg.root, cfg.model_dump(mode="json"))
