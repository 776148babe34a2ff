"""The varpro meta recipe: V_n by closed-form (proximal) ridge, theta from output signatures,
hidden loss per model normalised; and the paper recipe kept as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamo_dist import config
from dynamo_dist.meta import signature
from dynamo_dist.meta.model import MetaRNN, ModelEmbeddings
from dynamo_dist.meta.objective import REFIT_RIDGE, Chunk, dynamo_loss, ridge_map, solve_maps
from dynamo_dist.meta.trainer import DynamoTrainer, load_population
from dynamo_dist.zoo import ArchSpec

SEQ = ArchSpec(arch="gru", input_kind="sequence", input_shape=(7, 3), hidden_size=6, num_classes=4)


def _augmented_lstsq(h, y, r, prior=None):
    """The same minimiser as ``ridge_map`` by a direct least-squares solve of the stacked system
    [X / sqrt(n); sqrt(r) I] V = [Y / sqrt(n); sqrt(r) V0]."""
    n, m = h.shape
    x = torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1)
    v0 = torch.zeros(m + 1, y.shape[1], dtype=h.dtype) if prior is None else prior
    a = torch.cat([x / n ** 0.5, r ** 0.5 * torch.eye(m + 1, dtype=h.dtype)])
    b = torch.cat([y / n ** 0.5, r ** 0.5 * v0])
    return torch.linalg.lstsq(a, b).solution


def test_ridge_map_equals_a_direct_least_squares_solve():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    rho = 0.3
    x = torch.cat([h, torch.ones(50, 1, dtype=h.dtype)], 1)
    r = rho * float(torch.trace(x.T @ x / 50)) / 7
    w, b = ridge_map(h, y, rho)
    sol = _augmented_lstsq(h, y, r)
    torch.testing.assert_close(w, sol[:-1].T)
    torch.testing.assert_close(b, sol[-1])
    # with a prior (the last visit's map): the proximal solution
    w0, b0 = torch.randn(4, 6, generator=g, dtype=h.dtype), torch.randn(4, generator=g, dtype=h.dtype)
    w, b = ridge_map(h, y, rho, w0, b0)
    sol = _augmented_lstsq(h, y, r, torch.cat([w0.T, b0[None]]))
    torch.testing.assert_close(w, sol[:-1].T)
    torch.testing.assert_close(b, sol[-1])


def test_ridge_map_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w_true, b_true = torch.randn(3, 5, generator=g, dtype=h.dtype), torch.randn(3, generator=g, dtype=h.dtype)
    w, b = ridge_map(h, h @ w_true.T + b_true, 1e-12)
    torch.testing.assert_close(w, w_true)
    torch.testing.assert_close(b, b_true)


def _tiny():
    torch.manual_seed(0)
    meta = MetaRNN(SEQ, hidden_size=6, embedding_dim=3, output_sizes={"a": 4})
    emb = ModelEmbeddings(["m0", "m1"], 3, meta.tap_dims, [[5], [5]], "rnn")
    return meta, emb


def _chunk(row, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Chunk(model_id=f"m{row}", row=row, group="a", x=torch.randn(n, 7, 3, generator=g),
                 lengths=torch.full((n,), 7), hiddens=[torch.randn(n, 7, 5, generator=g)],
                 outputs=torch.randn(n, 7, 4, generator=g))


def test_projected_gradient_is_the_gradient_of_the_minimum_over_v():
    """Variable projection: dL/dh at the solved V equals the gradient of min_V L(h, V), here computed by
    differentiating through a least-squares solve (plain least squares: ridge -> 0)."""
    meta, emb = _tiny()
    c = _chunk(0)
    h = torch.randn(16, 7, 6, dtype=torch.float64, requires_grad=True)
    y = c.hiddens[0].double()
    emb = emb.double()
    (mapped,) = solve_maps(emb, 0, [h], [y], None, 1e-12)
    ((mapped - y) ** 2).sum(-1).mean().backward()
    ours = h.grad.clone()

    h2 = h.detach().clone().requires_grad_(True)
    x = torch.cat([h2.reshape(-1, 6), torch.ones(16 * 7, 1, dtype=h2.dtype)], 1)
    v = torch.linalg.lstsq(x, y.reshape(-1, 5)).solution  # differentiable in x
    ((x @ v - y.reshape(-1, 5)) ** 2).sum(-1).mean().backward()
    torch.testing.assert_close(ours, h2.grad, rtol=1e-5, atol=1e-8)


def test_solved_maps_are_written_counted_and_carried_as_the_prior():
    meta, emb = _tiny()
    before = [p.detach().clone() for p in emb.parameters_of(1)]
    assert not emb.maps_solved(0)
    loss, stats = dynamo_loss(meta, emb, [_chunk(0)], 1.0, maps_ridge=1e-6)
    loss.backward()
    assert emb.maps_solved(0) and not emb.maps_solved(1)
    assert all(torch.equal(a, b) for a, b in zip(before, emb.parameters_of(1)))  # unsampled: untouched
    assert all(p.grad is None for p in emb.parameters_of(0)[1:])  # V is solved, never stepped
    assert emb.theta[0].grad is not None and emb.theta[0].grad.abs().sum() > 0
    # the stored map is the batch's least-squares map (ridge ~ 0, no prior on a first solve)
    th = emb.theta[0].detach().expand(16, -1)
    hs, _ = meta(_chunk(0).x, th)
    w, b = emb.maps_of(0)[0]
    sol = _augmented_lstsq(hs[0].detach().reshape(-1, 6).double(), _chunk(0).hiddens[0].reshape(-1, 5).double(), 0.0)
    torch.testing.assert_close(w.detach().double(), sol[:-1].T, rtol=1e-3, atol=1e-4)
    # a second visit with a huge ridge stays at the prior (the first solve)
    prior = w.detach().clone()
    dynamo_loss(meta, emb, [_chunk(0, seed=5)], 1.0, maps_ridge=1e9)
    torch.testing.assert_close(emb.maps_of(0)[0][0].detach(), prior, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_distance"):
        dynamo_loss(meta, emb, [_chunk(0)], 1.0, hidden_distance="l1", maps_ridge=0.1)


def test_normalised_hidden_loss_is_one_minus_r2_of_the_batch():
    meta, emb = _tiny()
    c = _chunk(0)
    _, stats = dynamo_loss(meta, emb, [c], 0.0, maps_ridge=1e-12, normalize_hidden=True)
    th = emb.theta[0].detach().expand(16, -1)
    hs, _ = meta(c.x, th)
    from sklearn.linear_model import LinearRegression

    x, y = hs[0].detach().reshape(-1, 6).double().numpy(), c.hiddens[0].reshape(-1, 5).double().numpy()
    pred = LinearRegression().fit(x, y).predict(x)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert stats["loss_hidden"] == pytest.approx(1 - r2, rel=1e-4)


def test_principal_theta_known_answer_and_shards_agree():
    g = torch.Generator().manual_seed(2)
    # signatures on one line: theta on the first coordinate only, RMS norm = scale
    t = torch.randn(10, generator=g, dtype=torch.float64)
    direction = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64) / 5
    sigs = 7.0 + t[:, None] * direction
    theta = signature.principal_theta(sigs, 2, scale=2.0)
    assert theta[:, 1].abs().max() < 1e-5
    assert float(theta.pow(2).sum(1).mean().sqrt()) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(np.abs(np.corrcoef(theta[:, 0].numpy(), t.numpy())[0, 1]), 1.0, rtol=1e-6)
    # two shards summing their moments (what all_reduce does) find what the whole population finds
    sigs = torch.randn(12, 5, generator=g, dtype=torch.float64)
    whole = signature.principal_theta(sigs, 3, 1.0)
    a, b = sigs[:5], sigs[5:]

    def moments(s):
        return torch.cat([s.sum(0), (s.T @ s).reshape(-1), torch.tensor([float(len(s))], dtype=torch.float64)])

    part_a = signature.principal_theta(a, 3, 1.0, all_reduce=lambda m: m + moments(b))
    part_b = signature.principal_theta(b, 3, 1.0, all_reduce=lambda m: m + moments(a))
    torch.testing.assert_close(torch.cat([part_a, part_b]), whole)
    # identical signatures: no informative direction, theta stays 0
    assert signature.principal_theta(torch.ones(4, 3, dtype=torch.float64), 2, 1.0).abs().max() == 0


def test_output_signature_ignores_a_constant_logit_shift():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(8, 5, 4, generator=g)
    torch.testing.assert_close(signature.output_signature(out, "kl"), signature.output_signature(out + 3.0, "kl"))
    assert not torch.allclose(signature.output_signature(out, "mse"), signature.output_signature(out + 3.0, "mse"))


GROUPS = (config.GroupSpec(name="a", task="mnist1d", hidden_size=8, num_seeds=2, epochs=1, lr=1e-2, batch_size=64),
          config.GroupSpec(name="b", task="mnist1d", hidden_size=8, num_seeds=2, epochs=3, lr=1e-2, batch_size=64))


@pytest.fixture(scope="module")
def pop_root(tmp_path_factory, tiny_population):
    return str(tiny_population(tmp_path_factory.mktemp("pop"), *GROUPS, num_examples=600, num_probe=96, num_test=48))


def _cfg(tmp, **kw):
    base = dict(output_dir=str(tmp), steps=12, hidden_size=16, embedding_dim=3, batch_size=8, models_per_step=2,
                eval_every=6)
    return config.MetaConfig(**{**base, **kw})


def test_theta_starts_at_the_signatures_whatever_the_seed(pop_root, tmp_path):
    data = load_population(pop_root, with_test=False)
    starts = []
    for seed in (0, 1):
        tr = DynamoTrainer(_cfg(tmp_path, seed=seed), data)
        assert tr.embeddings.theta_matrix().abs().max() == 0  # Algorithm 1's 0 until the first step
        tr.start_theta()
        starts.append(tr.embeddings.theta_matrix())
    torch.testing.assert_close(starts[0], starts[1])
    th = starts[0]
    assert float(th.pow(2).sum(1).mean().sqrt()) == pytest.approx(_cfg(tmp_path).theta_init_scale, rel=1e-4)
    # 4 models in d=3: the top-3 components hold every centred signature, so theta's pairwise distances
    # are the signatures' (first 64 probe examples, as ``start_theta`` reads them) up to one scale
    sigs = torch.stack([signature.output_signature(data.probe[m].outputs[:64], "kl") for m in data.model_ids])
    ratio = torch.pdist(th.double()) / torch.pdist(sigs)
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-4, atol=0)
    paper = DynamoTrainer(_cfg(tmp_path, method="paper"), data)
    paper.fit(steps=1)
    assert not paper._theta_started


# losses of this 12-step run before the varpro recipe existed (commit 3e8840c, Algorithm 1 as published)
PAPER_LOSSES = [1.1346932649612427, 1.1620820760726929, 1.0303089618682861, 1.0489864349365234, 0.9566114544868469,
                1.1532752513885498, 1.066571593284607, 0.8921973705291748, 0.923112690448761, 0.9443899393081665,
                0.9019481539726257, 1.0104767084121704]


def test_the_paper_recipe_reproduces_its_earlier_losses(digit_parity_root, tmp_path):
    data = load_population(digit_parity_root, with_test=False)
    torch.set_num_threads(1)
    losses = [r["loss"] for r in DynamoTrainer(_cfg(tmp_path, method="paper"), data).fit()]
    np.testing.assert_allclose(losses, PAPER_LOSSES, rtol=1e-3)
    varpro = [r["loss"] for r in DynamoTrainer(_cfg(tmp_path), data).fit()]
    assert not np.allclose(varpro, PAPER_LOSSES, rtol=1e-2)


def test_varpro_run_resumes_exactly(pop_root, tmp_path):
    data = load_population(pop_root, with_test=False)
    cfg = _cfg(tmp_path, steps=30)
    full = [r["loss"] for r in DynamoTrainer(cfg, data).fit()]
    half = DynamoTrainer(cfg, data)
    half.fit(steps=15)
    half.save(tmp_path / "ck.pt")
    resumed = DynamoTrainer(cfg, data)
    resumed.restore(tmp_path / "ck.pt")
    np.testing.assert_allclose([r["loss"] for r in resumed.fit()], full[15:], rtol=1e-5, atol=1e-6)
    assert not resumed._theta_started  # a resumed run keeps its theta, never restarts it


def test_theta_readout_starts_as_the_papers_and_readout_is_the_forwards_head():
    spec = ArchSpec(arch="gru", input_kind="sequence", input_shape=(7, 3), num_classes=4)
    torch.manual_seed(0)
    film = MetaRNN(spec, 6, 2, {"a": 4}, theta_readout=True)
    torch.manual_seed(0)
    plain = MetaRNN(spec, 6, 2, {"a": 4})
    x, theta = torch.randn(5, 7, 3), torch.randn(5, 2)
    torch.testing.assert_close(film(x, theta)[1]["a"], plain(x, theta)[1]["a"])  # A = B = 0 at the start
    with torch.no_grad():
        film.readout_film.normal_()
    hs, outs = film(x, theta)
    assert not torch.allclose(outs["a"], plain(x, theta)[1]["a"])
    for k in range(5):  # the analyses' G~ at theta (fixed points, valence) is the forward pass's head
        torch.testing.assert_close(film.readout("a", theta[k])(hs[0][k]), outs["a"][k])
    assert film.theta_weights()[-1] is film.readout_film  # under the low-rank prior too


def test_task_names_with_dots_are_heads_and_round_trip():
    spec = ArchSpec(arch="gru", input_kind="sequence", input_shape=(7, 3), num_classes=4)
    groups = {"npz:/data/set.v1.npz": 3, "mnist1d": 10, "odd%2E": 2}
    meta = MetaRNN(spec, 6, 2, groups)
    assert sorted(meta.heads) == sorted(groups) and all(g in meta.heads for g in groups)
    _, outs = meta(torch.randn(2, 7, 3), torch.randn(2, 2))
    assert {g: o.shape[-1] for g, o in outs.items()} == groups
    again = MetaRNN(spec, 6, 2, groups)
    again.load_state_dict(meta.state_dict())
    torch.testing.assert_close(again.heads["npz:/data/set.v1.npz"].weight, meta.heads["npz:/data/set.v1.npz"].weight)
    assert "heads.mnist1d.weight" in meta.state_dict()  # plain names keep their keys: earlier runs load


def test_shards_of_different_tasks_start_where_the_whole_population_starts(digit_parity_root, tmp_path, monkeypatch):
    """Two workers, one holding only 10-class models and one only 2-class ones, lay out the same signature
    space and, with their moments summed (what the all-reduce does), give each model the theta that one
    process over the whole population gives it."""
    root = digit_parity_root
    whole = DynamoTrainer(_cfg(tmp_path), load_population(root, with_test=False))
    whole.start_theta()
    want = dict(zip(whole.embeddings.model_ids, whole.embeddings.theta_matrix()))
    all_rows = whole.data.rows
    shards = [[m for m in want if m.startswith(g)] for g in ("digit", "parity")]
    trainers = [DynamoTrainer(_cfg(tmp_path), load_population(root, ids, with_test=False), all_rows, rank=k)
                for k, ids in enumerate(shards)]
    seen = {}
    real = signature.principal_theta

    def capture(sigs, *args, **kwargs):
        seen[len(seen)] = sigs
        return real(sigs, *args, **kwargs)

    monkeypatch.setattr(signature, "principal_theta", capture)
    for tr in trainers:
        tr.start_theta()
    assert seen[0].shape[1] == seen[1].shape[1]  # one layout whatever tasks a shard holds

    def moments(s):
        return torch.cat([s.sum(0), (s.T @ s).reshape(-1), torch.tensor([float(len(s))], dtype=torch.float64)])

    for k, tr in enumerate(trainers):
        other = seen[1 - k]
        monkeypatch.setattr(tr, "_all_reduce", lambda other=other: (lambda m: m + moments(other)))
        tr.start_theta()
        for m, th in zip(tr.embeddings.model_ids, tr.embeddings.theta_matrix()):
            torch.testing.assert_close(th, want[m], rtol=1e-4, atol=1e-5)


def test_the_last_report_has_v_solved_on_each_models_whole_training_split(pop_root, tmp_path):
    """Before the final report (its checkpoint, outputs and metrics), every V_n is re-solved on all of its
    model's training probe rows: a direct least-squares fit of the meta states there, and a better fit of
    that split than the last visit's proximal solve on one batch (control: the trainer before the refit)."""
    from dynamo_dist.meta.trainer import fit_with_reports

    data = load_population(pop_root, with_test=False)
    cfg = _cfg(tmp_path, steps=10, eval_every=100)
    tr = DynamoTrainer(cfg, data)
    seen = {}

    def report(records, final):
        seen[final] = [[p.detach().clone() for p in tr.embeddings.parameters_of(i)[1:]] for i in range(4)]

    tr.fit(steps=9)
    last_visit = [[p.detach().clone() for p in tr.embeddings.parameters_of(i)[1:]] for i in range(4)]
    fit_with_reports(tr, report)
    assert list(seen) == [True]
    for i, mid in enumerate(data.model_ids):
        idx = torch.from_numpy(tr._train_idx[data.rows[i]["task"]])
        x, lengths = data.probe_inputs[data.rows[i]["task"]].x[idx], data.probe_inputs[data.rows[i]["task"]].lengths[idx]
        with torch.no_grad():
            hs, _ = tr.meta(x, tr.embeddings.theta[i].detach().expand(len(idx), -1))
        h, y = hs[0].reshape(-1, 16).double(), data.probe[mid].hiddens[0][idx].float().reshape(-1, 8).double()
        xs = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        sol = _augmented_lstsq(h, y, REFIT_RIDGE * float(torch.trace(xs.T @ xs / len(h))) / 17)
        w, b = seen[True][i]
        # float32 products summed over the split: agreement to ~1e-3 (an unregularised fit differs by ~1)
        torch.testing.assert_close(w.double(), sol[:-1].T, rtol=3e-2, atol=3e-3)
        torch.testing.assert_close(b.double(), sol[-1], rtol=3e-2, atol=3e-3)

        def sse(w, b):
            return float(((h @ w.double().T + b.double()) - y).pow(2).sum())

        assert sse(w, b) < sse(*last_visit[i])
    paper = DynamoTrainer(_cfg(tmp_path, method="paper", steps=3), data)
    assert not paper.solves_maps  # the published recipe's V are AdamW's to the end


