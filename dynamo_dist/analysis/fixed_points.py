"""Fixed points and line attractors of RNN dynamics (paper section 5, Golub & Sussillo 2018).

For an input x* held constant, the autonomous map ``F_x*(h) = F(x*, h)`` is searched for
(approximate) fixed points by gradient descent on ``q(h) = 1/2 ||F(x*, h) - h||^2``
started from hidden states the network visits on real inputs. Slow points whose q is
below ``q_tol`` are kept, near-duplicates are merged, and the Jacobian dF/dh is
linearised at each one.

Works for the DYNAMO meta-model at any theta (:func:`meta_dynamics`) and for any zoo
sequence model -- GRU, tanh-RNN, LSTM, any number of layers -- or user's module hooked on one
such unidirectional submodule (:func:`base_dynamics`; the LSTM state is ``[h; c]``).

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

from ..meta.objective import step_mask


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


def readout_at(meta: nn.Module, group: str, theta_E: torch.Tensor):
    """G~ of ``group`` at ``theta``: ``meta.readout`` (a theta-modulated readout, MetaRNN), else the
    group's head itself (a meta-model whose readout does not depend on theta)."""
    if hasattr(meta, "readout"):
        return meta.readout(group, theta_E)
    return meta.heads[group]


def meta_dynamics(meta: nn.Module, theta_E: torch.Tensor, x_star_D: torch.Tensor | None = None,
                  group: str | None = None) -> Dynamics:
    """h -> F~(theta, x*, h) of a MetaRNN; readout = the head of ``group`` (default: the first head)."""
    theta_E = torch.as_tensor(theta_E, dtype=torch.float32).detach()
    in_dim = meta.cell.input_size - theta_E.shape[0]
    x_star = pad_input(meta, in_dim) if x_star_D is None else torch.as_tensor(x_star_D, dtype=torch.float32)
    readout = readout_at(meta, group if group is not None else next(iter(meta.heads)), theta_E)

    def step(h_BS: torch.Tensor) -> torch.Tensor:
        b = h_BS.shape[0]
        return meta.step(x_star[None].expand(b, -1), theta_E[None].expand(b, -1), h_BS)

    return Dynamics(step=step, readout=readout, state_dim=meta.hidden_size)


def _recurrence(model: nn.Module) -> tuple[nn.RNNBase, Callable | None, nn.Module | None]:
    """(the nn.GRU/RNN/LSTM, the readout of its top layer, the input embedding) of a zoo sequence model or
    of a user's module read through hooks on one unidirectional recurrent submodule (adapters.HookedModel)."""
    if isinstance(getattr(model, "rnn", None), nn.RNNBase):  # the zoo's SequenceClassifier, or a module shaped like it
        return model.rnn, model.readout, getattr(model, "embed", None)
    hidden, inner = getattr(model, "hidden", None), getattr(model, "module", None)
    rnn = inner.get_submodule(hidden[0]) if inner is not None and hidden and len(hidden) == 1 else None
    if not isinstance(rnn, nn.RNNBase) or rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ValueError(f"{type(model).__name__}: fixed points need one unidirectional nn.GRU/nn.RNN/nn.LSTM "
                         "(a zoo model, or a user's module hooked on one)")
    readout = inner.get_submodule(model.readout) if model.readout else None
    return rnn, readout, None


