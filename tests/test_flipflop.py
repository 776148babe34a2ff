"""The flip-flop worked example (issue 28): a user's GRU/LSTM population on the 3-bit flip-flop task.

The models are trained by the user's own loop (examples/flipflop/flipflop.py), saved as safetensors state
dicts, brought in with one add-models call (architecture.json names ``flipflop:build``) and embedded. The
known answer: a solution of the task stores 3 bits, i.e. has 8 stable fixed points under zero input whose
readouts are the 8 sign patterns (Sussillo & Barak 2013). It is checked on the recorded base models (through
their hooks) and on the trained meta-model at each member's θ_n, read out by the meta readout G~ at θ_n
(examples/flipflop/run_example.py: the search and the count).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynamo_dist import adapters
from dynamo_dist.config import MetaConfig, PopulationConfig
from dynamo_dist.data import store
from dynamo_dist.data.tasks import load_task
from dynamo_dist.population import user_models

EXAMPLE = Path(__file__).parent.parent / "examples" / "flipflop"
sys.path.insert(0, str(EXAMPLE))
import flipflop  # noqa: E402 -- the user's package, beside the example
import run_example  # noqa: E402 -- the example's fixed-point search and count

MEMBERS = {"gru-1": ("gru", 1), "lstm-1": ("lstm", 1)}  # 2-layer members: see docs/user-models.md (measured)
HIDDEN = run_example.HIDDEN


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("flipflop")
    x, y = flipflop.make_data(800, seed=0)
    np.savez(tmp / "flipflop.npz", x=x, y=y)
    task_name = f"npz:{tmp / 'flipflop.npz'}"
    task = load_task(task_name)
    d = tmp / "models"
    d.mkdir()
    models = {}
    for mid, (cell, layers) in MEMBERS.items():
        torch.manual_seed(0)
        models[mid] = flipflop.build(cell, layers, HIDDEN)
        flipflop.train(models[mid], task.base_train.x, task.base_train.y, steps=600)
        save_file({k: v.detach().contiguous() for k, v in models[mid].state_dict().items()}, str(d / f"{mid}.safetensors"))
    # one kwargs for the directory: the cell is the only difference, so each member is its own directory here
    root = str(tmp / "root")
    for mid, (cell, layers) in MEMBERS.items():
        sub = tmp / mid
        sub.mkdir()
        (sub / f"{mid}.safetensors").write_bytes((d / f"{mid}.safetensors").read_bytes())
        (sub / "architecture.json").write_text(json.dumps({"factory": "flipflop:build",
                                                           "kwargs": {"cell": cell, "layers": layers, "hidden": HIDDEN}}))
        user_models.add_model_dir(root, str(sub), task_name, cfg=PopulationConfig(root=root, num_probe=200, num_test=100),
                                  group=cell)
    yield {"root": root, "task": task, "task_name": task_name}
    torch.set_num_threads(before)


def test_the_users_models_solve_the_task(population):
    rows = {r["model_id"]: r for r in store.manifest_rows(population["root"])}
    assert set(rows) == set(MEMBERS) and all(r["output_kind"] == "regression" for r in rows.values())
    assert all(r["test_r2"] > 0.95 for r in rows.values()), {m: r["test_r2"] for m, r in rows.items()}


def test_fixed_points_of_the_recorded_models_are_the_tasks_attractors(population):
    """Through the stored weights (rebuilt by the user's factory) and their hooks."""
    layout = store.Layout.at(population["root"])
    probe_x = population["task"].probe.x[:100]
    models = {mid: adapters.load(layout.path(layout.weights_rel(mid))) for mid in MEMBERS}
    found = {mid: run_example.attractors(run_example.base_fixed_points(m, probe_x)) for mid, m in models.items()}
    assert all(v == (8, 8) for v in found.values()), found  # 8 stable points, one per sign pattern of the 3 bits


def test_the_meta_model_has_the_tasks_attractors_at_each_theta(population, tmp_path):
    """The meta-model trained on the population, at each member's θ_n: h -> F~(θ_n, 0, h) has 8 stable fixed
    points, read out by G~(θ_n) as the 8 sign patterns. Emulation alone does not give it: with a meta GRU of
    64 units this test found (7, 7) at the GRU's θ and (4, 4) at the LSTM's (docs/user-models.md)."""
    from dynamo_dist.meta.local import run_meta_local
    from dynamo_dist.meta.outputs import load_meta_run

    summary = run_meta_local(MetaConfig(output_dir=str(tmp_path / "meta"), **run_example.META), population["root"],
                             progress=False)
    assert summary["num_models"] == len(MEMBERS), summary
    assert summary["mean_output_r2"] > 0.95 and summary["mean_hidden_r2"] > 0.9, summary
    run = load_meta_run(tmp_path / "meta")
    probe_x = population["task"].probe.x[:100]
    task_name = population["task_name"]  # the meta readout's group: models of one task share a head
    found = {mid: run_example.attractors(run_example.meta_fixed_points(run.meta, theta, task_name, probe_x))
             for mid, theta in zip(run.model_ids, run.theta())}
    assert all(v == (8, 8) for v in found.values()), found
