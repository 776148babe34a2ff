"""Ray Tune sweeps tracked in MLflow (issue 5).

Fast unit tests first (no Ray, no server). The integration tests share ONE module-scoped
Ray (2 CPUs), one tiny MNIST-1D population and one real ``mlflow server`` on 127.0.0.1
(SQLite backend + proxied artifact store in tmp_path, stopped by its own pid), run one
sweep of 4 trials with 2 at a time, and read everything back with ``MlflowClient``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from dynamo_dist.config import GroupSpec, MetaConfig, SweepConfig, TrackingConfig
from dynamo_dist.meta.tune import markdown_table, rank_trials, run_sweep, silhouette_by, trial_dirname
import servers
from scripts_util import load_script

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 20, 5
GRID = {"output_weight": (0.0, 1.0), "embedding_dim": (2, 3), "hidden_distance": ("l2",)}


# ---------------------------------------------------------------- unit tests


def _emb(theta, groups) -> pa.Table:
    return pa.table({"theta": pa.array([list(map(float, t)) for t in theta], pa.list_(pa.float32())),
                     "group": pa.array(groups)})


def test_silhouette_known_answers():
    rng = np.random.default_rng(0)
    tight = np.concatenate([rng.normal(0, 0.01, (5, 3)), rng.normal(10, 0.01, (5, 3))])
    labels = ["a"] * 5 + ["b"] * 5
    assert silhouette_by(_emb(tight, labels)) > 0.99
    # same points, labels that cut across the two clusters: negative or ~0
    assert silhouette_by(_emb(tight, ["a", "b"] * 5)) < 0.05
    assert silhouette_by(_emb(tight, ["a"] * 10)) is None            # one label: undefined
    assert silhouette_by(_emb(tight, labels), label="arch") is None  # column absent


def test_rank_trials_and_names():
    rows = [{"trial": "t0", "val_agreement": 0.5}, {"trial": "t1", "val_agreement": None},
            {"trial": "t2", "val_agreement": 0.9}, {"trial": "t3", "val_agreement": 0.5}]
    ranked = rank_trials(rows, "val_agreement")  # max; ties by name; missing last
    assert [(r["trial"], r["rank"]) for r in ranked] == [("t2", 1), ("t0", 2), ("t3", 3), ("t1", 4)]
    rows[0]["loss"], rows[2]["loss"] = 0.3, 0.1
    assert [r["trial"] for r in rank_trials(rows, "loss")] == ["t2", "t0", "t1", "t3"]  # min
    assert trial_dirname("ab12c_00007", {"output_weight": 0.5, "embedding_dim": 8, "hidden_distance": "l1"}) == \
        "trial-00007-lam0.5-d8-l1"
    md = markdown_table([{"trial": "t", "val_agreement": 0.12345, "silhouette_group": None}])
    assert "0.123" in md and "–" in md


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def population(tmp_path_factory, tiny_population) -> str:
    groups = tuple(GroupSpec(name=n, task="mnist1d", arch="gru", hidden_size=8, train_fraction=f, num_seeds=2,
                             epochs=1) for n, f in (("full", 1.0), ("quarter", 0.25)))
    return str(tiny_population(tmp_path_factory.mktemp("sweep") / "population", *groups, num_probe=64, num_test=64))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1; yields its URI; stopped by its own process group."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _sweep(population: str, tracking_uri: str | None, experiment: str, sweep_cfg: SweepConfig, run_dir: str):
    """run_sweep of a small meta config, logging to ``tracking_uri`` (None: SQLite under run_dir)."""
    from dynamo_dist import tracking

    meta = MetaConfig(steps=STEPS, eval_every=EVAL_EVERY, hidden_size=16, batch_size=16, models_per_step=2,
                      checkpoint_every=STEPS)
    mlflow_store = tracking.Store.at(run_dir, TrackingConfig(tracking_uri=tracking_uri, experiment=experiment,
                                                             system_metrics_interval_s=1.0))
    return run_sweep(meta, sweep_cfg, run_dir, population, tracking_store=mlflow_store)


@pytest.fixture(scope="module")
def sweep(local_ray, population, mlflow_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sweep_run")
    sweep_cfg = SweepConfig(**GRID, max_concurrent_trials=2, metric="val_hidden_r2")
    table = _sweep(population, mlflow_server, "sweep-test", sweep_cfg, str(run_dir))
    return {"table": table, "run_dir": run_dir, "uri": mlflow_server}


@pytest.fixture(scope="module")
def runs(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep["uri"])
    exp = client.get_experiment_by_name("sweep-test")
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return {"client": client, "exp": exp, "parents": parents, "children": children}


# ---------------------------------------------------------------- integration tests


@pytest.mark.integration
def test_one_parent_and_a_child_per_trial_with_params(sweep, runs, population):
    assert len(runs["parents"]) == 1
    parent = runs["parents"][0]
    assert parent.info.status == "FINISHED"
    children = runs["children"]
    assert len(children) == len(sweep["table"]) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    combos = {(float(c.data.params["lambda"]), int(c.data.params["embedding_dim"]), c.data.params["hidden_distance"])
              for c in children}
    assert combos == {(lam, d, "l2") for lam in GRID["output_weight"] for d in GRID["embedding_dim"]}
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.params["population_root"] == str(Path(population).resolve())
        assert c.data.params["population_size"] == "4"
        assert c.data.params["output_weight"] == c.data.params["lambda"]
    assert parent.data.params["max_concurrent_trials_effective"] == "2"
    assert parent.data.params["population_size"] == "4"
    assert "best_val_hidden_r2" in parent.data.metrics


@pytest.mark.integration
def test_trials_ran_concurrently(runs):
    spans = sorted((c.info.start_time, c.info.end_time) for c in runs["children"])
    overlaps = sum(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert overlaps >= 1, f"no two trials overlapped in time: {spans}"


def _tune_reports(run_dir: Path) -> dict[str, int]:
    """Reports per trial id as Tune itself recorded them (result.json, one line per report)."""
    counts = {}
    for f in (run_dir / "tune").glob("*/*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            counts[lines[0]["trial_id"]] = len(lines)
    return counts


@pytest.mark.integration
def test_full_metric_histories(sweep, runs):
    client = runs["client"]
    reports = _tune_reports(sweep["run_dir"])
    assert len(reports) == 4
    for c in runs["children"]:
        rid, tid = c.info.run_id, c.data.tags["dynamo.trial_id"]
        val = client.get_metric_history(rid, "val_hidden_r2")
        assert len(val) == reports[tid] == STEPS // EVAL_EVERY
        assert sorted(m.step for m in val) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
        assert len(client.get_metric_history(rid, "val_agreement")) == reports[tid]
        loss = client.get_metric_history(rid, "loss")
        assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))  # every training step, none lost
        assert len(client.get_metric_history(rid, "loss_hidden")) == STEPS
        for key in ("test_agreement", "test_hidden_r2", "silhouette_group"):  # named by their split
            assert key in c.data.metrics
        assert not [k for k in c.data.metrics if k.startswith("mean_")]
        assert c.data.tags["mlflow.note.content"].startswith("sweep trial: lambda=")


@pytest.mark.integration
def test_artifacts_logged_and_consistent(sweep, runs, tmp_path):
    import pyarrow.parquet as pq

    client = runs["client"]
    for c in runs["children"]:
        rid = c.info.run_id
        names = {a.path for a in client.list_artifacts(rid)}
        assert {"embeddings.parquet", "embedding_pca.png", "summary.json", "history.parquet"} <= names
        assert "meta" not in names  # the checkpoint stays in the trial's directory, not logged twice
        emb = pq.read_table(client.download_artifacts(rid, "embeddings.parquet", str(tmp_path)))
        assert emb.num_rows == 4
        assert len(emb.column("theta")[0].as_py()) == int(c.data.params["embedding_dim"])
        assert set(emb.column("group").to_pylist()) == {"full", "quarter"}
    parent = runs["parents"][0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.json", "trials.md"}
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert [r["mlflow_run_id"] for r in logged] == [r["mlflow_run_id"] for r in sweep["table"]]


@pytest.mark.integration
def test_trials_table_and_outputs(sweep):
    table = sweep["table"]
    r2 = [r["val_hidden_r2"] for r in table]
    assert r2 == sorted(r2, reverse=True)  # best first
    for r in table:
        assert r["status"] == "TERMINATED" and r["steps"] == STEPS and r["num_reports"] == STEPS // EVAL_EVERY
        out = Path(r["output_dir"])
        assert out.parent.parent.name == "sweep" and out.name == trial_dirname(r["trial_id"], r)
        for f in ("checkpoint/shared.pt", "embeddings.parquet", "history.parquet", "summary.json", "embedding_pca.png"):
            assert (out / f).is_file(), f
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == STEPS and r["test_agreement"] == summary["mean_agreement"]
        assert -1.0 <= r["silhouette_group"] <= 1.0


def _sweep_dirs(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "sweep", run_dir / "tune") if p.exists()]


@pytest.mark.integration
@pytest.mark.parametrize("grid,match", [
    ({"output_weight": ()}, "empty search space"),
    ({"embedding_dim": ()}, "empty search space"),
    ({"output_weight": (-1.0, 1.0)}, "lambda values must be >= 0"),
    ({"output_weight_range": (0.1, 10.0)}, "output_weight_range is drawn from by search 'random' or 'optuna'"),
    ({"search": "random", "output_weight_range": (0.0, 10.0)}, "need 0 < low < high"),
])
def test_bad_search_space_fails_before_any_trial(population, tmp_path, grid, match):
    # model_construct skips pydantic: run_sweep must re-validate on its own
    bad = SweepConfig.model_construct(**{**SweepConfig().model_dump(), **grid})
    with pytest.raises(ValueError, match=match):
        _sweep(population, None, "bad", bad, str(tmp_path / "run"))
    assert not _sweep_dirs(tmp_path / "run")


def test_search_spaces_beyond_grids():
    """Grid trials are the product; random/optuna draw num_samples from choices, λ log-uniform in its range."""
    from ray import tune

    from dynamo_dist.meta.tune import num_trials, search_algorithm, search_space

    grid = SweepConfig(output_weight=(0.0, 1.0), embedding_dim=(2, 8, 16), num_samples=2)
    assert num_trials(grid) == 12 and search_algorithm(grid, 0) is None
    drawn = SweepConfig(search="random", output_weight_range=(0.1, 10.0), embedding_dim=(2, 8), num_samples=5)
    space = search_space(drawn)
    assert num_trials(drawn) == 5
    assert isinstance(space["output_weight"], tune.search.sample.Float)
    assert (space["output_weight"].lower, space["output_weight"].upper) == (0.1, 10.0)
    assert isinstance(space["output_weight"].get_sampler(), tune.search.sample.LogUniform)
    assert space["embedding_dim"].categories == [2, 8]


@pytest.mark.integration
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_a_search_algorithm_sweep_draws_its_trials_from_the_space(local_ray, population, tmp_path, search):
    if search == "optuna":
        pytest.importorskip("optuna")
    sweep_cfg = SweepConfig(search=search, output_weight_range=(0.1, 10.0), embedding_dim=(2, 3), num_samples=3,
                            max_concurrent_trials=1)
    table = _sweep(population, None, search, sweep_cfg, str(tmp_path / "run"))
    assert len(table) == 3 and all(r["status"] == "TERMINATED" for r in table)
    lams = [r["output_weight"] for r in table]
    assert all(0.1 <= lam <= 10.0 for lam in lams) and len(set(lams)) == 3  # drawn, not the grid's 0.0/1.0
    assert {r["embedding_dim"] for r in table} <= {2, 3}
    for r in table:  # each trial trained with what it drew
        assert MetaConfig.model_validate(yaml.safe_load((Path(r["output_dir"]) / "meta_config.yaml").read_text())) \
            .output_weight == pytest.approx(r["output_weight"])


@pytest.mark.integration
def test_unreachable_tracking_uri_fails_before_any_trial(population, tmp_path):
    uri = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(ValueError, match=f"tracking_uri {uri} is unreachable"):
        _sweep(population, uri, "bad", SweepConfig(), str(tmp_path / "run"))
    assert not _sweep_dirs(tmp_path / "run")


@pytest.mark.integration
def test_trials_that_cannot_fit_the_cluster_fail_before_any_trial(local_ray, population, tmp_path):
    # 3 Train workers need 3 CPUs; the module's Ray has 2
    with pytest.raises(ValueError, match=r"workers_per_trial=3: a trial needs 3 CPUs .* has 2"):
        _sweep(population, None, "bad", SweepConfig(workers_per_trial=3), str(tmp_path / "run"))
    assert not _sweep_dirs(tmp_path / "run")


@pytest.mark.integration
def test_missing_population_and_unknown_metric(tmp_path):
    with pytest.raises(FileNotFoundError, match="population root .*nope"):
        _sweep(str(tmp_path / "nope"), None, "bad", SweepConfig(), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="sweep.metric"):
        _sweep(str(tmp_path / "nope"), None, "bad", SweepConfig(metric="accuracy"), str(tmp_path / "run"))
    assert not _sweep_dirs(tmp_path / "run")


def _job():
    return load_script("jobs/sweep_meta.py")


@pytest.mark.integration
@pytest.mark.parametrize("sets,extra,match", [
    (["sweep.output_weight=[]"], [], "empty search space"),
    (["sweep.output_weight=[-0.5, 1]"], [], "lambda values must be >= 0"),
    ([], ["--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9 is unreachable"),
])
def test_job_exits_nonzero_with_the_message(population, tmp_path, capsys, sets, extra, match):
    args = ["--recipe", "smoke", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"population.root={population}",
]
    for s in sets:
        args += ["--set", s]
    assert _job().main(args + extra) == 2
    assert match in capsys.readouterr().err
    assert not _sweep_dirs(tmp_path / "run")


def _screenshot_script():
    return load_script("scripts/screenshot_mlflow.py")


@pytest.mark.integration
def test_mlflow_ui_shows_the_sweep_trials(sweep, runs, mlflow_server, tmp_path):
    """Headless Chromium renders the sweep experiment's runs table: not blank, and it lists every trial."""
    from PIL import Image

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    out, dom = tmp_path / "sweep_experiment.png", tmp_path / "sweep_experiment.html"
    url = _screenshot_script().experiment_url(mlflow_server, runs["exp"].experiment_id,
                                              search_filter="tags.`dynamo.stage` = 'sweep-trial'",
                                              order_by="metrics.`val_hidden_r2`")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_mlflow.py"), "--url", url,
                           "--out", str(out), "--dom-out", str(dom)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert img.shape == (900, 1400)
    assert img.std() > 10.0, f"screenshot looks blank (pixel std {img.std():.2f})"
    assert len(np.unique(img)) > 32  # text, icons, not a flat page
    html = dom.read_text()
    for r in sweep["table"]:
        assert r["trial"] in html, f"MLflow UI does not list {r['trial']}"


