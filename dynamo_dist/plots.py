"""Plots (matplotlib, optional dependency; imported lazily by callers), and the conventions every figure
shares, the analysis report's (``analysis/figures.py``) included:

- one colour per group: :func:`group_colours` maps the sorted group names to a fixed palette, so a group
  has the same colour in every figure drawn from the same groups; a figure that shows only some of them
  takes the mapping of all of them (``colours=``);
- points that stay visible: up to ``MANY_POINTS`` points a scatter has outlined, slightly translucent
  markers, and points that coincide at the figure's resolution are marked with their count
  (:func:`annotate_stacks`); past it the markers shrink, lose their edges and turn translucent (density
  shows as depth of colour), drawn in one shuffled layer so that no group hides another. Legends name
  groups, never models. (PNG only, so rasterising the scatters would change nothing.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from .pca import ThetaPCA  # noqa: E402

DPI = 110
MANY_POINTS = 300       # past this many points a scatter switches to small translucent markers
MAX_LEGEND = 20         # groups named in a legend; more are summarised in its title
STACK_RESOLUTION = 200  # points in one cell of a 200 x 200 grid over the data (~2 px here) coincide
MAX_STACK_LABELS = 30   # the largest stacks get a count; more labels would bury the points


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def sort_key(k: str):
    """Group labels in numeric order where they are numbers (8 < 12), else alphabetical."""
    try:
        return (0, float(k), k)
    except ValueError:
        return (1, 0.0, k)


def group_colours(labels: Iterable) -> dict[str, tuple]:
    """RGBA colour of every distinct label (as ``str``), assigned in :func:`sort_key` order: tab10 up to
    10 groups, tab20 (its 10 dark shades, which are tab10's, then the light ones) up to 20, evenly spaced
    hues past that. Depends only on the set of labels, not on their order or count."""
    groups = sorted({str(v) for v in labels}, key=sort_key)
    n = len(groups)
    if n <= 10:
        palette = plt.get_cmap("tab10").colors
    elif n <= 20:
        tab20 = plt.get_cmap("tab20").colors
        palette = tab20[0::2] + tab20[1::2]  # neighbours in sort order (sizes 8, 12) get distinct hues
    else:
        palette = [plt.get_cmap("hsv")(i / n) for i in range(n)]
    return {g: to_rgba(c) for g, c in zip(groups, palette)}


def colours_for(keys: Sequence[str], colours: Mapping | None = None) -> Mapping:
    """``colours`` where it names every key, else ValueError; ``group_colours(keys)`` where it is None."""
    if colours is None:
        return group_colours(keys)
    missing = sorted(set(keys) - set(colours), key=sort_key)
    if missing:
        raise ValueError(f"colours: no colour for groups {missing[:5]} (build it with group_colours of all labels)")
    return colours


def point_style(n: int, size: float = 30.0) -> dict:
    """Marker size, alpha and edges for a scatter of ``n`` points (``size`` up to MANY_POINTS)."""
    if n <= MANY_POINTS:
        return {"s": size, "alpha": 0.8, "edgecolors": "k", "linewidths": 0.4}
    return {"s": max(2.0, size * MANY_POINTS / n), "alpha": max(0.15, 0.8 * np.sqrt(MANY_POINTS / n)),
            "linewidths": 0.0}


def annotate_stacks(ax, coords_N2: np.ndarray) -> list:
    """Label each stack of points that coincide at the figure's resolution (one cell of a
    STACK_RESOLUTION grid over the points' extent) with its count, "×k"; returns the labels.

    Identical models embed to identical coordinates, and a marker drawn on top hides the rest.
    """
    xy = np.asarray(coords_N2, dtype=np.float64)
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return []
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    span[span == 0] = 1.0
    cells = np.minimum(np.floor((xy - lo) / span * STACK_RESOLUTION), STACK_RESOLUTION - 1).astype(np.int64)
    _, first, counts = np.unique(cells, axis=0, return_index=True, return_counts=True)
    stacks = sorted((c, i) for c, i in zip(counts, first) if c > 1)[::-1][:MAX_STACK_LABELS]
    box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}  # on heat maps too
    return [ax.annotate(f"×{c}", xy[i], textcoords="offset points", xytext=(4, 4), fontsize=6, zorder=6, bbox=box)
            for c, i in stacks]


def scatter_groups(ax, coords: np.ndarray, labels: Sequence, legend_title: str | None = None, s: float = 30,
                   colours: Mapping | None = None) -> None:
    """Points coloured by label (``colours``: label -> colour, default :func:`group_colours` of ``labels``),
    with a legend of the groups; numeric labels with more than 6 values get a colour scale instead."""
    keys = [str(v) for v in labels]
    style = point_style(len(keys), s)
    numeric = all(_is_number(v) for v in labels) and len(set(keys)) > 6
    if numeric:  # e.g. epoch or test accuracy: a colour scale instead of a legend
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=[float(v) for v in labels], cmap="viridis", **style)
        plt.colorbar(sc, ax=ax, label=legend_title)
        if len(keys) <= MANY_POINTS:
            annotate_stacks(ax, coords)
        return
    colours = colours_for(keys, colours)
    groups = sorted(set(keys), key=sort_key)
    if len(keys) <= MANY_POINTS:
        for i, key in enumerate(groups):
            m = np.array([k == key for k in keys])
            ax.scatter(coords[m, 0], coords[m, 1], label=key if i < MAX_LEGEND else None, color=colours[key], **style)
        annotate_stacks(ax, coords)
    else:  # one layer in random order: the group drawn last would otherwise cover the others
        order = np.random.default_rng(0).permutation(len(keys))
        ax.scatter(coords[order, 0], coords[order, 1], c=[colours[keys[i]] for i in order], **style)
        for key in groups[:MAX_LEGEND]:  # legend entries at a readable size
            ax.scatter([], [], s=30, color=colours[key], label=key)
    title = legend_title if len(groups) <= MAX_LEGEND else f"{legend_title} (first {MAX_LEGEND} of {len(groups)})"
    ax.legend(title=title, fontsize=7, title_fontsize=7, frameon=False)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def pca_plane(theta_NE: np.ndarray) -> ThetaPCA | None:
    """The analysis' PCA of theta (``pca.ThetaPCA``, which ``analysis.geometry.EmbeddingGeometry``
    extends), fitted to ``theta_NE``: every PCA picture of theta is drawn in it, so the meta run's,
    the post-hoc and the report's plots of the same models agree, mirror images included.
    None for fewer than two models (no plane)."""
    theta = np.asarray(theta_NE, dtype=np.float64)
    return ThetaPCA().fit(theta) if theta.ndim == 2 and len(theta) >= 2 else None


def pca_2d(theta_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N,2) in ``pca_plane`` (zeros where its rank is < 2) and the explained variance
    ratios of its components."""
    geo = pca_plane(theta_NE)
    if geo is None:
        return np.zeros((len(theta_NE), 2)), np.zeros(0)
    return geo.coords_, geo.explained_variance_ratio_


