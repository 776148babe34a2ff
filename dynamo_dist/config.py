"""Typed, validated configuration: the one place that turns YAML/dicts into objects.

Every component has one config class; every field has a default and a one-line
description. Validation errors are ``ValueError`` (pydantic's ``ValidationError``
subclasses it) and name the field and the bad value. Named recipes (``smoke``,
``demo``, ``paper``) derive from the defaults instead of repeating them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .data.fsio import URI_SCHEMES  # the schemes a path field may have (fsio owns them)

SEQUENCE_ARCHS = ("gru", "rnn", "lstm")
RESNET_ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
ARCHS = SEQUENCE_ARCHS + RESNET_ARCHS
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:function


def check_location(v: str) -> str:
    """A path field: a local path or a URI with a supported scheme (``fsio.URI_SCHEMES``; checked without network)."""
    scheme, sep, rest = v.partition("://")
    if sep and scheme != "file":
        if scheme not in URI_SCHEMES:
            raise ValueError(f"{v!r}: dynamo_dist cannot store files at a {scheme}:// URI; give a local path or a "
                             f"URI with one of the supported schemes {', '.join(s + '://' for s in URI_SCHEMES)}")
        if not rest.split("/", 1)[0]:
            raise ValueError(f"{v!r}: no bucket or host after {scheme}://")
    return v


def ray_job_working_dir() -> str | None:
    """The working directory when this process is a ``ray job submit --working-dir`` entrypoint (Ray's
    per-job copy, on the head node only), else None."""
    cwd = os.getcwd()
    return cwd if "/runtime_resources/working_dir_files/" in cwd else None


def check_cluster_paths(cfg: "PipelineConfig") -> None:
    """Refuse relative paths in a Ray job's copy of the working dir: they would resolve inside that copy,
    which exists on the head node only and is deleted with the job, so actors on other nodes would write
    to their own copies. Named per field, before any work."""
    job_dir = ray_job_working_dir()
    if job_dir is None:
        return
    fields = {"run_dir": cfg.run_dir, "population.root": cfg.population.root, "meta.output_dir": cfg.meta.output_dir}
    relative = [f"{k}={v!r}" for k, v in fields.items() if "://" not in v and not os.path.isabs(os.path.expanduser(v))]
    if relative:
        raise ValueError(f"{', '.join(relative)} relative, and this job runs in Ray's copy of its working directory "
                         f"({job_dir}), which only the head node has and Ray deletes with the job: give an absolute "
                         "path every node mounts or a bucket URI, e.g. --set run_dir=s3://bucket/runs/demo")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        # pydantic's lax mode reads True as 1: ``num_seeds: yes`` would train one model
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError(f"expected a number or name, got the boolean {v} (YAML reads yes/no/on/off/true/false "
                             "as booleans)")
        return v

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied (pydantic's model_copy skips validation).

        Fields left at their defaults stay unset in the copy, so checks of what the user set
        (``MetaConfig``'s steps vs updates_per_model) see the same thing."""
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **changes})


