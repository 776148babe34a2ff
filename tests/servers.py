"""Real servers for integration tests, on 127.0.0.1 and stopped through their own process group.

``mlflow_server(dir)`` is a tracking server (SQLite store, local artifacts); ``s3_server(dir)`` is
moto's standalone S3-compatible server, with the environment (endpoint, test credentials) that
pyarrow, boto3 and every process the test starts read it through.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The dashboard's subprocess modules must report ready within 30 s by default, or `ray start --head` fails
# ("Module MetricsHead failed to start"): seen at load 20+ on 2 cores with parallel test files. Given
# to every `ray start --head` the tests run.
SLOW_MACHINE_RAY_ENV = {"RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300"}

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


_HANDED_OUT: set[int] = set()  # ports (and worker-port ranges) given out by this process

# Test ports come from 20000-32767: below the kernel's ephemeral range (32768-60999 by default), so
# no process's outgoing connection is given one while a server is starting on it, and above Ray's
# default worker ports (10002-19999). Each pytest-xdist worker draws from its own slice of it: two
# workers never pick the same port, and a released one is not given to another worker's bind.
PORTS = range(20000, 32768)


def _slice() -> range:
    """This process's share of ``PORTS``: all of it without xdist, 1/n of it in worker gw<i> of n."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    i = int(worker[2:]) if worker.startswith("gw") else 0
    size = len(PORTS) // max(n, 1)
    return range(PORTS.start + i * size, PORTS.start + (i + 1) * size)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A free loopback port of this process's slice (``_slice``), never one this process handed out
    before; with ``span`` > 1, the first of ``span`` consecutive free ports none of which was (e.g. a
    Ray worker-port range). The OS may give a released port to the next bind: a node's ports picked
    one by one once collided ("port 53163 that is used by other components"), failing the node's
    start. The scan starts at a random place, so that two test runs on one machine (other sessions')
    seldom try the same port."""
    ports = _slice()
    start = random.randrange(len(ports))
    for k in range(len(ports)):
        port = ports[(start + k) % len(ports)]
        block = range(port, port + span)
        if block.stop > ports.stop or set(block) & _HANDED_OUT or not all(map(_bindable, block)):
            continue
        _HANDED_OUT.update(block)
        return port
    raise RuntimeError(f"no {span} free consecutive port(s) in {ports.start}-{ports.stop - 1}")


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group ``proc`` leads, wait for ``proc`` (reaping it: a zombie still counts as a
    group member), then SIGKILL whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass


@contextmanager
def _serve(cmd: list[str], health: str, log_path: Path, env: dict | None = None,
           timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    log = open(log_path, "w")
    # own process group (pgid == its pid): stopping it stops its workers too, nothing else
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited rc={proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[:3]} did not answer {health} within {timeout:.0f} s")
            time.sleep(0.3)
        yield proc
    finally:
        stop_group(proc)
        log.close()


@contextmanager
def mlflow_server(d: Path) -> Iterator[str]:
    """A tracking server with its store in ``d``; yields its URI."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers on 2 CPUs
    uri = f"http://127.0.0.1:{port}"
    with _serve([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination",
                 str(d / "artifacts"), "--workers", "1"], uri + "/health", d / "mlflow-server.log", env):
        yield uri


@contextmanager
def s3_server(d: Path, buckets: tuple[str, ...] = ("bucket",), auth: bool = False) -> Iterator[dict]:
    """moto's S3-compatible server with ``buckets`` created; yields the environment that points clients
    at it (``AWS_ENDPOINT_URL`` + test credentials). ``auth``: the server checks credentials (IAM),
    so the test credentials are refused."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_ENV}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(len(buckets))  # create the buckets, then check every request
    moto = Path(sys.executable).with_name("moto_server")
    with _serve([str(moto), "-H", "127.0.0.1", "-p", str(port)], endpoint + "/moto-api/data.json",
                d / "s3-server.log", env):
        client_env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        for b in buckets:
            s3.create_bucket(Bucket=b)
        yield client_env
