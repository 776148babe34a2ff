"""Ray Jobs end to end: a real `ray start --head` on 127.0.0.1, the smoke pipeline submitted
with JobSubmissionClient, its outputs checked; a bad config fails with the field in the logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import servers
from recipes import small_analysis_args

# serial (Makefile): a loaded machine with other test files beside it left the head's job agent not up in time
pytestmark = [pytest.mark.integration, pytest.mark.serial]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head in the foreground (--block) so the test stops exactly what it started."""
    ray_bin = Path(sys.executable).with_name("ray")
    # every port given: the Ray client server's default (10001) is shared with any other `ray start` on the
    # machine (a parallel test worker's, another user's)
    gcs, dash, client_port = servers.free_port(), servers.free_port(), servers.free_port()
    tmp = Path("/tmp") / f"rayjobs-{os.getpid()}"  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, **servers.SLOW_MACHINE_RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         f"--ray-client-server-port={client_port}", f"--temp-dir={tmp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    client = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited early; see {log.name}")
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:  # the dashboard is not up yet
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("ray head dashboard did not come up in 120 s")
    yield client
    # the process group of the head we started, nothing else; a throwaway cluster need not drain
    # (Ray's graceful stop took 34 s here), so SIGKILL follows 5 s after SIGTERM
    servers.stop_group(proc, timeout=5)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _submit(client, **kwargs) -> str:
    """submit_job, waiting out the head's job agent start (it answers list_jobs before it takes jobs:
    "No available agent to submit job" on a loaded machine)."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(0.5)


def _wait(client, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout} s:\n{client.get_job_logs(job_id)[-3000:]}")


def _runtime_env():
    return {"working_dir": str(REPO), "excludes": [".venv", "runs", ".git", "benchmarks/results", "*.egg-info"]}


def test_smoke_pipeline_job_succeeds_and_writes_outputs(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    run_dir = tmp_path / "run"
    job = _submit(
        ray_head,
        entrypoint=(f"{sys.executable} jobs/pipeline.py --config configs/smoke.yaml --set run_dir={run_dir} "
                    + " ".join(small_analysis_args())),  # tests/recipes.py: for time
        runtime_env=_runtime_env())
    status = _wait(ray_head, job)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    manifest = pq.read_table(run_dir / "population" / "manifest.parquet")
    assert manifest.num_rows == 4 and set(manifest.column("status").to_pylist()) == {"complete"}
    emb = pq.read_table(run_dir / "meta" / "embeddings.parquet")
    assert sorted(emb.column("model_id").to_pylist()) == sorted(manifest.column("model_id").to_pylist())
    summary = json.loads((run_dir / "pipeline_summary.json").read_text())
    assert summary["report"] and Path(summary["report"]).is_file()
    assert "MLflow UI" in logs
    # the population stage is in the pipeline's MLflow store beside the meta and analyze runs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = {r.info.run_name for r in runs}
    assert {"population", "analyze"} <= names and any(n.startswith("meta") for n in names), names
    (pop,) = [r for r in runs if r.info.run_name == "population"]
    assert pop.data.params["num_models"] == "4" and pop.data.metrics["failed_models"] == 0
    groups = {r["group"] for r in manifest.to_pylist()}
    for g in groups:
        acc = [r["test_accuracy"] for r in manifest.to_pylist() if r["group"] == g]
        assert pop.data.metrics[f"{g}.test_accuracy_mean"] == pytest.approx(sum(acc) / len(acc))
    artifacts = {a.path for a in client.list_artifacts(pop.info.run_id, "population")}
    assert artifacts == {"population/manifest.csv", "population/population_accuracy.png"}
    # one run for the job, every stage nested under it; the job's working_dir is no git checkout
    (pipe,) = [r for r in runs if r.info.run_name == "pipeline"]
    assert pipe.info.status == "FINISHED" and pipe.data.tags["mlflow.source.name"] == "pipeline.py"
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r is not pipe} == {pipe.info.run_id}
    assert not [r for r in runs if "mlflow.source.git.commit" in r.data.tags]


def test_invalid_config_job_fails_naming_the_field_before_training(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    run_dir = tmp_path / "bad"
    job = _submit(
        ray_head,
        entrypoint=(f"{sys.executable} jobs/pipeline.py --config configs/smoke.yaml --set run_dir={run_dir} "
                    "--set meta.output_weight=-1"),
        runtime_env=_runtime_env())
    status = _wait(ray_head, job, timeout=300)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.FAILED
    assert "meta.output_weight" in logs
    assert not (run_dir / "population" / "weights").exists()
