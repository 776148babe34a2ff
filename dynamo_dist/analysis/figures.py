"""Figures of the analyses (matplotlib, Agg backend; imported only by the report).

Every function draws one PNG and returns its path. Colours, marker styles, stacks of coinciding
points and legends follow the conventions of :mod:`dynamo_dist.plots` (its docstring): a group has
one colour in every figure (``colours=``: the report's mapping of all its groups, where a figure
shows only some of them), and scatters stay readable with thousands of models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..plots import (MANY_POINTS, MAX_LEGEND, annotate_stacks, colours_for, point_style, save,  # noqa: E402
                     scatter_groups as _scatter_groups, sort_key)

MIN_TICK_SPACING = 0.14  # inches between vertical tick labels of 7-pt text (8.4-pt lines); closer ones are thinned
MAX_WIDTH = 16.0         # inches: wider figures are scaled down in the report until their text is unreadable


def embedding_scatter(coords_N2: np.ndarray, labels: Sequence, path, title: str, color_by: str,
                      ratio: np.ndarray | None = None, xlabel: str = "PC1", ylabel: str = "PC2",
                      colours: Mapping | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    _scatter_groups(ax, coords_N2, labels, color_by, colours=colours)
    if ratio is not None and len(ratio):
        xlabel = f"{xlabel} ({ratio[0]:.0%})"
        if len(ratio) > 1:
            ylabel = f"{ylabel} ({ratio[1]:.0%})"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def spectrum(explained_variance_ratio: np.ndarray, num_components: int, threshold: float, path) -> Path:
    """Eigen-spectrum of the embeddings' covariance with the threshold component count (Fig. 3, row 2)."""
    ratio = np.asarray(explained_variance_ratio)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, ratio, color="tab:blue", alpha=0.8, label="explained variance ratio")
    ax.plot(k, np.cumsum(ratio), "o-", color="tab:orange", ms=3, label="cumulative")
    ax.axvline(num_components + 0.5, ls=":", color="k", label=f"{num_components} components for {threshold:.0%}")
    ax.set_xlabel("component")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(k if len(k) <= 20 else k[:: max(1, len(k) // 10)])
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("spectrum of the model embeddings", fontsize=10)
    return save(fig, path)


def side_by_side(panels: list[tuple[str, np.ndarray]], labels: Sequence, color_by: str, path,
                 colours: Mapping | None = None) -> Path:
    """2-D pictures of the same models (DYNAMO's PCA, the baselines' MDS, ...), one panel per (title, coords)."""
    colours = colours_for([str(v) for v in labels], colours)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, coords) in zip(axes[0], panels):
        _scatter_groups(ax, coords, labels, color_by, colours=colours)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, path)


def distance_matrix(dist_NN: np.ndarray, names: Sequence[str], title: str, path,
                    groups: Sequence[str] | None = None) -> Path:
    """Heat map of a distance matrix; past 30 models the axes name the ``groups`` (runs of equal labels, the
    models sorted by them), with lines between them, instead of the models."""
    n = len(names)
    size = min(8.0, 2.5 + 0.25 * n)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(dist_NN, cmap="magma", interpolation="nearest")
    plt.colorbar(im, ax=ax, fraction=0.046)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), names, fontsize=6)
    elif groups is not None:
        starts = [0] + [i for i in range(1, n) if groups[i] != groups[i - 1]] + [n]
        for b in starts[1:-1]:
            ax.axhline(b - 0.5, color="w", lw=0.5)
            ax.axvline(b - 0.5, color="w", lw=0.5)
        runs = list(zip(starts[:-1], starts[1:]))
        named = runs if len(runs) <= MAX_LEGEND else []
        ax.set_xticks([(a + b - 1) / 2 for a, b in named], [groups[a] for a, _ in named], rotation=90, fontsize=6)
        ax.set_yticks([(a + b - 1) / 2 for a, b in named], [groups[a] for a, _ in named], fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def averaging_bars(rows: list[dict], path) -> Path:
    """Meta accuracy at centroids/midpoints vs the members' base and meta accuracies.

    Tick labels are vertical, and thinned to every k-th where even those would touch (the figure
    grows with the rows only up to MAX_WIDTH inches).
    """
    width = min(MAX_WIDTH, max(5.0, 0.45 * len(rows) + 2) + 2.6)
    fig, ax = plt.subplots(figsize=(width, 5.0))
    x = np.arange(len(rows))
    w = 0.27
    ax.bar(x - w, [r["meta_accuracy"] for r in rows], w, label="meta-model at the averaged theta")
    ax.bar(x, [r["member_base_mean"] for r in rows], w, label="members: base models (mean)")
    ax.bar(x + w, [r["member_meta_mean"] for r in rows], w, label="members: meta at theta_n (mean)")
    ax.scatter(x, [r["member_base_max"] for r in rows], marker="_", s=200, color="k", zorder=3, label="best member")
    step = _tick_step(len(rows), width - 4.6)  # ~4.6 in: the y label and the legend beside the axes
    ax.set_xticks(x[::step], [f"{r['kind'].split(' ')[0]}: {_short(r['name'])}" for r in rows[::step]], fontsize=7,
                  rotation=90)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("model averaging in embedding space", fontsize=10)
    return save(fig, path)


def _tick_step(num_ticks: int, axis_inches: float) -> int:
    """Label every k-th of ``num_ticks`` evenly spaced ticks so that neighbours are MIN_TICK_SPACING apart."""
    return max(1, int(np.ceil(num_ticks * MIN_TICK_SPACING / max(axis_inches, 0.5))))


def _short(name: str, n: int = 24) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _hull_polygon(ax, base_N2: np.ndarray) -> None:
    if len(base_N2) < 3:
        if len(base_N2) == 2:
            ax.plot(base_N2[:, 0], base_N2[:, 1], "w--", lw=1)
        return
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(base_N2)
    except QhullError:
        return
    v = np.append(hull.vertices, hull.vertices[0])
    ax.plot(base_N2[v, 0], base_N2[v, 1], "w--", lw=1, label="convex hull")


def landscape(axis_a: np.ndarray, axis_b: np.ndarray, scores_GG: np.ndarray, base_N2: np.ndarray, labels: Sequence,
              best_2: np.ndarray, path, title: str, cbar_label: str = "relative test accuracy",
              path_S2: np.ndarray | None = None, extra_points: dict[str, np.ndarray] | None = None,
              colours: Mapping | None = None) -> Path:
    """Heat map over the PCA plane, base embeddings, their hull, the best point (x) and an SSL path (Figs. 6, 7, 11).

    The base embeddings have their group's colour and a marker shape per group (told apart on the heat map
    by shape too).
    """
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    if len(axis_a) > 1 and len(axis_b) > 1:
        im = ax.pcolormesh(axis_a, axis_b, scores_GG, shading="nearest", cmap="viridis")
        plt.colorbar(im, ax=ax, label=cbar_label)
    else:  # degenerate plane: a line of scores
        along = axis_a if len(axis_a) > 1 else axis_b
        ax.plot(along, scores_GG.ravel(), "-", color="tab:green")
    _hull_polygon(ax, base_N2)
    keys = [str(v) for v in labels]
    colours = colours_for(keys, colours)
    markers = "osD^v<>p*h"
    shape = {g: markers[i % len(markers)] for i, g in enumerate(sorted(colours, key=sort_key))}
    style = ({"s": 32, "edgecolors": "k", "linewidths": 0.8} if len(keys) <= MANY_POINTS
             else {**point_style(len(keys), 32), "edgecolors": "none"})
    for i, key in enumerate(sorted(set(keys), key=sort_key)):
        m = np.array([k == key for k in keys])
        ax.scatter(base_N2[m, 0], base_N2[m, 1], marker=shape[key], color=colours[key],
                   label=key if i < MAX_LEGEND else None, zorder=3, **style)
    if len(keys) <= MANY_POINTS:
        annotate_stacks(ax, base_N2)
    if path_S2 is not None:
        ax.plot(path_S2[:, 0], path_S2[:, 1], "-", color="red", lw=1.5, label="SSL iterates", zorder=4)
        ax.scatter(path_S2[-1, 0], path_S2[-1, 1], marker="*", s=120, color="red", edgecolors="k", zorder=5,
                   label="theta_final")
    ax.scatter([best_2[0]], [best_2[1]], marker="x", s=90, color="orange", linewidths=2.5, zorder=5, label="best grid point")
    for name, pt in (extra_points or {}).items():
        ax.scatter([pt[0]], [pt[1]], marker="P", s=70, color="magenta", edgecolors="k", zorder=5, label=name)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, frameon=True, framealpha=0.7, loc="best")
    return save(fig, path)


