"""A real 2-node Ray cluster on this machine (head + worker, each its own temp dir, loopback, token
auth): the worker node is killed during a population stage and every model still completes on the
surviving node, without a node being added back."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynamo_dist.data import store
from servers import mlflow_server

pytestmark = pytest.mark.integration
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """Every port a node listens on, given explicitly (ephemeral range, outside Ray's default worker
    ports 10002-19999), and a private worker-port range."""
    base = _free_port()
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
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


@pytest.fixture
def two_nodes(tmp_path):
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    gcs = _free_port()
    short = Path("/tmp") / f"mn-{os.getpid()}"  # Ray's unix socket paths have a length limit
    head = Node(["--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
                 f"--ray-client-server-port={_free_port()}", f"--temp-dir={short}-h", *_ports()],
                env, tmp_path / "head.log")
    nodes = [head]
    try:
        time.sleep(5)
        worker = Node([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--temp-dir={short}-w", *_ports()],
                      env, tmp_path / "worker.log")
        nodes.append(worker)
        _wait_for_nodes(env, gcs, 2)
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "head": head, "worker": worker}
    finally:
        for n in reversed(nodes):
            n.kill()
        for suffix in ("-h", "-w"):
            shutil.rmtree(f"{short}{suffix}", ignore_errors=True)


def _wait_for_nodes(env: dict, gcs: int, n: int, timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run([sys.executable, "-c", probe, f"127.0.0.1:{gcs}"], capture_output=True, text=True,
                             env=env, timeout=120)
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the cluster did not reach {n} live nodes in {timeout} s")


def test_worker_node_killed_during_a_population_every_model_completes_once(two_nodes, tmp_path):
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
    env = {k: v for k, v in two_nodes["env"].items() if k != "MLFLOW_TRACKING_URI"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "2 nodes" in refused.stderr and "tracking_uri" in refused.stderr, \
        refused.stderr[-2000:]
    assert not root.exists()
    with mlflow_server(tmp_path) as uri:
        driver = subprocess.Popen(command + ["--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env)
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