class GroupSpec(_Config):
    """One group of base models in a population: same recipe, different seeds."""

    name: str = Field("gru", description="group label; prefix of every model_id in the group")
    task: str = Field("mnist1d", description="task name from dynamo_dist.data.TASKS, or csv:/parquet: path")
    arch: str = Field("gru", description="base architecture: gru | rnn | lstm | resnet10/18/34/50, or the import "
                      "path 'package.module:function' of your own model's factory (called with kwargs)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="factory arch: its keyword arguments")
    hidden: tuple[str, ...] | None = Field(None, description="factory arch: submodules whose states are the hidden "
                                           "state (None: every nn.GRU/LSTM/RNN, or a CNN's stages)")
    readout: str | None = Field(None, description="factory arch: the submodule mapping the last hidden states to "
                                "outputs when forward returns the last step only (None: the last fitting nn.Linear)")
    hidden_size: int = Field(64, ge=1, description="RNN hidden units (ignored by ResNets)")
    embed_dim: int = Field(64, ge=1, description="token embedding width for token inputs")
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the base-training pool this group sees")
    num_seeds: int = Field(4, ge=1, description="models in the group (one per seed)")
    seed_offset: int = Field(0, ge=0, description="first seed; seeds are seed_offset .. seed_offset+num_seeds-1")
    epochs: int = Field(20, ge=1, description="training epochs per model")
    batch_size: int = Field(128, ge=1, description="minibatch size")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(5e-4, ge=0.0, description="AdamW weight decay")
    every_epoch: bool = Field(False, description="each epoch's checkpoint becomes its own population member")
    first_recorded_epoch: int = Field(1, ge=1, description="every_epoch: the first epoch that becomes a member "
                                      "(earlier epochs are trained, not recorded; e.g. skip the chance-level start)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from .data.tasks import TASKS, USER_PREFIXES  # noqa: PLC0415 -- the registry lives with the loaders

        if v not in TASKS and not v.startswith(USER_PREFIXES):
            raise ValueError(f"unknown task {v!r}; known tasks: {', '.join(TASKS)}, or csv:/path/file.csv / "
                             "parquet:/path/file.parquet")
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHS and not _FACTORY_RE.match(v):
            raise ValueError(f"arch {v!r} is neither a zoo architecture ({' | '.join(ARCHS)}) nor an import path "
                             "'package.module:function' of a model factory")
        return v

    def __hash__(self) -> int:  # frozen, but kwargs is a dict: hash the values as JSON
        return hash(self.model_dump_json())

    @property
    def factory(self) -> str | None:
        """The import path of the user's model factory, when ``arch`` is one (else None: a zoo architecture)."""
        return None if self.arch in ARCHS else self.arch

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(f"group name {v!r} must match {_ID_RE.pattern} (it becomes part of file names)")
        return v

    @model_validator(mode="after")
    def _recorded_epochs(self):
        if self.factory is None:
            given = [f for f in ("kwargs", "hidden", "readout") if getattr(self, f)]
            if given:
                raise ValueError(f"group {self.name!r}: {given} describe a factory arch ('package.module:function'); "
                                 f"arch {self.arch!r} is a zoo architecture")
        if self.first_recorded_epoch > 1 and not self.every_epoch:
            raise ValueError(f"first_recorded_epoch={self.first_recorded_epoch} needs every_epoch: true (without it "
                             "only the last epoch is recorded)")
        if self.first_recorded_epoch > self.epochs:
            raise ValueError(f"first_recorded_epoch={self.first_recorded_epoch} is after the last epoch "
                             f"(epochs={self.epochs})")
        return self


class PopulationConfig(_Config):
    """Stage 1+2: train base models and record their trajectories."""

    root: str = Field("runs/demo/population",
                      description="population root: a local directory, a filesystem every node mounts, or an "
                                  "object-store URI (s3://bucket/prefix, gs://..., hdfs://...)")
    groups: tuple[GroupSpec, ...] = Field((GroupSpec(),), description="model groups; expanded to one model per seed")
    data_seed: int = Field(0, ge=0, description="seed of the data pool shuffle and probe/base split")
    num_examples: int | None = Field(None, ge=100, description="dataset size override (generated/subsampled), None = task default")
    num_probe: int | None = Field(None, ge=1, description="probe sequences recorded per model (None = whole probe split)")
    num_test: int | None = Field(500, ge=1, description="test sequences recorded per model for emulation metrics (None = all)")
    dtype: Literal["float32", "float16"] = Field("float32", description="storage precision of trajectories")
    num_actors: int | None = Field(None, ge=1, description="Ray actors training models (None = one per available CPU)")
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs each population actor holds")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPU fraction each population actor holds")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where base models train: auto = cuda when the "
                                                  "process sees a GPU (Ray actors do with gpus_per_actor > 0), else cpu")
    models_per_actor: int = Field(1, ge=1, description="K: base models one actor call trains together, stacked "
                                  "(one batched recurrence; GRU/RNN/LSTM groups of one task, arch, hidden_size, "
                                  "embed_dim, batch_size and epochs; ResNets train alone). Pays most on a GPU")
    placement_timeout_s: float = Field(600.0, gt=0.0, description="seconds jobs may wait with no population actor "
                                       "placed (e.g. after a node died) before the stage fails naming the resources")
    max_failed_models: int = Field(0, ge=0, description="models that may fail (e.g. diverge to NaN) without failing "
                                   "the stage; they are recorded with status 'failed' and left out of later stages")

    @field_validator("root")
    @classmethod
    def _root_location(cls, v: str) -> str:
        return check_location(v)

    @model_validator(mode="after")
    def _unique_groups(self):
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"groups: duplicate group name(s) {dup}; model ids would collide")
        if not self.groups:
            raise ValueError("groups: at least one group is required")
        return self


