"""One like-for-like table of how well each representation of the models recovers their groups.

DYNAMO's silhouette and k-means ARI used to be computed in its full θ space while the
baselines' ARI came from their 2-D MDS coordinates. Here every method enters the same way --
an (N,N) distance matrix between the models, plus a 2-D picture of them -- and is scored the
same way against the known groups:

* ``silhouette_full``: silhouette on the distance matrix (θ: Euclidean distances of θ);
* ``silhouette_2d``: silhouette on the Euclidean distances of the 2-D coordinates (θ: PCA-2;
  SVCCA/CKA: metric MDS-2);
* ``ari_full``: adjusted Rand index of k-means (k = number of groups) on the classical MDS of
  the distance matrix in ``min(num_dims, N-1)`` dimensions. For Euclidean distances (θ, raw
  weights) that is the points themselves up to a rotation (all of θ when ``num_dims`` is its
  dimension); for SVCCA/CKA it is the closest Euclidean configuration with as many dimensions;
* ``ari_2d``: the same k-means on the 2-D coordinates;
* ``nn_accuracy``: leave-one-out 1-nearest-neighbour accuracy of the group on the distance matrix.

Intervals: percentile bootstrap over models, resampled with replacement within each group
(group sizes fixed, so every resample has every group). A resample holds copies of a model;
like the model itself, its copies are left out of its own group mean (silhouette), else
duplicates at distance 0 would inflate it. 1-NN accuracy is the mean of one outcome per model
(is its nearest other model in its group, among all models): its interval resamples those
outcomes. Searching the neighbour among the resample's models instead (about 63% of them
distinct) made each neighbour farther than it is and the interval biased low: with 200 models
it missed its own point estimate (0.85 vs [0.75, 0.87] for DYNAMO on the 1,024-model population). k-means on a
resample starts from the centres found on all models (one Lloyd run): the interval shows how
the scores move with the models drawn, not how k-means' restarts differ.

Shape legend: N models, F features.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .baseline import classical_mds
from .geometry import encode_labels

METRICS = ("silhouette_full", "silhouette_2d", "ari_full", "ari_2d", "nn_accuracy")


def euclidean_distances(points_NF: np.ndarray) -> np.ndarray:
    """(N,N) Euclidean distances, computed pair by pair (no |x|^2 + |y|^2 - 2xy cancellation)."""
    from scipy.spatial.distance import pdist, squareform

    return squareform(pdist(np.asarray(points_NF, dtype=np.float64)))


def output_distances(logits_NBC: np.ndarray) -> np.ndarray:
    """(N, N) function-space distances: sqrt of the mean over examples of the Jensen-Shannon
    divergence (nats) between two models' output distributions on the same inputs.

    A reference for every method: it looks only at what the models compute (their outputs),
    never at their states or weights. 0 for models with equal outputs; at most sqrt(ln 2).
    """
    logits = torch.as_tensor(np.asarray(logits_NBC), dtype=torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    n = logits.shape[0]
    out = np.zeros((n, n))
    for i in range(n):  # N rows of (N, B, C): memory stays O(N B C)
        logm = torch.logaddexp(logp[i][None], logp) - math.log(2.0)  # log of the mixture, exact for equal rows
        js = 0.5 * (p[i][None] * (logp[i][None] - logm)).sum(-1) + 0.5 * (p * (logp - logm)).sum(-1)
        out[i] = js.mean(dim=1).clamp_min(0.0).sqrt().numpy()
    return 0.5 * (out + out.T)  # JS is symmetric; this only evens out rounding


def _copies(origin: np.ndarray) -> np.ndarray:
    """For each entry, how many entries (itself included) are copies of the same model."""
    _, inverse, counts = np.unique(origin, return_inverse=True, return_counts=True)
    return counts[inverse]


def silhouette(distances_NN: np.ndarray, codes: np.ndarray, origin: np.ndarray | None = None) -> float:
    """Mean silhouette of the groups ``codes`` (ints 0..K-1) under precomputed distances.

    scikit-learn's definition (a singleton group scores 0). ``origin`` (N,) names the model
    each entry copies (a bootstrap resample); distances between copies must be 0, as a zero
    diagonal makes them. NaN with fewer than 2 groups.
    """
    d = np.asarray(distances_NN, dtype=np.float64)
    codes = np.asarray(codes)
    n, k = len(codes), int(codes.max()) + 1
    if len(np.unique(codes)) < 2:
        return float("nan")
    member = codes[:, None] == np.arange(k)                       # (N,K)
    sums = d @ member                                             # (N,K) summed distance to each group
    sizes = member.sum(axis=0)
    others = sizes[codes] - (_copies(origin) if origin is not None else 1)
    a = np.divide(sums[np.arange(n), codes], others, out=np.zeros(n), where=others > 0)
    mean_to = np.divide(sums, sizes, out=np.full(sums.shape, np.inf), where=sizes > 0)
    mean_to[np.arange(n), codes] = np.inf
    b = mean_to.min(axis=1)
    top = np.maximum(a, b)
    s = np.divide(b - a, top, out=np.zeros(n), where=(others > 0) & (top > 0))
    return float(s.mean())


def nn_accuracy(distances_NN: np.ndarray, codes: np.ndarray, origin: np.ndarray | None = None) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of ``codes`` (a model's copies are not its neighbours)."""
    hits = nn_hits(distances_NN, codes, origin)
    return float("nan") if hits is None else float(hits.mean())


