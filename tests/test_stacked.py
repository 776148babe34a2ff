"""Stacked base-model training (``population.models_per_actor``): K models trained together are
the models training each alone gives — weights and recorded trajectories within 1e-5."""

from __future__ import annotations

import pytest
import torch

from dynamo_dist import config, zoo
from dynamo_dist.config import GroupSpec, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.population import stacked
from dynamo_dist.population import train as population

TOL = dict(rtol=0, atol=1e-5)


def _mixed(arch: str, task: str = "mnist1d") -> list[GroupSpec]:
    """Three recipes of one stack key: different lr, weight decay and data fraction (so a
    different number of batches per epoch, and a smaller last batch)."""
    base = GroupSpec(name="a", task=task, arch=arch, hidden_size=8, epochs=2, batch_size=32)
    return [base, base.replace(name="b", lr=4e-3, train_fraction=0.37), base.replace(name="c", weight_decay=0.05)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, as population actors run them


@pytest.fixture(scope="module")
def mnist():
    return population.load_task("mnist1d", seed=0, num_examples=300)


@pytest.mark.parametrize("arch", ["gru", "rnn", "lstm"])
def test_stacked_models_equal_models_trained_alone(arch, mnist):
    groups, seeds = _mixed(arch), [3, 1, 4]
    stack = stacked.train_stack(groups, mnist, seeds)
    x = mnist.probe.x[:20]
    for k, (g, seed) in enumerate(zip(groups, seeds)):
        alone = population.train_model(g, mnist, seed)
        mine = stack.state(k)
        assert mine.keys() == alone.state_dict().keys()
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(mine[key], value, **TOL, msg=f"{arch} model {k} {key}")
        (h,), out = population.record(alone, x)
        h_k, out_k = stack.trajectories(x, slice(k, k + 1))
        torch.testing.assert_close(h_k[0], h, **TOL)
        torch.testing.assert_close(out_k[0], out, **TOL)
    # the control: a stack trained with the seeds swapped is not the same models
    other = stacked.train_stack(groups, mnist, [1, 3, 4])
    assert (other.state(0)["rnn.weight_hh_l0"] - stack.state(0)["rnn.weight_hh_l0"]).abs().max() > 1e-2


def test_stacked_token_models_give_the_pad_row_no_gradient():
    task = population.load_task("tweets3", seed=0, num_examples=300)
    groups = [GroupSpec(name="t", task="tweets3", arch="gru", hidden_size=6, embed_dim=5, epochs=1, batch_size=16,
                        train_fraction=f) for f in (1.0, 0.6)]
    stack = stacked.train_stack(groups, task, [0, 1])
    for k, (g, seed) in enumerate(zip(groups, [0, 1])):
        alone = population.train_model(g, task, seed).state_dict()
        for key, value in alone.items():
            torch.testing.assert_close(stack.state(k)[key], value, **TOL, msg=key)
        assert stack.state(k)["embed.weight"][0].abs().max() < 1e-6  # pad row: weight decay only, from 0


def test_groups_that_do_not_stack_are_refused_naming_them(mnist):
    g = _mixed("gru")[0]
    with pytest.raises(ValueError, match=r"groups \['a', 'x'\] do not stack"):
        stacked.train_stack([g, g.replace(name="x", hidden_size=9)], mnist, [0, 1])
    with pytest.raises(ValueError, match="do not stack"):
        stacked.train_stack([g.replace(arch="resnet10")], mnist, [0])


def test_work_units_pack_stackable_jobs_up_to_k_and_leave_the_rest_alone(tmp_path):
    a = GroupSpec(name="a", arch="gru", hidden_size=8, num_seeds=5)
    b = GroupSpec(name="b", arch="gru", hidden_size=8, num_seeds=2, lr=3e-3, train_fraction=0.5)  # stacks with a
    c = GroupSpec(name="c", arch="lstm", hidden_size=8, num_seeds=1)
    d = GroupSpec(name="d", task="fake_images", arch="resnet10", num_seeds=2)
    cfg = PopulationConfig(root=str(tmp_path), groups=(a, c, b, d), models_per_actor=3)
    units = [[j.model_id for j in u] for u in population.work_units(cfg, population.expand(cfg))]
    assert units == [["a-s000", "a-s001", "a-s002"], ["a-s003", "a-s004", "b-s000"], ["c-s000"], ["b-s001"],
                     ["d-s000"], ["d-s001"]]
    assert [len(u) for u in population.work_units(cfg.replace(models_per_actor=1), population.expand(cfg))] == [1] * 10
    with pytest.raises(ValueError, match="models_per_actor"):
        config.parse(PopulationConfig, {"root": "r", "models_per_actor": 0})


def _pop_cfg(root, **kw) -> PopulationConfig:
    groups = (GroupSpec(name="a", arch="gru", hidden_size=8, num_seeds=2, epochs=1, batch_size=64),
              GroupSpec(name="b", arch="gru", hidden_size=8, num_seeds=1, epochs=2, batch_size=64, lr=3e-3,
                        train_fraction=0.5, every_epoch=True))
    return PopulationConfig(root=str(root), groups=groups, num_examples=300, num_probe=24, num_test=16, **kw)


def test_a_stacked_population_records_what_a_sequential_one_does(tmp_path):
    seq = population.run_local(_pop_cfg(tmp_path / "seq"), progress=False)
    stk_cfg = _pop_cfg(tmp_path / "stk", models_per_actor=4)
    timings: dict = {}
    units = population.work_units(stk_cfg, population.expand(stk_cfg))
    assert [len(u) for u in units] == [2, 1]  # a's two seeds together; b (every_epoch, 2 epochs) alone
    population.init_population(stk_cfg, progress=False)
    rows = population.train_and_record_stack(stk_cfg.root, stk_cfg, list(units[0]), timings=timings)
    store.upsert_manifest(stk_cfg.root, rows)
    stk = population.run_local(stk_cfg, progress=False)  # the rest (b), through the same entry point
    assert set(timings) == {"train_s", "record_s", "final_wait_s"} and timings["train_s"] > 0
    assert [r["model_id"] for r in stk] == [r["model_id"] for r in seq] == ["a-s000", "a-s001", "b-s000-e001",
                                                                           "b-s000-e002"]
    for r_seq, r_stk in zip(seq, stk):
        for col in ("group", "seed", "epoch", "train_fraction", "status", "probe_path", "arch", "hidden_size"):
            assert r_stk[col] == r_seq[col], col
        assert abs(r_stk["test_accuracy"] - r_seq["test_accuracy"]) <= 1 / 16
        for split in ("probe", "test"):
            a = store.read_trajectory(stk_cfg.root, r_stk["model_id"], split)
            b = store.read_trajectory(str(tmp_path / "seq"), r_seq["model_id"], split)
            torch.testing.assert_close(a.hiddens[0], b.hiddens[0], **TOL)
            torch.testing.assert_close(a.outputs, b.outputs, **TOL)
        w_stk = zoo.load(store.Layout.at(stk_cfg.root).path(r_stk["weights_path"])).state_dict()
        w_seq = zoo.load(store.Layout.at(tmp_path / "seq").path(r_seq["weights_path"])).state_dict()
        for key in w_seq:
            torch.testing.assert_close(w_stk[key], w_seq[key], **TOL)
    assert store.damage(stk_cfg.root, stk[0]) is None  # sizes recorded, files whole
    assert not population.pending_jobs(stk_cfg.root, stk_cfg)


def test_a_diverging_member_fails_alone_and_its_stack_mates_are_kept(tmp_path):
    cfg = _pop_cfg(tmp_path / "root", models_per_actor=4, max_failed_models=1)
    diverge = cfg.groups[0].replace(name="zz", lr=1e30, num_seeds=1)  # NaN weights -> refused at write
    cfg = cfg.replace(groups=(cfg.groups[0], diverge))
    assert [len(u) for u in population.work_units(cfg, population.expand(cfg))] == [3]
    population.run_local(cfg, progress=False)
    rows = {r["model_id"]: r for r in store.manifest_rows(cfg.root, status=None)}
    assert {m: r["status"] for m, r in rows.items()} == {"a-s000": "complete", "a-s001": "complete", "zz-s000": "failed"}
    assert "NaN" in rows["zz-s000"]["error"]
    assert not list(store.Layout.at(cfg.root).root.rglob("*zz-s000*"))
