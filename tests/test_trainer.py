"""Single-process DYNAMO on tiny real populations (MNIST-1D GRUs, digit+parity heads, digits ResNets)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynamo_dist import config
from dynamo_dist.meta import checkpoint, outputs
from dynamo_dist.meta.local import run_meta_local
from dynamo_dist.population import train as population
from dynamo_dist.data import store
from dynamo_dist.meta.metrics import evaluate, summarize
from dynamo_dist.meta.trainer import DynamoTrainer, load_population

@pytest.fixture(scope="module")
def pop_root(digit_parity_root):
    return digit_parity_root  # conftest: 2 digit + 2 parity GRUs


def _meta_cfg(root, tmp, **kw):
    base = dict(output_dir=str(tmp), steps=12, hidden_size=16, embedding_dim=3,
                batch_size=8, models_per_step=2, eval_every=6)
    return config.MetaConfig(**{**base, **kw})


def test_population_manifest_and_inputs(pop_root):
    rows = store.manifest_rows(pop_root)
    assert [r["model_id"] for r in rows] == ["digit-s000", "digit-s001", "parity-s000", "parity-s001"]
    assert {r["num_classes"] for r in rows if r["group"] == "parity"} == {2}
    probe = store.read_inputs(pop_root, "mnist1d", "probe")
    assert probe.x.shape == (96, 40, 1)
    torch.testing.assert_close(store.read_inputs(pop_root, "mnist1d_parity", "probe").x, probe.x)


def test_same_seed_same_losses_and_different_seed_differs(pop_root, tmp_path):
    data = load_population(pop_root, with_test=False)
    a = [r["loss"] for r in DynamoTrainer(_meta_cfg(pop_root, tmp_path), data).fit()]
    b = [r["loss"] for r in DynamoTrainer(_meta_cfg(pop_root, tmp_path), data).fit()]
    c = [r["loss"] for r in DynamoTrainer(_meta_cfg(pop_root, tmp_path, seed=1), data).fit()]
    assert a == b
    assert a != c


def test_training_reduces_loss_and_checkpoint_resumes_exactly(pop_root, tmp_path):
    data = load_population(pop_root, with_test=False)
    cfg = _meta_cfg(pop_root, tmp_path, steps=40, batch_size=16)
    full = DynamoTrainer(cfg, data)
    losses = [r["loss"] for r in full.fit()]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    half = DynamoTrainer(cfg, data)
    half.fit(steps=20)
    half.save(tmp_path / "ck.pt")
    resumed = DynamoTrainer(cfg, data)
    resumed.restore(tmp_path / "ck.pt")
    rest = [r["loss"] for r in resumed.fit()]
    np.testing.assert_allclose(rest, losses[20:], rtol=1e-5, atol=1e-6)
    # the same through V tables in files (meta.table_bytes=0): saved file to file, restored exactly
    on_disk = DynamoTrainer(cfg.replace(table_bytes=0), data)
    on_disk.fit(steps=20)
    assert on_disk.embeddings.on_disk
    on_disk.save(tmp_path / "ck-disk.pt")
    again = DynamoTrainer(cfg, data)
    again.restore(tmp_path / "ck-disk.pt")
    assert torch.equal(again.embeddings.maps_exp_avg, half.embeddings.maps_exp_avg)
    np.testing.assert_allclose([r["loss"] for r in again.fit()], losses[20:], rtol=1e-5, atol=1e-6)


def test_meta_run_outputs_and_reload(pop_root, tmp_path):
    cfg = _meta_cfg(pop_root, tmp_path / "meta", steps=20)
    summary = run_meta_local(cfg, pop_root, progress=False)
    assert summary["num_models"] == 4
    for key in ("mean_agreement", "mean_hidden_r2", "mean_meta_accuracy"):
        assert np.isfinite(summary[key])
    emb = pq.read_table(tmp_path / "meta" / "embeddings.parquet")
    assert emb.column("model_id").to_pylist() == ["digit-s000", "digit-s001", "parity-s000", "parity-s001"]
    assert emb.column("group").to_pylist() == ["digit", "digit", "parity", "parity"]
    assert len(emb.column("theta")[0].as_py()) == 3
    run = outputs.load_meta_run(tmp_path / "meta")
    np.testing.assert_allclose(run.theta(), np.array(emb.column("theta").to_pylist()), rtol=1e-6)
    assert set(run.meta.heads) == {"mnist1d", "mnist1d_parity"}
    # V tables in files (meta.table_bytes=0): the checkpoint, written file to file, holds the same values
    run_meta_local(cfg.replace(output_dir=str(tmp_path / "meta-disk"), table_bytes=0), pop_root, progress=False)
    (_, want), (_, got) = (checkpoint.read_model_state(tmp_path / d / "checkpoint") for d in ("meta", "meta-disk"))
    assert sorted(got) == sorted(want)
    for m in want:
        assert torch.equal(got[m]["theta"], want[m]["theta"]) and want[m]["maps"].keys() == got[m]["maps"].keys()
        assert all(torch.equal(got[m]["maps"][k], v) for k, v in want[m]["maps"].items())


def _recorded_from_the_meta_model(tr) -> dict:
    """Test trajectories that the meta-model emulates exactly: for each model, its hidden states at
    theta_n cut to the base width (V_n = [I | 0], set by hand) and its head's outputs at theta_n."""
    data, emb, test = tr.data, tr.embeddings, {}
    with torch.no_grad():
        for i, row in enumerate(data.rows):
            emb.theta[i].copy_(torch.tensor([i - 1.5, 1.0, -0.5 * i]))  # distinct, non-zero thetas
            (v,) = emb.maps[i]
            v.weight.copy_(torch.eye(*v.weight.shape))
            v.bias.zero_()
            x = data.test_inputs[row["task"]].x[: data.test[row["model_id"]].num_examples]
            (h,), outs = tr.meta.eval()(x, emb.theta[i].detach()[None].expand(len(x), -1))
            test[row["model_id"]] = store.Trajectory(row["model_id"], [h[..., : v.weight.shape[0]].clone()],
                                                     outs[row["task"]].clone())
    return test


