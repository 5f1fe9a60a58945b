"""Pure modules stay importable without the heavy stack: ONE parametrised check over every pure module.

Each module is imported alone in a fresh interpreter (run two at a time) and must not pull Ray,
vLLM, DeepSpeed, transformers or networkx; the modules that do no tensor work must not pull
torch either. Every ``kale_ray.core.*`` module (subpackages such as ``core.search`` included) is
found automatically; the pure modules of the methods and of the trainer are listed below (a module
listed as optional is checked once it exists).
"""
from __future__ import annotations

import importlib.util
import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "vllm", "deepspeed", "transformers", "networkx")


def _core_modules() -> list[str]:
    import kale_ray.core

    return ["kale_ray.core"] + sorted(m.name for m in pkgutil.walk_packages(kale_ray.core.__path__, "kale_ray.core."))


OPTIONAL = ["kale_ray.runtime.storage"]
PURE = sorted(set(_core_modules()) | {
    "kale_ray.config", "kale_ray.cli", "kale_ray.methods.kale.metrics", "kale_ray.methods.kale.evaluate",
    "kale_ray.runtime.stages", "kale_ray.runtime.generate", "kale_ray.runtime.report", "kale_ray.runtime.ray",
    "kale_ray.methods.kale.report", "kale_ray.methods.kale.general", "kale_ray.methods.kard.report",
    "kale_ray.methods.kalm.report",
    "kale_ray.methods.knowtuning.report", "kale_ray.methods.kale.recipe", "kale_ray.methods.kard.recipe",
    "kale_ray.synth.qa_source", "kale_ray.synth.ids",
    "kale_ray.methods.kard.config", "kale_ray.methods.kard.data", "kale_ray.methods.kard.kb",
    "kale_ray.methods.kard.losses", "kale_ray.methods.kard.prompts",
    "kale_ray.methods.kard.retrieval", "kale_ray.methods.kard.scoring", "kale_ray.methods.kard.verify",
    "kale_ray.methods.kalm.config", "kale_ray.methods.kalm.data", "kale_ray.methods.kalm.evaluate",
    "kale_ray.methods.kalm.losses",
    "kale_ray.methods.knowtuning.atomic", "kale_ray.methods.knowtuning.config", "kale_ray.methods.knowtuning.corrupt",
    "kale_ray.methods.knowtuning.data", "kale_ray.methods.knowtuning.dpo", "kale_ray.methods.knowtuning.factcheck",
    "kale_ray.methods.knowtuning.longform",
    "kale_ray.train.collators", "kale_ray.train.heads", "kale_ray.train.loop", "kale_ray.train.registry",
} | {m for m in OPTIONAL if importlib.util.find_spec(m) is not None})
# Modules whose job is tensor maths: torch is theirs to import (the rest must not pull it).
TORCH_OK = {"kale_ray.core.losses", "kale_ray.methods.kard.losses", "kale_ray.methods.kalm.evaluate", "kale_ray.methods.kalm.losses",
            "kale_ray.methods.knowtuning.dpo", "kale_ray.train.collators", "kale_ray.train.heads", "kale_ray.train.loop",
            "kale_ray.train.registry"}

_SCRIPT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
heavy = set(sys.argv[2].split(","))
print(json.dumps(sorted({k.split('.')[0] for k in sys.modules} & heavy)))
"""


def _forbidden(mod: str) -> tuple[str, ...]:
    return HEAVY if mod in TORCH_OK else HEAVY + ("torch",)


def _loaded(mod: str, heavy: tuple[str, ...]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mod, ",".join(heavy)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, f"importing {mod} failed: {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pulled() -> dict[str, list[str] | str]:
    """``{module: heavy packages it pulled}`` for every pure module, two fresh interpreters at a time."""
    def one(mod: str) -> list[str] | str:
        try:
            return _loaded(mod, _forbidden(mod))
        except AssertionError as e:
            return str(e)

    with ThreadPoolExecutor(2) as ex:
        return dict(zip(PURE, ex.map(one, PURE)))


@pytest.mark.parametrize("mod", PURE)
def test_pure_module_imports_no_heavy_framework(mod, pulled):
    assert pulled[mod] == [], f"{mod} pulled {pulled[mod]} (forbidden here: {', '.join(_forbidden(mod))})"


def test_the_list_covers_the_pure_modules_named_in_the_layout():
    assert {"kale_ray.config", "kale_ray.core.losses", "kale_ray.core.parse", "kale_ray.core.prompts",
            "kale_ray.core.kg", "kale_ray.core.qa", "kale_ray.core.paths", "kale_ray.core.search",
            "kale_ray.core.search.bidirectional", "kale_ray.core.search.numba_kernel"} <= set(PURE)
    assert TORCH_OK <= set(PURE)


def test_detector_is_not_vacuous():
    """The same check does see a top-level package a module imports (yaml via kale_ray.config, torch via losses)."""
    assert "yaml" in _loaded("kale_ray.config", ("yaml",))
    assert _loaded("kale_ray.core.losses", ("torch",)) == ["torch"]


def test_test_module_basenames_are_unique():
    """pytest's default import mode fails collection when two test files share a basename
    (it broke CI once: unit/test_kalm.py vs integration/test_kalm.py)."""
    from collections import Counter

    names = Counter(p.name for p in Path(__file__).resolve().parents[1].rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