def nn_hits(distances_NN: np.ndarray, codes: np.ndarray, origin: np.ndarray | None = None) -> np.ndarray | None:
    """Per model: whether its nearest other model (not a copy of it) has its code; None when there is none."""
    d = np.array(distances_NN, dtype=np.float64)
    origin = np.arange(len(d)) if origin is None else np.asarray(origin)
    d[origin[:, None] == origin[None, :]] = np.inf
    if len(d) < 2 or np.isinf(d).all():
        return None
    codes = np.asarray(codes)
    return codes[d.argmin(axis=1)] == codes


def adjusted_rand(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (non-negative ints), as scikit-learn defines it.

    From the contingency table in numpy: scikit-learn's input checks (milliseconds a call)
    were most of the bootstrap's time.
    """
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    table = np.bincount(a * (int(b.max()) + 1) + b, minlength=(int(a.max()) + 1) * (int(b.max()) + 1))
    pairs = lambda c: float((c * (c - 1)).sum()) / 2.0  # noqa: E731
    both, rows, cols = pairs(table), pairs(np.bincount(a)), pairs(np.bincount(b))
    expected = rows * cols / max(pairs(np.array([len(a)])), 1.0)
    top = 0.5 * (rows + cols) - expected
    return 1.0 if top == 0 else (both - expected) / top


def kmeans(points_NF: np.ndarray, k: int, random_state: int | None):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=random_state).fit(points_NF)


def lloyd(points_NF: np.ndarray, centres_KF: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """(N,) labels of Lloyd's k-means iterations from ``centres`` until no label changes.

    The iterations of scikit-learn's ``KMeans(init=centres, n_init=1)`` (tests compare them),
    without its per-call overhead of milliseconds, which 200 resamples x 2 fits x 4 methods
    turn into most of a minute on this 2-core machine; an empty cluster keeps its centre.
    """
    x = np.asarray(points_NF, dtype=np.float64)
    centres = np.array(centres_KF, dtype=np.float64)
    labels = np.full(len(x), -1)
    for _ in range(max_iter):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
        if (new == labels).all():
            break
        labels = new
        member = (labels[:, None] == np.arange(len(centres))).astype(np.float64)   # (N,K)
        counts = member.sum(axis=0)
        centres = np.where(counts[:, None] > 0, member.T @ x / np.maximum(counts, 1.0)[:, None], centres)
    return labels


class MethodComparison:
    """Silhouettes, k-means ARI and 1-NN accuracy of several model representations, with bootstrap intervals.

    Parameters
    ----------
    num_dims : int | None -- dimensions of the classical MDS that ``ari_full`` clusters
        (capped at N-1; None: N-1). The report uses DYNAMO's embedding dimension.
    num_bootstrap : int -- resamples of the models (within groups); 0 for no intervals.
    confidence : float -- coverage of the percentile intervals.
    random_state : int | None -- k-means and the resamples.

    Attributes (after ``fit``): scores_ {method: {metric: value}}, intervals_ {method:
    {metric: (low, high)}} (NaN without resamples), embeddings_ {method: (N, num_dims) classical
    MDS}, coords_2d_ {method: (N,2)}, num_groups_, table_ (one row per method: each metric, its
    ``_low`` and ``_high``). Every score is NaN when the groups cannot be scored (fewer than 2
    groups, or every model its own group).
    """

    def __init__(self, num_dims: int | None = None, num_bootstrap: int = 200, confidence: float = 0.95,
                 random_state: int | None = None):
        self.num_dims = num_dims
        self.num_bootstrap = num_bootstrap
        self.confidence = confidence
        self.random_state = random_state

    def fit(self, distances: Mapping[str, np.ndarray], labels: Sequence,
            coords_2d: Mapping[str, np.ndarray] | None = None) -> "MethodComparison":
        """``distances``: {method: (N,N)} over the same models in the same order; ``coords_2d``:
        {method: (N,2)} pictures (default: classical MDS-2 of the distances, i.e. PCA-2 for Euclidean ones)."""
        from threadpoolctl import threadpool_limits

        codes = encode_labels(labels)
        n = len(codes)
        if not distances:
            raise ValueError("distances: need at least one method")
        if not (0.0 < self.confidence < 1.0):
            raise ValueError(f"confidence: must be in (0, 1), got {self.confidence}")
        self.num_groups_ = k = len(np.unique(codes))
        dims = n - 1 if self.num_dims is None else max(1, min(self.num_dims, n - 1))
        scorable = 2 <= k <= n - 1
        rng = np.random.default_rng(self.random_state)
        groups = [np.flatnonzero(codes == g) for g in range(k)]
        resamples = [np.concatenate([rng.choice(g, size=len(g)) for g in groups])
                     for _ in range(self.num_bootstrap if scorable else 0)]
        self.scores_, self.intervals_, self.embeddings_, self.coords_2d_ = {}, {}, {}, {}
        # tiny k-means problems, hundreds of them: worker threads only add start-up and, on a
        # busy machine, spinning (10-20x slower measured under load)
        with threadpool_limits(1):
            for method, dist in distances.items():
                d = np.array(dist, dtype=np.float64)
                if d.shape != (n, n):
                    raise ValueError(f"distances[{method!r}]: expected ({n}, {n}) for {n} labels, got {d.shape}")
                np.fill_diagonal(d, 0.0)
                full = classical_mds(d, dims)
                given = (coords_2d or {}).get(method)
                flat = np.asarray(given, dtype=np.float64) if given is not None else classical_mds(d, 2)
                if flat.shape != (n, 2):
                    raise ValueError(f"coords_2d[{method!r}]: expected ({n}, 2), got {flat.shape}")
                self.embeddings_[method], self.coords_2d_[method] = full, flat
                if not scorable:
                    self.scores_[method] = dict.fromkeys(METRICS, float("nan"))
                    self.intervals_[method] = {m: (float("nan"), float("nan")) for m in METRICS}
                    continue
                d2 = euclidean_distances(flat)
                km_full = kmeans(full, k, self.random_state)
                km_2d = kmeans(flat, k, self.random_state)
                self.scores_[method] = _scores(d, d2, full, flat, codes, None, km_full, km_2d)
                hits = nn_hits(d, codes).astype(np.float64)  # 1-NN among all models, resampled per model
                boot = np.array([[s[m] for m in METRICS] for s in (
                    _scores(d[np.ix_(i, i)], d2[np.ix_(i, i)], full[i], flat[i], codes[i], i, km_full, km_2d, hits[i])
                    for i in resamples)]).reshape(-1, len(METRICS))
                tail = 50.0 * (1.0 - self.confidence)
                with warnings.catch_warnings():  # no resamples: NaN intervals
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lo, hi = (np.nanpercentile(boot, [tail, 100.0 - tail], axis=0) if len(boot)
                              else np.full((2, len(METRICS)), np.nan))
                self.intervals_[method] = {m: (float(a), float(b)) for m, a, b in zip(METRICS, lo, hi)}
        self.table_ = [{"method": m, "num_models": n, **{c: v for metric in METRICS for c, v in (
            (metric, self.scores_[m][metric]), (f"{metric}_low", self.intervals_[m][metric][0]),
            (f"{metric}_high", self.intervals_[m][metric][1]))}} for m in self.scores_]
        return self


def _scores(d: np.ndarray, d2: np.ndarray, full: np.ndarray, flat: np.ndarray, codes: np.ndarray,
            origin: np.ndarray | None, km_full, km_2d, hits: np.ndarray | None = None) -> dict[str, float]:
    """Every metric on one set of models; ``origin`` set for a resample (k-means then restarts
    from the centres of the fits on all models, ``km_full`` / ``km_2d``; ``hits``: the resampled
    models' 1-NN outcomes among all models, whose mean is the resample's 1-NN accuracy)."""
    if origin is None:
        full_labels, flat_labels = km_full.labels_, km_2d.labels_
    else:
        full_labels, flat_labels = lloyd(full, km_full.cluster_centers_), lloyd(flat, km_2d.cluster_centers_)
    return {"silhouette_full": silhouette(d, codes, origin), "silhouette_2d": silhouette(d2, codes, origin),
            "ari_full": adjusted_rand(codes, full_labels), "ari_2d": adjusted_rand(codes, flat_labels),
            "nn_accuracy": nn_accuracy(d, codes, origin) if hits is None else float(hits.mean())}