def _pipeline_cfg(population: str, run_dir: Path, **meta):
    import shutil

    from dynamo_dist import config

    shutil.copytree(population, run_dir / "population")  # complete: the population stage trains nothing
    spec = json.loads((run_dir / "population" / "population.json").read_text())["spec"]
    return config.parse(config.PipelineConfig, {
        "run_dir": str(run_dir),
        "population": {k: spec[k] for k in ("groups", "num_examples", "num_probe", "num_test")},
        "meta": {"steps": 10, "eval_every": 5, "checkpoint_every": 10, "hidden_size": 16, "batch_size": 16,
                 "models_per_step": 2, "embedding_dim": 2, "num_workers": 1, **meta},
        "sweep": {"output_weight": [1.0], "embedding_dim": [2], "max_concurrent_trials": 1},
        "analyze": {"baseline": False, "fixed_points": False, "landscape_grid": 2, "ssl_steps": 2},
    })


def _git_commit() -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


@pytest.mark.integration
def test_pipeline_with_a_sweep_logs_every_stage_to_one_store(local_ray, population, tmp_path, monkeypatch):
    """Default SQLite store: population, meta, the sweep (parent + trials) and analyze land in
    <run_dir>/mlflow.db, the store `dynamo-dist ui <run_dir>` serves; no other store is created.
    They are nested under one run "pipeline", each spans its stage, carries its source and a note,
    and the meta-model is registered when asked."""
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    from dynamo_dist import tracking
    from dynamo_dist.pipeline import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    summary = run_pipeline(_pipeline_cfg(population, run_dir), progress=False, register_model="dynamo-pipeline")
    # Ray Train's fit and Ray Tune's leave their SIGINT handlers behind: a later Ctrl-C would go to a finished run
    assert signal.getsignal(signal.SIGINT) is handler

    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("mlflow.db")) == ["mlflow.db"]
    assert summary["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    ui = tracking.ui_command(run_dir)
    client = MlflowClient(tracking_uri=ui[ui.index("--backend-store-uri") + 1])
    exp = client.get_experiment_by_name(run_dir.name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    names = sorted(r.info.run_name for r in runs)
    assert names[:4] == ["analyze", "meta-w1", "pipeline", "population"], names
    assert sum(n.startswith("sweep-") for n in names) == 1 and sum(n.startswith("trial-") for n in names) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    by_name = {r.info.run_name.split("-")[0]: r for r in runs}  # analyze, meta, pipeline, population, sweep, trial
    pipe, meta, sweep = by_name["pipeline"], by_name["meta"], by_name["sweep"]

    # one parent: every stage under it, the trial under the sweep, the analysis naming its meta run
    assert "mlflow.parentRunId" not in pipe.data.tags and summary["mlflow_run_id"] == pipe.info.run_id
    for stage in ("population", "meta", "sweep", "analyze"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == pipe.info.run_id, stage
    assert by_name["trial"].data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert by_name["analyze"].data.tags["dynamo.meta_run_id"] == meta.info.run_id

    # durations: each run spans what its stage measured (the pipeline's clock stops after a stage's
    # run has ended: summary writes, lock release, the model registration -- hence the slack)
    def ms(r):
        return r.info.end_time - r.info.start_time

    assert ms(pipe) >= 1000 * summary["total_seconds"]
    assert ms(meta) >= 1000 * meta.data.metrics["wall_seconds"]
    assert ms(by_name["population"]) >= 1000 * by_name["population"].data.metrics["population_seconds"]
    for run, key in ((by_name["population"], "population_seconds"), (meta, "meta_seconds"), (sweep, "sweep_seconds")):
        assert ms(run) >= 1000 * (summary[key] - 1.0), (key, ms(run), summary[key])
    assert all(pipe.info.start_time <= r.info.start_time and r.info.end_time <= pipe.info.end_time for r in runs)

    # metadata on every run
    commit = _git_commit()
    for r in runs:
        assert r.data.tags["mlflow.source.name"] and r.data.tags["mlflow.note.content"], r.info.run_name
        assert r.data.tags.get("mlflow.source.git.commit") == commit, r.info.run_name
    assert meta.data.tags["mlflow.note.content"].startswith("meta stage: DYNAMO meta-model (d=2")
    assert by_name["analyze"].data.tags["mlflow.note.content"].startswith("analyze stage:")

    # test metrics say their split; the checkpoint is logged once, inside the MLflow Model
    assert meta.data.metrics["test_agreement"] == summary["meta"]["mean_agreement"]
    assert {"test_hidden_r2", "test_meta_accuracy", "val_agreement"} <= set(meta.data.metrics)
    assert not [k for k in meta.data.metrics if k.startswith("mean_")]
    top = {a.path for a in client.list_artifacts(meta.info.run_id)}
    assert "meta_model" in top and "meta" not in top
    assert "checkpoint" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(meta.info.run_id,
                                                                                          "meta_model/artifacts/meta_run")}

    # --register-model: a version of the logged model, from the meta run
    assert summary["meta"]["registered_model"] == "models:/dynamo-pipeline/1"
    version = client.get_model_version("dynamo-pipeline", "1")
    assert version.run_id == meta.info.run_id
    assert (Path(urlparse(version.source).path) / "MLmodel").is_file()


@pytest.mark.integration
def test_a_failing_stage_fails_the_pipeline_run_with_its_error(local_ray, population, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dynamo_dist.pipeline import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"num_workers=5 exceeds the number of models \(4\)"):
        run_pipeline(_pipeline_cfg(population, run_dir, num_workers=5), progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(run_dir.name).experiment_id])}
    assert sorted(runs) == ["pipeline", "population"]  # the meta stage failed before its run started
    pipe = runs["pipeline"]
    assert pipe.info.status == "FAILED" and "num_workers=5 exceeds" in pipe.data.tags["dynamo.error"]
    assert runs["population"].info.status == "FINISHED"
    assert runs["population"].data.tags["mlflow.parentRunId"] == pipe.info.run_id


