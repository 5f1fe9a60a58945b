"""The per-worker training loop (runs inside Ray Train workers; reads only its config).

One optimizer step, on every worker:

1. pull ``grad_accum`` non-empty micro-batches from this worker's data shard (the collator
   rejects rows with a reason; a batch whose rows were all rejected is skipped);
2. agree with the other workers on how many micro-batches this step has (the minimum;
   0 ends the epoch for everybody) and all-reduce the number of answer tokens of the step:
   ``global_count``;
3. for each micro-batch: ``loss = compute(...)`` is this micro-batch's share of the step's
   token mean (divided by ``global_count``), ``engine.backward(loss * world_size)``;
   the last micro-batch is the accumulation boundary and ``engine.step()`` updates;
4. all-reduce the loss parts: the logged loss is the global token mean of the step,
   the same number whatever the number of workers or micro-batches.

Checkpoints (DeepSpeed engine state + ``state.json`` with step/epoch/history) are written by
every worker into a temp dir and handed to ``ray.train.report``, which merges them into one
checkpoint folder; ``ray.train.get_checkpoint()`` brings the latest one back on a restart
or rerun.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from kale_ray.config import TrainConfig, _build
from kale_ray.runtime.tracking import attach, step_metrics
from kale_ray.train.heads import AnswerLogits
from kale_ray.train.registry import StepContext, get_loss

STATE_FILE = "state.json"
ENGINE_DIR = "engine"
# Changing one of these between a checkpoint and a resume cannot work; we stop and say so.
RESUME_MUST_MATCH = ("loss", "model", "lora", "zero_stage")


# --------------------------------------------------------------------------- pure helpers


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (DeepSpeed's fused Adam needs CUDA, its CPU Adam needs offload).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(cfg.use_gpu)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def total_steps(cfg: TrainConfig, n_rows: int, world_size: int) -> int:
    """``max_steps`` if set, else epochs x ceil(rows per worker / rows per step)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_worker = n_rows // world_size  # Ray's streaming_split(equal=True)
    return max(1, cfg.epochs * math.ceil(per_worker / (cfg.micro_batch_size * cfg.grad_accum)))


def config_mismatch(saved: dict, current: dict, keys: tuple[str, ...] = RESUME_MUST_MATCH) -> list[str]:
    return [k for k in keys if k in saved and saved[k] != current.get(k)]


def check_finite(totals: dict[str, float], step: int, epoch: int) -> None:
    """Stop on a NaN/inf loss part, naming the step and every part (all ranks see the same totals)."""
    if not all(math.isfinite(v) for v in totals.values()):
        parts = ", ".join(f"{k}={v}" for k, v in totals.items())
        raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}): {parts}")


# --------------------------------------------------------------------------- collectives


def _world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], op: str = "sum", device: torch.device | str = "cpu") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN}[op])
    return t.tolist()


def _all_gather_object(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    tdist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- the loop


class _Shard:
    """This worker's micro-batches, one epoch at a time, counting the raw batches consumed."""

    def __init__(self, shard, collator, batch_size: int):
        self.shard, self.collator, self.batch_size = shard, collator, batch_size
        self.it: Iterator | None = None
        self.consumed = 0

    def start_epoch(self, skip: int = 0) -> None:
        self.it = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False))
        self.consumed = 0
        for _ in range(skip):  # resume mid-epoch: the rows of finished steps, not collated again
            if next(self.it, None) is None:
                break
            self.consumed += 1

    def next_micro_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        while len(out) < n:
            raw = next(self.it, None)
            if raw is None:
                break
            self.consumed += 1
            batch = self.collator(raw)
            if batch is not None:
                out.append(batch)
        return out


def torch_extensions_dir() -> str:
    """Build folder for DeepSpeed's JIT ops, inside the active environment (``sys.prefix``)."""
    import sys

    return os.path.join(sys.prefix, "torch_extensions")


