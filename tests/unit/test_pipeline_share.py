"""How synthesis hands the KG to its workers: a cached KG travels as its folder, not its arrays."""
from __future__ import annotations

import pickle
from pathlib import Path
import shutil

import numpy as np

from kale_ray.config import KGConfig, QAConfig, SynthConfig
from kale_ray.core import kgstore
from kale_ray.synth import pipeline

ROWS = [("alga", "isa", "plant"), ("plant", "isa", "organism"), ("fish", "lives_in", "sea_water")]


def _cfg(kg_path) -> SynthConfig:
    return SynthConfig(kg=KGConfig(source=str(kg_path)), qa=QAConfig(source=str(kg_path.parent / "qa.jsonl")))


def test_cached_kg_travels_as_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KALE_RAY_CACHE", str(tmp_path / "cache"))
    kgf = tmp_path / "kg.tsv"
    kgf.write_text("".join("\t".join(r) + "\n" for r in ROWS))
    cfg = _cfg(kgf)
    kg, _ = pipeline.load_shared_kg(cfg)
    handle = pipeline._share(kg, cfg)
    assert handle["path"] == kg.path and len(pickle.dumps(handle)) < 2000  # no arrays in the object store
    opened = pipeline._open_shared(handle)
    assert list(opened.entities) == list(kg.entities)
    assert isinstance(opened.triples.base, np.memmap)
    # A node without the folder (another machine, a cleaned cache) builds its own copy once.
    shutil.rmtree(kg.path)
    rebuilt = pipeline._open_shared(handle)
    assert list(rebuilt.entities) == list(kg.entities) and rebuilt.path and rebuilt.path != ""


def test_in_memory_kg_travels_as_arrays(tmp_path):
    kgf = tmp_path / "kg.tsv"
    kgf.write_text("".join("\t".join(r) + "\n" for r in ROWS))
    kg = kgstore.build_columnar_kg(str(kgf))  # not from the cache: no folder to map
    meta, arrays = pipeline._share(kg, _cfg(kgf))
    assert kg.path is None and set(arrays) >= {"triples", "ent_buf"}


def test_landmark_table_is_built_once_into_the_cache_folder(tmp_path, monkeypatch):
    """heuristic=landmark: the landmark distances live beside the KG's arrays; a worker's open maps them."""
    from kale_ray.core import paths
    from kale_ray.core.search import landmark

    monkeypatch.setenv("KALE_RAY_CACHE", str(tmp_path / "cache"))
    kgf = tmp_path / "kg.tsv"
    kgf.write_text("".join("\t".join(r) + "\n" for r in ROWS))
    cfg = _cfg(kgf)
    cfg.paths.heuristic = "landmark"
    kg, _ = pipeline.load_shared_kg(cfg)
    assert (Path(kg.path) / "lm_dist.npy").exists()
    built = []
    monkeypatch.setattr(landmark, "build_landmark_table", lambda *a, **k: built.append(1))  # the defining module
    worker = pipeline._open_shared(pipeline._share(kg, cfg))
    table = paths.landmark_table(worker.index(True), build=False)
    assert table is not None and isinstance(table.dist.base, np.memmap) and built == []
    assert table.dist.shape[0] == worker.num_entities


def test_shards_per_task_balances_and_caps():
    from kale_ray.synth.pipeline import shards_per_task

    assert shards_per_task(400, 2) == 16  # capped: a task stays a few seconds
    assert shards_per_task(40, 2) == 2  # 20 tasks: about 8 a worker
    assert shards_per_task(5, 2) == 1  # fewer shards than 8 a worker: one each
    assert shards_per_task(0, 2) == 1
    assert shards_per_task(10_000, 0) == 16  # no CPU reported: still a sane size
    assert shards_per_task(400, 2, setting=3) == 3  # the setting wins
    for shards in range(0, 500, 7):  # every shard is taken: tasks x per_task covers them
        for workers in (1, 2, 8):
            per = shards_per_task(shards, workers)
            assert 1 <= per <= 16 and -(-shards // per) * per >= shards