@pytest.mark.integration
def test_a_sweep_whose_driver_is_killed_resumes_without_rerunning_finished_trials(population, tmp_path):
    import json
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "population": {"root": population},
           "meta": {"hidden_size": 16, "batch_size": 16, "models_per_step": 2, "steps": 500,  # seconds a trial
                    "eval_every": 100, "checkpoint_every": 500},
           "sweep": {"output_weight": [0.0, 1.0, 2.0], "embedding_dim": [2], "max_concurrent_trials": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "dynamo_dist.cli", "sweep", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)

    def recorded() -> bool:  # a finished trial, in our table and in Tune's experiment state
        states = list(run_dir.glob("tune/*/experiment_state-*.json"))
        return bool(list(run_dir.glob("sweep/*/finished/*.json"))) and any("TERMINATED" in p.read_text()
                                                                         for p in states)

    deadline = time.monotonic() + 300
    while not recorded() and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-sweep
    driver.wait()
    before = {p.parent.name: p.stat().st_mtime for p in run_dir.glob("sweep/*/trial-*/summary.json")}
    assert 1 <= len(before) < 3
    assert not list(run_dir.glob("sweep/*/trials.json"))

    res = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming sweep" in res.stdout
    (table,) = run_dir.glob("sweep/*/trials.json")  # the same sweep, finished
    trials = json.loads(table.read_text())
    assert sorted(t["output_weight"] for t in trials) == [0.0, 1.0, 2.0]
    assert all(t["status"] == "TERMINATED" for t in trials), trials
    after = {p.parent.name: p.stat().st_mtime for p in run_dir.glob("sweep/*/trial-*/summary.json")}
    assert {k: after[k] for k in before} == before  # finished trials were not run again
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(run_dir.name)
    parents = client.search_runs([exp.experiment_id], "tags.`dynamo.stage` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the one sweep run, ended by the resume


@pytest.mark.integration
def test_trials_name_their_population_as_dataset_input_and_the_sweep_run_has_system_metrics(runs, population):
    """Issue 16: every trial, like a meta run, has the population manifest as its training dataset
    input (one dataset: one population); the sweep's run samples the system, its trials do not
    (they share its process and node)."""
    inputs = [c.inputs.dataset_inputs for c in runs["children"]]
    assert [len(i) for i in inputs] == [1] * len(runs["children"])
    assert len({i[0].dataset.digest for i in inputs}) == 1
    ds, tags = inputs[0][0].dataset, {t.key: t.value for t in inputs[0][0].tags}
    assert json.loads(ds.source) == {"uri": str(Path(population).resolve())} and ds.name == "population"
    assert json.loads(ds.profile)["num_rows"] == 4 and tags == {"mlflow.data.context": "training"}
    (parent,) = runs["parents"]
    assert "system/cpu_utilization_percentage" in parent.data.metrics
    assert not any(k.startswith("system/") for c in runs["children"] for k in c.data.metrics)
