"""KaLM evaluation: embedding-based KG completion (filtered ranking) and KGQA by generation.

**KG completion.** Every entity is embedded once as "{ entity }" (the key view) and every
test query as "[ head, relation ]" (tail prediction) and "[ tail, inverse of relation ]"
(head prediction), by the last-layer hidden state of the last token, L2-normalised, in
batches: on a Ray Data ``map_batches`` actor when Ray is up (``embed_with``), else by a
plain batched torch pass here. All entities are ranked by cosine for each query in blocks
of ``query_chunk x entity_chunk`` scores (never a full queries x entities or N x N matrix);
the filtered setting leaves out every *other* known true answer (train + valid + test).
Rank of the gold entity = ``1 + #(higher) + #(tied) / 2`` (the "realistic" rank: the mean
of the optimistic and pessimistic ranks, so a model that embeds everything the same gets
the middle rank, not rank 1). MR, MRR, Hits@1/3/10 per direction and both together.

**KGQA.** Multiple-choice questions (:func:`kale_ray.methods.kalm.data.kgqa_items`): tail, head
and relation prediction, triple classification (true vs corrupted), plus open tail
prediction with the training instruction; rendered with the model's chat template,
generated greedily through :func:`kale_ray.runtime.generate.generate` (vLLM by default), scored with
:func:`kale_ray.core.parse.is_correct`. Accuracy per task, with the chance level.

The ranking functions are pure torch/numpy; Ray, vLLM and transformers are imported only
inside the functions that use them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kale_ray.config import ModelConfig
from kale_ray.methods.kalm.config import KaLMEvalConfig
from kale_ray.core.io import write_json, write_jsonl
from kale_ray.core.parse import is_correct
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kalm.data import KGQA_TASKS, KGSplit, KGText, key_text, kgqa_items, kgqa_messages, query_text

HITS_AT = (1, 3, 10)
ScoreBlock = Callable[[slice, slice], torch.Tensor]


# --------------------------------------------------------------------------- ranking (pure)


def filtered_ranks(
    score_block: ScoreBlock,
    gold_scores: torch.Tensor,
    gold: Sequence[int],
    filtered: Sequence[Sequence[int]],
    num_entities: int,
    query_chunk: int = 256,
    entity_chunk: int = 4096,
    atol: float = 0.0,
) -> np.ndarray:
    """Filtered rank of each query's gold entity: ``(Q,)`` float (``.5`` on ties).

    ``score_block(qs, es)`` returns the ``(len(qs), len(es))`` scores of queries ``qs``
    against entities ``es`` (slices); it is called once per block, so at most
    ``query_chunk x entity_chunk`` scores exist at a time. ``gold_scores`` ``(Q,)`` is each
    query's score of its gold entity. ``filtered[i]`` are the entities left out for query
    ``i`` (the other true answers); the gold entity is always left out of the count.

    ``rank = 1 + #{e: s_e > s_gold + atol} + #{e: |s_e - s_gold| <= atol} / 2`` over the
    entities not left out. ``atol`` absorbs float noise between the two ways the scores are
    computed (a block matmul vs the gold dot product); 0 compares exactly.
    """
    q_total = len(gold)
    if gold_scores.shape != (q_total,) or len(filtered) != q_total:
        raise ValueError(f"gold_scores {tuple(gold_scores.shape)}, gold ({q_total},) and filtered "
                         f"({len(filtered)},) must have one entry per query")
    if query_chunk < 1 or entity_chunk < 1:
        raise ValueError("query_chunk and entity_chunk must be >= 1")
    ranks = np.empty(q_total, dtype=np.float64)
    for q0 in range(0, q_total, query_chunk):
        qs = slice(q0, min(q0 + query_chunk, q_total))
        n_q = qs.stop - qs.start
        # (row, entity) pairs left out for this query chunk: the filter plus the gold itself.
        rows = np.concatenate([np.full(len(filtered[i]) + 1, i - q0) for i in range(qs.start, qs.stop)])
        ents = np.concatenate([np.append(np.asarray(filtered[i], dtype=np.int64), gold[i])
                               for i in range(qs.start, qs.stop)])
        g = gold_scores[qs].reshape(-1, 1)  # (q, 1)
        greater = torch.zeros(n_q, dtype=torch.float64)
        ties = torch.zeros(n_q, dtype=torch.float64)
        for e0 in range(0, num_entities, entity_chunk):
            es = slice(e0, min(e0 + entity_chunk, num_entities))
            scores = score_block(qs, es)  # (q, e)
            keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # (q, e)
            inside = (ents >= es.start) & (ents < es.stop)
            keep[torch.as_tensor(rows[inside], device=keep.device),
                 torch.as_tensor(ents[inside] - es.start, device=keep.device)] = False
            g_dev = g.to(scores.device, scores.dtype)
            greater += ((scores > g_dev + atol) & keep).sum(dim=1).cpu().double()
            ties += (((scores - g_dev).abs() <= atol) & keep).sum(dim=1).cpu().double()
        ranks[qs] = (1.0 + greater + ties / 2.0).numpy()
    return ranks


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """MR, MRR, Hits@1/3/10 of ``(Q,)`` ranks (Hits@k counts rank <= k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {"n": 0}
    out = {"n": int(ranks.size), "mr": float(ranks.mean()), "mrr": float((1.0 / ranks).mean())}
    for k in HITS_AT:
        out[f"hits@{k}"] = float((ranks <= k).mean())
    return out


def embedding_ranks(query_emb: torch.Tensor, entity_emb: torch.Tensor, gold: Sequence[int],
                    filtered: Sequence[Sequence[int]], query_chunk: int, entity_chunk: int,
                    atol: float = 1e-6) -> np.ndarray:
    """:func:`filtered_ranks` with cosine scores of L2-normalised ``(Q, D)`` queries and ``(E, D)`` entities."""
    gold_t = torch.as_tensor(np.asarray(gold, dtype=np.int64), device=entity_emb.device)
    gold_scores = (query_emb * entity_emb[gold_t]).sum(dim=-1)  # (Q,)
    return filtered_ranks(lambda qs, es: query_emb[qs] @ entity_emb[es].T, gold_scores, list(gold), filtered,
                          entity_emb.shape[0], query_chunk, entity_chunk, atol)


# --------------------------------------------------------------------------- queries (pure)


def completion_queries(test: np.ndarray, all_true: np.ndarray, text: KGText) -> list[dict]:
    """Tail-prediction and (inverse-relation) head-prediction queries of each test triple.

    ``{"direction", "text", "gold", "filtered", "triple"}``; ``filtered`` are the other
    known answers of the same query over every split.
    """
    hr_t: dict[tuple[int, int], set[int]] = {}
    rt_h: dict[tuple[int, int], set[int]] = {}
    for h, r, t in np.asarray(all_true, dtype=np.int64).reshape(-1, 3).tolist():
        hr_t.setdefault((h, r), set()).add(t)
        rt_h.setdefault((r, t), set()).add(h)
    ent, rel, n_rel = text.entities, text.relations, text.num_relations
    out = []
    for h, r, t in np.asarray(test, dtype=np.int64).reshape(-1, 3).tolist():
        out.append({"direction": "tail", "text": query_text(ent[h], rel[r]), "gold": t,
                    "filtered": sorted(hr_t[(h, r)] - {t}), "triple": [h, r, t]})
        out.append({"direction": "head", "text": query_text(ent[t], rel[r + n_rel]), "gold": h,
                    "filtered": sorted(rt_h[(r, t)] - {h}), "triple": [h, r, t]})
    return out


# --------------------------------------------------------------------------- embedding


class TextEmbedder:
    """Last-token, last-layer embeddings of texts, L2-normalised; a Ray Data callable class too.

    ``embed(texts) -> (N, H)`` float32 numpy; ``__call__(batch)`` maps a Ray Data batch
    ``{"idx", "text"}`` to the same plus ``"embedding"``.
    """

    def __init__(self, model_path: str, batch_size: int = 64, threads: int = 0, trust_remote_code: bool = False,
                 max_len: int = 64):
        from kale_ray.models import load_causal_lm, load_tokenizer
        from kale_ray.train.heads import AnswerLogits

        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = AnswerLogits(load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_len = max_len  # cut on the right, as the training collator cuts its views

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from kale_ray.methods.kalm.losses import last_token_pool

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i: i + self.batch_size]), add_special_tokens=False, padding=True,
                                 padding_side="right", truncation=True, max_length=self.max_len,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output="hidden")
            pooled = last_token_pool(hidden, enc["attention_mask"]).float()  # (b, H)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["embedding"] = self.embed([str(t) for t in batch["text"]])
        return batch


