"""K recurrent base models trained together: stacked weights, one batched recurrence.

Small RNNs leave a GPU (and, less so, a CPU core) idle: one GRU-32 step is a handful of
tiny matmuls. Stacking K models of one shape turns each of them into one batched matmul
(``torch.baddbmm`` over a leading model axis) without changing what any model computes:

* weights: each model is built exactly as ``train.train_model`` builds it (``manual_seed``
  then ``zoo.build``) and copied into (K, ...) tensors; ``state(k)`` is model k's
  ``nn.GRU``/``nn.RNN``/``nn.LSTM`` state dict again (same keys, same gate order);
* data: model k's rows (``fraction_indices`` of its seed and fraction) and its per-epoch
  ``randperm`` from its own generator, gathered from the one shared split;
* loss: the sum over models of each model's batch-mean cross entropy, so model k's gradient
  is the gradient it would get alone (a model whose epoch has no batch left contributes 0);
* optimiser: AdamW written over the model axis (per-model lr, cosine factor and step count;
  a model without a batch this step is left exactly as it is, moments included).

``nn.GRU`` has no ``vmap`` batching rule, so the recurrences are written out with the gate
equations of the PyTorch docs. Only sequence models stack (``STACKABLE``); ResNets train
one at a time. ``train.train_and_record_stack`` drives this and records off the training thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import zoo
from ..config import GroupSpec
from ..data.tasks import TaskData, fraction_indices
from .spec import arch_spec

STACKABLE = ("gru", "rnn", "lstm")
GATES = {"gru": 3, "rnn": 1, "lstm": 4}
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults, as train_model uses them


def stack_key(group: GroupSpec) -> tuple | None:
    """What models trained together share (None: this group trains one model at a time).

    Seeds, learning rates, weight decay and data fractions may differ within a stack."""
    if group.arch not in STACKABLE:
        return None
    return (group.task, group.arch, group.hidden_size, group.embed_dim, group.batch_size, group.epochs,
            group.every_epoch, group.first_recorded_epoch)


class StackedRNN(torch.nn.Module):
    """K single-layer recurrent classifiers of one spec (``zoo.SequenceClassifier``), computed together.

    Parameters carry a leading model axis: ``w_ih`` (K, G*H, D), ``w_hh`` (K, G*H, H), ``b_ih`` /
    ``b_hh`` (K, G*H), ``w_out`` (K, C, H), ``b_out`` (K, C), and ``embed`` (K, V, E) for tokens.
    """

    def __init__(self, spec: zoo.ArchSpec, states: list[dict[str, torch.Tensor]]):
        super().__init__()
        if spec.arch not in STACKABLE:
            raise ValueError(f"arch: {spec.arch} does not stack (stackable: {', '.join(STACKABLE)})")
        self.spec = spec
        self.tokens = spec.input_kind == "tokens"

        def stacked(key: str) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.stack([s[key].detach() for s in states]).clone())

        self.w_ih, self.w_hh = stacked("rnn.weight_ih_l0"), stacked("rnn.weight_hh_l0")
        self.b_ih, self.b_hh = stacked("rnn.bias_ih_l0"), stacked("rnn.bias_hh_l0")
        self.w_out, self.b_out = stacked("readout.weight"), stacked("readout.bias")
        self.embed = stacked("embed.weight") if self.tokens else None

    @classmethod
    def from_models(cls, models: list[torch.nn.Module]) -> StackedRNN:
        return cls(models[0].spec, [m.state_dict() for m in models])

    def __len__(self) -> int:
        return self.w_ih.shape[0]

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's state dict in ``zoo.SequenceClassifier``'s keys (CPU copies)."""
        out = {"rnn.weight_ih_l0": self.w_ih[k], "rnn.weight_hh_l0": self.w_hh[k], "rnn.bias_ih_l0": self.b_ih[k],
               "rnn.bias_hh_l0": self.b_hh[k], "readout.weight": self.w_out[k], "readout.bias": self.b_out[k]}
        if self.tokens:
            out["embed.weight"] = self.embed[k]
        return {key: v.detach().cpu().clone() for key, v in out.items()}

    def model(self, k: int) -> torch.nn.Module:
        """Model k as the zoo module training it alone gives (CPU, eval mode)."""
        m = zoo.build(self.spec)
        m.load_state_dict(self.state(k))
        return m.eval()

    # ---------------------------------------------------------------- forward

    def hidden_states(self, x: torch.Tensor, models: slice = slice(None), last_only: bool = False) -> torch.Tensor:
        """x: (K, B, T, D) floats or (K, B, T) token ids, one batch per model (or (B, T[, D]),
        shared by every model) -> hidden states (K, B, T, H), h_0 = 0 as in ``nn.GRU``
        (``last_only``: the final step's (K, B, H), what training needs)."""
        w_ih, w_hh, b_ih, b_hh = self.w_ih[models], self.w_hh[models], self.b_ih[models], self.b_hh[models]
        k, hsize = w_ih.shape[0], w_hh.shape[-1]
        if x.dim() == (2 if self.tokens else 3):  # shared inputs
            x = x.expand(k, *x.shape)
        if self.tokens:  # per-model embedding rows; the pad row gets no gradient (see train_stack)
            x = self.embed[models][torch.arange(k, device=x.device)[:, None, None], x]
        b, t = x.shape[1], x.shape[2]
        # input projections of every step at once, time-major so each step's slice is one block
        gi = torch.baddbmm(b_ih[:, None], x.transpose(1, 2).reshape(k, t * b, -1), w_ih.mT).view(k, t, b, -1)
        h = x.new_zeros(k, b, hsize)
        c = x.new_zeros(k, b, hsize) if self.spec.arch == "lstm" else None
        w_hh_t = w_hh.mT
        steps = []
        # unbind/chunk, not indexing: their backward is one stack/cat, where an index's backward
        # writes a zero tensor of the whole input per step (quadratic in T)
        for gx in gi.unbind(1):  # (K, B, G*H) per step
            gh = torch.baddbmm(b_hh[:, None], h, w_hh_t)
            if self.spec.arch == "gru":  # r, z, n (nn.GRU's order)
                xr, xz, xn = gx.chunk(3, -1)
                hr, hz, hn = gh.chunk(3, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
            elif self.spec.arch == "lstm":  # i, f, g, o (nn.LSTM's order); h_t is the hidden state
                gi_, gf, gg, go = (gx + gh).chunk(4, -1)
                c = torch.sigmoid(gf) * c + torch.sigmoid(gi_) * torch.tanh(gg)
                h = torch.sigmoid(go) * torch.tanh(c)
            else:
                h = torch.tanh(gx + gh)
            if not last_only:
                steps.append(h)
        return h if last_only else torch.stack(steps, dim=2)

    def readout(self, h: torch.Tensor, models: slice = slice(None)) -> torch.Tensor:
        """h: (K, B, T, H) or (K, B, H) -> logits of the same leading shape with C last."""
        w, bias = self.w_out[models], self.b_out[models]
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        return torch.baddbmm(bias[:, None], flat, w.mT).view(*h.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final-step logits (K, B, C), as ``SequenceClassifier.forward``."""
        return self.readout(self.hidden_states(x, last_only=True))

    @torch.no_grad()
    def trajectories(self, x: torch.Tensor, models: slice = slice(None), batch_size: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared inputs x (N, T[, D]) -> hidden states (k, N, T, H) and outputs (k, N, T, C) of
        the models in ``models``, on the CPU (what ``train.record`` records for one model)."""
        device = self.w_ih.device
        hs, outs = [], []
        for s in range(0, x.shape[0], batch_size):
            h = self.hidden_states(x[s:s + batch_size].to(device), models)
            hs.append(h.cpu())
            outs.append(self.readout(h, models).cpu())
        return torch.cat(hs, 1), torch.cat(outs, 1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> list[float]:
        """Final-step accuracy of every model on shared inputs (``train.accuracy``, per model)."""
        device = self.w_ih.device
        correct = torch.zeros(len(self), dtype=torch.long)
        for s in range(0, len(y), batch_size):
            pred = self(x[s:s + batch_size].to(device)).argmax(-1).cpu()
            correct += (pred == y[s:s + batch_size]).sum(1)
        return (correct.double() / max(len(y), 1)).tolist()


@dataclass
class _Member:
    """Model k's schedule: its rows of the shared split, epoch permutation and optimiser clock."""

    rows: torch.Tensor        # indices into task.base_train
    gen: torch.Generator      # its own shuffle stream, seeded as train_model seeds it
    lr: float
    weight_decay: float
    total: int                # optimiser steps over all epochs (the cosine's horizon)
    steps: int = 0            # optimiser steps taken


class StackedAdamW:
    """``torch.optim.AdamW`` (single-tensor path, default betas/eps) over the model axis, with a
    per-model learning rate and step count; models not in ``active`` are not touched."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr: list[float], weight_decay: list[float], steps: list[int], active: list[bool]) -> None:
        """``lr``: this step's learning rate per model (schedule applied); ``steps``: the count
        including this step. Scalars are formed in float64 as torch forms them from Python floats."""
        b1, b2 = BETAS
        dev = self.params[0].device
        lr64 = torch.tensor(lr, dtype=torch.float64)
        wd64 = torch.tensor(weight_decay, dtype=torch.float64)
        n = torch.tensor([max(s, 1) for s in steps], dtype=torch.float64)
        decay = 1 - lr64 * wd64
        step_size = lr64 / (1 - b1 ** n)
        bc2_sqrt = (1 - b2 ** n).sqrt()
        act = torch.tensor(active, device=dev)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            a = act.view(shape)
            new_p = p * decay.to(p.dtype).to(dev).view(shape)
            new_m = torch.lerp(m, grad, 1 - b1)
            new_v = v * b2 + (1 - b2) * grad * grad
            denom = new_v.sqrt() / bc2_sqrt.to(p.dtype).to(dev).view(shape) + EPS
            new_p = new_p - step_size.to(p.dtype).to(dev).view(shape) * (new_m / denom)
            p.copy_(torch.where(a, new_p, p))
            m.copy_(torch.where(a, new_m, m))
            v.copy_(torch.where(a, new_v, v))


def train_stack(groups: list[GroupSpec], task: TaskData, seeds: list[int], device: torch.device | str = "cpu",
                on_epoch=None) -> StackedRNN:
    """Train ``len(seeds)`` models (model k: ``groups[k]``'s recipe, seed ``seeds[k]``) together.

    The groups must share ``stack_key``. Model k ends as ``train.train_model(groups[k], task,
    seeds[k])`` would leave it, up to float rounding. ``on_epoch(epoch, stack)`` runs after
    every epoch (training-trajectory populations).
    """
    keys = {stack_key(g) for g in groups}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"groups {sorted({g.name for g in groups})} do not stack: they differ in task, arch, "
                         "hidden_size, embed_dim, batch_size, epochs or every_epoch (or their arch does not stack)")
    g0 = groups[0]
    spec = arch_spec(g0, task)  # as train_model's (a regression task is refused there)
    members, models = [], []
    for g, seed in zip(groups, seeds):
        torch.manual_seed(seed)  # as train_model: the seed fixes the initial weights ...
        rows = torch.from_numpy(fraction_indices(len(task.base_train), g.train_fraction, seed))
        models.append(zoo.build(spec))
        total = math.ceil(len(rows) / g.batch_size) * g.epochs
        members.append(_Member(rows, torch.Generator().manual_seed(seed), g.lr, g.weight_decay, total))  # ... and the shuffles
    stack = StackedRNN.from_models(models).to(device)
    opt = StackedAdamW(list(stack.parameters()))
    x_all, y_all = task.base_train.x.to(device), task.base_train.y.to(device)
    bs = g0.batch_size
    for epoch in range(1, g0.epochs + 1):
        order = [m.rows[torch.randperm(len(m.rows), generator=m.gen)] for m in members]
        num_batches = max(math.ceil(len(o) / bs) for o in order)
        for j in range(num_batches):
            idx, weight, active = _batch(order, j * bs, bs)
            idx, weight = idx.to(device), weight.to(device)
            logits = stack(x_all[idx])                                     # (K, B, C)
            ce = F.cross_entropy(logits.flatten(0, 1), y_all[idx].flatten(), reduction="none")
            loss = (ce.view_as(weight) * weight).sum()                     # sum over models of batch means
            for p in stack.parameters():
                p.grad = None
            loss.backward()
            if stack.embed is not None:
                stack.embed.grad[:, 0] = 0  # padding_idx=0: nn.Embedding gives the pad row no gradient
            lrs = []
            for m, a in zip(members, active):
                lrs.append(m.lr * math.cos(7 * math.pi * m.steps / (16 * m.total)))  # LambdaLR before its step
                m.steps += a
            opt.step(lrs, [m.weight_decay for m in members], [m.steps for m in members], active)
        if on_epoch is not None:
            on_epoch(epoch, stack)
    return stack


def _batch(order: list[torch.Tensor], start: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Rows [start, start+bs) of each model's epoch order, padded to one width: indices (K, B),
    loss weights (K, B) = 1/batch size on real rows and 0 on padding, and which models have rows."""
    parts = [o[start:start + bs] for o in order]
    width = max(len(p) for p in parts)
    idx = torch.zeros(len(parts), width, dtype=torch.long)
    weight = torch.zeros(len(parts), width)
    for k, p in enumerate(parts):
        idx[k, :len(p)] = p
        if len(p):
            weight[k, :len(p)] = 1.0 / len(p)
    return idx, weight, [len(p) > 0 for p in parts]
