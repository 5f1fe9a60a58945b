"""BM25 over the knowledge base with ``bm25s`` (sparse, fast), built once and saved.

:class:`BM25Index` wraps a ``bm25s.BM25`` plus the passage ids in index order. Queries are
tokenized with the same tokenizer as the corpus (lower-cased words, English stopwords) and
words the corpus never saw are dropped (they score 0 anyway). Imports no Ray/vLLM/torch;
:class:`BM25Retriever` is the Ray Data callable class that loads a saved index once per actor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

IDS_FILE = "passage_ids.json"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
    def __init__(self, retriever, ids: list[str]) -> None:
        self.retriever = retriever
        self.ids = ids
        self.vocab = set(retriever.vocab_dict)

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> "BM25Index":
        import bm25s

        if len(ids) != len(texts) or not ids:
            raise ValueError(f"BM25Index.build: {len(ids)} ids for {len(texts)} texts")
        r = bm25s.BM25(k1=k1, b=b)
        r.index(tokenize(texts), show_progress=False)
        return cls(r, list(ids))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(tmp), show_progress=False)
        (tmp / IDS_FILE).write_text(json.dumps(self.ids))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "BM25Index":
        import bm25s

        folder = Path(folder)
        r = bm25s.BM25.load(str(folder), show_progress=False)
        return cls(r, json.loads((folder / IDS_FILE).read_text()))

    def __len__(self) -> int:
        return len(self.ids)

    def _query_tokens(self, queries: Sequence[str]) -> list[list[str]]:
        return [[w for w in q if w in self.vocab] for q in tokenize(queries)]

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices (Q, k), scores (Q, k))`` best first; k is capped at the corpus size.

        A query with no known word gets scores 0 (its indices are then arbitrary).
        """
        k = min(k, len(self.ids))
        toks = self._query_tokens(queries)
        out_i = np.zeros((len(toks), k), dtype=np.int64)
        out_s = np.zeros((len(toks), k), dtype=np.float32)
        for qi, q in enumerate(toks):
            if not q:
                out_i[qi] = np.arange(k)
                continue
            scores = self.retriever.get_scores(q)  # (N,)
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
            top = top[np.lexsort((top, -scores[top]))]  # by score, ties by index: deterministic
            out_i[qi], out_s[qi] = top, scores[top]
        return out_i, out_s

    def score(self, query: str, indices: Sequence[int]) -> np.ndarray:
        """BM25 scores of the given passages against one query (the reranker's targets)."""
        q = self._query_tokens([query])[0]
        if not q:
            return np.zeros(len(indices), dtype=np.float32)
        return self.retriever.get_scores(q)[np.asarray(indices, dtype=np.int64)].astype(np.float32)


class BM25Retriever:
    """Ray Data callable class: rows with ``query`` -> ``hits`` (JSON list of [passage index, score])."""

    def __init__(self, index_dir: str, k: int) -> None:
        self.index = BM25Index.load(index_dir)
        self.k = k

    def __call__(self, batch: dict) -> dict:
        idx, scores = self.index.search([str(q) for q in batch["query"]], self.k)
        batch["hits"] = np.array([json.dumps([[int(i), float(s)] for i, s in zip(ri, rs)])
                                  for ri, rs in zip(idx, scores)], dtype=object)
        return batch
