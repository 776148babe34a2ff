"""Pairwise representational baseline (paper section 4.1, Fig. 5): SVCCA and linear CKA.

Every pair of base models is compared on the same probe inputs through their hidden
trajectories, and the N x N distance matrix is embedded in 2-D with metric MDS -- the
Theta(N^2) route DYNAMO avoids. Models may have different hidden sizes.

Distances
---------
* **SVCCA** (Raghu et al. 2017), "modified to output L2 distances instead of
  correlations": each model's activations (rows = probe (example, step) pairs, columns =
  units) are centred and reduced by SVD to the directions holding ``variance_kept`` of
  the variance; CCA of the two reduced sets gives canonical correlations rho_1..rho_k and
  unit-variance canonical variates u_i, v_i. Since E||u_i - v_i||^2 = 2 (1 - rho_i), the
  distance is the root-mean-square L2 distance between matched canonical variates::

      d_SVCCA = sqrt( (1/k) * sum_i 2 (1 - rho_i) )        in [0, sqrt(2)]

  0 for representations equal up to an invertible linear map (rotation, permutation,
  scaling).
* **Linear CKA** (Kornblith et al. 2019): ``d_CKA = 1 - ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
  on centred activations; 0 up to rotation/permutation and isotropic scaling.

Cost: N^2/2 pairs, each a product of two (R, k) bases (or (R, H) activations): Theta(N^2 R k^2)
however it is vectorised, so :func:`pairwise_distances` batches the pairs and the report runs
on a stratified sample of ``analyze.baseline_models`` models.

Shape legend: R activation rows (probe examples x valid steps), H hidden units, N models.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from .. import family as families
from .geometry import clustering_scores

METHODS = ("svcca", "cka")


# ---------------------------------------------------------------- activations


def activation_taps(hiddens: Sequence[torch.Tensor], family: str, lengths: torch.Tensor | None = None) -> list[np.ndarray]:
    """One model's hidden taps as activation matrices, one (R,H) per tap.

    RNN: rows are the valid (example, step) pairs of its single tap (left padding masked);
    CNN: each stage's feature map averaged over positions, rows = examples (``Family.activation_taps``).
    """
    return families.get(family).activation_taps(hiddens, lengths)


def subsample_rows(taps_by_model: list[list[np.ndarray]], max_rows: int | None, random_state: int | None) -> list[list[np.ndarray]]:
    """The same random subset of at most ``max_rows`` rows for every model (rows stay aligned)."""
    if max_rows is None:
        return taps_by_model
    rng = np.random.default_rng(random_state)
    num_taps = len(taps_by_model[0])
    idx = []
    for t in range(num_taps):
        r = min(a[t].shape[0] for a in taps_by_model)
        idx.append(np.sort(rng.choice(r, size=min(r, max_rows), replace=False)))
    return [[a[t][idx[t]] for t in range(num_taps)] for a in taps_by_model]


# ---------------------------------------------------------------- distances


def svcca_basis(x_RH: np.ndarray, variance_kept: float = 0.99, max_dims: int | None = None) -> np.ndarray:
    """Orthonormal (R,k) basis of the top singular directions of centred ``x`` (the SV step of SVCCA).

    k keeps ``variance_kept`` of the variance, at most ``max_dims`` (default R // 10, so that
    CCA has ten samples per dimension and does not find spurious perfect correlations).
    """
    x = np.asarray(x_RH, dtype=np.float64)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s ** 2
    if var.sum() <= 0:
        return u[:, :0]
    k = int(np.searchsorted(np.cumsum(var) / var.sum(), variance_kept - 1e-12) + 1)
    cap = max(1, x.shape[0] // 10) if max_dims is None else max_dims
    k = max(1, min(k, cap, int((var > 1e-12 * var.max()).sum())))
    return u[:, :k]


def canonical_correlations(basis_x: np.ndarray, basis_y: np.ndarray) -> np.ndarray:
    """CCA of two column spaces given by orthonormal bases: singular values of Ux^T Uy."""
    if basis_x.shape[1] == 0 or basis_y.shape[1] == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(basis_x.T @ basis_y, compute_uv=False), 0.0, 1.0)


def svcca_distance(x_RH: np.ndarray, y_RG: np.ndarray, variance_kept: float = 0.99, max_dims: int | None = None) -> float:
    """L2-type SVCCA distance sqrt(mean 2(1 - rho_i)) between two activation matrices (same rows)."""
    if x_RH.shape[0] != y_RG.shape[0]:
        raise ValueError(f"activations must share rows (probe examples x steps): {x_RH.shape[0]} != {y_RG.shape[0]}")
    rho = canonical_correlations(svcca_basis(x_RH, variance_kept, max_dims), svcca_basis(y_RG, variance_kept, max_dims))
    return _svcca_from_rho(rho)


def _svcca_from_rho(rho: np.ndarray) -> float:
    if rho.size == 0:
        return float(np.sqrt(2.0))
    return float(np.sqrt(max(0.0, np.mean(2.0 * (1.0 - rho)))))


def linear_cka(x_RH: np.ndarray, y_RG: np.ndarray) -> float:
    """Linear CKA similarity of two activation matrices with the same rows."""
    if x_RH.shape[0] != y_RG.shape[0]:
        raise ValueError(f"activations must share rows (probe examples x steps): {x_RH.shape[0]} != {y_RG.shape[0]}")
    x = np.asarray(x_RH, dtype=np.float64)
    y = np.asarray(y_RG, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else 0.0


def cka_distance(x_RH: np.ndarray, y_RG: np.ndarray) -> float:
    """1 - linear CKA."""
    return max(0.0, 1.0 - linear_cka(x_RH, y_RG))


def pairwise_distances(taps_by_model: list[list[np.ndarray]], method: str = "svcca", variance_kept: float = 0.99,
                       max_dims: int | None = None) -> np.ndarray:
    """(N,N) symmetric distance matrix; with several taps (ResNet stages) the mean over taps.

    Equal to :func:`svcca_distance` / :func:`cka_distance` of every pair (within 1e-6, tested)
    at a fraction of the cost: each model's SVCCA basis (or centred activations, for CKA) is
    computed once, and model i meets every later model in one matrix product with their
    columns side by side, followed for SVCCA by one batched SVD of the (k_i, k_j) blocks.
    Memory: one float64 copy of every model's columns (rows x sum of k or H).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    n = len(taps_by_model)
    num_taps = len(taps_by_model[0])
    dist = np.zeros((n, n))
    for t in range(num_taps):
        mats = [a[t] for a in taps_by_model]
        if method == "svcca":
            dist += _svcca_matrix([svcca_basis(m, variance_kept, max_dims) for m in mats])
        else:
            dist += _cka_matrix(mats)
    return dist / num_taps


