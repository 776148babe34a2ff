"""Bring your own population (issue 28): users' own recurrent modules and data, through add-models.

The modules below are written the way a user writes them (their class and attribute names, a
time-major LSTM), trained with a plain torch loop, saved as plain safetensors state dicts and
brought in by import path to a factory (``test_user_models:build_gru``: pytest puts tests/ on
sys.path; the CLI subprocess gets it through PYTHONPATH). The data is the user's own .npz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dynamo_dist import adapters, zoo
from dynamo_dist.config import MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import load_task
from dynamo_dist.population import user_models

T, D, C = 10, 3, 3  # steps, input features, classes of the user's task
TESTS = Path(__file__).parent


# ------------------------------------------------------------------ the user's code


class MyGRU(nn.Module):
    """A GRU classifier with the user's attribute names, reading out the last step only."""

    def __init__(self, input_size: int = D, hidden: int = 8, classes: int = C):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


class MyLSTM(nn.Module):
    """2-layer bidirectional LSTM, time-major inside (batch_first=False), another readout name."""

    def __init__(self, input_size: int = D, hidden: int = 5, classes: int = C):
        super().__init__()
        self.encoder = nn.LSTM(input_size, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        out, _ = self.encoder(x.transpose(0, 1))  # (T, B, 2H)
        return self.head(out[-1])


class DeepRNN(nn.Module):
    """A 3-layer tanh RNN whose forward gives outputs at every step."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.core = nn.RNN(D, hidden, num_layers=3, batch_first=True)
        self.proj = nn.Linear(hidden, C)

    def forward(self, x):
        return self.proj(self.core(x)[0])


def build_gru(**kwargs) -> nn.Module:
    return MyGRU(**kwargs)


def build_lstm(**kwargs) -> nn.Module:
    return MyLSTM(**kwargs)


def user_data(path: Path, n: int = 360, n_test: int = 90, seed: int = 0) -> Path:
    """The user's task: which of C input channels has the largest mean over the sequence."""
    rng = np.random.default_rng(seed)

    def make(m):
        x = rng.normal(size=(m, T, D)).astype(np.float32) + 3.0  # not standardised: must stay as given
        return x, x.mean(axis=1).argmax(axis=1).astype(np.int64)

    x, y = make(n)
    x_test, y_test = make(n_test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def last_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs at the final step, whether its forward gives (B, C) or (B, T, C)."""
    out = model(x)
    return out[:, -1] if out.dim() == 3 else out


def train_plain(model: nn.Module, task, steps: int = 60) -> nn.Module:
    """The user's own training loop on the task's base_train split."""
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    x, y = task.base_train.x, task.base_train.y
    for _ in range(steps):
        loss = nn.functional.cross_entropy(last_step(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained(cls, task, seed: int = 0, steps: int = 60) -> nn.Module:
    torch.manual_seed(seed)
    return train_plain(cls(), task, steps)


def layer1_states(lstm: nn.LSTM, x_BTD: torch.Tensor) -> torch.Tensor:
    """The first layer's states of a 2-layer bidirectional LSTM, by a separate 1-layer LSTM (known answer)."""
    one = nn.LSTM(lstm.input_size, lstm.hidden_size, bidirectional=True, batch_first=True)
    one.load_state_dict({k: v for k, v in lstm.state_dict().items() if "_l0" in k})
    return one(x_BTD)[0]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(root: Path) -> PopulationConfig:
    return PopulationConfig(root=str(root), num_probe=48, num_test=40)


def _model_dir(d: Path, models: dict[str, nn.Module], description: dict) -> Path:
    d.mkdir(parents=True)
    for mid, m in models.items():
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / f"{mid}.safetensors"))
    (d / "architecture.json").write_text(json.dumps(description))
    return d


