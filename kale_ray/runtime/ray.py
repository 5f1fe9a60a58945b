"""The one Ray start of every job: the cluster at ``address`` / ``RAY_ADDRESS`` when there is one
(``ray job submit`` sets it), else a local Ray sized for the job's training workers.

Recipes call :func:`init_ray` from the stages that need Ray (a reused or refused run starts none);
it is a no-op once Ray is up. ``QUIET_ENV`` is the workers' runtime env for local runs.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

# Worker env for local runs: progress lines from training reach the driver, vLLM's
# per-request INFO chatter does not, nor the resource tracker's KeyError lines when a vLLM
# actor exits (see quiet_resource_tracker below).
QUIET_ENV = {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"},
             "worker_process_setup_hook": "kale_ray.runtime.ray.quiet_resource_tracker"}


def init_ray(address: str | None = None, train_workers: int = 0, log_to_driver: bool = True,
             runtime_env: dict[str, Any] | None = QUIET_ENV) -> str:
    """Says where the driver runs (``cluster at ADDRESS`` / ``local Ray``). No-op when Ray is already
    initialised. Locally: one logical CPU per training worker plus two for Ray Data (reads, vLLM and
    scoring actors), at least the machine's core count."""
    import ray

    if ray.is_initialized():
        return "Ray already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if runtime_env is not None:
        kwargs["runtime_env"] = copy.deepcopy(runtime_env)  # ray.init writes into it (the setup hook)
    if address:
        # A cluster driver keeps the job's own runtime env (``ray job submit --runtime-env-json``):
        # Ray refuses to merge a second one into it.
        kwargs.pop("runtime_env", None)
        ray.init(address=address, **kwargs)
        return f"cluster at {address}"
    ray.init(num_cpus=max(os.cpu_count() or 1, train_workers + 2), include_dashboard=False, **kwargs)
    return "local Ray"


def init_ray_for(job_config: Any) -> str:
    """:func:`init_ray` for a job: its ``ray_address`` and the most training workers any of its
    sections asks for (``num_workers`` anywhere in the config tree). The recipes' one Ray start."""
    return init_ray(getattr(job_config, "ray_address", None), _train_workers(job_config))


def _train_workers(node: Any) -> int:
    if not dataclasses.is_dataclass(node):
        return 0
    own = getattr(node, "num_workers", 0)
    return max([own if isinstance(own, int) else 0] + [_train_workers(getattr(node, f.name))
                                                       for f in dataclasses.fields(node)])


def quiet_resource_tracker() -> None:
    """Ray worker setup hook (``QUIET_ENV``): no ``KeyError: '/psm_...'`` / ``'/mp-...'`` when a vLLM actor exits.

    Python's multiprocessing resource tracker is a child process of the worker. When a vLLM actor
    shuts down, the tracker is killed (with the worker's process group; seen here: "process died
    unexpectedly") while vLLM's spawned engine core is still cleaning up. Its shared-memory
    buffers and spawn-context semaphores unlink their segment and *unregister* it. That relaunches
    a tracker which never saw those names, and it prints one ``KeyError`` traceback per name. The
    segments are unlinked by their owner all the same, so the messages only scare.

    The fix here: an unregister is dropped when the tracker is gone (nothing is left to tell it),
    or when it is a relaunched tracker and the name was registered with an earlier one. Every
    other register/unregister goes through unchanged, and a dead tracker is still relaunched
    by the next *register*. vLLM's engine core is a *spawned* child of the actor (no Ray hook
    runs there), so processes this one spawns run this function first too (:class:`_QuietTarget`).
    Idempotent; a no-op on Pythons whose tracker lacks these internals.
    """
    import multiprocessing.context as mpc
    from multiprocessing import resource_tracker as rt

    spawn = getattr(mpc, "SpawnProcess", None)
    if spawn is not None and not getattr(spawn, "_kale_quiet", False):
        orig_popen = spawn._Popen

        def _popen(process_obj):
            target = getattr(process_obj, "_target", None)
            if target is not None and not isinstance(target, _QuietTarget):
                process_obj._target = _QuietTarget(target)
            return orig_popen(process_obj)

        spawn._Popen = staticmethod(_popen)
        spawn._kale_quiet = True

    tracker = getattr(rt, "_resource_tracker", None)
    if tracker is None or getattr(tracker, "_kale_quiet", False):
        return
    if not all(hasattr(tracker, a) for a in ("_check_alive", "ensure_running", "_fd", "_pid")):
        return
    orig_ensure, orig_register, orig_unregister = tracker.ensure_running, tracker.register, tracker.unregister
    state = {"launch": 0}  # tracker launches seen by this process since the hook ran
    registered: dict[tuple[str, str], int] = {}

    def ensure_running() -> None:
        before = (tracker._fd, tracker._pid)
        orig_ensure()
        if before[0] is not None and (tracker._fd, tracker._pid) != before:
            state["launch"] += 1  # a relaunch: the new tracker knows nothing registered before

    def register(name: str, rtype: str) -> None:
        orig_register(name, rtype)
        registered[(name, rtype)] = state["launch"]

    def unregister(name: str, rtype: str) -> None:
        launch = registered.pop((name, rtype), 0)
        if tracker._fd is not None and not tracker._check_alive():
            return  # the tracker was killed (worker exit): nothing to unregister from
        if launch != state["launch"]:
            return  # registered with a tracker that is gone
        orig_unregister(name, rtype)

    # The module-level names are bound methods of the original instance: replace both.
    tracker.ensure_running, tracker.register, tracker.unregister = ensure_running, register, unregister
    rt.ensure_running, rt.register, rt.unregister = ensure_running, register, unregister
    tracker._kale_quiet = True


class _QuietTarget:
    """A spawned process's target that first runs :func:`quiet_resource_tracker` in the child."""

    def __init__(self, target):
        self.target = target

    def __call__(self, *args, **kwargs):
        quiet_resource_tracker()
        return self.target(*args, **kwargs)