def _side_by_side(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every model's (R, k_n) columns in one (R, sum k + 1) array (the last column zeros) and their starts."""
    widths = [c.shape[1] for c in cols]
    starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    stacked = np.zeros((cols[0].shape[0], starts[-1] + 1), order="F")  # column blocks contiguous: BLAS reads them in place
    for c, s, w in zip(cols, starts, widths):
        stacked[:, s:s + w] = c
    return stacked, starts


def _svcca_matrix(bases: list[np.ndarray]) -> np.ndarray:
    n = len(bases)
    stacked, starts = _side_by_side(bases)
    widths = np.diff(starts)
    k_max = max(1, int(widths.max()))
    # column of model j's p-th basis vector, padded with the zero column: a zero-padded (k_i, k_max)
    # block has the singular values of the (k_i, k_j) one plus zeros, so blocks batch into one SVD
    pos = np.arange(k_max)
    index = np.where(pos < widths[:, None], starts[:-1, None] + pos, starts[-1])
    dist = np.zeros((n, n))
    for i in range(n - 1):
        k_i, first = int(widths[i]), int(starts[i + 1])
        if k_i == 0:
            dist[i, i + 1:] = np.sqrt(2.0)
            continue
        cross = stacked[:, starts[i]:first].T @ stacked[:, first:]               # (k_i, columns of models > i)
        blocks = cross[:, index[i + 1:] - first].transpose(1, 0, 2)              # (M, k_i, k_max)
        rho = np.clip(np.linalg.svd(blocks, compute_uv=False), 0.0, 1.0)          # (M, min(k_i, k_max)), descending
        num = np.minimum(k_i, widths[i + 1:])                                    # canonical pairs per model
        kept = np.arange(rho.shape[1]) < num[:, None]
        mean = (2.0 * (1.0 - rho) * kept).sum(axis=1) / np.maximum(num, 1)
        dist[i, i + 1:] = np.where(num > 0, np.sqrt(np.maximum(mean, 0.0)), np.sqrt(2.0))
    return dist + dist.T


def _cka_matrix(mats: list[np.ndarray]) -> np.ndarray:
    n = len(mats)
    centred = []
    for m in mats:
        x = np.asarray(m, dtype=np.float64)
        centred.append(x - x.mean(axis=0))
    stacked, starts = _side_by_side(centred)
    del centred
    assert (np.diff(starts) > 0).all(), "every model has at least one unit"
    self_norm = np.array([np.linalg.norm(stacked[:, a:b].T @ stacked[:, a:b]) for a, b in zip(starts[:-1], starts[1:])])
    dist = np.zeros((n, n))
    for i in range(n - 1):
        first = int(starts[i + 1])
        cross = stacked[:, starts[i]:first].T @ stacked[:, first:-1]             # (H_i, columns of models > i)
        sq = np.add.reduceat((cross ** 2).sum(axis=0), starts[i + 1:-1] - first)  # ||X_j^T X_i||_F^2 per model j
        dist[i, i + 1:] = np.maximum(0.0, 1.0 - sq / np.maximum(self_norm[i] * self_norm[i + 1:], 1e-300))
    return dist + dist.T


def classical_mds(distances_NN: np.ndarray, n_components: int) -> np.ndarray:
    """Classical (Torgerson) MDS: (N, n_components) coordinates from the double-centred squared distances.

    Exact for Euclidean distances (the points up to a rotation and translation); for others the
    directions of non-positive eigenvalues get zero coordinates. Deterministic, unlike SMACOF.
    """
    d2 = np.asarray(distances_NN, dtype=np.float64) ** 2
    gram = -0.5 * (d2 - d2.mean(axis=0) - d2.mean(axis=1)[:, None] + d2.mean())
    w, v = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1][:n_components]
    w = np.where(w[order] > 1e-12 * max(w.max(), 1e-300), w[order], 0.0)  # rounding noise is no dimension
    return v[:, order] * np.sqrt(w)


