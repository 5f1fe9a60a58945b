"""Train the reranker on Ray Train (``TorchTrainer``, DDP over gloo on CPU / nccl on GPU).

The causal-LM trainer (:mod:`kale_ray.train`) holds an ``AnswerLogits`` LM; the reranker is a
bidirectional encoder scored by max-sim, so it gets this small dedicated loop. Each row is
one question: ``{query, passages: [K texts], targets: [K BM25 scores vs the rationale]}``.
Every worker runs the same number of steps (its shard is cycled), so DDP's all-reduce never waits
on a finished worker. Rank 0 writes ``out_dir/model`` (merged, safetensors) and ``history.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

from kale_ray.methods.kard.config import RerankerConfig


def collate(rows: list[dict], tokenizer, cfg: RerankerConfig):
    """Rows -> query batch (B, Lq), passage batch (B*K, Lp), targets (B, K), mask (B, K)."""
    import torch

    k = max(len(r["passages"]) for r in rows)
    q = tokenizer([r["query"] for r in rows], padding=True, truncation=True, max_length=cfg.max_query_len,
                  return_tensors="pt")
    texts, targets, mask = [], torch.zeros(len(rows), k), torch.zeros(len(rows), k, dtype=torch.long)
    for i, r in enumerate(rows):
        for j in range(k):
            if j < len(r["passages"]):
                texts.append(r["passages"][j])
                targets[i, j] = float(r["targets"][j])
                mask[i, j] = 1
            else:
                texts.append("")
    p = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_passage_len, return_tensors="pt")
    return q, p, targets, mask, k


def _rows(batch) -> list[dict]:
    n = len(batch["query"])
    return [{"query": str(batch["query"][i]), "passages": json.loads(batch["passages"][i]),
             "targets": json.loads(batch["targets"][i])} for i in range(n)]


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as tdist
    from transformers import AutoTokenizer

    from kale_ray.config import _build
    from kale_ray.methods.kard.losses import maxsim_paired, rerank_loss
    from kale_ray.methods.kard.reranker import build_reranker, save_reranker

    cfg: RerankerConfig = _build(RerankerConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    tok = AutoTokenizer.from_pretrained(config["encoder_path"])
    model = build_reranker(config["encoder_path"], cfg.num_layers, cfg.dim, cfg.lora, cfg.seed)
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    steps = int(config["steps"])
    shard = ray.train.get_dataset_shard("train")

    def batches():
        while True:
            got = False
            for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                got = True
                yield _rows(b)
            if not got:
                raise RuntimeError(f"reranker worker {rank}: empty data shard")

    it = batches()
    history = []
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        rows = next(it)
        q, p, targets, mask, k = collate(rows, tok, cfg)
        q_emb = model(q["input_ids"], q["attention_mask"])  # (B, Lq, D)
        p_emb = model(p["input_ids"], p["attention_mask"])  # (B*K, Lp, D)
        b = len(rows)
        p_emb = p_emb.view(b, k, p_emb.shape[1], p_emb.shape[2])
        p_mask = p["attention_mask"].view(b, k, -1)
        scores = maxsim_paired(q_emb, q["attention_mask"], p_emb, p_mask)  # (B, K)
        loss = rerank_loss(cfg.loss, scores, targets, mask, cfg.t1, cfg.t2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            top1 = (scores.masked_fill(mask == 0, -1e9).argmax(-1) == targets.masked_fill(mask == 0, -1e9).argmax(-1))
            vals = torch.tensor([float(loss), float(top1.float().sum()), float(b)], dtype=torch.float64)
            if world > 1:
                tdist.all_reduce(vals)
        history.append({"step": step, "loss": float(vals[0]) / world, "train_top1_agreement": float(vals[1] / vals[2]),
                        "questions": int(vals[2]), "seconds": round(time.perf_counter() - t0, 3)})
        if rank == 0:
            print("[kard.reranker] " + json.dumps(history[-1]), flush=True)
    out = Path(config["out_dir"])
    if rank == 0:
        inner = model.module if hasattr(model, "module") else model
        save_reranker(inner, tok, out / "model", {"encoder": config["encoder_path"], "config": config["cfg"]})
        with (out / "history.jsonl").open("w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
    if world > 1:
        tdist.barrier()
    ray.train.report({"loss": history[-1]["loss"] if history else float("nan"), "steps": steps})


def reranker_steps(cfg: RerankerConfig, n_rows: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, cfg.epochs * math.ceil((n_rows // cfg.num_workers) / cfg.batch_size))


def train_reranker(cfg: RerankerConfig, rows_file: str | Path, out_dir: str | Path, use_gpu: bool = False) -> dict:
    """Train on ``rows_file`` (JSONL); returns the summary written to ``out_dir/reranker_summary.json``."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kale_ray.methods.kard.reranker import resolve_encoder

    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ray.data.read_json(str(Path(rows_file).resolve()))
    n_rows = ds.count()
    if n_rows < cfg.num_workers:
        raise ValueError(f"{rows_file}: {n_rows} reranker rows, fewer than reranker.num_workers={cfg.num_workers}")
    steps = reranker_steps(cfg, n_rows)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "encoder_path": resolve_encoder(cfg.model),
                           "out_dir": str(out_dir), "steps": steps},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(out_dir / "ray"), name="reranker"),
        datasets={"train": ds},
    )
    trainer.fit()
    history = [json.loads(x) for x in (out_dir / "history.jsonl").read_text().splitlines() if x]
    summary = {"rows": n_rows, "steps": steps, "workers": cfg.num_workers, "loss": cfg.loss,
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "seconds_per_step": round(sum(h["seconds"] for h in history) / max(1, len(history)), 3),
               "wall_seconds": round(time.time() - t0, 2)}
    (out_dir / "reranker_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
