"""Figures of the analyses (matplotlib, Agg backend; imported only by the report).

Every function draws one PNG and returns its path. Scatter plots stay readable with thousands
of models: past ``MANY_POINTS`` points the markers shrink, lose their edges and turn
translucent, and are drawn in one shuffled layer so that no group hides another; legends
name groups, never models. (PNG only, so rasterising the scatters would change nothing.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110
MANY_POINTS = 300   # past this many points a scatter switches to small translucent markers
MAX_LEGEND = 20     # groups named in a legend; more are summarised in its title


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def point_style(n: int, size: float = 30.0) -> dict:
    """Marker size, alpha and edges for a scatter of ``n`` points (``size`` up to MANY_POINTS)."""
    if n <= MANY_POINTS:
        return {"s": size, "alpha": 0.85, "edgecolors": "k", "linewidths": 0.3}
    return {"s": max(2.0, size * MANY_POINTS / n), "alpha": max(0.15, 0.85 * np.sqrt(MANY_POINTS / n)),
            "linewidths": 0.0}


def _scatter_groups(ax, coords: np.ndarray, labels: Sequence, legend_title: str | None = None, s: int = 30):
    keys = [str(v) for v in labels]
    style = point_style(len(keys), s)
    numeric = all(_is_number(v) for v in labels) and len(set(keys)) > 6
    if numeric:  # e.g. epoch or test accuracy: a colour scale instead of a legend
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=[float(v) for v in labels], cmap="viridis", **style)
        plt.colorbar(sc, ax=ax, label=legend_title)
        return
    groups = sorted(set(keys), key=sort_key)
    colours = _group_colours(len(groups))
    if len(keys) <= MANY_POINTS:
        for key, colour in zip(groups, colours):
            m = np.array([k == key for k in keys])
            ax.scatter(coords[m, 0], coords[m, 1], label=key, color=colour, **style)
    else:  # one layer in random order: the group drawn last would otherwise cover the others
        code = {g: i for i, g in enumerate(groups)}
        order = np.random.default_rng(0).permutation(len(keys))
        ax.scatter(coords[order, 0], coords[order, 1], c=[colours[code[keys[i]]] for i in order], **style)
        for key, colour in zip(groups[:MAX_LEGEND], colours):  # legend entries at a readable size
            ax.scatter([], [], s=30, color=colour, label=key)
    title = legend_title if len(groups) <= MAX_LEGEND else f"{legend_title} (first {MAX_LEGEND} of {len(groups)})"
    ax.legend(title=title, fontsize=7, title_fontsize=7, frameon=False)


def _group_colours(num_groups: int) -> list:
    """matplotlib's default cycle up to 10 groups, then tab20, then evenly spaced hues."""
    if num_groups <= 10:
        return [f"C{i}" for i in range(num_groups)]
    if num_groups <= 20:
        return list(plt.get_cmap("tab20").colors[:num_groups])
    return [plt.get_cmap("hsv")(i / num_groups) for i in range(num_groups)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def sort_key(k: str):
    """Group labels in numeric order where they are numbers (8 < 12), else alphabetical."""
    try:
        return (0, float(k), k)
    except ValueError:
        return (1, 0.0, k)


def embedding_scatter(coords_N2: np.ndarray, labels: Sequence, path, title: str, color_by: str,
                      ratio: np.ndarray | None = None, xlabel: str = "PC1", ylabel: str = "PC2") -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    _scatter_groups(ax, coords_N2, labels, color_by)
    if ratio is not None and len(ratio):
        xlabel = f"{xlabel} ({ratio[0]:.0%})"
        if len(ratio) > 1:
            ylabel = f"{ylabel} ({ratio[1]:.0%})"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


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
    return _save(fig, path)


def side_by_side(panels: list[tuple[str, np.ndarray]], labels: Sequence, color_by: str, path) -> Path:
    """2-D pictures of the same models (DYNAMO's PCA, the baselines' MDS, ...), one panel per (title, coords)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, coords) in zip(axes[0], panels):
        _scatter_groups(ax, coords, labels, color_by)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


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
    return _save(fig, path)


def averaging_bars(rows: list[dict], path) -> Path:
    """Meta accuracy at centroids/midpoints vs the members' base and meta accuracies."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2) + 2.6, 3.8))
    x = np.arange(len(rows))
    w = 0.27
    ax.bar(x - w, [r["meta_accuracy"] for r in rows], w, label="meta-model at the averaged theta")
    ax.bar(x, [r["member_base_mean"] for r in rows], w, label="members: base models (mean)")
    ax.bar(x + w, [r["member_meta_mean"] for r in rows], w, label="members: meta at theta_n (mean)")
    ax.scatter(x, [r["member_base_max"] for r in rows], marker="_", s=200, color="k", zorder=3, label="best member")
    ax.set_xticks(x, [f"{r['kind'].split(' ')[0]}\n{_short(r['name'])}" for r in rows], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("model averaging in embedding space", fontsize=10)
    return _save(fig, path)


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
              path_S2: np.ndarray | None = None, extra_points: dict[str, np.ndarray] | None = None) -> Path:
    """Heat map over the PCA plane, base embeddings, their hull, the best point (x) and an SSL path (Figs. 6, 7, 11)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    if len(axis_a) > 1 and len(axis_b) > 1:
        im = ax.pcolormesh(axis_a, axis_b, scores_GG, shading="nearest", cmap="viridis")
        plt.colorbar(im, ax=ax, label=cbar_label)
    else:  # degenerate plane: a line of scores
        along = axis_a if len(axis_a) > 1 else axis_b
        ax.plot(along, scores_GG.ravel(), "-", color="tab:green")
    _hull_polygon(ax, base_N2)
    keys = [str(v) for v in labels]
    markers = "osD^v<>p*h"
    style = ({"s": 32, "edgecolors": "k", "linewidths": 0.8} if len(keys) <= MANY_POINTS
             else {**point_style(len(keys), 32), "edgecolors": "none"})
    for i, key in enumerate(sorted(set(keys), key=sort_key)):
        m = np.array([k == key for k in keys])
        ax.scatter(base_N2[m, 0], base_N2[m, 1], marker=markers[i % len(markers)], facecolors="white",
                   label=key if i < MAX_LEGEND else None, zorder=3, **style)
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
    return _save(fig, path)


def ssl_loss(losses: np.ndarray, path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("iterate")
    ax.set_ylabel("cross-entropy on the labelled set")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def word_values(words: Sequence[str], values_W: np.ndarray, categories: Sequence[str], path, title: str) -> Path:
    colours = {"positive": "tab:green", "negative": "tab:red", "neutral": "tab:gray"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(words) + 1), 3.4))
    ax.bar(range(len(words)), values_W, color=[colours[c] for c in categories])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)
    ax.set_ylabel("G(F(x, h*))")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
