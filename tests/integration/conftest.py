"""Integration tests share one process: each module starts from no Ray connection and
leaves none behind, so a module never inherits another's cluster size or a dead cluster."""
from __future__ import annotations

import pytest


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def fresh_ray_per_module():
    _shutdown_ray()
    yield
    _shutdown_ray()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one module: 4 logical CPUs (2 train workers + Ray Data), no dashboard."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
