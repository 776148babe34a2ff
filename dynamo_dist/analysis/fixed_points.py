"""Fixed points and line attractors of RNN dynamics (paper section 5, Golub & Sussillo 2018).

For an input x* held constant, the autonomous map ``F_x*(h) = F(x*, h)`` is searched for
(approximate) fixed points by gradient descent on ``q(h) = 1/2 ||F(x*, h) - h||^2``
started from hidden states the network visits on real inputs. Slow points whose q is
below ``q_tol`` are kept, near-duplicates are merged, and the Jacobian dF/dh is
linearised at each one.

Works for the DYNAMO meta-model at any theta (:func:`meta_dynamics`) and for any zoo
sequence model -- GRU, tanh-RNN, LSTM -- (:func:`base_dynamics`; the LSTM state is
``[h; c]``).

x* = 0 by default: the zero feature vector (for standardised MNIST-1D the mean input),
and for token inputs the embedding of ``<pad>`` (id 0), which ``nn.Embedding(padding_idx=0)``
keeps at exactly zero -- both are "no evidence" inputs, the paper's ``x* = 0``.

Shape legend: B batch, T time, D encoded input features, S state size, E embedding dim,
K initial/candidate states, P fixed points, C outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..objective import step_mask


@dataclass
class Dynamics:
    """An autonomous map h -> F(x*, h) with its readout, batched over states.

    step: (B,S) -> (B,S); readout: (B,S) -> (B,C) logits (or None); state_dim: S.
    """

    step: Callable[[torch.Tensor], torch.Tensor]
    readout: Callable[[torch.Tensor], torch.Tensor] | None
    state_dim: int


# ---------------------------------------------------------------- dynamics adapters


def pad_input(meta_or_model: nn.Module, in_dim: int) -> torch.Tensor:
    """x* = 0 as an encoded input vector (D,): the <pad> embedding for token models, else zeros."""
    embed = getattr(meta_or_model, "embed", None)
    if embed is not None:
        with torch.no_grad():
            return embed(torch.zeros(1, dtype=torch.long))[0].detach()
    return torch.zeros(in_dim)


def meta_dynamics(meta: nn.Module, theta_E: torch.Tensor, x_star_D: torch.Tensor | None = None,
                  group: str | None = None) -> Dynamics:
    """h -> F~(theta, x*, h) of a MetaRNN; readout = the head of ``group`` (default: the first head)."""
    theta_E = torch.as_tensor(theta_E, dtype=torch.float32).detach()
    in_dim = meta.cell.input_size - theta_E.shape[0]
    x_star = pad_input(meta, in_dim) if x_star_D is None else torch.as_tensor(x_star_D, dtype=torch.float32)
    head = meta.heads[group if group is not None else next(iter(meta.heads))]

    def step(h_BS: torch.Tensor) -> torch.Tensor:
        b = h_BS.shape[0]
        return meta.step(x_star[None].expand(b, -1), theta_E[None].expand(b, -1), h_BS)

    return Dynamics(step=step, readout=head, state_dim=meta.hidden_size)


def base_dynamics(model: nn.Module, x_star_D: torch.Tensor | None = None) -> Dynamics:
    """h -> F(x*, h) of a zoo SequenceClassifier (GRU / RNN: state h; LSTM: state [h; c])."""
    rnn = model.rnn
    hidden = rnn.hidden_size
    x_star = pad_input(model, rnn.input_size) if x_star_D is None else torch.as_tensor(x_star_D, dtype=torch.float32)
    if isinstance(rnn, nn.LSTM):
        def step(s_BS: torch.Tensor) -> torch.Tensor:
            h, c = s_BS[:, :hidden], s_BS[:, hidden:]
            x = x_star[None, None].expand(s_BS.shape[0], 1, -1)
            _, (h1, c1) = rnn(x, (h[None].contiguous(), c[None].contiguous()))
            return torch.cat([h1[0], c1[0]], dim=-1)

        return Dynamics(step=step, readout=lambda s: model.readout(s[:, :hidden]), state_dim=2 * hidden)

    def step(h_BS: torch.Tensor) -> torch.Tensor:
        x = x_star[None, None].expand(h_BS.shape[0], 1, -1)
        out, _ = rnn(x, h_BS[None].contiguous())
        return out[:, 0]

    return Dynamics(step=step, readout=model.readout, state_dim=hidden)


@torch.no_grad()
def meta_visited_states(meta: nn.Module, theta_E: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Meta-model hidden states on real inputs at theta, valid steps only -> (K,M)."""
    theta = torch.as_tensor(theta_E, dtype=torch.float32)
    hs, _ = meta(x, theta[None].expand(x.shape[0], -1))
    h_BTM = hs[0]
    return h_BTM[step_mask(lengths, h_BTM.shape[1])]


