"""Users' own pre-trained models, entered at the record step (``dynamo-dist add-models``).

Every model is loaded and checked against the task before anything is written; models
already complete in the root are skipped, never overwritten. The recording itself is
``train.record_member``, the same code trained models go through.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .. import adapters, zoo
from ..config import PopulationConfig
from ..data import lock, store
from ..data.tasks import TaskData
from .train import completed_ids, init_population, record_member, task_for


def add_models(root: str, models: dict[str, torch.nn.Module], task: str, cfg: PopulationConfig | None = None,
               labels: dict[str, dict] | None = None, group: str = "user", progress: bool = False,
               hidden: list[str] | None = None, readout: str | None = None, factory: str | None = None,
               factory_kwargs: dict | None = None) -> list[dict]:
    """Enter at the record step with users' own pre-trained models (``model_id -> module``).

    Modules are zoo models (GRU/RNN/LSTM classifiers, small-image ResNets), plain torchvision
    ResNets in the small-image layout (3x3 stride-1 ``conv1``, no max-pool: adopted as zoo models),
    any other image model (ImageNet-stem torchvision ResNets of any depth, timm CNNs, users' own:
    taps = stage outputs, ``adapters.cnn_stages``, or ``hidden``), or, for sequence and token tasks,
    any module holding recurrent layers, all read through forward hooks (``adapters.HookedModel``): ``hidden`` names the submodules whose states are the hidden
    state (default: every nn.GRU/LSTM/RNN), ``readout`` the one mapping the last of them to
    outputs when forward returns only the last step (default: the last fitting nn.Linear);
    ``factory`` (``"package.module:function"``, called with ``factory_kwargs``) is recorded so
    that the stored weights can be rebuilt later (without it they are recorded all the same).
    A ``torch.export.ExportedProgram`` is taken too (``hidden`` required; ``adapters.from_program``).
    Every module is checked against ``task`` before anything is written; models already
    complete in the manifest are skipped, never overwritten. ``cfg`` gives the data and
    recording settings (default: the root's own spec, else ``PopulationConfig`` defaults).
    Returns the manifest rows of the models added by this call.
    """
    cfg = _record_cfg(root, cfg)
    data = task_for(cfg, task)
    hook = {"hidden": hidden, "readout": readout, "factory": factory, "kwargs": factory_kwargs}
    zoo_models = {store.check_model_id(mid): _as_zoo_model(mid, m, data, hook) for mid, m in models.items()}
    with lock.hold(root, "add-models", what="population root"):
        init_population(cfg, with_groups=False)
        done = completed_ids(root)
        todo = [mid for mid in zoo_models if mid not in done]
        if progress and len(todo) < len(zoo_models):
            print(f"skipping {len(zoo_models) - len(todo)} model(s) already complete in {root}")
        from tqdm.auto import tqdm

        rows = []
        for mid in tqdm(todo, desc="record", unit="model", disable=not progress):
            model = zoo_models[mid]
            row = record_member(root, cfg, mid, model, task, {"group": group, **adapters.manifest_labels(model),
                                                                **(labels or {}).get(mid, {})})
            store.upsert_manifest(root, [row])  # one at a time: a failure later keeps what is done
            rows.append(row)
        if data.output_kind == "regression":
            for row in rows:
                if not row["test_r2"] > 0:
                    print(f"warning: model {row['model_id']!r} has test R^2 {row['test_r2']:.3f} on {task!r}: its "
                          "outputs fit the targets no better than their mean does. Was it trained on this task's "
                          "inputs as given? It is recorded all the same.", file=sys.stderr, flush=True)
            return rows
        chance, bound = chance_bound(data.test.y)
        for row in rows:
            if row["test_accuracy"] <= bound:
                print(f"warning: model {row['model_id']!r} has test accuracy {row['test_accuracy']:.3f} on {task!r}, "
                      f"no better than predicting its most common class ({chance:.3f}; up to {bound:.3f} is chance "
                      f"on {len(data.test.y)} test examples). Was it trained on this task's inputs as dynamo_dist "
                      "builds them (README: Your own pre-trained models)? It is recorded all the same.",
                      file=sys.stderr, flush=True)
        return rows


def chance_bound(labels: torch.Tensor) -> tuple[float, float]:
    """(majority-class accuracy, the accuracy up to which a model is indistinguishable from it): the
    majority rate plus three binomial standard errors on ``len(labels)`` examples."""
    n = len(labels)
    p = float(torch.bincount(labels).max()) / max(n, 1)
    return p, p + 3.0 * math.sqrt(p * (1.0 - p) / max(n, 1))


def add_model_dir(root: str, directory: str, task: str, cfg: PopulationConfig | None = None,
                  group: str | None = None, arch: dict | None = None, progress: bool = False) -> list[dict]:
    """Add a directory of users' pre-trained models: ``<model_id>.safetensors`` files, or ``<model_id>.pt2``
    torch.export programs (``torch.export.save``; ``architecture.json`` then names the hidden submodules
    and, for a forward that returns the last step only, the readout: ``{"hidden": ["gru"], "readout": "fc"}``;
    read without unpickling, ``adapters.load_program``).

    A file written by dynamo_dist carries its architecture; other files (plain state dicts,
    e.g. ``safetensors.torch.save_file(model.state_dict(), ...)``) need an architecture
    description: ``arch`` or ``<directory>/architecture.json``, either ArchSpec fields
    (``{"arch": "lstm", "hidden_size": 32, "num_layers": 2, "bidirectional": true}``, zoo key
    names ``rnn.*``/``readout.*``; input kind/shape, classes and vocabulary come from ``task``)
    or the user's own module (``{"factory": "mypkg.models:build", "kwargs": {...}, "hidden":
    ["gru"], "readout": "fc"}``, the user's key names; ``hidden``/``readout`` optional, see
    ``add_models``). An optional ``<directory>/labels.csv`` (column ``model_id`` plus any
    label columns, e.g. ``group``, ``seed``) labels the models. Group defaults to ``group``,
    else the directory's name. Every file is loaded and checked before anything is written.
    """
    base = Path(directory)
    files = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    programs = sorted(base.glob(f"*{adapters.EXPORT_SUFFIX}")) if base.is_dir() else []
    _refuse_unreadable_formats(base, {f.stem for f in files + programs})
    if files and programs:
        raise ValueError(f"{base} holds both .safetensors files and torch.export programs (.pt2); put each kind in "
                         "a directory of its own (they are described differently)")
    if not files and not programs:
        raise FileNotFoundError(f"no *.safetensors files (or *.pt2 torch.export programs) in {base}")
    desc_path = base / "architecture.json"
    if arch is None and desc_path.is_file():
        try:
            arch = json.loads(desc_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{desc_path} is not valid JSON: {err}") from None
    cfg = _record_cfg(root, cfg)
    data = task_for(cfg, task)
    if programs:
        hook = _program_description(arch, desc_path)
        models = {store.check_model_id(f.stem): _load_program_file(f, data, hook) for f in programs}
        labels = _read_labels(base / "labels.csv", set(models))
        return add_models(root, models, task, cfg=cfg, labels=labels, group=group or base.name, progress=progress)
    hook = _factory_description(arch, desc_path) if arch and "factory" in arch else None
    models = {store.check_model_id(f.stem): _load_user_file(f, arch, data, desc_path, hook) for f in files}
    labels = _read_labels(base / "labels.csv", set(models))
    return add_models(root, models, task, cfg=cfg, labels=labels, group=group or base.name, progress=progress,
                      **(hook or {}))


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _refuse_unreadable_formats(base: Path, safetensors_stems: set[str]) -> None:
    """Refuse pickle checkpoints that have no .safetensors or .pt2 beside them: they would be skipped
    without a word."""
    if not base.is_dir():
        return
    pickles = sorted(f.name for f in base.iterdir() if f.suffix in PICKLE_SUFFIXES and f.stem not in safetensors_stems)
    if pickles:
        raise ValueError(f"{base}: {pickles[:5]} are pickle checkpoints (torch.save), which dynamo_dist never loads "
                         "(unpickling runs arbitrary code). Save each model's state dict as safetensors instead: "
                         "safetensors.torch.save_file(model.state_dict(), '<model_id>.safetensors'), with "
                         "architecture.json naming the factory that builds the module; or save it as a torch.export "
                         "program: torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: "
                         "torch.export.Dim('batch')},)), '<model_id>.pt2'), with architecture.json naming its hidden "
                         "submodules")


_FACTORY_FIELDS = ("factory", "kwargs", "hidden", "readout")


def _factory_description(arch: dict, desc_path: Path) -> dict:
    """The hook options of a factory description; ValueError naming the file and field."""
    unknown = sorted(set(arch) - set(_FACTORY_FIELDS))
    if unknown:
        raise ValueError(f"{desc_path}: unknown field(s) {unknown} beside 'factory' (known: {list(_FACTORY_FIELDS)})")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise ValueError(f"{desc_path}: field 'kwargs' must be an object of keyword arguments, got {arch['kwargs']!r}")
    hidden = arch.get("hidden")
    if hidden is not None and not (isinstance(hidden, list) and hidden and all(isinstance(h, str) for h in hidden)):
        raise ValueError(f"{desc_path}: field 'hidden' must be a list of submodule names, got {hidden!r}")
    adapters.import_factory(arch["factory"], f"{desc_path}: field 'factory'")  # fails before any file is read
    return {"factory": arch["factory"], "factory_kwargs": arch.get("kwargs") or {}, "hidden": hidden,
            "readout": arch.get("readout")}


_PROGRAM_FIELDS = ("hidden", "readout")


def _program_description(arch: dict | None, desc_path: Path) -> dict:
    """``hidden``/``readout`` of a directory of torch.export programs; ValueError naming the file and field."""
    if not isinstance(arch, dict) or "hidden" not in arch:
        raise ValueError(f"{desc_path}: torch.export programs need it, naming the submodules whose outputs are the "
                         'hidden states (a program does not say which are recurrent): {"hidden": ["gru"], '
                         '"readout": "fc"} (readout only when forward returns the last step)')
    unknown = sorted(set(arch) - set(_PROGRAM_FIELDS))
    if unknown:
        raise ValueError(f"{desc_path}: unknown field(s) {unknown} for torch.export programs (known: "
                         f"{list(_PROGRAM_FIELDS)}; a program carries its own architecture)")
    hidden = [arch["hidden"]] if isinstance(arch["hidden"], str) else arch["hidden"]
    if not (isinstance(hidden, list) and hidden and all(isinstance(h, str) for h in hidden)):
        raise ValueError(f"{desc_path}: field 'hidden' must be a list of submodule names, got {arch['hidden']!r}")
    return {"hidden": hidden, "readout": arch.get("readout")}


def _load_program_file(path: Path, task: TaskData, hook: dict) -> torch.nn.Module:
    """A ``.pt2`` file as a checked ``HookedModel`` that remembers where its program is (to rebuild it)."""
    module = adapters.from_program(adapters.load_program(path), f"program {path}")
    return adapters.hooked(module, task, hidden=hook["hidden"], readout=hook["readout"], what=f"program {path}",
                           program=str(path.resolve()))


def _record_cfg(root: str, cfg: PopulationConfig | None) -> PopulationConfig:
    """``cfg`` with ``root``; else the spec the root was built with (so new trajectories match the
    stored inputs), else defaults."""
    if cfg is not None:
        return cfg.replace(root=str(root))
    spec = store.read_spec(root)
    if spec.get("groups"):
        return PopulationConfig.model_validate({**spec, "root": str(root)})
    return PopulationConfig(root=str(root), **{f: spec[f] for f in store.RECORDING_FIELDS if f in spec})


def _as_zoo_model(model_id: str, module: torch.nn.Module, task: TaskData, hook: dict | None = None) -> torch.nn.Module:
    """The module as a base model (``adapters``) whose spec fits ``task``; ValueError naming the model otherwise."""
    spec = getattr(module, "spec", None)
    if isinstance(module, torch.export.ExportedProgram):  # from Python: not rebuildable later (no file)
        if not (hook or {}).get("hidden"):
            raise ValueError(f"model {model_id!r}: a torch.export program does not say which submodules are "
                             "recurrent; name them: hidden=[...]")
        module = adapters.from_program(module, f"model {model_id!r}")
    if isinstance(spec, zoo.ArchSpec):
        model = module
    elif task.input_kind != "image" or not _zoo_resnet(module) or (hook or {}).get("hidden"):
        # users' modules, and image models other than the zoo's own ResNet layout: read through hooks
        hook = hook or {}
        return adapters.hooked(module, task, hidden=hook.get("hidden"), readout=hook.get("readout"),
                               factory=hook.get("factory"), kwargs=hook.get("kwargs"), what=f"model {model_id!r}")
    else:
        arch = zoo.resnet_arch_of(module)
        spec = zoo.ArchSpec(arch=arch, input_kind="image", input_shape=tuple(task.input_shape),
                            num_classes=module.fc.out_features)
        try:
            model = zoo.wrap_module(module, spec)
        except RuntimeError as err:
            raise ValueError(f"model {model_id!r}: weights do not fit {arch} for task {task.name!r}: {err}") from None
    want = (task.input_kind, tuple(task.input_shape), task.num_classes, task.vocab_size)
    have = (spec.input_kind, tuple(spec.input_shape), spec.num_classes, spec.vocab_size)
    if have != want:
        names = ("input_kind", "input_shape", "num_classes", "vocab_size")
        diff = ", ".join(f"{n} {h!r} vs {w!r}" for n, h, w in zip(names, have, want) if h != w)
        raise ValueError(f"model {model_id!r} does not fit task {task.name!r} (model vs task: {diff})")
    bad = [k for k, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:  # refused here, before anything is written, rather than at its trajectory's write
        raise ValueError(f"model {model_id!r}: weights {bad[:5]} contain NaN/Inf")
    if isinstance(model, adapters.HookedModel):  # rebuilt from a dynamo_dist weights file: checked as when added
        adapters.check(model, task.probe.x[:adapters.CHECK_EXAMPLES], task.num_classes, f"model {model_id!r}")
    return model.eval()


def _zoo_resnet(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a torchvision ResNet in the zoo's small-image layout (then it is adopted as a
    zoo model, rebuildable without a factory); other image models are read through hooks."""
    from torchvision.models import ResNet  # noqa: PLC0415 -- only for users' image models

    if not isinstance(module, ResNet):
        return False
    try:
        zoo.resnet_arch_of(module)
    except ValueError:
        return False
    return True


