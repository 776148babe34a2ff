"""Fixed points continued along a path in parameter space, with their bifurcations marked.

A family of autonomous maps ``h -> F_s(h)``, s in [0, 1] (for the meta-model the path
``theta(s) = (1 - s) theta_a + s theta_b``, :func:`meta_path`), is stepped on a grid. At every
step the fixed points are searched (:class:`~.fixed_points.FixedPointFinder`, same q tolerance,
merging and outlier rule) from the previous step's fixed points -- each one continues its
branch -- plus fresh candidates (e.g. states visited at theta(s)). A second sweep runs the
grid backwards seeded the same way, so a branch first found late (its basin missed by the
fresh candidates) is followed back for as long as it exists: a branch then starts or ends only
where its continuation fails, i.e. at a bifurcation (saddle-node, pitchfork) or the path's end.

Consecutive steps' fixed points are matched by a minimum-distance assignment (Hungarian);
unmatched points are branches born or dying. A fixed point is stable when every eigenvalue of
the Jacobian dF_s/dh has modulus < 1 (a discrete-time map). Events are marked between the two
grid steps where they happen: ``born`` / ``died`` (the number of fixed points may change) and
``stability`` (a continued branch crosses the unit circle).

Only converged fixed points (q <= the finder's ``q_tol``) are tracked; a step where no
candidate converges has 0 fixed points, its slowest q is reported apart (``steps_``).
Fixed points joined by a segment along which q stays below ``q_tol`` count as one
(:func:`isolated`): at a bifurcation the map is flat and a whole neighbourhood "converges",
and a line attractor's points sample one continuum -- counting its samples would mark
events wherever the sampling changes.

Shape legend: K grid steps, S state size, P fixed points at a step, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .fixed_points import Dynamics, FixedPointFinder, meta_dynamics


def meta_path(meta: nn.Module, theta_a_E, theta_b_E, group: str | None = None) -> Callable[[float], Dynamics]:
    """s -> the meta-model's dynamics at theta(s) = (1 - s) theta_a + s theta_b (see :func:`meta_dynamics`)."""
    a = torch.as_tensor(np.asarray(theta_a_E), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(theta_b_E), dtype=torch.float32)
    return lambda s: meta_dynamics(meta, (1.0 - s) * a + s * b, group=group)


