"""Connecting to Ray: the one place that decides between a cluster and an in-process Ray.

The embedded instance (no address) is this process's own and closed: ``init_ray`` starts it
with ``address="local"`` (a bare ``ray.init()`` attaches to the last ``ray start`` cluster on
the machine), and ``close_embedded_ray`` turns Ray's token authentication on with a fresh
token before Ray is imported. Ray 2.58 binds its GCS and raylet to the host's address even
when asked for 127.0.0.1, so the token is what keeps a client without it out; Ray reads the
mode once, at import, which is why the CLI calls ``close_embedded_ray`` first thing.

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


def close_embedded_ray(address: str | None = None) -> bool:
    """Token auth with a fresh token for an embedded Ray this process will start; True when set.

    Leaves everything alone when a cluster is named (``address``/$RAY_ADDRESS), when the user
    chose a mode ($RAY_AUTH_MODE), or when Ray is imported already (the mode would not apply;
    from Python, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN before importing ray instead).
    The embedded Ray's processes inherit the token through the environment.
    """
    if address or os.environ.get("RAY_ADDRESS") or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return True


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
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=verbose(), configure_logging=False)
    return ray.cluster_resources()


def num_nodes() -> int:
    """Live nodes of the connected Ray cluster (1 for an embedded Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
