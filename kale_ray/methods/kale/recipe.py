"""The main job: KALE end to end on the embedded defaults (HPO + SmolLM2-135M-Instruct).

    kale-ray kale --config configs/demo.yaml --out runs/kale     (or: kale-ray demo ..., the same job)

1. synthesis: generated multi-hop QA -> KI paths -> vLLM teacher rationales (Ray Data)
2. training rows rendered with the student's chat template
3. SFT baseline and KALE, same data / steps / seed / LoRA, Ray Train + DeepSpeed
4. evaluation of both (and the untrained base) on the held-out questions through vLLM, and in the same
   pass on held-out general questions never trained on (``eval.general``): is general ability lost?
5. metrics.json, report.md, plot.png

Each stage is a ``Run.stage`` (kale_ray.runtime.stages) writing under ``--out``: a rerun with the
same settings reuses finished stages and resumes a killed one (shards, checkpoints); with other
settings it stops at the first changed stage, naming the keys (or, with ``on_change=overwrite``,
redoes that stage and every later one).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from kale_ray.runtime.ray import init_ray_for
from kale_ray.config import KALEJobConfig, to_dict
from kale_ray.core.io import read_jsonl
from kale_ray.runtime.stages import Run, stage_config, without
from kale_ray.runtime.tracking import TrackingConfig, numeric, start_run
from kale_ray.methods.kale.general import general_correct, general_file, read_general
from kale_ray.methods.kale.metrics import BLIND_PRIORS, gate, question_blind_baseline
from kale_ray.methods.kale.report import plot, write_metrics, write_report
from kale_ray.runtime.report import machine_info, paired_difference


def _job_tracking(cfg: KALEJobConfig, out: Path, job: str) -> TrackingConfig:
    """The demo's tracker for one of its jobs: same backend and place, run ``<demo run>/<job>``."""
    t = cfg.tracking
    uri = t.uri
    if uri is None and t.backend == "tensorboard":
        uri = str(out / "tensorboard")  # every run of the demo under one TensorBoard log folder
    elif uri is None and t.backend == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = f"sqlite:///{out / 'mlflow.db'}"  # every run of the demo in one MLflow store
    return dataclasses.replace(t, uri=uri, run_name=f"{t.run_name or 'demo'}/{job}" if job else (t.run_name or "demo"))


def run_demo(cfg: KALEJobConfig, progress: Callable[[str], None] = print) -> dict:
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


def _question_blind(cfg: KALEJobConfig, test_file: Path) -> dict:
    """The question-blind baselines on the test questions (each prior of ``metrics.BLIND_PRIORS``): for
    generated questions (a user's QA file is not the testbed; its KG may be too big to load here)."""
    from kale_ray.core.kg import load_kg

    if cfg.synth.qa.source != "generate":
        return {}
    from kale_ray.core.qa import read_qa_jsonl

    questions = list(read_qa_jsonl(test_file))
    kg = load_kg(cfg.synth.kg.source, cfg.synth.kg.names, "skip")
    return {prior: question_blind_baseline(kg, questions, prior) for prior in BLIND_PRIORS}


def _general(out: Path, evals: dict) -> dict:
    """KALE - SFT on the held-out general questions, paired per question (their evaluations'
    general_predictions.jsonl); {} when either was evaluated without them."""
    if not all("general" in evals.get(name, {}) for name in ("sft", "kale")):
        return {}
    return {"kale_minus_sft": paired_difference(general_correct(out / "eval_sft"), general_correct(out / "eval_kale"))}