def base_dynamics(model: nn.Module, x_star_D: torch.Tensor | None = None) -> Dynamics:
    """h -> F(x*, h) of a sequence model's recurrence (``_recurrence``): GRU / RNN state h, LSTM [h; c];
    with L layers every layer's h (then c) side by side, layer 1 first, as ``zoo.layer_states`` records them;
    the readout reads the top layer."""
    rnn, readout_fn, embed = _recurrence(model)
    hidden, layers = rnn.hidden_size, rnn.num_layers
    width = hidden * layers
    in_dim = rnn.input_size
    if x_star_D is None:
        x_star = pad_input(model, in_dim) if embed is not None else torch.zeros(in_dim)
    else:
        x_star = torch.as_tensor(x_star_D, dtype=torch.float32)

    def stacked(s_BS: torch.Tensor) -> torch.Tensor:  # (B, L*H) -> (L, B, H)
        return s_BS.reshape(s_BS.shape[0], layers, hidden).transpose(0, 1).contiguous()

    def flat(h_LBH: torch.Tensor) -> torch.Tensor:
        return h_LBH.transpose(0, 1).reshape(h_LBH.shape[1], -1)

    def run(x, hx):
        return rnn(x if rnn.batch_first else x.transpose(0, 1), hx)

    top = (lambda s: readout_fn(s[:, width - hidden:width])) if readout_fn is not None else None
    if isinstance(rnn, nn.LSTM):
        def step(s_BS: torch.Tensor) -> torch.Tensor:
            x = x_star[None, None].expand(s_BS.shape[0], 1, -1)
            _, (h1, c1) = run(x, (stacked(s_BS[:, :width]), stacked(s_BS[:, width:])))
            return torch.cat([flat(h1), flat(c1)], dim=-1)

        return Dynamics(step=step, readout=top, state_dim=2 * width)

    def step(h_BS: torch.Tensor) -> torch.Tensor:
        x = x_star[None, None].expand(h_BS.shape[0], 1, -1)
        return flat(run(x, stacked(h_BS))[1])

    return Dynamics(step=step, readout=top, state_dim=width)


