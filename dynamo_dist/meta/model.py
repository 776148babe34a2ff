"""DYNAMO meta-models (paper B.1, Algorithm 2) and the per-model embedding table.

Shape legend: B batch, T time, D input features, M meta hidden units, E embedding dim d,
K output groups. The shared meta-model (F~, G~ heads) is what data-parallel training
all-reduces; ``ModelEmbeddings`` (theta_n and V_n) is a separate module that is never
all-reduced, like a sharded embedding table beside dense layers.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import family as families
from ..zoo import ArchSpec, family_of
from .adamw import BETAS, EPS, adamw_update
from .gru import gru_sequence, gru_step


def _escape(group: str) -> str:
    return group.replace("%", "%25").replace(".", "%2E")


def _unescape(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


class GroupHeads(nn.ModuleDict):
    """One head per output group, keyed by the group (task) name as it is. Task names may hold dots
    (``npz:/data/set.npz``), which module names cannot: they are escaped in the module (and
    state-dict) keys only, reversibly; names without ``.`` or ``%`` keep their keys, so
    earlier checkpoints load as they are."""

    def __getitem__(self, group: str) -> nn.Module:
        return self._modules[_escape(group)]

    def __setitem__(self, group: str, module: nn.Module) -> None:
        self.add_module(_escape(group), module)

    def __delitem__(self, group: str) -> None:
        del self._modules[_escape(group)]

    def __contains__(self, group: object) -> bool:
        return isinstance(group, str) and _escape(group) in self._modules

    def __iter__(self):
        return (_unescape(k) for k in self._modules)

    def keys(self):
        return list(iter(self))

    def items(self):
        return [(_unescape(k), m) for k, m in self._modules.items()]


class MetaRNN(nn.Module):
    """GRU fed ``[x_t; theta]`` at every step; h_0 = 0 (independent of theta); one head per output group.

    ``theta_readout``: the heads read ``h * (1 + A theta) + B theta`` (a FiLM of the readout by theta,
    A and B starting at 0, so the start is the paper's theta-independent G~). Models whose
    decisions differ by their readout more than by their dynamics (low-confidence classifiers)
    are then matched by theta directly, not only through the recurrence (``meta.method`` varpro).
    """

    def __init__(self, input_spec: ArchSpec, hidden_size: int, embedding_dim: int,
                 output_sizes: Mapping[str, int], embed_dim: int = 64, theta_readout: bool = False,
                 theta_gain: bool = False):
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
        self.heads = GroupHeads({g: nn.Linear(hidden_size, c) for g, c in sorted(output_sizes.items())})
        # zeros, drawn from no generator: the other weights are those of the same seed without it
        self.readout_film = (nn.Parameter(torch.zeros(2 * hidden_size, embedding_dim)) if theta_readout else None)
        # theta_gain: theta also scales the recurrence, (W_hh h + b_hh) * (1 + U theta), U (3M, E) from 0
        self.recurrence_gain = (nn.Parameter(torch.zeros(3 * hidden_size, embedding_dim)) if theta_gain else None)

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
        h_BTM = gru_sequence(self.cell, self.encode(x), theta_BE, self.recurrence_gain)
        z = self._film(h_BTM, theta_BE[:, None, :])
        return [h_BTM], {g: head(z) for g, head in self.heads.items()}

    def _film(self, h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """What the heads read: h itself, or its FiLM by theta (``theta_readout``); theta broadcasts to h."""
        if self.readout_film is None:
            return h
        scale, shift = F.linear(theta, self.readout_film).chunk(2, dim=-1)
        return h * (1 + scale) + shift

    def readout(self, group: str, theta_E: torch.Tensor):
        """G~ of ``group`` at ``theta``: a function of states (..., M) -> outputs (..., C)."""
        head = self.heads[group]
        theta_E = torch.as_tensor(theta_E, dtype=torch.float32).detach()
        return lambda h: head(self._film(h, theta_E))

    def theta_weights(self) -> list[torch.Tensor]:
        """The weights that multiply theta: the GRU's input weights of the theta columns, (3M, E), the
        readout's FiLM (2M, E) and the recurrence's gain (3M, E) when there are."""
        extra = [w for w in (self.readout_film, self.recurrence_gain) if w is not None]
        return [self.cell.weight_ih_l0[:, -self.embedding_dim:], *extra]

    def step(self, x_BD: torch.Tensor, theta_BE: torch.Tensor, h_BM: torch.Tensor) -> torch.Tensor:
        """One application of F~(theta, x, h) -> next h (for fixed-point analysis); x_BD already encoded."""
        return gru_step(self.cell, x_BD, theta_BE, h_BM, self.recurrence_gain)


NORM_GROUPS = 32  # GroupNorm groups in the meta-ResNet (Wu & He 2018's default; every width is a multiple)
_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # what a BatchNorm state has beyond GN's


def _norm(channels: int) -> nn.GroupNorm:
    """The meta-ResNet's normalisation: GroupNorm, not the paper's BatchNorm.

    BatchNorm normalises over the batch, and a DYNAMO batch mixes the examples of several
    base models, each conditioned on its own theta: in training, model n's hidden states then
    depend on which models were sampled beside it (and, under Ray Train, on the worker's
    shard), while evaluation uses running statistics that only rank 0's batches feed (DistributedDataParallel
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
        self.heads = GroupHeads({g: nn.Linear(prev, c) for g, c in sorted(output_sizes.items())})

    @property
    def tap_dims(self) -> list[int]:
        return list(_WIDTHS)

    @staticmethod
    def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
        """(H, W) of the four stage maps for (height, width) images: the stem keeps the size, each later
        stage's first 3x3 conv (stride 2, padding 1) maps n to (n - 1) // 2 + 1. A base model's V_n is a
        1x1 conv, so its stage maps must have these sizes (its channels may be any)."""
        sizes = [(height, width)]
        for _ in _WIDTHS[1:]:
            h, w = sizes[-1]
            sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
        return sizes

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
    fam = families.get(family)
    return [fam.tap_width(s) for s in hidden_shapes]


def build(rows: Sequence[Mapping], cfg, model_ids: Sequence[str], base_dims: Sequence[Sequence[int]], *,
          meta_seed: int | None = None, embeddings_seed: int | None = None) -> tuple[nn.Module, ModelEmbeddings]:
    """The construction of a meta-model and the ``ModelEmbeddings`` of ``model_ids`` (post-hoc embedding
    builds only new ``ModelEmbeddings`` beside a loaded meta-model).

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
                            hidden_size=cfg.hidden_size, embed_dim=cfg.embed_dim, resnet_arch=cfg.resnet_arch,
                            theta_readout=cfg.method == "varpro", theta_gain=cfg.theta_gain)
    if embeddings_seed is not None:
        torch.manual_seed(embeddings_seed)
    return meta, ModelEmbeddings(model_ids, cfg.embedding_dim, meta.tap_dims, base_dims, family,
                                 memory_bytes=cfg.table_bytes)


def build_meta_model(family: str, input_spec: ArchSpec, output_sizes: Mapping[str, int], *, embedding_dim: int,
                     hidden_size: int = 128, embed_dim: int = 64, resnet_arch: str = "resnet10",
                     theta_readout: bool = False, theta_gain: bool = False) -> nn.Module:
    """The meta-model of ``family`` (``Family.meta_model``: each family reads the shape fields it needs)."""
    return families.get(family).meta_model(input_spec, output_sizes, embedding_dim=embedding_dim,
                                           hidden_size=hidden_size, embed_dim=embed_dim, resnet_arch=resnet_arch,
                                           theta_readout=theta_readout, theta_gain=theta_gain)


_MOMENT_TABLES = ("theta_m", "theta_v", "maps_m", "maps_v", "steps")


class TableLayout:
    """Where each model's theta and V_n parameters lie in the stacked tables of ``ModelEmbeddings``
    (and of a table-form checkpoint shard): theta is row i of an (N, E) table; V_n's weight and bias
    per tap lie one after the other in a flat table from ``offsets[i]``."""

    def __init__(self, family: str, meta_dims: Sequence[int], base_dims: Sequence[Sequence[int]]):
        self.family = family
        self.family_ops = families.get(family)  # ValueError for an unknown one
        self.meta_dims = [int(m) for m in meta_dims]
        self.base_dims = [[int(b) for b in dims] for dims in base_dims]
        if any(len(dims) != len(self.meta_dims) for dims in self.base_dims):
            raise ValueError(f"base_dims: every model needs one width per tap ({len(self.meta_dims)} taps)")
        sizes = [sum(b * m + b for m, b in zip(self.meta_dims, dims)) for dims in self.base_dims]
        self.offsets = [0] * len(sizes)
        for i in range(1, len(sizes)):
            self.offsets[i] = self.offsets[i - 1] + sizes[i - 1]
        self.total = self.offsets[-1] + sizes[-1] if sizes else 0
        self.names = [f"{t}.{k}" for t in range(len(self.meta_dims)) for k in ("weight", "bias")]

    def bounds(self, row: int) -> tuple[int, int]:
        """Where model ``row``'s V parameters start and end in a maps-layout table."""
        return self.offsets[row], self.offsets[row + 1] if row + 1 < len(self.offsets) else self.total

    def map_views(self, row: int, table: torch.Tensor) -> list[torch.Tensor]:
        """Views of model ``row``'s V parameters in a maps-layout ``table``: weight, bias per tap."""
        views, at = [], self.offsets[row]
        for m, b in zip(self.meta_dims, self.base_dims[row]):
            shape = self.family_ops.map_shape(b, m)
            views += [table[at:at + b * m].view(shape), table[at + b * m:at + b * m + b]]
            at += b * m + b
        return views

    def param_views(self, row: int, theta_table: torch.Tensor, maps_table: torch.Tensor) -> list[torch.Tensor]:
        """Model ``row``'s parameters in ``parameters_of`` order (theta, then weight, bias per tap),
        as views of a theta-layout and a maps-layout table (the parameters or a moment)."""
        return [theta_table[row], *self.map_views(row, maps_table)]

    def row_state(self, row: int, tables: Mapping[str, torch.Tensor]) -> dict:
        """Model ``row``'s ``{"theta", "maps": V state dict, "opt": AdamW state per parameter}`` as views
        of ``tables``; ``opt`` entries are None for parameters never updated and where the tables hold
        no moments (an inference copy)."""
        state = {"theta": tables["theta"][row], "maps": dict(zip(self.names, self.map_views(row, tables["maps"])))}
        if "steps" not in tables:
            return {**state, "opt": [None] * (1 + len(self.names))}
        m_views = self.param_views(row, tables["theta_m"], tables["maps_m"])
        v_views = self.param_views(row, tables["theta_v"], tables["maps_v"])
        steps = tables["steps"]
        opt = [None if float(steps[row, k]) == 0 else {"step": steps[row, k], "exp_avg": m, "exp_avg_sq": v}
               for k, (m, v) in enumerate(zip(m_views, v_views))]
        return {**state, "opt": opt}


class TableStates(Mapping):
    """``{model_id: state}`` of a table-form shard (``ModelEmbeddings.table_state``) without a tensor
    per model in memory: a model's state is made when it is read, as views of the tables, or copies
    with ``copy=True`` (then nothing read refers to a memory-mapped file). ``only``: these models."""

    def __init__(self, raw: Mapping, only: set[str] | None = None, copy: bool = False):
        self.raw = raw
        self._layout = TableLayout(raw["family"], raw["meta_dims"], raw["base_dims"])
        ids = raw["model_ids"]
        self._row = {m: i for i, m in enumerate(ids) if only is None or m in only}
        self._copy = copy

    def __getitem__(self, model_id: str) -> dict:
        state = self._layout.row_state(self._row[model_id], self.raw["tables"])
        return _map_tensors(state, torch.clone) if self._copy else state

    def __iter__(self):
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def without_moments(self) -> dict:
        """The raw table-form state without AdamW moments (what loading a meta-model needs)."""
        return {**self.raw, "tables": {k: v for k, v in self.raw["tables"].items() if k not in _MOMENT_TABLES}}


def is_table_state(obj) -> bool:
    """Whether ``obj`` (a loaded shard file) is the table form rather than ``{model_id: state}``."""
    return isinstance(obj, Mapping) and obj.get("layout") == "tables"


class ModelEmbeddings(nn.Module):
    """theta_n (initialised to 0, Algorithm 1) and maps V_n for a set (shard) of base models.

    ``base_dims[i]`` lists base model i's hidden size per tap; V_{n,t} is affine
    (Linear for RNN taps, 1x1 Conv for CNN feature maps), from meta width to base width,
    initialised as ``nn.Linear``/``nn.Conv2d`` initialise themselves.

    Storage is stacked, like a sharded embedding table: theta is one (N, E) table, every
    model's V_n parameters lie in one flat float32 table (model i's from ``offsets[i]``),
    and their AdamW moments in tables of the same layout, with a step count per model and
    parameter (0: never updated). One Python Parameter and module per model and parameter,
    with AdamW state dicts beside them, cost ~54 KB per model whatever its size (measured,
    ``benchmarks/bench_theta_table.py``: 5,000 models with a 32->16 map, 6.4 KB of numbers each
    with their moments, took 271 MB that way and take 62 MB as tables).

    ``theta[i]``, ``maps[i]`` and ``parameters_of(i)`` are leaf Parameters (and modules around
    them) that share the tables' memory, made for the rows in use and kept for the most
    recently used ``live_rows``, and every row read with gradients enabled until ``adam_step`` or
    ``release`` (a backward pass must find the leaves the forward used): in-place writes, optimiser
    steps and ``load_state_dict`` land in the tables.

    ``memory_bytes``: when V's table and its two moment tables together are larger, they are
    memory-mapped files on local disk (``table_dir``, default the temp dir; unlinked at once, so
    they go with the process, a crash included) that the OS pages in as rows are used (``on_disk``).
    The rows used last stay resident up to ``memory_bytes``; older ones are handed back to the OS
    (``page_out``), their values kept in the file. theta and the step counts stay in memory
    (N x E). ``.to(device)`` moves every table into that device's memory, as always.
    """

    def __init__(self, model_ids: Sequence[str], embedding_dim: int, meta_dims: Sequence[int],
                 base_dims: Sequence[Sequence[int]], family: str, live_rows: int = 1024,
                 memory_bytes: int | None = None, table_dir: str | None = None):
        super().__init__()
        if len(model_ids) != len(base_dims):
            raise ValueError("base_dims: one entry per model id is required")
        self.layout = TableLayout(family, meta_dims, base_dims)
        self.model_ids = list(model_ids)
        self.index = {m: i for i, m in enumerate(self.model_ids)}
        self.family = family
        self.meta_dims = self.layout.meta_dims
        self.live_rows = live_rows
        n, total = len(self.model_ids), self.layout.total
        self._mapped: dict[str, _FileTable] = {}  # tables in files, by buffer name
        self._resident: OrderedDict[int, int] = OrderedDict()  # rows of the files paged in: row -> bytes
        self._resident_bytes, self._memory_bytes = 0, memory_bytes
        on_disk = memory_bytes is not None and 3 * 4 * total > memory_bytes and total > 0
        maps_tables = {}
        for name in ("maps_table", "maps_exp_avg", "maps_exp_avg_sq"):
            if on_disk:
                maps_tables[name], self._mapped[name] = _file_table(total, table_dir)
                weakref.finalize(self, os.close, self._mapped[name].fd)
            else:
                maps_tables[name] = torch.zeros(total)
        self.register_buffer("theta_table", torch.zeros(n, embedding_dim))
        self.register_buffer("maps_table", maps_tables["maps_table"])
        for i in range(n):
            views = self.layout.map_views(i, self.maps_table)
            for w, b in zip(views[::2], views[1::2]):
                # nn.Linear / nn.Conv2d's reset_parameters, in their order: the same draws as modules
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(w[0].numel()) if w[0].numel() else 0.0
                nn.init.uniform_(b, -bound, bound)
            if self._mapped and i % 256 == 255:
                self.page_out(range(i - 255, i + 1))
        # AdamW state: not part of state_dict (checkpoints keep it, ``table_state``)
        self.register_buffer("theta_exp_avg", torch.zeros(n, embedding_dim), persistent=False)
        self.register_buffer("theta_exp_avg_sq", torch.zeros(n, embedding_dim), persistent=False)
        self.register_buffer("maps_exp_avg", maps_tables["maps_exp_avg"], persistent=False)
        self.register_buffer("maps_exp_avg_sq", maps_tables["maps_exp_avg_sq"], persistent=False)
        self.page_out()
        # on the CPU whatever the device, as AdamW keeps "step" when not capturable
        self.steps = torch.zeros(n, 1 + 2 * len(self.meta_dims))
        self._live: OrderedDict[int, list[nn.Parameter]] = OrderedDict()
        self._live_modules: dict[int, nn.ModuleList] = {}
        self._pinned: set[int] = set()
        self.theta = _Rows(self, lambda i: self.live(i)[0])
        self.maps = _Rows(self, self._modules_of)

    def _apply(self, fn, recurse=True):
        self._live.clear()  # .to() replaces the tables: leaves of the old ones would be stale
        self._live_modules.clear()
        self._pinned.clear()
        out = super()._apply(fn, recurse)
        self._mapped = {k: f for k, f in self._mapped.items()  # tables .to() moved are not
                        if getattr(self, k).device.type == "cpu" and getattr(self, k).data_ptr() == f.ptr}
        return out

    @property
    def on_disk(self) -> bool:
        """Whether V and its moments are memory-mapped files (``memory_bytes``) rather than in memory."""
        return bool(self._mapped)

    def table_files(self) -> dict[int, tuple[int, int]]:
        """``{data_ptr: (file descriptor, 0)}`` of the tables that are files: a checkpoint writer copies
        them from the file (``checkpoint.save_streamed``) instead of reading them through the mapping,
        which would page every row into this process at once."""
        return {f.ptr: (f.fd, 0) for f in self._mapped.values()}

    def _touch(self, row: int) -> None:
        """Count ``row``'s pages of the files as resident (most recent last); hand the oldest back
        beyond ``memory_bytes``."""
        if row not in self._resident:
            start, end = self.layout.bounds(row)
            self._resident[row] = 4 * len(self._mapped) * (end - start)
            self._resident_bytes += self._resident[row]
        self._resident.move_to_end(row)
        self._trim_resident()

    def _trim_resident(self) -> None:
        """Page out the least recently used rows, never one a pending backward pass needs, until the
        resident rows fit half of ``memory_bytes`` (one batch of madvise calls, not one a row)."""
        if self._resident_bytes <= (self._memory_bytes or 0):
            return
        out = []
        for row in list(self._resident):
            if self._resident_bytes <= (self._memory_bytes or 0) // 2:
                break
            if row not in self._pinned:
                self._resident_bytes -= self._resident.pop(row)
                out.append(row)
        self._page_out(out)

    def page_out(self, rows: Sequence[int] | None = None) -> None:
        """Hand the pages of ``rows`` (default every row) of the file-backed tables back to the OS: they
        leave this process's resident set, their values stay in the file (the page cache writes them
        back), and the next read pages them in again. Nothing to do for tables in memory."""
        if rows is None:
            self._resident.clear()
            self._resident_bytes = 0
        else:
            for r in rows:
                self._resident_bytes -= self._resident.pop(r, 0)
        self._page_out(rows)

    def _page_out(self, rows: Sequence[int] | None) -> None:
        if not self._mapped or not len(self) or (rows is not None and not len(rows)):
            return
        page = mmap.PAGESIZE
        if rows is None:
            spans = [(0, 4 * self.layout.total)]
        else:
            spans = [tuple(4 * b for b in self.layout.bounds(r)) for r in sorted(set(rows))]
        for mm, _, _ in self._mapped.values():
            for lo, hi in spans:
                lo, hi = lo - lo % page, min(-(-hi // page) * page, len(mm))
                if hi > lo:
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def __len__(self) -> int:
        return len(self.model_ids)

    def live(self, row: int) -> list[nn.Parameter]:
        """theta_n and V_n's parameters of model ``row`` as leaves sharing the tables' memory."""
        if torch.is_grad_enabled():  # a forward that gradients will flow back through: keep its leaves
            self._pinned.add(row)
        if self._mapped:
            self._touch(row)
        params = self._live.get(row)
        if params is not None:
            self._live.move_to_end(row)
            return params
        params = [nn.Parameter(v) for v in self.layout.param_views(row, self.theta_table, self.maps_table)]
        self._live[row] = params
        self._trim()
        return params

    def _trim(self) -> None:
        """Drop leaves beyond ``live_rows``, least recently used first, never a pinned row's."""
        excess = len(self._live) - self.live_rows
        if excess <= 0:
            return
        drop = []  # the oldest unpinned rows; the scan stops there (a step costs O(its rows), not O(live_rows))
        for r in self._live:
            if r not in self._pinned:
                drop.append(r)
                if len(drop) == excess:
                    break
        for old in drop:
            del self._live[old]
            self._live_modules.pop(old, None)

    def release(self, rows: Sequence[int] | None = None) -> None:
        """Unpin ``rows`` (default all): their leaves may be dropped again (``adam_step`` does this for
        the rows it updates; a caller optimising leaves with its own optimiser calls it when done)."""
        if rows is None:
            self._pinned.clear()
        else:
            self._pinned.difference_update(rows)
        self._trim()

    def _modules_of(self, row: int) -> nn.ModuleList:
        """V_n as modules (``nn.Linear``/``nn.Conv2d`` per tap) around the live leaves of ``row``."""
        params = self.live(row)
        mods = self._live_modules.get(row)
        if mods is None or mods[0].weight is not params[1]:
            mods = nn.ModuleList()
            for w, b in zip(params[1::2], params[2::2]):
                mod = self.layout.family_ops.map_module(w.shape[1], w.shape[0])
                mod.weight, mod.bias = w, b
                mods.append(mod)
            self._live_modules[row] = mods
        return mods

    def maps_of(self, row: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """V_n of model ``row`` as (weight, bias) leaves per tap (views of the tables: writes land there)."""
        params = self.live(row)
        return list(zip(params[1::2], params[2::2]))

    def maps_solved(self, row: int) -> bool:
        """Whether V_n of model ``row`` has been set before (solved, stepped or loaded): its step counts."""
        return bool(float(self.steps[row, 1]) > 0)

    def mark_maps_solved(self, row: int) -> None:
        """Count a closed-form solve of V_n as one update of its parameters (checkpointed, like AdamW's)."""
        self.steps[row, 1:] += 1

    def parameters_of(self, row: int) -> list[nn.Parameter]:
        """theta_n and V_n's parameters of one model (a row of this shard)."""
        return self.live(row)

    def theta_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), E) differentiable stack of the selected embeddings."""
        return torch.stack([self.live(r)[0] for r in rows])

    def theta_matrix(self) -> torch.Tensor:
        """(N, E) detached copy of every embedding in this shard."""
        return self.theta_table.detach().clone()

    def apply_maps(self, row: int, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """V_{n,t}(h_{theta_n,t}) for every tap t."""
        params = self.live(row)
        fam = self.layout.family_ops
        return [fam.apply_map(h, w, b) for h, w, b in zip(hiddens, params[1::2], params[2::2])]

    # ---------------------------------------------------------------- the row-sparse AdamW

    def adam_step(self, rows: Sequence[int], lr: float, betas: tuple[float, float] = BETAS,
                  eps: float = EPS, weight_decay: float = 0.0) -> None:
        """One AdamW step (``torch.optim.AdamW``'s update: ``adamw.adamw_update``) of the given models'
        parameters that have a gradient, with their moments from the tables; the gradients are cleared.
        Other models, and their moments, stay exactly as they were (a sparse update of the embedding table)."""
        params, grads, avgs, avg_sqs, steps = [], [], [], [], []
        for r in dict.fromkeys(rows):
            m_views = self.layout.param_views(r, self.theta_exp_avg, self.maps_exp_avg)
            v_views = self.layout.param_views(r, self.theta_exp_avg_sq, self.maps_exp_avg_sq)
            for k, p in enumerate(self.live(r)):
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                avgs.append(m_views[k])
                avg_sqs.append(v_views[k])
                steps.append(self.steps[r, k])
        if params:
            adamw_update(params, grads, avgs, avg_sqs, steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for p in params:
            p.grad = None
        self.release(rows)
        self._trim_resident()

    # ---------------------------------------------------------------- per-model state (checkpoints)

    def _tables(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta_table, "maps": self.maps_table, "theta_m": self.theta_exp_avg,
                "theta_v": self.theta_exp_avg_sq, "maps_m": self.maps_exp_avg, "maps_v": self.maps_exp_avg_sq,
                "steps": self.steps}

    def row_state(self, row: int) -> dict:
        """Model ``row``'s theta, V state dict and AdamW state per parameter (None: never updated),
        as CPU copies: the layout checkpoints keep per model."""
        return _map_tensors(self.layout.row_state(row, self._tables()), _cpu_copy)

    def table_state(self, copy: bool = True) -> dict:
        """Every model's state as one CPU copy of each table, with the layout: a checkpoint shard in
        a few tensors, whatever the number of models (``TableStates`` reads it per model).
        ``copy=False``: tables already on the CPU are given as they are (they change with training)."""
        host = _cpu_copy if copy else (lambda t: t.detach().cpu())
        return {"layout": "tables", "model_ids": list(self.model_ids), "family": self.family,
                "meta_dims": list(self.meta_dims), "base_dims": self.layout.base_dims,
                "tables": {k: host(v) for k, v in self._tables().items()}}

    def load_row_state(self, row: int, state: dict) -> None:
        """Write a ``row_state``-layout state of one model into the tables (``opt`` optional)."""
        names = self.layout.names
        maps = state["maps"]
        if set(maps) != set(names):
            raise ValueError(f"model {self.model_ids[row]!r}: V state has {sorted(maps)}, expected {names}")
        targets = self.layout.param_views(row, self.theta_table, self.maps_table)
        sources = [state["theta"], *(maps[n] for n in names)]
        for t, s in zip(targets, sources):
            if tuple(t.shape) != tuple(s.shape):
                raise ValueError(f"model {self.model_ids[row]!r}: a tensor of shape {tuple(s.shape)} "
                                 f"where {tuple(t.shape)} was expected")
        with torch.no_grad():
            for t, s in zip(targets, sources):
                t.copy_(s)
            m_views = self.layout.param_views(row, self.theta_exp_avg, self.maps_exp_avg)
            v_views = self.layout.param_views(row, self.theta_exp_avg_sq, self.maps_exp_avg_sq)
            for k, st in enumerate(state.get("opt") or [None] * len(targets)):
                if st is None:
                    self.steps[row, k] = 0.0
                    m_views[k].zero_()
                    v_views[k].zero_()
                else:
                    self.steps[row, k] = float(st["step"])
                    m_views[k].copy_(st["exp_avg"])
                    v_views[k].copy_(st["exp_avg_sq"])


class _Rows(Sequence):
    """``emb.theta`` / ``emb.maps``: model i's live theta leaf or V modules, by row."""

    def __init__(self, owner: ModelEmbeddings, get):
        self._owner, self._get = owner, get

    def __len__(self) -> int:
        return len(self._owner.model_ids)

    def __getitem__(self, row: int):
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} models")
        return self._get(row % len(self))


class _FileTable(NamedTuple):
    mm: mmap.mmap  # the shared mapping the table's tensor is a view of
    ptr: int       # the tensor's data_ptr
    fd: int        # the (unlinked) file, kept open for copies that bypass the mapping


def _file_table(numel: int, directory: str | None) -> tuple[torch.Tensor, _FileTable]:
    """A float32 table of ``numel`` zeros in a shared memory map of a new file under ``directory``
    (default the temp dir). The file is unlinked at once (it goes with the mapping and the returned
    descriptor, which the caller closes) and its blocks are reserved up front, so a full disk fails
    here, naming the directory, not as a SIGBUS later."""
    fd, path = tempfile.mkstemp(prefix="dynamo-table-", suffix=".f32", dir=directory)
    try:
        os.unlink(path)
        try:
            os.posix_fallocate(fd, 0, 4 * numel)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve: sparse
                os.ftruncate(fd, 4 * numel)
            else:
                raise OSError(err.errno, f"cannot reserve {4 * numel / 2 ** 30:.2f} GiB for a theta/V table "
                              f"on disk ({err.strerror}); free space or raise meta.table_bytes",
                              os.path.dirname(path)) from None
        mm = mmap.mmap(fd, 4 * numel)
    except BaseException:
        os.close(fd)
        raise
    table = torch.frombuffer(mm, dtype=torch.float32, count=numel)
    return table, _FileTable(mm, table.data_ptr(), fd)


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``t`` (one copy, also from a GPU)."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.cpu()
