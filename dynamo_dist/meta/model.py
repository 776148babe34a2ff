"""DYNAMO meta-models (paper B.1, Algorithm 2) and the per-model embedding table.

Shape legend: B batch, T time, D input features, M meta hidden units, E embedding dim d,
K output groups. The shared meta-model (F~, G~ heads) is what data-parallel training
all-reduces; ``ModelEmbeddings`` (theta_n and V_n) is a separate module that is never
wrapped in DDP, like a sharded embedding table beside dense layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..zoo import ArchSpec, family_of


class MetaRNN(nn.Module):
    """GRU fed ``[x_t; theta]`` at every step; h_0 = 0 (independent of theta); one head per output group."""

    family = "rnn"

    def __init__(self, input_spec: ArchSpec, hidden_size: int, embedding_dim: int,
                 output_sizes: Mapping[str, int], embed_dim: int = 64):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        if input_spec.input_kind == "tokens":
            self.embed = nn.Embedding(input_spec.vocab_size, embed_dim, padding_idx=0)
            in_dim = embed_dim
        else:
            self.embed = None
            in_dim = input_spec.input_shape[-1]
        self.cell = nn.GRU(in_dim + embedding_dim, hidden_size, batch_first=True)
        self.heads = nn.ModuleDict({g: nn.Linear(hidden_size, c) for g, c in sorted(output_sizes.items())})

    @property
    def tap_dims(self) -> list[int]:
        return [self.hidden_size]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) if self.embed is not None else x

    def forward(self, x: torch.Tensor, theta_BE: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (B,T,D) or (B,T) tokens; theta_BE: (B,E) -> ([h_BTM], {group: y_BTC}).

        Every head is evaluated so that data-parallel training sees every shared
        parameter used at every step (heads are tiny next to the recurrence).
        """
        u = self.encode(x)
        th = theta_BE[:, None, :].expand(-1, u.shape[1], -1)
        h_BTM, _ = self.cell(torch.cat([u, th], dim=-1))
        return [h_BTM], {g: head(h_BTM) for g, head in self.heads.items()}

    def theta_weights(self) -> list[torch.Tensor]:
        """The weights that multiply theta: the GRU's input weights of the theta columns, (3M, E)."""
        return [self.cell.weight_ih_l0[:, -self.embedding_dim:]]

    def step(self, x_BD: torch.Tensor, theta_BE: torch.Tensor, h_BM: torch.Tensor) -> torch.Tensor:
        """One application of F~(theta, x, h) -> next h (for fixed-point analysis); x_BD already encoded."""
        out, _ = self.cell(torch.cat([x_BD, theta_BE], dim=-1)[:, None, :], h_BM[None])
        return out[:, 0]


NORM_GROUPS = 32  # GroupNorm groups in the meta-ResNet (Wu & He 2018's default; every width is a multiple)
_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # what a BatchNorm state has beyond GN's


def _norm(channels: int) -> nn.GroupNorm:
    """The meta-ResNet's normalisation: GroupNorm, not the paper's BatchNorm.

    BatchNorm normalises over the batch, and a DYNAMO batch mixes the examples of several
    base models, each conditioned on its own theta: in training, model n's hidden states then
    depend on which models were sampled beside it (and, under Ray Train, on the worker's
    shard), while evaluation uses running statistics that only rank 0's batches feed (DDP
    broadcasts rank 0's buffers every forward) -- so another worker's own test metrics and a
    reloaded run's differ. GroupNorm normalises each example alone: the same output for the
    same (x, theta) in training and evaluation, whatever shares the batch and whatever W; the
    meta-model has no buffers left to broadcast or average.
    """
    return nn.GroupNorm(min(NORM_GROUPS, channels), channels)