class FixedPointContinuation:
    """Fixed points tracked along a one-parameter family of maps (scikit-learn style).

    Parameters
    ----------
    finder : FixedPointFinder | None
        template of every step's search (its ``num_initial`` fresh candidates are drawn per step,
        its ``q_tol``, ``dedup_tol``, ``outlier_scale``, ``max_iter`` apply); None: the defaults.
    num_steps : int
        grid steps s = 0, 1/(num_steps-1), ..., 1 (used when ``fit`` gets no grid).
    match_tol : float | None
        fixed points of consecutive steps farther apart than this (state units) are never the same
        branch; None: no limit (the assignment alone decides).
    random_state : int | None
        seeds the fresh candidates drawn at each step (and each search).

    Attributes (after ``fit``)
    --------------------------
    s_ (K,); fixed_points_ : list of K (P_k,S); speeds_, max_abs_eigenvalues_, stable_, branches_ :
    lists of K (P_k,) (q, spectral radius of dF/dh, < 1, branch id); num_fixed_points_ (K,);
    mean_ (S,), plane_ (2,S): PCA of all tracked fixed points (the common projection);
    points_ : rows (step, s, branch, pc1, pc2, q, max_abs_eigenvalue, stable);
    steps_ : rows (step, s, num_fixed_points, num_stable, converged, min_q -- the slowest state's q,
    converged or not); events_ : rows (kind, branch, step, s_before, s_after, s, num_before,
    num_after, stable_before, stable_after, pc1, pc2) with kind in born / died / stability;
    count_changes_ : midpoints s between steps whose number of fixed points differs.
    """

    def __init__(self, finder: FixedPointFinder | None = None, num_steps: int = 11, match_tol: float | None = None,
                 random_state: int | None = None):
        self.finder = finder
        self.num_steps = num_steps
        self.match_tol = match_tol
        self.random_state = random_state

    def fit(self, family: Callable[[float], Dynamics],
            initial_states: torch.Tensor | Callable[[float], torch.Tensor],
            s_grid: np.ndarray | None = None) -> "FixedPointContinuation":
        """Continue the fixed points of ``family(s)`` over ``s_grid`` (default: ``num_steps`` points on [0, 1]).

        ``initial_states``: fresh candidate states (K0,S), or a function of s giving them (e.g. the
        states visited at theta(s)); ``num_initial`` of them are drawn at every step.
        """
        grid = np.linspace(0.0, 1.0, self.num_steps) if s_grid is None else np.asarray(s_grid, dtype=np.float64)
        if grid.ndim != 1 or len(grid) < 2 or not (np.diff(grid) > 0).all():
            raise ValueError(f"s_grid: need at least 2 increasing values, got {grid}")
        template = self.finder if self.finder is not None else FixedPointFinder()
        params = {k: v for k, v in vars(template).items() if not k.endswith("_")}
        dyn = [family(float(s)) for s in grid]
        fresh = [self._fresh(initial_states, float(s), k, params["num_initial"], dyn[k].state_dim)
                 for k, s in enumerate(grid)]
        found: list = [None] * len(grid)
        for k in range(len(grid)):  # forward: each step seeded by the previous one's fixed points
            prev = found[k - 1][0] if k else None
            found[k] = self._search(params, dyn[k], [prev, fresh[k]], fresh[k], k)
        for k in range(len(grid) - 2, -1, -1):  # backward: branches first met later are followed back
            back = self._search(params, dyn[k], [found[k][0], found[k + 1][0]], fresh[k], k)
            found[k] = back[:3] + (min(found[k][3], back[3]),)

        self.s_ = grid
        self.fixed_points_ = [f[0] for f in found]
        self.speeds_ = [f[1] for f in found]
        self.max_abs_eigenvalues_ = [f[2] for f in found]
        self.stable_ = [m < 1.0 for m in self.max_abs_eigenvalues_]
        self.num_fixed_points_ = np.array([len(p) for p in self.fixed_points_])
        pooled = np.concatenate(self.fixed_points_)
        self.mean_, self.plane_ = _pca_plane(pooled, dyn[0].state_dim)
        self._track()
        self.steps_ = [{"step": k, "s": float(s), "num_fixed_points": int(self.num_fixed_points_[k]),
                        "num_stable": int(self.stable_[k].sum()), "converged": bool(self.num_fixed_points_[k] > 0),
                        "min_q": found[k][3]} for k, s in enumerate(grid)]
        self.points_ = []
        for k, s in enumerate(grid):
            proj = self._project(self.fixed_points_[k])
            self.points_ += [{"step": k, "s": float(s), "branch": int(br), "pc1": float(c[0]), "pc2": float(c[1]),
                              "q": float(q), "max_abs_eigenvalue": float(m), "stable": bool(st)}
                             for br, c, q, m, st in zip(self.branches_[k], proj, self.speeds_[k],
                                                        self.max_abs_eigenvalues_[k], self.stable_[k])]
        change = np.nonzero(np.diff(self.num_fixed_points_))[0]
        self.count_changes_ = [float(0.5 * (grid[k] + grid[k + 1])) for k in change]
        return self

    # ------------------------------------------------------------ steps

    def _fresh(self, initial_states, s: float, k: int, num: int, state_dim: int) -> torch.Tensor:
        states = initial_states(s) if callable(initial_states) else initial_states
        states = torch.as_tensor(states, dtype=torch.float32).detach()
        if states.ndim != 2 or states.shape[1] != state_dim or states.shape[0] == 0:
            raise ValueError(f"initial_states: expected a non-empty (K, {state_dim}) array at s={s}, "
                             f"got {tuple(states.shape)}")
        rng = np.random.default_rng(None if self.random_state is None else [self.random_state, k])
        idx = rng.choice(states.shape[0], size=min(num, states.shape[0]), replace=False)
        return states[torch.from_numpy(idx)]

    def _search(self, params: dict, dynamics: Dynamics, seed_sets: list, fresh_KS: torch.Tensor, k: int):
        """Fixed points from every seed -> (points (P,S), q (P,), spectral radii (P,), slowest q).

        The finder's outlier rule is applied here, around the fresh candidates: seeds from a
        neighbouring step are few and close together, so their own spread is no scale.
        """
        seed_sets = [torch.as_tensor(x, dtype=torch.float32) for x in seed_sets if x is not None and len(x)]
        if not seed_sets:  # the backward sweep between two steps without fixed points
            return np.zeros((0, dynamics.state_dim)), np.zeros(0), np.zeros(0), float("inf")
        seeds = torch.cat(seed_sets)
        rs = None if self.random_state is None else self.random_state + k
        # every seed is searched (num_initial = all of them) and every fixed point linearised
        f = FixedPointFinder(**{**params, "num_initial": len(seeds), "max_jacobians": len(seeds),
                                "outlier_scale": None, "random_state": rs}).fit(dynamics, seeds)
        near_P = self._near(f.fixed_points_, fresh_KS, params["outlier_scale"])
        ok = (f.speeds_ <= f.q_tol) & near_P  # what an unconverged search keeps are slow points: never tracked
        radius = np.abs(f.eigenvalues_).max(axis=1) if len(f.eigenvalues_) else np.zeros(0)
        near_K = self._near(f.final_states_, fresh_KS, params["outlier_scale"])
        min_q = float(f.final_speeds_[near_K].min()) if near_K.any() else float("inf")
        pts, q, radius = f.fixed_points_[ok], f.speeds_[ok], radius[ok]
        keep = isolated(dynamics.step, pts, f.q_tol)
        return pts[keep].astype(np.float64), q[keep], radius[keep], min_q

    @staticmethod
    def _near(points_PS: np.ndarray, fresh_KS: torch.Tensor, scale: float | None) -> np.ndarray:
        """As FixedPointFinder's ``outlier_scale``: within ``scale`` times the fresh candidates' radius."""
        if scale is None:
            return np.ones(len(points_PS), dtype=bool)
        cand = fresh_KS.numpy().astype(np.float64)
        centre = cand.mean(axis=0)
        radius = float(np.linalg.norm(cand - centre, axis=1).max())
        return np.linalg.norm(points_PS - centre, axis=1) <= scale * max(radius, 1e-6)

    # ------------------------------------------------------------ tracking

    def _track(self) -> None:
        """Branch ids by assignment between consecutive steps, and the born / died / stability events."""
        pts, stable = self.fixed_points_, self.stable_
        self.branches_ = [np.arange(len(pts[0]))]
        next_id = len(pts[0])
        self.events_ = []
        for k in range(1, len(pts)):
            a, b = pts[k - 1], pts[k]
            ids = np.full(len(b), -1)
            matched_a = np.zeros(len(a), dtype=bool)
            if len(a) and len(b):
                dist = np.linalg.norm(a[:, None] - b[None], axis=2)
                rows, cols = linear_sum_assignment(dist)
                for i, j in zip(rows, cols):
                    if self.match_tol is None or dist[i, j] <= self.match_tol:
                        ids[j] = self.branches_[k - 1][i]
                        matched_a[i] = True
                        if stable[k - 1][i] != stable[k][j]:
                            self._event("stability", ids[j], k, b[j], stable[k - 1][i], stable[k][j])
            for i in np.nonzero(~matched_a)[0]:
                self._event("died", self.branches_[k - 1][i], k, a[i], stable[k - 1][i], None)
            for j in np.nonzero(ids < 0)[0]:
                ids[j] = next_id
                next_id += 1
                self._event("born", ids[j], k, b[j], None, stable[k][j])
            self.branches_.append(ids)

    def _event(self, kind: str, branch, k: int, point_S, before, after) -> None:
        c = self._project(point_S[None])[0]
        s0, s1 = float(self.s_[k - 1]), float(self.s_[k])
        self.events_.append({"kind": kind, "branch": int(branch), "step": k, "s_before": s0, "s_after": s1,
                             "s": 0.5 * (s0 + s1), "num_before": int(self.num_fixed_points_[k - 1]),
                             "num_after": int(self.num_fixed_points_[k]),
                             "stable_before": None if before is None else bool(before),
                             "stable_after": None if after is None else bool(after),
                             "pc1": float(c[0]), "pc2": float(c[1])})

    def _project(self, points_PS: np.ndarray) -> np.ndarray:
        return (np.asarray(points_PS, dtype=np.float64) - self.mean_) @ self.plane_.T

    @property
    def num_stability_changes_(self) -> int:
        return sum(e["kind"] == "stability" for e in self.events_)