def test_metrics_known_answers_for_a_perfect_emulator(pop_root, tmp_path):
    """Base trajectories recorded from the meta-model itself score agreement 1 and hidden R^2 1;
    known distortions of them score the R^2 and agreement computed by hand."""
    import dataclasses

    from dynamo_dist.meta.objective import step_mask

    data = load_population(pop_root)
    tr = DynamoTrainer(_meta_cfg(pop_root, tmp_path), data)
    assert summarize(evaluate(tr, "test"))["mean_hidden_r2"] < 0.5  # the real, unfitted population
    perfect = _recorded_from_the_meta_model(tr)
    tr.data = dataclasses.replace(data, test=perfect)
    per_model = evaluate(tr, "test")
    assert sorted(per_model) == sorted(perfect)
    for mid, m in per_model.items():
        assert m["agreement"] == 1.0 and m["hidden_r2"] == pytest.approx(1.0, abs=1e-6), mid
        assert m["meta_accuracy"] == m["base_accuracy"]

    # Distorted copies, each with an answer known in closed form:
    # * base = p + (p - mean_p) on half the units (mean over valid steps and examples, per unit), base = p on
    #   the others: pooled R^2 = 1 - S_a / (4 S_a + S_b), S the sum of squares around the unit means;
    #   an uncentred SST, a per-unit mean of R^2s or SST around one grand mean give other values.
    # * the final-step outputs of the first k examples rolled by one class: agreement = 1 - k / n.
    distorted, want_r2, want_agree = {}, {}, {}
    for mid, traj in perfect.items():
        row = data.row(mid)
        p = traj.hiddens[0]
        n, t_len, units = p.shape
        mask = step_mask(data.test_inputs[row["task"]].lengths[:n], t_len)
        valid = p[mask].double()  # (valid steps, units)
        centred = p.double() - valid.mean(0)
        half = units // 2
        base = p.double().clone()
        base[..., :half] += centred[..., :half]
        ss = (valid - valid.mean(0)).pow(2).sum(0)
        want_r2[mid] = 1.0 - float(ss[:half].sum()) / float(4 * ss[:half].sum() + ss[half:].sum())
        k = n // 4
        outputs = traj.outputs.clone()
        outputs[:k, -1] = torch.eye(outputs.shape[-1])[(traj.outputs[:k, -1].argmax(-1) + 1) % outputs.shape[-1]]
        want_agree[mid] = 1.0 - k / n
        distorted[mid] = store.Trajectory(mid, [base.float()], outputs)
    tr.data = dataclasses.replace(data, test=distorted)
    for mid, m in evaluate(tr, "test").items():
        assert m["hidden_r2"] == pytest.approx(want_r2[mid], abs=1e-5), mid
        assert m["agreement"] == pytest.approx(want_agree[mid]), mid
        assert 0.2 < want_r2[mid] < 0.9  # the control: far from 1, so a metric blind to the distortion fails

    # a zero map predicts h = 0: R^2 = -n * sum(mean^2) / SST <= 0 (exactly, pooled)
    tr.data = dataclasses.replace(data, test=perfect)
    with torch.no_grad():
        for i in range(len(data.rows)):
            for v in tr.embeddings.maps[i]:
                v.weight.zero_()
                v.bias.zero_()
    for mid, m in evaluate(tr, "test").items():
        h = perfect[mid].hiddens[0]
        valid = h[step_mask(data.test_inputs[data.row(mid)["task"]].lengths[: len(h)], h.shape[1])].double()
        sst = float((valid - valid.mean(0)).pow(2).sum())
        assert m["hidden_r2"] == pytest.approx(1.0 - float(valid.pow(2).sum()) / sst, rel=1e-5), mid
        assert m["hidden_r2"] <= 0.0


