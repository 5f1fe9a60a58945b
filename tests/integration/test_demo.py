"""The main job end to end at a tiny size: synthesis (vLLM teacher) -> SFT and KALE on
Ray Train + DeepSpeed (2 workers, gloo) -> evaluation through vLLM -> metrics, report, plot.
"""
from __future__ import annotations

import json

import pytest

from kale_ray.config import KALEJobConfig, load_config

pytestmark = pytest.mark.integration


def test_demo_tiny(tmp_path):
    from kale_ray.methods.kale.recipe import run_demo

    cfg = load_config(KALEJobConfig, "configs/demo.yaml", [
        f"out={tmp_path}", "synth.teacher.name=builtin:tiny-llama", "train.model.name=builtin:tiny-llama",
        "synth.qa.num_questions=40", "synth.generation.max_tokens=16", "synth.teacher.max_model_len=512",
        "train.max_steps=3", "train.micro_batch_size=4", "train.max_seq_len=256", "train.model.max_model_len=512",
        "eval.generation.max_tokens=8",
        # the untrained model's evaluation is the same code as SFT's and KALE's: one vLLM start less here
        "eval_base=false",
    ])
    metrics = run_demo(cfg, progress=lambda m: None)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("sft", "kale"):
        assert set(on_disk[name]) == {"accuracy", "known_and_incorrect_rate"}
        assert 0.0 <= on_disk[name]["accuracy"] <= 1.0
        assert on_disk["train"][name]["steps"] == 3
        assert (tmp_path / name / "merged" / "config.json").exists()
    assert set(on_disk["eval"]) == {"sft", "kale"}
    assert on_disk["eval"]["kale"]["n_questions"] == metrics["synthesis"]["qa"]["test"] > 0
    assert on_disk["synthesis"]["rows_out"] > 0
    assert any(k.startswith("train.") for k in on_disk["timings"])
    report = (tmp_path / "report.md").read_text()
    assert "known & incorrect" in report and "| kale |" in report and "| sft |" in report
    # the testbed's gate and the shortcut check are part of every run
    assert set(on_disk["question_blind"]) == {"range", "tail", "answer"}
    assert on_disk["question_blind"]["range"]["n"] == on_disk["eval"]["kale"]["n_questions"]
    assert on_disk["gate"]["sft_accuracy"] == on_disk["sft"]["accuracy"] and "passed" in on_disk["gate"]
    assert "## Testbed gate (SFT)" in report and "## Question-blind baselines" in report
    # the held-out general questions (eval.general, never trained on): asked of every evaluated model in its pass
    from kale_ray.methods.kale.general import general_file, read_general

    n_general = len(read_general(general_file("builtin:general")))
    for name, m in on_disk["eval"].items():
        assert m["general"]["n"] == n_general and m["general"]["source"] == "builtin:general", name
        assert len((tmp_path / f"eval_{name}" / "general_predictions.jsonl").read_text().splitlines()) == n_general
    assert on_disk["general"]["kale_minus_sft"]["n"] == n_general
    assert "## General ability (held-out general QA, never trained on)" in report
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # every hop of every synthesised path is a KG triple
    from kale_ray.core.kg import load_kg

    kg = load_kg(cfg.synth.kg.source)
    for p in (tmp_path / "synth" / "data").glob("shard-*.jsonl"):
        for line in p.read_text().splitlines():
            for path in json.loads(line)["paths"]:
                assert all(kg.has_named_triple(*hop) for hop in path)

    # A rerun with the same settings reuses every stage and reports the same results.
    again = run_demo(cfg, progress=lambda m: None)
    assert again["reused_stages"] == ["synthesis", "training_rows", "train.sft", "train.kale", "eval.sft", "eval.kale",
                                      "question_blind"]
    assert again["eval"]["kale"]["accuracy"] == metrics["eval"]["kale"]["accuracy"]
    # A changed training setting: refused at the first training stage, naming the key; nothing rewritten.
    import dataclasses

    from kale_ray.runtime.stages import StaleOutputError

    config_before = (tmp_path / "config.yaml").read_text()
    summary_before = (tmp_path / "sft" / "train_summary.json").read_text()
    with pytest.raises(StaleOutputError, match=r"train\.sft.*settings\.lr: 0\.0005 -> 0\.001"):
        run_demo(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-3)), progress=lambda m: None)
    assert (tmp_path / "config.yaml").read_text() == config_before
    assert (tmp_path / "sft" / "train_summary.json").read_text() == summary_before