def ssl_loss(losses: np.ndarray, path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("iterate")
    ax.set_ylabel("cross-entropy on the labelled set")
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def fixed_point_panels(panels: list[tuple[str, np.ndarray, np.ndarray | None, dict]], path, title: str,
                       traj_K2: list[np.ndarray] | None = None, share: bool = False) -> Path:
    """Fixed points (projected to 2-D) per panel, coloured by readout; one panel per theta/model (Fig. 8).

    ``share``: common axes (panels drawn in one projection, e.g. the meta-model's hidden space).
    """
    n = len(panels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False, sharex=share, sharey=share)
    for idx, (name, pts, colour, stats) in enumerate(panels):
        ax = axes[idx // cols][idx % cols]
        if traj_K2 is not None and traj_K2[idx] is not None:
            ax.scatter(traj_K2[idx][:, 0], traj_K2[idx][:, 1], s=2, color="0.8", label="visited states")
        if len(pts):
            varied = colour is not None and len(set(np.round(np.asarray(colour), 6))) > 1
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=colour if varied else "tab:red", cmap="coolwarm" if varied else None,
                            s=22 if len(pts) < 50 else 12, edgecolors="k", linewidths=0.3, zorder=3)
            if varied:
                plt.colorbar(sc, ax=ax, fraction=0.046)
        ratio = stats.get("pc1_variance_ratio", float("nan"))
        ax.set_title(f"{_short(name, 28)}\n{stats.get('num_fixed_points', 0)} fp, PC1 {ratio:.2f}, "
                     f"|λ|≈1: {stats.get('mean_num_near_unit', float('nan')):.1f}", fontsize=8)
        ax.tick_params(labelsize=6)
    for idx in range(n, rows * cols):
        axes[idx // cols][idx % cols].axis("off")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def eigenvalue_panels(panels: list[tuple[str, np.ndarray]], path, title: str) -> Path:
    """Jacobian eigenvalues at the fixed points in the complex plane, with the unit circle."""
    n = len(panels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    t = np.linspace(0, 2 * np.pi, 200)
    for idx, (name, eig) in enumerate(panels):
        ax = axes[idx // cols][idx % cols]
        ax.plot(np.cos(t), np.sin(t), "k:", lw=0.8)
        e = np.asarray(eig).ravel()
        ax.scatter(e.real, e.imag, s=5, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(_short(name, 30), fontsize=8)
        ax.tick_params(labelsize=6)
    for idx in range(n, rows * cols):
        axes[idx // cols][idx % cols].axis("off")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def fixed_point_continuation(points: list[dict], events: list[dict], path, title: str,
                             xlabel: str = "s along the path") -> Path:
    """Continued fixed points against the path parameter s: one line per branch, PC1 and PC2 panels.

    ``points``: rows with s, branch, pc1, pc2, stable (as :class:`~.continuation.FixedPointContinuation`'s
    ``points_``); ``events``: rows with s and kind (born / died: dashed, stability: dotted).
    Filled blue markers: stable (spectral radius < 1); open red: unstable.
    """
    fig, axes = plt.subplots(2, 1, figsize=(6.5, 5.2), sharex=True)
    branches = sorted({p["branch"] for p in points})
    for ax, comp in zip(axes, ("pc1", "pc2")):
        for br in branches:
            rows = sorted((p for p in points if p["branch"] == br), key=lambda p: p["s"])
            s = np.array([p["s"] for p in rows])
            y = np.array([p[comp] for p in rows])
            st = np.array([p["stable"] for p in rows], dtype=bool)
            ax.plot(s, y, color="0.6", lw=0.8, zorder=1)
            ax.scatter(s[st], y[st], s=16, color="tab:blue", zorder=3)
            ax.scatter(s[~st], y[~st], s=16, facecolors="none", edgecolors="tab:red", zorder=3)
        for kind, style, colour in (("count", "--", "k"), ("stability", ":", "tab:orange")):
            at = sorted({e["s"] for e in events if (e["kind"] == "stability") == (kind == "stability")})
            for x in at:
                ax.axvline(x, ls=style, color=colour, lw=0.9, zorder=0)
        ax.set_ylabel(comp.upper())
        ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker="o", ls="", color="tab:blue", label="stable"),
               plt.Line2D([], [], marker="o", ls="", mfc="none", mec="tab:red", label="unstable"),
               plt.Line2D([], [], ls="--", color="k", label="branch born / died"),
               plt.Line2D([], [], ls=":", color="tab:orange", label="stability change")]
    axes[0].legend(handles=handles, fontsize=6, loc="best", framealpha=0.7)
    axes[-1].set_xlabel(xlabel)
    if not points:
        axes[0].text(0.5, 0.5, "no converged fixed point on the path", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def word_values(words: Sequence[str], values_W: np.ndarray, categories: Sequence[str], path, title: str) -> Path:
    colours = {"positive": "tab:green", "negative": "tab:red", "neutral": "tab:gray"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(words) + 1), 3.4))
    ax.bar(range(len(words)), values_W, color=[colours[c] for c in categories])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)
    ax.set_ylabel("G(F(x, h*))")
    ax.set_title(title, fontsize=10)
    return save(fig, path)
