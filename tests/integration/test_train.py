"""Ray Train + DeepSpeed (gloo, CPU) end to end on ``builtin:tiny-llama``.

Five short runs share one local Ray instance; about 3 minutes on a 2-core machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kale_ray.config import TrainConfig, load_config
from kale_ray.models import load_causal_lm, resolve_model

pytestmark = pytest.mark.integration

FACTS = [("A", "B"), ("C", "D"), ("E", "F G H"), ("I", "J")]


def write_rows(folder: Path, rows: list[dict], name: str = "part-00000.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def fact_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = FACTS[i % len(FACTS)]
        rows.append({
            "id": f"r{i}",
            "prompt": f"Question: what does {a} affect?\nAnswer:",
            "teacher_prompt": f"Knowledge: {a} affects {b}.\nQuestion: what does {a} affect?\nAnswer:",
            "completion": f" {b}<|im_end|>",
        })
    return rows


def make_cfg(data: Path, out: Path, *overrides: str) -> TrainConfig:
    base = [
        "model.name=builtin:tiny-llama", f"data={data}", f"out_dir={out}", "num_workers=2",
        "micro_batch_size=2", "max_seq_len=64", "lr=0.005", "warmup_steps=0", "lora.r=8",
    ]
    return load_config(TrainConfig, None, base + list(overrides))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def base_path():
    return resolve_model("builtin:tiny-llama")


def check_losses(history: list[dict], decreasing: bool = True) -> None:
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    if decreasing:
        assert losses[-1] < losses[0] - 0.05, losses


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_export(result, base_path: str) -> None:
    """merged/ loads with transformers and equals base + adapter; the adapter is not a no-op."""
    from peft import PeftModel

    assert result.adapter_dir and (Path(result.adapter_dir) / "adapter_model.safetensors").exists()
    assert (Path(result.merged_dir) / "model.safetensors").exists()
    ids = torch.tensor([[17872, 42, 1338, 1429, 330, 2853, 47, 198, 42, 389, 2]])
    base = load_causal_lm(base_path)
    plain = logits(base, ids)
    adapted = logits(PeftModel.from_pretrained(base, result.adapter_dir), ids)
    merged = logits(load_causal_lm(result.merged_dir), ids)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3


def test_sft_zero2_lora_then_resume(ray_local, base_path, tmp_path):
    from kale_ray.train.trainer import run_training

    rows = fact_rows(16)
    # Two rows whose completion cannot fit in max_seq_len: rejected with a reason, not dropped silently.
    long = {"prompt": "Q?", "teacher_prompt": "K. Q?", "completion": " x" * 80 + "<|im_end|>"}
    rows = [{"id": "long0", **long}, {"id": "long1", **long}] + rows
    data = write_rows(tmp_path / "data", rows)
    out = tmp_path / "out"

    first = run_training(make_cfg(data, out, "loss=sft", "max_steps=4", "checkpoint_every=2"), run_name="resume")
    assert [h["step"] for h in first.history] == [1, 2, 3, 4]
    check_losses(first.history)
    check_export(first, base_path)
    assert first.summary["rejected"] == {"completion_too_long": 2}
    ckpts = sorted(p.name for p in (out / "ray" / "resume").glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step000002", "checkpoint_step000004"]

    second = run_training(make_cfg(data, out, "loss=sft", "max_steps=6", "checkpoint_every=2"), run_name="resume")
    assert [h["step"] for h in second.history] == [1, 2, 3, 4, 5, 6]
    assert second.history[:4] == first.history[:4]  # the curve is carried over, not recomputed
    assert [a["start_step"] for a in second.summary["attempts"]] == [0, 4]
    assert second.history[4]["lr"] > 0  # the schedule follows the new total, not the old one
    check_losses(second.history)
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples"] == sum(h["samples"] for h in second.history)
    assert summary["rejected"] == {"completion_too_long": 2}  # counted once per row across epochs/resume
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2

    # the same folder with another learning rate: refused before anything trains (never resumes
    # checkpoints made under other settings), naming the key; on_change=overwrite starts afresh
    from kale_ray.runtime.stages import StaleOutputError

    with pytest.raises(StaleOutputError, match=r"lr: 0\.005 -> 0\.001"):
        run_training(make_cfg(data, out, "loss=sft", "max_steps=6", "checkpoint_every=2", "lr=0.001"), run_name="resume")
    assert [json.loads(x)["step"] for x in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_full_finetune_zero3_writes_merged_only(ray_local, base_path, tmp_path):
    from kale_ray.train.trainer import run_training

    data = write_rows(tmp_path / "data", fact_rows(8))
    result = run_training(
        make_cfg(data, tmp_path / "out", "loss=sft", "zero_stage=3", "lora.enabled=false", "max_steps=2",
                 "lr=0.001")
    )
    check_losses(result.history, decreasing=False)
    assert result.adapter_dir is None and not (tmp_path / "out" / "adapter").exists()
    ids = torch.tensor([[17872, 42, 389, 2]])
    trained = load_causal_lm(result.merged_dir)
    assert (logits(trained, ids) - logits(load_causal_lm(base_path), ids)).abs().max() > 1e-3


def test_loss_is_invariant_to_sharding(ray_local, base_path, tmp_path):
    """Step 1 on the same 4 rows: 2 workers x 2 rows under ZeRO-3 == 1 worker x (2 rows x 2 accumulation
    steps) under ZeRO-2; and the ZeRO-3 + LoRA KALE run trains and exports (its own run costs ~30 s).

    Rows have different completion lengths, so a mean of per-worker means would differ from
    the global token mean. The gradient norm (before clipping) must match as well.
    """
    from kale_ray.train.trainer import run_training

    rows = fact_rows(4)
    rows[1]["completion"] = " D and a long tail of extra answer tokens here<|im_end|>"
    data = write_rows(tmp_path / "data", rows)
    two = run_training(make_cfg(data, tmp_path / "two", "loss=kale", "zero_stage=3", "max_steps=3"))
    one = run_training(make_cfg(data, tmp_path / "one", "loss=kale", "zero_stage=2", "max_steps=1", "num_workers=1",
                                "grad_accum=2"))
    a, b = two.history[0], one.history[0]
    assert a["tokens"] == b["tokens"] and a["samples"] == b["samples"] == 4
    for key in ("loss", "ce", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert [h["step"] for h in two.history] == [1, 2, 3] and all(h["kl"] >= 0 for h in two.history)
    check_losses(two.history)
    check_export(two, base_path)
