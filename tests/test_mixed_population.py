"""A population of users' GRUs, LSTMs and vanilla RNNs of different widths and depths in one meta run (issue 28).

Every member is the user's own class (one factory, ``build``), trained in a plain loop on the user's
arrays and added with add-models. One meta-model embeds them all: each member gets its own V_n of its
own tap width (layers x directions x hidden), and the run's outputs cover every member.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dynamo_dist.config import MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import load_task
from dynamo_dist.meta.metrics import evaluate
from dynamo_dist.meta.trainer import DynamoTrainer, load_population
from dynamo_dist.population import user_models

T, D, C = 10, 3, 3  # steps, input features, classes
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
# model_id -> (cell, hidden units, layers, bidirectional): every cell at two widths and two depths or more
MEMBERS = {
    "gru-h6-l1": ("gru", 6, 1, False), "gru-h10-l2": ("gru", 10, 2, False),
    "lstm-h7-l1": ("lstm", 7, 1, False), "lstm-h4-l3": ("lstm", 4, 3, False), "lstm-h5-l2-bi": ("lstm", 5, 2, True),
    "rnn-h5-l1": ("rnn", 5, 1, False), "rnn-h9-l2": ("rnn", 9, 2, False),
}


class Net(nn.Module):
    """The user's one class: any torch recurrent cell, width and depth, a readout of the last step."""

    def __init__(self, cell: str = "gru", hidden: int = 8, layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.core = CELLS[cell](D, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), C)

    def forward(self, x):
        return self.fc(self.core(x)[0][:, -1])


def build(**kwargs) -> nn.Module:
    return Net(**kwargs)


@pytest.fixture(scope="module")
def population(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)

    def make(m):  # which channel has the largest mean over the sequence
        x = rng.normal(size=(m, T, D)).astype(np.float32)
        return x, x.mean(axis=1).argmax(axis=1).astype(np.int64)

    (x, y), (x_test, y_test) = make(300), make(80)
    np.savez(tmp / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    task_name = f"npz:{tmp / 'data.npz'}"
    task = load_task(task_name)
    root = str(tmp / "population")
    cfg = PopulationConfig(root=root, num_probe=64, num_test=40)
    for seed, (mid, (cell, hidden, layers, bi)) in enumerate(MEMBERS.items()):
        kwargs = {"cell": cell, "hidden": hidden, "layers": layers, "bidirectional": bi}
        torch.manual_seed(seed)
        model = Net(**kwargs)
        opt = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(80):  # the user's own loop
            loss = nn.functional.cross_entropy(model(task.base_train.x), task.base_train.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        user_models.add_models(root, {mid: model.eval()}, task_name, cfg=cfg, group=cell,
                               factory="test_mixed_population:build", factory_kwargs=kwargs)
    return {"root": root, "task_name": task_name}


def _width(mid: str) -> int:
    _, hidden, layers, bi = MEMBERS[mid]
    return hidden * layers * (2 if bi else 1)


def test_every_member_is_recorded_with_its_own_cell_and_tap_width(population):
    rows = {r["model_id"]: r for r in store.manifest_rows(population["root"])}
    assert set(rows) == set(MEMBERS)
    for mid, (cell, hidden, layers, bi) in MEMBERS.items():
        r = rows[mid]
        assert (r["arch"], r["hidden_size"], r["group"]) == (cell, hidden, cell)
        assert (r["num_layers"] or 1, bool(r["bidirectional"])) == (layers, bi)
        assert store.trajectory_info(population["root"], mid).hidden_shapes == [(_width(mid),)]


def test_one_meta_model_fits_every_member_through_its_own_map(population):
    """Each member's V_n maps the meta state to its own width, and training raises every member's hidden R^2."""
    cfg = MetaConfig(output_dir="unused", steps=120, hidden_size=16, embedding_dim=2, batch_size=16,
                     models_per_step=3, lr=1e-2)
    trainer = DynamoTrainer(cfg, load_population(population["root"]))
    for i, mid in enumerate(trainer.data.model_ids):
        (weight, bias), = trainer.embeddings.maps_of(i)
        assert tuple(weight.shape) == (_width(mid), 16) and tuple(bias.shape) == (_width(mid),)
    before = evaluate(trainer, "test")
    trainer.fit()
    after = evaluate(trainer, "test")
    assert set(after) == set(MEMBERS)
    for mid in MEMBERS:
        assert after[mid]["hidden_r2"] > max(before[mid]["hidden_r2"], 0.5), (mid, before[mid], after[mid])
        assert after[mid]["agreement"] > 0.5, (mid, after[mid])


def test_the_meta_runs_outputs_cover_every_member(population, tmp_path):
    from dynamo_dist.meta.local import run_meta_local

    out = tmp_path / "meta"
    summary = run_meta_local(MetaConfig(output_dir=str(out), steps=20, hidden_size=8, embedding_dim=2, batch_size=16,
                                        models_per_step=3, eval_every=10), population["root"], progress=False)
    emb = {r["model_id"]: r for r in pq.read_table(out / "embeddings.parquet").to_pylist()}
    assert set(emb) == set(MEMBERS) and summary["num_models"] == len(MEMBERS)
    for mid, (cell, hidden, layers, _) in MEMBERS.items():
        assert len(emb[mid]["theta"]) == 2 and np.isfinite(emb[mid]["theta"]).all()
        assert (emb[mid]["arch"], emb[mid]["hidden_size"], emb[mid]["group"]) == (cell, hidden, cell)
    metrics = {r["model_id"]: r for r in pq.read_table(out / "model_metrics.parquet").to_pylist()}
    assert set(metrics) == set(MEMBERS)
    assert all(np.isfinite([r["agreement"], r["hidden_r2"]]).all() for r in metrics.values())
