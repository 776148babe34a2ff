"""A real 2-node Ray cluster on this machine (head + worker, each its own temp dir, loopback, token
auth), shared by the tests of this module: the worker node is killed during a population stage and
during elastic meta training, and each finishes on the surviving node (a new worker node joins before
the next test); the smoke pipeline runs on both nodes with its outputs on a bucket.
test_multinode_sweeps.py starts a cluster of its own (this module's fixtures) for the sweeps, so that
`make test`'s parallel workers run the two halves at once."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from dynamo_dist.data import store
from recipes import small_analysis_args
from servers import SLOW_MACHINE_RAY_ENV, free_port, mlflow_server, s3_server

pytestmark = pytest.mark.integration
RAY = Path(sys.executable).with_name("ray")
_CLUSTERS = itertools.count()
START_ATTEMPTS = 3  # `ray start` of one node (Cluster._start_up)


def _ports() -> list[str]:
    """Every port a node listens on, given explicitly (``free_port``: below the ephemeral range, outside
    Ray's default worker ports 10002-19999), and a private worker-port range."""
    base = free_port(span=41)
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={base + 1}", f"--max-worker-port={base + 40}"]


class Node:
    """``ray start --block`` in its own session: stopping it stops exactly what it started."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address=127.0.0.1",
                                      "--disable-usage-stats", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


class Cluster:
    """A head node and a worker node (each ``ray start --block`` in its own process group, own temp dir
    and ports, token auth), shared by this module's tests: a test that kills the worker node leaves the
    head, and the next test's ``two_nodes()`` starts a new worker node."""

    def __init__(self, tmp: Path, extra_env: dict | None = None):
        self.tmp, self.count = tmp, itertools.count()
        self.env = {**os.environ, **SLOW_MACHINE_RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), **(extra_env or {})}
        for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(k, None)
        self.short = Path("/tmp") / f"mn-{os.getpid()}-{next(_CLUSTERS)}"  # Ray's socket paths have a length limit
        self.nodes: list[Node] = []
        self.worker: Node | None = None

        def head_args() -> list[str]:
            self.gcs = free_port()
            self.address = f"127.0.0.1:{self.gcs}"
            # the nodes' processes (Ray Train's PlacementGroupCleaner among them) find the State API through
            # RAY_ADDRESS: without it they search the machine and fail when another Ray runs on it
            self.env["RAY_ADDRESS"] = self.address
            # the dashboard answers Ray's State API, which Ray Train needs to free the workers of a trial
            # that ASHA stops (meta.tune._check_state_api)
            return ["--head", f"--port={self.gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]

        # a worker started before the head's GCS answers gives up at once: wait for it
        self.head = self._start_up(head_args, "h", 1)

    def _start(self, args: list[str], name: str) -> Node:
        node = Node([*args, "--num-cpus=1", f"--temp-dir={self.short}-{name}", *_ports()], self.env,
                    self.tmp / f"{name}.log")
        self.nodes.append(node)
        return node

    def _start_up(self, args: Callable[[], list[str]], name: str, live: int) -> Node:
        """A node started and seen by the cluster (``live`` nodes in all). On a loaded 2-core machine
        `ray start` itself sometimes gives up (its raylet not registered within Ray's fixed 30 s: "The
        current node timed out during startup"); such a node is started again, up to
        ``START_ATTEMPTS`` times. A node that starts but is not seen in time is an error at once."""
        for attempt in range(START_ATTEMPTS):
            node = self._start(args(), name if attempt == 0 else f"{name}-again{attempt}")
            try:
                _wait_for_nodes(self.env, self.gcs, live, node)
                return node
            except RuntimeError:
                if node.proc.poll() is None or attempt == START_ATTEMPTS - 1:
                    raise
                node.kill()
        raise AssertionError("unreachable")

    def two_nodes(self) -> None:
        """A live worker node besides the head (a new one when the last was killed)."""
        if self.worker is None or self.worker.proc.poll() is not None:
            self.worker = self._start_up(lambda: [f"--address={self.address}"], f"w{next(self.count)}", 2)

    def close(self) -> None:
        for n in reversed(self.nodes):
            n.kill()
        for d in Path("/tmp").glob(f"{self.short.name}-*"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server (moto) on loopback: its endpoint and credentials are in every node's env."""
    with s3_server(tmp_path_factory.mktemp("s3"), buckets=("dynamo-dist-runs",)) as env:
        yield env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = Cluster(tmp_path_factory.mktemp("cluster"), extra_env=s3)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def small_population(tmp_path_factory, tiny_population) -> Path:
    """4 tiny MNIST-1D GRUs on the local disk both nodes share (one machine)."""
    from dynamo_dist.config import GroupSpec

    return tiny_population(tmp_path_factory.mktemp("small") / "population",
                           GroupSpec(name="a", task="mnist1d", arch="gru", hidden_size=8, num_seeds=4, epochs=1,
                                     batch_size=64))


@pytest.fixture
def two_nodes(cluster):
    cluster.two_nodes()
    return {"address": cluster.address, "env": cluster.env, "head": cluster.head, "worker": cluster.worker}


def _probe(env: dict, code: str, args: list[str], node: Node | None, timeout: float) -> bool:
    """Run ``code`` (a Python program that connects to the cluster and waits for a condition, then
    prints "ok") in a subprocess: one connection for the whole wait, not one a poll (each costs an
    interpreter start and an import of Ray, seconds on a loaded machine). False if it did not print
    "ok" within ``timeout``; RuntimeError with ``node``'s log if that node exits meanwhile."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if node is not None and node.proc.poll() is not None:
                node.log.flush()
                raise RuntimeError(f"`ray start` exited rc={node.proc.returncode}:\n"
                                   f"{Path(node.log.name).read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    return proc.returncode == 0 and out.strip().splitlines()[-1:] == ["ok"]


# connects (retrying while the GCS is not up yet), then polls in-process until the condition holds
_PROBE = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR'); n = int(sys.argv[2])\n"
          "while {condition} != n: time.sleep(0.2)\n"
          "print('ok')")
_LIVE_NODES = _PROBE.format(condition="sum(1 for x in ray.nodes() if x['Alive'])")
_FREE_CPUS = _PROBE.format(condition="int(ray.available_resources().get('CPU', 0))")


def _wait_for(env: dict, code: str, args: list[str], node: Node | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # a probe started before the GCS listens can hang: give up on it after 60 s and start another
        if _probe(env, code, args, node, min(60.0, deadline - time.monotonic())):
            return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not have {what} within {timeout} s")


def _wait_for_nodes(env: dict, gcs: int, n: int, node: Node, timeout: float = 180) -> None:
    """Until the cluster has ``n`` live nodes; RuntimeError with ``node``'s log if it exits first."""
    _wait_for(env, _LIVE_NODES, [f"127.0.0.1:{gcs}", str(n)], node, timeout, f"{n} live nodes")


def _wait_for_free_cpus(env: dict, address: str, n: int, timeout: float = 120) -> None:
    _wait_for(env, _FREE_CPUS, [address, str(n)], None, timeout, f"{n} free CPUs")


def test_worker_node_killed_during_a_population_every_model_completes_once(two_nodes, tracking, tmp_path):
    root = tmp_path / "population"
    ids = [f"g-s{s:03d}" for s in range(6)]
    cfg = {"run_dir": str(tmp_path / "run"),
           "population": {"root": str(root), "num_examples": 1000, "num_probe": 32, "num_test": 32,
                          "num_actors": 2, "placement_timeout_s": 600,
                          "groups": [{"name": "g", "task": "mnist1d", "arch": "gru", "hidden_size": 8,
                                      "num_seeds": 6, "epochs": 4, "batch_size": 64}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "dynamo_dist.cli", "population", "--config", str(path),
               "--address", two_nodes["address"]]
    # a SQLite store on one node's disk is refused on a 2-node cluster, before any work
    env = two_nodes["env"]  # without MLFLOW_TRACKING_URI (Cluster)
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "2 nodes" in refused.stderr and "tracking_uri" in refused.stderr, \
        refused.stderr[-2000:]
    assert not root.exists()
    driver = subprocess.Popen(command + ["--tracking-uri", tracking], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    _kill_worker_node_mid_run(driver, root, two_nodes, ids)


def _kill_worker_node_mid_run(driver: subprocess.Popen, root: Path, two_nodes: dict, ids: list[str]) -> None:
    weights = root / "weights"
    deadline = time.monotonic() + 300
    while not (weights.is_dir() and any(weights.glob("*.safetensors"))) and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.1)
    two_nodes["worker"].kill()  # the whole worker node: raylet, its actor, everything it started
    killed_at = len(list(weights.glob("*.safetensors")))
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    assert killed_at < len(ids)  # the node died with models still to train
    rows = store.manifest_rows(root)
    assert [r["model_id"] for r in rows] == ids  # every model, once, on the surviving node
    for r in rows:
        store.read_trajectory(root, r["model_id"], "test")


def test_worker_node_killed_during_meta_training_continues_with_fewer_workers(two_nodes, tracking, small_population,
                                                                            tmp_path):
    """Elastic meta training (meta.min_workers=1 of num_workers=2, one worker per node): the worker
    node dies after a checkpoint, the run goes on with one worker from that checkpoint (theta/V
    re-sharded) and ends with every model; its loss up to the checkpoint is the unfailed run's."""
    import json

    import pyarrow.parquet as pq

    from dynamo_dist.meta import outputs

    root = small_population
    every = 20

    def command(out: Path, **meta) -> list[str]:
        cfg = {"run_dir": str(tmp_path / "run"), "population": {"root": str(root)},
               "meta": {"output_dir": str(out), "hidden_size": 16, "embedding_dim": 2, "steps": 240, "batch_size": 8,
                        "models_per_step": 2, "checkpoint_every": every, "eval_every": 120, "num_workers": 2,
                        "max_failures": 2, "placement_timeout_s": 300, "seed": 0, **meta}}
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return [sys.executable, "-m", "dynamo_dist.cli", "meta", "--config", str(path),
                "--address", two_nodes["address"], "--tracking-uri", tracking]

    env = two_nodes["env"]
    clean = subprocess.run(command(tmp_path / "clean"), capture_output=True, text=True, env=env, timeout=600)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    elastic = tmp_path / "elastic"
    # an elastic run starts with the workers that fit then: wait for the clean run's CPUs to be free
    _wait_for_free_cpus(env, two_nodes["address"], 2)
    driver = subprocess.Popen(command(elastic, min_workers=1, resize_check_s=5), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    runs = elastic / "ray_results" / "meta"

    def whole() -> list[Path]:  # checkpoints both workers have written their files into
        return sorted(d for d in runs.glob("checkpoint_*")
                      if all((d / f).is_file() for f in ("shared.pt", "shard-0.pt", "shard-1.pt")))

    deadline = time.monotonic() + 300
    # a second whole checkpoint: the first is then registered by Ray Train (the workers' reports of a
    # checkpoint are taken one at a time), so the run resumes from it, not from scratch
    while len(whole()) < 2 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.1)
    from dynamo_dist.meta import checkpoint

    first = checkpoint.safe_load(whole()[0] / "shared.pt")
    two_nodes["worker"].kill()  # its Train worker (rank 0 or 1) dies with it
    assert first["num_workers"] == 2  # it trained on both nodes until the kill
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    summary = json.loads((elastic / "summary.json").read_text())
    assert summary["num_models"] == 4 and summary["steps"] == 240
    assert summary["num_workers"] == 1  # the final checkpoint was written by the one surviving worker
    run = outputs.load_meta_run(elastic)  # every model's theta and V
    assert sorted(run.model_ids) == [f"a-s{i:03d}" for i in range(4)] and len(run.embeddings.maps) == 4
    hist = pq.read_table(elastic / "history.parquet").to_pylist()
    ref = pq.read_table(tmp_path / "clean" / "history.parquet").to_pylist()
    assert [h["step"] for h in hist if h.get("loss") is not None][:every] == list(range(1, every + 1))
    loss = [h["loss"] for h in hist if h.get("loss") is not None][:every]
    ref_loss = [h["loss"] for h in ref if h.get("loss") is not None][:every]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)  # up to the checkpoint it resumed from or later


def test_the_smoke_pipeline_runs_on_two_nodes_with_every_output_on_a_bucket(two_nodes, tracking, s3):
    """What a user types for the demo on a cluster with a bucket (the smoke recipe, for time): population
    actors and the 2 Train workers on both nodes, every output in s3://, readable from the bucket."""
    import pyarrow.fs as pafs

    run_dir = f"s3://dynamo-dist-runs/two-nodes-{os.getpid()}"
    command = [sys.executable, "-m", "dynamo_dist.cli", "run", "--recipe", "smoke", "--set", f"run_dir={run_dir}",
               "--set", "population.num_actors=2", "--set", "meta.num_workers=2", *small_analysis_args(),
               "--address", two_nodes["address"], "--tracking-uri", tracking]
    t0 = time.monotonic()
    res = subprocess.run(command, capture_output=True, text=True, env=two_nodes["env"], timeout=900)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"\n2 nodes + bucket, smoke pipeline: {wall:.0f} s wall\n" + res.stdout[-1500:])
    fs = pafs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"], access_key=s3["AWS_ACCESS_KEY_ID"],
                           secret_key=s3["AWS_SECRET_ACCESS_KEY"], region="us-east-1")
    prefix = run_dir.removeprefix("s3://")
    keys = {i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True)) if i.type == pafs.FileType.File}
    for name in ("population/manifest.parquet", "meta/embeddings.parquet", "meta/checkpoint/shared.pt",
                 "meta/analysis/report.html", "pipeline_summary.json"):
        assert f"{prefix}/{name}" in keys, name
    summary = json.loads(fs.open_input_file(f"{prefix}/meta/summary.json").read())
    assert summary["num_workers"] == 2 and summary["num_models"] == 4  # one Train worker per 1-CPU node
