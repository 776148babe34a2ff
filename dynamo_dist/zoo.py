"""Base-model zoo: RNN classifiers and small-image ResNets that expose their hidden states.

Every model implements ``trajectories(x) -> (hiddens, outputs)``:

* sequence models: ``hiddens = [h_BTH]`` (one tap, the hidden state at every step) and
  ``outputs = y_BTC`` (the readout G(h_t) at every step). A multi-layer or bidirectional
  RNN's state is every layer's states side by side (``layer_states``): H = layers x
  directions x hidden_size, one tap;
* ResNets: ``hiddens = [h1_BCHW, ..., h4_BCHW]`` (the four stage outputs, appendix A)
  and ``outputs = y_B1C`` (the logits, one "step").

Shape legend: B batch, T time steps, D input features, H hidden units, C classes.
Weights are stored as safetensors with the architecture as JSON metadata; nothing
is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load, save as safetensors_save
from torch import nn

from . import family as families
from .config import SEQUENCE_ARCHS
from .data import fsio

FORMAT_VERSION = 1
CUSTOM_ARCH = "custom"  # a user's module whose hidden tap is not an nn.GRU/LSTM/RNN (adapters.HookedModel)
CUSTOM_CNN_ARCH = "custom_cnn"  # a user's image model read through hooks on its stages (adapters.HookedModel)


def family_of(arch: str) -> str:
    """The name of ``arch``'s family (``dynamo_dist.family``: ResNets and users' CNNs are "cnn", recurrent
    archs "rnn"); an arch no family knows is taken as recurrent, as manifests before families had it."""
    fam = families.of_arch(arch)
    return fam.name if fam is not None else "rnn"


def output_kind_of(row: dict) -> str:
    """A manifest row's output kind: "regression" when its task has real-valued targets (the row says so),
    else "classification" (rows written before regression existed carry no ``output_kind``)."""
    return row.get("output_kind") or "classification"


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a base model (stored beside its weights)."""

    arch: str                      # gru | rnn | lstm | resnet10/18/34/50 | custom | custom_cnn (users' modules),
    #                                or an arch of a registered family (``family.register``)
    input_kind: str                # sequence | tokens | image
    input_shape: tuple[int, ...]   # per-example input shape: (T, D), (T,), (C, H, W)
    num_classes: int
    hidden_size: int = 64          # RNN hidden units
    embed_dim: int = 64            # token embedding width
    vocab_size: int | None = None  # token inputs only
    num_layers: int = 1            # stacked recurrent layers (RNNs)
    bidirectional: bool = False    # RNNs: a backward direction beside the forward one

    def __post_init__(self):
        fam = families.of_arch(self.arch)
        if fam is None:
            raise ValueError(f"arch: unknown architecture {self.arch!r}; known: {families.known_archs()}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers: must be an int >= 1, got {self.num_layers!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional: must be true or false, got {self.bidirectional!r}")
        fam.check_spec(self)
        if self.input_kind == "tokens" and not self.vocab_size:
            raise ValueError("vocab_size: token inputs need a vocabulary size")

    @property
    def family(self) -> str:
        return family_of(self.arch)

    @property
    def recurrent(self) -> bool:
        """Whether this model's states evolve over input steps (``Family.recurrent``)."""
        return families.get(self.family).recurrent

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_row(cls, row: dict) -> "ArchSpec":
        """The spec of a manifest row (``data.store.MANIFEST_COLUMNS``; rows of users' multi-layer or
        bidirectional RNNs also carry ``num_layers``/``bidirectional``, absent or null elsewhere)."""
        return cls(arch=row["arch"], input_kind=row["input_kind"], input_shape=tuple(row["input_shape"]),
                   num_classes=int(row["num_classes"]), hidden_size=int(row["hidden_size"] or 0) or 64,
                   vocab_size=row.get("vocab_size"), num_layers=int(row.get("num_layers") or 1),
                   bidirectional=bool(row.get("bidirectional") or False))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        d = json.loads(text)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def layer_states(rnn: nn.RNNBase, u: torch.Tensor, hx=None) -> torch.Tensor:
    """Every layer's states of ``rnn`` on input ``u``, side by side: (B, T, layers x directions x H).

    ``u`` and ``hx`` as ``rnn`` takes them (``batch_first`` or not; ``hx`` None = zeros; LSTM:
    ``(h_0, c_0)``); the result is batch first. Per step the order is layer 1 forward, layer 1
    backward, layer 2 forward, ... ; the last ``directions x H`` columns are ``rnn(u)[0]``.
    LSTM: h_t, not the cell state. A torch RNN returns only its top layer's states, so the
    layers run one at a time here through single-layer copies sharing ``rnn``'s parameters.
    """
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"{type(rnn).__name__} with proj_size {rnn.proj_size} is not supported")
    if isinstance(u, nn.utils.rnn.PackedSequence):
        raise ValueError(f"{type(rnn).__name__} given a PackedSequence: dynamo_dist records padded (B, T, D) inputs")
    if rnn.num_layers == 1:
        out = rnn(u, hx)[0]
        return out if rnn.batch_first else out.transpose(0, 1)
    dirs = 2 if rnn.bidirectional else 1
    kw = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    states, z = [], u
    for k in range(rnn.num_layers):
        one = type(rnn)(z.shape[-1], rnn.hidden_size, num_layers=1, bias=rnn.bias, batch_first=rnn.batch_first,
                        bidirectional=rnn.bidirectional, device="meta", **kw)
        params = {name: getattr(rnn, name.replace("_l0", f"_l{k}")) for name, _ in one.named_parameters()}
        h0 = None
        if hx is not None:
            h0 = tuple(h[k * dirs:(k + 1) * dirs] for h in hx) if isinstance(hx, tuple) else hx[k * dirs:(k + 1) * dirs]
        z = torch.func.functional_call(one, params, (z, h0))[0]
        states.append(z if rnn.batch_first else z.transpose(0, 1))
    return torch.cat(states, dim=-1)