def embed_texts(texts: Sequence[str], model_path: str, batch_size: int = 64, mode: str = "auto",
                threads: int = 0, use_gpu: bool = False, trust_remote_code: bool = False,
                max_len: int = 64) -> np.ndarray:
    """``(N, H)`` L2-normalised float32 embeddings, in the order of ``texts``.

    ``mode="ray"`` (or ``"auto"`` with Ray initialised): one Ray Data ``map_batches`` actor
    loads the model once and embeds the texts in batches; ``"local"``: the same in this process.
    """
    from kale_ray.runtime.generate import map_in_order, use_ray

    if not use_ray(mode):
        return TextEmbedder(model_path, batch_size, threads, trust_remote_code, max_len).embed(texts)
    got = map_in_order([{"text": t} for t in texts], TextEmbedder, batch_size, what="embedding",
                       fn_constructor_kwargs={"model_path": model_path, "batch_size": batch_size, "threads": threads,
                                              "trust_remote_code": trust_remote_code, "max_len": max_len},
                       num_gpus=1 if use_gpu else 0)
    return np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in got])


def kg_completion(embed: Callable[[Sequence[str]], np.ndarray], test: np.ndarray, all_true: np.ndarray,
                  text: KGText, query_chunk: int = 256, entity_chunk: int = 4096) -> tuple[dict, list[dict]]:
    """Filtered KG completion metrics (``tail``, ``head``, ``both``) and one record per query."""
    t0 = time.perf_counter()
    queries = completion_queries(test, all_true, text)
    # One pass over entities and queries (one model load / actor start), each entity once.
    emb = torch.from_numpy(embed([key_text(e) for e in text.entities] + [q["text"] for q in queries]))
    entity_emb, query_emb = emb[: len(text.entities)], emb[len(text.entities):]  # (E, D), (2T, D)
    t_embed = time.perf_counter() - t0
    ranks = embedding_ranks(query_emb, entity_emb, [q["gold"] for q in queries], [q["filtered"] for q in queries],
                            query_chunk, entity_chunk)
    direction = np.array([q["direction"] for q in queries])
    metrics = {d: ranking_metrics(ranks[direction == d]) for d in ("tail", "head")}
    metrics["both"] = ranking_metrics(ranks)
    metrics["num_entities"] = len(text.entities)
    metrics["num_embedded_texts"] = int(emb.shape[0])
    metrics["seconds"] = {"embed": t_embed, "rank": time.perf_counter() - t0 - t_embed}
    records = [{"direction": q["direction"], "triple": q["triple"], "rank": float(r)} for q, r in zip(queries, ranks)]
    return metrics, records