class ThetaBasicBlock(nn.Module):
    """Algorithm 2: ``z = ReLU(N(conv(x)) + W theta); z = N(conv(z)); ReLU(x + z)``, N = GroupNorm (``_norm``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, theta_proj: nn.Linear):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = _norm(out_ch)
        self.theta_proj = theta_proj  # shared by all blocks of this width (registered once on the parent)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(out_ch))
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor, theta_BE: torch.Tensor) -> torch.Tensor:
        z = self.norm1(self.conv1(x)) + self.theta_proj(theta_BE)[:, :, None, None]
        z = self.norm2(self.conv2(torch.relu(z)))
        return torch.relu(self.shortcut(x) + z)


_BLOCKS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}
_WIDTHS = (64, 128, 256, 512)


class MetaResNet(nn.Module):
    """ResNet meta-model whose residual blocks add W theta to the channels (appendix A, B.1).

    Uses basic blocks at every depth (the theta bias goes in after the first conv of each block);
    taps are the four stage outputs, matching the base models' h_1..h_4. Normalisation is
    GroupNorm (``_norm`` says why), so an example's outputs depend only on its own (x, theta);
    the base ResNets being emulated keep their BatchNorm.
    """

    family = "cnn"

    def __init__(self, input_spec: ArchSpec, arch: str, embedding_dim: int, output_sizes: Mapping[str, int]):
        super().__init__()
        self.embedding_dim = embedding_dim
        in_ch = input_spec.input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False), _norm(64), nn.ReLU())
        self.theta_proj = nn.ModuleDict({str(w): nn.Linear(embedding_dim, w, bias=False) for w in _WIDTHS})
        self.stages = nn.ModuleList()
        prev = 64
        for i, (w, n) in enumerate(zip(_WIDTHS, _BLOCKS[arch])):
            blocks = nn.ModuleList()
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ThetaBasicBlock(prev, w, stride, self.theta_proj[str(w)]))
                prev = w
            self.stages.append(blocks)
        self.heads = nn.ModuleDict({g: nn.Linear(prev, c) for g, c in sorted(output_sizes.items())})

    @property
    def tap_dims(self) -> list[int]:
        return list(_WIDTHS)

    def forward(self, x: torch.Tensor, theta_BE: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """x: (B,C,H,W); theta_BE: (B,E) -> ([stage1..stage4 maps], {group: logits (B,1,C)})."""
        z = self.stem(x)
        taps = []
        for blocks in self.stages:
            for block in blocks:
                z = block(z, theta_BE)
            taps.append(z)
        pooled = z.mean(dim=(2, 3))
        return taps, {g: head(pooled)[:, None, :] for g, head in self.heads.items()}

    def theta_weights(self) -> list[torch.Tensor]:
        """The weights that multiply theta: one (width, E) projection per channel width."""
        return [proj.weight for proj in self.theta_proj.values()]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; the state of a BatchNorm meta-ResNet is refused
        (``refuse_batchnorm_state``), not met with a missing-key traceback."""
        refuse_batchnorm_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def refuse_batchnorm_state(state_dict: Mapping) -> None:
    """ValueError, saying why, for a meta-ResNet state with BatchNorm statistics: one written by an
    older dynamo_dist (whose meta-ResNet used BatchNorm), which cannot be loaded or resumed."""
    stats = sorted(k for k in state_dict if k.rsplit(".", 1)[-1] in _BATCHNORM_BUFFERS)
    if stats:
        raise ValueError(f"meta-ResNet state has BatchNorm statistics ({stats[0]!r} and {len(stats) - 1} more): "
                         "it was trained by an older dynamo_dist whose meta-ResNet used BatchNorm; the "
                         "meta-ResNet now uses GroupNorm (dynamo_dist.meta.model._norm), so the run cannot "
                         "be loaded or resumed: train the meta stage again into a new meta.output_dir")


def output_sizes(rows: Sequence[Mapping]) -> dict[str, int]:
    """Output group -> output size. Groups are tasks: models of one task share a head (section 2.2)."""
    sizes: dict[str, int] = {}
    for r in rows:
        prev = sizes.setdefault(r["task"], int(r["num_classes"]))
        if prev != int(r["num_classes"]):
            raise ValueError(f"task {r['task']!r} has models with {prev} and {r['num_classes']} outputs")
    return sizes


def tap_widths(family: str, hidden_shapes: Sequence[Sequence[int]]) -> list[int]:
    """A base model's hidden width per tap from its per-example state shapes: (H,) RNN, (C,H,W) CNN."""
    return [s[-1] if family == "rnn" else s[0] for s in hidden_shapes]


