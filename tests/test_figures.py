"""Figure conventions (dynamo_dist/plots.py, dynamo_dist/analysis/figures.py): one colour per group
in every figure, coinciding points marked, tick labels that do not overlap. Artists are read back
from the figures as drawn; no Ray, no models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from dynamo_dist import plots
from dynamo_dist.analysis import figures

GROUPS = ["8", "12", "32", "b-large"]  # numbers: sorted as strings, "12" < "32" < "8" would reorder them


@pytest.fixture
def drawn(monkeypatch):
    """The figures the functions draw, still open to inspection after they are saved."""
    figs = []
    for module in (plots, figures):
        real = module.save

        def keep(fig, path, real=real):
            figs.append(fig)
            return real(fig, path)

        monkeypatch.setattr(module, "save", keep)
    return figs


def _colour_of_group(fig) -> dict[str, tuple]:
    """RGB of the scatter layer named after each group (legend label), over every axes of ``fig``."""
    out = {}
    for ax in fig.axes:
        for c in ax.collections:
            if c.get_label() in GROUPS and len(c.get_offsets()):
                rgb = {tuple(float(v) for v in f[:3]) for f in c.get_facecolor()}
                assert len(rgb) == 1, c.get_label()
                colour = rgb.pop()
                assert out.setdefault(c.get_label(), colour) == colour, c.get_label()  # the same in every panel
    return out


def test_group_colours_depend_on_the_set_of_groups_only():
    a = plots.group_colours(["32", "8", "b-large", "12", "8"])
    b = plots.group_colours(iter(["b-large", "12", "32", "8"]))
    assert a == b and list(a) == GROUPS  # numeric order, then names
    assert to_rgb(a["8"]) == to_rgb("tab:blue") and to_rgb(a["12"]) == to_rgb("tab:orange")
    for n in (10, 20, 37):
        colours = plots.group_colours([f"g{i}" for i in range(n)]).values()
        assert len({to_rgb(c) for c in colours}) == n, n
    # tab20's first ten are tab10's, so groups 0..9 keep their colour when groups 10..19 join
    few, many = plots.group_colours(range(10)), plots.group_colours(range(20))
    assert all(few[k] == many[k] for k in few)
    with pytest.raises(ValueError, match="colours: no colour for groups"):
        plots.colours_for(["8", "new"], a)


def test_a_group_has_one_colour_in_every_figure(drawn, tmp_path):
    rng = np.random.default_rng(0)
    labels = [GROUPS[i % 4] for i in range(40)]
    coords = rng.standard_normal((40, 2))
    every = plots.group_colours(labels)
    figures.embedding_scatter(coords, labels, tmp_path / "a.png", "t", "group")
    # another figure, the models in reverse order and one group missing, given the report's mapping
    keep = [i for i in range(40)[::-1] if labels[i] != "12"]
    figures.landscape(np.linspace(-3, 3, 4), np.linspace(-3, 3, 4), rng.random((4, 4)), coords[keep],
                      [labels[i] for i in keep], np.zeros(2), tmp_path / "b.png", "t", colours=every)
    figures.side_by_side([("x", coords[::-1]), ("y", coords[::-1] * 2)], labels[::-1], "group", tmp_path / "c.png")
    order = rng.permutation(40)
    plots.posthoc_pca_plot(coords[order], [labels[i] for i in order], coords[:2], ["n0", "n1"], tmp_path / "d.png")
    pop = [{"group": labels[i], "test_accuracy": float(rng.random())} for i in order]
    plots.population_accuracy_plot(pop, tmp_path / "e.png")

    seen = [_colour_of_group(fig) for fig in drawn[:4]]
    assert [sorted(s) for s in seen] == [sorted(GROUPS), sorted(set(GROUPS) - {"12"}), sorted(GROUPS), sorted(GROUPS)]
    for s in seen:
        for g, rgb in s.items():
            assert rgb == pytest.approx(to_rgb(every[g])), g
    # the population plot has no legend: one column of points per group, in the ticks' order
    ax = drawn[4].axes[0]
    ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    columns = [tuple(c.get_facecolor()[0][:3]) for c in ax.collections if len(c.get_offsets()) > 1]
    assert ticks == GROUPS and columns == [pytest.approx(to_rgb(every[g])) for g in ticks]


def test_coinciding_points_are_counted_and_outlined(drawn, tmp_path):
    rng = np.random.default_rng(1)
    coords = rng.uniform(-1, 1, (30, 2))
    coords[[3, 7, 11]] = coords[0]                       # three identical models on a fourth: a stack of 4
    coords[20] = coords[21] + 1e-4                       # closer than the figure resolves: a stack of 2
    coords[25] = coords[26] + 0.05                       # 2.5% of the extent apart: two markers, no stack
    labels = [GROUPS[i % 2] for i in range(30)]
    figures.embedding_scatter(coords, labels, tmp_path / "a.png", "t", "group")
    ax = drawn[0].axes[0]
    stacks = {t.get_text(): t.xy for t in ax.texts}
    assert sorted(stacks) == ["×2", "×4"]
    np.testing.assert_allclose(stacks["×4"], coords[0])
    np.testing.assert_allclose(stacks["×2"], coords[20])
    layers = [c for c in ax.collections if len(c.get_offsets())]
    assert all((c.get_linewidths() > 0).all() and (c.get_edgecolor()[:, :3] == 0).all() for c in layers)
    assert all(0.5 <= c.get_alpha() < 1 for c in layers)  # overlapping markers show through each other

    # on the landscape too, where the markers sit on a heat map
    figures.landscape(np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), rng.random((3, 3)), coords, labels, np.zeros(2),
                      tmp_path / "b.png", "t")
    assert sorted(t.get_text() for t in drawn[1].axes[0].texts) == ["×2", "×4"]

    # thousands of points: small markers without edges, no counts (translucency shows density)
    many = rng.standard_normal((3000, 2))
    many[:50] = 0.0
    figures.embedding_scatter(many, [GROUPS[i % 4] for i in range(3000)], tmp_path / "c.png", "t", "group")
    ax = drawn[2].axes[0]
    layer = max(ax.collections, key=lambda c: len(c.get_offsets()))
    assert len(layer.get_offsets()) == 3000 and (layer.get_sizes() < 10).all()
    assert (layer.get_linewidths() == 0).all() and layer.get_alpha() < 0.5 and not ax.texts


def _averaging_rows(n: int) -> list[dict]:
    kinds = ["centroid", "midpoint (same group)", "midpoint (across groups)"]
    return [{"kind": kinds[i % 3], "name": f"gru-h{16 * (i % 5 + 1)}-s{i:03d} | gru-h{16 * (i % 5 + 1)}-s{i + 1:03d}",
             "meta_accuracy": 0.5, "member_base_mean": 0.6, "member_base_max": 0.7, "member_meta_mean": 0.55}
            for i in range(n)]


@pytest.mark.parametrize("num_rows", [3, 16, 200])
def test_averaging_tick_labels_do_not_overlap(drawn, tmp_path, num_rows):
    figures.averaging_bars(_averaging_rows(num_rows), tmp_path / "avg.png")
    fig = drawn[0]
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure as saved (closed: pyplot took its canvas)
    boxes = sorted((t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels() if t.get_text()),
                   key=lambda b: b.x0)
    assert len(boxes) == num_rows if num_rows <= 16 else 10 <= len(boxes) < num_rows  # thinned past what fits
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, (left, right)
    width, height = fig.bbox.width, fig.bbox.height
    assert all(b.x0 >= 0 and b.y0 >= 0 and b.x1 <= width and b.y1 <= height for b in boxes)  # none cut off
    assert Path(tmp_path / "avg.png").stat().st_size > 0
