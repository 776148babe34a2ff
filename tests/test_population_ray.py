"""Integration tests of the population stage on a local 2-CPU Ray (127.0.0.1): actors, faults, resume."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file

from dynamo_dist import zoo
from dynamo_dist.population import train as population
from dynamo_dist.data import store
from dynamo_dist.config import GroupSpec, PopulationConfig
from dynamo_dist.population.actors import run_population
from scripts_util import load_script

# serial (Makefile): with other test files beside it on a loaded machine a killed actor's CPU was not yet free
# when a test looked
pytestmark = [pytest.mark.integration, pytest.mark.serial, pytest.mark.usefixtures("local_ray")]

GROUPS = (
    GroupSpec(name="g8", task="mnist1d", arch="gru", hidden_size=8, num_seeds=6, epochs=1, batch_size=64),
    GroupSpec(name="g16", task="mnist1d", arch="gru", hidden_size=16, train_fraction=0.5, num_seeds=2, epochs=2,
              batch_size=64, every_epoch=True),
)
IDS = [f"g16-s{s:03d}-e{e:03d}" for s in range(2) for e in (1, 2)] + [f"g8-s{s:03d}" for s in range(6)]
NUM_PROBE, NUM_TEST, T = 64, 64, 40


def _cfg(root, **kw) -> PopulationConfig:
    return PopulationConfig(root=str(root), groups=GROUPS, num_examples=1000, num_probe=NUM_PROBE,
                            num_test=NUM_TEST, **kw)


@pytest.fixture(scope="module")
def ray_pop(tmp_path_factory):
    """The reference population, trained once by 2 actors."""
    cfg = _cfg(tmp_path_factory.mktemp("ray_pop") / "root")
    return cfg, run_population(cfg, progress=False)


def _weights_mtimes(root) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (Path(root) / "weights").glob("*.safetensors")}


def _assert_complete_and_readable(cfg: PopulationConfig, rows: list[dict]) -> None:
    """Every spec model once in the manifest, every file readable, no temp files."""
    ids = [r["model_id"] for r in store.manifest_rows(cfg.root, status=None)]
    assert ids == IDS  # sorted, each exactly once
    layout = store.Layout.at(cfg.root)
    for r in rows:
        zoo.load(layout.path(r["weights_path"]))
        for split, n in (("probe", NUM_PROBE), ("test", NUM_TEST)):
            assert store.read_trajectory(cfg.root, r["model_id"], split).num_examples == n
    assert not [p for p in layout.root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- the population


def test_manifest_has_exactly_the_models_and_their_accuracies(ray_pop):
    cfg, rows = ray_pop
    assert [r["model_id"] for r in rows] == IDS
    assert {r["group"] for r in rows} == {"g8", "g16"}
    task = population.task_for(cfg, "mnist1d")
    layout = store.Layout.at(cfg.root)
    for r in rows:
        model = zoo.load(layout.path(r["weights_path"]))
        assert r["test_accuracy"] == pytest.approx(population.accuracy(model, task.test.x, task.test.y))
    _assert_complete_and_readable(cfg, rows)


def test_trajectories_equal_a_forward_pass_via_pyarrow_and_duckdb(ray_pop):
    cfg, rows = ray_pop
    layout = store.Layout.at(cfg.root)
    x = store.read_inputs(cfg.root, "mnist1d", "probe").x
    ds = pads.dataset(layout.root / "trajectories", format="parquet", partitioning="hive")
    glob = store.trajectory_glob(cfg.root, "probe")
    shapes = dict(((m, (n, t, h)) for m, n, t, h in duckdb.sql(
        f"select model_id, count(distinct sample), max(step), max(len(hidden)) "
        f"from read_parquet('{glob}', hive_partitioning=1) group by model_id").fetchall()))
    assert shapes == {r["model_id"]: (NUM_PROBE, T, r["hidden_size"]) for r in rows}
    for r in rows:
        with torch.no_grad():
            hs, out = zoo.load(layout.path(r["weights_path"])).trajectories(x)
        table = ds.to_table(filter=(pads.field("model_id") == r["model_id"]) & (pads.field("split") == "probe"))
        h_arrow = np.array(table.column("hidden").to_pylist(), np.float32).reshape(NUM_PROBE, T, -1)
        np.testing.assert_allclose(h_arrow, hs[0].numpy(), rtol=0, atol=1e-6)
        last = duckdb.sql(
            f"select output from read_parquet('{glob}', hive_partitioning=1) "
            f"where model_id = '{r['model_id']}' and sample = 7 and step = {T}").fetchall()[0][0]
        np.testing.assert_allclose(np.array(last, np.float32), out[7, -1].numpy(), rtol=0, atol=1e-6)


def test_ray_population_equals_the_sequential_loop(ray_pop, tmp_path):
    cfg, rows = ray_pop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' setting: same kernels, same floating-point order
    try:
        local_rows = population.run_local(cfg.replace(root=str(tmp_path / "local")), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [r["test_accuracy"] for r in local_rows] == [r["test_accuracy"] for r in rows]
    for r in rows:
        a = load_file(str(Path(cfg.root) / r["weights_path"]))
        b = load_file(str(tmp_path / "local" / r["weights_path"]))
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- faults and resume


def test_actor_killed_mid_population_is_replaced_and_run_completes(ray_pop, tmp_path):
    ref_cfg, ref_rows = ray_pop
    cfg = _cfg(tmp_path / "root")
    killed, later_actors = [], []

    def kill_first_actor_once(rows, actors):
        if not killed:
            killed.append(actors[0]._actor_id.hex())
            ray.kill(actors[0], no_restart=True)
        else:
            later_actors.append({a._actor_id.hex() for a in actors})

    rows = run_population(cfg, progress=False, on_progress=kill_first_actor_once)
    assert later_actors and killed[0] not in later_actors[-1]  # a replacement took its place
    _assert_complete_and_readable(cfg, rows)
    # the lost jobs were re-run from scratch: same models as the undisturbed run
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in ref_rows]


def test_stacked_units_on_actors_survive_a_killed_actor_and_equal_models_trained_alone(ray_pop, tmp_path):
    ref_cfg, ref_rows = ray_pop
    cfg = _cfg(tmp_path / "root", models_per_actor=2)
    assert [len(u) for u in population.work_units(cfg, population.expand(cfg))] == [2, 2, 2, 2]  # all 4 in flight
    completions, killed, later = [], [], []

    def kill_an_actor_once(rows, actors):
        if not killed:  # both actors still hold a unit: the killed one's is re-run elsewhere
            killed.append(actors[0]._actor_id.hex())
            ray.kill(actors[0], no_restart=True)
        else:
            later.append({a._actor_id.hex() for a in actors})
        completions.extend(r["model_id"] for r in rows)

    rows = run_population(cfg, progress=False, on_progress=kill_an_actor_once)
    assert later and killed[0] not in later[-1]
    _assert_complete_and_readable(cfg, rows)
    assert sorted(completions) == IDS  # every model exactly once
    for r, ref in zip(rows, ref_rows):
        a, b = load_file(str(Path(cfg.root) / r["weights_path"])), load_file(str(Path(ref_cfg.root) / ref["weights_path"]))
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in b), r["model_id"]


@ray.remote(num_cpus=1)
class _CpuHolder:
    """Takes a CPU away from the population, as a lost node would."""

    def ready(self) -> bool:
        return True


def test_a_dead_actors_jobs_go_to_the_live_one_when_its_replacement_cannot_be_placed(ray_pop, tmp_path):
    ref_cfg, ref_rows = ray_pop
    cfg = _cfg(tmp_path / "root", num_actors=2, placement_timeout_s=600)
    holders, completions = [], []

    def kill_one_and_take_its_cpu(rows, actors):
        completions.extend(r["model_id"] for r in rows)
        if not holders:
            ray.kill(actors[0], no_restart=True)
            holders.append(_CpuHolder.remote())
            ray.get(holders[0].ready.remote(), timeout=120)  # the freed CPU is gone before a replacement asks

    try:
        rows = run_population(cfg, progress=False, on_progress=kill_one_and_take_its_cpu)
    finally:
        for h in holders:
            ray.kill(h)
    _assert_complete_and_readable(cfg, rows)
    assert sorted(completions) == IDS  # every model exactly once, on the surviving actor
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in ref_rows]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2  # the unplaced replacement was cancelled


def test_jobs_with_no_placeable_actor_fail_after_the_bound_naming_the_resources(tmp_path):
    cfg = _cfg(tmp_path / "root", num_actors=1, cpus_per_actor=2, placement_timeout_s=2)
    holders = []

    def kill_the_actor_and_take_a_cpu(rows, actors):
        if not holders:
            ray.kill(actors[0], no_restart=True)
            holders.append(_CpuHolder.remote())
            ray.get(holders[0].ready.remote(), timeout=120)
            # until this process's view of the cluster has the killed actor's other CPU free (the stage
            # reads the same view for its message): on a loaded machine it lagged, and the message said
            # "{} free" (serial make test pass, load 6)
            deadline = time.monotonic() + 60
            while ray.available_resources().get("CPU") != 1 and time.monotonic() < deadline:
                time.sleep(0.1)

    t = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"no population actor could be placed for \d+ s \(population\."
                                               r"placement_timeout_s=2.0\): each needs \{'CPU': 2.0\}; the "
                                               r"cluster has \{'CPU': 1.0\} free of \{'CPU': 2.0\}"):
            run_population(cfg, progress=False, on_progress=kill_the_actor_and_take_a_cpu)
    finally:
        for h in holders:
            ray.kill(h)
    assert time.monotonic() - t < 120
    assert 1 <= len(store.manifest_rows(cfg.root)) < len(IDS)  # what finished is kept


def test_retries_are_bounded_and_the_error_names_the_model(tmp_path):
    cfg = _cfg(tmp_path / "root")

    def kill_first_actor(rows, actors):
        ray.kill(actors[0], no_restart=True)

    with pytest.raises(RuntimeError, match=r"model (g8|g16)-s\d{3}(-e\d{3})?: lost its population actor 1 time\(s\) "
                                           r"\(max_retries=0\)"):
        run_population(cfg, progress=False, max_retries=0, on_progress=kill_first_actor)
    done = store.manifest_rows(cfg.root)
    assert 1 <= len(done) < len(IDS)  # what finished before the failure is recorded, and readable
    for r in done:
        store.read_trajectory(cfg.root, r["model_id"], "test")


def test_interrupted_run_rerun_skips_completed_models_and_ends_with_the_same_manifest(ray_pop, tmp_path):
    ref_cfg, ref_rows = ray_pop
    cfg = _cfg(tmp_path / "root")
    seen: list[str] = []

    def interrupt_after_three(rows, actors):
        seen.extend(r["model_id"] for r in rows)
        if len(seen) >= 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a driver crash

    with pytest.raises(KeyboardInterrupt):
        run_population(cfg, progress=False, on_progress=interrupt_after_three)
    first = {r["model_id"] for r in store.manifest_rows(cfg.root)}
    assert set(seen) <= first and 3 <= len(first) < len(IDS)
    mtimes = _weights_mtimes(cfg.root)

    rerun: list[str] = []
    rows = run_population(cfg, progress=False,
                          on_progress=lambda rows, actors: rerun.extend(r["model_id"] for r in rows))
    assert sorted(rerun) == sorted(set(IDS) - first)  # nothing completed was trained again
    assert {m: t for m, t in _weights_mtimes(cfg.root).items() if m in first} == {m: mtimes[m] for m in first}
    # the weights file embeds its manifest row, train_seconds included, in a header padded to 8 bytes: its
    # size follows the length of that number (5728 vs 5736 bytes seen), so it is compared as the file's own
    strip = ("train_seconds", "weights_bytes")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in ref_rows]
    layout = store.Layout.at(cfg.root)
    assert all(r["weights_bytes"] == os.path.getsize(layout.path(r["weights_path"])) for r in rows)
    _assert_complete_and_readable(cfg, rows)


def test_complete_population_rerun_starts_no_actor_and_prints_the_summary(ray_pop, capsys):
    cfg, rows = ray_pop
    mtimes = _weights_mtimes(cfg.root)
    again = run_population(cfg, progress=True)
    assert again == rows and _weights_mtimes(cfg.root) == mtimes
    out = capsys.readouterr().out
    acc8 = [r["test_accuracy"] for r in rows if r["group"] == "g8"]
    assert f"g8: 6 models, test accuracy {np.mean(acc8):.3f} ± {np.std(acc8):.3f}" in out
    assert "g16: 4 models" in out


def test_bad_root_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        run_population(_cfg(tmp_path / "file" / "root"), progress=False)


# ---------------------------------------------------------------- the job entry point


def _job_main():
    return load_script("jobs/train_population.py").main


def test_job_script_runs_a_config_file(ray_pop, tmp_path, capsys):
    cfg, rows = ray_pop
    path = tmp_path / "pipeline.yaml"
    # a pipeline config whose population is the reference one: the job resumes it (nothing left to train)
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "population": cfg.model_dump(mode="json")}))
    mtimes = _weights_mtimes(cfg.root)
    assert _job_main()(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(IDS)} complete models" in out and "g8: 6 models" in out and "g16: 4 models" in out
    assert _weights_mtimes(cfg.root) == mtimes and store.manifest_rows(cfg.root) == rows
    # the stage's MLflow run, in the config's default store (SQLite under meta.output_dir)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "population" and run.data.params["num_models"] == str(len(IDS))
    assert run.data.metrics["g8.count"] == 6 and run.data.metrics["failed_models"] == 0


def test_job_script_exits_nonzero_with_the_message_on_bad_input(tmp_path, capsys):
    main = _job_main()
    assert main(["--recipe", "smoke", "--set", "population.dtype=float64"]) == 2
    assert "population.dtype" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_a_diverging_model_is_recorded_as_failed_while_the_others_complete(tmp_path, capsys):
    diverging = GroupSpec(name="bad", task="mnist1d", arch="gru", hidden_size=8, num_seeds=1, epochs=1,
                          batch_size=64, lr=1e30)  # NaN weights -> NaN trajectory, refused by the writer
    cfg = PopulationConfig(root=str(tmp_path / "root"), groups=(diverging, GROUPS[0]), num_examples=1000,
                           num_probe=NUM_PROBE, num_test=NUM_TEST, max_failed_models=1)
    rows = run_population(cfg, progress=True)
    assert [r["model_id"] for r in rows] == [f"g8-s{s:03d}" for s in range(6)]
    out = capsys.readouterr().out
    assert "g8: 6 models" in out and "failed: 1 model(s)" in out and "bad-s000" in out
    (bad,) = [r for r in store.manifest_rows(cfg.root, status=None) if r["status"] == "failed"]
    assert bad["model_id"] == "bad-s000" and "NaN" in bad["error"]
    with pytest.raises(ValueError, match=r"1 model\(s\) failed \(population.max_failed_models=0\); first: model bad-s000"):
        run_population(cfg.replace(max_failed_models=0), progress=False)  # the re-run retries it, and it fails again


def test_a_failed_population_stage_is_a_failed_mlflow_run_with_the_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from dynamo_dist import config
    from dynamo_dist.pipeline import population_stage

    diverging = GroupSpec(name="bad", task="mnist1d", arch="gru", hidden_size=8, num_seeds=1, epochs=1,
                          batch_size=64, lr=1e30)
    pop = PopulationConfig(root=str(tmp_path / "run" / "population"), groups=(GROUPS[0].replace(num_seeds=2), diverging),
                           num_examples=1000, num_probe=NUM_PROBE, num_test=NUM_TEST)
    cfg = config.parse(config.PipelineConfig, {"run_dir": str(tmp_path / "run"), "population": pop.model_dump(mode="json")})
    with pytest.raises(ValueError, match="1 model\\(s\\) failed"):
        population_stage(cfg, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "population" and run.info.status == "FAILED"
    assert "bad-s000" in run.data.tags["dynamo.error"] and run.data.metrics["failed_models"] == 1
    assert run.data.metrics["g8.count"] == 2  # the models completed before the failure
