"""Model averaging in embedding space (paper sections 4.2 and 6).

The meta-model is run at the centroid of each group's embeddings and at the midpoint of
pairs of models, and its test accuracy there is compared with the accuracies of the
members (the base models themselves and the meta-model at their theta_n).

Shape legend: N models, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.tasks import Split
from .evaluate import accuracies


def centroids(theta_NE: np.ndarray, labels: Sequence) -> dict[str, np.ndarray]:
    """Mean embedding of each label value (keys are the labels' string form)."""
    theta = np.asarray(theta_NE, dtype=np.float64)
    keys = [str(v) for v in labels]
    return {k: theta[[i for i, v in enumerate(keys) if v == k]].mean(axis=0) for k in sorted(set(keys))}


def midpoint(theta_a: np.ndarray, theta_b: np.ndarray) -> np.ndarray:
    return 0.5 * (np.asarray(theta_a, dtype=np.float64) + np.asarray(theta_b, dtype=np.float64))


def default_pairs(model_ids: Sequence[str], labels: Sequence, tasks: Sequence[str], max_pairs: int = 12) -> list[tuple[str, str]]:
    """Pairs to average: the first two members of each group (within-group), then the first
    member of every pair of groups that share a task (across groups)."""
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(labels):
        groups.setdefault(str(v), []).append(i)
    pairs = [(model_ids[m[0]], model_ids[m[1]]) for _, m in sorted(groups.items()) if len(m) >= 2]
    names = sorted(groups)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            i, j = groups[names[a]][0], groups[names[b]][0]
            if tasks[i] == tasks[j]:
                pairs.append((model_ids[i], model_ids[j]))
    return pairs[:max_pairs]


class ModelAveraging:
    """Meta-model accuracy at group centroids and pairwise midpoints vs the members'.

    Parameters
    ----------
    pairs : list of (model_id, model_id) | None -- midpoints to evaluate (default :func:`default_pairs`).
    batch_size : int -- sequences per meta-model forward pass.

    ``fit(meta, theta_NE, model_ids, labels, tasks, test_inputs, base_accuracy)``:
    ``tasks[i]`` selects model i's head and test split (``test_inputs[task]``),
    ``base_accuracy[model_id]`` is the base model's accuracy on the same test inputs.

    Attributes: member_meta_accuracy_ (N,), centroids_ {label: theta}, table_ (list of rows:
    kind, name, task, members, meta_accuracy, member_base_mean/max, member_meta_mean).
    """

    def __init__(self, pairs: list[tuple[str, str]] | None = None, batch_size: int = 4096):
        self.pairs = pairs
        self.batch_size = batch_size

    def fit(self, meta, theta_NE: np.ndarray, model_ids: Sequence[str], labels: Sequence, tasks: Sequence[str],
            test_inputs: dict[str, Split], base_accuracy: dict[str, float]) -> "ModelAveraging":
        theta = np.asarray(theta_NE, dtype=np.float64)
        ids = list(model_ids)
        index = {m: i for i, m in enumerate(ids)}
        self.member_meta_accuracy_ = np.array(
            [accuracies(meta, theta[i], tasks[i], test_inputs[tasks[i]], self.batch_size)[0] for i in range(len(ids))])
        rows = []
        keys = [str(v) for v in labels]
        self.centroids_ = {}
        for key in sorted(set(keys)):
            members = [i for i, v in enumerate(keys) if v == key]
            for task in sorted({tasks[i] for i in members}):
                mem = [i for i in members if tasks[i] == task]
                c = theta[mem].mean(axis=0)
                name = key if len({tasks[i] for i in members}) == 1 else f"{key}/{task}"
                self.centroids_[name] = c
                rows.append(self._row("centroid", name, task, mem, c, ids, meta, test_inputs, base_accuracy))
        pairs = self.pairs if self.pairs is not None else default_pairs(ids, labels, tasks)
        for a, b in pairs:
            if a not in index or b not in index:
                raise ValueError(f"pairs: unknown model id in ({a!r}, {b!r})")
            i, j = index[a], index[b]
            if tasks[i] != tasks[j]:
                raise ValueError(f"pairs: {a!r} and {b!r} are trained on different tasks")
            kind = "midpoint (same group)" if keys[i] == keys[j] else "midpoint (across groups)"
            rows.append(self._row(kind, f"{a} | {b}", tasks[i], [i, j], midpoint(theta[i], theta[j]), ids, meta,
                                  test_inputs, base_accuracy))
        self.table_ = rows
        return self

    def _row(self, kind, name, task, members, theta_E, ids, meta, test_inputs, base_accuracy) -> dict:
        base = np.array([base_accuracy[ids[i]] for i in members])
        return {
            "kind": kind, "name": name, "task": task, "num_members": len(members),
            "meta_accuracy": float(accuracies(meta, theta_E, task, test_inputs[task], self.batch_size)[0]),
            "member_base_mean": float(base.mean()), "member_base_max": float(base.max()),
            "member_meta_mean": float(self.member_meta_accuracy_[members].mean()),
            "theta": [float(v) for v in theta_E],
        }