def isolated(step: Callable[[torch.Tensor], torch.Tensor], points_PS: np.ndarray, q_tol: float,
             num_probes: int = 3, batch_size: int = 8192) -> np.ndarray:
    """Indices of one point (the first, i.e. the slowest when sorted by q) per continuum of fixed points.

    Two fixed points are one when q stays <= ``q_tol`` at ``num_probes`` points evenly inside the
    segment between them (single linkage: a chain of such segments joins a curved continuum).
    At a bifurcation the map is flat near the fixed point (at a pitchfork's r = 0, q ~ h^6) and
    every state within q_tol of it "converges"; likewise a line attractor's fixed points sample a
    line. Counted as one, they leave the number of fixed points a count of the isolated ones.
    """
    p = len(points_PS)
    if p < 2:
        return np.arange(p)
    i, j = np.triu_indices(p, k=1)
    t = (np.arange(1, num_probes + 1) / (num_probes + 1))[None, :, None]
    a, b = points_PS[i][:, None], points_PS[j][:, None]
    probes = torch.as_tensor((a + t * (b - a)).reshape(-1, points_PS.shape[1]), dtype=torch.float32)
    with torch.no_grad():
        q = torch.cat([0.5 * (step(x) - x).pow(2).sum(1) for x in probes.split(batch_size)]).numpy()
    joined = (q.reshape(len(i), num_probes) <= q_tol).all(axis=1)
    parent = np.arange(p)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(i[joined], j[joined]):
        ru, rv = root(u), root(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)  # the earlier (slower) point stays the representative
    return np.array([k for k in range(p) if root(k) == k], dtype=np.int64)


def _pca_plane(points_PS: np.ndarray, state_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (2,S) first principal axes (zero rows beyond the points' rank; S = 1: the axis itself)."""
    mean = points_PS.mean(axis=0) if len(points_PS) else np.zeros(state_dim)
    plane = np.zeros((2, state_dim))
    if len(points_PS) >= 2:
        vt = np.linalg.svd(points_PS - mean, full_matrices=False)[2]
        plane[: min(2, len(vt))] = vt[:2]
        # a fixed sign (largest loading positive), so that the projection is reproducible
        for r in range(min(2, len(vt))):
            if plane[r, np.argmax(np.abs(plane[r]))] < 0:
                plane[r] = -plane[r]
    elif state_dim:
        plane[0, 0] = 1.0
    return mean, plane
