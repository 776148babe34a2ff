"""Meta-model test accuracy over the model-embedding space (paper section 4.2, Fig. 6).

A regular grid in the plane of the first two principal components of the base
embeddings (through their mean) is evaluated with any score function of theta; the
best grid point is flagged as inside or outside the convex hull of the base embeddings'
projections onto that plane (the paper finds it outside).

Shape legend: N models, E embedding dim, G grid points per axis, K points.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .geometry import EmbeddingGeometry


def in_convex_hull(points_K2: np.ndarray, hull_points_N2: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Whether each 2-D point lies in the convex hull of ``hull_points`` (K,) bool.

    Uses scipy's Delaunay triangulation; degenerate hulls (fewer than 3 points, or all
    collinear) fall back to the segment they span.
    """
    from scipy.spatial import Delaunay, QhullError

    pts = np.atleast_2d(np.asarray(points_K2, dtype=np.float64))
    hull = np.asarray(hull_points_N2, dtype=np.float64)
    if len(hull) >= 3:
        try:
            return Delaunay(hull).find_simplex(pts, tol=tol) >= 0
        except QhullError:
            pass
    # degenerate: a point or a segment -- inside iff on it
    a = hull.mean(axis=0)
    centred = hull - a
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    direction = vt[0] if np.abs(centred).sum() > 0 else np.zeros(2)
    proj = centred @ direction
    rel = pts - a
    along = rel @ direction
    off = np.linalg.norm(rel - np.outer(along, direction), axis=1)
    scale = max(np.abs(proj).max(), 1e-12)
    return (off <= 1e-6 * scale) & (along >= proj.min() - 1e-6 * scale) & (along <= proj.max() + 1e-6 * scale)


class ThetaLandscape:
    """A score (e.g. test accuracy) of the meta-model on a grid in the PCA plane of theta.

    Parameters
    ----------
    grid_size : int -- points per axis.
    margin : float -- the grid spans the base embeddings' range along each axis extended
        by ``margin`` times that range on both sides (extrapolation beyond the hull).

    ``fit(theta_NE, score_fn, geometry=None, bounds=None)``: ``score_fn((K,E) thetas) -> (K,) scores``;
    ``geometry`` is a fitted :class:`EmbeddingGeometry` of the same embeddings (fitted here
    if omitted); ``bounds`` ((a_lo, a_hi), (b_lo, b_hi)) overrides the grid's extent.

    Attributes: axis_a_ (G,), axis_b_ (G,) plane coordinates; grid_thetas_ (G*G,E);
    scores_ (G,G) indexed [b, a]; base_coords_ (N,2); base_scores_ (N,) score at each theta_n;
    best_index_ (b, a), best_theta_ (E,), best_coords_ (2,), best_score_, best_inside_hull_ (bool),
    inside_hull_ (G,G) bool.
    """

    def __init__(self, grid_size: int = 9, margin: float = 0.5):
        self.grid_size = grid_size
        self.margin = margin

    def fit(self, theta_NE: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray],
            geometry: EmbeddingGeometry | None = None, bounds=None) -> "ThetaLandscape":
        if self.grid_size < 2:
            raise ValueError(f"grid_size: need at least 2 points per axis, got {self.grid_size}")
        theta = np.asarray(theta_NE, dtype=np.float64)
        geo = geometry if geometry is not None else EmbeddingGeometry().fit(theta)
        base = geo.transform(theta)
        axes = []
        rank = len(geo.components_)
        for d in range(2):
            lo, hi = base[:, d].min(), base[:, d].max()
            span = hi - lo
            if d >= rank or (span <= 0 and bounds is None):  # no spread along this axis: a single row
                axes.append(np.zeros(1))
                continue
            a, b = (lo - self.margin * span, hi + self.margin * span) if bounds is None else bounds[d]
            axes.append(np.linspace(a, b, self.grid_size))
        self.axis_a_, self.axis_b_ = axes
        aa, bb = np.meshgrid(self.axis_a_, self.axis_b_)  # (Gb, Ga)
        coords = np.column_stack([aa.ravel(), bb.ravel()])
        self.grid_coords_ = coords
        self.grid_thetas_ = geo.inverse_transform(coords)
        self.scores_ = np.asarray(score_fn(self.grid_thetas_), dtype=np.float64).reshape(aa.shape)
        self.base_coords_ = base
        self.base_scores_ = np.asarray(score_fn(theta), dtype=np.float64)
        self.inside_hull_ = in_convex_hull(coords, base).reshape(aa.shape)
        flat = int(np.argmax(self.scores_))
        self.best_index_ = np.unravel_index(flat, self.scores_.shape)
        self.best_coords_ = coords[flat]
        self.best_theta_ = self.grid_thetas_[flat]
        self.best_score_ = float(self.scores_.ravel()[flat])
        self.best_inside_hull_ = bool(self.inside_hull_.ravel()[flat])
        return self
