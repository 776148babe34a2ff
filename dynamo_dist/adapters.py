"""Base models from anywhere: the adapter interface, and users' own modules read through hooks.

A base model, whatever built it, is an ``nn.Module`` with

* ``spec``: a ``zoo.ArchSpec`` (input kind and shape, classes, recurrent shape: what the
  manifest row and the meta-model need);
* ``trajectories(x) -> (hiddens, outputs)``: as ``zoo`` documents it (sequence models: one
  tap ``[h_BTH]`` and ``y_BTC``);
* ``forward(x)``: the outputs at the final step (accuracy);
* optionally ``save_metadata() -> dict[str, str]``: what ``zoo.save`` stores beside the
  weights so that ``load`` can rebuild it (``rebuild``).

``load(path)`` rebuilds any base model from the weights file ``zoo.save`` wrote: a zoo model
by its ``ArchSpec`` (``zoo.from_weights``), a user's module by its factory or program. It lives
here, not in ``zoo``, so that the zoo knows nothing of the adapters built on it.

Zoo models (``zoo.SequenceClassifier``, ``zoo.SmallImageResNet``) are one adapter;
``HookedModel`` is the other: a user's module, whose hidden states are taken by forward hooks
on named submodules and whose weights keep the user's own key names.

A ``torch.export`` program (``.pt2``, ``load_program``: read without unpickling anything) is a
``HookedModel`` too: ``torch.export.unflatten`` gives back the module hierarchy under the names the
exported module had, so its hidden states are named submodules as for any module (``hidden`` is
required: nothing in a program says which submodule is recurrent). An exported ``nn.GRU``/``nn.LSTM``
is a graph, not an ``nn.RNNBase``: its tap is what it returned to its caller (the top layer's states).

Hidden state of a user's RNN (the paper's h_t): every hooked submodule's states at step t,
side by side, one tap. An ``nn.GRU``/``nn.LSTM``/``nn.RNN`` submodule contributes every
layer's states, both directions (``zoo.layer_states``: layer 1 forward, layer 1 backward,
layer 2 forward, ...); any other submodule its output, which must be (B, T, ...), or, for
a cell called once per step (``nn.GRUCell`` in a loop), its (B, ...) outputs stacked over steps.
Outputs at step t: ``forward``'s own when it returns (B, T, C); when it returns (B, C) (a
readout of the last step), the readout submodule applied to the last hooked submodule's
output at every step, checked against ``forward`` at the last step (``check``).

Shape legend: B batch, T time steps, D input features, H hidden units, C outputs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import zoo

RNN_TYPES = {nn.GRU: "gru", nn.LSTM: "lstm", nn.RNN: "rnn"}
CHECK_EXAMPLES = 16  # examples of the probe split each user's module is run on before anything is written


class HookedModel(nn.Module):
    """A user's module whose hidden states are captured by forward hooks on named submodules.

    ``hidden``: submodule names (``module.get_submodule``) whose states form the tap, in order;
    ``readout``: the submodule mapping the last one's output to outputs, used when ``forward``
    returns only the last step (None when it returns every step); ``factory``/``kwargs``: the
    import path that rebuilds ``module`` (``rebuild``), None for a module given from Python;
    ``program``: the ``.pt2`` file ``module`` was unflattened from (``rebuild`` reads it again).
    """

    def __init__(self, module: nn.Module, spec: zoo.ArchSpec, hidden: list[str], readout: str | None,
                 factory: str | None = None, kwargs: dict | None = None, program: str | None = None):
        super().__init__()
        self.module = module
        self.spec = spec
        self.hidden = list(hidden)
        self.readout = readout
        self.factory = factory
        self.kwargs = dict(kwargs or {})
        self.program = program

    def _hooked_forward(self, x: torch.Tensor) -> tuple[dict[str, list], object]:
        """(per hidden name, the (args, output) of each call; forward's result) of the module on ``x``."""
        captured: dict[str, list] = {name: [] for name in self.hidden}
        handles = [self.module.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: captured[name].append((args, out))) for name in self.hidden]
        try:
            result = self.module(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.hidden if not captured[n]]
        if missing:
            raise ValueError(f"hidden: hooks on {missing} captured nothing: {type(self.module).__name__}.forward "
                             "never calls them; name submodules that forward runs")
        return captured, result

    def run_cnn(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(feature maps h_BCHW of every hidden submodule, in order; logits (B, C)) of an image model on ``x``."""
        captured, result = self._hooked_forward(x)
        taps = []
        for name in self.hidden:
            calls = captured[name]
            if len(calls) != 1:
                raise ValueError(f"hidden: {name!r} is called {len(calls)} times per forward; a CNN's hidden "
                                 "state is the output of submodules called once (its stages)")
            out = calls[0][1]
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not torch.is_tensor(out) or out.dim() != 4 or out.shape[0] != x.shape[0]:
                got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise ValueError(f"hidden: submodule {name!r} gave {got}, not feature maps (B, C, H, W) for input "
                                 f"{tuple(x.shape)}")
            taps.append(out)
        result = result[0] if isinstance(result, (tuple, list)) else result
        if not torch.is_tensor(result) or result.dim() != 2:
            got = tuple(result.shape) if torch.is_tensor(result) else type(result).__name__
            raise ValueError(f"{type(self.module).__name__}.forward returns {got}, not logits (B, C)")
        return taps, result

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_BTH, outputs at every step y_BTC, forward's own result) of a sequence model on ``x``."""
        captured, result = self._hooked_forward(x)
        parts, top = [], None
        for name in self.hidden:
            sub, calls = self.module.get_submodule(name), captured[name]
            if isinstance(sub, nn.RNNBase):
                if len(calls) != 1:
                    raise ValueError(f"hidden: {name!r} ({type(sub).__name__}) is called {len(calls)} times per "
                                     "forward; dynamo_dist reads a recurrent module run once over the sequence")
                args, out = calls[0]
                parts.append(zoo.layer_states(sub, args[0], args[1] if len(args) > 1 else None))
                top = out[0] if sub.batch_first else out[0].transpose(0, 1)
                continue
            outs = [out[0] if isinstance(out, (tuple, list)) else out for _, out in calls]
            if len(outs) == x.shape[1] and all(torch.is_tensor(o) and o.shape[:1] == x.shape[:1] for o in outs):
                top = torch.stack(outs, dim=1)  # a cell called once per step: (B, ...) per call
            elif len(outs) == 1:
                top = outs[0]
            else:
                raise ValueError(f"hidden: {name!r} is called {len(outs)} times per forward, neither once nor once "
                                 f"per step ({x.shape[1]})")
            if not torch.is_tensor(top) or top.dim() < 3 or top.shape[:2] != x.shape[:2]:
                got = tuple(top.shape) if torch.is_tensor(top) else type(top).__name__
                raise ValueError(f"hidden: submodule {name!r} gave {got}, not (B, T, ...) = "
                                 f"({x.shape[0]}, {x.shape[1]}, ...) for input {tuple(x.shape)}")
            parts.append(top.reshape(top.shape[0], top.shape[1], -1))
        h_BTH = torch.cat(parts, dim=-1)
        result = result[0] if isinstance(result, (tuple, list)) else result
        if torch.is_tensor(result) and result.dim() == 3:
            return h_BTH, result, result
        if self.readout is None:
            raise ValueError(f"readout: {type(self.module).__name__}.forward returns "
                             f"{tuple(result.shape) if torch.is_tensor(result) else type(result).__name__}, not "
                             "outputs at every step (B, T, C); name the readout submodule applied to the last "
                             "step (e.g. \"readout\": \"fc\")")
        return h_BTH, self.module.get_submodule(self.readout)(top), result

    def trajectories(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self.spec.recurrent:  # as zoo's ResNets: one tap per stage, the logits as one "step"
            taps, logits = self.run_cnn(x)
            return taps, logits[:, None, :]
        h_BTH, y_BTC, _ = self.run(x)
        return [h_BTH], y_BTC

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trajectories(x)[1][:, -1]

    def save_metadata(self) -> dict[str, str]:
        if self.program is not None:
            return {"adapter": json.dumps({"kind": "export", "program": self.program, "hidden": self.hidden,
                                           "readout": self.readout})}
        return {"adapter": json.dumps({"kind": "hooked", "factory": self.factory, "kwargs": self.kwargs,
                                       "hidden": self.hidden, "readout": self.readout})}


def hooked(module: nn.Module, task, hidden: list[str] | None = None, readout: str | None = None,
           factory: str | None = None, kwargs: dict | None = None, what: str = "model",
           program: str | None = None) -> HookedModel:
    """``module`` as a ``HookedModel`` for ``task`` (a ``TaskData``), defaults filled in and checked.

    Defaults: ``hidden`` = every ``nn.GRU``/``nn.LSTM``/``nn.RNN`` submodule, in module order;
    ``readout`` = the last ``nn.Linear`` whose input width is the last hooked submodule's output.
    ValueError naming ``what`` and the field on anything that does not fit (``check``).
    """
    if task.input_kind == "image":
        return _hooked_cnn(module, task, hidden, readout, factory, kwargs, what, program)
    names = dict(module.named_modules())
    if hidden is None:
        hidden = [n for n, m in names.items() if isinstance(m, nn.RNNBase)]
        if not hidden:
            raise ValueError(f"{what}: {type(module).__name__} has no nn.GRU/nn.LSTM/nn.RNN submodule; name the "
                             "submodules whose outputs are its hidden states (hidden: [...])")
    if isinstance(hidden, str):
        hidden = [hidden]
    unknown = [n for n in hidden if n not in names or n == ""]
    if unknown:
        raise ValueError(f"{what}: hidden names {unknown}, not submodules of {type(module).__name__} "
                         f"(its submodules: {sorted(n for n in names if n)[:20]})")
    if readout is not None and readout not in names:
        raise ValueError(f"{what}: readout {readout!r} is not a submodule of {type(module).__name__} "
                         f"(its submodules: {sorted(n for n in names if n)[:20]})")
    if readout is None:
        last = names[hidden[-1]]
        width = last.hidden_size * (2 if last.bidirectional else 1) if isinstance(last, nn.RNNBase) else None
        linears = [n for n, m in names.items() if isinstance(m, nn.Linear) and width in (None, m.in_features)]
        readout = linears[-1] if linears else None
    # one hooked nn.GRU/LSTM/RNN names the arch and its shape; anything else is "custom", sized by its tap
    rnn = names[hidden[0]] if len(hidden) == 1 and type(names[hidden[0]]) in RNN_TYPES else None
    spec = zoo.ArchSpec(
        arch=RNN_TYPES[type(rnn)] if rnn is not None else zoo.CUSTOM_ARCH, input_kind=task.input_kind,
        input_shape=tuple(task.input_shape), num_classes=task.num_classes, vocab_size=task.vocab_size,
        hidden_size=rnn.hidden_size if rnn is not None else 0, num_layers=rnn.num_layers if rnn is not None else 1,
        bidirectional=bool(rnn.bidirectional) if rnn is not None else False)
    model = HookedModel(module, spec, hidden, readout, factory, kwargs, program).eval()
    width = check(model, task.probe.x[:CHECK_EXAMPLES], task.num_classes, what)
    if rnn is None:  # no one recurrent module to say it: the tap's width is the hidden size
        model.spec = dataclasses.replace(spec, hidden_size=width)
    return model


def cnn_stages(module: nn.Module) -> list[str] | None:
    """Default taps of an image model: ``layer1..layer4`` of a ResNet-like layout (torchvision's ResNets,
    wide ResNets and ResNeXts, timm's ResNets), else the modules of timm's ``feature_info`` (the maps
    ``features_only=True`` returns); None when neither is there."""
    names = dict(module.named_modules())
    stages = [f"layer{i}" for i in range(1, 5)]
    if all(s in names for s in stages):
        return stages
    info = getattr(module, "feature_info", None)
    try:
        mods = [f["module"] for f in info] if info is not None else []
    except (TypeError, KeyError):
        return None
    return mods if mods and all(m in names for m in mods) else None


def _hooked_cnn(module: nn.Module, task, hidden, readout, factory, kwargs, what: str, program) -> HookedModel:
    """An image model as a ``HookedModel``: its taps the outputs of ``hidden`` (default ``cnn_stages``), its
    outputs ``forward``'s logits (B, C); checked on the task's images like any user's module."""
    names = dict(module.named_modules())
    if readout is not None:
        raise ValueError(f"{what}: readout {readout!r} is for sequence models; an image model's forward gives "
                         "its logits (B, C)")
    if hidden is None:
        hidden = cnn_stages(module)
        if hidden is None:
            raise ValueError(f"{what}: {type(module).__name__} is neither a ResNet-like CNN (layer1..layer4) nor a "
                             "timm model with feature_info; name the submodules whose outputs (B, C, H, W) are its "
                             f"hidden states, e.g. its stages (hidden: [...]; its submodules: "
                             f"{sorted(n for n in names if n and '.' not in n)[:20]})")
    if isinstance(hidden, str):
        hidden = [hidden]
    unknown = [n for n in hidden if n not in names or n == ""]
    if unknown:
        raise ValueError(f"{what}: hidden names {unknown}, not submodules of {type(module).__name__}")
    spec = zoo.ArchSpec(arch=zoo.CUSTOM_CNN_ARCH, input_kind="image", input_shape=tuple(task.input_shape),
                        num_classes=task.num_classes)
    model = HookedModel(module, spec, hidden, None, factory, kwargs, program).eval()
    width = check(model, task.probe.x[:CHECK_EXAMPLES], task.num_classes, what)
    model.spec = dataclasses.replace(spec, hidden_size=width)  # the last stage's channels
    return model


@torch.no_grad()
def check(model: HookedModel, x: torch.Tensor, num_classes: int, what: str) -> int:
    """Run ``model`` once on ``x`` and refuse what would record wrong trajectories: a forward that
    fails, hooks that capture nothing, outputs of another width than the task's classes, a readout
    that is not what forward applies at the last step, NaN/Inf. Returns the hidden tap's width."""
    bad = [n for n, p in model.module.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{what}: weights {bad[:5]} contain NaN/Inf")
    param = next(model.module.parameters(), None)
    x = x.to(param.device) if param is not None else x
    try:
        if not model.spec.recurrent:
            taps, logits = model.run_cnn(x)
            h_BTH, y_BTC, result = taps[-1].flatten(1)[:, None], logits[:, None], logits  # checked as one step
            finite = all(bool(torch.isfinite(t).all()) for t in taps)
        else:
            h_BTH, y_BTC, result = model.run(x)
            finite = True
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- the user's forward may raise anything
        raise ValueError(f"{what}: {type(model.module).__name__}.forward fails on the task's inputs "
                         f"{tuple(x.shape)} {x.dtype}: {type(err).__name__}: {err}") from None
    if not model.spec.recurrent and result.shape[-1] != num_classes:
        raise ValueError(f"{what}: logits of shape {tuple(result.shape)}: the task has {num_classes} classes, so "
                         f"forward must return (B, {num_classes})")
    if y_BTC.dim() != 3 or y_BTC.shape[-1] != num_classes:
        raise ValueError(f"{what}: outputs of shape {tuple(y_BTC.shape)}: the task has {num_classes} classes, so "
                         f"outputs must be (B, T, {num_classes}) (readout {model.readout!r})")
    if result.dim() == 2:
        gap = float((y_BTC[:, -1] - result).abs().max()) if result.shape == y_BTC[:, -1].shape else float("inf")
        if not gap <= 1e-4 * (1.0 + float(result.abs().max())):
            raise ValueError(f"{what}: readout {model.readout!r} applied to {model.hidden[-1]!r}'s last step does "
                             f"not give what forward returns (max difference {gap:.3g}); name the readout "
                             "submodule, or let forward return outputs at every step (B, T, C)")
    if not (finite and torch.isfinite(h_BTH).all() and torch.isfinite(y_BTC).all()):
        raise ValueError(f"{what}: hidden states or outputs contain NaN/Inf on the task's inputs")
    if not model.spec.recurrent:
        return int(taps[-1].shape[1])
    return int(h_BTH.shape[-1])


def import_factory(path: str, field: str = "factory"):
    """The callable at ``"package.module:name"``; ValueError naming ``field`` when it cannot be imported.

    The current directory is searched as well as ``sys.path`` (as ``uvicorn app:app`` does), so a
    ``models.py`` beside where the command runs is found without installing it.
    """
    mod_name, sep, attr = str(path).partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{field}: {path!r} is not an import path 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 -- an import runs the user's code
        raise ValueError(f"{field}: cannot import module {mod_name!r} of {path!r}: {type(err).__name__}: {err}") \
            from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}: module {mod_name!r} has no {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{field}: {path!r} is not callable")
    return obj


def factory_search_path(path: str) -> str | None:
    """The directory on ``sys.path`` from which this process imports the module of factory ``path``
    (``"package.module:function"``), for other processes (Ray actors) to import it the same way; None
    when it cannot be found. A process on another machine needs the same directory (a shared
    filesystem), or the package installed there, or Ray's ``runtime_env`` (``py_modules``)."""
    top = str(path).partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        return None
    where = Path(next(iter(spec.submodule_search_locations))) if spec.submodule_search_locations else Path(spec.origin)
    return str(where.resolve().parent)


def build_from_factory(factory: str, kwargs: dict | None, field: str = "factory") -> nn.Module:
    """``factory(**kwargs)``, which must return an ``nn.Module``; errors name ``field``."""
    fn = import_factory(factory, field)
    try:
        module = fn(**(kwargs or {}))
    except Exception as err:  # noqa: BLE001 -- the user's code
        raise ValueError(f"{field}: {factory}(**{kwargs or {}}) failed: {type(err).__name__}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"{field}: {factory} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load a state dict with the user's own key names; mismatches are ValueErrors naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys, size mismatches
        lines = [line.strip() for line in str(err).strip().splitlines()[1:4]]
        raise ValueError(f"weights file {path} does not fit {type(module).__name__} as its factory builds it: "
                         f"{' '.join(lines)}") from None
    return module.eval()


def load(path: str | Path) -> nn.Module:
    """Rebuild the base model of a weights file ``zoo.save`` wrote, whatever its adapter (eval mode): a zoo
    model, or a user's module (``rebuild``). Errors name the file."""
    state, meta = zoo.read_weights(path)
    if "adapter" in meta and "arch_spec" in meta:
        return rebuild(path, state, meta)
    return zoo.from_weights(path, state, meta)


def rebuild(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> HookedModel:
    """A ``HookedModel`` from the weights file ``zoo.save`` wrote for it (its factory is imported, or its
    ``.pt2`` program read again; the recorded weights are loaded into either)."""
    info = json.loads(meta["adapter"])
    if info.get("kind") == "export":
        program = info["program"]
        if not Path(program).is_file():
            raise ValueError(f"weights file {path}: this model was added from the torch.export program {program}, "
                             "which is no longer there; it is rebuilt from that file")
        module = from_program(load_program(program), program)
        load_state_into(module, {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}, path)
        return HookedModel(module, zoo.ArchSpec.from_json(meta["arch_spec"]), info["hidden"], info.get("readout"),
                           program=program).eval()
    if not info.get("factory"):
        raise ValueError(f"weights file {path}: this model was added from a Python object without a factory, so it "
                         "cannot be rebuilt; add it with factory='package.module:function' to make it reloadable")
    module = build_from_factory(info["factory"], info.get("kwargs"))
    prefix = "module."
    load_state_into(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path)
    return HookedModel(module, zoo.ArchSpec.from_json(meta["arch_spec"]), info["hidden"], info.get("readout"),
                       info["factory"], info.get("kwargs")).eval()


EXPORT_SUFFIX = ".pt2"


def load_program(path: str | Path) -> "torch.export.ExportedProgram":
    """The ``torch.export`` program saved at ``path`` (``torch.export.save``), read without unpickling.

    ``torch.export.load`` falls back to ``pickle``/``torch.load(weights_only=False)`` for some payloads
    (legacy archives, pickled weights or constants, custom objects, sample inputs a safe load refuses);
    the archive is checked first and any of those is a ValueError naming the file.
    """
    import zipfile  # noqa: PLC0415

    from torch.export.pt2_archive import constants as pt2  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torch.export program not found: {path}")
    unsafe = []
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root = names[0].split("/", 1)[0] + "/" if names else ""
            inner = {n[len(root):]: n for n in names if n.startswith(root)}
            if pt2.ARCHIVE_FORMAT_PATH not in inner or z.read(inner[pt2.ARCHIVE_FORMAT_PATH]).decode().strip() != \
                    pt2.ARCHIVE_FORMAT_VALUE:
                raise ValueError("not a pt2 archive (no archive_format 'pt2')")
            models = [n[len(pt2.MODELS_DIR):-len(".json")] for n in inner
                      if n.startswith(pt2.MODELS_DIR) and n.endswith(".json")]
            if not models:
                raise ValueError("no exported program in it (models/*.json)")
            for name in models:
                for fmt in (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT):
                    cfg_name = fmt.format(name)
                    if cfg_name not in inner:
                        raise ValueError(f"no {cfg_name} (an archive from an older torch: its weights are a pickle)")
                    for fqn, item in json.loads(z.read(inner[cfg_name]))["config"].items():
                        if item.get("use_pickle") or (fmt == pt2.CONSTANTS_CONFIG_FILENAME_FORMAT and not
                                                      item["path_name"].startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
                            unsafe.append(fqn)
                sample = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(name)
                if sample in inner:
                    try:
                        torch.load(io.BytesIO(z.read(inner[sample])), weights_only=True)
                    except Exception:  # noqa: BLE001 -- anything a safe load refuses
                        unsafe.append(sample)
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not a torch.export program written by torch.export.save: {err}") from None
    if unsafe:
        raise ValueError(f"{path}: {unsafe[:5]} would be unpickled to load this program, and dynamo_dist never "
                         "unpickles; export a module whose weights and constants are plain tensors")
    try:
        return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 -- a damaged or incompatible archive
        raise ValueError(f"{path}: torch.export.load fails: {type(err).__name__}: {err}") from None


def from_program(program: "torch.export.ExportedProgram", what: str) -> nn.Module:
    """The program as a module with its original submodule names (``torch.export.unflatten``), so that its
    hidden states are hooked by name. A batch size fixed at export is refused: dynamo_dist runs batches of
    its own size."""
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"
                   and n.name in program.graph_signature.user_inputs]
    for node in user_inputs:
        val = node.meta.get("val")
        if torch.is_tensor(val) and val.dim() and isinstance(val.shape[0], int):
            raise ValueError(f"{what}: exported with a fixed batch size {val.shape[0]} (input {node.name!r}); "
                             "export with a dynamic batch dimension: torch.export.export(model, (x,), "
                             "dynamic_shapes=({0: torch.export.Dim('batch')},))")
    if len(user_inputs) != 1:
        raise ValueError(f"{what}: the program takes {len(user_inputs)} inputs; dynamo_dist calls it with one "
                         "batch of the task's inputs")
    try:
        return torch.export.unflatten(program)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{what}: torch.export.unflatten fails, so its submodules cannot be hooked by name: "
                         f"{type(err).__name__}: {err}") from None


def manifest_labels(model: nn.Module) -> dict:
    """The manifest columns a user's RNN adds beyond the zoo's (read back by ``ArchSpec.from_row``):
    ``num_layers``/``bidirectional`` of a multi-layer or bidirectional one, ``factory`` when known."""
    spec, labels = model.spec, {}
    if spec.recurrent and spec.arch != zoo.CUSTOM_ARCH and (spec.num_layers > 1 or spec.bidirectional):
        labels.update(num_layers=spec.num_layers, bidirectional=spec.bidirectional)
    if isinstance(model, HookedModel) and model.factory:
        labels["factory"] = model.factory
    if isinstance(model, HookedModel) and model.program:
        labels["program"] = Path(model.program).name
    if isinstance(model, HookedModel) and spec.arch == zoo.CUSTOM_CNN_ARCH:  # what the "custom_cnn" is
        labels["module_class"] = f"{type(model.module).__module__}.{type(model.module).__qualname__}"
    return labels


__all__ = ["HookedModel", "hooked", "check", "import_factory", "factory_search_path", "build_from_factory", "load",
           "rebuild",
           "manifest_labels", "load_program", "from_program"]
