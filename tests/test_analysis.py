"""Known-answer tests of the analyses (synthetic, fast, no Ray, no MLflow)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dist import zoo
from dynamo_dist.analysis import (Dynamics, EmbeddingGeometry, FixedPointFinder, ModelAveraging,
                                  RepresentationBaseline, SemiSupervisedTheta, ThetaLandscape, WordValence,
                                  base_dynamics, base_visited_states, centroids, cka_distance, clustering_scores,
                                  in_convex_hull, line_attractor_stats, mds_embedding, meta_dynamics,
                                  meta_visited_states, num_components_for, svcca_distance, valence_score)
from dynamo_dist.analysis.baseline import pairwise_distances
from dynamo_dist.analysis import comparison
from dynamo_dist.analysis.comparison import (METRICS, MethodComparison, adjusted_rand, euclidean_distances, lloyd,
                                             nn_accuracy, silhouette)
from dynamo_dist.analysis.evaluate import accuracies
from dynamo_dist.analysis.geometry import stratified_sample
from dynamo_dist.config import MetaConfig
from dynamo_dist.data.tasks import Split
from dynamo_dist.meta.model import MetaRNN
from dynamo_dist.data.store import Trajectory
from dynamo_dist.meta.trainer import DynamoTrainer, PopulationData


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and fair to tests beside


def _linear(W: np.ndarray, b: np.ndarray) -> Dynamics:
    Wt, bt = torch.tensor(W, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return Dynamics(step=lambda h: h @ Wt.T + bt, readout=None, state_dim=len(b))


# ---------------------------------------------------------------- fixed points


def test_linear_rnn_fixed_point_is_solve_and_jacobian_eigenvalues_are_W():
    rng = np.random.default_rng(0)
    S = 6
    W = rng.standard_normal((S, S))
    W = 0.9 * W / np.abs(np.linalg.eigvals(W)).max()
    b = rng.standard_normal(S)
    starts = torch.randn(100, S)
    f = FixedPointFinder(num_initial=32, outlier_scale=None, random_state=0).fit(_linear(W, b), starts)
    assert f.converged_ and f.num_outliers_ == 0
    assert f.fixed_points_.shape == (1, S)  # every search lands on the unique fixed point, merged into one
    np.testing.assert_allclose(f.fixed_points_[0], np.linalg.solve(np.eye(S) - W, b), atol=1e-4)
    np.testing.assert_allclose(f.jacobians_[0], W, atol=1e-5)
    want = np.linalg.eigvals(W)
    got = f.eigenvalues_[0]
    assert np.abs(np.sort_complex(got) - np.sort_complex(want)).max() < 1e-5
    assert f.stats_["mean_max_abs_eigenvalue"] == pytest.approx(0.9, abs=1e-5)
    assert f.stats_["mean_num_near_unit"] == 0
    # the fixed point lies far outside the unit-scale starting states: the outlier rule drops it
    far = FixedPointFinder(num_initial=32, outlier_scale=1.0, random_state=0).fit(_linear(W, b), 0.1 * starts)
    assert far.num_outliers_ == 32 and not far.converged_ and len(far.fixed_points_) == 0


def test_a_search_that_never_converges_reports_zero_fixed_points_and_its_slow_points():
    # h -> h + 1 (a translation) has no fixed point; q = 1/2 everywhere, so no candidate meets q_tol
    shift = Dynamics(step=lambda h: h + 1.0, readout=None, state_dim=3)
    f = FixedPointFinder(num_initial=8, max_iter=5, outlier_scale=None, random_state=0).fit(shift, torch.randn(20, 3))
    assert not f.converged_ and len(f.fixed_points_) >= 1  # the slowest states, kept for the plots
    assert f.stats_["num_fixed_points"] == 0 and f.stats_["num_slow_points"] == len(f.fixed_points_)
    assert f.stats_["converged"] is False
    ok = FixedPointFinder(num_initial=8, outlier_scale=None, random_state=0).fit(_linear(0.5 * np.eye(3), np.ones(3)),
                                                                                  torch.randn(20, 3))
    assert ok.converged_ and ok.stats_["num_fixed_points"] == ok.stats_["num_slow_points"] == 1  # the control


def test_line_attractor_statistics_of_a_linear_integrator():
    # W has eigenvalue 1 along v and 0.3/0.5 elsewhere; b has no component that drives v,
    # so the fixed points form the line {h0 + s v}: PC1 carries all their variance and
    # every Jacobian has exactly one eigenvalue on the unit circle.
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    W = Q @ np.diag([1.0, 0.3, 0.5]) @ Q.T
    b = Q @ np.array([0.0, 0.4, -0.2])
    f = FixedPointFinder(num_initial=64, dedup_tol=1e-3, random_state=0).fit(_linear(W, b), torch.randn(200, 3) * 2)
    assert f.stats_["num_fixed_points"] > 10
    assert f.stats_["pc1_variance_ratio"] > 0.999
    assert f.stats_["mean_num_near_unit"] == pytest.approx(1.0)
    residual = f.fixed_points_ @ W.T + b - f.fixed_points_
    assert np.abs(residual).max() < 1e-3
    # the line's direction is v = Q[:, 0]
    pc1 = np.linalg.svd(f.fixed_points_ - f.fixed_points_.mean(0))[2][0]
    assert abs(pc1 @ Q[:, 0]) > 0.999


def test_line_attractor_stats_known_values():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    eig = np.array([[1.0, 0.5], [0.99, 0.2], [1.2, 0.1]])
    s = line_attractor_stats(pts, eig, unit_tol=0.05)
    assert s["num_fixed_points"] == 3
    assert s["pc1_variance"] == pytest.approx(1.0)
    assert s["pc1_variance_ratio"] == pytest.approx(1.0)
    assert s["pc1_extent"] == pytest.approx(2.0)
    assert s["mean_num_near_unit"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("arch", ["gru", "rnn", "lstm"])
def test_base_model_fixed_points_are_fixed(arch):
    torch.manual_seed(0)
    spec = zoo.ArchSpec(arch=arch, input_kind="sequence", input_shape=(12, 3), num_classes=2, hidden_size=6)
    model = zoo.build(spec).eval()
    x = torch.randn(16, 12, 3)
    visited = base_visited_states(model, x, torch.full((16,), 12))
    dyn = base_dynamics(model)
    assert dyn.state_dim == (12 if arch == "lstm" else 6) and visited.shape[1] == dyn.state_dim
    if arch != "lstm":  # the visited states are the recorded trajectory
        np.testing.assert_allclose(visited.numpy(), model.trajectories(x)[0][0].reshape(-1, 6).detach().numpy(), atol=1e-6)
    f = FixedPointFinder(num_initial=32, max_iter=100, random_state=0).fit(dyn, visited)
    assert f.converged_
    with torch.no_grad():
        fp = torch.from_numpy(f.fixed_points_)
        assert (dyn.step(fp) - fp).norm(dim=1).max() < 2e-3
    assert f.eigenvalues_.shape[1] == dyn.state_dim


def test_meta_dynamics_step_reproduces_forward_and_pad_is_zero_input():
    torch.manual_seed(0)
    spec = zoo.ArchSpec(arch="gru", input_kind="tokens", input_shape=(7,), num_classes=2, hidden_size=8, vocab_size=20)
    meta = MetaRNN(spec, hidden_size=10, embedding_dim=3, output_sizes={"t": 2}, embed_dim=4).eval()
    theta = torch.randn(3)
    x = torch.zeros(2, 7, dtype=torch.long)  # all <pad>: every step is F(theta, x*=pad, h)
    with torch.no_grad():
        h_seq = meta(x, theta[None].expand(2, -1))[0][0]
        dyn = meta_dynamics(meta, theta, group="t")
        h = torch.zeros(2, 10)
        for t in range(7):
            h = dyn.step(h)
            np.testing.assert_allclose(h.numpy(), h_seq[:, t].numpy(), atol=1e-6)
    visited = meta_visited_states(meta, theta, torch.randint(2, 20, (4, 7)), torch.tensor([7, 3, 1, 7]))
    assert visited.shape == (18, 10)  # only valid (non-pad) steps


# ---------------------------------------------------------------- geometry


def test_embedding_in_a_plane_needs_two_components():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((2, 12))
    theta = rng.standard_normal((40, 2)) @ basis + 1e-4 * rng.standard_normal((40, 12)) + 3.0
    geo = EmbeddingGeometry().fit(theta)
    assert geo.num_components_ == 2
    assert geo.explained_variance_ratio_[:2].sum() > 0.999
    # the PCA plane reproduces the points: inverse(transform(theta)) ~ theta
    np.testing.assert_allclose(geo.inverse_transform(geo.transform(theta)), theta, atol=1e-3)
    theta3 = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 12))
    assert EmbeddingGeometry().fit(theta3).num_components_ == 3
    assert num_components_for(np.array([0.5, 0.3, 0.15, 0.05]), 0.95) == 3
    assert num_components_for(np.array([0.5, 0.3, 0.15, 0.05]), 0.8) == 2


def test_clustering_scores_separate_groups_and_not_random_labels():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(3, 0.1, (10, 4))])
    labels = ["a"] * 10 + ["b"] * 10
    s = clustering_scores(labels, points=pts, random_state=0)
    assert s["silhouette"] > 0.9 and s["adjusted_rand"] == pytest.approx(1.0)
    shuffled = list(rng.permutation(labels))
    s2 = clustering_scores(shuffled, points=pts, random_state=0)
    assert s2["silhouette"] < 0.2 and s2["adjusted_rand"] < 0.3
    assert np.isnan(clustering_scores(["a"] * 20, points=pts)["silhouette"])  # one group: undefined


# ---------------------------------------------------------------- baseline


def _permuted_gru_copy(model, perm):
    """The same network with its hidden units permuted: h_copy = h[:, perm] exactly."""
    copy = zoo.build(model.spec)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    H = model.spec.hidden_size
    idx = torch.cat([perm + g * H for g in range(3)])  # gates r, z, n stacked
    sd["rnn.weight_ih_l0"] = sd["rnn.weight_ih_l0"][idx]
    sd["rnn.weight_hh_l0"] = sd["rnn.weight_hh_l0"][idx][:, perm]
    sd["rnn.bias_ih_l0"] = sd["rnn.bias_ih_l0"][idx]
    sd["rnn.bias_hh_l0"] = sd["rnn.bias_hh_l0"][idx]
    sd["readout.weight"] = sd["readout.weight"][:, perm]
    copy.load_state_dict(sd)
    return copy.eval()


def test_svcca_and_cka_distance_zero_for_rotated_or_permuted_copy_positive_for_unrelated():
    torch.manual_seed(0)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(20, 2), num_classes=3, hidden_size=16)
    net = zoo.build(spec).eval()
    other = zoo.build(spec.__class__(**{**spec.__dict__, "hidden_size": 12})).eval()  # unrelated, other width
    x = torch.randn(100, 20, 2)
    perm = torch.randperm(16)
    with torch.no_grad():
        h = net.trajectories(x)[0][0].reshape(-1, 16).double().numpy()
        h_perm = _permuted_gru_copy(net, perm).trajectories(x)[0][0].reshape(-1, 16).double().numpy()
        h_other = other.trajectories(x)[0][0].reshape(-1, 12).double().numpy()
    np.testing.assert_allclose(h_perm, h[:, perm.numpy()], atol=1e-5)
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
    for copy in (h @ Q, h_perm, 2.5 * h_perm):
        assert svcca_distance(h, copy) < 1e-5
        assert cka_distance(h, copy) < 1e-6
    assert svcca_distance(h, h_other) > 0.2
    assert cka_distance(h, h_other) > 0.05


def test_baseline_mds_recovers_planar_distances_and_groups():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((8, 2))
    D = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    coords, _ = mds_embedding(D, random_state=0)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), D, atol=1e-3)
    # two families of "models": trajectories that are rotations of one of two base signals
    base = [rng.standard_normal((400, 6)), rng.standard_normal((400, 6))]
    taps = [[base[i % 2] @ np.linalg.qr(rng.standard_normal((6, 6)))[0] + 0.05 * rng.standard_normal((400, 6))]
            for i in range(6)]
    fit = RepresentationBaseline(method="svcca", random_state=0).fit(taps, [i % 2 for i in range(6)])
    assert fit.distances_.shape == (6, 6) and np.allclose(fit.distances_, fit.distances_.T)
    assert fit.scores_["silhouette"] > 0.8 and fit.scores_["adjusted_rand"] == pytest.approx(1.0)


def _reference_distances(taps, distance) -> np.ndarray:
    """The per-pair functions, pair by pair: the reference the batched matrix must equal."""
    n = len(taps)
    ref = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                ref[i, j] = np.mean([distance(taps[i][t], taps[j][t]) for t in range(len(taps[i]))])
    return ref


def test_batched_pairwise_distances_equal_the_per_pair_functions():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((300, 5))
    taps = []  # two taps (ResNet stages) of different widths; some models near-copies, some unrelated
    for i in range(7):
        width = int(rng.integers(3, 10))
        first = shared @ rng.standard_normal((5, width)) + (0.02 if i < 3 else 0.5) * rng.standard_normal((300, width))
        taps.append([first, rng.standard_normal((300, 4))])
    taps.append([np.ones((300, 3)), rng.standard_normal((300, 4))])  # a constant tap: SVCCA keeps no direction
    for method, distance in (("svcca", svcca_distance), ("cka", cka_distance)):
        fast = pairwise_distances(taps, method)
        ref = _reference_distances(taps, distance)
        np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
        assert np.ptp(ref[np.triu_indices(8, 1)]) > 0.1  # varied distances: equality is not about constants


def test_stratified_sample_keeps_group_shares_and_is_seeded():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    idx = stratified_sample(labels, 20, random_state=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20 and (np.diff(idx) > 0).all()
    assert Counter(labels[i] for i in idx) == {"a": 12, "b": 6, "c": 2}
    np.testing.assert_array_equal(idx, stratified_sample(labels, 20, random_state=0))
    assert not np.array_equal(idx, stratified_sample(labels, 20, random_state=1))
    np.testing.assert_array_equal(stratified_sample(labels, 100, random_state=0), np.arange(100))
    np.testing.assert_array_equal(stratified_sample(labels, None), np.arange(100))
    # a group of 3 in 100 would get 0.3 of 10: it keeps two models so that it can still be scored
    rare = Counter(["a" if i < 97 else "b" for i in stratified_sample(["a"] * 97 + ["b"] * 3, 10, 0)])
    assert rare == {"a": 8, "b": 2}


def _groups(num_per_group: int = 12, num_groups: int = 3, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.eye(num_groups, 5)
    pts = np.concatenate([c + spread * rng.standard_normal((num_per_group, 5)) for c in centres])
    return pts, np.repeat(np.arange(num_groups), num_per_group)


def test_scores_of_the_comparison_match_scikit_learn_and_ignore_bootstrap_copies():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    pts, codes = _groups(spread=1.5)
    d = euclidean_distances(pts)
    assert silhouette(d, codes) == pytest.approx(silhouette_score(d, codes, metric="precomputed"), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 3, 30), rng.integers(0, 4, 30)
        assert adjusted_rand(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    init = pts[[0, 12, 24]] + 1.0
    np.testing.assert_array_equal(lloyd(pts, init), KMeans(3, init=init, n_init=1).fit(pts).labels_)
    near = np.array([[0, 1, 5], [1, 0, 2], [5, 2, 0]], dtype=float)
    assert nn_accuracy(near, np.array([0, 0, 1])) == pytest.approx(2 / 3)  # the third model's neighbour is in group 0
    # every model twice, as a resample may hold it: the copies are not each other's neighbours
    twice = np.repeat(np.arange(len(codes)), 2)
    d2, c2 = d[np.ix_(twice, twice)], codes[twice]
    assert silhouette(d2, c2, origin=twice) == pytest.approx(silhouette(d, codes), abs=1e-12)
    assert nn_accuracy(d2, c2, origin=twice) == pytest.approx(nn_accuracy(d, codes))
    assert silhouette(d2, c2) > silhouette(d, codes) + 0.02  # the control: copies counted as neighbours inflate it
    assert nn_accuracy(d2, c2) == 1.0 > nn_accuracy(d, codes)


def test_method_comparison_scores_separated_groups_high_and_shuffled_labels_low():
    pts, codes = _groups()
    noise = np.random.default_rng(1).standard_normal(pts.shape)
    distances = {"points": euclidean_distances(pts), "noise": euclidean_distances(noise)}
    cmp = MethodComparison(num_dims=5, num_bootstrap=60, random_state=0).fit(distances, [f"g{c}" for c in codes])
    sep = cmp.scores_["points"]
    assert sep["silhouette_full"] > 0.8 and sep["silhouette_2d"] > 0.8
    assert sep["ari_full"] == sep["ari_2d"] == sep["nn_accuracy"] == 1.0
    assert cmp.scores_["noise"]["silhouette_full"] < 0.1 and cmp.scores_["noise"]["ari_full"] < 0.3
    for method in distances:
        for metric in METRICS:
            lo, hi = cmp.intervals_[method][metric]
            assert lo <= cmp.scores_[method][metric] <= hi, (method, metric)
    assert cmp.intervals_["noise"]["silhouette_full"][1] > cmp.intervals_["noise"]["silhouette_full"][0]
    # classical MDS of Euclidean distances is the points themselves, up to a rotation
    np.testing.assert_allclose(euclidean_distances(cmp.embeddings_["points"]), distances["points"], atol=1e-8)
    assert [r["method"] for r in cmp.table_] == ["points", "noise"]
    assert {"num_models", *METRICS, *(f"{m}_{end}" for m in METRICS for end in ("low", "high"))} <= set(cmp.table_[0])
    shuffled = list(np.random.default_rng(2).permutation(codes))
    ctrl = MethodComparison(num_dims=5, num_bootstrap=0, random_state=0).fit(distances, shuffled).scores_["points"]
    assert ctrl["silhouette_full"] < 0.1 and ctrl["ari_full"] < 0.3 and ctrl["nn_accuracy"] < 0.6
    assert np.isnan(MethodComparison(num_bootstrap=0).fit(distances, shuffled).intervals_["points"]["ari_full"][0])


def test_nn_accuracy_interval_is_centred_on_its_estimate_when_models_come_in_families():
    """Epoch snapshots of one training run are each other's nearest models: a resample that searched
    neighbours among its own draws (about 63% of the models distinct) lost them and was biased low
    (the control); resampling each model's outcome among all models is not."""
    rng = np.random.default_rng(0)
    run_group = np.repeat(np.arange(4), 10)  # 4 groups x 10 runs x 4 snapshots
    runs = rng.standard_normal((4, 5))[run_group] * 0.6 + rng.standard_normal((40, 5))
    codes = np.repeat(run_group, 4)
    d = euclidean_distances(runs[np.repeat(np.arange(40), 4)] + 0.5 * rng.standard_normal((160, 5)))
    cmp = MethodComparison(num_bootstrap=200, random_state=0).fit({"theta": d}, [f"g{c}" for c in codes])
    est, (lo, hi) = cmp.scores_["theta"]["nn_accuracy"], cmp.intervals_["theta"]["nn_accuracy"]
    assert lo < est < hi and abs((lo + hi) / 2 - est) < 0.02, (lo, est, hi)
    groups = [np.flatnonzero(codes == g) for g in range(4)]
    draws = [np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(200)]
    within = np.mean([nn_accuracy(d[np.ix_(i, i)], codes[i], i) for i in draws])
    assert within < est - 0.03  # the control: neighbours searched within each resample


