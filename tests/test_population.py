"""Unit tests of the plain (single-process) population code: spec expansion, training, recording, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dynamo_dist import config, population, store, zoo
from dynamo_dist.config import GroupSpec, PopulationConfig

GROUPS = (
    GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=8, num_seeds=2, epochs=1, batch_size=64),
    GroupSpec(name="b", task="mnist1d", arch="rnn", hidden_size=12, train_fraction=0.5, num_seeds=1, epochs=3,
              batch_size=64, every_epoch=True),
)
IDS = ["a-s000", "a-s001", "b-s000-e001", "b-s000-e002", "b-s000-e003"]
NUM_PROBE, NUM_TEST = 48, 40


def _cfg(root, groups=GROUPS, **kw) -> PopulationConfig:
    return PopulationConfig(root=str(root), groups=groups, num_examples=1000, num_probe=NUM_PROBE,
                            num_test=NUM_TEST, **kw)


@pytest.fixture(scope="module")
def pop(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("pop") / "root")
    rows = population.run_local(cfg, progress=False)
    return cfg, rows


# ---------------------------------------------------------------- spec


def test_expand_gives_stable_readable_unique_ids():
    cfg = _cfg("unused")
    jobs = population.expand(cfg)
    assert [j.model_id for j in jobs] == ["a-s000", "a-s001", "b-s000-e003"]
    assert [m for j in jobs for m in j.member_ids()] == IDS
    assert population.expand(cfg) == jobs  # stable
    shifted = _cfg("unused", groups=(GROUPS[0].replace(seed_offset=7, num_seeds=1),))
    assert [j.model_id for j in population.expand(shifted)] == ["a-s007"]


def test_duplicate_group_names_are_rejected():
    with pytest.raises(ValueError, match="duplicate group name"):
        _cfg("unused", groups=(GROUPS[0], GROUPS[0].replace(hidden_size=4)))


def test_duplicate_model_ids_are_rejected_before_touching_disk(tmp_path):
    # model_construct skips the config's own check, so expand's check is what is tested here
    cfg = PopulationConfig.model_construct(**{**_cfg(tmp_path / "root").__dict__, "groups": (GROUPS[0], GROUPS[0])})
    with pytest.raises(ValueError, match=r"duplicate model ids \['a-s000', 'a-s001'\]"):
        population.init_population(cfg)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("field,value", [
    ("train_fraction", 0), ("train_fraction", 1.5), ("num_seeds", 0), ("arch", "transformer"),
    ("hidden_size", 0), ("epochs", 0), ("lr", 0.0), ("name", "bad/name"),
])
def test_invalid_group_values_name_the_field(field, value):
    data = {"root": "r", "groups": [{"name": "g", field: value}]}
    with pytest.raises(ValueError, match=rf"groups\.0\.{field}") as err:
        config.parse(PopulationConfig, data)
    assert repr(value) in str(err.value) or field == "name"


@pytest.mark.parametrize("field,value", [("dtype", "float64"), ("num_probe", 0), ("cpus_per_actor", 0),
                                         ("num_examples", 10), ("num_actors", 0)])
def test_invalid_population_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        config.parse(PopulationConfig, {"root": "r", field: value})


def test_unknown_task_is_value_error(tmp_path):
    cfg = _cfg(tmp_path, groups=(GROUPS[0].replace(task="no-such-task"),))
    with pytest.raises(ValueError, match="no-such-task"):
        population.train_and_record(str(tmp_path), cfg, population.expand(cfg)[0])


# ---------------------------------------------------------------- a trained population


def test_manifest_has_exactly_the_spec_models_with_their_labels(pop):
    cfg, rows = pop
    assert [r["model_id"] for r in rows] == IDS
    assert store.manifest_rows(cfg.root) == rows
    by_id = {r["model_id"]: r for r in rows}
    assert by_id["a-s001"]["group"] == "a" and by_id["a-s001"]["seed"] == 1 and by_id["a-s001"]["epoch"] == 1
    assert by_id["b-s000-e002"]["arch"] == "rnn" and by_id["b-s000-e002"]["train_fraction"] == 0.5
    assert all(r["status"] == "complete" for r in rows)
    assert json.loads(store.Layout.at(cfg.root).info.read_text())["schema_version"] == store.SCHEMA_VERSION


def test_accuracy_in_manifest_is_the_saved_models_test_accuracy(pop):
    cfg, rows = pop
    task = population.task_for(cfg, "mnist1d")
    for r in rows:
        model = zoo.load(store.Layout.at(cfg.root).path(r["weights_path"]))
        assert r["test_accuracy"] == pytest.approx(population.accuracy(model, task.test.x, task.test.y))


def test_trajectories_equal_a_forward_pass_of_the_saved_weights(pop):
    cfg, rows = pop
    layout = store.Layout.at(cfg.root)
    for split, n in (("probe", NUM_PROBE), ("test", NUM_TEST)):
        inputs = store.read_inputs(cfg.root, "mnist1d", split)
        assert len(inputs) == n
        for r in rows:
            model = zoo.load(layout.path(r["weights_path"]))
            with torch.no_grad():
                hs, out = model.trajectories(inputs.x)
            traj = store.read_trajectory(cfg.root, r["model_id"], split)
            assert traj.hiddens[0].shape == (n, 40, r["hidden_size"]) and traj.outputs.shape == (n, 40, 10)
            torch.testing.assert_close(traj.hiddens[0], hs[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(traj.outputs, out, rtol=0, atol=1e-6)


def test_every_epoch_group_yields_one_member_per_epoch_and_last_equals_plain_training(pop, tmp_path):
    cfg, rows = pop
    members = [r for r in rows if r["group"] == "b"]
    assert [r["epoch"] for r in members] == [1, 2, 3]
    layout = store.Layout.at(cfg.root)
    weights = [load_file(str(layout.path(r["weights_path"]))) for r in members]
    assert not torch.equal(weights[0]["readout.weight"], weights[2]["readout.weight"])  # checkpoints differ
    # the last epoch's member is the model that training without every_epoch gives (same seed)
    plain = population.train_model(GROUPS[1].replace(every_epoch=False), population.task_for(cfg, "mnist1d"), 0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(weights[2][k], v, rtol=0, atol=0)


def test_no_temp_files_are_left(pop):
    cfg, _ = pop
    assert not [p for p in store.Layout.at(cfg.root).root.rglob("*") if p.name.endswith(".tmp")]


def test_group_summary_known_answer():
    rows = [{"group": "x", "test_accuracy": a} for a in (0.5, 0.7)] + [{"group": "w", "test_accuracy": 0.9}]
    out = population.group_summary(rows)
    assert [g["group"] for g in out] == ["w", "x"]
    assert out[1]["count"] == 2 and out[1]["mean_accuracy"] == pytest.approx(0.6)
    assert out[1]["std_accuracy"] == pytest.approx(0.1)


# ---------------------------------------------------------------- resume and bad roots


def test_rerun_skips_completed_models_and_keeps_their_files(pop):
    cfg, rows = pop
    layout = store.Layout.at(cfg.root)
    mtimes = {r["model_id"]: layout.path(r["weights_path"]).stat().st_mtime_ns for r in rows}
    assert population.pending_jobs(cfg.root, cfg) == []
    assert population.run_local(cfg, progress=False) == rows
    assert {r["model_id"]: layout.path(r["weights_path"]).stat().st_mtime_ns for r in rows} == mtimes


def test_model_with_a_missing_file_is_pending_again(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0],))
    population.run_local(cfg, progress=False)
    layout = store.Layout.at(cfg.root)
    layout.path(layout.trajectory_rel("a-s001", "test")).unlink()
    assert [j.model_id for j in population.pending_jobs(cfg.root, cfg)] == ["a-s001"]
    keep = layout.path(layout.weights_rel("a-s000")).stat().st_mtime_ns
    population.run_local(cfg, progress=False)
    assert population.pending_jobs(cfg.root, cfg) == []
    assert layout.path(layout.weights_rel("a-s000")).stat().st_mtime_ns == keep


def test_incompatible_schema_version_is_refused_and_nothing_overwritten(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0].replace(num_seeds=1),))
    population.run_local(cfg, progress=False)
    layout = store.Layout.at(cfg.root)
    info = json.loads(layout.info.read_text())
    layout.info.write_text(json.dumps({**info, "schema_version": 0}))
    files = {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="schema_version=0"):
        population.run_local(cfg.replace(groups=(GROUPS[0],)), progress=False)
    assert {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()} == files


def test_unwritable_root_is_value_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        population.run_local(_cfg(tmp_path / "file" / "root"), progress=False)


# ---------------------------------------------------------------- users' own models


def test_add_models_records_users_modules_like_trained_ones(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0],))
    task = population.task_for(cfg, "mnist1d")
    torch.manual_seed(0)
    mine = {"mine-1": zoo.build(population.arch_spec(GROUPS[0], task)),
            "mine-2": zoo.build(population.arch_spec(GROUPS[0].replace(hidden_size=6), task))}
    rows = population.add_models(cfg.root, mine, "mnist1d", cfg=cfg, labels={"mine-2": {"seed": 2}})
    assert [r["model_id"] for r in store.manifest_rows(cfg.root)] == ["mine-1", "mine-2"]
    assert rows[1]["seed"] == 2 and rows[0]["group"] == "user"
    x = store.read_inputs(cfg.root, "mnist1d", "probe").x
    for mid, m in mine.items():
        with torch.no_grad():
            hs, _ = m.eval().trajectories(x)
        torch.testing.assert_close(store.read_trajectory(cfg.root, mid).hiddens[0], hs[0], rtol=0, atol=1e-6)


def test_model_with_nan_weights_is_refused_without_files(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0],))
    model = zoo.build(population.arch_spec(GROUPS[0], population.task_for(cfg, "mnist1d")))
    with torch.no_grad():
        model.readout.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        population.add_models(cfg.root, {"broken": model}, "mnist1d", cfg=cfg)
    assert not list(store.Layout.at(cfg.root).root.rglob("*broken*"))
