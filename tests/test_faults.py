"""Faults a user meets: damaged or lost files on resume, two stages on one root, bad input.

Real processes (the ``dynamo-dist`` CLI in subprocesses), real files. Each battery case
asserts the exit code, that the message names the field or path, and that the sha256 of
every file that existed before is unchanged (the lock file excepted: it records its holder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dynamo_dist.config import GroupSpec, PopulationConfig
from dynamo_dist.data import lock, store
from dynamo_dist.population import repair as repair_mod
from dynamo_dist.population import train as population

pytestmark = pytest.mark.integration  # starts Ray (and CLI subprocesses that do)
GROUPS = (GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=8, num_seeds=2, epochs=1, batch_size=64),
          GroupSpec(name="b", task="mnist1d", arch="rnn", hidden_size=8, num_seeds=1, epochs=1, batch_size=64))
IDS = ["a-s000", "a-s001", "b-s000"]


def _cfg(root, **kw) -> PopulationConfig:
    return PopulationConfig(root=str(root), groups=GROUPS, num_examples=1000, num_probe=32, num_test=32, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_population):
    return tiny_population(tmp_path_factory.mktemp("trained") / "population", *GROUPS)


@pytest.fixture
def root(trained, tmp_path):
    """A private copy of the trained root."""
    return Path(shutil.copytree(trained, tmp_path / "population"))


def _digests(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and p.name != lock.LOCK_FILE}


def _mtimes(base: Path, sub: str = "weights") -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (base / sub).glob("*")}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamo_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _write_config(path: Path, root: Path, **population) -> Path:
    spec = json.loads((root / "population.json").read_text())["spec"] if (root / "population.json").is_file() else \
        _cfg(root).model_dump(mode="json")
    data = {"run_dir": str(path.parent / "run"), "population": {**spec, "root": str(root), **population}}
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- integrity on resume


@pytest.mark.parametrize("kind", ["probe", "weights"])
def test_a_damaged_file_is_retrained_alone(root, kind, capsys):
    row = next(r for r in store.manifest_rows(root) if r["model_id"] == "a-s001")
    _truncate(root / row[f"{kind}_path"])
    others = {k: v for k, v in _mtimes(root).items() if not k.startswith("a-s001")}
    assert population.completed_ids(str(root)) == {"a-s000", "b-s000"}

    population.run_local(_cfg(root), progress=True)
    out = capsys.readouterr().out
    assert f"model a-s001: {kind} file {root / row[f'{kind}_path']} has" in out and "retraining it" in out
    assert {k: v for k, v in _mtimes(root).items() if not k.startswith("a-s001")} == others  # only it retrained
    assert population.completed_ids(str(root)) == set(IDS)
    store.read_trajectory(root, "a-s001")  # readable again


def test_a_lost_manifest_is_rebuilt_from_the_files_without_retraining(root, capsys):
    before = {r["model_id"]: r for r in store.manifest_rows(root)}
    weights = _mtimes(root)
    (root / "manifest.parquet").unlink()

    population.run_local(_cfg(root), progress=True)
    assert "rebuilding it from the files" in capsys.readouterr().out
    assert _mtimes(root) == weights  # nothing retrained over the existing models
    after = {r["model_id"]: r for r in store.manifest_rows(root)}
    assert sorted(after) == IDS
    for mid, r in before.items():
        for k in ("group", "seed", "train_fraction", "test_accuracy", "probe_bytes", "test_bytes", "weights_bytes",
                  "hidden_size", "arch", "train_seconds"):
            assert after[mid][k] == r[k], (mid, k)


def test_repair_restores_lost_rows_and_marks_damaged_models_failed(root):
    import pyarrow.compute as pc

    table = pq.read_table(root / "manifest.parquet")
    keep = pc.not_equal(table.column("model_id"), "b-s000")
    pq.write_table(table.filter(keep), root / "manifest.parquet")  # a lost row
    _truncate(root / "trajectories/split=test/model_id=a-s000/part-0.parquet")

    res = _cli("repair", "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert "1 row(s) restored, 1 damaged" in res.stdout and "damaged a-s000: test file" in res.stdout
    rows = {r["model_id"]: r for r in store.manifest_rows(root, status=None)}
    assert rows["b-s000"]["status"] == "complete" and rows["a-s001"]["status"] == "complete"
    assert rows["a-s000"]["status"] == "failed" and rows["a-s000"]["error"].startswith("damaged: test file")
    # the next population run retrains the damaged model, and only it
    assert [j.model_id for j in population.pending_jobs(str(root), _cfg(root))] == ["a-s000"]


def test_repair_of_a_root_with_no_manifest_rebuilds_it(root):
    (root / "manifest.parquet").unlink()
    res = repair_mod.repair(str(root), progress=False)
    assert res["rebuilt"] and res["complete"] == 3 and not res["damaged"] and not res["unrecoverable"]


# ---------------------------------------------------------------- one writer per root


def test_a_second_stage_on_a_root_in_use_is_refused_and_the_first_finishes(tmp_path):
    """A real population stage holds its root; a second population and a meta stage are refused at once."""
    cfg_path = tmp_path / "pop.yaml"
    root = tmp_path / "population"
    _write_config(cfg_path, root)
    first = subprocess.Popen([sys.executable, "-m", "dynamo_dist.cli", "population", "--config", str(cfg_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lock_file = root / lock.LOCK_FILE
        while not (lock_file.is_file() and lock_file.read_text()) and time.monotonic() < deadline:
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        second = _cli("population", "--config", str(cfg_path))
        reader = _cli("meta", "--config", str(cfg_path))
    finally:
        out, _ = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    assert f"population root {root} is in use by population (pid {first.pid}" in second.stderr
    assert reader.returncode == 2 and f"population root {root} is in use by population" in reader.stderr
    assert first.returncode == 0, out
    assert sorted(r["model_id"] for r in store.manifest_rows(root)) == IDS  # nothing lost


def test_the_lock_is_freed_when_its_holder_is_killed(tmp_path):
    d = tmp_path / "dir"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dynamo_dist.data import lock\n"
                               f"with lock.hold({str(d)!r}, 'population'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.LockedError, match=f"in use by population \\(pid {holder.pid}"):
        with lock.hold(d, "meta", shared=True):
            pass
    holder.kill()
    holder.wait()
    with lock.hold(d, "population"):  # SIGKILL left no stale lock
        pass


def test_a_process_re_enters_its_own_lock():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with lock.hold(d, "run"), lock.hold(d, "population"), lock.hold(d, "meta", shared=True):
            pass


# ---------------------------------------------------------------- the battery


def _battery_case(tmp_path, args, code, needles, new_files: bool = False):
    """Run the CLI; check exit code, message, pre-existing files unchanged (and, unless ``new_files``,
    that nothing was written at all: the error came before any work)."""
    before = _digests(tmp_path)
    res = _cli(*args)
    assert res.returncode == code, (res.stdout, res.stderr)
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert "Traceback" not in res.stderr
    after = _digests(tmp_path)
    assert {k: after.get(k) for k in before} == before  # nothing that existed was changed
    if not new_files:
        assert sorted(after) == sorted(before)
    return res


def test_changed_recording_settings_are_refused(root, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", root, num_probe=16)
    _battery_case(tmp_path, ["population", "--config", str(cfg)], 2,
                  ["population.num_probe is 16 here but 32 in", str(root / "population.json")])


def _smoke_args(run_dir: Path, *sets: str) -> list[str]:
    return ["--recipe", "smoke", "--set", f"run_dir={run_dir}", *[a for s in sets for a in ("--set", s)]]


def test_unknown_task_is_refused_before_any_work(tmp_path):
    res = _battery_case(tmp_path, ["population", *_smoke_args(tmp_path / "run", "population.groups.0.task=nope")],
                        2, ["population.groups.0.task (from --set population.groups.0.task='nope')",
                            "unknown task 'nope'"])
    assert not (tmp_path / "run").exists() and "recipe smoke" in res.stderr


def test_booleans_are_not_numbers(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"recipe": "smoke", "run_dir": str(tmp_path / "run")})
                   + "population:\n  groups:\n    - {name: a, num_seeds: yes}\n")
    _battery_case(tmp_path, ["population", "--config", str(cfg)], 2,
                  [f"invalid config {cfg}", "population.groups.0.num_seeds: Value error, expected a number or name, "
                                            "got the boolean True"])
    _battery_case(tmp_path, ["meta", "--config", str(cfg), "--set", "meta.steps=true"], 2,
                  ["meta.steps (from --set meta.steps=True)"])


def test_a_file_where_the_run_dir_should_be(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    _battery_case(tmp_path, ["population", *_smoke_args(tmp_path / "run")], 2,
                  [f"run_dir {tmp_path / 'run'} (the MLflow store's home) is not writable", "a file is in the way"])


def test_a_pickle_payload_in_a_checkpoint_is_refused_naming_it(trained, tmp_path):
    import torch

    from dynamo_dist.config import MetaConfig, dump

    meta = tmp_path / "meta"
    meta.mkdir()
    dump(MetaConfig(output_dir=str(meta)), meta / "meta_config.yaml")
    (meta / "meta_run.json").write_text(json.dumps({"population_root": str(trained)}))
    (meta / "checkpoint").mkdir()
    torch.save({"step": 1, "payload": Path("x")}, meta / "checkpoint" / "shared.pt")  # a non-tensor object
    _battery_case(tmp_path, ["analyze", "--meta-dir", str(meta), "--no-log"], 2,
                  [f"checkpoint {meta / 'checkpoint' / 'shared.pt'} holds objects other than tensors"], new_files=True)


# Ctrl-C and the rerun that resumes: tests/test_console.py::test_ctrl_c_is_one_line_and_a_rerun_resumes


@pytest.fixture(scope="module")
def meta_run(trained, tmp_path_factory):
    """A real (2-worker Ray Train) meta run on a copy of the trained root, inside one run_dir."""
    run_dir = tmp_path_factory.mktemp("metarun") / "run"
    shutil.copytree(trained, run_dir / "population")
    args = _smoke_args(run_dir, "meta.steps=10", "meta.checkpoint_every=5", "meta.eval_every=5",
                       "meta.num_workers=2", "meta.val_models=2")
    res = _cli("meta", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, args


def test_a_resume_with_other_shapes_is_refused_in_the_driver(meta_run, tmp_path):
    run_dir, args = meta_run
    t = time.monotonic()
    res = _cli("meta", *args, "--set", "meta.embedding_dim=3")
    assert res.returncode == 2, res.stderr
    assert "embedding_dim: checkpoint 2 vs config 3" in res.stderr and f"meta.output_dir {run_dir / 'meta'}" in res.stderr
    assert "Traceback" not in res.stderr and time.monotonic() - t < 60  # no Ray Train retries


def test_a_moved_run_dir_reads_its_own_population(meta_run, tmp_path):
    from dynamo_dist.meta.outputs import load_meta_run

    run_dir, _ = meta_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "moved"))
    moved = load_meta_run(copy / "meta")
    assert moved.population_root == str(copy / "population") and moved.cfg.output_dir == str(copy / "meta")
    # only the meta dir copied: it still reads the population it was trained on
    alone = Path(shutil.copytree(run_dir / "meta", tmp_path / "alone"))
    assert load_meta_run(alone).population_root == str(run_dir / "population")


@pytest.fixture
def ray_with_short_starts(monkeypatch):
    """A local 2-CPU Ray whose Train worker groups give up a start attempt after 5 s (Ray's default: 60 s)."""
    import ray

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")  # read by the Train controller actor
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_meta_workers_that_cannot_be_placed_fail_after_the_bound(trained, tmp_path, ray_with_short_starts,
                                                                  monkeypatch, capsys):
    from dynamo_dist.config import MetaConfig
    from dynamo_dist.meta import ray_train
    from dynamo_dist.meta.ray_train import run_meta

    monkeypatch.setattr(ray_train, "WAIT_NOTICE_S", 3.0)

    ray = ray_with_short_starts

    @ray.remote(num_cpus=1)
    class Holder:  # a lost node: one of the two CPUs is gone
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote(), timeout=120)
    cfg = MetaConfig(output_dir=str(tmp_path / "meta"), num_workers=2, steps=5, hidden_size=8, embedding_dim=2,
                     batch_size=8, models_per_step=1, placement_timeout_s=10)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"meta: 2 Ray Train worker\(s\) of 1 CPU each could not be placed within "
                                           r"meta.placement_timeout_s=10.0 s; the cluster has \{'CPU': 1.0\} free"):
        run_meta(cfg, str(trained), progress=True)
    assert time.monotonic() - t < 120
    out = capsys.readouterr()
    assert "waiting for 2 Ray Train worker(s) of 1 CPU each to start (free now: {'CPU': 1.0}" in out.out + out.err