class SequenceClassifier(nn.Module):
    """GRU / tanh-RNN / LSTM classifier (any number of layers, optionally bidirectional) reading out
    its top layer at every step."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        if spec.input_kind == "tokens":
            self.embed = nn.Embedding(spec.vocab_size, spec.embed_dim, padding_idx=0)
            in_dim = spec.embed_dim
        else:
            self.embed = None
            in_dim = spec.input_shape[-1]
        if spec.arch not in SEQUENCE_ARCHS:
            raise ValueError(f"arch: {spec.arch!r} is no zoo architecture; a user's module is rebuilt by its factory")
        rnn_cls = {"gru": nn.GRU, "rnn": nn.RNN, "lstm": nn.LSTM}[spec.arch]
        self.rnn = rnn_cls(in_dim, spec.hidden_size, num_layers=spec.num_layers, bidirectional=spec.bidirectional,
                           batch_first=True)
        self.readout = nn.Linear(spec.num_directions * spec.hidden_size, spec.num_classes)

    def trajectories(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B,T,D) float or (B,T) token ids -> ([h_BTH], y_BTC); H = layers x directions x hidden_size."""
        u = self.embed(x) if self.embed is not None else x
        if self.rnn.num_layers == 1:
            h_BTH, _ = self.rnn(u)  # h_0 = 0; LSTM: h_t (not the cell state) is the hidden state
            return [h_BTH], self.readout(h_BTH)
        h_BTH = layer_states(self.rnn, u)
        return [h_BTH], self.readout(h_BTH[..., -self.readout.in_features:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the final step (inputs are left-padded, so it is always a real token)."""
        return self.trajectories(x)[1][:, -1]


class SmallImageResNet(nn.Module):
    """A torchvision ResNet adapted to small images: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        in_ch = spec.input_shape[0]
        self.net = build_torchvision_resnet(spec.arch, spec.num_classes)
        self.net.conv1 = nn.Conv2d(in_ch, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def trajectories(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = self.net
        z = n.relu(n.bn1(n.conv1(x)))
        taps = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            z = layer(z)
            taps.append(z)
        logits = n.fc(torch.flatten(n.avgpool(z), 1))
        return taps, logits[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trajectories(x)[1][:, -1]


def build_torchvision_resnet(arch: str, num_classes: int) -> nn.Module:
    # torchvision is imported here, not at module level: importing torchvision.models pulls
    # in torch._dynamo (~1.3 s), which every RNN-only process (population actors) would pay.
    import torchvision.models  # noqa: PLC0415
    from torchvision.models.resnet import BasicBlock, ResNet  # noqa: PLC0415

    if arch == "resnet10":  # one BasicBlock per stage: the CPU-friendly member of the family
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def build(spec: ArchSpec) -> nn.Module:
    """A fresh base model of ``spec``, built by its family (``Family.build``)."""
    return families.get(spec.family).build(spec)


def wrap_module(module: nn.Module, spec: ArchSpec) -> nn.Module:
    """Adopt a user's pre-trained module whose parameters match ``build(spec)``'s layout.

    Accepts our own zoo models and plain torchvision ResNets built for small images
    (``conv1`` 3x3 stride 1, ``maxpool`` Identity).
    """
    from torchvision.models import ResNet  # noqa: PLC0415 -- see build_torchvision_resnet

    model = build(spec)
    if isinstance(module, ResNet):
        model.net.load_state_dict(module.state_dict())
    else:
        model.load_state_dict(module.state_dict())
    return model


_RESNET_LAYOUTS = {("BasicBlock", (1, 1, 1, 1)): "resnet10", ("BasicBlock", (2, 2, 2, 2)): "resnet18",
                   ("BasicBlock", (3, 4, 6, 3)): "resnet34", ("Bottleneck", (3, 4, 6, 3)): "resnet50"}


def resnet_arch_of(module: nn.Module) -> str:
    """The zoo arch name of a torchvision ResNet in the small-image layout, else ValueError saying why.

    The layout is ours (SmallImageResNet): ``conv1`` 3x3 stride 1, ``maxpool`` Identity, width 64.
    """
    conv1 = module.conv1
    if tuple(conv1.kernel_size) != (3, 3) or tuple(conv1.stride) != (1, 1) or not isinstance(module.maxpool, nn.Identity):
        raise ValueError(f"torchvision ResNet with conv1 {tuple(conv1.kernel_size)} stride {tuple(conv1.stride)} and "
                         f"maxpool {type(module.maxpool).__name__}: only the small-image layout is supported "
                         "(conv1 = Conv2d(C, 64, 3, 1, 1, bias=False), maxpool = Identity)")
    layers = [module.layer1, module.layer2, module.layer3, module.layer4]
    key = (type(layers[0][0]).__name__, tuple(len(layer) for layer in layers))
    if key not in _RESNET_LAYOUTS or conv1.out_channels != 64:
        raise ValueError(f"torchvision ResNet with {key[0]} blocks {list(key[1])} and width {conv1.out_channels} "
                         f"is not one of {sorted(_RESNET_LAYOUTS.values())}")
    return _RESNET_LAYOUTS[key]


def load_state(path: str | Path, spec: ArchSpec) -> nn.Module:
    """Build ``spec``'s zoo model and load a plain safetensors state dict into it (eval mode).

    For ResNets the state dict may be the zoo model's (``net.*`` keys) or a bare torchvision
    ResNet's. Shape or key mismatches are ValueErrors naming the file.
    """
    state, _ = read_weights(path)
    model = build(spec)
    target = families.get(spec.family).state_target(model, state)
    try:
        target.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys, size mismatches
        first = str(err).strip().splitlines()
        raise ValueError(f"weights file {path} does not fit {spec.arch} (input_shape {list(spec.input_shape)}, "
                         f"hidden_size {spec.hidden_size}, num_classes {spec.num_classes}): "
                         f"{' '.join(line.strip() for line in first[:4])}") from None
    return model.eval()


def save(model: nn.Module, path: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write weights + architecture to one safetensors file (atomic: rename locally, one put remotely).

    A model from another adapter (``adapters.HookedModel``) adds how it is rebuilt (``save_metadata``)."""
    own = model.save_metadata() if hasattr(model, "save_metadata") else {}
    meta = {"arch_spec": model.spec.to_json(), "format_version": str(FORMAT_VERSION), **own, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fsio.write_bytes_atomic(fsio.as_path(path), safetensors_save(state, metadata=meta))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file, local or on an object store; errors name the file."""
    path = fsio.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        data = path.read_bytes()
        header = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header]).get("__metadata__") or {}
        return safetensors_load(data), meta
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"weights file {path} is not a readable safetensors file: {err}") from None


def load(path: str | Path) -> nn.Module:
    """Rebuild a zoo model from its safetensors file (eval mode). Any base model, a user's module
    included, is rebuilt by ``adapters.load``."""
    state, meta = read_weights(path)
    return from_weights(path, state, meta)


def from_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
    """The zoo model of a weights file's (state dict, metadata), as ``read_weights`` gives them (eval mode)."""
    if "arch_spec" not in meta:
        raise ValueError(f"weights file {path} has no 'arch_spec' metadata; it was not written by dynamo_dist")
    if "adapter" in meta:
        raise ValueError(f"weights file {path} holds a user's module, rebuilt by its factory or program: load it "
                         "with dynamo_dist.adapters.load")
    model = build(ArchSpec.from_json(meta["arch_spec"]))
    model.load_state_dict(state)
    return model.eval()


def hidden_shapes(spec: ArchSpec) -> list[tuple[int, ...]]:
    """Shape of each hidden tap per example (without batch/time), from a dry run."""
    model = build(spec).eval()
    if spec.input_kind == "tokens":
        x = torch.zeros((1,) + tuple(spec.input_shape), dtype=torch.long)
    else:
        x = torch.zeros((1,) + tuple(spec.input_shape))
    with torch.no_grad():
        hs, _ = model.trajectories(x)
    return families.get(spec.family).hidden_shapes(hs)
