"""The main job: KALE end to end on the embedded defaults (UMLS + SmolLM2-135M-Instruct).

    kale-ray demo --out runs/demo

1. synthesis: generated multi-hop QA -> KI paths -> vLLM teacher rationales (Ray Data)
2. training rows rendered with the student's chat template
3. SFT baseline and KALE, same data / steps / seed / LoRA, Ray Train + DeepSpeed
4. evaluation of both (and the untrained base) on the held-out questions through vLLM
5. metrics.json, report.md, plot.png

Each stage writes under ``--out``; a rerun resumes (finished shards, checkpoints and
evaluations are reused).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

from kale_ray.llm import QUIET_ENV
from kale_ray.ray_init import init_ray
from kale_ray.config import DemoConfig, EvalConfig, dump_config, to_dict
from kale_ray.runtime.stages import content_identity
from kale_ray.runtime.tracking import TrackingConfig, numeric, start_run
from kale_ray.report import machine_info, plot, write_metrics, write_report


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _job_tracking(cfg: DemoConfig, out: Path, job: str) -> TrackingConfig:
    """The demo's tracker for one of its jobs: same backend and place, run ``<demo run>/<job>``."""
    t = cfg.tracking
    uri = t.uri
    if uri is None and t.backend == "tensorboard":
        uri = str(out / "tensorboard")  # every run of the demo under one TensorBoard log folder
    elif uri is None and t.backend == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = f"sqlite:///{out / 'mlflow.db'}"  # every run of the demo in one MLflow store
    return dataclasses.replace(t, uri=uri, run_name=f"{t.run_name or 'demo'}/{job}" if job else (t.run_name or "demo"))


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the demo; its tracker (``cfg.tracking``) is opened first, so that a bad one stops it before any work."""
    out = Path(cfg.out).expanduser().resolve()
    tracker = start_run(_job_tracking(cfg, out, ""), out, "demo", params=to_dict(cfg))
    try:
        metrics = _run_demo(cfg, progress)
    except BaseException:
        tracker.end("FAILED")
        raise
    # Every metric of metrics.json, and the demo's outputs as artifacts.
    tracker.log_metrics(numeric(metrics))
    for name in ("report.md", "plot.png", "metrics.json", "config.yaml"):
        tracker.log_artifact(out / name)
    tracker.end()
    return metrics


def _run_demo(cfg: DemoConfig, progress: Callable[[str], None]) -> dict:
    from kale_ray.eval.evaluate import evaluate
    from kale_ray.models import resolve_model
    from kale_ray.synth.format import write_training_rows
    from kale_ray.synth.pipeline import run_synthesis
    from kale_ray.train.trainer import run_training

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # Local: logical CPUs for the train workers (one each) plus room for Ray Data's read/split
    # tasks; with exactly os.cpu_count() the data feed can starve.
    init_ray(cfg.ray_address, train_workers=cfg.train.num_workers, log_to_driver=True, runtime_env=QUIET_ENV)

    t = time.perf_counter()
    model_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    timings["resolve_model"] = time.perf_counter() - t

    # 1. synthesis
    t = time.perf_counter()
    synth_cfg = copy.deepcopy(cfg.synth)
    synth_cfg.out_dir = str(out / "synth")
    synth_cfg.tracking = _job_tracking(cfg, out, "synthesis")
    summary = run_synthesis(synth_cfg, progress).to_dict()
    timings["synthesis"] = time.perf_counter() - t
    for k, v in summary["seconds"].items():
        timings[f"synthesis.{k}"] = v

    # 2. training rows
    t = time.perf_counter()
    rows = write_training_rows(out / "synth", model_path, out / "train_rows", cfg.train.model.trust_remote_code)
    timings["format_training_rows"] = time.perf_counter() - t
    progress(f"[demo] {rows['rows']} training rows")

    # 3. SFT and KALE with the same budget
    histories, train_summaries, merged = {}, {}, {}
    for loss in ("sft", "kale"):
        t = time.perf_counter()
        tcfg = copy.deepcopy(cfg.train)
        tcfg.loss = loss
        tcfg.data = str(out / "train_rows")
        tcfg.out_dir = str(out / loss)
        tcfg.tracking = _job_tracking(cfg, out, loss)
        from kale_ray.train.trainer import training_stage

        # Reused only when trained under these very settings and rows; other settings: refused or redone.
        done = _done(out / loss / "train_summary.json") if training_stage(tcfg, f"demo-{loss}").complete() else None
        if done is None:
            progress(f"[demo] training {loss} on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, {tcfg.num_workers} workers")
            res = run_training(tcfg, run_name=f"demo-{loss}")
            train_summaries[loss], histories[loss], merged[loss] = res.summary, res.history, res.merged_dir
        else:
            train_summaries[loss] = done
            histories[loss] = [json.loads(x) for x in (out / loss / "history.jsonl").read_text().splitlines() if x]
            merged[loss] = str(out / loss / "merged")
        timings[f"train.{loss}"] = time.perf_counter() - t

    # 4. evaluation
    evals = {}
    test_file = out / "synth" / "qa" / "test.jsonl"
    models = [("base", cfg.train.model.name)] if cfg.eval_base else []
    for name, path in models + [("sft", merged["sft"]), ("kale", merged["kale"])]:
        t = time.perf_counter()
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.model = copy.deepcopy(cfg.train.model)
        ecfg.model.name = path
        ecfg.data = str(test_file)
        ecfg.out_dir = str(out / f"eval_{name}")
        # The evaluation's settings name the model it scored (the training run's settings hash).
        from kale_ray.runtime.stages import Stage
        from kale_ray.runtime.storage import Storage
        from kale_ray.train.trainer import training_stage

        model_id = path if name == "base" else training_stage(
            dataclasses.replace(cfg.train, loss=name, data=str(out / "train_rows"), out_dir=str(out / name)),
            f"demo-{name}").hash
        stage = Stage(Storage.from_uri(str(out / f"eval_{name}")), "evaluate",
                      {"eval": to_dict(ecfg), "model": model_id, "test": content_identity(test_file)})
        stage.claim(cfg.train.on_change, outputs=("metrics.json",),
                    wipe=lambda d=out / f"eval_{name}": (d / "metrics.json").unlink(missing_ok=True))
        done = _done(out / f"eval_{name}" / "metrics.json") if stage.complete() else None
        evals[name] = done if done is not None else evaluate(ecfg, label=name, progress=progress)
        stage.finish(accuracy=evals[name].get("accuracy"))
        timings[f"eval.{name}"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_all
    metrics = {
        "model": cfg.train.model.name,
        "machine": machine_info(),
        "synthesis": summary,
        "training_rows": rows,
        "train": {k: {kk: v.get(kk) for kk in ("steps", "samples", "final_loss", "samples_per_s", "seconds_per_step", "wall_seconds",
                                                "rejected", "first_loss")} for k, v in train_summaries.items()},
        "eval": evals,
        "sft": {"accuracy": evals["sft"]["accuracy"], "known_and_incorrect_rate": evals["sft"]["known_and_incorrect_rate"]},
        "kale": {"accuracy": evals["kale"]["accuracy"], "known_and_incorrect_rate": evals["kale"]["known_and_incorrect_rate"]},
        "timings": timings,
    }
    write_metrics(out, metrics)
    plot(out / "plot.png", histories, evals)
    write_report(out, metrics)
    progress(f"[demo] done in {timings['total'] / 60:.1f} min: sft acc {evals['sft']['accuracy']:.3f}, "
             f"kale acc {evals['kale']['accuracy']:.3f}; report: {out / 'report.md'}")
    return metrics
