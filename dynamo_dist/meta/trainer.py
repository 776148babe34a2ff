"""Algorithm 1 (DYNAMO) in one process, plain PyTorch: no Ray, no MLflow.

``PopulationData`` loads the trajectories of a set of base models (a whole population,
or one worker's shard) from a population root; ``DynamoTrainer`` owns the shared
meta-model, the ``ModelEmbeddings`` of those models and their optimisers; ``fit_with_reports``
is the one training loop with validation reports, driven alike by the single-process stage
(``local.py``), a Ray Train worker (``ray_train.py``) and a single-worker Tune trial.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import family as families
from ..config import MetaConfig
from ..data import store
from ..data.cache import TrajectoryCache
from ..data.tasks import Split
from ..zoo import family_of, output_kind_of
from . import checkpoint, model, signature
from .adamw import AdamW
from .metrics import evaluate, summarize
from .objective import REFIT_RIDGE, Chunk, distance_for, dynamo_loss, embedding_penalty, refit_maps

MAX_SIGNATURE = 1024  # outputs a task contributes to a model's signature (a 1024^2 float64 moment: 8 MB)
VAL_FRACTION = 0.1  # tail of the probe split held out for validation metrics (never trained on)


@dataclass
class PopulationData:
    """Inputs + trajectories of ``model_ids`` (probe split for training, test split for metrics).

    ``probe``/``test`` map model_id -> Trajectory: from ``load_population`` they are views of a
    ``TrajectoryCache`` (decoded on demand, in storage precision, under ``meta.cache_bytes``);
    any mapping works (tests pass dicts).
    """

    root: str
    rows: list[dict]                                   # manifest rows of these models
    probe_inputs: dict[str, Split]                     # task -> probe inputs
    probe: Mapping[str, store.Trajectory]              # model_id -> probe trajectory
    test_inputs: dict[str, Split] = field(default_factory=dict)
    test: Mapping[str, store.Trajectory] = field(default_factory=dict)

    @property
    def model_ids(self) -> list[str]:
        return [r["model_id"] for r in self.rows]

    @property
    def family(self) -> str:
        return family_of(self.rows[0]["arch"])

    def row(self, model_id: str) -> dict:
        return next(r for r in self.rows if r["model_id"] == model_id)

    def hidden_shapes(self, model_id: str) -> list[tuple[int, ...]]:
        """Per tap, the per-example shape of the model's states ((H,) RNN, (C,H,W) CNN), from the
        file footer when the probe trajectories come from a cache (nothing decoded)."""
        info = getattr(self.probe, "info", None)
        if info is not None:
            return info(model_id).hidden_shapes
        return families.get(self.family).hidden_shapes(self.probe[model_id].hiddens)

    def num_examples(self, model_id: str) -> int:
        info = getattr(self.probe, "info", None)
        return info(model_id).num_examples if info is not None else self.probe[model_id].num_examples


def check_population(rows: list[dict], root: str) -> None:
    """Reject populations DYNAMO cannot embed together: mixed families or input sizes, models the family's
    meta-model cannot emulate (``Family.check_population``)."""
    if not rows:
        raise ValueError(f"population {root} has no complete models in its manifest")
    kinds = {(r["input_kind"], tuple(r["input_shape"]), r.get("vocab_size")) for r in rows}
    if len(kinds) > 1:
        by = {}
        for r in rows:
            by.setdefault((r["input_kind"], tuple(r["input_shape"]), r.get("vocab_size")), []).append(r["model_id"])
        detail = "; ".join(f"{k[0]} {list(k[1])} vocab={k[2]}: {v[:3]}{'...' if len(v) > 3 else ''}" for k, v in by.items())
        raise ValueError(f"base models have different input sizes (input_kind, input_shape, vocab_size): {detail}")
    fams = {family_of(r["arch"]) for r in rows}
    if len(fams) > 1:
        raise ValueError("base models mix RNNs and ResNets; embed each family in its own meta run")
    families.get(fams.pop()).check_population(rows, root)


def load_population(root: str, model_ids: list[str] | None = None, with_test: bool = True,
                    manifest: list[dict] | None = None, cache_bytes: int | None = None,
                    spill_bytes: int | None = None) -> PopulationData:
    """The listed models (default: every complete model): their inputs now, their trajectories on
    demand through one ``TrajectoryCache`` of ``cache_bytes`` with ``spill_bytes`` of raw copies on
    local disk (footers are read here, no values).

    ``manifest``: the root's complete manifest rows when the caller has read them already.
    """
    all_rows = store.manifest_rows(root) if manifest is None else manifest
    check_population(all_rows, root)
    if model_ids is None:
        rows = all_rows
    else:
        by_id = {r["model_id"]: r for r in all_rows}
        missing = [m for m in model_ids if m not in by_id]
        if missing:
            raise ValueError(f"model ids not complete in the manifest of {root}: {missing}")
        rows = [by_id[m] for m in model_ids]
    tasks = sorted({r["task"] for r in rows})
    ids = [r["model_id"] for r in rows]
    cache = TrajectoryCache(root, cache_bytes, spill_bytes)
    data = PopulationData(root=root, rows=rows, probe_inputs={t: store.read_inputs(root, t, "probe") for t in tasks},
                          probe=cache.view("probe", ids))
    if with_test:
        data.test_inputs = {t: store.read_inputs(root, t, "test") for t in tasks}
        # under a budget the test split streams through (evaluated once per model, never held)
        data.test = cache.view("test", ids, keep=cache_bytes is None)
    for r in rows:
        n_traj, n_in = data.num_examples(r["model_id"]), len(data.probe_inputs[r["task"]])
        if n_traj > n_in:
            raise ValueError(f"trajectory of model {r['model_id']!r} has {n_traj} probe rows but inputs of task "
                             f"{r['task']!r} have {n_in}; the population root is inconsistent")
    return data


def resolve_device(cfg: MetaConfig) -> torch.device:
    """Where this process trains (``meta.device``). A GPU asked for where none is visible fails here,
    before any work: the single-process stage calls this first, Ray workers get theirs from Ray Train."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES, the driver)")
        raise ValueError(f"meta.device='cuda' but torch.cuda.is_available() is False: {why}; run on a machine with "
                         "a CUDA GPU, or set meta.device to 'cpu' or 'auto'")
    return torch.device("cuda")