def test_resnet_population_trains_meta_resnet(tmp_path):
    root = tmp_path / "cnn"
    cfg = config.PopulationConfig(
        root=str(root), num_probe=32, num_test=16,
        groups=(config.GroupSpec(name="r", task="digits", arch="resnet10", num_seeds=2, epochs=1, batch_size=64),))
    population.run_local(cfg, progress=False)
    traj = store.read_trajectory(str(root), "r-s000", "probe")
    assert [tuple(h.shape) for h in traj.hiddens] == [(32, 64, 8, 8), (32, 128, 4, 4), (32, 256, 2, 2), (32, 512, 1, 1)]
    mcfg = _meta_cfg(str(root), tmp_path / "m", steps=3, batch_size=4, resnet_arch="resnet10")
    tr = DynamoTrainer(mcfg, load_population(str(root)))
    hist = tr.fit()
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    assert set(summarize(evaluate(tr, "test"))) >= {"mean_agreement", "mean_hidden_r2"}
    # meta.table_bytes below the V tables (~1.4 MB of maps a model here): the same run on tables in files
    on_disk = DynamoTrainer(mcfg.replace(table_bytes=0), load_population(str(root)))
    assert on_disk.embeddings.on_disk and not tr.embeddings.on_disk
    assert [h["loss"] for h in on_disk.fit()] == [h["loss"] for h in hist]
    assert torch.equal(on_disk.embeddings.theta_matrix(), tr.embeddings.theta_matrix())
    assert torch.equal(on_disk.embeddings.maps_exp_avg_sq, tr.embeddings.maps_exp_avg_sq)


