"""Loss registry, answer-position logits, the sharding contract of compute (no Ray)."""
from __future__ import annotations

import copy

import pytest
import torch

from kale_ray.config import KALETrainConfig, TrainConfig, with_loss
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


def test_method_losses_come_from_entry_points_not_from_the_trainer():
    """kalm and dpo are registered by their methods' packages (the kale_ray.losses entry points)."""
    from kale_ray.train import registry

    mods = registry.loss_modules()
    assert mods["kalm"] == "kale_ray.methods.kalm.losses" and mods["dpo"] == "kale_ray.methods.knowtuning.dpo"
    assert {"sft", "kale", "kalm", "dpo"} <= set(list_losses())
    src = open(registry.__file__).read()
    assert "kale_ray.methods" not in src.split("Pure torch")[1]  # the trainer's registry names no method


def test_a_plug_in_package_registers_its_loss_by_entry_point(tmp_path, monkeypatch):
    """A package installed beside kale-ray adds a loss through its own entry point."""
    import sys

    (tmp_path / "my_loss_pkg.py").write_text(
        "import torch\nfrom kale_ray.train.registry import register_loss\n"
        "@register_loss('plugin_loss', collator_factory=lambda tok, cfg: None)\n"
        "def compute(model, batch, cfg, dist):\n    'A plug-in loss.'\n    return torch.tensor(0.0), {}\n")
    dist = tmp_path / "my_loss_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-loss-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kale_ray.losses]\nplugin_loss = my_loss_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_loss_pkg", raising=False)
    assert get_loss("plugin_loss").description == "A plug-in loss."
    (dist / "entry_points.txt").write_text("[kale_ray.losses]\nbroken = no_such_module_xyz\n")
    with pytest.raises(ImportError, match="loss plug-in 'broken'.*no_such_module_xyz"):
        list_losses()


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
    cfg = with_loss(TrainConfig(max_seq_len=64), name)
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
    cfg = KALETrainConfig(max_seq_len=64)
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


def test_kalm_compute_golden():
    """The registered ``kalm`` loss on hand-made embeddings and LM logits, against values worked out by hand.

    q = [1,0], [0,1]; k = [1,0], [0.6,0.8] (already unit); tau = 0.5, margin = 0.1, so
    S = (q k^T - 0.1 I) / 0.5 = [[1.8, 1.2], [0, 1.4]]; symmetric InfoNCE =
    ((CE(S)_rows + CE(S^T)_rows) / 2) = 0.352255460078. LM: per-token CE ln2, ln(4/3) (row 0) and
    ln2 (row 1), the mean per row summed = (ln2 + ln(4/3)) / 2 + ln2 = 1.183561807066.
    Each term is divided by the global count of triples; lm_weight = 0.5.
    """
    import math
    from types import SimpleNamespace

    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # id -> hidden state

    class Fake:
        def __call__(self, input_ids, attention_mask, output=None, labels=None):
            if output == "hidden":
                return table[input_ids]  # (2B, T, H)
            logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])  # (N, V)
            return logits, torch.tensor([0, 0, 1])

    one = torch.ones(2, 1, dtype=torch.long)
    batch = {"query_input_ids": torch.tensor([[1], [2]]), "query_attention_mask": one,
             "key_input_ids": torch.tensor([[3], [4]]), "key_attention_mask": one,
             "tail_ids": torch.tensor([0, 1]), "known_tails": torch.tensor([[-1], [-1]]),
             "input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, 6], [-100, -100, 7]])}
    kalm = SimpleNamespace(tau=0.5, margin=0.1, lm_weight=0.5, symmetric=True, mask_false_negatives=True,
                           gather_negatives=False)
    compute = get_loss("kalm").compute
    exp, lm = 0.3522554600780007, 1.1835618070658085
    loss, m = compute(Fake(), batch, SimpleNamespace(kalm=kalm), StepContext())
    assert float(m["exp"]) == pytest.approx(exp * 2 / 2, abs=1e-6)
    assert float(m["lm"]) == pytest.approx(lm / 2, abs=1e-6)
    assert float(loss) == pytest.approx(exp + 0.5 * lm / 2, abs=1e-6)
    # another shard's triples in the step: every term is this batch's share of the global mean
    loss4, m4 = compute(Fake(), batch, SimpleNamespace(kalm=kalm), StepContext(global_count=4))
    assert float(loss4) == pytest.approx((exp * 2 + 0.5 * lm) / 4, abs=1e-6)
    # lm_weight 0: the contrastive term alone, no LM forward pass
    only = SimpleNamespace(**{**vars(kalm), "lm_weight": 0.0})
    loss0, m0 = compute(Fake(), batch, SimpleNamespace(kalm=only), StepContext())
    assert float(loss0) == pytest.approx(exp, abs=1e-6) and "lm" not in m0


# =========================================================================== meta


def _unit_test_names() -> set[str]:
    import ast
    from pathlib import Path

    names = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        names |= {n.name for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


def _has_golden_test(loss: str, names: set[str]) -> bool:
    key = f"_{loss.replace('-', '_')}_"
    return any(key in f"_{n}_" and "golden" in n for n in names)


def test_every_loss_the_trainer_can_train_has_a_golden_value_test():
    """The trainer's real registry (``get_loss`` / ``list_losses``) and KARD's reranker losses: each needs
    a test named after it with ``golden`` in the name (a hand-computed value), in any tests/unit file."""
    from typing import get_type_hints

    from kale_ray.methods.kard import losses as kard_losses
    from kale_ray.methods.kard.config import RerankerConfig

    names = _unit_test_names()
    registered = [n for n in list_losses() if get_loss(n).compute.__module__.startswith("kale_ray.")]
    assert {"sft", "kale", "kalm", "dpo"} <= set(registered), registered
    missing = [n for n in registered if not _has_golden_test(n, names)]
    # KARD trains its reranker with rerank_<kind>_loss, kind = RerankerConfig.loss
    kinds = get_type_hints(RerankerConfig)["loss"].__args__
    for kind in kinds:
        assert callable(getattr(kard_losses, f"rerank_{kind}_loss", None)), kind
    missing += [f"rerank_{k}" for k in kinds if not _has_golden_test(f"rerank_{k}", names)]
    assert not missing, f"losses without a golden-value test named after them: {missing}"


def test_the_golden_test_check_would_catch_a_missing_test():
    names = {"test_sft_loss_golden", "test_kalm_is_registered", "test_dpo_compute_golden_values"}
    assert _has_golden_test("sft", names) and _has_golden_test("dpo", names)
    assert not _has_golden_test("kalm", names) and not _has_golden_test("kale", names)
