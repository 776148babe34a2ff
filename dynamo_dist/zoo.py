"""Base-model zoo: RNN classifiers and small-image ResNets that expose their hidden states.

Every model implements ``trajectories(x) -> (hiddens, outputs)``:

* sequence models: ``hiddens = [h_BTH]`` (one tap, the hidden state at every step) and
  ``outputs = y_BTC`` (the readout G(h_t) at every step);
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

from .config import RESNET_ARCHS, SEQUENCE_ARCHS
from .data import fsio

FORMAT_VERSION = 1


def family_of(arch: str) -> str:
    """The one place that says rnn | cnn: ResNets are "cnn", every recurrent arch is "rnn"."""
    return "cnn" if arch in RESNET_ARCHS else "rnn"


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a base model (stored beside its weights)."""

    arch: str                      # gru | rnn | lstm | resnet10/18/34/50
    input_kind: str                # sequence | tokens | image
    input_shape: tuple[int, ...]   # per-example input shape: (T, D), (T,), (C, H, W)
    num_classes: int
    hidden_size: int = 64          # RNN hidden units
    embed_dim: int = 64            # token embedding width
    vocab_size: int | None = None  # token inputs only

    def __post_init__(self):
        if self.arch not in SEQUENCE_ARCHS + RESNET_ARCHS:
            raise ValueError(f"arch: unknown architecture {self.arch!r}; known: {SEQUENCE_ARCHS + RESNET_ARCHS}")
        if self.arch in RESNET_ARCHS and self.input_kind != "image":
            raise ValueError(f"arch: {self.arch} needs image inputs, task gives {self.input_kind!r}")
        if self.arch in SEQUENCE_ARCHS and self.input_kind == "image":
            raise ValueError(f"arch: {self.arch} needs sequence or token inputs, task gives images")
        if self.input_kind == "tokens" and not self.vocab_size:
            raise ValueError("vocab_size: token inputs need a vocabulary size")

    @property
    def family(self) -> str:
        return family_of(self.arch)

    @classmethod
    def from_row(cls, row: dict) -> "ArchSpec":
        """The spec of a manifest row (``data.store.MANIFEST_COLUMNS``)."""
        return cls(arch=row["arch"], input_kind=row["input_kind"], input_shape=tuple(row["input_shape"]),
                   num_classes=int(row["num_classes"]), hidden_size=int(row["hidden_size"] or 0) or 64,
                   vocab_size=row.get("vocab_size"))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        d = json.loads(text)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


class SequenceClassifier(nn.Module):
    """Single-layer GRU / tanh-RNN / LSTM classifier reading out at every step."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        if spec.input_kind == "tokens":
            self.embed = nn.Embedding(spec.vocab_size, spec.embed_dim, padding_idx=0)
            in_dim = spec.embed_dim
        else:
            self.embed = None
            in_dim = spec.input_shape[-1]
        rnn_cls = {"gru": nn.GRU, "rnn": nn.RNN, "lstm": nn.LSTM}[spec.arch]
        self.rnn = rnn_cls(in_dim, spec.hidden_size, batch_first=True)
        self.readout = nn.Linear(spec.hidden_size, spec.num_classes)

    def trajectories(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B,T,D) float or (B,T) token ids -> ([h_BTH], y_BTC)."""
        u = self.embed(x) if self.embed is not None else x
        h_BTH, _ = self.rnn(u)  # h_0 = 0; LSTM: h_t (not the cell state) is the hidden state
        return [h_BTH], self.readout(h_BTH)

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
    return SmallImageResNet(spec) if spec.family == "cnn" else SequenceClassifier(spec)


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
    target = model.net if spec.family == "cnn" and not any(k.startswith("net.") for k in state) else model
    try:
        target.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys, size mismatches
        first = str(err).strip().splitlines()
        raise ValueError(f"weights file {path} does not fit {spec.arch} (input_shape {list(spec.input_shape)}, "
                         f"hidden_size {spec.hidden_size}, num_classes {spec.num_classes}): "
                         f"{' '.join(line.strip() for line in first[:4])}") from None
    return model.eval()


def save(model: nn.Module, path: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write weights + architecture to one safetensors file (atomic: rename locally, one put remotely)."""
    meta = {"arch_spec": model.spec.to_json(), "format_version": str(FORMAT_VERSION), **(extra or {})}
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
    """Rebuild a zoo model from its safetensors file (eval mode)."""
    state, meta = read_weights(path)
    if "arch_spec" not in meta:
        raise ValueError(f"weights file {path} has no 'arch_spec' metadata; it was not written by dynamo_dist")
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
    if spec.family == "rnn":
        return [tuple(hs[0].shape[2:])]
    return [tuple(h.shape[1:]) for h in hs]
