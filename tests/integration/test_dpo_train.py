"""KnowTuning DPO on Ray Train + DeepSpeed (2 gloo workers, ZeRO-2, LoRA) on ``builtin:tiny-llama``.

Pairs from UMLS neighbourhood answers (delete / revise / shuffle). Run 1 is the job's recipe:
pairs -> reference log-probs precomputed by a Ray Data actor -> DPO -> the trained policy scores
the training pairs. Run 2 trains on the same rows with the reference computed every step with
the adapter disabled: the two references are the same model, so the curves must agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kale_ray.config import TrainConfig, load_config
from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig

pytestmark = pytest.mark.integration

TRAIN = ["train.model.name=builtin:tiny-llama", "train.num_workers=2", "train.zero_stage=2", "train.micro_batch_size=2",
         "train.max_steps=5", "train.lr=0.005", "train.lr_schedule=constant", "train.warmup_steps=0",
         "train.max_seq_len=160", "train.lora.r=8", "train.lora.alpha=16"]


def check_export(out: Path, base_path: str) -> None:
    """adapter/ and merged/ exist; merged == base + adapter, and the adapter is not a no-op."""
    from peft import PeftModel

    from kale_ray.models import load_causal_lm

    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").exists()
    ids = torch.tensor([[17872, 42, 1338, 1429, 330, 2853, 47, 198, 42, 389, 2]])
    with torch.no_grad():
        base = load_causal_lm(base_path)
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(out / "adapter"))(input_ids=ids).logits
        merged = load_causal_lm(str(out / "merged"))(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3


def test_knowtuning_dpo_recipe_and_adapter_disabled_reference(ray_local, tmp_path):
    from kale_ray.methods.knowtuning.stage2 import run_dpo_stage
    from kale_ray.models import resolve_model
    from kale_ray.train.trainer import run_training

    cfg = load_config(KnowTuningDPOJobConfig, None, [
        f"out={tmp_path / 'kt'}", "pairs.num_questions=4", "pairs.facts_per_answer=3", "pairs.seed=0",
        "train.dpo.reference=precomputed", "reference_with=ray", "reference_batch_size=4", *TRAIN])
    summary = run_dpo_stage(cfg)
    out = tmp_path / "kt"

    assert summary["pairs"]["pairs"] == 12 and summary["pairs"]["by_kind"] == {"delete": 4, "revise": 4, "shuffle": 4}
    assert summary["reference"]["scored"] == 12
    assert summary["train"]["steps"] == 5 and summary["train"]["rejected"] == {}
    history = [json.loads(x) for x in (out / "train" / "history.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h[k]) for h in history for k in ("loss", "dpo", "sft", "reward_margin"))
    # Step 1: the LoRA policy is still the base (B = 0), so every margin is 0 and DPO = log 2.
    assert history[0]["dpo"] == pytest.approx(math.log(2), abs=1e-3)
    assert history[0]["samples"] == 8  # 2 workers x 2 pairs x (chosen + rejected)
    assert history[-1]["dpo"] < history[0]["dpo"] and history[-1]["reward_margin"] > history[0]["reward_margin"]
    after = summary["rewards_after"]
    assert after["pairs"] == 12 and after["reward_margin"] > 0 and after["reward_accuracy"] > 0.5, after
    check_export(out / "train", resolve_model("builtin:tiny-llama"))

    # The same rows, reference = the same model with its adapter disabled at every step.
    rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert all("ref_chosen_logp" in r for r in rows)
    train = load_config(TrainConfig, None, [x.removeprefix("train.") for x in TRAIN] + [
        "loss=dpo", f"data={out / 'data'}", f"out_dir={tmp_path / 'live'}", "dpo.reference=adapter_disabled"])
    live = run_training(train, run_name="live").history
    assert live[0]["dpo"] == pytest.approx(math.log(2), abs=1e-6) and live[0]["reward_accuracy"] == 0.0
    for a, b in zip(history, live):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-3), (a, b)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=2e-3), (a, b)