def _read_back(root: str, model_id: str, split: str = "probe") -> tuple[np.ndarray, np.ndarray, list]:
    """(hidden (N,T,H), output (N,T,C), hidden_shapes) read with pyarrow alone, as a user would."""
    rel = store.Layout.at(root).trajectory_rel(model_id, split)
    table = pq.read_table(Path(root) / rel)
    n, t = int(table.column("sample").to_numpy().max()) + 1, int(table.column("step").to_numpy().max())
    hidden = np.stack(table.column("hidden").to_numpy(zero_copy_only=False)).reshape(n, t, -1)
    output = np.stack(table.column("output").to_numpy(zero_copy_only=False)).reshape(n, t, -1)
    return hidden, output, json.loads(table.schema.metadata[b"dynamo.hidden_shapes"])


# ------------------------------------------------------------------------- unit


def test_layer_states_are_every_layers_states_side_by_side():
    torch.manual_seed(0)
    lstm = nn.LSTM(D, 4, num_layers=2, bidirectional=True)  # time-major
    x = torch.randn(5, T, D)
    with torch.no_grad():
        h = zoo.layer_states(lstm, x.transpose(0, 1))
        top = lstm(x.transpose(0, 1))[0].transpose(0, 1)
        first = layer1_states(lstm, x)
    assert h.shape == (5, T, 2 * 2 * 4)
    torch.testing.assert_close(h[..., :8], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(h[..., 8:], top, rtol=0, atol=1e-6)


def test_user_arrays_declared_and_derived_splits(tmp_path):
    path = user_data(tmp_path / "data.npz")
    raw = np.load(path)
    task = load_task(f"npz:{path}")
    assert (task.input_kind, task.input_shape, task.num_classes) == ("sequence", (T, D), C)
    torch.testing.assert_close(task.test.x, torch.from_numpy(raw["x_test"]))  # declared: as given, not standardised
    assert len(task.base_train) + len(task.probe) == len(raw["x"]) and len(task.probe) == 180
    rows = {tuple(r) for r in raw["x"].reshape(len(raw["x"]), -1).tolist()}
    assert all(tuple(r) in rows for r in task.probe.x.reshape(len(task.probe), -1).tolist())
    # no declared test: a seeded 20% of x is held out; npy directories read the same keys
    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "x.npy", raw["x"])
    np.save(d / "y.npy", raw["y"])
    derived = load_task(f"npy:{d}")
    assert (len(derived.test), len(derived.base_train) + len(derived.probe)) == (72, 288)
    assert load_task(f"npy:{d}", seed=1).test.x.sum() != derived.test.x.sum()


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """Two user GRUs via the CLI (subprocess) and two 2-layer bidirectional LSTMs from Python, one root."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("byo")
    # the task name holds a "." (data.npz): the meta-model's heads are keyed by it all the same
    task_name = f"npz:{user_data(tmp / 'data.npz')}"
    task = load_task(task_name)
    grus = {f"gru-{s}": trained(MyGRU, task, seed=s) for s in range(2)}
    lstms = {f"lstm-{s}": trained(MyLSTM, task, seed=s) for s in range(2)}
    gdir = _model_dir(tmp / "grus", grus, {"factory": "test_user_models:build_gru", "kwargs": {"hidden": 8}})
    ldir = _model_dir(tmp / "lstms", lstms, {"factory": "test_user_models:build_lstm"})
    root = tmp / "population"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", "add-models", str(gdir), "--task", task_name,
                           "--root", str(root), "--set", "population.num_probe=48", "--set", "population.num_test=40"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "added 2 model(s)" in proc.stdout
    rows = user_models.add_model_dir(str(root), str(ldir), task_name)  # the root's own recording settings
    assert [r["model_id"] for r in rows] == ["lstm-0", "lstm-1"]
    rnns = {"rnn-0": trained(DeepRNN, task)}
    user_models.add_models(str(root), rnns, task_name, group="rnns", factory="test_user_models:DeepRNN")
    return {"root": str(root), "task": task, "task_name": task_name, "models": {**grus, **lstms, **rnns},
            "gdir": gdir, "ldir": ldir}


def test_models_learned_the_users_task(population):
    rows = {r["model_id"]: r for r in store.manifest_rows(population["root"])}
    assert set(rows) == {"gru-0", "gru-1", "lstm-0", "lstm-1", "rnn-0"}
    for mid, m in population["models"].items():
        with torch.no_grad():
            acc = float((last_step(m, population["task"].test.x).argmax(-1) == population["task"].test.y).float().mean())
        assert rows[mid]["test_accuracy"] == pytest.approx(acc)
        assert acc > user_models.chance_bound(population["task"].test.y)[1]  # learned, on the inputs as given


def test_manifest_says_what_each_model_is(population):
    rows = {r["model_id"]: r for r in store.manifest_rows(population["root"])}
    g, l = rows["gru-0"], rows["lstm-0"]
    assert (g["arch"], g["hidden_size"], g["group"]) == ("gru", 8, "grus")
    assert (l["arch"], l["hidden_size"], l["num_layers"], l["bidirectional"]) == ("lstm", 5, 2, True)
    assert l["group"] == "lstms"
    assert l["factory"] == "test_user_models:build_lstm" and g["factory"] == "test_user_models:build_gru"
    r = rows["rnn-0"]
    assert (r["arch"], r["hidden_size"], r["num_layers"], r["bidirectional"]) == ("rnn", 4, 3, False)
    assert g["num_layers"] is None  # a 1-layer unidirectional GRU needs no more than the zoo's columns
    assert zoo.ArchSpec.from_row(l).num_layers == 2 and zoo.ArchSpec.from_row(g).num_layers == 1


def test_trajectories_equal_a_hooked_forward_of_the_users_module(population):
    root = population["root"]
    x = store.read_inputs(root, population["task_name"], "probe").x
    torch.testing.assert_close(x, population["task"].probe.x[:48])
    for mid, m in population["models"].items():
        hidden, output, shapes = _read_back(root, mid)
        with torch.no_grad():
            if isinstance(m, MyGRU):
                h = m.gru(x)[0]
                y = m.fc(h)
            elif isinstance(m, DeepRNN):  # every layer by hand: layer k's input is layer k-1's states
                z, hs = x, []
                for k in range(3):
                    one = nn.RNN(z.shape[-1], 4, batch_first=True)
                    one.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in m.core.state_dict().items()
                                         if n.endswith(f"_l{k}")})
                    z = one(z)[0]
                    hs.append(z)
                h, y = torch.cat(hs, dim=-1), m(x)
            else:  # every layer's states side by side: layer 1 (fwd, bwd), then layer 2 (fwd, bwd)
                top = m.encoder(x.transpose(0, 1))[0].transpose(0, 1)
                h = torch.cat([layer1_states(m.encoder, x), top], dim=-1)
                y = m.head(top)
            last = last_step(m, x)
        assert shapes == [[h.shape[-1]]] and hidden.shape == (48, T, h.shape[-1])
        np.testing.assert_allclose(hidden, h.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(output, y.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(output[:, -1], last.numpy(), rtol=0, atol=1e-5)  # the model's own forward


def test_stored_weights_rebuild_the_users_module_through_its_factory(population):
    root = population["root"]
    layout = store.Layout.at(root)
    x = population["task"].probe.x[:8]
    for mid, m in population["models"].items():
        again = adapters.load(layout.path(layout.weights_rel(mid)))
        assert isinstance(again, adapters.HookedModel) and type(again.module) is type(m)
        with torch.no_grad():
            torch.testing.assert_close(again(x), last_step(m, x), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"holds a user's module, .* load it with dynamo_dist.adapters.load"):
            zoo.load(layout.path(layout.weights_rel(mid)))  # the zoo knows only its own models


def test_adding_again_skips_complete_models(population):
    before = {p: p.stat().st_mtime_ns for p in Path(population["root"]).rglob("*.parquet")}
    assert user_models.add_model_dir(population["root"], str(population["ldir"]), population["task_name"]) == []
    assert {p: p.stat().st_mtime_ns for p in Path(population["root"]).rglob("*.parquet")} == before


@pytest.fixture(scope="module")
def meta_run(population, tmp_path_factory):
    from dynamo_dist.meta.local import run_meta_local

    out = tmp_path_factory.mktemp("byo_meta") / "meta"
    meta = MetaConfig(output_dir=str(out), steps=10, hidden_size=8, embedding_dim=2, batch_size=16,
                      models_per_step=2, eval_every=10)
    run_meta_local(meta, population["root"], progress=False)
    return out


def test_a_meta_model_embeds_the_mixed_population(meta_run):
    """1-layer GRUs (tap width 8), 2-layer bidirectional LSTMs (20) and a 3-layer RNN (12) in one meta run."""
    emb = pq.read_table(meta_run / "embeddings.parquet").to_pylist()
    assert sorted(r["model_id"] for r in emb) == ["gru-0", "gru-1", "lstm-0", "lstm-1", "rnn-0"]
    assert all(len(r["theta"]) == 2 and np.isfinite(r["theta"]).all() for r in emb)
    metrics = pq.read_table(meta_run / "model_metrics.parquet").to_pylist()
    assert len(metrics) == 5 and all(np.isfinite(r["agreement"]) for r in metrics)


def test_a_new_users_model_is_embedded_post_hoc(population, meta_run, tmp_path):
    from dynamo_dist.meta.posthoc import run_posthoc

    root = str(tmp_path / "new")
    task = population["task"]
    user_models.add_models(root, {"bi-new": trained(BiGRU, task, steps=20)}, population["task_name"],
                           cfg=_cfg(root))
    path = run_posthoc(str(meta_run), root, steps=20)
    rows = pq.read_table(path).to_pylist()
    assert [r["model_id"] for r in rows] == ["bi-new"] and np.isfinite(rows[0]["theta"]).all()
    assert rows[0]["nearest_model"] in population["models"]


def test_architecture_json_with_num_layers_and_bidirectional(tmp_path):
    """A plain state dict in the zoo's key names (rnn.*, readout.*) described by architecture.json."""
    task_name = f"npz:{user_data(tmp_path / 'data.npz')}"
    task = load_task(task_name)
    spec = zoo.ArchSpec(arch="gru", input_kind="sequence", input_shape=(T, D), num_classes=C, hidden_size=4,
                        num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    model = zoo.build(spec).eval()
    d = _model_dir(tmp_path / "plain", {"deep": model}, {"arch": "gru", "hidden_size": 4, "num_layers": 2,
                                                          "bidirectional": True})
    root = str(tmp_path / "root")
    user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root))
    hidden, output, _ = _read_back(root, "deep")
    x = task.probe.x[:48]
    with torch.no_grad():
        hs, ys = model.trajectories(x)
        top = model.rnn(x)[0]
    assert hidden.shape == (48, T, 2 * 2 * 4)
    np.testing.assert_allclose(hidden, hs[0].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(hidden[..., 8:], top.numpy(), atol=1e-6, rtol=0)  # the top layer is rnn(x)
    np.testing.assert_allclose(output, ys.numpy(), atol=1e-6, rtol=0)
    assert adapters.load(store.Layout.at(root).path("weights/deep.safetensors")).spec == spec


class BiGRU(nn.Module):
    """A bidirectional GRU whose forward returns outputs at every step (no readout to name)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(D, 4, batch_first=True, bidirectional=True)
        self.out = nn.Linear(8, C)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


class CellLoop(nn.Module):
    """A hand-written recurrence: a GRUCell called once per step (no nn.GRU to find)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(D, 6)
        self.out = nn.Linear(6, C)

    def forward(self, x):
        h, ys = x.new_zeros(x.shape[0], 6), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(self.out(h))
        return torch.stack(ys, dim=1)


class TokenLSTM(nn.Module):
    def __init__(self, vocab: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.cls = nn.Linear(5, C)

    def forward(self, ids):
        return self.cls(self.lstm(self.emb(ids))[0][:, -1])


def test_bidirectional_per_step_forward_and_a_hand_written_cell(tmp_path):
    task_name = f"npz:{user_data(tmp_path / 'data.npz', n=120, n_test=30)}"
    root = str(tmp_path / "root")
    torch.manual_seed(0)
    bi, loop = BiGRU().eval(), CellLoop().eval()
    user_models.add_models(root, {"bi": bi}, task_name, cfg=_cfg(root))
    user_models.add_models(root, {"loop": loop}, task_name, cfg=_cfg(root), hidden=["cell"])
    rows = {r["model_id"]: r for r in store.manifest_rows(root)}
    assert (rows["bi"]["arch"], rows["bi"]["bidirectional"], rows["bi"]["num_layers"]) == ("gru", True, 1)
    assert (rows["loop"]["arch"], rows["loop"]["hidden_size"]) == ("custom", 6)
    x = store.read_inputs(root, task_name, "probe").x
    with torch.no_grad():
        h_bi = bi.rnn(x)[0]
        h_loop, h = [], torch.zeros(len(x), 6)
        for t in range(T):
            h = loop.cell(x[:, t], h)
            h_loop.append(h)
        h_loop = torch.stack(h_loop, dim=1)
    for mid, m, h in (("bi", bi, h_bi), ("loop", loop, h_loop)):
        hidden, output, _ = _read_back(root, mid)
        np.testing.assert_allclose(hidden, h.numpy(), atol=1e-6, rtol=0)
        with torch.no_grad():
            np.testing.assert_allclose(output, m(x).numpy(), atol=1e-6, rtol=0)


def test_token_ids_from_npz_through_the_users_embedding(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 12, size=(150, T))
    np.savez(tmp_path / "tokens.npz", x=ids, y=(ids[:, -1] % C))
    task_name = f"npz:{tmp_path / 'tokens.npz'}"
    task = load_task(task_name)
    assert (task.input_kind, task.vocab_size, task.input_shape) == ("tokens", 12, (T,))
    root = str(tmp_path / "root")
    torch.manual_seed(0)
    m = TokenLSTM().eval()
    user_models.add_models(root, {"tok": m}, task_name, cfg=_cfg(root))
    hidden, output, _ = _read_back(root, "tok")
    x = store.read_inputs(root, task_name, "probe").x
    assert x.dtype == torch.int64
    with torch.no_grad():
        h = m.lstm(m.emb(x))[0]
        np.testing.assert_allclose(hidden, h.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(output, m.cls(h).numpy(), atol=1e-6, rtol=0)
    assert zoo.ArchSpec.from_row(store.manifest_rows(root)[0]).vocab_size == 12


# ------------------------------------------------------------------ bad input


@pytest.fixture
def task_name(tmp_path):
    return f"npz:{user_data(tmp_path / 'data.npz', n=120, n_test=30)}"


def _refused(tmp_path, match: str, call) -> None:
    with pytest.raises(ValueError, match=match):
        call()
    assert not (tmp_path / "root").exists()  # nothing written, not even the root


def test_a_factory_that_cannot_be_imported_names_the_file_and_field(tmp_path, task_name):
    d = _model_dir(tmp_path / "m", {"a": MyGRU()}, {"factory": "no_such_pkg.models:build"})
    root = str(tmp_path / "root")
    _refused(tmp_path, r"architecture.json: field 'factory': cannot import module 'no_such_pkg.models'",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "architecture.json").write_text(json.dumps({"factory": "test_user_models:no_such_builder"}))
    _refused(tmp_path, r"field 'factory': module 'test_user_models' has no 'no_such_builder'",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "architecture.json").write_text(json.dumps({"factory": "test_user_models:build_gru",
                                                     "kwargs": {"hiden": 8}}))
    _refused(tmp_path, r"field 'factory': test_user_models:build_gru\(\*\*\{'hiden': 8\}\) failed: TypeError",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "architecture.json").write_text(json.dumps({"factory": "test_user_models:build_gru", "hiden": 8}))
    _refused(tmp_path, r"architecture.json: unknown field\(s\) \['hiden'\] beside 'factory'",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "architecture.json").write_text(json.dumps({"factory": "test_user_models:build_gru",
                                                     "kwargs": {"hidden": 6}}))
    _refused(tmp_path, r"a.safetensors does not fit MyGRU",  # the weights are of hidden size 8
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))


def test_hooks_that_capture_nothing_are_refused(tmp_path, task_name):
    class Spare(MyGRU):
        def __init__(self):
            super().__init__()
            self.unused = nn.GRU(D, 4, batch_first=True)

    root = str(tmp_path / "root")
    _refused(tmp_path, r"model 'a': hidden: hooks on \['unused'\] captured nothing",
             lambda: user_models.add_models(root, {"a": Spare()}, task_name, cfg=_cfg(root), hidden=["unused"]))
    _refused(tmp_path, r"model 'a': hidden names \['nope'\], not submodules of MyGRU",
             lambda: user_models.add_models(root, {"a": MyGRU()}, task_name, cfg=_cfg(root), hidden=["nope"]))
    _refused(tmp_path, r"model 'mlp': Sequential has no nn.GRU/nn.LSTM/nn.RNN submodule",
             lambda: user_models.add_models(root, {"mlp": nn.Sequential(nn.Linear(D, C))}, task_name,
                                            cfg=_cfg(root)))


def test_outputs_of_the_wrong_width_are_refused(tmp_path, task_name):
    root = str(tmp_path / "root")
    _refused(tmp_path, r"model 'wide': outputs of shape \(16, 10, 5\): the task has 3 classes",
             lambda: user_models.add_models(root, {"ok": MyGRU(), "wide": MyGRU(classes=5)}, task_name,
                                            cfg=_cfg(root)))


def test_a_readout_that_is_not_forwards_last_step_is_refused(tmp_path, task_name):
    class Tanh(MyGRU):
        def forward(self, x):
            return self.fc(torch.tanh(self.gru(x)[0][:, -1] * 3))

    root = str(tmp_path / "root")
    _refused(tmp_path, r"model 'a': readout 'fc' applied to 'gru''s last step does not give what forward returns",
             lambda: user_models.add_models(root, {"a": Tanh()}, task_name, cfg=_cfg(root)))


def test_a_pickle_checkpoint_points_to_safetensors(tmp_path, task_name, capsys):
    d = tmp_path / "m"
    d.mkdir()
    torch.save(MyGRU().state_dict(), d / "a.pt")
    root = str(tmp_path / "root")
    _refused(tmp_path, r"\['a.pt'\] are pickle checkpoints.*safetensors.torch.save_file.*as a torch.export program",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    from dynamo_dist import cli  # the command says it too, and exits 2

    assert cli.main(["add-models", str(d), "--task", task_name, "--root", root]) == 2
    assert "are pickle checkpoints" in capsys.readouterr().err and not (tmp_path / "root").exists()


def test_nan_weights_and_nan_data_are_refused(tmp_path, task_name):
    m = MyGRU()
    with torch.no_grad():
        m.gru.weight_hh_l0[0, 0] = float("nan")
    root = str(tmp_path / "root")
    _refused(tmp_path, r"model 'a': weights \['gru.weight_hh_l0'\] contain NaN",
             lambda: user_models.add_models(root, {"a": m}, task_name, cfg=_cfg(root)))
    raw = dict(np.load(tmp_path / "data.npz"))
    raw["x_test"][3, 2, 1] = np.nan
    np.savez(tmp_path / "bad.npz", **raw)
    _refused(tmp_path, r"bad.npz: 'x_test' contain 1 NaN/Inf",
             lambda: user_models.add_models(root, {"a": MyGRU()}, f"npz:{tmp_path / 'bad.npz'}", cfg=_cfg(root)))
    raw = dict(np.load(tmp_path / "data.npz"))
    raw["y"] = raw["y"] + 0.5
    np.savez(tmp_path / "reg.npz", **raw)
    _refused(tmp_path, r"reg.npz: labels of 'x' are not integers",
             lambda: user_models.add_models(root, {"a": MyGRU()}, f"npz:{tmp_path / 'reg.npz'}", cfg=_cfg(root)))


# ------------------------------------------------------------------ torch.export programs


def _export(model: nn.Module, path: Path, batch: int = 4, dynamic: bool = True) -> Path:
    x = torch.randn(batch, T, D)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), str(path))
    return path


def test_torch_export_programs_are_hooked_by_submodule_name(tmp_path, task_name):
    """.pt2 files (no class to import): hidden states by the exported module's submodule names, through
    torch.export.unflatten; a last-step forward with its readout named, and a per-step one from Python."""
    d = tmp_path / "programs"
    d.mkdir()
    torch.manual_seed(0)
    grus = {"p0": MyGRU().eval(), "p1": MyGRU(hidden=8).eval()}
    for mid, m in grus.items():
        _export(m, d / f"{mid}.pt2")
    (d / "architecture.json").write_text(json.dumps({"hidden": ["gru"], "readout": "fc"}))
    root = str(tmp_path / "root")
    rows = user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root))
    assert [r["model_id"] for r in rows] == ["p0", "p1"] and rows[0]["program"] == "p0.pt2"
    bi = BiGRU().eval()
    program = torch.export.export(bi, (torch.randn(4, T, D),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    user_models.add_models(root, {"bi": program}, task_name, hidden=["rnn"])
    x = store.read_inputs(root, task_name, "probe").x
    for mid, m in {**grus, "bi": bi}.items():
        hidden, output, shapes = _read_back(root, mid)
        with torch.no_grad():
            if mid == "bi":
                h, y = m.rnn(x)[0], m(x)
            else:
                h = m.gru(x)[0]
                y = m.fc(h)
        assert shapes == [[h.shape[-1]]]
        np.testing.assert_allclose(hidden, h.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(output, y.numpy(), atol=1e-5, rtol=0)
    # the stored weights rebuild the program's module from its file
    again = adapters.load(store.Layout.at(root).path("weights/p1.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(x[:5]), grus["p1"](x[:5]), rtol=0, atol=1e-6)


def test_programs_that_cannot_be_read_safely_or_run_are_refused(tmp_path, task_name):
    import zipfile

    root = str(tmp_path / "root")
    d = tmp_path / "fixed"
    d.mkdir()
    _export(MyGRU(), d / "a.pt2", dynamic=False)
    (d / "architecture.json").write_text(json.dumps({"hidden": ["gru"], "readout": "fc"}))
    _refused(tmp_path, r"a.pt2: exported with a fixed batch size 4.*dynamic_shapes",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    _export(MyGRU(), d / "a.pt2")
    (d / "architecture.json").write_text(json.dumps({"readout": "fc"}))
    _refused(tmp_path, r"architecture.json: torch.export programs need it, naming the submodules",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "architecture.json").write_text(json.dumps({"hidden": ["gru"]}))
    _refused(tmp_path, r"program .*a.pt2: readout: MyGRU.forward returns|program .*a.pt2: .*name the readout",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    # a weight marked as pickled: torch.export.load would unpickle it; refused before
    with zipfile.ZipFile(d / "a.pt2") as z:
        items = {n: z.read(n) for n in z.namelist()}
    cfg_name = next(n for n in items if n.endswith("_weights_config.json"))
    config = json.loads(items[cfg_name])
    next(iter(config["config"].values()))["use_pickle"] = True
    items[cfg_name] = json.dumps(config).encode()
    with zipfile.ZipFile(d / "a.pt2", "w") as z:
        for n, b in items.items():
            z.writestr(n, b)
    (d / "architecture.json").write_text(json.dumps({"hidden": ["gru"], "readout": "fc"}))
    _refused(tmp_path, r"a.pt2: \['gru.weight_ih_l0'\] would be unpickled to load this program",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
    (d / "a.pt2").write_bytes(b"not a zip")
    _refused(tmp_path, r"a.pt2 is not a torch.export program written by torch.export.save",
             lambda: user_models.add_model_dir(root, str(d), task_name, cfg=_cfg(root)))
