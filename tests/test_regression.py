"""Regression populations (issue 28): real-valued targets in, outputs compared by MSE, output R^2 as agreement.

The user's task is integration: a sequence of sparse pulses in, their running sum out at every step
((N, T, 1) targets). A few GRUs of different widths are trained on it in a plain torch loop, added with
add-models, and embedded; the meta-model must reduce its output MSE against the base models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynamo_dist.config import GroupSpec, MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import load_task
from dynamo_dist.meta import objective
from dynamo_dist.meta.metrics import evaluate, summarize
from dynamo_dist.meta.trainer import DynamoTrainer, load_population
from dynamo_dist.population import train, user_models

T = 12  # steps


class Integrator(nn.Module):
    """The user's model: a GRU and a linear readout at every step."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.gru(x)[0])


def integration_data(path, n: int = 400, n_test: int = 100, seed: int = 0, last_only: bool = False):
    rng = np.random.default_rng(seed)

    def make(m):
        x = (rng.normal(size=(m, T, 1)) * (rng.random((m, T, 1)) < 0.4)).astype(np.float32)
        y = np.cumsum(x, axis=1) * 0.5
        return x, (y[:, -1] if last_only else y).astype(np.float32)

    x, y = make(n)
    x_test, y_test = make(n_test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def train_plain(model: nn.Module, task, steps: int = 150) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(task.base_train.x), task.base_train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("regression")
    task_name = f"npz:{integration_data(tmp / 'integrate.npz')}"
    task = load_task(task_name)
    models = {}
    for seed, hidden in enumerate((6, 8, 10)):
        torch.manual_seed(seed)
        models[f"gru{hidden}"] = train_plain(Integrator(hidden), task)
    root = str(tmp / "root")
    rows = user_models.add_models(root, models, task_name, cfg=PopulationConfig(root=root, num_probe=120, num_test=80))
    yield {"root": root, "task": task, "task_name": task_name, "models": models, "rows": rows}
    torch.set_num_threads(before)


def test_real_valued_targets_make_a_regression_task(population):
    task = population["task"]
    assert (task.output_kind, task.num_classes, task.input_shape) == ("regression", 1, (T, 1))
    assert task.test.y.dtype == torch.float32 and task.test.y.shape == (100, T, 1)
    # the probe/test inputs keep their targets in the root (a float list per example)
    test = store.read_inputs(population["root"], population["task_name"], "test")
    torch.testing.assert_close(test.y, task.test.y[:80], rtol=0, atol=0)


def test_manifest_rows_say_regression_and_carry_the_fit_to_the_targets(population):
    task = population["task"]
    for row in store.manifest_rows(population["root"]):
        model = population["models"][row["model_id"]]
        with torch.no_grad():
            pred = model(task.test.x)
        mse = float((pred - task.test.y).pow(2).mean())
        r2 = 1 - float((pred - task.test.y).pow(2).sum()) / float((task.test.y - task.test.y.mean()).pow(2).sum())
        assert row["output_kind"] == "regression" and row["test_accuracy"] is None
        assert row["test_mse"] == pytest.approx(mse, rel=1e-4) and row["test_r2"] == pytest.approx(r2, rel=1e-4)
        assert r2 > 0.8  # the base models learned to integrate


def _trainer(root: str, steps: int, **kw) -> DynamoTrainer:
    cfg = MetaConfig(output_dir="unused", steps=steps, hidden_size=16, embedding_dim=2, batch_size=32,
                     models_per_step=3, lr=1e-2, **kw)
    return DynamoTrainer(cfg, load_population(root))


def test_the_output_loss_of_a_regression_model_is_the_mse_of_its_outputs(population):
    trainer = _trainer(population["root"], steps=1, output_distance="kl")  # kl for classifiers only
    chunks = trainer.sample(0)
    assert {c.output_kind for c in chunks} == {"regression"}
    _, stats = objective.dynamo_loss(trainer.meta, trainer.embeddings, chunks, 1.0)
    with torch.no_grad():
        mse = []
        for c in chunks:
            theta = trainer.embeddings.theta_rows([c.row] * len(c.x))
            mse.append(float((trainer.meta(c.x, theta)[1][c.group] - c.outputs).pow(2).mean()))
    assert stats["loss_output"] == pytest.approx(np.mean(mse), rel=1e-5)


@pytest.mark.parametrize("method", ["varpro", "paper"])
def test_meta_training_reduces_the_output_mse(population, method):
    trainer = _trainer(population["root"], steps=300, method=method)
    before = summarize(evaluate(trainer, "test"))
    trainer.fit()
    after = summarize(evaluate(trainer, "test"))
    # the regression measures replace agreement and accuracies
    assert "mean_agreement" not in after and "mean_meta_accuracy" not in after
    assert after["mean_output_mse"] < 0.25 * before["mean_output_mse"], (before, after)
    assert after["mean_output_r2"] > 0.8 and before["mean_output_r2"] < 0.5, (before, after)


# ------------------------------------------------------------------ bad input


def test_targets_that_fit_no_output_kind_are_refused(tmp_path):
    path = integration_data(tmp_path / "a.npz")
    raw = dict(np.load(path))
    with pytest.raises(ValueError, match=r"labels of 'x' are not integers.*regression targets have shape"):
        np.savez(tmp_path / "b.npz", **{**raw, "y": raw["y"][:, -1, 0]})  # (N,) reals: class ids or not?
        load_task(f"npz:{tmp_path / 'b.npz'}")
    with pytest.raises(ValueError, match=r"targets of 'x' have shape \(400, 5, 1\)"):
        np.savez(tmp_path / "c.npz", **{**raw, "y": raw["y"][:, :5]})  # 5 steps of targets for 12 inputs
        load_task(f"npz:{tmp_path / 'c.npz'}")
    with pytest.raises(ValueError, match=r"targets of 'x_test' have shape \(12, 1\) per example, those of 'x' "):
        np.savez(tmp_path / "d.npz", **{**raw, "y": raw["y"][:, -1]})  # last-step targets, per-step test targets
        load_task(f"npz:{tmp_path / 'd.npz'}")
    with pytest.raises(ValueError, match=r"'num_classes' is for class labels"):
        np.savez(tmp_path / "e.npz", **raw, num_classes=np.array(3))
        load_task(f"npz:{tmp_path / 'e.npz'}")


def test_last_step_targets_and_the_population_stage_refusing_to_train_regressors(tmp_path):
    task = load_task(f"npz:{integration_data(tmp_path / 'last.npz', last_only=True)}")
    assert (task.output_kind, tuple(task.probe.y.shape[1:])) == ("regression", (1,))
    with pytest.raises(ValueError, match=r"group 'g': task .* has regression targets; the population stage trains "
                                         r"classifiers only"):
        train.train_model(GroupSpec(name="g", arch="gru", task=task.name), task, seed=0)


def test_a_meta_run_writes_the_regression_measures(population, tmp_path):
    import pyarrow.parquet as pq

    from dynamo_dist.meta.local import run_meta_local

    out = tmp_path / "meta"
    summary = run_meta_local(MetaConfig(output_dir=str(out), steps=20, hidden_size=8, embedding_dim=2, batch_size=16,
                                        models_per_step=2, eval_every=10), population["root"], progress=False)
    assert "mean_output_r2" in summary and "mean_agreement" not in summary
    metrics = pq.read_table(out / "model_metrics.parquet").to_pylist()
    assert sorted(r["model_id"] for r in metrics) == sorted(population["models"])
    assert all(np.isfinite([r["output_r2"], r["output_mse"], r["hidden_r2"]]).all() for r in metrics)
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert any(r.get("val_output_r2") is not None for r in history)


# ------------------------------------------------------------------ under Tune


def test_a_sweep_ranks_a_regression_population_by_output_r2(population, tmp_path):
    """sweep.metric unset follows the population's outputs; a metric its models never report is refused."""
    from dynamo_dist import tracking
    from dynamo_dist.config import SweepConfig
    from dynamo_dist.meta.tune import ranking_metric, validate

    rows = store.manifest_rows(population["root"])
    classifier = {**rows[0], "output_kind": None}  # a row written before regression existed: a classifier
    assert ranking_metric(None, rows, "pop") == "val_output_r2"
    assert ranking_metric(None, rows + [classifier], "pop") == "val_agreement"  # mixed: both are reported
    assert ranking_metric("val_hidden_r2", rows, "pop") == "val_hidden_r2"
    with pytest.raises(ValueError, match=r"sweep.metric: 'val_output_r2' is reported for regression models only.*"
                                         r"use 'val_agreement'"):
        ranking_metric("val_output_r2", [classifier], "pop")
    store_ = tracking.Store.at(str(tmp_path / "run"))
    sweep_cfg, _ = validate(MetaConfig(), SweepConfig(), population["root"], store_)
    assert sweep_cfg.metric == "val_output_r2"
    with pytest.raises(ValueError, match=r"sweep.metric: 'val_agreement' is reported for classification models only, "
                                         r"and the models of population .* are regression; use 'val_output_r2'"):
        validate(MetaConfig(), SweepConfig(metric="val_agreement"), population["root"], store_)


@pytest.mark.integration
def test_a_regression_sweep_under_tune(local_ray, population, tmp_path):
    from dynamo_dist import tracking
    from dynamo_dist.config import SweepConfig, TrackingConfig
    from dynamo_dist.meta.tune import run_sweep

    meta = MetaConfig(steps=10, eval_every=5, hidden_size=8, embedding_dim=2, batch_size=16, models_per_step=2,
                      checkpoint_every=10)
    run_dir = str(tmp_path / "run")
    table = run_sweep(meta, SweepConfig(output_weight=(0.0, 1.0), embedding_dim=(2,), max_concurrent_trials=2),
                      run_dir, population["root"], tracking_store=tracking.Store.at(run_dir, TrackingConfig()))
    assert [r["status"] for r in table] == ["TERMINATED"] * 2
    assert all(np.isfinite(r["val_output_r2"]) and np.isfinite(r["test_output_r2"]) for r in table)
    assert table[0]["val_output_r2"] >= table[1]["val_output_r2"]  # ranked by it
    assert all(r.get("val_agreement") is None for r in table)