@pytest.mark.parametrize("method", ["paper", "varpro"])
def test_the_embedding_penalty_shrinks_theta_and_is_reported(pop_root, tmp_path, method):
    data = load_population(pop_root, with_test=False)
    runs = {}
    for alpha in (0.0, 1.0):
        cfg = _meta_cfg(pop_root, tmp_path, steps=40, embedding_lr=1e-2, embedding_penalty=alpha, method=method)
        trainer = DynamoTrainer(cfg, data)
        runs[alpha] = (trainer.fit(), trainer.embeddings.theta_matrix().norm(dim=1))
    (plain, theta0), (penalised, theta1) = runs[0.0], runs[1.0]
    assert "loss_penalty" not in plain[-1] and penalised[-1]["loss_penalty"] > 0
    # same seed and batches; only alpha differs. paper: theta grows from 0 (measured 0.12 vs 0.19);
    # varpro: theta starts at the signatures (RMS norm 1), 40 steps of the penalty pull it in a little
    factor = 0.8 if method == "paper" else 1.0
    assert float(theta1.mean()) < factor * float(theta0.mean())


def _per_model_form(states) -> dict:
    """The ``{model_id: state}`` shard layout of runs before the table form, as plain copies."""
    return {m: {"theta": s["theta"].clone(), "maps": {k: v.clone() for k, v in s["maps"].items()},
                "opt": [None if o is None else {k: v.clone() for k, v in o.items()} for o in s["opt"]]}
            for m, s in states.items()}


def test_table_form_shards_and_earlier_per_model_shards_read_alike(pop_root, tmp_path):
    """A shard is a few stacked tensors whatever N; every reader gives the same values from it as
    from a shard in the per-model form of earlier runs, also split over two files (another W)."""
    from dynamo_dist.meta import checkpoint

    data = load_population(pop_root, with_test=False)
    tr = DynamoTrainer(_meta_cfg(pop_root, tmp_path, steps=6), data)
    tr.fit()
    table = tr.shard_state()
    ids = tr.embeddings.model_ids
    assert sorted(table) == sorted(ids) and table[ids[0]]["opt"][0] is not None
    shared = {**tr.shared_state(), "history": [], "model_ids": ids, "config": tr.cfg.model_dump(mode="json")}
    raw = checkpoint._plain(table)
    halves = [set(ids[:1]), set(ids[1:])]
    for form in ("tables", "per-model"):
        d = tmp_path / form
        d.mkdir()
        if form == "tables":  # one file, as one worker wrote it
            checkpoint.write_shard(d, 0, table, shared={**shared, "shards": [checkpoint.shard_file(0)]})
            saved = torch.load(d / checkpoint.shard_file(0), weights_only=True)
            assert saved["layout"] == "tables" and len(saved["tables"]) == 7  # 7 tensors for any N
        else:  # two files, per-model dicts
            for r, part in enumerate(halves):
                checkpoint.write_shard(d, r, _per_model_form({m: table[m] for m in part}),
                                       shared={**shared, "shards": [checkpoint.shard_file(0),
                                                                     checkpoint.shard_file(1)]} if r == 0 else None)
        _, per_model, _ = checkpoint.read_sharded(d)
        _, some, _ = checkpoint.read_sharded(d, model_ids=ids[1:3])
        assert sorted(some) == sorted(ids[1:3])
        thetas = checkpoint.read_thetas(d)
        _, model_state = checkpoint.read_model_state(d)
        checkpoint.write_inference_copy(d, tmp_path / f"{form}-inference")
        _, inference = checkpoint.read_model_state(tmp_path / f"{form}-inference")
        for m in ids:
            want = table[m]
            for got in (per_model[m], model_state[m], inference[m], *([some[m]] if m in some else [])):
                assert torch.equal(got["theta"], want["theta"]) and got["maps"].keys() == want["maps"].keys()
                assert all(torch.equal(got["maps"][k], want["maps"][k]) for k in want["maps"])
            assert torch.equal(thetas[m], want["theta"])
            for o, w in zip(per_model[m]["opt"], want["opt"]):
                assert (o is None) == (w is None) and (o is None or all(torch.equal(o[k], w[k]) for k in w))
        # and a trainer loads either back exactly
        again = DynamoTrainer(_meta_cfg(pop_root, tmp_path, steps=6), data)
        again.load_shard_state(per_model)
        for k, v in again.embeddings.table_state()["tables"].items():
            assert torch.equal(v, raw["tables"][k]), (form, k)
