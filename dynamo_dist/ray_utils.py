"""Connecting to Ray: the one place that decides between a cluster and an in-process Ray."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` / $RAY_ADDRESS, or start Ray in-process bound to 127.0.0.1.

    Returns the cluster resources. A no-op when Ray is already initialised (tests share one).
    """
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=True, configure_logging=False)
    return ray.cluster_resources()