def mds_embedding(distances_NN: np.ndarray, n_components: int = 2, random_state: int | None = None) -> tuple[np.ndarray, float]:
    """Metric MDS of a precomputed distance matrix -> (coords (N, n_components), stress)."""
    from sklearn.manifold import MDS

    params = inspect.signature(MDS.__init__).parameters
    if "metric_mds" in params:  # scikit-learn >= 1.8: dissimilarity='precomputed' became metric='precomputed'
        mds = MDS(n_components=n_components, metric="precomputed", init="classical_mds", n_init=1,
                  random_state=random_state)
    else:
        mds = MDS(n_components=n_components, dissimilarity="precomputed", random_state=random_state)
    coords = mds.fit_transform(np.asarray(distances_NN, dtype=np.float64))
    return coords, float(mds.stress_)


class RepresentationBaseline:
    """Pairwise SVCCA or CKA distances between models, embedded with MDS, with clustering scores.

    Parameters
    ----------
    method : "svcca" | "cka"
    n_components : int -- MDS dimensions (2 for the plots).
    variance_kept, max_dims : SVCCA's SVD step (see :func:`svcca_basis`).
    max_rows : int | None -- activation rows compared (same random subset for every model).
    random_state : int | None -- row subsample, MDS and k-means.

    Attributes (after ``fit``): distances_ (N,N), embedding_ (N, n_components), stress_,
    num_rows_ (activation rows compared per model), scores_ (silhouette on ``distances_`` with
    the precomputed metric, k-means adjusted Rand index on ``embedding_``).
    """

    def __init__(self, method: str = "svcca", n_components: int = 2, variance_kept: float = 0.99,
                 max_dims: int | None = None, max_rows: int | None = 4096, random_state: int | None = None):
        self.method = method
        self.n_components = n_components
        self.variance_kept = variance_kept
        self.max_dims = max_dims
        self.max_rows = max_rows
        self.random_state = random_state

    def fit(self, taps_by_model: list[list[np.ndarray]], labels: Sequence | None = None) -> "RepresentationBaseline":
        if len(taps_by_model) < 2:
            raise ValueError(f"need at least 2 models for pairwise distances, got {len(taps_by_model)}")
        taps = subsample_rows(taps_by_model, self.max_rows, self.random_state)
        self.num_rows_ = int(taps[0][0].shape[0])
        self.distances_ = pairwise_distances(taps, self.method, self.variance_kept, self.max_dims)
        self.embedding_, self.stress_ = mds_embedding(self.distances_, self.n_components, self.random_state)
        self.scores_ = (clustering_scores(labels, points=self.embedding_, distances=self.distances_,
                                          random_state=self.random_state) if labels is not None else {})
        return self
