"""Fine-tune with Ray Train (``TorchTrainer``) + DeepSpeed ZeRO; the driver side.

:func:`run_training` reads the training rows with Ray Data, launches ``cfg.num_workers``
workers running :func:`kale_ray.train.loop.train_loop_per_worker` (gloo on CPU, nccl on
GPU) and writes under ``cfg.out_dir``::

    adapter/             PEFT adapter (safetensors)              [LoRA only]
    merged/              full HF model + tokenizer (safetensors; vLLM serves it)
    history.jsonl        one line per optimizer step: step, loss, ce, kl, lr, tokens, samples, seconds
    rejects.jsonl        rows the collator rejected, with their reason
    train_summary.json   steps, samples, rejects by reason, times, final loss, config
    ray/<run_name>/      Ray Train run folder with the checkpoints

Rerunning with the same ``out_dir`` and run name resumes from the last checkpoint: Ray
Train V2 restores a run from the snapshot in ``storage_path/name`` (``resume_from_checkpoint``
is deprecated in V2) and ``ray.train.get_checkpoint()`` hands it to the workers, which
skip the finished steps and carry the history over. ``FailureConfig(max_failures)``
restarts a failed worker group from the same checkpoint.

On a multi-node cluster ``out_dir`` must be on storage that every node sees (NFS or similar):
rank 0 writes ``adapter/``/``merged/``, the workers write checkpoints under ``out_dir/ray``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kale_ray.config import TrainConfig, to_dict
from kale_ray.core.io import json_default_or_str, write_json, write_jsonl
from kale_ray.runtime.stages import Stage, content_identity, without
from kale_ray.runtime.storage import Storage
from kale_ray.runtime.tracking import numeric, start_run
from kale_ray.models import resolve_model
from kale_ray.train.loop import STATE_FILE, train_loop_per_worker
from kale_ray.train.registry import get_loss


@dataclasses.dataclass
class TrainResult:
    out_dir: str
    adapter_dir: str | None
    merged_dir: str | None
    history: list[dict]
    summary: dict


def training_files(path: str | Path) -> tuple[list[str], list[str]]:
    """``(jsonl files, parquet files)`` of a data folder (or a single file); empty files skipped."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.parquet"))
    else:
        raise FileNotFoundError(f"training data not found: {p}")
    files = [f for f in files if f.stat().st_size > 0]
    jsonl = [str(f.resolve()) for f in files if f.suffix == ".jsonl"]
    parquet = [str(f.resolve()) for f in files if f.suffix == ".parquet"]
    if not jsonl and not parquet:
        raise FileNotFoundError(f"no non-empty *.jsonl or *.parquet files in {p}")
    return jsonl, parquet


def read_training_data(path: str | Path):
    """A Ray Dataset over the JSONL and/or Parquet training files in ``path``."""
    import ray.data

    jsonl, parquet = training_files(path)
    parts = []
    if jsonl:
        parts.append(ray.data.read_json(jsonl))
    if parquet:
        parts.append(ray.data.read_parquet(parquet))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _ensure_ray(cfg: TrainConfig) -> None:
    from kale_ray.runtime.ray import init_ray

    init_ray(train_workers=cfg.num_workers)  # a cluster at RAY_ADDRESS, else local Ray sized for the workers


def _summary(cfg: TrainConfig, state: dict, wall: float, n_rows: int) -> dict[str, Any]:
    history = state["history"]
    train_seconds = sum(h["seconds"] for h in history)
    samples = sum(h["samples"] for h in history)
    return {
        "loss": cfg.loss,
        "steps": state["step"],
        "total_steps": state.get("total_steps"),
        "epochs_completed": state["epoch"],
        "rows_in_data": n_rows,
        # Ray's streaming_split(equal=True) gives every worker the same number of rows: the
        # remainder is left out of each epoch.
        "rows_left_out_by_equal_split_per_epoch": n_rows % cfg.num_workers,
        "samples": samples,
        "tokens": sum(h["tokens"] for h in history),
        "rejected": state["rejects"],
        "rejected_total": sum(state["rejects"].values()),
        "collator_stats": state["stats"],
        "attempts": state["attempts"],
        "wall_seconds": round(wall, 2),
        "train_seconds": round(train_seconds, 2),
        "samples_per_s": round(samples / train_seconds, 3) if train_seconds > 0 else None,
        "seconds_per_step": round(train_seconds / len(history), 4) if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "first_loss": history[0]["loss"] if history else None,
        "config": to_dict(cfg),
    }


# Settings that decide how a run is kept safe or how far it goes, not what it learns: a rerun with a
# larger max_steps continues the same run from its last checkpoint.
_NOT_OUTPUT_SETTINGS = ("out_dir", "on_change", "max_failures", "keep_checkpoints", "checkpoint_every",
                        "max_steps", "save_merged", "model.cache_dir", "tracking")


def stage_outputs(run_name: str | None = None) -> tuple[str, ...]:
    """What an earlier training run left in its out_dir, with or without a settings record."""
    return (f"ray/{run_name or 'train'}", "train_summary.json")


