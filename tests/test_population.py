"""Unit tests of the plain (single-process) population code: spec expansion, training, recording, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynamo_dist import config, zoo
from dynamo_dist.population import train as population
from dynamo_dist.population import user_models
from dynamo_dist.data import store
from dynamo_dist.data.lock import LOCK_FILE
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


def test_unknown_task_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="task\n.*unknown task 'no-such-task'; known tasks: mnist1d"):
        GROUPS[0].replace(task="no-such-task")
    assert GROUPS[0].replace(task="csv:/data/x.csv").task == "csv:/data/x.csv"  # users' files stay allowed


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


def test_first_recorded_epoch_skips_early_members_and_records_the_same_later_ones(pop, tmp_path):
    cfg, rows = pop
    ref = {r["model_id"]: r for r in rows}
    g = GROUPS[1].replace(first_recorded_epoch=2, num_seeds=2)
    new = population.run_local(_cfg(tmp_path / "root", groups=(g,), models_per_actor=2), progress=False)  # stacked
    assert [r["model_id"] for r in new] == ["b-s000-e002", "b-s000-e003", "b-s001-e002", "b-s001-e003"]
    for r in new[:2]:  # seed 0: the same models as the members of the run that recorded every epoch
        a = load_file(str(store.Layout.at(cfg.root).path(ref[r["model_id"]]["weights_path"])))
        b = load_file(str(store.Layout.at(tmp_path / "root").path(r["weights_path"])))
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    with pytest.raises(ValueError, match="first_recorded_epoch=2 needs every_epoch"):
        GroupSpec(first_recorded_epoch=2)
    with pytest.raises(ValueError, match=r"first_recorded_epoch=4 is after the last epoch \(epochs=3\)"):
        GroupSpec(every_epoch=True, epochs=3, first_recorded_epoch=4)


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
    files = {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    with pytest.raises(ValueError, match="schema_version=0"):
        population.run_local(cfg.replace(groups=(GROUPS[0],)), progress=False)
    assert {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file() and p.name != LOCK_FILE} == files


def test_unwritable_root_is_value_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        population.run_local(_cfg(tmp_path / "file" / "root"), progress=False)


# ---------------------------------------------------------------- users' own models


def test_add_models_records_users_modules_like_trained_ones(tmp_path, capsys):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0],))
    task = population.task_for(cfg, "mnist1d")
    torch.manual_seed(0)
    mine = {"mine-1": zoo.build(population.arch_spec(GROUPS[0], task)),
            "mine-2": zoo.build(population.arch_spec(GROUPS[0].replace(hidden_size=6), task))}
    rows = user_models.add_models(cfg.root, mine, "mnist1d", cfg=cfg, labels={"mine-2": {"seed": 2}})
    assert [r["model_id"] for r in store.manifest_rows(cfg.root)] == ["mine-1", "mine-2"]
    # untrained modules: recorded, with a warning naming each model that scores at chance
    warned = capsys.readouterr().err
    assert all(f"warning: model {m!r} has test accuracy" in warned for m in mine), warned
    assert rows[1]["seed"] == 2 and rows[0]["group"] == "user"
    x = store.read_inputs(cfg.root, "mnist1d", "probe").x
    for mid, m in mine.items():
        with torch.no_grad():
            hs, _ = m.eval().trajectories(x)
        torch.testing.assert_close(store.read_trajectory(cfg.root, mid).hiddens[0], hs[0], rtol=0, atol=1e-6)


def test_the_chance_bound_separates_chance_from_learned():
    labels = torch.arange(10).repeat(50)  # 500 test examples, 10 balanced classes
    chance, bound = user_models.chance_bound(labels)
    assert chance == pytest.approx(0.1) and 0.13 < bound < 0.15  # 0.1 + 3 * sqrt(0.09 / 500)
    assert user_models.chance_bound(torch.tensor([0] * 90 + [1] * 10))[0] == pytest.approx(0.9)  # majority, not 1/C


def test_model_with_nan_weights_is_refused_without_files(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0],))
    model = zoo.build(population.arch_spec(GROUPS[0], population.task_for(cfg, "mnist1d")))
    with torch.no_grad():
        model.readout.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        user_models.add_models(cfg.root, {"broken": model}, "mnist1d", cfg=cfg)
    assert not list(store.Layout.at(cfg.root).root.rglob("*broken*"))


def _image_cfg(root) -> PopulationConfig:
    return PopulationConfig(root=str(root), groups=(GroupSpec(name="img", task="fake_images", arch="resnet10"),),
                            num_examples=200, num_probe=6, num_test=6)


def _small_image_resnet18(num_classes: int = 10):
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net.eval()


def test_add_models_takes_plain_torchvision_resnets(tmp_path):
    cfg = _image_cfg(tmp_path / "root")
    torch.manual_seed(0)
    net = _small_image_resnet18()
    rows = user_models.add_models(cfg.root, {"tv-18": net}, "fake_images", cfg=cfg)
    assert rows[0]["arch"] == "resnet18" and rows[0]["model_id"] == "tv-18"
    x = store.read_inputs(cfg.root, "fake_images", "probe").x
    with torch.no_grad():
        z = net.relu(net.bn1(net.conv1(x)))
        expected = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            z = layer(z)
            expected.append(z)
    got = store.read_trajectory(cfg.root, "tv-18").hiddens
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # the saved weights rebuild the same network
    reloaded = zoo.load(store.Layout.at(cfg.root).path(rows[0]["weights_path"]))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), net(x), rtol=1e-5, atol=1e-5)


def test_add_models_refuses_models_that_do_not_fit_before_writing(tmp_path):
    import torchvision

    cfg = _image_cfg(tmp_path / "root")
    # an ImageNet-layout ResNet is read through hooks (tests/test_user_cnns.py), but its 1,000 classes do not fit
    with pytest.raises(ValueError, match=r"model 'big': logits of shape \(16, 1000\): the task has 10 classes"):
        user_models.add_models(cfg.root, {"ok": _small_image_resnet18(), "big": torchvision.models.resnet18()},
                              "fake_images", cfg=cfg)
    with pytest.raises(ValueError, match="model 'mlp': Sequential is neither a ResNet-like CNN"):
        user_models.add_models(cfg.root, {"mlp": torch.nn.Sequential(torch.nn.Linear(3, 3))}, "fake_images", cfg=cfg)
    with pytest.raises(ValueError, match=r"model 'five'.*num_classes 5 vs 10"):
        user_models.add_models(cfg.root, {"five": _small_image_resnet18(5)}, "fake_images", cfg=cfg)
    assert not (tmp_path / "root").exists()  # nothing written, not even the root


def _user_dir(tmp_path, cfg):
    """A user's directory: one file in our format, two bare state dicts described by architecture.json."""
    from safetensors.torch import save_file

    task = population.task_for(cfg, "mnist1d")
    d = tmp_path / "my-grus"
    d.mkdir()
    torch.manual_seed(1)
    models = {}
    for mid in ("u-1", "u-2"):
        m = zoo.build(population.arch_spec(GROUPS[0].replace(hidden_size=10), task)).eval()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / f"{mid}.safetensors"))
        models[mid] = m
    own = zoo.build(population.arch_spec(GROUPS[0], task)).eval()
    zoo.save(own, d / "u-own.safetensors")
    models["u-own"] = own
    (d / "architecture.json").write_text(json.dumps({"arch": "gru", "hidden_size": 10}))
    (d / "labels.csv").write_text("model_id,seed,lab\nu-1,1,x\nu-2,2,y\n")
    return d, models


