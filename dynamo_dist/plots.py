"""Plots (matplotlib, optional dependency; imported lazily by callers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def pca_2d(theta_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project onto the first two principal components -> (N,2) coords, explained variance ratios."""
    from sklearn.decomposition import PCA

    n_comp = min(2, theta_NE.shape[0], theta_NE.shape[1])
    pca = PCA(n_components=n_comp).fit(theta_NE)
    coords = pca.transform(theta_NE)
    if coords.shape[1] < 2:
        coords = np.column_stack([coords, np.zeros(len(coords))])
    return coords, pca.explained_variance_ratio_


def embedding_pca_plot(emb: pa.Table, color_by: str, path: str | Path, title: str = "model embeddings") -> Path:
    """Scatter of theta in its PCA plane, one colour per value of manifest column ``color_by``."""
    theta = np.array(emb.column("theta").to_pylist(), dtype=np.float64)
    labels = emb.column(color_by).to_pylist() if color_by in emb.column_names else ["all"] * emb.num_rows
    coords, ratio = pca_2d(theta)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for value in sorted(set(labels), key=str):
        m = np.array([lab == value for lab in labels])
        ax.scatter(coords[m, 0], coords[m, 1], s=28, label=str(value), alpha=0.85)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})" if len(ratio) else "PC1")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "PC2")
    ax.set_title(title)
    ax.legend(title=color_by, fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def population_accuracy_plot(rows: list[dict], path: str | Path, title: str = "base-model test accuracy") -> Path:
    """Test accuracy of every complete base model, one column of points per group (with its mean)."""
    groups = sorted({r["group"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only, so overlapping models stay visible
    for i, g in enumerate(groups):
        acc = np.array([r["test_accuracy"] for r in rows if r["group"] == g], dtype=np.float64)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(acc)), acc, s=14, alpha=0.7)
        ax.hlines(acc.mean(), i - 0.3, i + 0.3, color="black", lw=1.5)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={sum(r['group'] == g for r in rows)})" for g in groups])
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def posthoc_pca_plot(theta_trained_NE: np.ndarray, groups: list, theta_new_ME: np.ndarray, new_ids: list[str],
                     path: str | Path, title: str = "new models in the trained embedding space") -> Path:
    """Trained theta coloured by group, new theta as labelled black stars, in the trained PCA plane."""
    from sklearn.decomposition import PCA

    n_comp = min(2, theta_trained_NE.shape[0], theta_trained_NE.shape[1])
    pca = PCA(n_components=n_comp).fit(theta_trained_NE)

    def project(t):
        c = pca.transform(t)
        return np.column_stack([c, np.zeros(len(c))]) if c.shape[1] < 2 else c

    fig, ax = plt.subplots(figsize=(6, 4.6))
    xy = project(theta_trained_NE)
    for g in sorted({str(g) for g in groups}):
        sel = np.array([str(x) == g for x in groups])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, alpha=0.6, label=g)
    new_xy = project(theta_new_ME)
    ax.scatter(new_xy[:, 0], new_xy[:, 1], marker="*", s=140, c="black", label="new")
    if len(new_ids) <= 20:  # labels beyond that are unreadable
        for (x, y), name in zip(new_xy, new_ids):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ratios = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratios[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratios[1]:.0%})" if len(ratios) > 1 else "PC2")
    ax.set_title(title)
    ax.legend(fontsize=7, title="group", title_fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