# --------------------------------------------------------------------------- KGQA


def kgqa_summary(scored: list[dict]) -> dict[str, Any]:
    """Accuracy per task (and over all items), with the chance level and the parse rate."""
    out: dict[str, Any] = {}
    for task in KGQA_TASKS:
        rows = [r for r in scored if r["task"] == task]
        if not rows:
            continue
        out[task] = {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
                     "parsed": sum(r["parsed"] for r in rows) / len(rows),
                     "chance": sum(r["chance"] for r in rows) / len(rows),
                     "skipped": sum(bool(r.get("skipped")) for r in rows)}
    if scored:
        out["all"] = {"accuracy": sum(r["correct"] for r in scored) / len(scored), "n": len(scored)}
    return out


def run_kgqa(model_path: str, items: list[dict], gen, model_cfg: ModelConfig) -> list[dict]:
    """Generate an answer for every KGQA item (:func:`kale_ray.runtime.generate.generate`; Ray must be
    up) and score it. An item not generated is wrong, with its reason under ``skipped``
    (``prompt_too_long: ...`` or ``generation_failed: ...``)."""
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import load_tokenizer
    from kale_ray.runtime.generate import PROMPT_TOO_LONG, generate

    tok = load_tokenizer(model_path, model_cfg.trust_remote_code)
    rows = [{"key": str(it["item_id"]), "prompt": render_chat(msgs, tok), "messages": msgs}
            for it in items for msgs in [kgqa_messages(it)]]
    got = generate(rows, model_path, gen, model_cfg, tokenizer=tok)
    scored = []
    for it in items:
        res = got[str(it["item_id"])]
        err = res["error"]
        if err:
            skipped = err if err.startswith(PROMPT_TOO_LONG) else f"generation_failed: {err[:200]}"
            scored.append(dict(it, generation="", prediction=None, correct=False, parsed=False, skipped=skipped))
            continue
        ok, pred = is_correct(res["text"], it["all_answers"], it["choices"])
        scored.append(dict(it, generation=res["text"], prediction=pred, correct=bool(ok), parsed=pred is not None,
                           skipped=""))
    return sorted(scored, key=lambda r: r["item_id"])