def test_scatter_of_thousands_of_models_names_groups_not_models():
    import matplotlib.pyplot as plt

    from dynamo_dist.analysis import figures

    coords = np.random.default_rng(0).standard_normal((1000, 2))
    labels = [f"g{i % 4}" for i in range(1000)]
    for n in (40, 1000):
        fig, ax = plt.subplots()
        figures._scatter_groups(ax, coords[:n], labels[:n], "group")
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["g0", "g1", "g2", "g3"]
        drawn = [c for c in ax.collections if len(c.get_offsets())]
        assert sum(len(c.get_offsets()) for c in drawn) == n and not ax.texts
        sizes = np.concatenate([c.get_sizes() for c in drawn])
        assert (sizes < 10).all() if n == 1000 else (sizes == 30).all()  # small markers only past MANY_POINTS
        plt.close(fig)


# ---------------------------------------------------------------- averaging, landscape


def _tiny_meta(seed: int = 0, dim: int = 2) -> MetaRNN:
    torch.manual_seed(seed)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(8, 2), num_classes=3, hidden_size=8)
    return MetaRNN(spec, hidden_size=12, embedding_dim=dim, output_sizes={"t": 3}).eval()


def test_centroids_are_mean_thetas_and_the_meta_model_is_run_at_them():
    theta = np.array([0.3, -1.2, 0.7])
    c = centroids(np.tile(theta, (5, 1)), ["g"] * 5)
    np.testing.assert_array_equal(c["g"], theta)
    two = centroids(np.array([[0.0, 0.0], [2.0, 4.0], [5.0, 5.0]]), ["a", "a", "b"])
    np.testing.assert_allclose(two["a"], [1.0, 2.0])
    # the meta-model is run at the centroid of distinct members: labelled with its own decisions
    # at the hand-computed mean theta, the centroid row scores 1 and the members do not
    meta = _tiny_meta()
    th = np.array([[0.0, 0.0], [6.0, -3.0], [-3.0, 9.0]])  # mean (1, 2)
    x = torch.randn(40, 8, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_at_mean = meta(x, torch.tensor([[1.0, 2.0]]).expand(40, -1))[1]["t"][:, -1].argmax(-1)
    test = Split(x, y_at_mean, torch.full((40,), 8))
    avg = ModelAveraging(pairs=[("m1", "m2")]).fit(meta, th, ["m0", "m1", "m2"], ["g"] * 3, ["t"] * 3, {"t": test},
                                                   {"m0": 0.5, "m1": 0.6, "m2": 0.7})
    cen = next(r for r in avg.table_ if r["kind"] == "centroid")
    assert cen["theta"] == [1.0, 2.0] and cen["meta_accuracy"] == 1.0
    # the control: at each member's theta the meta-model decides otherwise on some inputs, so a
    # centroid row evaluated anywhere but the mean would score below 1
    assert (avg.member_meta_accuracy_ < 1.0).all() and cen["member_meta_mean"] < 1.0
    mid = next(r for r in avg.table_ if r["kind"].startswith("midpoint"))
    assert mid["theta"] == [1.5, 3.0]
    assert mid["meta_accuracy"] == pytest.approx(accuracies(meta, np.array([1.5, 3.0]), "t", test)[0])
    assert cen["member_base_mean"] == pytest.approx(0.6) and cen["member_base_max"] == pytest.approx(0.7)


def test_batched_theta_evaluation_matches_one_at_a_time():
    meta = _tiny_meta(dim=3)
    split = Split(torch.randn(30, 8, 2), torch.randint(0, 3, (30,)), torch.full((30,), 8))
    thetas = np.random.default_rng(0).standard_normal((7, 3))
    batched = accuracies(meta, thetas, "t", split, batch_size=64)  # several thetas per forward pass
    single = [accuracies(meta, th, "t", split, batch_size=7)[0] for th in thetas]  # inputs sliced
    np.testing.assert_allclose(batched, single)


def test_convex_hull_membership():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1.0]])
    assert in_convex_hull(np.array([[0.5, 0.5], [1.5, 0.5], [0.0, 0.5]]), square).tolist() == [True, False, True]
    segment = np.array([[0, 0], [1, 1], [2, 2.0]])  # collinear: Delaunay fails, the segment is the hull
    assert in_convex_hull(np.array([[0.5, 0.5], [0.5, 0.6], [3, 3]]), segment).tolist() == [True, False, False]