def embedding_pca_plot(emb: pa.Table, color_by: str, path: str | Path, title: str = "model embeddings",
                       colours: Mapping | None = None) -> Path:
    """Scatter of theta in its PCA plane, one colour per value of manifest column ``color_by``."""
    theta = np.array(emb.column("theta").to_pylist(), dtype=np.float64)
    labels = emb.column(color_by).to_pylist() if color_by in emb.column_names else ["all"] * emb.num_rows
    coords, ratio = pca_2d(theta)
    fig, ax = plt.subplots(figsize=(5, 4))
    scatter_groups(ax, coords, labels, color_by, colours=colours)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})" if len(ratio) else "PC1")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "PC2")
    ax.set_title(title)
    return save(fig, path)


def population_accuracy_plot(rows: list[dict], path: str | Path, title: str = "base-model test accuracy",
                             colours: Mapping | None = None) -> Path:
    """Test accuracy of every complete base model, one column of points per group (with its mean)."""
    groups = sorted({str(r["group"]) for r in rows}, key=sort_key)
    colours = colours_for(groups, colours)
    style = point_style(len(rows), 14)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only, so overlapping models stay visible
    for i, g in enumerate(groups):
        acc = np.array([r["test_accuracy"] for r in rows if str(r["group"]) == g], dtype=np.float64)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(acc)), acc, color=colours[g], **style)
        ax.hlines(acc.mean(), i - 0.3, i + 0.3, color="black", lw=1.5)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={sum(str(r['group']) == g for r in rows)})" for g in groups])
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    return save(fig, path)


def posthoc_pca_plot(theta_trained_NE: np.ndarray, groups: list, theta_new_ME: np.ndarray, new_ids: list[str],
                     path: str | Path, title: str = "new models in the trained embedding space",
                     colours: Mapping | None = None) -> Path:
    """Trained theta coloured by group, new theta as labelled black stars, in the trained models'
    ``pca_plane`` (the analysis' basis; one trained model has no plane: every point at the origin)."""
    geo = pca_plane(theta_trained_NE)

    def project(t):
        return geo.transform(t) if geo is not None else np.zeros((len(t), 2))

    fig, ax = plt.subplots(figsize=(6, 4.6))
    new_xy = project(theta_new_ME)
    # drawn first so that the groups' legend, drawn with them, names the stars too
    ax.scatter(new_xy[:, 0], new_xy[:, 1], marker="*", s=140, c="black", edgecolors="white", linewidths=0.5,
               label="new", zorder=4)
    if len(new_ids) <= 20:  # labels beyond that are unreadable
        for (x, y), name in zip(new_xy, new_ids):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    scatter_groups(ax, project(theta_trained_NE), groups, "group", s=22, colours=colours)
    ratios = geo.explained_variance_ratio_ if geo is not None else []
    ax.set_xlabel(f"PC1 ({ratios[0]:.0%})" if len(ratios) else "PC1")
    ax.set_ylabel(f"PC2 ({ratios[1]:.0%})" if len(ratios) > 1 else "PC2")
    ax.set_title(title)
    return save(fig, path)
