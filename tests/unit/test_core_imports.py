"""The pure core must stay importable without the heavy stack (Ray, vLLM, DeepSpeed, torch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("ray", "vllm", "deepspeed", "torch")
CORE = ("kale_ray.core.kg", "kale_ray.core.qa", "kale_ray.core.parse", "kale_ray.core.prompts",
        "kale_ray.core.rejects", "kale_ray.config")

_SCRIPT = """
import importlib, json, sys
for m in {mods!r}:
    importlib.import_module(m)
heavy = {heavy!r}
print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in heavy)))
"""


def _loaded_heavy(mods, heavy=HEAVY) -> list[str]:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(mods=tuple(mods), heavy=tuple(heavy))],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_stay_light():
    assert _loaded_heavy(CORE) == []


@pytest.mark.parametrize("mod", CORE)
def test_each_core_module_alone(mod):
    assert _loaded_heavy([mod]) == []


def test_detector_is_not_vacuous():
    """The same check does see a top-level package the core imports (yaml via kale_ray.config)."""
    assert "yaml" in _loaded_heavy(["kale_ray.config"], heavy=("yaml",))


def test_test_module_basenames_are_unique():
    """pytest's default import mode fails collection when two test files share a basename
    (it broke CI once: unit/test_kalm.py vs integration/test_kalm.py)."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).resolve().parents[1].rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