# --------------------------------------------------------------------------- one model


def evaluate_kalm(model_path: str, split: KGSplit, text: KGText, test: np.ndarray, cfg: KaLMEvalConfig,
                  model_cfg: ModelConfig, out_dir: str | Path, label: str, use_gpu: bool = False,
                  max_embed_len: int = 64, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """KG completion (+ KGQA when ``cfg.kgqa``) of one model; writes ``out_dir/{metrics.json, ranks.jsonl, kgqa.jsonl}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return embed_texts(texts, model_path, cfg.embed_batch_size, cfg.embed_with, cfg.embed_threads, use_gpu,
                           model_cfg.trust_remote_code, max_embed_len)

    kgc, records = kg_completion(embed, test, split.all_true, text, cfg.query_chunk, cfg.entity_chunk)
    write_jsonl(out / "ranks.jsonl", records)
    t_kgc = time.perf_counter() - t0
    b = kgc["both"]
    progress(f"[kalm:{label}] KG completion on {b['n']} queries: MRR {b['mrr']:.4f}, MR {b['mr']:.1f}, "
             f"Hits@1/3/10 {b['hits@1']:.3f}/{b['hits@3']:.3f}/{b['hits@10']:.3f} ({t_kgc:.0f}s)")
    metrics: dict[str, Any] = {"label": label, "model": model_path, "kg_completion": kgc,
                               "seconds": {"kg_completion": t_kgc}}
    if cfg.kgqa:
        t1 = time.perf_counter()
        rejects = Rejects()
        items = kgqa_items(test, split.all_true, text, cfg.kgqa_per_task, cfg.num_choices,
                           np.random.default_rng(cfg.seed), rejects)
        scored = run_kgqa(model_path, items, cfg.generation, model_cfg)
        write_jsonl(out / "kgqa.jsonl", scored)
        metrics["kgqa"] = kgqa_summary(scored)
        metrics["kgqa_rejects"] = rejects.counts()
        metrics["seconds"]["kgqa"] = time.perf_counter() - t1
        progress(f"[kalm:{label}] KGQA: " + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in metrics["kgqa"].items())
                 + f" ({metrics['seconds']['kgqa']:.0f}s)")
    write_json(out / "metrics.json", metrics)
    return metrics