def _load_user_file(path: Path, arch: dict | None, task: TaskData, desc_path: Path,
                    hook: dict | None = None) -> torch.nn.Module:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"weights file {path} is not a readable safetensors file: {err}") from None
    if "arch_spec" in meta:
        return adapters.load(path)
    if hook:  # the user's own module: their factory, their key names
        module = adapters.build_from_factory(hook["factory"], hook["factory_kwargs"], f"{desc_path}: field 'factory'")
        return adapters.load_state_into(module, zoo.read_weights(path)[0], path)
    if not arch:
        raise ValueError(f"weights file {path} carries no architecture; describe it in {desc_path} "
                         '(e.g. {"arch": "gru", "hidden_size": 32})')
    fields = {"input_kind": task.input_kind, "input_shape": tuple(task.input_shape), "num_classes": task.num_classes,
              "vocab_size": task.vocab_size, **arch}
    fields["input_shape"] = tuple(fields["input_shape"])
    try:
        spec = zoo.ArchSpec(**fields)
    except (TypeError, ValueError) as err:  # unknown field names, bad values
        raise ValueError(f"architecture description {desc_path} for {path}: {err}; a module of your own class is "
                         'described by {"factory": "package.module:function"} instead') from None
    return zoo.load_state(path, spec)


def _read_labels(path: Path, model_ids: set[str]) -> dict[str, dict]:
    if not path.is_file():
        return {}
    import pyarrow.csv  # noqa: PLC0415

    try:
        rows = pyarrow.csv.read_csv(path).to_pylist()
    except Exception as err:  # pyarrow.lib.ArrowInvalid for malformed CSV
        raise ValueError(f"labels file {path} is not a readable CSV: {err}") from None
    if rows and "model_id" not in rows[0]:
        raise ValueError(f"labels file {path} needs a model_id column")
    labels = {str(r.pop("model_id")): r for r in rows}
    unknown = sorted(set(labels) - model_ids)
    if unknown:
        raise ValueError(f"labels file {path} names models with no .safetensors file: {unknown[:5]}")
    reserved = set(store.MANIFEST_COLUMNS) - {"group", "seed", "epoch", "train_fraction"}
    bad = sorted({k for r in labels.values() for k in r} & reserved)
    if bad:
        raise ValueError(f"labels file {path}: column(s) {bad} are manifest fields, not labels")
    return labels


__all__ = ["add_models", "add_model_dir"]