def test_output_temperature_is_the_kl_of_sharpened_distributions():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(5, 4, 6, generator=g), torch.randn(5, 4, 6, generator=g) * 3
    from dynamo_dist.meta.objective import output_loss

    for t in (1.0, 0.25):
        p, q = F.softmax(target / t, -1), F.log_softmax(pred / t, -1)
        by_hand = (p * (p.log() - q)).sum(-1).mean(1)
        torch.testing.assert_close(output_loss(pred, target, "kl", None, t), by_hand)
    # sharper distributions: a decision the meta output gets wrong costs more than at T = 1
    assert float(output_loss(pred, target, "kl", None, 0.25).mean()) > float(output_loss(pred, target).mean())
    assert config.MetaConfig().temperature == 0.25 and config.MetaConfig(method="paper").temperature == 1.0
    assert config.MetaConfig(method="paper", output_temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError):
        config.parse(config.MetaConfig, {"output_temperature": 0})


def test_a_run_records_its_temperature_and_runs_from_before_load_as_trained(pop_root, tmp_path):
    import yaml

    from dynamo_dist.meta.local import run_meta_local
    from dynamo_dist.meta.outputs import load_meta_run

    out = tmp_path / "run"
    run_meta_local(_cfg(out, steps=4, eval_every=4), pop_root, progress=False)
    written = yaml.safe_load((out / "meta_config.yaml").read_text())
    assert (written["method"], written["output_temperature"]) == ("varpro", 0.25)
    assert load_meta_run(out).cfg.temperature == 0.25
    del written["output_temperature"]  # a varpro run from before the temperature existed trained at T = 1
    (out / "meta_config.yaml").write_text(yaml.safe_dump(written))
    assert (load_meta_run(out).cfg.method, load_meta_run(out).cfg.temperature) == ("varpro", 1.0)
    # a run written before meta.method and meta.output_temperature existed: Algorithm 1 at T = 1 trained it
    run_meta_local(_cfg(out, steps=4, eval_every=4, method="paper"), pop_root, progress=False)
    written = yaml.safe_load((out / "meta_config.yaml").read_text())
    del written["method"], written["output_temperature"]
    (out / "meta_config.yaml").write_text(yaml.safe_dump(written))
    old = load_meta_run(out).cfg
    assert (old.method, old.temperature) == ("paper", 1.0)
