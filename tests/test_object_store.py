"""Every stage on an object store: a real S3-compatible server (moto's standalone server) on
127.0.0.1, a real MLflow server, the CLI as users run it with ``run_dir=s3://...``.

Reads go back through pyarrow's S3 filesystem and DuckDB, as an outside reader would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import yaml

from recipes import small_analysis_args
from servers import mlflow_server, s3_server

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "dynamo_dist.cli"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), buckets=("bucket",)) as env:
        yield env


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _env(s3_env: dict) -> dict:
    env = {**os.environ, **s3_env}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _fs(s3_env: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key=s3_env["AWS_ACCESS_KEY_ID"],
                             secret_key=s3_env["AWS_SECRET_ACCESS_KEY"], region="us-east-1")


def _cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=timeout)


def _keys(fs: pafs.FileSystem, prefix: str) -> dict[str, float]:
    """Object key -> last-modified time of every object under ``prefix``."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path: i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File}


def test_other_credentials_in_the_environment_get_their_own_filesystem(s3, monkeypatch):
    """One filesystem object per bucket and connection settings: a process (a test, a notebook) that
    points its AWS_* variables elsewhere does not keep talking to the old endpoint with the old keys."""
    from dynamo_dist.data import fsio

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    first, path = fsio.filesystem("s3://bucket/a/b")
    assert fsio.filesystem("s3://bucket/c")[0] is first and path == "bucket/a/b"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    other = fsio.filesystem("s3://bucket/a/b")[0]
    assert other is not first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["AWS_SECRET_ACCESS_KEY"])
    assert fsio.filesystem("s3://bucket/a/b")[0] is first


