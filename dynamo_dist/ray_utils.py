"""Connecting to Ray: the one place that decides between a cluster and an in-process Ray.

The embedded instance (no address) is this process's own and closed: ``init_ray`` starts it
with ``address="local"`` (a bare ``ray.init()`` attaches to the last ``ray start`` cluster on
the machine), and ``close_embedded_ray``, before Ray is imported (Ray reads both settings once,
at import, which is why the CLI calls it first thing):

- turns Ray's token authentication on with a fresh token: no client without it gets in;
- keeps every listener on loopback. Ray 2.58 turns a requested 127.0.0.1 into the host's
  address (``services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
  is 0, and with the host's address its Prometheus metrics endpoints (the dashboard agent's,
  the autoscaler monitor's) listen on 0.0.0.0 and answer anyone, token or not. With it 0 the
  node's address is 127.0.0.1 and GCS, raylet, agents and metrics listen there only.

A driver killed with SIGKILL runs no cleanup, and Ray's agents outlive it (seen: 20 s and
more). ``init_ray`` therefore starts a watchdog for an embedded Ray that this process closed:
a process of its own session that notes the driver's Ray processes until the driver ends (EOF
on a pipe only the driver holds) and then stops them (SIGTERM, SIGKILL after
``WATCHDOG_TERM_S``), with any process carrying this instance's token.

The console is the project's own: Ray workers' output is not streamed to the driver unless
``DYNAMO_VERBOSE=1`` (``--verbose``). Ray Train 2.58's controller helpers print warnings
that do not apply here (a PlacementGroupCleaner asking a State API that only exists with the
dashboard, every few seconds; a PreemptionWatcher's restart caveat), and every stage reports
its progress from the driver (population: models; meta: steps with live val metrics, sent by
rank 0 through a queue). Failures still arrive as the exceptions Ray raises in the driver,
and every worker's log stays in Ray's session directory.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Put back the SIGINT/SIGUSR1 handlers when the block ends. Ray Train's ``fit`` (in the main
    thread) and Ray Tune's install their own for the run and leave them: a Ctrl-C in a later stage of
    the same process would ask a finished run's controller to abort (starting a new Ray to do it, or
    exiting 0) instead of interrupting the stage."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:  # None: installed outside Python; nothing to put back
                signal.signal(sig, handler)


def verbose() -> bool:
    """Whether Ray's own logs should reach the console (``DYNAMO_VERBOSE=1``, the CLI's --verbose)."""
    return os.environ.get("DYNAMO_VERBOSE", "") not in ("", "0")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # 0: Ray takes 127.0.0.1 as the node's address (module docstring)
WATCHDOG_TERM_S = 3.0  # SIGTERM to SIGKILL: Ray's processes exit within a second of SIGTERM
WATCHDOG_POLL_S = 0.5  # how often the watchdog notes the driver's Ray processes (a /proc scan, ~ms)
_watched_token: str | None = None  # the token of the embedded Ray this process closed (its watchdog's key)


def close_embedded_ray(address: str | None = None) -> bool:
    """Close an embedded Ray this process will start (module docstring): listeners on loopback
    only, and token auth with a fresh token; True when the token was set.

    Leaves everything alone when a cluster is named (``address``/$RAY_ADDRESS) or when Ray is
    imported already (the settings would not apply; from Python, set RAY_AUTH_MODE=token,
    RAY_AUTH_TOKEN and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray instead); the
    token also when the user chose a mode ($RAY_AUTH_MODE). The embedded Ray's processes inherit
    both through the environment.
    """
    global _watched_token
    if address or os.environ.get("RAY_ADDRESS") or "ray" in sys.modules:
        return False
    os.environ.setdefault(LOOPBACK_ENV, "0")
    if "RAY_AUTH_MODE" in os.environ:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = _watched_token = secrets.token_hex(32)
    return True


def _start_watchdog() -> None:
    """The watchdog of this process's embedded Ray (module docstring), once per process. It gets
    the token on its stdin (never in its argv, which every user of the machine can read), in a
    session of its own (a Ctrl-C of the driver's terminal does not reach it) and without the
    token in its environment (it is not one of the processes it stops)."""
    global _watched_token
    if _watched_token is None:
        return
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "dynamo_dist.ray_utils"], stdin=subprocess.PIPE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc.stdin.write(f"{_watched_token}\n".encode())
    proc.stdin.flush()
    _keep.append(proc)  # the pipe's write end stays open for as long as this process lives
    _watched_token = None


_keep: list = []


def _watch(token: str) -> None:
    """The watchdog's body: until EOF on stdin (the driver is gone, however it ended), note the
    driver's Ray processes every ``WATCHDOG_POLL_S``; then stop those still running, with their
    children and any process that carries ``token``. A snapshot, because a dead driver's children
    are re-parented at once, and the environment alone, because Ray's agents rewrite theirs
    (setproctitle): ``/proc/<pid>/environ`` of ray::DashboardAgent holds no token to match."""
    import select

    import psutil

    me, driver, known = os.getpid(), psutil.Process(os.getppid()), {}
    while not select.select([sys.stdin.buffer], [], [], WATCHDOG_POLL_S)[0]:  # readable: EOF
        try:
            known.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != me)
        except psutil.NoSuchProcess:
            break
    for sig, wait_s in ((signal.SIGTERM, WATCHDOG_TERM_S), (signal.SIGKILL, 1.0)):
        procs = [p for p in known.values() if p.is_running()]  # is_running: the same process, not a reused pid
        for p in list(procs):
            try:
                procs += p.children(recursive=True)
            except psutil.Error:
                continue
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAY_AUTH_TOKEN") == token:
                    procs.append(p)
            except psutil.Error:  # gone, or another user's: not ours
                continue
        procs = [p for p in {p.pid: p for p in procs}.values() if p.pid != me and _is_ray(p)]
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=wait_s)


def _is_ray(p) -> bool:
    """A process of Ray (its binaries, Python modules or ``ray::`` workers and agents), never another
    child of the driver."""
    import psutil

    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return cmd.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmd


def init_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` / $RAY_ADDRESS, or start a Ray instance of this process's own
    (``address="local"``, 127.0.0.1 asked for, no dashboard).

    Returns the cluster resources. A no-op when Ray is already initialised (tests share one).
    """
    import ray

    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, log_to_driver=verbose(), logging_level="INFO" if verbose() else "WARNING")
        else:
            _start_watchdog()  # before Ray's processes exist: a driver killed during ray.init leaves none either
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=verbose(), configure_logging=False)
    return ray.cluster_resources()


def num_nodes() -> int:
    """Live nodes of the connected Ray cluster (1 for an embedded Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


if __name__ == "__main__":  # the watchdog (``_start_watchdog``): its token is the first line of stdin
    _watch(sys.stdin.buffer.readline().decode().strip())
