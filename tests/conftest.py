"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module: 2 CPUs on 127.0.0.1, no dashboard; shut down after the module.

    Request it by name (or ``pytestmark = pytest.mark.usefixtures("local_ray")``); module
    fixtures that need Ray list it before their other arguments so that Ray starts first."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models (as population actors run them): two
    spinning OpenMP threads on a busy 2-core machine made such tests up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