@torch.no_grad()
def base_visited_states(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A zoo sequence model's states on real inputs, valid steps only -> (K,S) (LSTM: [h; c])."""
    rnn = model.rnn
    u = model.embed(x) if model.embed is not None else x
    if isinstance(rnn, nn.LSTM):
        b = u.shape[0]
        h = u.new_zeros(1, b, rnn.hidden_size)
        c = u.new_zeros(1, b, rnn.hidden_size)
        states = []
        for t in range(u.shape[1]):
            _, (h, c) = rnn(u[:, t:t + 1], (h, c))
            states.append(torch.cat([h[0], c[0]], dim=-1))
        s_BTS = torch.stack(states, dim=1)
    else:
        s_BTS, _ = rnn(u)
    return s_BTS[step_mask(lengths, s_BTS.shape[1])]


# ---------------------------------------------------------------- the finder


def jacobians(step: Callable[[torch.Tensor], torch.Tensor], h_PS: torch.Tensor) -> torch.Tensor:
    """dF/dh at each of P states -> (P,S,S), via torch.autograd.functional.jacobian.

    Each output row depends only on its own input row, so the Jacobian of the batch sum
    (S, P, S) holds every per-point Jacobian in S backward passes instead of P*S.
    """
    h = h_PS.detach().clone()
    jac_SPS = torch.autograd.functional.jacobian(lambda z: step(z).sum(0), h)
    return jac_SPS.permute(1, 0, 2).contiguous()


def deduplicate(points_PS: np.ndarray, speeds_P: np.ndarray, tol: float) -> np.ndarray:
    """Indices of points kept after greedy merging (slowest first) of points closer than ``tol``."""
    order = np.argsort(speeds_P, kind="stable")
    kept: list[int] = []
    for i in order:
        if not kept or np.min(np.linalg.norm(points_PS[kept] - points_PS[i], axis=1)) > tol:
            kept.append(int(i))
    return np.array(kept, dtype=np.int64)


class FixedPointFinder:
    """Golub & Sussillo fixed-point search on an autonomous map (scikit-learn style).

    Parameters
    ----------
    num_initial : int
        candidate states sampled from the visited states passed to ``fit``.
    noise_scale : float
        std of Gaussian jitter added to the candidates (0 = start on visited states).
    max_iter : int
        L-BFGS iterations per batch of candidates at most (each about 1.3 evaluations of F).
    batch_size : int
        candidates optimised jointly; smaller batches couple fewer points through the
        shared line search.
    stop_tol : float
        the search of a batch stops when the summed q changes by less than this.
    q_tol : float
        a candidate is a fixed point when q(h) = 1/2 ||F(h) - h||^2 <= q_tol.
    dedup_tol : float
        fixed points closer than this (Euclidean, state units) are merged.
    max_jacobians : int
        Jacobians (and eigenvalues) are computed for at most this many fixed points (slowest first).
    unit_tol : float
        an eigenvalue is "near 1" (a marginally stable, line-attractor direction) when
        | |lambda| - 1 | <= unit_tol.
    random_state : int | None

    Attributes (after ``fit``)
    --------------------------
    candidates_ (K,S), final_states_ (K,S), final_speeds_ (K,): every search's start, end and q;
    num_evaluations_ : evaluations of F (times batch) spent;
    fixed_points_ (P,S), speeds_ (P,): de-duplicated fixed points (slowest first);
    converged_ : bool -- False when no candidate met ``q_tol`` (then the slowest points are kept);
    jacobians_ (P',S,S), eigenvalues_ (P',S) complex (sorted by decreasing modulus);
    readouts_ (P,C) readout at the fixed points (if the dynamics have one);
    stats_ : dict of :func:`line_attractor_stats`.
    """

    def __init__(self, num_initial: int = 128, noise_scale: float = 0.0, max_iter: int = 200, batch_size: int = 128,
                 q_tol: float = 1e-6, stop_tol: float = 1e-14, dedup_tol: float = 1e-2,
                 max_jacobians: int = 64, unit_tol: float = 0.05, random_state: int | None = None):
        self.num_initial = num_initial
        self.noise_scale = noise_scale
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.q_tol = q_tol
        self.stop_tol = stop_tol
        self.dedup_tol = dedup_tol
        self.max_jacobians = max_jacobians
        self.unit_tol = unit_tol
        self.random_state = random_state

    def fit(self, dynamics: Dynamics, initial_states: torch.Tensor) -> "FixedPointFinder":
        """Search from states sampled out of ``initial_states`` (K0,S) (e.g. visited on real inputs)."""
        init = torch.as_tensor(initial_states, dtype=torch.float32).detach()
        if init.ndim != 2 or init.shape[1] != dynamics.state_dim:
            raise ValueError(f"initial_states: expected shape (K, {dynamics.state_dim}), got {tuple(init.shape)}")
        if init.shape[0] == 0:
            raise ValueError("initial_states: at least one state is required")
        rng = np.random.default_rng(self.random_state)
        k = min(self.num_initial, init.shape[0])
        idx = rng.choice(init.shape[0], size=k, replace=False)
        cand = init[torch.from_numpy(idx)].clone()
        if self.noise_scale > 0:
            cand = cand + self.noise_scale * torch.from_numpy(rng.standard_normal(cand.shape).astype(np.float32))
        self.candidates_ = cand.numpy().copy()

        finals, speeds, iters = [], [], []
        for s in range(0, cand.shape[0], self.batch_size):
            h, q, n = self._minimise(dynamics.step, cand[s:s + self.batch_size])
            finals.append(h)
            speeds.append(q)
            iters.append(n)
        final, q_final = torch.cat(finals), torch.cat(speeds)
        self.num_evaluations_ = int(sum(iters))
        self.final_states_ = final.numpy()
        self.final_speeds_ = q_final.numpy()

        ok = self.final_speeds_ <= self.q_tol
        self.converged_ = bool(ok.any())
        if not self.converged_:  # keep the slowest points so the plots still show the slow manifold
            ok = self.final_speeds_ <= 10.0 * float(self.final_speeds_.min()) + 1e-12
        pts, spd = self.final_states_[ok], self.final_speeds_[ok]
        keep = deduplicate(pts, spd, self.dedup_tol)
        self.fixed_points_ = pts[keep]
        self.speeds_ = spd[keep]

        fp = torch.from_numpy(self.fixed_points_)
        with torch.no_grad():
            self.readouts_ = dynamics.readout(fp).numpy() if dynamics.readout is not None else None
        sub = fp[: self.max_jacobians]
        self.jacobians_ = jacobians(dynamics.step, sub).numpy()
        eig = np.linalg.eigvals(self.jacobians_.astype(np.float64)) if len(sub) else np.zeros((0, fp.shape[1]), complex)
        order = np.argsort(-np.abs(eig), axis=1)
        self.eigenvalues_ = np.take_along_axis(eig, order, axis=1)
        self.stats_ = line_attractor_stats(self.fixed_points_, self.eigenvalues_, self.unit_tol)
        self.stats_["converged"] = self.converged_
        return self

    def _minimise(self, step, h0_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """L-BFGS (strong-Wolfe line search) on sum_k q(h_k) for one batch of candidates.

        The points are independent, so the sum's minimiser is every point's own; L-BFGS
        reaches q ~ 1e-10 in ~100 evaluations where Adam needs thousands (the paper's
        "gradient descent" -- G&S's slow-point search -- run with a quasi-Newton step).
        """
        h = h0_BS.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([h], lr=1.0, max_iter=self.max_iter, history_size=20, tolerance_grad=1e-12,
                                tolerance_change=self.stop_tol, line_search_fn="strong_wolfe")
        count = [0]

        def closure():
            count[0] += 1
            opt.zero_grad(set_to_none=True)
            q = 0.5 * (step(h) - h).pow(2).sum()
            q.backward()
            return q

        opt.step(closure)
        with torch.no_grad():
            final = h.detach().clone()
            q_B = 0.5 * (step(final) - final).pow(2).sum(dim=1)
        bad = ~torch.isfinite(q_B)  # a diverged search is a failed candidate, never a fixed point
        q_B[bad] = float("inf")
        return final, q_B, count[0]


def line_attractor_stats(fixed_points_PS: np.ndarray, eigenvalues_PS: np.ndarray, unit_tol: float = 0.05) -> dict:
    """Line-attractor statistics of a set of fixed points.

    * ``num_fixed_points``;
    * ``pc1_variance``: variance of the fixed points along their first principal component
      (state units squared), ``pc1_variance_ratio``: its share of the total variance -- near 1
      for points strung along a line;
    * ``pc1_extent``: range of the points along PC1 (length of the line);
    * ``mean_num_near_unit``: mean over fixed points of the number of Jacobian eigenvalues with
      | |lambda| - 1 | <= unit_tol (one per line-attractor direction);
    * ``mean_max_abs_eigenvalue``: mean spectral radius (> 1: unstable points present).
    """
    p = len(fixed_points_PS)
    out: dict = {"num_fixed_points": p}
    if p >= 2:
        centred = fixed_points_PS - fixed_points_PS.mean(0)
        sv = np.linalg.svd(centred, compute_uv=False)
        var = sv ** 2 / (p - 1)
        out["pc1_variance"] = float(var[0])
        out["pc1_variance_ratio"] = float(var[0] / var.sum()) if var.sum() > 0 else float("nan")
        pc1 = np.linalg.svd(centred, full_matrices=False)[2][0]
        proj = centred @ pc1
        out["pc1_extent"] = float(proj.max() - proj.min())
    else:
        out.update(pc1_variance=0.0, pc1_variance_ratio=float("nan"), pc1_extent=0.0)
    if len(eigenvalues_PS):
        mod = np.abs(eigenvalues_PS)
        out["mean_num_near_unit"] = float((np.abs(mod - 1.0) <= unit_tol).sum(axis=1).mean())
        out["mean_max_abs_eigenvalue"] = float(mod.max(axis=1).mean())
    else:
        out["mean_num_near_unit"] = float("nan")
        out["mean_max_abs_eigenvalue"] = float("nan")
    return out
