"""Known answers of fixed-point continuation: bifurcations of 1-D maps at a known parameter,
a linear map's moving fixed point, and paths without any bifurcation (no events)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from dynamo_dist.analysis import Dynamics, FixedPointFinder
from dynamo_dist.analysis.continuation import FixedPointContinuation, isolated, meta_path

DT = 0.5
S_STAR = 0.45  # the bifurcation: r(s) = s - S_STAR crosses 0 between grid steps 0.4 and 0.5
GRID = np.linspace(0.0, 1.0, 11)
STARTS = torch.linspace(-1.5, 1.5, 31)[:, None] + 0.013  # off the maxima of q


pytestmark = pytest.mark.usefixtures("one_thread")


def _finder(**kw) -> FixedPointFinder:
    return FixedPointFinder(num_initial=31, q_tol=1e-10, dedup_tol=1e-3, outlier_scale=None, **kw)


def _pitchfork(s: float) -> Dynamics:
    """h -> h + dt (r h - h^3): one fixed point 0 (stable) for r < 0; for r > 0 it is unstable and
    two stable ones +-sqrt(r) branch off."""
    r = s - S_STAR
    return Dynamics(step=lambda h: h + DT * (r * h - h ** 3), readout=None, state_dim=1)


def _saddle_node(s: float) -> Dynamics:
    """h -> h + dt (r - h^2), r = S_STAR - s: +sqrt(r) (stable) and -sqrt(r) (unstable) meet at r = 0
    and vanish; for r < 0 no fixed point (q > 0 everywhere)."""
    r = S_STAR - s
    return Dynamics(step=lambda h: h + DT * (r - h ** 2), readout=None, state_dim=1)


def _linear(A: np.ndarray, b_of_s) -> Callable[[float], Dynamics]:
    At = torch.tensor(A, dtype=torch.float32)
    return lambda s: Dynamics(step=lambda h: h @ At.T + torch.tensor(b_of_s(s), dtype=torch.float32),
                              readout=None, state_dim=len(A))


def _at(c: FixedPointContinuation, k: int) -> np.ndarray:
    return np.sort(c.fixed_points_[k][:, 0])


def test_pitchfork_is_marked_within_one_step_of_its_parameter():
    c = FixedPointContinuation(_finder(), random_state=0).fit(_pitchfork, STARTS, GRID)
    before, after = GRID < S_STAR, GRID > S_STAR
    assert (c.num_fixed_points_[before] == 1).all() and (c.num_fixed_points_[after] == 3).all()
    for k in np.nonzero(before)[0]:
        assert abs(c.fixed_points_[k][0, 0]) < 1e-3 and c.stable_[k].all()
        np.testing.assert_allclose(c.max_abs_eigenvalues_[k], 1 + DT * (GRID[k] - S_STAR), atol=1e-4)
    for k in np.nonzero(after)[0]:
        r = GRID[k] - S_STAR
        np.testing.assert_allclose(_at(c, k), [-np.sqrt(r), 0.0, np.sqrt(r)], atol=1e-3)
        stable = dict(zip(np.round(c.fixed_points_[k][:, 0], 2), c.stable_[k]))
        assert stable == {round(-np.sqrt(r), 2): True, 0.0: False, round(np.sqrt(r), 2): True}
    # the origin is one branch all along; the two new ones are born where it loses stability
    zero = [int(c.branches_[k][np.argmin(np.abs(c.fixed_points_[k][:, 0]))]) for k in range(len(GRID))]
    assert len(set(zero)) == 1
    kinds = sorted((e["kind"], e["stable_after"]) for e in c.events_)
    assert kinds == [("born", True), ("born", True), ("stability", False)]
    for e in c.events_:
        assert abs(e["s"] - S_STAR) <= GRID[1] - GRID[0] and e["s_before"] < S_STAR < e["s_after"]
    assert c.count_changes_ == [pytest.approx(0.45)] and c.num_stability_changes_ == 1
    assert [r["num_fixed_points"] for r in c.steps_] == list(c.num_fixed_points_)
    assert len(c.points_) == c.num_fixed_points_.sum()


def test_saddle_node_branches_die_together_within_one_step_of_their_parameter():
    c = FixedPointContinuation(_finder(), random_state=0).fit(_saddle_node, STARTS, GRID)
    before, after = GRID < S_STAR, GRID > S_STAR
    assert (c.num_fixed_points_[before] == 2).all() and (c.num_fixed_points_[after] == 0).all()
    for k in np.nonzero(before)[0]:
        r = S_STAR - GRID[k]
        np.testing.assert_allclose(_at(c, k), [-np.sqrt(r), np.sqrt(r)], atol=1e-3)
        order = np.argsort(c.fixed_points_[k][:, 0])
        assert list(c.stable_[k][order]) == [False, True]  # F' = 1 - 2 dt h
    assert not any(r["converged"] for r in c.steps_ if r["s"] > S_STAR)
    assert all(r["min_q"] > 1e-4 for r in c.steps_ if r["s"] > S_STAR)  # the ghost: slow, not fixed
    assert sorted(e["kind"] for e in c.events_) == ["died", "died"]
    assert all(abs(e["s"] - S_STAR) <= GRID[1] - GRID[0] for e in c.events_)
    assert len({int(b) for k in np.nonzero(before)[0] for b in c.branches_[k]}) == 2  # two branches, no re-births


def test_linear_map_fixed_point_moves_as_solve_and_no_event_is_marked():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    A = 0.8 * A / np.abs(np.linalg.eigvals(A)).max()
    b0, b1 = rng.standard_normal(4), rng.standard_normal(4)
    c = FixedPointContinuation(FixedPointFinder(num_initial=16, outlier_scale=None), random_state=0).fit(
        _linear(A, lambda s: (1 - s) * b0 + s * b1), torch.randn(50, 4) * 3, GRID)
    assert (c.num_fixed_points_ == 1).all() and c.events_ == [] and c.count_changes_ == []
    assert {int(b[0]) for b in c.branches_} == {0}
    for k, s in enumerate(GRID):
        np.testing.assert_allclose(c.fixed_points_[k][0], np.linalg.solve(np.eye(4) - A, (1 - s) * b0 + s * b1),
                                   atol=1e-4)
        assert c.max_abs_eigenvalues_[k][0] == pytest.approx(0.8, abs=1e-4) and c.stable_[k][0]


def test_an_eigenvalue_crossing_the_unit_circle_is_a_stability_event_and_its_control_none():
    # A(s) = diag(a(s), 0.5), b = (0, 1): the fixed point (0, 2) stays put; a(s) = 0.55 + s crosses 1 at S_STAR
    def family(slope):
        return lambda s: _linear(np.diag([0.55 + slope * s, 0.5]), lambda _: np.array([0.0, 1.0]))(s)

    starts = torch.randn(40, 2)
    c = FixedPointContinuation(FixedPointFinder(num_initial=16, outlier_scale=None), random_state=0).fit(
        family(1.0), starts, GRID)
    assert (c.num_fixed_points_ == 1).all()
    np.testing.assert_allclose(np.concatenate(c.fixed_points_), np.tile([0.0, 2.0], (len(GRID), 1)), atol=1e-4)
    assert [e["kind"] for e in c.events_] == ["stability"]
    e = c.events_[0]
    assert e["stable_before"] and not e["stable_after"] and e["s_before"] < S_STAR < e["s_after"]
    # control: the same path with a(s) = 0.55 + 0.3 s stays inside the unit circle
    ctrl = FixedPointContinuation(FixedPointFinder(num_initial=16, outlier_scale=None), random_state=0).fit(
        family(0.3), starts, GRID)
    assert ctrl.events_ == [] and all(st.all() for st in ctrl.stable_)


def test_match_tol_separates_a_jumping_fixed_point_into_two_branches():
    # the fixed point jumps from -1 to +1 between s = 0.4 and 0.5: one branch without a limit, two with one
    fam = _linear(np.zeros((1, 1)), lambda s: np.array([-1.0 if s < S_STAR else 1.0]))
    finder = FixedPointFinder(num_initial=8, outlier_scale=None)
    free = FixedPointContinuation(finder, random_state=0).fit(fam, torch.randn(20, 1), GRID)
    assert free.events_ == [] and {int(b[0]) for b in free.branches_} == {0}
    tight = FixedPointContinuation(finder, match_tol=0.5, random_state=0).fit(fam, torch.randn(20, 1), GRID)
    assert sorted(e["kind"] for e in tight.events_) == ["born", "died"] and tight.count_changes_ == []


def test_meta_path_ends_are_the_meta_dynamics_at_the_two_thetas():
    from dynamo_dist import zoo
    from dynamo_dist.analysis import meta_dynamics
    from dynamo_dist.meta.model import MetaRNN

    torch.manual_seed(0)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(5, 2), num_classes=2, hidden_size=4)
    meta = MetaRNN(spec, hidden_size=6, embedding_dim=2, output_sizes={"t": 2}).eval()
    ta, tb = torch.tensor([1.0, -1.0]), torch.tensor([-0.5, 2.0])
    path = meta_path(meta, ta, tb, group="t")
    h = torch.randn(3, 6)
    with torch.no_grad():
        for s, th in ((0.0, ta), (1.0, tb), (0.5, 0.5 * (ta + tb))):
            np.testing.assert_allclose(path(s).step(h).numpy(), meta_dynamics(meta, th, group="t").step(h).numpy(),
                                       atol=1e-6)
    c = FixedPointContinuation(FixedPointFinder(num_initial=16, max_iter=100), num_steps=3, random_state=0).fit(
        path, torch.randn(40, 6) * 0.5)
    assert (c.num_fixed_points_ >= 1).all()
    for k in range(3):  # whatever is tracked is fixed, and at the ends is what a search at that theta finds
        with torch.no_grad():
            p = torch.tensor(c.fixed_points_[k], dtype=torch.float32)
            assert (path(c.s_[k]).step(p) - p).norm(dim=1).max() < 2e-3
    for k, th in ((0, ta), (2, tb)):
        f = FixedPointFinder(num_initial=16, max_iter=100, random_state=0).fit(meta_dynamics(meta, th, group="t"),
                                                                               torch.randn(40, 6) * 0.5)
        assert len(f.fixed_points_) == c.num_fixed_points_[k]
        np.testing.assert_allclose(np.sort(c.fixed_points_[k], axis=0), np.sort(f.fixed_points_, axis=0), atol=1e-2)


def test_a_branch_the_fresh_candidates_find_late_is_followed_back_not_born():
    # h -> h - dt (h - m)(h - m - 1)(h - m - 2), m = 0.2 s: fixed points m (stable), m + 1 (unstable),
    # m + 2 (stable) all along; before s = 0.5 the searches from the fresh candidates reach m only
    def family(s: float) -> Dynamics:
        m = 0.2 * s
        return Dynamics(step=lambda h: h - DT * (h - m) * (h - m - 1) * (h - m - 2), readout=None, state_dim=1)

    def fresh(s: float) -> torch.Tensor:
        return torch.linspace(-0.15, 0.15, 7)[:, None] if s < 0.5 else torch.linspace(-0.4, 2.6, 31)[:, None]

    early = _finder(random_state=0).fit(family(0.0), fresh(0.0))
    assert len(early.fixed_points_[early.speeds_ <= 1e-10]) == 1  # the control: a search alone finds one
    c = FixedPointContinuation(_finder(), random_state=0).fit(family, fresh, GRID)
    assert (c.num_fixed_points_ == 3).all() and c.events_ == []
    for k, s in enumerate(GRID):
        np.testing.assert_allclose(_at(c, k), 0.2 * s + np.array([0.0, 1.0, 2.0]), atol=1e-3)
        order = np.argsort(c.fixed_points_[k][:, 0])
        assert list(c.stable_[k][order]) == [True, False, True]


def test_on_the_bifurcation_itself_the_flat_fixed_point_counts_once():
    # a 21-step grid has s = 0.45 (r = 0): q ~ h^6 there, and every state within ~0.03 of 0 meets q_tol
    grid = np.linspace(0.0, 1.0, 21)
    c = FixedPointContinuation(_finder(), random_state=0).fit(_pitchfork, STARTS, grid)
    assert list(c.num_fixed_points_) == [1] * 10 + [3] * 11
    assert all(abs(e["s"] - S_STAR) <= grid[1] - grid[0] for e in c.events_)
    assert sorted(e["kind"] for e in c.events_) == ["born", "born", "stability"]


def test_isolated_joins_a_line_attractor_and_keeps_separate_fixed_points_apart():
    # a line of fixed points {(t, 1)} of h -> diag(1, 0.5) h + (0, 0.5), and the pitchfork's three at r = 0.3
    line = Dynamics(step=lambda h: h * torch.tensor([1.0, 0.5]) + torch.tensor([0.0, 0.5]), readout=None, state_dim=2)
    pts = np.stack([np.linspace(-1, 1, 9), np.ones(9)], axis=1)
    assert list(isolated(line.step, pts, 1e-10)) == [0]
    three = np.array([[0.0], [np.sqrt(0.3)], [-np.sqrt(0.3)]])
    assert list(isolated(_pitchfork(S_STAR + 0.3).step, three, 1e-10)) == [0, 1, 2]