def clear_stale_build_locks(root: str, max_age_s: float = 600.0) -> list[str]:
    """Remove torch JIT build locks older than ``max_age_s``.

    torch's ``FileBaton`` lock is created when a build starts and removed when it ends; a
    process killed mid-build (a failed worker, a kill test) leaves it behind and every later
    ``deepspeed.initialize`` then waits on it forever. A build takes about a minute here.
    """
    removed = []
    for lock in Path(root).glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:
            pass
    if removed:
        print(f"[kale_ray.train] removed stale JIT build locks: {removed}", flush=True)
    return removed


def prebuild_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU comm op once (``make install`` calls this), outside any run that may be killed."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    clear_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _setup_env(cfg: TrainConfig, workers_on_node: int) -> None:
    from kale_ray.models import cache_root

    # DeepSpeed JIT-builds its CPU comm op (deepspeed_shm_comm_op, ~1 min) on first use; keep it
    # per environment (two venvs sharing one build folder rebuild each other's op forever).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    clear_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    # Ray sets OMP_NUM_THREADS to the worker's CPU count (1 by default); use our share of the node.
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // workers_on_node)
    torch.set_num_threads(threads)


def _build_engine(cfg: TrainConfig, model_path: str, steps: int, world_size: int):
    import deepspeed

    from kale_ray.models import load_causal_lm

    dtype = "bfloat16" if cfg.use_gpu else "float32"
    torch.manual_seed(cfg.seed)
    lm = load_causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    lm.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(
            lm,
            LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
            ),
        )
    module = AnswerLogits(lm)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.lr_schedule)
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine, scheduler, dtype


def _apply_schedule(scheduler, cfg: TrainConfig, steps: int) -> None:
    """After a resume: the lr of the next step from *this* run's lr/schedule/total steps.

    The checkpoint restores the optimizer's lr and the scheduler's last lr as computed with
    the old total (a run extended from 4 to 6 steps would otherwise train step 5 at lr 0).
    """
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    factor = lr_factor(scheduler.last_epoch, cfg.warmup_steps, steps, cfg.lr_schedule)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = cfg.lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _new_state(world: int) -> dict[str, Any]:
    return {"step": 0, "epoch": 0, "batches_consumed": [0] * world, "history": [], "rejects": {},
            "rejected_rows": [], "rejected_keys": [], "stats": {}, "attempts": []}


def restore_checkpoint(fresh: dict, cfg_dict: dict, load: Callable[[Path], None],
                       must_match: tuple[str, ...] = RESUME_MUST_MATCH) -> tuple[dict, bool]:
    """``(state, resumed)``: ``fresh`` updated with the ``state.json`` of the latest checkpoint
    (``ray.train.get_checkpoint()``), after ``load(folder)`` restored the rest (weights, optimizer)
    from it; ``(fresh, False)`` when there is none. Stops when a ``must_match`` key changed."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return fresh, False
    with checkpoint.as_directory() as d:
        saved = json.loads((Path(d) / STATE_FILE).read_text())
        bad = config_mismatch(saved.get("config", {}), cfg_dict, must_match)
        if bad:
            raise ValueError(f"cannot resume from {d}: {', '.join(bad)} changed since that checkpoint; "
                             "use a new out_dir or run name")
        load(Path(d))
    fresh.update(saved)
    return fresh, True


def report_checkpoint(step: int, metrics: dict, write: Callable[[Path], None], state: dict | None) -> None:
    """Collective: every worker writes its part of the checkpoint (``write(folder)``), the one holding
    ``state`` (rank 0) also ``state.json``; ``ray.train.report`` merges the workers' folders into
    ``checkpoint_step{step:06d}`` of the run (``ray.train.get_checkpoint()`` on a restart or rerun)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="kale_ckpt_") as tmp:
        write(Path(tmp))
        if state is not None:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{step:06d}")