def _run_demo(cfg: KALEJobConfig, progress: Callable[[str], None]) -> dict:
    from kale_ray.methods.kale.evaluate import evaluate
    from kale_ray.models import resolve_model
    from kale_ray.synth.format import write_training_rows
    from kale_ray.synth.pipeline import run_synthesis, synthesis_settings
    from kale_ray.train.trainer import run_training, stage_settings, training_stage

    out = Path(cfg.out).expanduser().resolve()
    # The general questions (eval.general) are read before any work: a bad file stops here, naming its line.
    general = general_file(cfg.eval.general, "eval.general")
    if general:
        read_general(general)
    run = Run(out, cfg, on_change=cfg.on_change, progress=progress, label="demo")
    # Local: logical CPUs for the train workers (one each) plus room for Ray Data's read/split
    # tasks; with exactly os.cpu_count() the data feed can starve.
    init_ray_for(cfg)
    model_path = resolve_model(cfg.train.model.name, cfg.train.model.cache_dir)
    # 1. synthesis (its own shard records make a killed run resume)
    synth_cfg = stage_config(cfg.synth, cfg.on_change, out_dir=str(out / "synth"),
                             tracking=_job_tracking(cfg, out, "synthesis"))
    summary = run.stage("synthesis", lambda: run_synthesis(synth_cfg, progress).to_dict(),
                        settings=synthesis_settings(synth_cfg), outputs=["synth"])

    # 2. training rows, rendered with the student's chat template
    rows = run.stage("training_rows", lambda: write_training_rows(out / "synth", model_path, out / "train_rows",
                                                                  cfg.train.model.trust_remote_code),
                     settings={"model": cfg.train.model.name, "trust_remote_code": cfg.train.model.trust_remote_code},
                     outputs=["train_rows"])
    progress(f"[demo] {rows['rows']} training rows")

    # 3. SFT and KALE with the same rows, steps, seed and LoRA budget
    trained = {}
    for loss in ("sft", "kale"):
        tcfg = stage_config(cfg.train, cfg.on_change, loss=loss, data=str(out / "train_rows"), out_dir=str(out / loss),
                            tracking=_job_tracking(cfg, out, loss))

        def train(tcfg=tcfg, loss=loss) -> dict:
            progress(f"[demo] training {loss} on Ray Train + DeepSpeed ZeRO-{tcfg.zero_stage}, {tcfg.num_workers} workers")
            res = run_training(tcfg, run_name=f"demo-{loss}")
            return {"summary": res.summary, "merged": res.merged_dir, "settings_hash": training_stage(tcfg).hash}

        trained[loss] = run.stage(f"train.{loss}", train, settings=stage_settings(tcfg, f"demo-{loss}"),
                                  outputs=[loss])
    histories = {loss: read_jsonl(out / loss / "history.jsonl") for loss in trained}

    # 4. evaluation of each model on the held-out questions
    evals = {}
    test_file = out / "synth" / "qa" / "test.jsonl"
    models = [("base", cfg.train.model.name)] if cfg.eval_base else []
    for name, path in models + [(loss, t["merged"]) for loss, t in trained.items()]:
        ecfg = dataclasses.replace(cfg.eval, model=dataclasses.replace(cfg.train.model, name=path), data=str(test_file),
                                   out_dir=str(out / f"eval_{name}"))
        # A trained model is named by its training settings (its folder's name says nothing); the general
        # questions' file is an input by content (another file, or this one changed: the stage runs again).
        model_id = path if name == "base" else trained[name]["settings_hash"]
        evals[name] = run.stage(f"eval.{name}", lambda ecfg=ecfg, name=name: evaluate(ecfg, label=name, progress=progress),
                                settings={"eval": without(to_dict(ecfg), ("model.name", "model.cache_dir")),
                                          "model": model_id},
                                content_inputs=[test_file] + ([general] if general else []), outputs=[f"eval_{name}"],
                                after="synthesis" if name == "base" else f"train.{name}")

    # 5. the shortcut check: how far the choices alone give the answers away (generated questions)
    blind = run.stage("question_blind", lambda: _question_blind(cfg, test_file), settings={"priors": list(BLIND_PRIORS)},
                      content_inputs=[test_file], after="synthesis")

    timings = run.timings()
    timings.update({f"synthesis.{k}": v for k, v in summary["seconds"].items()})
    metrics = {
        "model": cfg.train.model.name,
        "machine": machine_info(),
        "synthesis": summary,
        "training_rows": rows,
        "train": {k: {kk: t["summary"].get(kk) for kk in ("steps", "samples", "final_loss", "samples_per_s",
                                                          "seconds_per_step", "wall_seconds", "rejected", "first_loss")}
                  for k, t in trained.items()},
        "eval": evals,
        "question_blind": blind,
        "general": _general(out, evals),
        "gate": gate(evals.get("sft")),
        "sft": {"accuracy": evals["sft"]["accuracy"], "known_and_incorrect_rate": evals["sft"]["known_and_incorrect_rate"]},
        "kale": {"accuracy": evals["kale"]["accuracy"], "known_and_incorrect_rate": evals["kale"]["known_and_incorrect_rate"]},
        "timings": timings,
        "reused_stages": run.reused,
    }
    write_metrics(out, metrics)
    plot(out / "plot.png", histories, evals)
    write_report(out, metrics)
    progress(f"[demo] done in {timings['total_this_run'] / 60:.1f} min: sft acc {evals['sft']['accuracy']:.3f}, "
             f"kale acc {evals['kale']['accuracy']:.3f}; report: {out / 'report.md'}")
    return metrics