@pytest.mark.parametrize("target_coords, inside", [((2.2, 0.0), False), ((0.1, 0.1), True)])
def test_landscape_finds_known_maximum_and_flags_hull(target_coords, inside):
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((4, 2)))[0].T  # orthonormal plane in R^4
    coords = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [0.2, -0.3]], dtype=float)
    theta = coords @ basis
    target = np.array(target_coords) @ basis
    land = ThetaLandscape(grid_size=21, margin=0.5).fit(theta, lambda th: -np.linalg.norm(th - target, axis=1))
    geo = EmbeddingGeometry().fit(theta)
    np.testing.assert_allclose(land.best_theta_, target, atol=0.15)
    assert land.best_inside_hull_ is inside
    assert land.scores_.shape == (21, 21)
    np.testing.assert_allclose(geo.transform(land.grid_thetas_), land.grid_coords_, atol=1e-9)


# ---------------------------------------------------------------- semi-supervised theta


def _train_base(label_fn, seed: int, steps: int = 150) -> nn.Module:
    torch.manual_seed(seed)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(10, 2), num_classes=2, hidden_size=8)
    model = zoo.build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(64, 10, 2, generator=gen)
        loss = F.cross_entropy(model(x), label_fn(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_ssl_recovers_theta_of_the_model_that_labelled_the_data(tmp_path):
    # two clearly different models: one integrates input channel 0, the other channel 1
    tasks = {"A": lambda x: (x[:, :, 0].sum(1) > 0).long(), "B": lambda x: (x[:, :, 1].sum(1) > 0).long()}
    models = {name: _train_base(fn, seed=i) for i, (name, fn) in enumerate(tasks.items())}
    gen = torch.Generator().manual_seed(5)
    x_probe = torch.randn(256, 10, 2, generator=gen)
    probe = Split(x_probe, torch.zeros(256, dtype=torch.long), torch.full((256,), 10))
    trajs = {}
    with torch.no_grad():
        for name, m in models.items():
            hs, out = m.trajectories(x_probe)
            trajs[name] = Trajectory(model_id=name, hiddens=hs, outputs=out)
    rows = [{"model_id": n, "task": "t", "arch": "gru", "input_kind": "sequence", "input_shape": [10, 2],
             "num_classes": 2, "hidden_size": 8, "vocab_size": None} for n in models]
    data = PopulationData(root=str(tmp_path), rows=rows, probe_inputs={"t": probe}, probe=trajs)
    cfg = MetaConfig(output_dir=str(tmp_path / "meta"), steps=300, hidden_size=16,
                     embedding_dim=2, batch_size=32, models_per_step=2, lr=1e-2, seed=0)
    trainer = DynamoTrainer(cfg, data)
    trainer.fit()
    theta = trainer.embeddings.theta_matrix().numpy()
    th_a, th_b = theta[0], theta[1]
    assert np.linalg.norm(th_a - th_b) > 0.1  # the embedding tells the two apart

    x_lab = torch.randn(64, 10, 2, generator=gen)
    labelled = Split(x_lab, tasks["A"](x_lab), torch.full((64,), 10))
    scale = float(np.sqrt((theta ** 2).sum(1).mean()))
    ssl = SemiSupervisedTheta(num_steps=100, lr=0.05 * scale, random_state=0).fit(trainer.meta, "t", labelled)
    assert ssl.path_.shape == (101, 2) and np.all(ssl.path_[0] == 0)
    assert ssl.losses_[-1] < ssl.losses_[0]
    assert np.linalg.norm(ssl.theta_ - th_a) < np.linalg.norm(ssl.theta_ - th_b)
    x_test = torch.randn(256, 10, 2, generator=gen)
    test_a = Split(x_test, tasks["A"](x_test), torch.full((256,), 10))
    assert ssl.score(trainer.meta, "t", test_a) > accuracies(trainer.meta, th_b, "t", test_a)[0] + 0.2
    assert all(p.requires_grad for p in trainer.meta.parameters())  # unfrozen again afterwards


# ---------------------------------------------------------------- word valence


class _Integrator(nn.Module):
    """A perfect integrator 'meta-model': h' = h + E[x]; G(h) = 2 h_0 (logits (-h0, h0))."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embedding_dim = 1
        self.hidden_size = 2
        self.embed = nn.Embedding.from_pretrained(embeddings, freeze=True, padding_idx=0)
        self.cell = type("Cell", (), {"input_size": 3})()
        head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        self.heads = nn.ModuleDict({"s": head})

    def encode(self, x):
        return self.embed(x)

    def step(self, x_BD, theta_BE, h_BM):
        return h_BM + x_BD

    def forward(self, x, theta_BE):
        h = torch.cumsum(self.embed(x), dim=1)
        return [h], {g: head(h) for g, head in self.heads.items()}


def test_word_valence_score_of_an_integrator():
    vocab = ["<pad>", "<unk>", "good", "great", "bad", "the", "a"]
    emb = torch.tensor([[0, 0], [0, 0], [0.5, 0.1], [0.8, -0.2], [-0.7, 0.3], [0.05, 0.4], [0.0, 1.0]])
    meta = _Integrator(emb)
    ids = {w: i for i, w in enumerate(vocab)}
    # the first token "a" has h_0 = 0, so a visited state with a neutral readout exists
    x = torch.tensor([[6, 2, 4, 5], [6, 3, 5, 4]])
    wv = WordValence(positive_words=("good", "great", "superb"), negative_words=("bad",), neutral_words=("the",),
                     finder=FixedPointFinder(num_initial=8, dedup_tol=1e-6, random_state=0)).fit(
        meta, np.zeros((2, 1)), ids, "s", positive_class=1, negative_class=0, x=x, lengths=torch.tensor([4, 4]))
    assert wv.missing_words_ == ["superb"]
    assert wv.neutral_readout_ == pytest.approx([0.0, 0.0])
    # G(F(x, h*)) = 2 * E[x]_0 from the neutral point h*_0 = 0
    want = valence_score([2 * 0.5, 2 * 0.8], [2 * -0.7], [2 * 0.05])
    assert want == pytest.approx(1.0 + 1.6 + 1.4 - 0.1)
    np.testing.assert_allclose(wv.scores_, [want, want], atol=1e-5)
    np.testing.assert_allclose(wv.values_[0], [1.0, 1.6, -1.4, 0.1], atol=1e-5)


def test_output_distances_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    far = np.zeros((50, 4))
    far[:, 0], far[:, 1] = -40.0, 40.0  # every example: all mass on class 1
    near = np.zeros((50, 4))
    near[:, 0] = 40.0                    # all mass on class 0: disjoint from `far`
    d = comparison.output_distances(np.stack([a, a.copy(), far, near]))
    assert d[0, 1] < 1e-7 and np.all(np.diag(d) < 1e-7)  # equal outputs: 0, computed not assumed
    np.testing.assert_allclose(d[2, 3], np.sqrt(np.log(2)), rtol=1e-6)  # disjoint distributions: the maximum
    np.testing.assert_allclose(d, d.T)
    assert 0 < d[0, 2] < d[2, 3]


def test_axis_correlations_known_answers():
    from scipy.stats import spearmanr

    from dynamo_dist.analysis.geometry import axis_correlations

    rng = np.random.default_rng(0)
    coords = rng.normal(size=(40, 3))
    coords[:, 2] = 1.0  # a constant component
    values = np.exp(coords[:, 0])  # a monotone function of PC1 only
    pc1, pc2, pc3 = axis_correlations(coords, values, num_permutations=500, random_state=0)
    assert pc1["spearman"] == pytest.approx(1.0) and pc1["p_value"] == pytest.approx(1 / 501)  # the floor
    assert pc2["spearman"] == pytest.approx(spearmanr(coords[:, 1], values).statistic)
    assert pc2["p_value"] > 0.05  # unrelated: the control
    assert np.isnan(pc3["spearman"]) and np.isnan(pc3["p_value"])
    flipped = axis_correlations(coords, -values, num_permutations=500, random_state=0)[0]
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["p_value"] == pc1["p_value"]  # two-sided
    with pytest.raises(ValueError, match="one per model"):
        axis_correlations(coords, values[:5])