def test_smoke_pipeline_with_a_sweep_on_a_bucket_is_readable_from_the_bucket(s3, tracking):
    import duckdb

    res = _cli(["run", "--recipe", "smoke", "--set", "run_dir=s3://bucket/runs/smoke", "--tracking-uri", tracking,
                "--set", "sweep={output_weight: [0.0, 1.0], embedding_dim: [2], max_concurrent_trials: 1}",
                *small_analysis_args()], _env(s3))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "s3://bucket/runs/smoke/meta/analysis/report.html" in res.stdout
    fs = _fs(s3)
    keys = _keys(fs, "bucket/runs/smoke")
    for name in ("population/manifest.parquet", "population/population.json", "meta/embeddings.parquet",
                 "meta/summary.json", "meta/checkpoint/shared.pt", "meta/analysis/report.html",
                 "meta/analysis/analysis.json", "pipeline_summary.json"):
        assert f"bucket/runs/smoke/{name}" in keys, name
    assert any("/ray_results/meta/checkpoint_" in k for k in keys)  # Ray Train's storage on the bucket too
    sweeps = sorted(k for k in keys if k.endswith("/trials.json"))
    assert len(sweeps) == 1 and any(k.startswith("bucket/runs/smoke/tune/") for k in keys)  # Tune's storage too
    trials = json.loads(fs.open_input_file(sweeps[0]).read())
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials)
    for t in trials:  # each trial's outputs are in the bucket
        assert t["output_dir"].startswith("s3://bucket/runs/smoke/sweep/"), t["output_dir"]
        assert f"{t['output_dir'].removeprefix('s3://')}/summary.json" in keys
    assert not any(k.endswith((".tmp", ".dynamo.lock")) for k in keys)  # no temporaries, leases released
    assert not Path("s3:").exists()  # nothing went to a local directory named like the URI

    # an outside reader: DuckDB over pyarrow's S3 filesystem, all models' trajectories at once
    con = duckdb.connect()
    con.register("traj", ds.dataset("bucket/runs/smoke/population/trajectories/split=probe", filesystem=fs,
                                    format="parquet", partitioning="hive"))
    counts = con.sql("select model_id, count(*) as n from traj group by model_id order by model_id").fetchall()
    manifest = ds.dataset("bucket/runs/smoke/population/manifest.parquet", filesystem=fs).to_table()
    assert [m for m, _ in counts] == sorted(manifest.column("model_id").to_pylist())
    assert all(n > 0 for _, n in counts)
    con.register("emb", ds.dataset("bucket/runs/smoke/meta/embeddings.parquet", filesystem=fs))
    rows = con.sql("select model_id, len(theta) as d from emb order by model_id").fetchall()
    assert [m for m, _ in rows] == [m for m, _ in counts] and {d for _, d in rows} == {2}

    # post-hoc embedding reads the run and the population from the bucket and writes its files there
    res = _cli(["embed", "--meta-dir", "s3://bucket/runs/smoke/meta", "--root", "s3://bucket/runs/smoke/population",
                "--models", counts[0][0], "--steps", "20"], _env(s3), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "written: s3://bucket/runs/smoke/meta/posthoc/embeddings.parquet" in res.stdout
    assert {"bucket/runs/smoke/meta/posthoc/embeddings.parquet", "bucket/runs/smoke/meta/posthoc/embedding_pca.png"} \
        <= set(_keys(fs, "bucket/runs/smoke/meta/posthoc"))

    # the stages that read a meta run read it from the bucket
    from dynamo_dist.meta import outputs

    os.environ.update(s3)
    try:
        run = outputs.load_meta_run("s3://bucket/runs/smoke/meta")
        assert run.population_root == "s3://bucket/runs/smoke/population"
        assert run.theta().shape == (len(counts), 2)
    finally:
        for k in s3:
            os.environ.pop(k, None)


def test_a_ctrl_c_between_a_puts_open_and_its_write_leaves_the_whole_object(s3, monkeypatch):
    """An object-store stream closed by an exception puts what it holds, so an interrupt landing just after
    the open (the driver writes the manifest right after a model's weights land, when a user presses Ctrl-C)
    put an empty manifest once in CI. The put finishes whole, then the interrupt is raised."""
    from dynamo_dist.data import fsio

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    path = fsio.as_path("s3://bucket/deferred/manifest.parquet")
    real_fs, fs_path = fsio.filesystem(path.uri)

    class InterruptedAfterOpen:  # the real filesystem; SIGINT arrives once the stream is open
        def open_output_stream(self, p):
            stream = real_fs.open_output_stream(p)
            signal.raise_signal(signal.SIGINT)
            return stream

    monkeypatch.setattr(fsio, "filesystem", lambda uri: (InterruptedAfterOpen(), fs_path))
    data = os.urandom(4096)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            path.write_bytes(data)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    with real_fs.open_input_file(fs_path) as f:
        assert f.read() == data


@pytest.mark.serial  # Makefile: the interrupt must land while models are left to train: in the parallel pass (3 files, load ~9) the driver finished all five and exited 0
def test_an_interrupted_population_on_a_bucket_resumes_without_retraining(s3, tmp_path):
    root = "s3://bucket/interrupted/population"
    cfg = {"run_dir": str(tmp_path / "run"),
           "population": {"root": root, "num_examples": 1000, "num_probe": 32, "num_test": 32, "num_actors": 1,
                          "groups": [{"name": "g", "task": "mnist1d", "arch": "gru", "hidden_size": 8,
                                      "num_seeds": 5, "epochs": 40, "batch_size": 64}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fs = _fs(s3)
    weights = "bucket/interrupted/population/weights"
    # SIGINT as a terminal gives it (a suite started in the background runs with SIGINT ignored, inherited)
    driver = subprocess.Popen(CLI + ["population", "--config", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=_env(s3), start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first model's completion read from the driver's progress bar as it is printed: polling the
    # bucket's listing for it once noticed it only after all five models were done (load 20+, 2 cores)
    output, first_done = bytearray(), threading.Event()

    def read() -> None:
        for chunk in iter(lambda: os.read(driver.stdout.fileno(), 4096), b""):
            output.extend(chunk)
            if b"| 1/5 [" in output:
                first_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not first_done.wait(0.2) and time.monotonic() < deadline:
        assert driver.poll() is None, output.decode(errors="replace")[-3000:]
    # Ctrl-C: the stage stops, releasing its lease. 40 epochs: ~2.6 s a model after the first, so the others
    # are not all done when it lands (with 3 epochs all five were, once, on a quiet machine)
    os.killpg(driver.pid, signal.SIGINT)
    driver.wait(timeout=120)
    reader.join(timeout=30)
    out = output.decode(errors="replace")
    assert driver.returncode == 130, out[-3000:]
    before = _keys(fs, weights)
    assert 1 <= len(before) < 5, out[-3000:]

    res = _cli(["population", "--config", str(path)], _env(s3))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = _keys(fs, weights)
    assert len(after) == 5
    assert {k: after[k] for k in before} == before  # completed models were not trained or written again
    from dynamo_dist.data import store

    os.environ.update(s3)
    try:
        rows = store.manifest_rows(root)
        assert [r["model_id"] for r in rows] == [f"g-s{i:03d}" for i in range(5)]
        for r in rows:
            assert store.damage(root, r) is None
            assert store.read_trajectory(root, r["model_id"], "test").num_examples == 32
    finally:
        for k in s3:
            os.environ.pop(k, None)


@pytest.mark.parametrize("override, expected", [
    (["--set", "run_dir=s3://no-such-bucket/run"], "the bucket 'no-such-bucket' does not exist"),
    (["--set", "run_dir=ftp://host/run"], "cannot store files at a ftp:// URI"),
    (["--set", "population.root=s3://bucket/x", "--set", "run_dir=s3://bucket/y"], "tracking.tracking_uri"),
])
def test_bad_locations_fail_before_any_work_naming_the_uri_or_field(s3, tmp_path, override, expected):
    res = _cli(["run", "--recipe", "smoke", *override], {**_env(s3), "MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert expected in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not _keys(_fs(s3), "bucket/y") and not _keys(_fs(s3), "bucket/x")  # nothing written


def test_credentials_the_store_refuses_fail_before_any_work(tmp_path):
    with s3_server(tmp_path, buckets=("locked",), auth=True) as env:
        res = _cli(["population", "--recipe", "smoke", "--set", "population.root=s3://locked/pop"], _env(env),
                   timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "s3://locked/pop" in res.stderr and "credentials" in res.stderr, res.stderr[-2000:]
    assert "model/s" not in res.stderr  # no progress bar: nothing was trained


def test_a_second_writer_of_a_bucket_root_is_refused_while_the_lease_is_live(s3):
    from dynamo_dist.data import lock

    os.environ.update(s3)
    try:
        with lock.hold("s3://bucket/leased", "population", what="population root"):
            res = _cli(["population", "--recipe", "smoke", "--set", "population.root=s3://bucket/leased"],
                       _env(s3), timeout=120)
            assert res.returncode == 2, res.stderr[-2000:]
            assert "is in use by population" in res.stderr and "lease" in res.stderr
        assert not _keys(_fs(s3), "bucket/leased")  # released, and nothing else was written
    finally:
        for k in s3:
            os.environ.pop(k, None)
