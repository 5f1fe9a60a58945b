"""KI path synthesis (KALE): the path search, now the package ``kale_ray.core.search``.

This module is a facade that keeps the old import path working: it re-exports the public API
and the private names other modules and tests use. The code lives in one module per strategy:

* ``kale_ray.core.search.api`` -- ``find_paths`` (dispatch, BFS fallback, partial paths),
  ``find_paths_many``, ``sample_paths``, ``path_to_named``, networkx interop;
* ``kale_ray.core.search.common`` -- ``PathSearchParams``, ``KGPath``, validation, BFS;
* ``kale_ray.core.search.landmark`` -- the A* modes (``"landmark"``, ``"target"``), the
  per-graph ``LandmarkTable``, the multi-path A*;
* ``kale_ray.core.search.bidirectional`` -- the meet-in-the-middle search (the default), with
  its walk sets and ``PathCache`` in ``walks`` and the optional numba kernel in ``numba_kernel``;
* ``kale_ray.core.search.arrays`` -- the per-index search CSRs (``search_arrays``);
* ``kale_ray.core.search.relations`` -- the relation-following searches (``relation_weights``).

To monkeypatch a function, patch the module that defines it, not this facade.
"""
from __future__ import annotations

from kale_ray.core.search import *  # noqa: F403  (the public API, ``kale_ray.core.search.__all__``)
from kale_ray.core.search import __all__  # noqa: F401
from kale_ray.core.search.arrays import _prepared  # noqa: F401  (private names the tests use)
from kale_ray.core.search.numba_kernel import _numba_enabled  # noqa: F401
from kale_ray.core.search.walks import _bits_dtype, _work_bits  # noqa: F401
