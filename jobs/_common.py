"""What every job in jobs/ does first: parse ``--config`` + ``key.sub=value`` overrides, then connect to Ray.

Jobs are run as scripts (``python jobs/x.py``), so this folder is on ``sys.path`` and
``from _common import ...`` works both locally and under ``ray job submit --working-dir .``
(where Ray also puts the uploaded working dir first on ``PYTHONPATH``, so the job imports the
``kale_ray`` it was submitted with, not whatever the nodes had installed).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from kale_ray.config import ConfigError, load_config


def parse_job_args(cls: type, doc: str, argv: list[str] | None = None) -> tuple[Any, argparse.Namespace]:
    """``(config, parsed args)``; a bad key or value exits with status 2 and a message naming the key."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     epilog="overrides: key.sub=value, e.g. qa.num_questions=100")
    parser.add_argument("--config", "-c", default=None, help=f"YAML file with {cls.__name__} fields")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    bad = [x for x in args.overrides if "=" not in x]
    if bad:
        parser.error(f"overrides must be key.sub=value, got {' '.join(bad)}")
    try:
        return load_config(cls, args.config, args.overrides), args
    except ConfigError as e:
        parser.error(f"config error: {e}")  # exits 2
        raise  # unreachable


def connect_ray(min_cpus: int = 4, address: str | None = None) -> str:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (``ray job submit`` sets it), else start Ray here.

    Locally Ray gets at least ``min_cpus`` logical CPUs: Ray Train workers hold one each and
    Ray Data's feed needs room beside them (with exactly ``os.cpu_count()`` it can starve).
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    if address:
        ray.init(address=address)
        return f"cluster at {address}"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")  # resolves to RAY_ADDRESS
        return f"cluster at {os.environ['RAY_ADDRESS']}"
    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False)
    return "local Ray"
