"""The one Ray start: init_ray_for sizes local Ray from the job config's training workers."""
from __future__ import annotations

import kale_ray.runtime.ray as rt
from kale_ray.methods.kard.config import KARDJobConfig
from kale_ray.methods.knowtuning.config import KnowTuningJobConfig
from kale_ray.config import load_config


def _captured(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(rt, "init_ray", lambda address=None, train_workers=0, **k: calls.append((address, train_workers)))
    return calls


def test_init_ray_for_takes_the_most_workers_of_any_section(monkeypatch):
    calls = _captured(monkeypatch)
    cfg = load_config(KARDJobConfig, None, ["train.num_workers=1", "reranker.num_workers=3",
                                             "ray_address=ray://head:10001"])
    rt.init_ray_for(cfg)
    assert calls == [("ray://head:10001", 3)]


def test_init_ray_for_finds_nested_train_sections(monkeypatch):
    calls = _captured(monkeypatch)
    cfg = load_config(KnowTuningJobConfig, None, ["stage1.train.num_workers=4"])
    rt.init_ray_for(cfg)
    assert calls[0][1] >= 4


def test_quiet_env_hook_is_importable():
    mod, _, fn = rt.QUIET_ENV["worker_process_setup_hook"].rpartition(".")
    import importlib

    assert callable(getattr(importlib.import_module(mod), fn))
