"""The embedded Ray (ray_utils.init_ray without an address): its own instance, closed to clients without its token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# Starts the embedded Ray, proves it runs work, prints its GCS address (and, for the control
# below, its token), then holds it until stdin closes.
SERVE = """
import json, os, sys
from dynamo_dist.ray_utils import close_embedded_ray, init_ray
assert close_embedded_ray()  # what `dynamo-dist population|meta|sweep|run` does first
import ray
init_ray()
ok = ray.get(ray.remote(lambda: 41 + 1).remote())
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "ok": ok,
                  "mode": os.environ.get("RAY_AUTH_MODE"), "token": os.environ.get("RAY_AUTH_TOKEN")}), flush=True)
sys.stdin.read()
ray.shutdown()
"""
CONNECT = "import sys, ray; ray.init(address=sys.argv[1]); print('CONNECTED', flush=True); ray.shutdown()"


def _env(**extra) -> dict:
    """This environment without Ray auth or address; a client on this machine, as every client of an
    embedded Ray must be (its node is 127.0.0.1: a client that takes the host's address for its own
    waits for a node of that address forever)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def test_embedded_ray_refuses_a_client_without_its_token():
    server = subprocess.Popen([sys.executable, "-c", SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=_env(), start_new_session=True)
    try:
        info = json.loads(server.stdout.readline())
        assert info["ok"] == 42 and info["mode"] == "token" and len(info["token"]) == 64
        refused = subprocess.run([sys.executable, "-c", CONNECT, info["gcs"]], capture_output=True, text=True,
                                 timeout=180, env=_env())
        assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
        # control: the same client with the instance's token gets in, so the refusal above is the token's doing
        admitted = subprocess.run([sys.executable, "-c", CONNECT, info["gcs"]], capture_output=True, text=True,
                                  timeout=180, env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=info["token"]))
        assert admitted.returncode == 0 and "CONNECTED" in admitted.stdout, admitted.stderr[-2000:]
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)  # the process group we started, nothing else
            server.wait()
