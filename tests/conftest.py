"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


# `make test` hands test files to parallel workers (pytest-xdist, --dist loadfile) in collection order.
# The files that took longest go first, so that none of them starts last and runs on alone; measured
# with `--durations` (benchmarks/RESULTS.md, the make-test rows). A file not named keeps its place
# after these. Order only: which tests run, and each file's own order, do not change.
SLOWEST_FIRST = ("test_multinode.py", "test_multinode_sweeps.py", "test_faults_silent.py", "test_tune.py", "test_object_store.py",
                 "test_ray_train.py", "test_console.py", "test_trainer.py", "test_faults.py",
                 "test_population_ray.py", "test_cnn_ddp.py", "test_jobs.py", "test_population.py",
                 "test_analysis_report.py", "test_posthoc.py", "test_ray_embedded.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: a test of Ray's timing that `make test` runs after the parallel "
                            "files, with nothing of the suite beside it (Makefile); integration tests only, as "
                            "`make test-fast` runs none of them")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's collection, which the scheduler follows
        rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind():
    """A stage called in-process without ``local_ray`` starts Ray through ``init_ray`` and leaves it
    running (as it would in the CLI's process until that exits): it is shut down with the module, so
    which modules share a process (pytest-xdist hands files to workers in any order) changes nothing."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module: 2 CPUs on 127.0.0.1, no dashboard; shut down after the module.

    Request it by name (or ``pytestmark = pytest.mark.usefixtures("local_ray")``); module
    fixtures that need Ray list it before their other arguments so that Ray starts first. Always a
    new instance of this process's own (``address="local"``): a bare ``ray.init()`` attaches to the
    last ``ray start`` cluster on the machine, another test's or another user's."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
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


@pytest.fixture(scope="session")
def tiny_population():
    """``tiny_population(root, *groups, num_examples=1000, num_probe=32, num_test=32, **kw)``: the
    groups (``config.GroupSpec``) trained and recorded into ``root`` by the in-process loop (no Ray),
    as the tests' tiny populations are made; returns ``root`` as a Path. Other ``PopulationConfig``
    fields go in ``kw``. Session-scoped so that module fixtures can use it."""
    from dynamo_dist import config
    from dynamo_dist.population import train as population

    def make(root, *groups, num_examples: int = 1000, num_probe: int = 32, num_test: int = 32, **kw) -> Path:
        population.run_local(config.PopulationConfig(root=str(root), groups=groups, num_examples=num_examples,
                                                     num_probe=num_probe, num_test=num_test, **kw), progress=False)
        return Path(root)

    return make


@pytest.fixture(scope="module")
def digit_parity_root(tmp_path_factory, tiny_population) -> str:
    """A tiny real population, two output groups: 2 MNIST-1D digit GRUs (hidden 8, 10 classes) and 2
    parity GRUs (hidden 12, 2 classes), one epoch each; 96 probe and 48 test sequences recorded."""
    from dynamo_dist import config

    groups = (
        config.GroupSpec(name="digit", task="mnist1d", hidden_size=8, num_seeds=2, epochs=1, lr=1e-2, batch_size=64),
        config.GroupSpec(name="parity", task="mnist1d_parity", hidden_size=12, num_seeds=2, epochs=1, lr=1e-2,
                         batch_size=64),
    )
    return str(tiny_population(tmp_path_factory.mktemp("digit-parity"), *groups, num_examples=600, num_probe=96,
                               num_test=48))