def build(rows: Sequence[Mapping], cfg, model_ids: Sequence[str], base_dims: Sequence[Sequence[int]], *,
          meta_seed: int | None = None, embeddings_seed: int | None = None) -> tuple[nn.Module, ModelEmbeddings]:
    """The one construction of a meta-model and the ``ModelEmbeddings`` of ``model_ids``.

    ``rows``: manifest rows of the whole population (they fix the family, the input encoder
    and the output heads, identical on every worker); ``cfg``: a ``MetaConfig`` (shape
    fields); ``base_dims[i]``: model i's width per tap (``tap_widths``, or a checkpoint's
    maps). Seeds, when given, make the initialisation reproducible: the shared weights are
    seeded alike on every worker, the embeddings per worker.
    """
    family = family_of(rows[0]["arch"])
    if meta_seed is not None:
        torch.manual_seed(meta_seed)
    meta = build_meta_model(family, ArchSpec.from_row(rows[0]), output_sizes(rows), embedding_dim=cfg.embedding_dim,
                            hidden_size=cfg.hidden_size, embed_dim=cfg.embed_dim, resnet_arch=cfg.resnet_arch)
    if embeddings_seed is not None:
        torch.manual_seed(embeddings_seed)
    return meta, ModelEmbeddings(model_ids, cfg.embedding_dim, meta.tap_dims, base_dims, family)


def build_meta_model(family: str, input_spec: ArchSpec, output_sizes: Mapping[str, int], *, embedding_dim: int,
                     hidden_size: int = 128, embed_dim: int = 64, resnet_arch: str = "resnet10") -> nn.Module:
    if family == "rnn":
        return MetaRNN(input_spec, hidden_size, embedding_dim, output_sizes, embed_dim=embed_dim)
    if family == "cnn":
        return MetaResNet(input_spec, resnet_arch, embedding_dim, output_sizes)
    raise ValueError(f"family: unknown model family {family!r} (rnn | cnn)")


class ModelEmbeddings(nn.Module):
    """theta_n (initialised to 0, Algorithm 1) and maps V_n for a set (shard) of base models.

    ``base_dims[i]`` lists base model i's hidden size per tap; V_{n,t} is affine
    (Linear for RNN taps, 1x1 Conv for CNN feature maps), from meta width to base width.
    """

    def __init__(self, model_ids: Sequence[str], embedding_dim: int, meta_dims: Sequence[int],
                 base_dims: Sequence[Sequence[int]], family: str):
        super().__init__()
        if len(model_ids) != len(base_dims):
            raise ValueError("base_dims: one entry per model id is required")
        self.model_ids = list(model_ids)
        self.index = {m: i for i, m in enumerate(self.model_ids)}
        self.family = family
        # One parameter per model: rows of unsampled models keep grad=None, so AdamW leaves
        # them (and their moments) untouched instead of drifting them with stale momentum.
        self.theta = nn.ParameterList(nn.Parameter(torch.zeros(embedding_dim)) for _ in model_ids)
        make = (lambda a, b: nn.Linear(a, b)) if family == "rnn" else (lambda a, b: nn.Conv2d(a, b, 1))
        self.maps = nn.ModuleList(
            nn.ModuleList(make(m, b) for m, b in zip(meta_dims, dims)) for dims in base_dims
        )

    def parameters_of(self, row: int) -> list[nn.Parameter]:
        """theta_n and V_n's parameters of one model (a row of this shard)."""
        return [self.theta[row], *self.maps[row].parameters()]

    def theta_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), E) differentiable stack of the selected embeddings."""
        return torch.stack([self.theta[r] for r in rows])

    def theta_matrix(self) -> torch.Tensor:
        """(N, E) detached copy of every embedding in this shard."""
        return torch.stack([p.detach() for p in self.theta]) if len(self.theta) else torch.zeros(0)

    def apply_maps(self, row: int, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """V_{n,t}(h_{theta_n,t}) for every tap t."""
        return [v(h) for v, h in zip(self.maps[row], hiddens)]
