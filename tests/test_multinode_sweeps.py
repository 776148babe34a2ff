"""Sweeps on a real 2-node Ray cluster on this machine (test_multinode.py's cluster and fixtures, a
cluster of this module's own): the worker node dies mid-trial, and ASHA over 2-worker Train trials frees
the workers of the trials it stops. A module of its own so that `make test`'s parallel workers run it
beside test_multinode.py; each takes minutes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_multinode import cluster, s3, small_population, tracking, two_nodes  # noqa: F401 -- fixtures

from dynamo_dist.data.lock import LOCK_FILE

pytestmark = pytest.mark.integration


def test_a_sweep_whose_worker_node_dies_finishes_every_trial(two_nodes, tracking, small_population, tmp_path):
    """Two trials at once, one per node; the worker node dies mid-trial: its trial runs again on the
    head (sweep trials retry up to meta.max_failures) and the sweep ends with both trials finished."""
    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "population": {"root": str(small_population)},
           "meta": {"hidden_size": 16, "embedding_dim": 2, "steps": 400, "batch_size": 8, "models_per_step": 2,
                    "checkpoint_every": 400, "eval_every": 100, "max_failures": 2, "seed": 0},
           "sweep": {"output_weight": [0.0, 1.0], "embedding_dim": [2], "max_concurrent_trials": 2}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = two_nodes["env"]
    driver = subprocess.Popen([sys.executable, "-m", "dynamo_dist.cli", "sweep", "--config", str(path),
                               "--address", two_nodes["address"], "--tracking-uri", tracking],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while len(list(run_dir.glob(f"sweep/*/trial-*/{LOCK_FILE}"))) < 2 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the two trials never ran at once"
    two_nodes["worker"].kill()  # with the trial running there
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    (table,) = run_dir.glob("sweep/*/trials.json")
    trials = json.loads(table.read_text())
    assert sorted(t["output_weight"] for t in trials) == [0.0, 1.0]
    assert all(t["status"] == "TERMINATED" and t["steps"] == 400 for t in trials), trials
    for t in trials:
        assert json.loads((Path(t["output_dir"]) / "summary.json").read_text())["num_models"] == 4


def test_an_asha_sweep_of_two_worker_train_trials_frees_the_workers_of_stopped_trials(two_nodes, tracking,
                                                                                     small_population, tmp_path):
    """ASHA over Ray Train trials of 2 workers, one per node (the cluster holds one trial at a time),
    ranked on the training loss, which lambda=1's output term makes larger than lambda=0's by
    construction: the lambda=1 trial after a lambda=0 one is stopped at the first rung, its workers
    are freed (the next trial trains on both nodes) and the sweep finishes with every trial."""
    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "population": {"root": str(small_population)},
           # steps enough that a stopped trial's workers cannot finish before Tune's stop reaches them (the
           # first rung is at step 100, reported at 120)
           "meta": {"hidden_size": 16, "embedding_dim": 2, "steps": 400, "batch_size": 8, "models_per_step": 2,
                    "checkpoint_every": 40, "eval_every": 40, "max_failures": 1, "seed": 0},
           "sweep": {"output_weight": [0.0, 1.0, 0.0], "embedding_dim": [2], "scheduler": "asha", "metric": "loss",
                     "workers_per_trial": 2, "max_concurrent_trials": 2}}
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "dynamo_dist.cli", "sweep", "--config", str(path),
                          "--address", two_nodes["address"], "--tracking-uri", tracking],
                         capture_output=True, text=True, env=two_nodes["env"], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (table,) = run_dir.glob("sweep/*/trials.json")
    trials = sorted(json.loads(table.read_text()), key=lambda t: t["trial"])
    assert [t["output_weight"] for t in trials] == [0.0, 1.0, 0.0]
    first, stopped, last = trials
    seen = f"{[(t['output_weight'], t['status'], t['steps'], t['num_reports']) for t in trials]}\n{res.stdout[-4000:]}"
    assert first["status"] == "TERMINATED" and first["steps"] == 400, seen
    assert stopped["status"] == "STOPPED_EARLY" and stopped["steps"] < 400, seen
    # the stopped trial's 2 workers were freed: the last trial trained on both nodes past the first rung
    assert last["status"] in ("TERMINATED", "STOPPED_EARLY") and last["steps"] >= 120
    for t in trials:  # every trial has outputs: a stopped one from its latest checkpoint
        summary = json.loads((Path(t["output_dir"]) / "summary.json").read_text())
        assert summary["num_models"] == 4 and summary["num_workers"] == 2
