# unit fixtures
# Pure-Python fixtures shared by the unit tests (no Ray, no vLLM, no models).
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def umls_kg():
    """The builtin UMLS KG (from the pykeen wheel's data files). Treat as read-only."""
    from kale_ray.core.kg import load_kg

    return load_kg("builtin:umls")


@pytest.fixture(scope="session")
def umls_questions(umls_kg):
    """Generated 1..3-hop chain questions on UMLS. Treat as read-only (copy before mutating)."""
    from kale_ray.core.qa import generate_questions

    return generate_questions(umls_kg, 120, [1, 2, 3], num_choices=4, max_answers=3, seed=3)