def cosine_factor(step: int, total: int) -> float:
    """Table 1's 'cosine with freq. 7/32': lr * cos(7 pi step / (16 total))."""
    return math.cos(7.0 * math.pi * step / (16.0 * max(total, 1)))


class DynamoTrainer:
    """Shared meta-model + this process's shard of (theta_n, V_n), trained by Algorithm 1.

    ``all_rows`` are the manifest rows of the whole population (they fix the heads and the
    input encoder, identical on every worker); ``data`` holds only this shard's models.
    ``device``: where the meta-model, theta and V live (default ``resolve_device(cfg)``); data
    stay on the host, each step's batch is moved there once. ``state_dict`` is on the CPU always.
    """

    def __init__(self, cfg: MetaConfig, data: PopulationData, all_rows: list[dict] | None = None, rank: int = 0,
                 device: torch.device | str | None = None):
        all_rows = all_rows or data.rows
        cfg = cfg.for_population(len(all_rows))  # a per-model schedule as steps (resolved already on Ray)
        self.cfg = cfg
        self.data = data
        self.rank = rank
        self.device = resolve_device(cfg) if device is None else torch.device(device)
        self.num_models = len(all_rows)  # the whole population's (the embedding penalty's N)
        base_dims = [model.tap_widths(data.family, data.hidden_shapes(m)) for m in data.model_ids]
        # identical shared init on every worker; each worker's embeddings from its own stream
        # (initialised on the CPU, then moved: the same initial weights on every device)
        meta, embeddings = model.build(all_rows, cfg, data.model_ids, base_dims,
                                       meta_seed=cfg.seed, embeddings_seed=cfg.seed + 1 + rank)
        self.meta, self.embeddings = meta.to(self.device), embeddings.to(self.device)
        self._emb_lr = cfg.embedding_lr or cfg.lr
        self._ids = data.model_ids  # the shard's model ids, in row order (sampled from every step)
        self.forward_module: nn.Module = self.meta  # what the loss calls (a wrapper may stand in)
        # torch.optim.AdamW's update and state format, without its ~2 s import of torch._dynamo (adamw.py)
        self.opt_meta = AdamW(self.meta.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # theta (and V under paper): AdamW without weight decay (theta is the quantity under study),
        # stepped row-sparse by the embeddings themselves (``ModelEmbeddings.adam_step``)
        self._emb_lr_now = self._emb_lr
        # variable projection solves V_n for the L2 distance; under L1 V_n stays learned
        self._maps_ridge = cfg.maps_ridge if cfg.method == "varpro" and cfg.hidden_distance == "l2" else None
        self._output_sizes = model.output_sizes(all_rows)
        self._theta_started = False
        self.step = 0
        self.history: list[dict] = []
        self._train_idx = {t: np.arange(int(len(s) * (1 - VAL_FRACTION)) or len(s))
                           for t, s in data.probe_inputs.items()}
        self._val_idx = {t: np.arange(len(self._train_idx[t]), len(s)) for t, s in data.probe_inputs.items()}
        # validation reads a fixed sample of models (memory and time of a report stay flat in N)
        n = len(data.rows)
        k = n if cfg.val_models is None else min(cfg.val_models, n)
        self.val_rows = sorted(np.random.default_rng([cfg.seed, rank, 7]).choice(n, size=k, replace=False).tolist())

    # ---------------------------------------------------------------- sampling

    def _models_of(self, step: int) -> tuple[np.random.Generator, np.ndarray]:
        """(the step's generator after drawing its models, the sampled rows): deterministic in (seed, rank, step)."""
        rng = np.random.default_rng([self.cfg.seed, self.rank, step])
        k = min(self.cfg.models_per_step, len(self.data.rows))
        return rng, rng.choice(len(self.data.rows), size=k, replace=False)

    def sample(self, step: int) -> list[Chunk]:
        """Draw models and probe sequences for ``step``: deterministic in (seed, rank, step).

        Trajectories stay in storage precision until the batch is cut from them (float32 then).
        The next step's models are prefetched when the probe trajectories come from a cache.
        """
        rng, chosen = self._models_of(step)
        ids = self._ids
        prefetch = getattr(self.data.probe, "prefetch", None)
        if prefetch is not None:
            prefetch([ids[i] for i in sorted(self._models_of(step + 1)[1])])
        chunks = []
        for i in sorted(chosen):
            mid = ids[i]
            row = self.data.rows[i]
            traj = self.data.probe[mid]
            pool = self._train_idx[row["task"]]
            pool = pool[pool < traj.num_examples]
            idx = torch.from_numpy(rng.choice(pool, size=min(self.cfg.batch_size, len(pool)), replace=False))
            inputs = self.data.probe_inputs[row["task"]]
            chunks.append(Chunk(model_id=mid, row=i, group=row["task"], x=inputs.x[idx], lengths=inputs.lengths[idx],
                                hiddens=[h[idx].float() for h in traj.hiddens], outputs=traj.outputs[idx].float(),
                                output_kind=output_kind_of(row)))
        return chunks

    # ---------------------------------------------------------------- theta's start

    def start_theta(self, num_examples: int = 64) -> None:
        """theta_n of this shard's models from their output signatures (``signature.py``) on the first
        ``num_examples`` probe inputs of their task; a collective call when Ray Train runs the
        shards (the population's moments are summed over workers). Called by the first step."""
        self._theta_started = True
        if self.cfg.theta_init_scale == 0:
            return
        # K x C numbers a task: the population's moments are (sum K C)^2, so many classes take fewer
        # examples. From the heads alone: every worker, whatever tasks its shard holds, lays out the same
        # space (a model with fewer probe rows leaves the rest of its block at 0)
        first = {t: min(num_examples, max(4, MAX_SIGNATURE // c)) for t, c in self._output_sizes.items()}
        space = signature.SignatureSpace(self._output_sizes, first)
        sigs = []
        for mid, row in zip(self._ids, self.data.rows):
            outputs = self.data.probe[mid].outputs
            k = min(first[row["task"]], outputs.shape[0], len(self._train_idx[row["task"]]))
            distance = distance_for(output_kind_of(row), self.cfg.output_distance)
            sigs.append(space.place(row["task"], signature.output_signature(outputs[:k], distance)))
        theta = signature.principal_theta(torch.stack(sigs), self.cfg.embedding_dim, self.cfg.theta_init_scale,
                                          self._all_reduce())
        with torch.no_grad():
            self.embeddings.theta_table.copy_(theta.to(self.embeddings.theta_table.device))

    def _all_reduce(self):
        """A sum over the Ray Train workers (None in one process): on the training device (NCCL needs it)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            dist.all_reduce(t)
            return t.cpu()

        return reduce

    # ---------------------------------------------------------------- training

    def _set_lr(self) -> None:
        f = cosine_factor(self.step, self.cfg.steps)
        for g in self.opt_meta.param_groups:
            g["lr"] = self.cfg.lr * f
        self._emb_lr_now = self._emb_lr * f

    def autocast(self):
        """``meta.precision``: bf16 autocast of the forward pass and the loss (parameters stay float32,
        so no loss scaling is needed); float32 enters nothing."""
        if self.cfg.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> dict:
        self.meta.train()
        self._set_lr()
        chunks = [c.to(self.device) for c in self.sample(self.step)]
        if self.step == 0 and self.cfg.method == "varpro" and not self._theta_started:
            self.start_theta()
        with self.autocast():
            loss, stats = dynamo_loss(self.forward_module, self.embeddings, chunks, self.cfg.output_weight,
                                      self.cfg.hidden_distance, self.cfg.output_distance,
                                      maps_ridge=self._maps_ridge, normalize_hidden=self.cfg.method == "varpro",
                                      output_temperature=self.cfg.temperature)
        if self.cfg.embedding_penalty:
            penalty = embedding_penalty(self.meta, self.embeddings.theta_rows([c.row for c in chunks]),
                                        self.cfg.embedding_penalty, self.num_models)
            stats["loss_penalty"] = float(penalty.detach())
            loss = loss + penalty
        self.opt_meta.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_meta.step()
        # only the sampled models' theta/V take part (rows of a sharded embedding table)
        self.embeddings.adam_step([c.row for c in chunks], self._emb_lr_now)
        self.step += 1
        rec = {"step": self.step, "loss": float(loss.detach()), **stats}
        self.history.append(rec)
        return rec

    def fit(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default cfg.steps) total steps, without reports; the history."""
        target = self.cfg.steps if steps is None else steps
        while self.step < target:
            self.train_step()
        return self.history

    @property
    def solves_maps(self) -> bool:
        """Whether V_n is fitted by variable projection (varpro, L2), not stepped by AdamW."""
        return self._maps_ridge is not None

    def refit_maps(self, rho: float = REFIT_RIDGE) -> None:
        """Variable projection's last word: every V_n of this shard solved in closed form on all of its
        model's training probe sequences at once, with the meta-model as it now is (``objective.refit_maps``),
        instead of the last visit's proximal solve on one batch of them."""
        self.meta.eval()
        for i, (mid, row) in enumerate(zip(self._ids, self.data.rows)):
            traj = self.data.probe[mid]
            idx = self._train_idx[row["task"]]
            idx = torch.from_numpy(idx[idx < traj.num_examples])
            inputs = self.data.probe_inputs[row["task"]]
            refit_maps(self.meta, self.embeddings, i, inputs.x[idx], inputs.lengths[idx],
                       [h[idx] for h in traj.hiddens], rho)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The merged checkpoint state (``checkpoint`` module docstring), CPU tensors whatever the device."""
        return {**self.shared_state(), "shard": self.shard_state()}

    def shared_state(self) -> dict:
        """Step, shared weights and their optimiser state, on the CPU."""
        return {"step": self.step, "meta": checkpoint.to_cpu(self.meta.state_dict()),
                "opt_meta": checkpoint.to_cpu(self.opt_meta.state_dict())}

    def shard_state(self, copy: bool = True) -> model.TableStates:
        """This worker's theta/V and their optimiser state, keyed by model_id (re-shardable), on the CPU:
        one copy of the stacked tables (``copy=False``: CPU tables as they are, for a caller that
        writes them before training goes on), read per model as it is read."""
        return model.TableStates(self.embeddings.table_state(copy))

    def load_shard_state(self, per_model: dict) -> None:
        """Load theta/V (+ optimiser moments) for every model of this shard found in ``per_model``."""
        per_model = checkpoint.shard_states(per_model)
        for m, i in self.embeddings.index.items():
            if m not in per_model:
                raise ValueError(f"checkpoint has no theta/V for model {m!r}")
            self.embeddings.load_row_state(i, per_model[m])
            if i % 256 == 255:  # tables on disk: what was written leaves the resident set as it goes
                self.embeddings.page_out(range(i - 255, i + 1))
        self.embeddings.page_out()

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.meta.load_state_dict(state["meta"])
        self.opt_meta.load_state_dict(state["opt_meta"])
        self.load_shard_state(state["shard"])

    def save(self, path: str | Path) -> None:
        """The merged state to ``path``, written from the live tables (tables on disk file to file)."""
        state = {**self.shared_state(), "shard": self.shard_state(copy=False)}
        checkpoint.save_atomic(state, path, self.embeddings.table_files())

    def restore(self, path: str | Path) -> None:
        self.load_state_dict(checkpoint.load(path))

    # ---------------------------------------------------------------- outputs

    def embedding_rows(self) -> list[dict]:
        th = self.embeddings.theta_matrix().cpu().numpy()
        return [{"model_id": m, "theta": th[i].tolist()} for i, m in enumerate(self.embeddings.model_ids)]

    def val_split(self, task: str) -> np.ndarray:
        return self._val_idx[task]


# ---------------------------------------------------------------- the one fit loop


def validation_means(trainer: DynamoTrainer) -> dict[str, float]:
    """``val_agreement``, ``val_hidden_r2``: means over this process's models on held-out probe sequences."""
    return {f"val_{k.removeprefix('mean_')}": v for k, v in summarize(evaluate(trainer, "val")).items()}


def fit_with_reports(trainer: DynamoTrainer, report, *, also_every: int | None = None, after_step=None,
        progress: bool = False) -> None:
    """Train to ``cfg.steps``, calling ``report(records, final)`` at every ``eval_every`` step (and
    every ``also_every`` step, e.g. checkpoints) and at the last; ``records`` are the step records
    since the previous report. A trainer restored at or past the end reports once, final.

    ``report`` decides what a report is: the local stage adds validation metrics to the
    history, a Tune trial calls ``tune.report``, a Ray Train worker all-reduces, checkpoints
    and calls ``ray.train.report``. ``after_step(trainer)`` runs after every step.
    """
    cfg = trainer.cfg
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="meta-model", unit="step")
    if trainer.step >= cfg.steps:
        report([], True)
    pending: list[dict] = []
    while trainer.step < cfg.steps:
        pending.append(trainer.train_step())
        if after_step is not None:
            after_step(trainer)
        if bar is not None:
            bar.update(1)
            if trainer.step % 10 == 0:
                bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
        s = trainer.step
        if s == cfg.steps and trainer.solves_maps:
            trainer.refit_maps()  # before the last report: its checkpoint, outputs and metrics have them
        if s == cfg.steps or s % cfg.eval_every == 0 or (also_every and s % also_every == 0):
            report(pending, s == cfg.steps)
            pending = []
    if bar is not None:
        bar.close()
