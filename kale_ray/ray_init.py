"""Connect a job's driver to Ray: the cluster at ``address`` / ``RAY_ADDRESS`` when there is one
(``ray job submit`` sets it), else a local Ray sized for the job's training workers."""
from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, train_workers: int = 0, log_to_driver: bool = False,
             runtime_env: dict[str, Any] | None = None) -> str:
    """Says where the driver runs (``cluster at ADDRESS`` / ``local Ray``). No-op when Ray is already initialised. Locally: one logical CPU per training worker plus two
    for Ray Data (reads, vLLM and scoring actors), at least the machine's core count."""
    import ray

    if ray.is_initialized():
        return "Ray already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if runtime_env is not None:
        kwargs["runtime_env"] = runtime_env
    if address:
        # A cluster driver keeps the job's own runtime env (``ray job submit --runtime-env-json``):
        # Ray refuses to merge a second one into it.
        kwargs.pop("runtime_env", None)
        ray.init(address=address, **kwargs)
        return f"cluster at {address}"
    ray.init(num_cpus=max(os.cpu_count() or 1, train_workers + 2), include_dashboard=False, **kwargs)
    return "local Ray"