def _restore(engine, scheduler, cfg: TrainConfig, cfg_dict: dict, steps: int, world: int) -> tuple[dict, bool]:
    """The state of the last checkpoint (and the engine loaded from it), or a fresh state."""

    def load(d: Path) -> None:
        load_path, _ = engine.load_checkpoint(str(d / ENGINE_DIR), load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine checkpoint in {d}")

    state, resumed = restore_checkpoint(_new_state(world), cfg_dict, load)
    if resumed:
        _apply_schedule(scheduler, cfg, steps)
    return state, resumed


def _train_step(engine, spec, cfg: TrainConfig, micro: list[dict], rank: int, world: int) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches; returns the global (all-reduced) values."""
    device = engine.device
    local_count = sum(spec.count_fn(b) for b in micro)
    local_samples = sum(int(b["input_ids"].shape[0]) for b in micro)
    global_count, global_samples = _all_reduce([local_count, local_samples], "sum", device)
    dist_ctx = StepContext(world_size=world, rank=rank, global_count=global_count)
    sums: Counter[str] = Counter()
    for i, batch in enumerate(micro):
        batch = {k: v.to(device) for k, v in batch.items()}
        engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
        loss, metrics = spec.compute(engine, batch, cfg, dist_ctx)
        # `loss` is this shard's share of the *global* token mean (divided by the step's
        # all-reduced token count), so its sum over workers and micro-batches is the loss.
        # DeepSpeed averages gradients over the data-parallel ranks (sum / world_size), hence
        # the factor world_size; scale_wrt_gas=False because the shares already add up over
        # the micro-batches (DeepSpeed would divide by grad_accum once more).
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()
        sums["loss"] += float(loss.detach())
        for k, v in metrics.items():
            sums[k] += float(v.detach()) if torch.is_tensor(v) else float(v)
    keys = sorted(sums)
    totals = dict(zip(keys, _all_reduce([sums[k] for k in keys], "sum", device)))
    grad_norm = engine.get_global_grad_norm()  # before clipping; the same on every rank
    if grad_norm is not None:
        totals["grad_norm"] = float(grad_norm)
    totals.update(tokens=int(global_count), samples=int(global_samples))
    return totals


class _Progress:
    """Rank-local counters that go into ``state.json`` (summed over ranks when saved)."""

    def __init__(self, collator, state: dict, rank: int):
        self.collator = collator
        collator.rejected_keys.update(tuple(k) for k in state["rejected_keys"])
        # Earlier attempts' totals are carried by rank 0 only, so that the sum over ranks is right.
        first = rank == 0
        self.prior_rejects = Counter(state["rejects"] if first else {})
        self.prior_rows = list(state["rejected_rows"]) if first else []
        self.prior_stats = Counter(state["stats"] if first else {})

    def gathered(self) -> dict[str, Any]:
        """Collective: the run's reject counts/rows/keys and collator stats over all ranks."""
        c = self.collator
        parts = _all_gather_object((c.rejects.counts(), c.rejects.rows[:1000], dict(c.stats), sorted(c.rejected_keys)))
        counts, rows, stats = Counter(self.prior_rejects), list(self.prior_rows), Counter(self.prior_stats)
        keys: set[tuple[str, str]] = set()
        for part_counts, part_rows, part_stats, part_keys in parts:
            counts.update(part_counts)
            rows.extend(part_rows)
            stats.update(part_stats)
            keys.update(tuple(k) for k in part_keys)
        return {"rejects": dict(counts), "rejected_rows": rows[:1000],
                "rejected_keys": sorted(keys)[:100_000], "stats": dict(stats)}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": TrainConfig as dict, "cfg_class": its class (the loss's TrainConfig
    subclass), "model_path", "out_dir", "n_rows"}``."""
    import ray.train

    from kale_ray.models import load_tokenizer
    from kale_ray.train.export import export_model

    t_start = time.perf_counter()
    cfg: TrainConfig = _build(config.get("cfg_class", TrainConfig), config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_env(cfg, ctx.get_local_world_size())
    spec = get_loss(cfg.loss)
    steps = total_steps(cfg, int(config["n_rows"]), world)
    tokenizer = load_tokenizer(config["model_path"], cfg.model.trust_remote_code)
    collator = spec.collator_factory(tokenizer, cfg)
    engine, scheduler, dtype = _build_engine(cfg, config["model_path"], steps, world)

    state, resumed = _restore(engine, scheduler, cfg, config["cfg"], steps, world)
    progress = _Progress(collator, state, rank)
    shard = _Shard(ray.train.get_dataset_shard("train"), collator, cfg.micro_batch_size)
    # Resume mid-epoch: skip the raw batches this rank had consumed (same world size only).
    skip = state["batches_consumed"][rank] if len(state["batches_consumed"]) == world else 0
    step, epoch = int(state["step"]), int(state["epoch"])
    history: list[dict] = list(state["history"])
    state["attempts"] = list(state["attempts"]) + [
        {"start_step": step, "world_size": world, "setup_seconds": round(time.perf_counter() - t_start, 2)}
    ]
    # Rank 0 logs every step into the run the driver opened (cfg.tracking); others log nothing.
    tracker = attach(config.get("tracking") if rank == 0 else None, purge_step=step + 1)
    if rank == 0:
        print(f"[kale_ray.train] loss={cfg.loss} steps={steps} world={world} start_step={step} "
              f"setup_s={state['attempts'][-1]['setup_seconds']}", flush=True)

    def save(metrics: dict) -> None:
        """Collective: engine checkpoint + state.json, merged by ray.train.report."""
        consumed = _all_gather_object(shard.consumed)
        counters = progress.gathered()
        if rank == 0:
            state.update(step=step, epoch=epoch, batches_consumed=consumed, history=history,
                         config=config["cfg"], total_steps=steps, **counters)
        # exclude_frozen_parameters: with LoRA only the adapter (and its optimizer state)
        # is saved; the frozen base is reloaded from the model folder.
        report_checkpoint(step, metrics, lambda d: engine.save_checkpoint(
            str(d / ENGINE_DIR), tag=f"step{step}", exclude_frozen_parameters=cfg.lora.enabled),
            state if rank == 0 else None)

    last_saved = step if resumed else -1
    max_epochs = cfg.epochs if cfg.max_steps <= 0 else 1 << 30  # max_steps cycles over the data
    engine.train()
    while step < steps and epoch < max_epochs:
        shard.start_epoch(skip)
        skip = 0
        while step < steps:
            t0 = time.perf_counter()
            micro = shard.next_micro_batches(cfg.grad_accum)
            # All workers take the same number of micro-batches (DeepSpeed steps together);
            # with equal shards this only differs around batches whose rows were all rejected.
            n_micro = int(_all_reduce([len(micro)], "min", engine.device)[0])
            # Rows this worker had in hand beyond the agreed count are not trained on: counted.
            collator.stats["rows_dropped_unaligned"] += sum(int(b["input_ids"].shape[0]) for b in micro[n_micro:])
            if n_micro == 0:
                break
            lr = scheduler.get_last_lr()[0]
            totals = _train_step(engine, spec, cfg, micro[:n_micro], rank, world)
            step += 1
            check_finite(totals, step, epoch)
            history.append({"step": step, "epoch": epoch, **totals, "lr": lr,
                            "seconds": round(time.perf_counter() - t0, 4)})
            if rank == 0:
                print("[kale_ray.train] " + json.dumps(history[-1]), flush=True)
                tracker.log_metrics(step_metrics(history[-1]), step=step)
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < steps:
                save({"step": step, "loss": totals["loss"]})
                last_saved = step
        else:
            break  # reached `steps` inside the epoch: the epoch is not finished
        epoch += 1
    tracker.close()
    if step != last_saved:
        save({"step": step, "loss": history[-1]["loss"] if history else float("nan"), "final": True})

    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    export_model(engine.module.lm, tokenizer, out_dir, config["model_path"], rank, cfg.zero_stage,
                 lora=cfg.lora.enabled, save_merged=cfg.save_merged, dtype=dtype)
    if world > 1:
        tdist.barrier()
