"""The PCA of model embeddings that every picture of θ uses: the analysis' (``analysis.geometry``),
the meta run's and the post-hoc plots (``plots``). Plain numpy, below both, so that the plots draw
θ in the analysis' plane without importing the analysis.

Shape legend: N models, E embedding dimension, R rank, K points.
"""

from __future__ import annotations

import numpy as np


def principal_axes(theta_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (E,), principal axes (R,E) of the non-zero variances (R = rank), their variances (R,).
    An axis' sign is its own choice of the SVD solver, so it is fixed here: each axis'
    largest-|loading| coordinate is positive; no solver, platform or model order mirrors a plot."""
    theta = np.asarray(theta_NE, dtype=np.float64)
    mean = theta.mean(axis=0)
    _, sv, vt = np.linalg.svd(theta - mean, full_matrices=False)
    var = sv ** 2 / max(theta.shape[0] - 1, 1)
    total = var.sum()
    rank = int((var > 1e-12 * max(total, 1e-300)).sum()) if total > 0 else 0
    axes = vt[:rank]
    signs = np.sign(axes[np.arange(rank), np.abs(axes).argmax(axis=1)])
    return mean, axes * signs[:, None], var[:rank]


class ThetaPCA:
    """PCA of embeddings (:func:`principal_axes`) and the plane of its first two components.

    Attributes (after ``fit``): mean_ (E,), components_ (R,E), explained_variance_ (R,),
    explained_variance_ratio_ (R,), coords_ (N,2) the embeddings in the plane (zeros where the
    rank is < 2).
    """

    def fit(self, theta_NE: np.ndarray) -> "ThetaPCA":
        theta = np.asarray(theta_NE, dtype=np.float64)
        if theta.ndim != 2 or theta.shape[0] < 2:
            raise ValueError(f"theta: need an (N, E) array with N >= 2 models, got shape {theta.shape}")
        self.mean_, self.components_, self.explained_variance_ = principal_axes(theta)
        total = float(np.sum((theta - self.mean_) ** 2)) / (theta.shape[0] - 1)
        self.explained_variance_ratio_ = self.explained_variance_ / total if total > 0 else np.zeros(0)
        self.coords_ = self.transform(theta)
        return self

    @property
    def plane_(self) -> np.ndarray:
        """(2,E) the first two principal axes (a zero row where the rank is < 2)."""
        plane = np.zeros((2, self.mean_.shape[0]))
        plane[: min(2, len(self.components_))] = self.components_[:2]
        return plane

    def transform(self, theta_KE: np.ndarray) -> np.ndarray:
        """Coordinates (K,2) of points in the plane of the first two components."""
        return (np.asarray(theta_KE, dtype=np.float64) - self.mean_) @ self.plane_.T

    def inverse_transform(self, coords_K2: np.ndarray) -> np.ndarray:
        """Points (K,E) of the PCA plane at the given coordinates."""
        return self.mean_ + np.asarray(coords_K2, dtype=np.float64) @ self.plane_