@torch.no_grad()
def meta_visited_states(meta: nn.Module, theta_E: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Meta-model hidden states on real inputs at theta, valid steps only -> (K,M)."""
    theta = torch.as_tensor(theta_E, dtype=torch.float32)
    hs, _ = meta(x, theta[None].expand(x.shape[0], -1))
    h_BTM = hs[0]
    return h_BTM[step_mask(lengths, h_BTM.shape[1])]


@torch.no_grad()
def base_visited_states(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A sequence model's states on real inputs in ``base_dynamics``' layout, valid steps only -> (K,S)."""
    rnn, _, embed = _recurrence(model)
    u = embed(x) if embed is not None else x
    b, layers = u.shape[0], rnn.num_layers
    h = u.new_zeros(layers, b, rnn.hidden_size)
    hx = (h, h.clone()) if isinstance(rnn, nn.LSTM) else h
    states = []
    for t in range(u.shape[1]):  # one step at a time: every layer's state (and an LSTM's cell) at every step
        _, hx = rnn(u[:, t:t + 1] if rnn.batch_first else u[:, t:t + 1].transpose(0, 1), hx)
        parts = hx if isinstance(hx, tuple) else (hx,)
        states.append(torch.cat([p.transpose(0, 1).reshape(b, -1) for p in parts], dim=-1))
    s_BTS = torch.stack(states, dim=1)
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
        L-BFGS iterations at most (each candidate has its own history and line search;
        an iteration costs one gradient and one or a few forward evaluations of F).
    batch_size : int
        candidates evaluated together (memory only: the searches are independent).
    stop_tol : float
        a candidate stops moving once its q is below this.
    q_tol : float
        a candidate is a fixed point when q(h) = 1/2 ||F(h) - h||^2 <= q_tol.
    dedup_tol : float
        fixed points closer than this (Euclidean, state units) are merged.
    outlier_scale : float | None
        fixed points farther from the candidates' centroid than ``outlier_scale`` times the
        farthest candidate are dropped (as G&S's ``outlier_distance_scale``): saturated
        gates make q vanish far outside the visited region (z -> 1 gives F(h) ~ h), which
        are not fixed points of the dynamics on data. None keeps every point.
    max_jacobians : int
        Jacobians (and eigenvalues) are computed for at most this many fixed points (slowest first).
    unit_tol : float
        an eigenvalue is "near 1" (a marginally stable, line-attractor direction) when
        | |lambda| - 1 | <= unit_tol.
    random_state : int | None

    Attributes (after ``fit``)
    --------------------------
    candidates_ (K,S), final_states_ (K,S), final_speeds_ (K,): every search's start, end and q;
    num_evaluations_ : evaluations of F (times batch) spent; num_outliers_ : searches that ran off (dropped);
    fixed_points_ (P,S), speeds_ (P,): de-duplicated fixed points (slowest first);
    converged_ : bool -- False when no candidate met ``q_tol`` (then the slowest points are kept,
        ``fixed_points_`` holds those slow points and ``stats_["num_fixed_points"]`` is 0);
    jacobians_ (P',S,S), eigenvalues_ (P',S) complex (sorted by decreasing modulus);
    readouts_ (P,C) readout at the fixed points (if the dynamics have one);
    stats_ : dict of :func:`line_attractor_stats`.
    """

    def __init__(self, num_initial: int = 128, noise_scale: float = 0.0, max_iter: int = 200, batch_size: int = 128,
                 q_tol: float = 1e-6, stop_tol: float = 1e-12, dedup_tol: float = 1e-2, outlier_scale: float | None = 2.0,
                 max_jacobians: int = 64, unit_tol: float = 0.05, random_state: int | None = None):
        self.num_initial = num_initial
        self.noise_scale = noise_scale
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.q_tol = q_tol
        self.stop_tol = stop_tol
        self.dedup_tol = dedup_tol
        self.outlier_scale = outlier_scale
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

        near = np.ones(len(final), dtype=bool)
        if self.outlier_scale is not None:
            centre = self.candidates_.mean(axis=0)
            radius = float(np.linalg.norm(self.candidates_ - centre, axis=1).max())
            near = np.linalg.norm(self.final_states_ - centre, axis=1) <= self.outlier_scale * max(radius, 1e-6)
        self.num_outliers_ = int((~near).sum())
        ok = (self.final_speeds_ <= self.q_tol) & near
        self.converged_ = bool(ok.any())
        if not self.converged_:  # keep the slowest points so the plots still show the slow manifold
            speeds = np.where(near, self.final_speeds_, np.inf)
            ok = near & (speeds <= 10.0 * float(speeds.min()) + 1e-12) if near.any() else near
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
        # no candidate met q_tol: what is kept are slow points, and a count of fixed points is 0
        self.stats_["num_slow_points"] = self.stats_["num_fixed_points"]
        if not self.converged_:
            self.stats_["num_fixed_points"] = 0
        self.stats_["converged"] = self.converged_
        return self

    def _minimise(self, step, h0_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Minimise q(h_b) for every candidate b independently; returns (final states, q, evaluations)."""
        return batched_lbfgs(step, h0_BS, self.max_iter, stop_tol=self.stop_tol)


def _q(step, h_BS: torch.Tensor) -> torch.Tensor:
    return 0.5 * (step(h_BS) - h_BS).pow(2).sum(dim=1)


def _q_and_grad(step, h_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h_BS.detach().requires_grad_(True)
    q_B = _q(step, h)
    (g_BS,) = torch.autograd.grad(q_B.sum(), h)  # points are independent: each row is its own gradient
    return q_B.detach(), g_BS


def batched_lbfgs(step, h0_BS: torch.Tensor, max_iter: int = 200, history: int = 10, stop_tol: float = 1e-12,
                  max_backtracks: int = 10, patience: int = 5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L-BFGS run separately for each row of ``h0`` on q(h) = 1/2 ||step(h) - h||^2, vectorised.

    Every candidate keeps its own curvature history and its own backtracking (Armijo) step,
    so one slow or ill-conditioned point neither steers nor stalls the others (a single
    L-BFGS on the summed q mixes all points' curvature). A row is finished when its q is
    below ``stop_tol``, when no step decreases q along the quasi-Newton direction and then
    along the gradient, or when q has improved by less than 0.1% for ``patience`` iterations
    running (it sits at the float precision of q). F is evaluated only on unfinished rows.
    Returns (final states (B,S), q (B,), batched evaluations of F).
    """
    h = h0_BS.detach().clone()
    b, dim = h.shape
    q, g = _q_and_grad(step, h)
    evals = 1
    s_hist = h.new_zeros(history, b, dim)
    y_hist = h.new_zeros(history, b, dim)
    rho = h.new_zeros(history, b)         # 0 marks an empty or reset entry: it then drops out of the recursion
    gamma = h.new_ones(b)                 # initial Hessian scale s.y / y.y of the newest accepted pair
    failed = torch.zeros(b, dtype=torch.bool)
    stalled = torch.zeros(b, dtype=torch.long)
    done = ~torch.isfinite(q)
    for it in range(max_iter):
        done = done | (q <= stop_tol)
        active = ~done
        if not bool(active.any()):
            break
        # two-loop recursion, newest pair first (slot (it - 1 - j) % history)
        r = g.clone()
        alphas = []
        for j in range(min(it, history)):
            k = (it - 1 - j) % history
            a = rho[k] * (s_hist[k] * r).sum(1)
            r = r - a[:, None] * y_hist[k]
            alphas.append((k, a))
        r = gamma[:, None] * r
        for k, a in reversed(alphas):
            beta = rho[k] * (y_hist[k] * r).sum(1)
            r = r + (a - beta)[:, None] * s_hist[k]
        d = -r
        slope = (g * d).sum(1)
        not_descent = slope >= 0
        d[not_descent] = -g[not_descent]
        slope = torch.where(not_descent, -(g * g).sum(1), slope)
        # per-row backtracking line search from the unit quasi-Newton step; F is evaluated
        # only on the rows still searching (finished rows cost nothing)
        t = h.new_ones(b)
        ok = torch.zeros(b, dtype=torch.bool)
        with torch.no_grad():
            for _ in range(max_backtracks):
                rows = (active & ~ok).nonzero().flatten()
                if len(rows) == 0:
                    break
                q_try = _q(step, h[rows] + t[rows, None] * d[rows])
                evals += 1
                good = torch.isfinite(q_try) & (q_try < q[rows]) & (q_try <= q[rows] + 1e-4 * t[rows] * slope[rows])
                ok[rows[good]] = True
                t[rows[~good]] *= 0.5
        # a failed row retries once along the gradient (history reset), then is finished
        miss = active & ~ok
        done = done | (miss & failed)
        failed = miss & ~failed
        rho[:, failed] = 0.0
        gamma = torch.where(failed, torch.ones_like(gamma), gamma)
        h_new = torch.where(ok[:, None], h + t[:, None] * d, h)
        q_new, g_new = q.clone(), g.clone()
        moved = ok.nonzero().flatten()
        if len(moved):
            q_new[moved], g_new[moved] = _q_and_grad(step, h_new[moved])
            evals += 1
        s_vec, y_vec = h_new - h, g_new - g
        sy = (s_vec * y_vec).sum(1)
        valid = ok & (sy > 1e-12)
        k = it % history
        s_hist[k], y_hist[k] = s_vec, y_vec
        rho[k] = torch.where(valid, 1.0 / sy.clamp_min(1e-12), torch.zeros_like(sy))
        gamma = torch.where(valid, sy / (y_vec * y_vec).sum(1).clamp_min(1e-30), gamma)
        stalled = torch.where(q - q_new <= 1e-3 * q, stalled + 1, torch.zeros_like(stalled))
        done = done | (stalled >= patience)
        h, q, g = h_new, q_new, g_new
    q = torch.where(torch.isfinite(q), q, torch.full_like(q, float("inf")))  # a diverged row is no fixed point
    return h, q, evals


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