# varpro's output temperature: on the demo population (8 models a step, 750 steps, one process) test agreement
# 0.902 at T = 0.25 against 0.886 at T = 1 and 0.890 at T = 0.5; 0.869 / 0.870 at 500 steps for seeds 0 / 1
# (T = 1: 0.849), T = 0.1 no better (docs/meta-recipe.md)
VARPRO_TEMPERATURE = 0.25


class MetaConfig(_Config):
    """Stage 3: the DYNAMO meta-model (Algorithm 1)."""

    output_dir: str = Field("runs/demo/meta", description="where checkpoints, embeddings.parquet and metrics go "
                            "(a local directory or an object-store URI)")
    embedding_dim: int = Field(16, ge=1, description="dimension d of the model embeddings theta_n")
    hidden_size: int = Field(128, ge=1, description="meta-model GRU hidden size (RNN populations)")
    embed_dim: int = Field(64, ge=1, description="meta-model token embedding width (token inputs)")
    resnet_arch: Literal[RESNET_ARCHS] = Field("resnet10", description="meta-model ResNet depth for CNN populations")
    method: Literal["varpro", "paper"] = Field(
        "varpro", description="how theta_n and V_n are fitted. varpro: V_n solved in closed form (ridge) on each "
        "visit (variable projection; hidden_distance l2, else V_n by AdamW), theta_n started at the models' output "
        "signatures (their top-d principal components), each model's hidden loss divided by its states' variance, "
        "and (RNNs) the output heads read the meta states FiLM-modulated by theta. "
        "paper: Algorithm 1 as published (theta_n = 0, V_n by AdamW, plain L_hidden)")
    maps_ridge: float = Field(0.1, gt=0.0, description="varpro: ridge of each V_n solve, relative to the mean "
                              "eigenvalue of the batch's meta states (also how far a solve may move from the "
                              "last visit's V_n)")
    theta_init_scale: float = Field(1.0, ge=0.0, description="varpro: root-mean-square ||theta_n|| of the "
                                    "signature start (0 = start at 0)")
    output_weight: float = Field(1.0, ge=0.0, description="lambda, weight of the output loss (eq. 4)")
    hidden_distance: Literal["l2", "l1"] = Field("l2", description="hidden-state distance: squared L2 (eq. 2) or L1")
    output_distance: Literal["kl", "mse"] = Field("kl", description="output distance: KL(base||meta) or MSE of outputs")
    theta_gain: bool = Field(
        False, description="RNN meta-models: theta also scales the GRU's hidden-to-hidden product, "
        "(W_hh h + b_hh) * (1 + U theta) with U (3 x hidden_size x embedding_dim) starting at 0 (the paper's meta GRU "
        "takes theta as an input only). On the demo population +0.006-0.008 test agreement in 6 of 6 seed "
        "pairs (the demo recipe sets it); not measured on other populations yet, so off unless asked for "
        "(docs/meta-recipe.md)")
    output_temperature: float | None = Field(
        None, gt=0.0, description="temperature T of the KL output distance, KL(softmax(base/T) || softmax(meta/T)): "
        "below 1 both sharpen, so the loss weighs each model's decision (its top classes) over the tails. "
        "None = the method's: 0.25 under varpro, 1 (eq. 1 as written) under paper")
    steps: int = Field(2000, ge=1, description="optimisation steps tau_max (or set updates_per_model)")
    updates_per_model: int | None = Field(None, ge=1, description="average updates of each model's theta/V: "
                                          "steps = updates_per_model x N / (models_per_step x num_workers)")
    batch_size: int = Field(64, ge=1, description="probe sequences per sampled model per step")
    models_per_step: int = Field(4, ge=1, description="base models sampled per step (per worker)")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate (meta-model, theta and V)")
    embedding_lr: float | None = Field(None, gt=0.0, description="AdamW learning rate of theta_n and V_n (None = lr)")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay of the shared meta-model")
    embedding_penalty: float = Field(0.0, ge=0.0, description="alpha of a low-rank prior on theta: adds "
                                     "alpha/2 (||theta_n||^2 + ||W_theta||^2 / N) per sampled model, W_theta the "
                                     "meta-model weights that multiply theta (a nuclear-norm penalty on W_theta "
                                     "Theta); 0 = none")
    seed: int = Field(0, ge=0, description="seed of initialisation and sampling")
    seeds: tuple[int, ...] | None = Field(None, description="meta seeds that `dynamo-dist seeds` trains (one run "
                                          "each) and compares for theta-space stability when --seeds is not given; "
                                          "at least 2, distinct; None = give --seeds")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (theta/V shards)")
    min_workers: int | None = Field(None, ge=1, description="elastic training: keep going with as few as this many "
                                    "workers when nodes die (theta/V re-sharded from the last checkpoint), growing "
                                    "back to num_workers when they return; None = always num_workers")
    resize_check_s: float = Field(60.0, gt=0.0, description="elastic training: seconds between checks for room to "
                                  "grow back to num_workers")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts after a worker dies")
    placement_timeout_s: float = Field(600.0, gt=0.0, description="seconds Ray Train may wait for its workers to be "
                                       "placed (e.g. after a node died) before the stage fails naming the resources")
    eval_every: int = Field(250, ge=1, description="steps between validation metrics on held-out probe sequences")
    val_models: int | None = Field(64, ge=1, description="models per worker whose held-out probe sequences give the "
                                   "val_* metrics of each report (a fixed sample; None = every model)")
    cache_bytes: int | None = Field(2 * 1024 ** 3, ge=1, description="decoded trajectory bytes each meta worker "
                                    "keeps in memory (LRU, read on demand); None = keep every trajectory read")
    spill_bytes: int | None = Field(None, ge=0, description="raw copies of decoded trajectories each meta worker "
                                    "keeps on local disk (one unlinked file of the temp dir, gone with the worker): a model evicted "
                                    "from the cache_bytes LRU and sampled again is read back, not decoded from "
                                    "Parquet again; for populations larger than cache_bytes; None/0 = none")
    table_bytes: int | None = Field(4 * 1024 ** 3, ge=0, description="bytes of V tables (every model's maps and "
                                    "their two AdamW moments) each meta worker keeps in memory; a shard whose "
                                    "tables are larger keeps them in memory-mapped files on local disk (the temp "
                                    "dir, gone with the worker) that the OS pages, a step's rows resident while "
                                    "it updates them: CNN populations of thousands of models (~4 MB each) fit; "
                                    "on a GPU the tables are in its memory whatever this is; None = always in memory")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where the meta-model trains; auto = cuda "
                                                   "when each worker/process sees a GPU; on Ray, cuda makes Ray Train "
                                                   "give each worker one GPU (and NCCL)")
    precision: Literal["float32", "bf16"] = Field("float32", description="bf16 = bfloat16 autocast of the forward "
                                                  "pass and loss (cuda, or cpu); weights, theta/V and optimiser "
                                                  "state stay float32")

    @field_validator("output_dir")
    @classmethod
    def _output_location(cls, v: str) -> str:
        return check_location(v)

    @property
    def temperature(self) -> float:
        """``output_temperature`` resolved: the method's when unset."""
        if self.output_temperature is not None:
            return self.output_temperature
        return VARPRO_TEMPERATURE if self.method == "varpro" else 1.0

    @field_validator("seeds")
    @classmethod
    def _seed_set(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (len(set(v)) < 2 or len(set(v)) < len(v) or min(v) < 0):
            raise ValueError(f"meta.seeds={list(v)}: need at least 2 distinct non-negative seeds to compare")
        return v

    @model_validator(mode="after")
    def _elastic_range(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"meta.min_workers={self.min_workers} exceeds meta.num_workers={self.num_workers}: "
                             "workers range from min_workers to num_workers")
        return self

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.updates_per_model is not None and "steps" in self.model_fields_set:
            raise ValueError(f"meta.updates_per_model ({self.updates_per_model}) and meta.steps ({self.steps}) are "
                             "both set: the schedule is one or the other")
        return self

    @model_serializer(mode="wrap")
    def _dump_one_schedule(self, handler):
        """A per-model schedule is dumped without the ``steps`` default it overrides, so a written
        config (``dynamo-dist recipes``, a run's config file) loads back."""
        data = handler(self)
        if self.updates_per_model is not None:
            data.pop("steps", None)
        return data

    def replace(self, **changes: Any) -> MetaConfig:
        """``_Config.replace``, where a new schedule (``steps`` or ``updates_per_model``) replaces the
        other one instead of conflicting with it."""
        data = _drop_replaced_schedule(self.model_dump(exclude_unset=True), changes)
        return type(self).model_validate({**data, **changes})

    def for_population(self, num_models: int, resumed: dict | None = None) -> MetaConfig:
        """This config with ``steps`` derived from ``updates_per_model`` for ``num_models`` models
        (itself when no per-model schedule is set).

        ``resumed``: the config of the checkpoint a re-run resumes (``steps`` resolved). When its step
        count is this schedule's under that run's worker count and models a step, it is kept, so a
        resume with another ``num_workers`` finishes the schedule it started (cosine decay included)
        instead of stretching or cutting it."""
        if self.updates_per_model is None:
            return self
        def steps_at(workers: int, per_worker: int) -> int:
            return math.ceil(self.updates_per_model * num_models / _models_a_step(num_models, workers, per_worker))

        steps = steps_at(self.num_workers, self.models_per_step)
        old_w, old_m = (resumed or {}).get("num_workers"), (resumed or {}).get("models_per_step")
        if isinstance(old_w, int) and isinstance(old_m, int) and resumed.get("steps") == steps_at(old_w, old_m):
            steps = resumed["steps"]
        return self.replace(updates_per_model=None, steps=steps)

    def updates_a_model(self, num_models: int) -> float:
        """The average updates of each model's theta/V this schedule gives ``num_models`` models."""
        if self.updates_per_model is not None:
            return float(self.updates_per_model)
        return self.steps * _models_a_step(num_models, self.num_workers, self.models_per_step) / num_models


def _models_a_step(num_models: int, num_workers: int, models_per_step: int) -> int:
    """Models sampled a step across the workers (each samples from its own shard of the N)."""
    return min(models_per_step, math.ceil(num_models / num_workers)) * num_workers


class TrackingConfig(_Config):
    """Where every stage of a run logs to MLflow: one store and one experiment per pipeline."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (http://host:port for a server); "
                                     "None = $MLFLOW_TRACKING_URI, else a SQLite store <run_dir>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment name; None = the run directory's name "
                                   "(run_dir runs/demo logs to experiment demo), so runs of different directories "
                                   "sharing a tracking server stay apart")
    system_metrics: bool = Field(True, description="log MLflow system metrics (CPU, memory, disk, network; GPU "
                                 "with pynvml) into every stage's run while it runs")
    system_metrics_interval_s: float = Field(10.0, gt=0.0, description="seconds between system-metric samples "
                                             "($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)")


class SweepConfig(_Config):
    """Stage 4: Ray Tune over lambda, d and the hidden distance."""

    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of the lists below, num_samples times; random: num_samples "
        "trials drawn from them (seeded by meta.seed); optuna: num_samples trials proposed by Optuna's TPE from "
        "the trials finished so far (needs the optuna package)")
    output_weight: tuple[float, ...] = Field((0.0, 1.0), description="lambda values (grid, or choices)")
    output_weight_range: tuple[float, float] | None = Field(
        None, description="random/optuna: lambda drawn log-uniform in [low, high] (0 < low < high) instead of "
        "from output_weight")
    embedding_dim: tuple[int, ...] = Field((2, 8, 16), description="embedding dimensions d (grid, or choices)")
    hidden_distance: tuple[Literal["l2", "l1"], ...] = Field(("l2",), description="hidden distances (grid, or "
                                                              "choices)")
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: number of trials")
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="ASHA stops weak trials early on sweep.metric")
    metric: str | None = Field(None, description="validation metric trials are ranked by (None: by the population's "
                               "outputs, val_agreement with classifiers in it, else val_output_r2)")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers per trial")

    @field_validator("output_weight")
    @classmethod
    def _lambda_nonneg(cls, v):
        bad = [x for x in v if x < 0]
        if bad:
            raise ValueError(f"lambda values must be >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _nonempty(self):
        for name in ("output_weight", "embedding_dim", "hidden_distance"):
            if len(getattr(self, name)) == 0:
                raise ValueError(f"sweep.{name}: empty search space")
        if any(d < 1 for d in self.embedding_dim):
            raise ValueError(f"sweep.embedding_dim: values must be >= 1, got {list(self.embedding_dim)}")
        if self.output_weight_range is not None:
            low, high = self.output_weight_range
            if self.search == "grid":
                raise ValueError("sweep.output_weight_range is drawn from by search 'random' or 'optuna'; a grid "
                                 "takes the values of sweep.output_weight (set sweep.search)")
            if not 0 < low < high:
                raise ValueError(f"sweep.output_weight_range: need 0 < low < high for a log-uniform draw, got "
                                 f"{list(self.output_weight_range)}")
        return self


class AnalyzeConfig(_Config):
    """Stage 5: analyses of a meta run."""

    color_by: str = Field("group", description="manifest column of the model groups: colours the plots, and is "
                                               "the grouping that silhouettes, k-means ARI and 1-NN accuracy score")
    baseline: bool = Field(True, description="compute the SVCCA/CKA + MDS baseline")
    baseline_models: int | None = Field(200, ge=3, description="models compared pairwise (SVCCA, CKA, raw weights) "
                                        "and in the method comparison: a sample stratified by color_by; null = "
                                        "all (the pairwise cost grows as N^2)")
    baseline_rows: int | None = Field(2048, ge=10, description="activation rows per model compared by SVCCA/CKA, "
                                      "the same random ones for every model: (probe example, valid step) pairs "
                                      "of RNNs, probe examples of CNNs; null = all (memory: models x rows x H)")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples of the models (within each color_by "
                                                  "group) behind the method comparison's 95% intervals; 0 = none")
    landscape_grid: int = Field(9, ge=2, description="grid points per axis of the theta landscape")
    ssl_fraction: float = Field(0.01, gt=0.0, le=1.0, description="labelled fraction of the training pool for semi-supervised theta")
    fixed_points: bool = Field(True, description="run the fixed-point analysis (RNN meta-models)")
    fixed_point_states: int = Field(128, ge=1, description="candidate hidden states per fixed-point search")
    fixed_point_iters: int = Field(200, ge=1, description="L-BFGS iterations per fixed-point search")
    fixed_point_path_steps: int = Field(11, ge=0, description="grid steps of the fixed-point continuation between "
                                        "the two group centroids farthest apart (2 or more; 0 = none)")
    ssl_steps: int = Field(100, ge=1, description="optimiser iterates of semi-supervised theta (paper: 100)")
    seed: int = Field(0, ge=0, description="random_state of the analyses")

    @field_validator("fixed_point_path_steps")
    @classmethod
    def _path_steps(cls, v: int) -> int:
        if v == 1:
            raise ValueError("fixed_point_path_steps: a path needs 2 or more steps (0 disables it), got 1")
        return v


_MOVED_META_FIELDS = {"population_root": "population.root", "tracking_uri": "tracking.tracking_uri",
                      "experiment": "tracking.experiment"}


class PipelineConfig(_Config):
    """A whole run: population -> meta -> (sweep) -> analyze."""

    run_dir: str = Field("runs/demo", description="root of everything this run writes: a local directory or an "
                         "object-store URI (s3://bucket/prefix; then tracking.tracking_uri must name an MLflow server)")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow store and experiment of every stage")
    population: PopulationConfig = Field(PopulationConfig(), description="population stage")
    meta: MetaConfig = Field(MetaConfig(), description="meta-model stage")
    sweep: SweepConfig | None = Field(None, description="optional sweep stage")
    analyze: AnalyzeConfig = Field(AnalyzeConfig(), description="analysis stage")

    @field_validator("run_dir")
    @classmethod
    def _run_dir_location(cls, v: str) -> str:
        return check_location(v)

    @model_validator(mode="before")
    @classmethod
    def _paths_from_run_dir(cls, data):
        """Stage paths default to <run_dir>/population and <run_dir>/meta: users set one directory."""
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("population"), BaseModel) or isinstance(data.get("meta"), BaseModel):
            return data
        run_dir = data.get("run_dir", "runs/demo")
        pop = dict(data.get("population") or {})
        meta = dict(data.get("meta") or {})
        moved = [f"meta.{k} is now {new}" for k, new in _MOVED_META_FIELDS.items() if k in meta]
        if moved:
            raise ValueError("; ".join(moved) + " (one field for what every stage shares)")
        pop.setdefault("root", f"{run_dir}/population")
        meta.setdefault("output_dir", f"{run_dir}/meta")
        return {**data, "population": pop, "meta": meta}


def _demo() -> dict:
    # Measured on this 2-core machine (benchmarks/core_demo.py, README): lr 1e-2 / batch 64 / 30 epochs
    # gives MNIST-1D GRUs ~92% (100% of the pool) and ~47% (25%) test accuracy, ~5 s per model.
    gru = dict(task="mnist1d", arch="gru", hidden_size=32, num_seeds=6, epochs=30, lr=1e-2, batch_size=64)
    return {
        "run_dir": "runs/demo",
        "population": {"groups": [{**gru, "name": "gru-full", "train_fraction": 1.0},
                                  {**gru, "name": "gru-quarter", "train_fraction": 0.25}],
                       "num_probe": 1000},
        # lambda 10 and a faster theta learning rate: the output term and theta need the push for the
        # meta-model to match low-confidence (25%-data) models' decisions, not just their states.
        # varpro (V solved, theta from signatures) takes lr 2e-2 (600 steps: agreement 0.70 / 0.78 / 0.80 / 0.76
        # at lr 3e-3 / 1e-2 / 2e-2 / 3e-2) and meta hidden 128 (0.903 vs 0.889 at hidden 96 after 1,200
        # single-process steps of 8 models). With the output temperature 0.25 and the final V solve, 900 steps
        # at W=2 gave test agreement 0.907 (1,500: 0.915), where the paper's recipe (hidden 96, lr 3e-3) took
        # 6,000 steps for 0.900 (docs/meta-recipe.md, benchmarks/RESULTS.md rows 42 and 52). theta's gain on
        # the recurrence: +0.006-0.008 agreement in 6 of 6 seed pairs here (rows 58-59). Every model of a
        # worker's shard each step with 21 sequences each (6 x 21, not 4 x 32): 0.898 vs 0.8945 over 3 seeds of
        # 600 single-process steps (row 63). The stage averages the shared gradients in one all-reduce (row 64).
        # theta's learning rate 1e-2, not 2e-2: the same agreement (3 populations x 3 seeds: 0.898 / 0.888 /
        # 0.886 vs 0.899 / 0.887 / 0.891) and a cleaner theta-space (silhouette 0.39 / 0.55 / 0.49 vs
        # 0.34 / 0.47 / 0.45, rows 74-75); at W=2 seeds 0 / 1 / 2 gave 0.906 / 0.907 / 0.907 in 77-83 s
        # meta stages (row 76). theta's signature start at RMS norm 2 (default 1): demo silhouette 0.47 vs 0.39 at
        # the same agreement (0.898, 3 single-process seeds, row 77); at W=2 the demo's seeds 0 / 1 / 2 gave
        # 0.907 / 0.903 / 0.901, and lr-conditions at 700 updates a model met every structure goal (row 78).
        # Then d = 6, the start at RMS norm 3 and theta's learning rate 1.5e-2: single-process demo silhouette
        # 0.53 (the start at 3 alone: 0.51 at agreement 0.893; 1.5e-2 gives agreement back at d = 8, row 80);
        # at W=2 the demo's seeds gave 0.901 / 0.903 / 0.903, silhouette 0.51-0.52 (CKA-MDS 0.49) and 5 of
        # 6 components in 66-77 s stages, every structure goal (row 81).
        # The schedule counts updates a model, not steps: 700 steps of all 12 models here, and as many
        # updates of each model for a population of any size (18 models: 1,050 steps, row 78).
        "meta": {"updates_per_model": 700, "theta_gain": True, "hidden_size": 128, "embedding_dim": 6,
                 "models_per_step": 6, "batch_size": 21, "lr": 2e-2, "embedding_lr": 1.5e-2, "theta_init_scale": 3.0,
                 "output_weight": 10.0, "num_workers": 2,
                 "eval_every": 250, "checkpoint_every": 500},
        # the fixed-point search dominates analysis time (163 s of 256 s at 128 states x 200 iterations)
        "analyze": {"fixed_point_states": 48, "fixed_point_iters": 100},
    }


def _smoke() -> dict:
    gru = dict(task="mnist1d", arch="gru", hidden_size=16, num_seeds=2, epochs=2, lr=1e-2, batch_size=64)
    return {
        "run_dir": "runs/smoke",
        "population": {"groups": [{**gru, "name": "a", "train_fraction": 1.0},
                                  {**gru, "name": "b", "train_fraction": 0.25}],
                       "num_probe": 128, "num_test": 64, "num_examples": 1000},
        "meta": {"steps": 30, "hidden_size": 32, "embedding_dim": 2, "batch_size": 16, "models_per_step": 2,
                 "checkpoint_every": 10, "eval_every": 10},
        "analyze": {"landscape_grid": 3},
    }


def _paper() -> dict:
    # Table 1 of the paper: base GRUs hidden 256, 20 epochs; meta hidden 512, d=16.
    return {
        "run_dir": "runs/paper",
        "population": {"groups": [{"name": f"gru-{int(f * 100)}", "task": "mnist1d", "arch": "gru",
                                   "hidden_size": 256, "train_fraction": f, "num_seeds": 32, "epochs": 20}
                                  for f in (1.0, 0.5, 0.25)]},
        "meta": {"hidden_size": 512, "embedding_dim": 16, "steps": 20000, "batch_size": 128, "num_workers": 2},
    }


RECIPES = {"demo": _demo, "smoke": _smoke, "paper": _paper}


def recipe_data(name: str) -> dict:
    """A named recipe as plain data (stage paths derive from run_dir unless set)."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]()


def recipe(name: str) -> PipelineConfig:
    """A named recipe: ``demo`` (12 MNIST-1D GRUs, minutes), ``smoke`` (CI seconds), ``paper`` (cluster scale)."""
    return parse(PipelineConfig, recipe_data(name), source=f"recipe {name}")


def _format_validation_error(err: ValidationError, source: str, overrides: dict[str, Any] | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        bad = e.get("input")
        # a field an override set (or lies under) is blamed on the override, not on the file
        by = [k for k in overrides or {} if field == k or field.startswith(k + ".")]
        where = f"{field} (from --set {by[0]}={overrides[by[0]]!r})" if by else field
        lines.append(f"  {where}: {e['msg']} (got {bad!r})" if not isinstance(bad, dict) else f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse(cls: type[_Config], data: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None):
    """Validate ``data`` into ``cls``; raise ValueError naming every bad field (and the
    ``overrides`` that set it)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_validation_error(err, source, overrides)) from None


def load(path: str | Path, cls: type[_Config] = PipelineConfig, overrides: dict[str, Any] | None = None):
    """Load a YAML config file. A top-level ``recipe: NAME`` key starts from that recipe.

    ``overrides`` are dotted keys (``meta.steps: 100``) applied after the file (local or a URI).
    """
    from .data import fsio  # noqa: PLC0415 -- the config module stays importable without pyarrow

    p = fsio.as_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    base_name = data.pop("recipe", None)
    if base_name is not None:
        if cls is not PipelineConfig:
            raise ValueError(f"config file {p}: 'recipe' is only valid in pipeline configs")
        data = _deep_merge(_without_replaced_schedule(recipe_data(base_name), data.get("meta")), data)
    apply_overrides(data, overrides or {})
    return parse(cls, data, source=str(p), overrides=overrides)


def _without_replaced_schedule(base: dict, meta_over: Any) -> dict:
    """A later ``meta.updates_per_model`` or ``meta.steps`` replaces the schedule of what it
    overrides (a recipe's ``updates_per_model``, a file's ``steps``), in place; both set in one
    place stays an error."""
    if isinstance(meta_over, dict) and isinstance(base.get("meta"), dict):
        _drop_replaced_schedule(base["meta"], meta_over)
    return base


def _drop_replaced_schedule(meta: dict, over: dict) -> dict:
    """Drop from ``meta`` the schedule field that ``over`` replaces: its ``steps`` when ``over`` sets
    ``updates_per_model`` alone, and the reverse (in place; returns ``meta``)."""
    for given, replaced in (("updates_per_model", "steps"), ("steps", "updates_per_model")):
        if over.get(given) is not None and replaced not in over:
            meta.pop(replaced, None)
    return meta


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted-key ``overrides`` (``{"meta.steps": 100, "population.groups.0.lr": 0.01}``) to raw
    config ``data`` in place, before validation; returns ``data``."""
    meta = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("meta.")}
    _without_replaced_schedule(data, meta)
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data[a][b]...`` for ``key = "a.b..."``; integer parts index lists (``population.groups.0.lr``).

    Unknown field names are left for validation to reject (it names the dotted field); a
    path that cannot be walked (bad list index, indexing a list the data does not spell out,
    descending into a scalar) raises ValueError naming ``key``.
    """
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {key}: {here!r} is not an index of the {len(node)}-element list "
                                 f"{'.'.join(parts[:depth])!r}")
            part = int(part)
        elif isinstance(node, dict):
            if not last and node.get(part) is None:  # absent, or an empty YAML section (``sweep:``)
                if parts[depth + 1].isdigit():
                    # the list comes from a default, not the data: there is no element to change
                    raise ValueError(f"override {key}: {here!r} is not set in this config (it is a default); "
                                     f"write the whole list in the config file to change its elements")
                node[part] = {}
        else:
            raise ValueError(f"override {key}: {'.'.join(parts[:depth])!r} holds {node!r}, "
                             f"not a mapping or list")
        if last:
            node[part] = value
        else:
            node = node[part]


def dump(cfg: _Config, path: str | Path) -> None:
    from .data import fsio  # noqa: PLC0415

    fsio.as_path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
