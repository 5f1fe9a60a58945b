"""Loss registry, answer-position logits, the sharding contract of compute (no Ray)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from kale_ray.config import TrainConfig
from kale_ray.models import load_causal_lm, load_tokenizer, resolve_model
from kale_ray.train.heads import AnswerLogits
from kale_ray.train.loop import check_finite, deepspeed_config, lr_factor, total_steps
from kale_ray.train.registry import (
    StepContext,
    count_answer_tokens,
    get_loss,
    list_losses,
    register_loss,
)

ROWS = [
    {"id": "1", "prompt": "Question: what does A affect?\nAnswer:",
     "teacher_prompt": "Knowledge: A affects B.\nQuestion: what does A affect?\nAnswer:", "completion": " B<|im_end|>"},
    {"id": "2", "prompt": "Question: what treats C?\nAnswer:",
     "teacher_prompt": "Knowledge: D treats C; D is a drug.\nQuestion: what treats C?\nAnswer:",
     "completion": " the drug D, given daily<|im_end|>"},
    {"id": "3", "prompt": "Q: E?\nA:", "teacher_prompt": "K: E is F.\nQ: E?\nA:", "completion": " F<|im_end|>"},
]


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model("builtin:tiny-llama")
    torch.manual_seed(0)
    return load_tokenizer(path), load_causal_lm(path).eval()


def test_registry_lists_builtin_losses_and_errors_on_unknown():
    assert {"sft", "kale"} <= set(list_losses())
    with pytest.raises(KeyError, match="unknown loss 'nope'; known losses: .*kale.*sft"):
        get_loss("nope")
    spec = get_loss("kale")
    assert spec.name == "kale" and spec.description.startswith("KALE")


def test_registry_is_open_for_new_losses():
    @register_loss("unit_test_loss", collator_factory=lambda tok, cfg: None)
    def compute(model, batch, cfg, dist):
        """A test loss."""
        return torch.tensor(0.0), {}

    assert get_loss("unit_test_loss").compute is compute
    assert get_loss("unit_test_loss").description == "A test loss."
    with pytest.raises(ValueError, match="already registered"):
        register_loss("unit_test_loss", collator_factory=lambda tok, cfg: None)(lambda *a: None)


@pytest.mark.parametrize("peft", [False, True])
def test_answer_logits_equal_full_logits_at_answer_positions(tiny, peft):
    tok, lm = tiny
    if peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero B
        lm = get_peft_model(copy.deepcopy(lm), lora)
    batch = get_loss("sft").collator_factory(tok, TrainConfig(max_seq_len=64))(ROWS)
    with torch.no_grad():
        logits, targets = AnswerLogits(lm)(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N, V)
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    keep = batch["labels"][:, 1:] != -100  # (B, T-1)
    assert logits.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(logits, full[:, :-1][keep], rtol=1e-4, atol=1e-4)
    assert torch.equal(targets, batch["labels"][:, 1:][keep])


@pytest.mark.parametrize("name", ["sft", "kale"])
def test_compute_is_invariant_to_sharding(tiny, name):
    """Two shards with the global token count add up to the whole batch: loss, parts, gradients."""
    tok, lm = tiny
    cfg = TrainConfig(max_seq_len=64, loss=name)
    spec = get_loss(name)
    model = AnswerLogits(lm)
    collate = spec.collator_factory(tok, cfg)
    weight = lm.get_output_embeddings().weight

    whole = collate(ROWS)
    loss, parts = spec.compute(model, whole, cfg, StepContext())
    (g_whole,) = torch.autograd.grad(loss, weight)

    shards = [collate(ROWS[:1]), collate(ROWS[1:])]
    count = sum(spec.count_fn(b) for b in shards)
    assert count == count_answer_tokens(whole)
    shard_out = [spec.compute(model, b, cfg, StepContext(world_size=2, rank=r, global_count=count))
                 for r, b in enumerate(shards)]
    total = sum(l for l, _ in shard_out)
    (g_shards,) = torch.autograd.grad(total, weight)
    torch.testing.assert_close(total, loss, rtol=1e-5, atol=1e-5)
    for k in parts:
        torch.testing.assert_close(sum(p[k] for _, p in shard_out), parts[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_shards, g_whole, rtol=1e-3, atol=1e-5)  # padding changes matmul shapes
    if name == "kale":
        assert parts["kl"] >= 0 and set(parts) == {"ce", "kl"}


def test_kale_with_lam_zero_is_sft(tiny):
    tok, lm = tiny
    cfg = TrainConfig(max_seq_len=64)
    cfg.ka.lam = 0.0
    model = AnswerLogits(lm)
    with torch.no_grad():
        kale, _ = get_loss("kale").compute(model, get_loss("kale").collator_factory(tok, cfg)(ROWS), cfg, StepContext())
        sft, _ = get_loss("sft").compute(model, get_loss("sft").collator_factory(tok, cfg)(ROWS), cfg, StepContext())
    torch.testing.assert_close(kale, sft)


def test_schedule_and_step_helpers():
    assert [lr_factor(s, 2, 6, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 2, 6, "cosine") == pytest.approx(1.0)
    assert lr_factor(4, 2, 6, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 2, 6, "constant") == 1.0
    cfg = TrainConfig(micro_batch_size=4, grad_accum=2, epochs=2)
    assert total_steps(cfg, n_rows=34, world_size=2) == 2 * 3  # 17 rows/worker, 8 per step
    cfg.max_steps = 5
    assert total_steps(cfg, n_rows=34, world_size=2) == 5
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == cfg.zero_stage


def test_non_finite_loss_names_step_and_parts():
    check_finite({"loss": 1.0, "ce": 1.0}, step=3, epoch=0)
    with pytest.raises(FloatingPointError, match=r"step 7 \(epoch 1\): ce=1.0, kl=nan, loss=nan"):
        check_finite({"ce": 1.0, "kl": float("nan"), "loss": float("nan")}, step=7, epoch=1)


def test_pure_modules_import_no_ray_or_deepspeed():
    code = (
        "import sys, kale_ray.train.registry, kale_ray.train.collators, kale_ray.train.heads, kale_ray.train.loop;"
        "bad=[m for m in ('ray','deepspeed','vllm') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
