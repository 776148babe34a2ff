"""The DYNAMO objective (paper eqs. 1-7), plain PyTorch.

Shape legend: B batch, T steps (RNN time or 1 for CNN logits), H hidden units,
C outputs. ``mask_BT`` marks valid (non-padding) steps; None means all valid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import family as families


def step_mask(lengths_B: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Valid-step mask for LEFT-padded sequences: the last ``length`` steps are real. (B,T) bool."""
    t = torch.arange(num_steps, device=lengths_B.device)
    return t[None, :] >= (num_steps - lengths_B)[:, None]


def masked_time_mean(v_BT: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    if mask_BT is None:
        return v_BT.mean(dim=1)
    m = mask_BT.to(v_BT.dtype)
    return (v_BT * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def hidden_loss(pred: list[torch.Tensor], target: list[torch.Tensor], family: str, distance: str = "l2",
                mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example L_hidden, (B,).

    RNN (eq. 2): ``1/T sum_t ||V(h~_t) - h_t||^2`` (L1: ``||.||_1``), summed over hidden units.
    CNN (eq. 6, B.1): per stage the distance averaged over channels and positions, then
    averaged over the B stages.
    """
    if distance not in ("l2", "l1"):
        raise ValueError(f"hidden_distance: expected 'l2' or 'l1', got {distance!r}")
    elementwise = (lambda d: d.pow(2)) if distance == "l2" else (lambda d: d.abs())
    return families.get(family).hidden_loss([elementwise(p - t) for p, t in zip(pred, target)], mask_BT)


def output_loss(pred_BTC: torch.Tensor, target_BTC: torch.Tensor, distance: str = "kl",
                mask_BT: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Per-example L_output (eq. 1/5), (B,).

    ``kl``: KL(softmax(base / T) || softmax(meta / T)) per step, T = ``temperature`` (1: eq. 1 as
    written; below 1 both distributions sharpen, so the top classes, the decision, weigh more than
    the tails); ``mse``: mean squared difference of the raw outputs per step. Averaged over valid steps.
    """
    if distance == "kl":
        logp_base = F.log_softmax(target_BTC / temperature, dim=-1)
        logp_meta = F.log_softmax(pred_BTC / temperature, dim=-1)
        per_step = (logp_base.exp() * (logp_base - logp_meta)).sum(dim=-1)
    elif distance == "mse":
        per_step = (pred_BTC - target_BTC).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"output_distance: expected 'kl' or 'mse', got {distance!r}")
    return masked_time_mean(per_step, mask_BT)


def distance_for(output_kind: str, output_distance: str) -> str:
    """The output distance for a model's outputs: ``output_distance`` for classifiers; MSE for regression
    (real-valued outputs: a softmax over them, which KL compares, would discard their scale and offset)."""
    return "mse" if output_kind == "regression" else output_distance


@dataclass
class Chunk:
    """A minibatch drawn for one base model: its inputs and its recorded trajectories."""

    model_id: str
    row: int                    # row of the model in the ModelEmbeddings shard
    group: str                  # output group (selects the meta-model head)
    x: torch.Tensor             # inputs (B, ...)
    lengths: torch.Tensor       # (B,)
    hiddens: list[torch.Tensor]  # base hidden states per tap
    outputs: torch.Tensor       # base outputs (B, T, C)
    output_kind: str = "classification"  # or "regression": outputs compared by MSE (``distance_for``)

    def to(self, device: torch.device) -> Chunk:
        """This chunk on ``device`` (itself on the CPU). Batches are cut on the host; a GPU gets them
        through pinned memory with asynchronous copies, so the transfer overlaps the host's work."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return replace(self, x=move(self.x), lengths=move(self.lengths), hiddens=[move(h) for h in self.hiddens],
                       outputs=move(self.outputs))


def state_rows(h: torch.Tensor, family: str, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """States as rows of features: RNN (B,T,H) -> (valid steps, H); CNN (B,C,H,W) -> (B*H*W, C)."""
    return families.get(family).state_rows(h, mask_BT)


def sequence_rows(h_BTH: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """(B,T,H) per-step vectors (an RNN's states, any model's outputs) as (valid steps, H) rows."""
    if mask_BT is None or bool(mask_BT.all()):  # no padding: a view, no copy
        return h_BTH.reshape(-1, h_BTH.shape[-1])
    return h_BTH[mask_BT]


def ridge_map(h_NM: torch.Tensor, y_NH: torch.Tensor, rho: float, prior_W: torch.Tensor | None = None,
              prior_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form affine map ``y ~ W h + b`` (variable projection of V_n, Golub & Pereyra 1973).

    Minimises ``1/N ||[h 1] [W b]^T - y||^2 + r ||[W b] - [W0 b0]||^2`` with ``r = rho * tr(G) / (M+1)``,
    ``G = [h 1]^T [h 1] / N`` (rho is relative to the mean eigenvalue of the states' Gram matrix, so it
    means the same whatever their scale); the prior ``[W0 b0]`` (default 0: plain ridge) carries what
    earlier batches taught. Products in h's precision, the solve in float64; returns ``W`` (H,M),
    ``b`` (H,), detached, in h's dtype.
    """
    gram, rhs = map_moments(h_NM, y_NH)
    n = max(h_NM.shape[0], 1)
    w, b = ridge_solve(gram / n, rhs / n, rho, prior_W, prior_b)
    return w.to(h_NM.dtype), b.to(h_NM.dtype)


def map_moments(h_NM: torch.Tensor, y_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums a ridge map is solved from: ``[h 1]^T [h 1]`` (M+1, M+1) and ``[h 1]^T y`` (M+1, H), float64.
    Sums, not means: moments of several batches add up."""
    # the products in the states' precision (the cost is here: N rows), the sums in float64
    x = torch.cat([h_NM.detach(), h_NM.new_ones(h_NM.shape[0], 1)], dim=1)
    return (x.T @ x).double(), (x.T @ y_NH.detach().to(x.dtype)).double()


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, rho: float, prior_W: torch.Tensor | None = None,
                prior_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ridge_map`` from mean moments (``map_moments`` / rows): ``W`` (H,M), ``b`` (H,), float64."""
    m1 = gram.shape[0]
    r = rho * float(torch.diagonal(gram).sum()) / m1 + 1e-12
    if prior_W is not None:
        rhs = rhs + r * torch.cat([prior_W.detach().double().T, prior_b.detach().double()[None]], dim=0)
    sol = torch.linalg.solve(gram + r * torch.eye(m1, dtype=torch.float64, device=gram.device), rhs)  # (M+1, H)
    return sol[:-1].T, sol[-1]


def solve_maps(embeddings, row: int, hiddens: list[torch.Tensor], targets: list[torch.Tensor],
               mask_BT: torch.Tensor | None, rho: float) -> list[torch.Tensor]:
    """Variable projection of model ``row``'s V_n on one batch: each tap's map is solved in closed form
    (``ridge_map``, the prior its current value once it has been solved before), written into the
    embedding table, and the states mapped by it are returned -- detached from V, so the meta-model's
    and theta's gradients are those of the projected loss (at the optimum of V the derivative
    through the solve vanishes: the gradient of min_V L is dL/dh at V*)."""
    fam = families.get(embeddings.family)
    maps = embeddings.maps_of(row)
    seen = embeddings.maps_solved(row)
    mapped = []
    with torch.autocast(hiddens[0].device.type, enabled=False):
        for (w, b), h, y in zip(maps, hiddens, targets):
            h = h.float()
            w_new, b_new = ridge_map(fam.state_rows(h, mask_BT), fam.state_rows(y.float(), mask_BT), rho,
                                     w.reshape(w.shape[0], -1) if seen else None, b if seen else None)
            w_new = w_new.reshape(w.shape)
            mapped.append(fam.apply_map(h, w_new, b_new))
            with torch.no_grad():
                w.copy_(w_new)
                b.copy_(b_new)
    embeddings.mark_maps_solved(row)
    return mapped


REFIT_RIDGE = 1e-3  # relative ridge of a solve of V_n on a model's whole training split: conditioning only


@torch.no_grad()
def refit_maps(meta, embeddings, row: int, x: torch.Tensor, lengths: torch.Tensor, hiddens: list[torch.Tensor],
               rho: float = REFIT_RIDGE, batch_size: int = 256) -> None:
    """V_n of model ``row`` solved in closed form on all of ``x`` (its training sequences, on the host) and
    its recorded ``hiddens`` there, with the meta-model as it is: one no-grad forward in batches, the
    moments summed (``map_moments``), one ridge solve per tap, written into the table and counted. No prior:
    the whole split is the data, ``rho`` only keeps the solve well posed."""
    theta = embeddings.theta[row].detach()
    fam, device = families.get(embeddings.family), theta.device
    moments = None
    for s in range(0, x.shape[0], batch_size):
        xb, lb = x[s:s + batch_size].to(device), lengths[s:s + batch_size].to(device)
        states, _ = meta(xb, theta[None].expand(xb.shape[0], -1))
        mask = fam.step_mask(lb, states[0].shape[1])
        sums = [map_moments(fam.state_rows(h.float(), mask),
                            fam.state_rows(y[s:s + batch_size].float().to(device), mask))
                for h, y in zip(states, hiddens)]
        moments = sums if moments is None else [(g + g2, r + r2) for (g, r), (g2, r2) in zip(moments, sums)]
    for (w, b), (gram, rhs) in zip(embeddings.maps_of(row), moments):
        n = float(gram[-1, -1])  # the ones column's sum: the rows seen
        w_new, b_new = ridge_solve(gram / n, rhs / n, rho)
        w.copy_(w_new.reshape(w.shape))
        b.copy_(b_new)
    embeddings.mark_maps_solved(row)


def dynamo_loss(meta, embeddings, chunks: list[Chunk], output_weight: float, hidden_distance: str = "l2",
                output_distance: str = "kl", *, maps_ridge: float | None = None,
                normalize_hidden: bool = False, output_temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 4/7 on a step's sampled models: mean over models of L_hidden + lambda * L_output.

    ``meta`` is the shared meta-model (or a wrapper of it); one forward over all chunks,
    each example conditioned on its own model's theta.

    ``maps_ridge``: V_n by variable projection (``solve_maps``, L2 only) with this relative ridge,
    instead of V_n as learned parameters (None, Algorithm 1). ``normalize_hidden``: each model's
    L_hidden divided by the variance of its batch's target states (summed over units, per step or
    position, as L_hidden sums), so that it reads as 1 - R^2 and a model with small hidden
    states weighs as much as one with large ones; ``loss_hidden`` in the stats is then that ratio.
    ``output_temperature``: T of the KL output distance (``output_loss``).
    """
    if output_weight < 0:
        raise ValueError(f"output_weight (lambda) must be >= 0, got {output_weight}")
    if maps_ridge is not None and hidden_distance != "l2":
        raise ValueError(f"maps_ridge: V_n is solved in closed form only for hidden_distance 'l2', got "
                         f"{hidden_distance!r}")
    sizes = [c.x.shape[0] for c in chunks]
    x = torch.cat([c.x for c in chunks])
    theta = embeddings.theta_rows([c.row for c in chunks for _ in range(c.x.shape[0])])
    hiddens, outputs = meta(x, theta)
    family = embeddings.family
    fam = families.get(family)
    total = x.new_zeros(())
    sum_h = sum_o = 0.0
    start = 0
    for c, n in zip(chunks, sizes):
        sl = slice(start, start + n)
        start += n
        mask = fam.step_mask(c.lengths, c.outputs.shape[1])
        states = [h[sl] for h in hiddens]
        if maps_ridge is None:
            mapped = embeddings.apply_maps(c.row, states)
        else:
            mapped = solve_maps(embeddings, c.row, states, c.hiddens, mask, maps_ridge)
        lh = hidden_loss(mapped, c.hiddens, family, hidden_distance, mask).mean()
        if normalize_hidden:
            lh = lh / target_scale(c.hiddens, family, hidden_distance, mask)
        lo = output_loss(outputs[c.group][sl], c.outputs, distance_for(c.output_kind, output_distance), mask,
                         output_temperature).mean()
        total = total + lh + output_weight * lo
        sum_h += float(lh.detach())
        sum_o += float(lo.detach())
    k = len(chunks)
    return total / k, {"loss_hidden": sum_h / k, "loss_output": sum_o / k}


@torch.no_grad()
def target_scale(targets: list[torch.Tensor], family: str, distance: str = "l2",
                 mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """What ``hidden_loss`` of the best constant prediction (each unit's batch mean) would be: the
    targets' variance in the loss's own units (L1: mean absolute deviation from the median), a
    detached scalar, floored so that a model with constant states does not divide by zero."""
    fam = families.get(family)
    rows = []
    for t in targets:
        r = fam.state_rows(t.float(), mask_BT)
        dev = (r - r.mean(0)).pow(2) if distance == "l2" else (r - r.median(0).values).abs()
        rows.append(fam.spread(dev))  # then averaged over taps
    return torch.stack(rows).mean().clamp_min(1e-8)


def embedding_penalty(meta, theta_KE: torch.Tensor, alpha: float, num_models: int) -> torch.Tensor:
    """``alpha/2 (mean_k ||theta_k||^2 + ||W||_F^2 / N)`` for a step's K sampled models.

    ``W`` are the meta-model's weights that multiply theta (``meta.theta_weights()``), N the
    population size. Summed over the population this is ``alpha/(2N) (||Theta||_F^2 + ||W||_F^2)``,
    whose minimum over the factorisations of the product ``W Theta`` is ``alpha/N ||W Theta||_*``:
    a nuclear-norm (low-rank) prior on how theta modulates the meta-model. A penalty on theta
    alone would do nothing but shrink theta while W grew to match.
    """
    if alpha < 0:
        raise ValueError(f"embedding_penalty must be >= 0, got {alpha}")
    w2 = sum(w.pow(2).sum() for w in meta.theta_weights())
    return 0.5 * alpha * (theta_KE.pow(2).sum(dim=1).mean() + w2 / num_models)