def test_add_model_dir_records_described_and_self_describing_files(tmp_path):
    cfg = _cfg(tmp_path / "root")
    d, models = _user_dir(tmp_path, cfg)
    rows = user_models.add_model_dir(cfg.root, str(d), "mnist1d", cfg=cfg)
    by_id = {r["model_id"]: r for r in store.manifest_rows(cfg.root)}
    assert sorted(by_id) == ["u-1", "u-2", "u-own"] and len(rows) == 3
    assert by_id["u-2"]["seed"] == 2 and by_id["u-2"]["lab"] == "y" and by_id["u-1"]["group"] == "my-grus"
    assert by_id["u-1"]["hidden_size"] == 10 and by_id["u-own"]["hidden_size"] == GROUPS[0].hidden_size
    x = store.read_inputs(cfg.root, "mnist1d", "probe").x
    for mid, m in models.items():
        with torch.no_grad():
            hs, _ = m.trajectories(x)
        torch.testing.assert_close(store.read_trajectory(cfg.root, mid).hiddens[0], hs[0], rtol=0, atol=1e-6)

    # adding the directory again skips every model and rewrites nothing
    layout = store.Layout.at(cfg.root)
    before = {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert user_models.add_model_dir(cfg.root, str(d), "mnist1d") == []  # cfg from the root's own spec
    assert {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before


def test_add_model_dir_errors_name_the_file_and_write_nothing(tmp_path):
    cfg = _cfg(tmp_path / "root")
    d, _ = _user_dir(tmp_path, cfg)
    (d / "architecture.json").write_text(json.dumps({"arch": "gru", "hidden_size": 11}))  # wrong size
    with pytest.raises(ValueError, match=r"u-1\.safetensors does not fit gru"):
        user_models.add_model_dir(cfg.root, str(d), "mnist1d", cfg=cfg)
    (d / "architecture.json").unlink()
    with pytest.raises(ValueError, match=r"u-1\.safetensors carries no architecture.*architecture\.json"):
        user_models.add_model_dir(cfg.root, str(d), "mnist1d", cfg=cfg)
    (d / "architecture.json").write_text(json.dumps({"arch": "gru", "hidden_size": 10}))
    (d / "u-2.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"u-2\.safetensors is not a readable safetensors file"):
        user_models.add_model_dir(cfg.root, str(d), "mnist1d", cfg=cfg)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        user_models.add_model_dir(cfg.root, str(tmp_path / "empty"), "mnist1d", cfg=cfg)
    assert not (tmp_path / "root").exists()


def test_cli_add_models(tmp_path, capsys):
    from dynamo_dist import cli

    cfg = _cfg(tmp_path / "root")
    d, _ = _user_dir(tmp_path, cfg)
    rc = cli.main(["add-models", str(d), "--task", "mnist1d", "--recipe", "smoke", "--root", cfg.root,
                   "--group", "mine", "--set", "population.num_probe=20"])
    out = capsys.readouterr().out
    assert rc == 0 and "added 3 model(s)" in out and "mine: 3 models" in out
    assert {r["group"] for r in store.manifest_rows(cfg.root)} == {"mine"}
    assert store.read_trajectory(cfg.root, "u-1").num_examples == 20
    spec = store.read_spec(cfg.root)  # a fresh root records what the user gave, not the recipe's groups
    assert spec["groups"] == [] and spec["num_probe"] == 20
    # adding more later keeps the root's recording settings
    assert user_models._record_cfg(cfg.root, None).num_probe == 20
    rc = cli.main(["add-models", str(tmp_path / "nowhere"), "--task", "mnist1d", "--root", cfg.root])
    assert rc == 2 and "no *.safetensors files" in capsys.readouterr().err


# ---------------------------------------------------------------- models that fail on their own

DIVERGING = GroupSpec(name="zz-diverge", task="mnist1d", arch="gru", hidden_size=8, num_seeds=1, epochs=1, batch_size=64,
                      lr=1e30)  # deterministic NaN weights -> NaN trajectory, refused at write


def test_a_diverging_model_fails_the_stage_by_default_and_keeps_the_others(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(GROUPS[0], DIVERGING))
    with pytest.raises(ValueError, match=r"1 model\(s\) failed \(population.max_failed_models=0\); first: model "
                                         r"zz-diverge-s000: trajectory .* contains NaN/Inf"):
        population.run_local(cfg, progress=False)
    rows = {r["model_id"]: r for r in store.manifest_rows(cfg.root, status=None)}
    assert [m for m, r in rows.items() if r["status"] == "complete"] == ["a-s000", "a-s001"]
    assert rows["zz-diverge-s000"]["status"] == "failed" and "NaN" in rows["zz-diverge-s000"]["error"]
    assert rows["a-s000"]["error"] is None
    assert not list(store.Layout.at(cfg.root).root.rglob("*zz-diverge*"))  # no files of the failed model


def test_max_failed_models_lets_the_stage_finish_and_a_rerun_retries_only_failures(tmp_path):
    cfg = _cfg(tmp_path / "root", groups=(DIVERGING, GROUPS[0]), max_failed_models=1)  # failure first
    rows = population.run_local(cfg, progress=False)
    assert [r["model_id"] for r in rows] == ["a-s000", "a-s001"]  # complete rows only
    weights = {p: p.stat().st_mtime_ns for p in (Path(cfg.root) / "weights").glob("*")}
    assert [j.model_id for j in population.pending_jobs(cfg.root, cfg)] == ["zz-diverge-s000"]
    population.run_local(cfg, progress=False)  # retries the failure (fails again), leaves the rest alone
    assert {p: p.stat().st_mtime_ns for p in (Path(cfg.root) / "weights").glob("*")} == weights
    with pytest.raises(ValueError, match="max_failed_models"):
        config.parse(PopulationConfig, {"root": "r", "max_failed_models": -1})


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_fails_before_any_work(tmp_path):
    cfg = _cfg(tmp_path / "root", device="cuda")
    with pytest.raises(ValueError, match="population.device is 'cuda' but this process sees no GPU"):
        population.run_local(cfg, progress=False)
    assert not (tmp_path / "root").exists()


def test_ray_population_with_cuda_needs_gpus_per_actor(tmp_path):
    from dynamo_dist.population.actors import run_population

    with pytest.raises(ValueError, match="gpus_per_actor is 0"):
        run_population(_cfg(tmp_path / "root", device="cuda"), progress=False)
    assert not (tmp_path / "root").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_population_matches_cpu_closely(tmp_path):
    groups = (GROUPS[0].replace(num_seeds=1),)
    rows = {d: population.run_local(_cfg(tmp_path / d, groups=groups, device=d), progress=False) for d in ("cpu", "cuda")}
    h_cpu = store.read_trajectory(str(tmp_path / "cpu"), "a-s000").hiddens[0]
    h_gpu = store.read_trajectory(str(tmp_path / "cuda"), "a-s000").hiddens[0]
    torch.testing.assert_close(h_gpu, h_cpu, rtol=0, atol=5e-3)  # same seed, same data order; float differences only
    assert abs(rows["cuda"][0]["test_accuracy"] - rows["cpu"][0]["test_accuracy"]) < 0.05


def test_cli_population_dry_run_reports_the_plan_and_writes_nothing(tmp_path, capsys):
    from dynamo_dist import cli

    root = tmp_path / "root"
    argv = ["population", "--recipe", "smoke", "--set", f"population.root={root}", "--set", f"run_dir={tmp_path}",
            "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert not root.exists() and "total: 4 of 4 to train" in out
    cfg = cli.load_pipeline(cli.build_parser().parse_args(argv)).population
    population.run_local(cfg.replace(groups=cfg.groups[:1]), progress=False)  # train only the first group
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    first, second = cfg.groups[0].name, cfg.groups[1].name
    assert f"{first}: 2 models, 2 complete, 0 failed, 0 to train" in out
    assert f"{second}: 2 models, 0 complete, 0 failed, 2 to train" in out and "total: 2 of 4 to train" in out
