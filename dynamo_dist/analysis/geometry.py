"""Geometry of the model-embedding space (paper section 4.1, Fig. 3).

PCA of the embeddings theta_n, the eigen-spectrum of their covariance with the number
of components that explain a variance threshold (95% in the paper), and clustering
scores against known groups: silhouette (how separated the labelled groups are) and the
adjusted Rand index of k-means (k = number of groups) against those labels; and the
stratified sample of models that the pairwise analyses compare at scale.

Shape legend: N models, E embedding dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..pca import ThetaPCA


def num_components_for(explained_variance_ratio: np.ndarray, threshold: float = 0.95) -> int:
    """Smallest k whose first k components explain at least ``threshold`` of the variance."""
    ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
    if ratio.size == 0:
        return 0
    cum = np.cumsum(ratio)
    return int(min(np.searchsorted(cum, threshold - 1e-12) + 1, ratio.size))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share their mean rank), as Spearman's correlation uses."""
    from scipy.stats import rankdata

    return rankdata(x, axis=0)


def axis_correlations(coords_NK: np.ndarray, values_N: Sequence[float], num_permutations: int = 2000,
                      random_state: int | None = 0) -> list[dict]:
    """Spearman's rank correlation of each column of ``coords_NK`` (principal components of theta)
    with a numeric per-model value, and a two-sided permutation p-value: the fraction of
    ``num_permutations`` shuffles of the values whose |rho| reaches the observed one, counting the
    observed arrangement itself ((hits + 1) / (permutations + 1), never 0). NaN rho (and p) for a
    constant column or constant values."""
    coords = np.asarray(coords_NK, dtype=np.float64)
    values = np.asarray(values_N, dtype=np.float64)
    if coords.ndim != 2 or len(values) != len(coords):
        raise ValueError(f"values: need one per model ({len(coords)}), got {len(values)}")
    rc = _ranks(coords)
    rc -= rc.mean(axis=0)
    rv = _ranks(values)
    rv -= rv.mean()
    norm = np.linalg.norm(rc, axis=0) * np.linalg.norm(rv)
    rng = np.random.default_rng(random_state)
    perms = np.stack([rng.permutation(rv) for _ in range(num_permutations)]) if num_permutations else np.zeros((0, len(rv)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rv @ rc) / norm
        null = np.abs(perms @ rc) / norm  # (P, K)
    out = []
    for k in range(coords.shape[1]):
        if not np.isfinite(rho[k]):
            out.append({"component": k + 1, "spearman": float("nan"), "p_value": float("nan")})
            continue
        hits = int(np.sum(null[:, k] >= abs(rho[k]) - 1e-12))
        out.append({"component": k + 1, "spearman": float(rho[k]),
                    "p_value": (hits + 1) / (num_permutations + 1)})
    return out


def encode_labels(labels: Sequence) -> np.ndarray:
    """Manifest labels (any hashable, None allowed) -> int codes, ordered by their string form."""
    keys = [str(v) for v in labels]
    uniq = sorted(set(keys))
    return np.array([uniq.index(k) for k in keys], dtype=np.int64)


def stratified_sample(labels: Sequence, size: int | None, random_state: int | None = None) -> np.ndarray:
    """Sorted indices of at most ``size`` models, each group in proportion to its share of ``labels``.

    All models when ``size`` is None or at least their number. Otherwise every group gets its
    proportional quota rounded by the largest remainders, but at least two models (one when
    ``size`` < 2 x groups; never more than it has), so that every group can be scored; the
    members are drawn at random without replacement, seeded by ``random_state``.
    """
    codes = encode_labels(labels)
    n = len(codes)
    if size is None or size >= n:
        return np.arange(n)
    if size < 1:
        raise ValueError(f"size: expected at least 1 model, got {size}")
    counts = np.bincount(codes)
    quota = size * counts / n
    floor = 2 if size >= 2 * len(counts) else 1 if size >= len(counts) else 0
    take = np.maximum(np.floor(quota).astype(np.int64), np.minimum(counts, floor))
    while take.sum() > size:  # the floors overshot: take from the group furthest above its quota
        over = np.where(take > np.minimum(counts, floor), take - quota, -np.inf)
        take[int(np.argmax(over))] -= 1
    while take.sum() < size:  # largest remainders first
        under = np.where(take < counts, quota - take, -np.inf)
        take[int(np.argmax(under))] += 1
    rng = np.random.default_rng(random_state)
    picked = [rng.choice(np.flatnonzero(codes == g), size=int(k), replace=False) for g, k in enumerate(take)]
    return np.sort(np.concatenate(picked))


def clustering_scores(labels: Sequence, points: np.ndarray | None = None, distances: np.ndarray | None = None,
                      random_state: int | None = None) -> dict[str, float]:
    """Silhouette of the known groups and adjusted Rand index of k-means against them.

    ``points`` (N, F) are clustered with k-means (k = number of distinct labels); when
    ``distances`` (N, N) are given the silhouette uses them (``metric='precomputed'``),
    else the Euclidean distances of ``points``. NaN where a score is undefined
    (fewer than 2 groups, or every model its own group).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    codes = encode_labels(labels)
    n, k = len(codes), len(set(codes.tolist()))
    out = {"num_groups": k, "silhouette": float("nan"), "adjusted_rand": float("nan")}
    if not (2 <= k <= n - 1):
        return out
    if distances is not None:
        out["silhouette"] = float(silhouette_score(np.asarray(distances), codes, metric="precomputed"))
    elif points is not None:
        out["silhouette"] = float(silhouette_score(np.asarray(points), codes))
    if points is not None:
        km = KMeans(n_clusters=k, n_init=10, random_state=random_state).fit(np.asarray(points, dtype=np.float64))
        out["adjusted_rand"] = float(adjusted_rand_score(codes, km.labels_))
    return out


class EmbeddingGeometry(ThetaPCA):
    """PCA, eigen-spectrum and cluster structure of model embeddings.

    Parameters
    ----------
    variance_threshold : float
        variance share the reported number of components must explain (paper: 0.95).
    random_state : int | None
        seed of k-means.

    Attributes (after ``fit``)
    --------------------------
    mean_ (E,), components_ (R,E) principal axes (R = rank; signs as ``pca.principal_axes`` fixes
    them), explained_variance_ (R,),
    explained_variance_ratio_ (R,), num_components_ (components for ``variance_threshold``),
    coords_ (N,2) coordinates in the plane of the first two components (zeros where the
    rank is < 2), scores_ (dict of :func:`clustering_scores`; empty without labels).
    """

    def __init__(self, variance_threshold: float = 0.95, random_state: int | None = None):
        self.variance_threshold = variance_threshold
        self.random_state = random_state

    def fit(self, theta_NE: np.ndarray, labels: Sequence | None = None) -> "EmbeddingGeometry":
        super().fit(theta_NE)  # theta's shape is checked first
        if not (0.0 < self.variance_threshold <= 1.0):
            raise ValueError(f"variance_threshold: must be in (0, 1], got {self.variance_threshold}")
        theta = np.asarray(theta_NE, dtype=np.float64)
        self.num_components_ = num_components_for(self.explained_variance_ratio_, self.variance_threshold)
        self.scores_ = clustering_scores(labels, points=theta, random_state=self.random_state) if labels is not None else {}
        return self
