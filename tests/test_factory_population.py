"""Train your own with Ray (issue 28): a population group whose ``arch`` is the import path of the user's factory
and whose ``task`` is the user's arrays, trained by population actors as zoo models are.

Known answers: the actors' models equal the same models trained by the sequential loop (``run_local``, one
thread as each actor has) weight for weight and trajectory for trajectory; an actor killed mid-run is replaced
and the models are the same; a re-run trains nothing; a damaged model is retrained alone, to the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dynamo_dist import adapters
from dynamo_dist.config import GroupSpec, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.population import train

T, D, C = 8, 3, 3
FACTORY = "test_factory_population:build"


class Net(nn.Module):
    """The user's class: a recurrent core of any cell and depth, a readout of the last step."""

    def __init__(self, cell: str = "gru", hidden: int = 8, layers: int = 1, outputs: int = C, every_step=False):
        super().__init__()
        self.core = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell](D, hidden, num_layers=layers,
                                                                         batch_first=True)
        self.fc = nn.Linear(hidden, outputs)
        self.every_step = every_step

    def forward(self, x):
        h = self.core(x)[0]
        return self.fc(h) if self.every_step else self.fc(h[:, -1])


def build(**kwargs) -> nn.Module:
    return Net(**kwargs)


def _data(path: Path, regression: bool = False) -> str:
    rng = np.random.default_rng(0)

    def make(m):
        x = rng.normal(size=(m, T, D)).astype(np.float32)
        if regression:  # a running sum of the first channel at every step
            return x, np.cumsum(x[..., :1], axis=1).astype(np.float32) * 0.3
        return x, x.mean(axis=1).argmax(axis=1).astype(np.int64)

    (x, y), (xt, yt) = make(240), make(60)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return f"npz:{path}"


def _cfg(root: Path, task: str, **kw) -> PopulationConfig:
    groups = (GroupSpec(name="mygru", task=task, arch=FACTORY, kwargs={"cell": "gru", "hidden": 6}, num_seeds=3,
                        epochs=8, batch_size=32, lr=0.02),
              GroupSpec(name="mylstm", task=task, arch=FACTORY, kwargs={"cell": "lstm", "hidden": 4, "layers": 2},
                        num_seeds=2, epochs=2, batch_size=32, lr=0.01, every_epoch=True))
    return PopulationConfig(root=str(root), groups=groups, num_probe=32, num_test=24, **kw)


IDS = ["mygru-s000", "mygru-s001", "mygru-s002"] + [f"mylstm-s{s:03d}-e{e:03d}" for s in range(2) for e in (1, 2)]


@pytest.fixture(scope="module")
def task_name(tmp_path_factory) -> str:
    return _data(tmp_path_factory.mktemp("factory") / "data.npz")


@pytest.fixture(scope="module")
def local_pop(tmp_path_factory, task_name, one_thread):
    """The plain loop: every model trained in this process, one after the other, on one thread."""
    cfg = _cfg(tmp_path_factory.mktemp("factory_local") / "root", task_name)
    return cfg, train.run_local(cfg, progress=False)


