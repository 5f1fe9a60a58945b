"""Train the reranker on Ray Train (``TorchTrainer``, DDP over gloo on CPU / nccl on GPU).

The causal-LM trainer (:mod:`kale_ray.train`) holds an ``AnswerLogits`` LM under DeepSpeed; the
reranker is a bidirectional encoder scored by max-sim, so it has its own step, but it follows the
main loop's conventions through that loop's own helpers (:mod:`kale_ray.train.loop`):

* **global sample mean**: each worker's loss is its share of the step's mean,
  ``sum of its per-question losses / global_count`` (:func:`~kale_ray.methods.kard.losses.rerank_loss`
  with the questions of the step all-reduced over the workers), and backward runs on
  ``loss * world_size`` since DDP averages gradients; the logged loss is the all-reduced sum of
  the shares: the same number whatever the number of workers;
* **checkpoints** through ``ray.train.report`` (``report_checkpoint``) every
  ``reranker.checkpoint_every`` steps and at the end, the newest ``keep_checkpoints`` kept:
  the trainable weights (safetensors), the optimizer, each rank's torch RNG state and
  ``state.json`` (step, epoch, raw batches consumed per rank, history, config);
* **resume**: a rerun into the same ``out_dir`` (Ray Train restores ``out_dir/ray/<run_name>``)
  or a worker group restarted after a failure (``max_failures``) starts from the latest checkpoint
  (``restore_checkpoint``): weights, optimizer, RNG, and the rows of the finished steps skipped
  (same row order every run: ``preserve_order``), so the curve goes on as if never stopped;
* **epochs** as the main loop: each step takes one batch per worker, all workers the same number
  (the minimum; 0 ends the epoch), ``max_steps`` cycles over the data.

Each row is one question: ``{query, passages: [K texts], targets: [K BM25 scores vs the rationale]}``.
Rank 0 writes ``out_dir/model`` (merged, safetensors); the driver ``history.jsonl`` and
``reranker_summary.json`` from the last checkpoint's state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

from kale_ray.methods.kard.config import RerankerConfig

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# A checkpoint made with other values of these cannot be loaded into this model: stop and say so.
RESUME_MUST_MATCH = ("loss", "model", "lora", "num_layers", "dim")
# RerankerConfig keys that decide how the run is kept safe or how its model is used, not what it
# learns: a rerun that changes only these resumes the same run (for the recipe's stage settings).
NOT_OUTPUT_SETTINGS = ("encode_batch_size", "checkpoint_every", "keep_checkpoints", "max_failures")


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


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


def _new_state(world: int) -> dict:
    return {"step": 0, "epoch": 0, "batches_consumed": [0] * world, "history": [], "attempts": []}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": RerankerConfig as dict, "encoder_path", "out_dir", "steps"}``."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as tdist
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from kale_ray.config import _build
    from kale_ray.methods.kard.losses import maxsim_paired, rerank_count, rerank_loss
    from kale_ray.methods.kard.reranker import build_reranker, save_reranker
    from kale_ray.train.loop import (_all_gather_object, _all_reduce, _Shard, check_finite, report_checkpoint,
                                     restore_checkpoint)

    t_start = time.perf_counter()
    cfg: RerankerConfig = _build(RerankerConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    tok = AutoTokenizer.from_pretrained(config["encoder_path"])
    model = build_reranker(config["encoder_path"], cfg.num_layers, cfg.dim, cfg.lora, cfg.seed)  # seeds torch
    model = ray.train.torch.prepare_model(model)
    inner = model.module if hasattr(model, "module") else model
    trainable = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr)
    steps = int(config["steps"])

    def load(d: Path) -> None:
        weights = load_file(str(d / TRAINABLE_FILE))
        if set(weights) != set(trainable):
            raise ValueError(f"cannot resume from {d}: its trainable weights are not this model's "
                             f"({len(weights)} saved, {len(trainable)} here)")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(weights[name].to(p.device))
        opt.load_state_dict(torch.load(d / OPTIMIZER_FILE, map_location=device, weights_only=True))
        for group in opt.param_groups:  # this run's lr (the schedule is constant)
            group["lr"] = cfg.lr
        if (d / _rng_file(rank)).exists():
            torch.set_rng_state(torch.load(d / _rng_file(rank), weights_only=True))

    state, resumed = restore_checkpoint(_new_state(world), config["cfg"], load, RESUME_MUST_MATCH)
    shard = _Shard(ray.train.get_dataset_shard("train"), _rows, cfg.batch_size)
    # Resume mid-epoch: skip the raw batches this rank had consumed (same world size only).
    skip = state["batches_consumed"][rank] if len(state["batches_consumed"]) == world else 0
    step, epoch = int(state["step"]), int(state["epoch"])
    history: list[dict] = list(state["history"])
    state["attempts"] = list(state["attempts"]) + [
        {"start_step": step, "world_size": world, "setup_seconds": round(time.perf_counter() - t_start, 2)}
    ]
    if rank == 0:
        print(f"[kard.reranker] loss={cfg.loss} steps={steps} world={world} start_step={step}", flush=True)

    def save(metrics: dict) -> None:
        """Collective: trainable weights + optimizer (rank 0), RNG (every rank), state.json (rank 0)."""
        consumed = _all_gather_object(shard.consumed)
        if rank == 0:
            state.update(step=step, epoch=epoch, batches_consumed=consumed, history=history, config=config["cfg"],
                         total_steps=steps)

        def write(d: Path) -> None:
            torch.save(torch.get_rng_state(), d / _rng_file(rank))
            if rank == 0:
                save_file({n: p.detach().contiguous().cpu() for n, p in trainable.items()}, str(d / TRAINABLE_FILE))
                torch.save(opt.state_dict(), d / OPTIMIZER_FILE)

        report_checkpoint(step, metrics, write, state if rank == 0 else None)

    def train_step(rows: list[dict]) -> dict:
        q, p, targets, mask, k = collate(rows, tok, cfg)
        q, p = {n: v.to(device) for n, v in q.items()}, {n: v.to(device) for n, v in p.items()}
        targets, mask = targets.to(device), mask.to(device)
        # the questions of the step over all workers: the loss's normaliser (global sample mean)
        global_count, global_rows = _all_reduce([rerank_count(mask), len(rows)], "sum", device)
        q_emb = model(q["input_ids"], q["attention_mask"])  # (B, Lq, D)
        p_emb = model(p["input_ids"], p["attention_mask"])  # (B*K, Lp, D)
        b = len(rows)
        p_emb = p_emb.view(b, k, p_emb.shape[1], p_emb.shape[2])  # (B, K, Lp, D)
        p_mask = p["attention_mask"].view(b, k, -1)  # (B, K, Lp)
        scores = maxsim_paired(q_emb, q["attention_mask"], p_emb, p_mask)  # (B, K)
        # this worker's share of the step's mean; DDP averages gradients (sum / world): hence * world
        loss = rerank_loss(cfg.loss, scores, targets, mask, cfg.t1, cfg.t2, global_count=global_count)
        opt.zero_grad()
        (loss * world).backward()
        opt.step()
        with torch.no_grad():
            top1 = (scores.masked_fill(mask == 0, -1e9).argmax(-1) == targets.masked_fill(mask == 0, -1e9).argmax(-1))
        loss_sum, top1_sum = _all_reduce([float(loss.detach()), float(top1.float().sum())], "sum", device)
        return {"loss": loss_sum, "train_top1_agreement": top1_sum / max(1.0, global_rows),
                "questions": int(global_rows), "counted": int(global_count)}

    last_saved = step if resumed else -1
    max_epochs = cfg.epochs if cfg.max_steps <= 0 else 1 << 30  # max_steps cycles over the data
    model.train()
    while step < steps and epoch < max_epochs:
        skipped, taken = skip, 0
        shard.start_epoch(skip)
        skip = 0
        while step < steps:
            t0 = time.perf_counter()
            got = shard.next_micro_batches(1)
            if int(_all_reduce([len(got)], "min", device)[0]) == 0:  # every worker takes the same steps
                break
            lr = opt.param_groups[0]["lr"]
            totals = train_step(got[0])
            step += 1
            taken += 1
            check_finite({"loss": totals["loss"]}, step, epoch)
            history.append({"step": step, "epoch": epoch, **totals, "lr": lr,
                            "seconds": round(time.perf_counter() - t0, 4)})
            if rank == 0:
                print("[kard.reranker] " + json.dumps(history[-1]), flush=True)
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < steps:
                save({"step": step, "loss": totals["loss"]})
                last_saved = step
        else:
            break  # reached `steps` inside the epoch: the epoch is not finished
        if taken == 0 and skipped == 0:
            raise RuntimeError(f"reranker worker {rank}: an epoch without a batch (empty data shard)")
        epoch += 1
    if step != last_saved:
        save({"step": step, "loss": history[-1]["loss"] if history else float("nan"), "final": True})
    if rank == 0:
        save_reranker(inner, tok, Path(config["out_dir"]) / "model",
                      {"encoder": config["encoder_path"], "config": config["cfg"]})
    if world > 1:
        tdist.barrier()


def reranker_steps(cfg: RerankerConfig, n_rows: int) -> int:
    """``max_steps`` if set, else epochs x ceil(rows per worker / batch size) (the main loop's ``total_steps``)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, cfg.epochs * math.ceil((n_rows // cfg.num_workers) / cfg.batch_size))


def train_reranker(cfg: RerankerConfig, rows_file: str | Path, out_dir: str | Path, use_gpu: bool = False,
                   run_name: str = "reranker") -> dict:
    """Train on ``rows_file`` (JSONL); returns the summary written to ``out_dir/reranker_summary.json``.

    A rerun with the same ``out_dir`` and ``run_name`` resumes from the run's latest checkpoint
    (a run that had finished: nothing more to train, the model is written again).
    """
    import ray.data

    from kale_ray.methods.kard.reranker import resolve_encoder
    from kale_ray.core.io import write_json, write_jsonl
    from kale_ray.train.trainer import fit_resumable

    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ray.data.read_json(str(Path(rows_file).resolve()))
    n_rows = ds.count()
    if n_rows < cfg.num_workers:
        raise ValueError(f"{rows_file}: {n_rows} reranker rows, fewer than reranker.num_workers={cfg.num_workers}")
    steps = reranker_steps(cfg, n_rows)
    state = fit_resumable(train_loop_per_worker,
                          {"cfg": dataclasses.asdict(cfg), "encoder_path": resolve_encoder(cfg.model),
                           "out_dir": str(out_dir), "steps": steps},
                          ds, out_dir, run_name, cfg.num_workers, use_gpu, cfg.keep_checkpoints, cfg.max_failures)
    history = state["history"]
    write_jsonl(out_dir / "history.jsonl", history)
    summary = {"rows": n_rows, "steps": state["step"], "total_steps": steps, "epochs_completed": state["epoch"],
               "workers": cfg.num_workers, "loss": cfg.loss,
               "questions": sum(h["questions"] for h in history),
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "seconds_per_step": round(sum(h["seconds"] for h in history) / max(1, len(history)), 3),
               "attempts": state["attempts"], "wall_seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "reranker_summary.json", summary)
    return summary