def training_stage(cfg: TrainConfig, run_name: str | None = None) -> Stage:
    """The settings record of a training run: its config (minus safety knobs) and its data's content.
    A local ``data`` path counts resolved (the preflight and the run see the same record)."""
    settings = without(to_dict(cfg), _NOT_OUTPUT_SETTINGS)
    if "://" not in cfg.data:
        settings["data"] = str(Path(cfg.data).expanduser().resolve())
    settings["inputs"] = {"data": content_identity(cfg.data)}
    out = Path(cfg.out_dir).expanduser().resolve()
    return Stage(Storage.from_uri(str(out)), f"train-{run_name or 'train'}", settings)


def stage_settings(cfg: TrainConfig, run_name: str | None = None) -> dict[str, Any]:
    """A training run's settings as a recipe's stage (``Run.stage``): the trainer's own record plus
    ``max_steps`` (a complete stage is not run again, so more steps must count as a change there; the
    trainer itself would resume)."""
    return {**training_stage(cfg, run_name).settings, "max_steps": cfg.max_steps}


def run_training(cfg: TrainConfig, run_name: str | None = None) -> TrainResult:
    """Train ``cfg.loss`` on ``cfg.data``; a rerun with the same out_dir/run name resumes."""
    get_loss(cfg.loss)  # fail fast on an unknown name, listing the known ones
    t0 = time.time()
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(
        cfg,
        data=str(Path(cfg.data).expanduser().resolve()),
        out_dir=str(out_dir),
        model=dataclasses.replace(cfg.model, cache_dir=str(Path(cfg.model.cache_dir).expanduser().resolve())),
    )
    stage = training_stage(cfg, run_name)

    def wipe() -> None:
        import shutil

        shutil.rmtree(out_dir / "ray" / (run_name or "train"), ignore_errors=True)
        for name in ("history.jsonl", "rejects.jsonl", "train_summary.json"):
            (out_dir / name).unlink(missing_ok=True)
        for name in ("adapter", "merged"):
            shutil.rmtree(out_dir / name, ignore_errors=True)

    # A rerun resumes from checkpoints only when they were made under the same settings and data.
    stage.claim(cfg.on_change, outputs=stage_outputs(run_name), wipe=wipe)
    # The run's tracker (cfg.tracking): opened here, so that a bad one stops the job before any work.
    tracker = start_run(cfg.tracking, out_dir, run_name or "train", params=to_dict(cfg))
    try:
        return _run(cfg, run_name, stage, out_dir, t0, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise


def _run(cfg: TrainConfig, run_name: str | None, stage: Stage, out_dir: Path, t0: float, tracker) -> TrainResult:

    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    if Path(model_path).exists():
        model_path = str(Path(model_path).resolve())
    _ensure_ray(cfg)
    ds = read_training_data(cfg.data)
    n_rows = ds.count()
    if n_rows < cfg.num_workers:
        raise ValueError(f"{cfg.data}: {n_rows} rows, fewer than num_workers={cfg.num_workers}")

    state = fit_resumable(train_loop_per_worker,
                          {"cfg": to_dict(cfg), "cfg_class": type(cfg), "model_path": model_path, "out_dir": str(out_dir),
                           "n_rows": n_rows, "tracking": tracker.handle()},
                          ds, out_dir, run_name or "train", cfg.num_workers, cfg.use_gpu, cfg.keep_checkpoints,
                          cfg.max_failures)

    history = state["history"]
    write_jsonl(out_dir / "history.jsonl", history)
    write_jsonl(out_dir / "rejects.jsonl", state["rejected_rows"], default=json_default_or_str)
    summary = _summary(cfg, state, time.time() - t0, n_rows)
    write_json(out_dir / "train_summary.json", summary)
    adapter = out_dir / "adapter"
    merged = out_dir / "merged"
    stage.finish(steps=summary.get("steps"), final_loss=summary.get("final_loss"))
    tracker.log_metrics(numeric(without(summary, ("config",)), "train_summary"), step=summary.get("steps"))
    for name in ("train_summary.json", "history.jsonl"):
        tracker.log_artifact(out_dir / name)
    tracker.end()
    return TrainResult(
        out_dir=str(out_dir),
        adapter_dir=str(adapter) if cfg.lora.enabled and adapter.exists() else None,
        merged_dir=str(merged) if merged.exists() else None,
        history=history,
        summary=summary,
    )


def fit_resumable(loop, loop_config: dict, ds, out_dir: Path, run_name: str, num_workers: int, use_gpu: bool,
                  keep_checkpoints: int, max_failures: int) -> dict:
    """One Ray Train run on the project's conventions, for every trainer (the LM trainer, KARD's reranker):
    ``TorchTrainer(loop)`` over ``ds`` in ``num_workers`` workers, its run folder ``out_dir/ray/<run_name>``
    (a rerun resumes from its latest checkpoint), ``keep_checkpoints`` checkpoints, ``max_failures``
    restarts, rows in the same order on every run (a resume skips exactly the rows already trained on).
    Returns the last checkpoint's ``STATE_FILE`` (step, history, ...)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            storage_path=str(out_dir / "ray"), name=run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, keep_checkpoints)),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name}: training finished without a checkpoint (run folder {out_dir / 'ray'})")
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text())