def _same_models(a_root: str, b_root: str, ids: list[str]) -> None:
    for mid in ids:
        a = load_file(str(Path(a_root) / "weights" / f"{mid}.safetensors"))
        b = load_file(str(Path(b_root) / "weights" / f"{mid}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mid
        for split in ("probe", "test"):
            ta, tb = store.read_trajectory(a_root, mid, split), store.read_trajectory(b_root, mid, split)
            assert all(torch.equal(x, y) for x, y in zip(ta.hiddens, tb.hiddens, strict=True)), (mid, split)
            assert torch.equal(ta.outputs, tb.outputs), (mid, split)


# ------------------------------------------------------------------ without Ray


def test_a_factory_group_is_trained_and_recorded_as_the_users_module(local_pop, task_name):
    cfg, rows = local_pop
    assert [r["model_id"] for r in rows] == IDS
    by_id = {r["model_id"]: r for r in rows}
    assert (by_id["mygru-s000"]["arch"], by_id["mygru-s000"]["hidden_size"]) == ("gru", 6)
    lstm = by_id["mylstm-s001-e002"]
    assert (lstm["arch"], lstm["hidden_size"], lstm["num_layers"], lstm["factory"]) == ("lstm", 4, 2, FACTORY)
    task = train.task_for(cfg, task_name)
    layout = store.Layout.at(cfg.root)
    for r in rows:
        model = adapters.load(layout.path(r["weights_path"]))  # the user's class, rebuilt by its factory
        assert isinstance(model.module, Net)
        assert r["test_accuracy"] == pytest.approx(train.accuracy(model, task.test.x, task.test.y))
        traj = store.read_trajectory(cfg.root, r["model_id"])
        with torch.no_grad():
            h = model.module.core(store.read_inputs(cfg.root, task_name, "probe").x)[0]
        if r["arch"] == "gru":  # one layer: the tap is the GRU's own output
            torch.testing.assert_close(traj.hiddens[0], h, rtol=0, atol=1e-6)
        else:  # two layers side by side, the top one last
            torch.testing.assert_close(traj.hiddens[0][..., -4:], h, rtol=0, atol=1e-6)
    assert max(r["test_accuracy"] for r in rows if r["group"] == "mygru") > 0.6  # they learned the task


def test_a_factory_group_learns_regression_targets_by_mse(tmp_path, one_thread):
    task = _data(tmp_path / "sums.npz", regression=True)
    group = GroupSpec(name="sum", task=task, arch=FACTORY, kwargs={"outputs": 1, "every_step": True, "hidden": 8},
                      num_seeds=1, epochs=30, batch_size=32, lr=0.02)
    (row,) = train.run_local(PopulationConfig(root=str(tmp_path / "root"), groups=(group,), num_probe=32,
                                              num_test=24), progress=False)
    assert row["output_kind"] == "regression" and row["test_accuracy"] is None
    assert row["test_r2"] > 0.8, row


@pytest.mark.parametrize("group,match", [
    (dict(arch="no_such_module:build"), r"group 'bad': arch: cannot import module 'no_such_module'"),
    (dict(arch=FACTORY, kwargs={"outputs": 5}), r"group 'bad' \(its factory's untrained model\): outputs of shape \(16, 8, 5\): the task has 3 "
                                                r"classes"),
    (dict(arch=FACTORY, hidden=("nope",)), r"hidden names \['nope'\], not submodules of Net"),
    (dict(arch="gru", kwargs={"hidden": 4}), r"\['kwargs'\] describe a factory arch"),
    (dict(arch="gru:"), r"arch 'gru:' is neither a zoo architecture"),
])
def test_a_factory_group_that_cannot_work_is_refused_before_anything_is_written(tmp_path, task_name, group, match):
    with pytest.raises(ValueError, match=match):
        cfg = PopulationConfig(root=str(tmp_path / "root"), groups=(GroupSpec(name="bad", task=task_name, **group),))
        train.run_local(cfg, progress=False)
    assert not (tmp_path / "root").exists()


def test_factory_groups_do_not_stack():
    from dynamo_dist.population import stacked

    assert stacked.stack_key(GroupSpec(arch=FACTORY, kwargs={"cell": "gru"})) is None


# ------------------------------------------------------------------ Ray actors


@pytest.mark.integration
def test_ray_actors_train_the_models_the_plain_loop_trains(local_ray, local_pop, task_name, tmp_path):
    from dynamo_dist.population.actors import run_population

    ref_cfg, _ = local_pop
    cfg = _cfg(tmp_path / "root", task_name, models_per_actor=2)  # stacking asked for: factories train alone
    rows = run_population(cfg, progress=False)
    assert [r["model_id"] for r in rows] == IDS
    _same_models(cfg.root, ref_cfg.root, IDS)
    # resume: a re-run trains nothing; a damaged model is retrained alone, to the same weights
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "root" / "weights").iterdir()}
    assert run_population(cfg, progress=False) == rows
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "root" / "weights").iterdir()} == mtimes
    store.Layout.at(cfg.root).path(rows[1]["probe_path"]).unlink()
    run_population(cfg, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "root" / "weights").iterdir()}
    assert [n for n in after if after[n] != mtimes[n]] == [f"{IDS[1]}.safetensors"]
    _same_models(cfg.root, ref_cfg.root, IDS)


@pytest.mark.integration
def test_a_factory_population_survives_a_killed_actor(local_ray, local_pop, task_name, tmp_path):
    import ray

    from dynamo_dist.population.actors import run_population

    ref_cfg, _ = local_pop
    cfg = _cfg(tmp_path / "root", task_name)
    killed, later = [], []

    def kill_first_actor_once(rows, actors):
        if not killed:
            killed.append(actors[0]._actor_id.hex())
            ray.kill(actors[0], no_restart=True)
        else:
            later.append({a._actor_id.hex() for a in actors})

    rows = run_population(cfg, progress=False, on_progress=kill_first_actor_once)
    assert later and killed[0] not in later[-1]  # a replacement took its place
    assert [r["model_id"] for r in rows] == IDS
    assert not [p for p in Path(cfg.root).rglob("*") if p.name.endswith(".tmp")]
    _same_models(cfg.root, ref_cfg.root, IDS)
