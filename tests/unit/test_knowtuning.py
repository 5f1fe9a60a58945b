"""KnowTuning: disturbed answers (delete / revise with the KG / shuffle), comparison pairs, the DPO loss."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kale_ray.config import ConfigError, TrainConfig, load_config
from kale_ray.methods.knowtuning.config import DPOTrainConfig
from kale_ray.core.losses import dpo_loss, select_positions, sequence_logprobs
from kale_ray.core.rejects import Rejects
from kale_ray.methods.knowtuning.corrupt import (
    NO_REVISABLE_FACT,
    NO_TRIPLE,
    TOO_FEW_FACTS,
    EntitySwapper,
    Fact,
    answer_text,
    comparison_pairs,
    delete_facts,
    fact_from_triple,
    revise_facts,
    shuffle_facts,
)
from kale_ray.methods.knowtuning.data import build_pairs, neighbourhood_qa, read_fact_qa_jsonl
from kale_ray.train.registry import StepContext, get_loss, list_losses


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def answers(umls_kg):
    """20 UMLS entities, each answered by 4 of its own triples (one sentence per fact)."""
    return neighbourhood_qa(umls_kg, 20, 4, rng(1))


@pytest.fixture(scope="module")
def swapper(umls_kg):
    return EntitySwapper(umls_kg)


# --------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("n,beta,removed",
                         [(2, 0.5, 1), (3, 0.5, 2), (4, 0.5, 2), (5, 0.2, 1), (4, 1.0, 3), (6, 0.1, 1)])
def test_delete_removes_a_share_of_the_facts_and_keeps_the_order(n, beta, removed):
    facts = [Fact(f"Fact {i}.") for i in range(n)]
    worse = delete_facts(facts, rng(n), beta)
    assert len(worse.facts) == n - removed and 1 <= len(worse.facts) < n
    assert [f for f in facts if f in worse.facts] == worse.facts  # a subsequence, order kept
    assert sorted(c["index"] for c in worse.changes) == [i for i, f in enumerate(facts) if f not in worse.facts]


def test_delete_and_shuffle_need_two_facts():
    with pytest.raises(ValueError, match=TOO_FEW_FACTS):
        delete_facts([Fact("Only.")], rng())
    with pytest.raises(ValueError, match=TOO_FEW_FACTS):
        shuffle_facts([Fact("Only.")], rng())
    with pytest.raises(ValueError, match="identical_facts"):
        shuffle_facts([Fact("Same."), Fact("Same.")], rng())


def test_revised_facts_are_not_kg_triples_and_only_the_recorded_facts_changed(umls_kg, answers, swapper):
    revised, stuck = 0, 0
    for qa in answers:
        facts = qa["facts"]
        assert all(umls_kg.has_named_triple(*f.triple) for f in facts)
        worse = revise_facts(facts, swapper, rng(7), beta=0.5)
        assert len(worse.facts) == len(facts)
        changed = {c["index"] for c in worse.changes}
        assert changed == {i for i, (a, b) in enumerate(zip(facts, worse.facts)) if a != b}
        # e.g. "event issue_in X": the relation's whole range is true of the entity -> nothing wrong to say
        stuck += sum(u["reason"] == "no_wrong_entity" for u in worse.unrevised)
        assert {u["reason"] for u in worse.unrevised} <= {"no_wrong_entity"}
        assert len(changed) == min(len(facts) - len(worse.unrevised), max(1, math.floor(0.5 * len(facts) + 0.5)))
        for c in worse.changes:
            new = worse.facts[c["index"]]
            h, r, t = new.triple
            assert tuple(c["new_triple"]) == new.triple and tuple(c["old_triple"]) == facts[c["index"]].triple
            assert not umls_kg.has_named_triple(h, r, t)  # the revised fact is wrong
            assert h != t and c["new_entity"] not in c["old_triple"]
            # the wrong entity has the relation's type: it is a tail (head) of the same relation elsewhere
            side = 2 if c["side"] == "tail" else 0
            ri = umls_kg.relation_index[r]
            seen = umls_kg.triples[umls_kg.triples[:, 1] == ri][:, side]
            assert umls_kg.entity_index[c["new_entity"]] in set(seen.tolist())
            assert umls_kg.entity_name(c["new_entity"]).lower() in new.text.lower()
            assert new.text == c["new_text"] != c["old_text"]
            revised += 1
    assert revised > len(answers) and stuck < revised / 2  # UMLS: 1081 of 6529 triples have no wrong entity


def test_revise_one_fact_with_a_small_beta(umls_kg, answers, swapper):
    facts = answers[0]["facts"]
    worse = revise_facts(facts, swapper, rng(3), beta=0.1)
    (change,) = worse.changes
    i = change["index"]
    assert worse.facts[:i] + worse.facts[i + 1:] == facts[:i] + facts[i + 1:]
    assert worse.facts[i] != facts[i] and not umls_kg.has_named_triple(*worse.facts[i].triple)


def test_facts_without_a_triple_are_left_unrevised_for_an_llm(umls_kg, answers, swapper):
    free = [Fact("Reptiles are cold-blooded."), Fact("Many reptiles lay eggs.")]
    worse = revise_facts(free, swapper, rng())
    assert worse.changes == [] and worse.facts == free
    assert worse.unrevised == [{"index": 0, "reason": NO_TRIPLE}, {"index": 1, "reason": NO_TRIPLE}]
    mixed = free + answers[0]["facts"][:1]
    worse = revise_facts(mixed, swapper, rng())
    assert [c["index"] for c in worse.changes] == [2]
    assert [u["index"] for u in worse.unrevised] == [0, 1]
    rejects = Rejects()
    rows = comparison_pairs("What about reptiles?", free, swapper, rng(), id="q1", rejects=rejects)
    assert [r["kind"] for r in rows] == ["delete", "shuffle"]
    assert rejects.counts() == {NO_REVISABLE_FACT: 1}
    assert rejects.rows[0]["id"] == "q1" and len(rejects.rows[0]["unrevised"]) == 2


def test_shuffled_answers_hold_the_same_facts_in_another_order(answers):
    for qa in answers:
        facts = qa["facts"]
        worse = shuffle_facts(facts, rng(5))
        assert Counter(worse.facts) == Counter(facts)
        assert [f.text for f in worse.facts] != [f.text for f in facts]
        assert [facts[i] for i in worse.changes[0]["order"]] == worse.facts
    two = [Fact("A."), Fact("B.")]
    assert shuffle_facts(two, rng()).facts == [Fact("B."), Fact("A.")]


def test_comparison_pairs_rows_and_determinism(umls_kg, answers, swapper):
    qa = answers[2]
    rows = comparison_pairs(qa["question"], qa["facts"], swapper, rng(11), id=qa["id"], prompt="P")
    assert [r["kind"] for r in rows] == ["delete", "revise", "shuffle"]
    for r in rows:
        assert r["id"] == f"{qa['id']}:{r['kind']}" and r["prompt"] == "P" and r["question"] == qa["question"]
        assert r["chosen"] == answer_text(qa["facts"]) != r["rejected"]
        assert r["rejected"] == " ".join(f["text"] for f in r["rejected_facts"])
        json.dumps(r)  # JSON-ready
    again = comparison_pairs(qa["question"], qa["facts"], umls_kg, rng(11), id=qa["id"], prompt="P")
    assert again == rows  # same seed, same pairs (a KG or a prebuilt swapper alike)
    rejects = Rejects()
    pairs = [build_pairs(answers, umls_kg, seed=s, rejects=r) for s, r in ((0, rejects), (0, None), (1, None))]
    assert pairs[0] == pairs[1] and pairs[0] != pairs[2]
    assert len(pairs[0]) == 3 * len(answers) - rejects.total() and rejects.total() <= 1
    one = comparison_pairs("Q?", qa["facts"][:1], swapper, rng(), rejects=(rejects := Rejects()))
    assert [r["kind"] for r in one] == ["revise"] and rejects.counts() == {TOO_FEW_FACTS: 2}


def test_fact_text_and_users_fact_files(umls_kg, tmp_path):
    assert fact_from_triple(umls_kg, "reptile", "isa", "vertebrate").text == "Reptile is a vertebrate."
    assert fact_from_triple(umls_kg, "reptile", "interacts_with", "organism").text == "Reptile interacts with organism."
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "question": "Q?", "facts": ["One.", ["Two.", ["reptile", "isa", "vertebrate"]],
                                                          {"text": "Three."}]}),
        "{not json", json.dumps({"facts": ["x"]}), json.dumps({"question": "Q?", "facts": [["", None]]}),
    ]))
    rejects = Rejects()
    (qa,) = read_fact_qa_jsonl(path, rejects)
    assert qa["facts"] == [Fact("One."), Fact("Two.", ("reptile", "isa", "vertebrate")), Fact("Three.")]
    assert rejects.counts() == {"bad_json": 1, "missing_question": 1, "bad_facts": 1}


def test_job_config_file_loads_and_checks_the_loss():
    from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "knowtuning_dpo.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml")
    cfg = load_config(KnowTuningDPOJobConfig, path)
    assert (cfg.train.loss, cfg.train.dpo.beta, cfg.train.dpo.gamma, cfg.pairs.beta) == ("dpo", 0.1, 0.2, 0.5)
    assert cfg.train.dpo.reference == "precomputed"
    assert load_config(KnowTuningDPOJobConfig, None, ["train.lr=1e-4"]).train.dpo.reference == "precomputed"
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(KnowTuningDPOJobConfig, None, ["train.loss=sft"])
    with pytest.raises(ConfigError, match="pairs.kinds"):
        load_config(KnowTuningDPOJobConfig, None, ["pairs.kinds=[delete, paraphrase]"])


def test_stage2_and_the_dpo_job_share_one_dpo_stage_section(tmp_path):
    """The recipe's ``stage2`` and the Stage II job are one DPOStageConfig (same keys, ranges and loss
    check); the recipe's Stage II job gets every DPO-stage key of ``stage2``, the model replaced by Stage I's."""
    import dataclasses

    from kale_ray.methods.knowtuning.config import DPOStageConfig, KnowTuningDPOJobConfig, KnowTuningJobConfig
    from kale_ray.methods.knowtuning.recipe import dpo_config

    cfg = load_config(KnowTuningJobConfig, None, ["stage2.reference_batch_size=3", "stage2.reference_with=local",
                                                  "stage2.score_after=false", "stage2.train.lr=0.002", "stage2.beta=0.25"])
    job = dpo_config(cfg, tmp_path, "stage1-merged")
    shared = [f.name for f in dataclasses.fields(DPOStageConfig)]
    assert {"train", "reference_batch_size", "reference_with", "score_after"} <= set(shared)
    for name in shared:
        if name != "train":
            assert getattr(job, name) == getattr(cfg.stage2, name), name
    assert (job.reference_batch_size, job.reference_with, job.score_after) == (3, "local", False)
    assert job.train.lr == 0.002 and job.train.model.name == "stage1-merged" != cfg.stage2.train.model.name
    assert job.train is not cfg.stage2.train and (job.pairs.beta, job.out) == (0.25, str(tmp_path / "stage2"))
    for cls, key in ((KnowTuningJobConfig, "stage2."), (KnowTuningDPOJobConfig, "")):
        with pytest.raises(ConfigError, match=rf"^{key}reference_batch_size: must be >= 1"):
            load_config(cls, None, [f"{key}reference_batch_size=0"])
        with pytest.raises(ConfigError, match=rf"^{key}train\.loss: .*'dpo'"):
            load_config(cls, None, [f"{key}train.loss=sft"])


# --------------------------------------------------------------------------- DPO: golden values


class TableModel(torch.nn.Module):
    """A stand-in for AnswerLogits over a 2-token vocabulary: the token at ``t`` says ``p(label 0)`` at ``t+1``."""

    P = {1: 0.5, 2: 0.25, 3: 0.125, 4: 0.75}

    def forward(self, input_ids, attention_mask=None, labels=None):
        p = torch.tensor([self.P.get(int(i), 0.5) for i in input_ids.flatten()]).view(*input_ids.shape, 1)
        logits = torch.cat([p.log(), (1 - p).log()], dim=-1)  # (S, T, 2)
        return select_positions(logits, labels)


def golden_batch():
    """3 pairs; every answer token is id 0. Hand log-probs (sums over answer tokens):

    chosen   0: p 1/2, 1/2 -> 2 log 1/2   | rejected 0: p 1/4       -> 2 log 1/2
    chosen   1: p 3/4      -> log 3/4     | rejected 1: p 1/8       -> 3 log 1/2
    chosen   2: p 1/2      -> log 1/2     | rejected 2: p 1/4, 1/4  -> 4 log 1/2
    """
    x = -100
    input_ids = torch.tensor([[5, 1, 1, 0], [5, 4, 0, 0], [5, 1, 0, 0], [5, 2, 0, 0], [5, 3, 0, 0], [5, 2, 2, 0]])
    labels = torch.tensor([[x, x, 0, 0], [x, x, 0, x], [x, x, 0, x], [x, x, 0, x], [x, x, 0, x], [x, x, 0, 0]])
    log_half = math.log(0.5)
    pc = torch.tensor([2 * log_half, math.log(0.75), log_half], dtype=torch.float64)
    pr = torch.tensor([2 * log_half, 3 * log_half, 4 * log_half], dtype=torch.float64)
    return input_ids, labels, pc, pr


def dpo_cfg(**dpo) -> TrainConfig:
    cfg = DPOTrainConfig(loss="dpo", max_seq_len=96)
    for k, v in dpo.items():
        setattr(cfg.dpo, k, v)
    return cfg


def test_dpo_compute_golden_values():
    """Policy-minus-reference margins [0, 10, 20] with beta 0.1 give -log sigmoid([0, 1, 2])."""
    input_ids, labels, pc, pr = golden_batch()
    from kale_ray.methods.knowtuning.dpo import answer_logps

    # labels at positions 2(,3) are predicted by tokens at 1(,2): check the hand log-probs first
    sums, counts = answer_logps(TableModel(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                                "labels": labels})
    torch.testing.assert_close(sums.double(), torch.cat([pc, pr]), rtol=0, atol=1e-6)
    assert counts.tolist() == [2, 1, 1, 1, 1, 2]
    margins = torch.tensor([0.0, 10.0, 20.0], dtype=torch.float64)
    rc, rr = pc - margins, pr  # (pc - rc) - (pr - rr) = margins
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "ref_chosen_logps": rc.float(), "ref_rejected_logps": rr.float()}
    golden = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]  # 0.6931, 0.3133, 0.1269
    spec = get_loss("dpo")

    loss, m = spec.compute(TableModel(), batch, dpo_cfg(gamma=0.0, reference="precomputed"), StepContext())
    assert loss.item() == pytest.approx(sum(golden) / 3, abs=1e-5)
    expected, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert m["reward_margin"].item() == pytest.approx(1.0, abs=1e-5)  # beta * mean margin = 0.1 * 10
    assert m["reward_accuracy"].item() == pytest.approx(2 / 3)  # margin 0 is not a win
    assert m["chosen_reward"].item() == pytest.approx(cr.mean().item(), abs=1e-5)

    # gamma x SFT: mean token CE of each chosen answer = [log 2, -log 3/4, log 2]
    sft = (2 * math.log(2) - math.log(0.75)) / 3
    loss_g, m_g = spec.compute(TableModel(), batch, dpo_cfg(gamma=0.2, reference="precomputed"), StepContext())
    assert m_g["sft"].item() == pytest.approx(sft, abs=1e-6)
    assert loss_g.item() == pytest.approx(sum(golden) / 3 + 0.2 * sft, abs=1e-5)
    assert m_g["dpo"].item() == pytest.approx(loss.item(), abs=1e-6)

    # IPO on length-averaged log-probs: (margin_avg - 1 / (2 beta))^2
    n = counts.double()
    avg_m = (pc / n[:3] - rc / n[:3]) - (pr / n[3:] - rr / n[3:])
    loss_i, _ = spec.compute(TableModel(), batch, dpo_cfg(gamma=0.0, loss_type="ipo", reference="precomputed"),
                             StepContext())
    assert loss_i.item() == pytest.approx(((avg_m - 5.0) ** 2).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- DPO on the tiny model


PAIRS = [
    {"id": "p0", "prompt": "Question: what is a reptile?\nAnswer:", "chosen": " A vertebrate.<|im_end|>",
     "rejected": " A molecular sequence.<|im_end|>"},
    {"id": "p1", "prompt": "Question: what does a virus cause?\nAnswer:",
     "chosen": " Disease. It is an organism.<|im_end|>", "rejected": " Disease.<|im_end|>"},
    {"id": "p2", "prompt": "Q: alga?\nA:", "chosen": " Alga is a plant. Plants make food.<|im_end|>",
     "rejected": " Plants make food. Alga is a plant.<|im_end|>"},
    {"id": "p3", "prompt": "Q: enzyme?\nA:", "chosen": " Enzymes are proteins.<|im_end|>",
     "rejected": " Enzymes are lipids, made of sugar and fat.<|im_end|>"},
]


@pytest.fixture(scope="module")
def tiny():
    from kale_ray.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("builtin:tiny-llama")
    torch.manual_seed(0)
    return path, load_tokenizer(path), load_causal_lm(path).eval()


@pytest.fixture(scope="module")
def peft_lm(tiny):
    from peft import LoraConfig, get_peft_model

    _, _, lm = tiny
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # a non-zero adapter
    return get_peft_model(copy.deepcopy(lm), lora)


def test_dpo_is_registered_and_configured():
    assert "dpo" in list_losses()
    cfg = load_config(TrainConfig, None, ["loss=dpo", "dpo.loss_type=ipo", "dpo.gamma=0", "dpo.reference=precomputed"])
    assert (cfg.dpo.loss_type, cfg.dpo.gamma, cfg.dpo.beta, cfg.dpo.reference) == ("ipo", 0.0, 0.1, "precomputed")
    assert DPOTrainConfig().dpo.gamma == 0.2
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(TrainConfig, None, ["loss=dpo", "dpo.beta=0"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        load_config(TrainConfig, None, ["loss=dpo", "dpo.loss_type=hinge"])


def test_pair_collator_one_batch_of_chosen_then_rejected(tiny):
    from kale_ray.methods.knowtuning.dpo import PairCollator

    _, tok, _ = tiny
    collate = PairCollator(tok, max_seq_len=20)
    batch, kept = collate.collate(PAIRS)
    b = len(kept)
    assert batch["input_ids"].shape[0] == 2 * b and "ref_chosen_logps" not in batch
    for j, i in enumerate(kept):
        c_ids = tok(PAIRS[i]["chosen"], add_special_tokens=False)["input_ids"]
        r_ids = tok(PAIRS[i]["rejected"], add_special_tokens=False)["input_ids"]
        for row, ids in ((j, c_ids), (b + j, r_ids)):
            lab = batch["labels"][row]
            assert lab[lab != -100].tolist() == ids  # labels on the answer only
        ctx_c = batch["input_ids"][j][batch["labels"][j] == -100][: batch["attention_mask"][j].sum() - len(c_ids)]
        ctx_r = batch["input_ids"][b + j][: len(ctx_c)]
        assert torch.equal(ctx_c, ctx_r)  # both answers see the same (possibly cut) prompt
    bad = [{"id": "x", "prompt": "Q", "chosen": " a"}, {"id": "y", "prompt": "Q", "chosen": "", "rejected": " b"},
           {"id": "z", "prompt": "Q", "chosen": " a" * 40, "rejected": " b"}]
    assert collate(bad) is None
    assert collate.rejects.counts() == {"missing_field": 1, "empty_completion": 1, "completion_too_long": 1}
    with_ref = PairCollator(tok, 64, with_reference=True)
    batch = with_ref([{**PAIRS[0], "ref_chosen_logp": -3.0, "ref_rejected_logp": -4.5}, PAIRS[1],
                      {**PAIRS[2], "ref_chosen_logp": float("nan"), "ref_rejected_logp": -1.0}])
    assert batch["ref_chosen_logps"].tolist() == [-3.0] and batch["ref_rejected_logps"].tolist() == [-4.5]
    assert with_ref.rejects.counts() == {"missing_reference": 2}


def test_answer_logps_equal_sequence_logprobs_and_gamma_zero_is_pure_dpo(tiny):
    """The answer-position path gives sequence_logprobs of the full logits; gamma=0 is dpo_loss alone."""
    from kale_ray.methods.knowtuning.dpo import answer_logps
    from kale_ray.train.heads import AnswerLogits

    _, tok, lm = tiny
    spec = get_loss("dpo")
    cfg = dpo_cfg(gamma=0.0, reference="precomputed")
    batch = spec.collator_factory(tok, cfg)([{**p, "ref_chosen_logp": -60.0 - i, "ref_rejected_logp": -61.0}
                                             for i, p in enumerate(PAIRS)])
    model = AnswerLogits(lm)
    with torch.no_grad():
        sums, _ = answer_logps(model, batch)
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        seq = sequence_logprobs(full, batch["labels"])  # (2B,)
        torch.testing.assert_close(sums, seq, rtol=1e-5, atol=1e-4)
        loss, m = spec.compute(model, batch, cfg, StepContext())
        b = len(PAIRS)
        ref, _, _ = dpo_loss(seq[:b], seq[b:], batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=0.1)
        torch.testing.assert_close(loss, ref.mean(), rtol=1e-5, atol=1e-5)
        loss_g, m_g = spec.compute(model, batch, dpo_cfg(gamma=0.2, reference="precomputed"), StepContext())
        torch.testing.assert_close(loss_g - loss, 0.2 * m_g["sft"], rtol=1e-5, atol=1e-6)
        assert m_g["sft"] > 0


def test_adapter_disabled_reference_is_the_base_model(tiny, peft_lm):
    from kale_ray.methods.knowtuning.dpo import answer_logps, reference_logps
    from kale_ray.train.heads import AnswerLogits

    _, tok, lm = tiny
    cfg = dpo_cfg()
    batch = get_loss("dpo").collator_factory(tok, cfg)(PAIRS)
    with torch.no_grad():
        ref = reference_logps(AnswerLogits(peft_lm), batch, cfg)
        base, _ = answer_logps(AnswerLogits(lm), batch)
        policy, _ = answer_logps(AnswerLogits(peft_lm), batch)
    torch.testing.assert_close(ref, base, rtol=1e-5, atol=1e-4)
    assert (policy - base).abs().max() > 1e-3  # the adapter is on outside the context
    with pytest.raises(ValueError, match="needs LoRA"):
        reference_logps(AnswerLogits(lm), batch, cfg)


def test_precomputed_reference_pass_matches_the_base_model(tiny):
    from kale_ray.methods.knowtuning.dpo import REF_CHOSEN, REF_REJECTED, add_reference_logps, answer_logps
    from kale_ray.train.heads import AnswerLogits

    path, tok, lm = tiny
    cfg = dpo_cfg(reference="precomputed")
    rows = PAIRS + [{"id": "bad", "prompt": "Q", "chosen": "", "rejected": " b"}]
    scored, summary = add_reference_logps(rows, path, cfg, batch_size=3, mode="local")
    assert summary["rows"] == 5 and summary["scored"] == 4 and math.isnan(scored[-1][REF_CHOSEN])
    batch = get_loss("dpo").collator_factory(tok, cfg)(scored)  # the NaN row is rejected, the rest carry refs
    with torch.no_grad():
        base, _ = answer_logps(AnswerLogits(lm), batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], base[:4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch["ref_rejected_logps"], base[4:], rtol=1e-5, atol=1e-4)
    assert [r[REF_REJECTED] for r in scored[:4]] == pytest.approx(base[4:].tolist(), abs=1e-4)


@pytest.mark.parametrize("reference,loss_type", [("adapter_disabled", "sigmoid"), ("precomputed", "sigmoid"),
                                                 ("adapter_disabled", "ipo")])
def test_dpo_is_invariant_to_sharding(tiny, peft_lm, reference, loss_type):
    """Two fake ranks with half the pairs each and global_count = all pairs add up to the whole batch."""
    from kale_ray.train.heads import AnswerLogits

    _, tok, _ = tiny
    cfg = dpo_cfg(reference=reference, loss_type=loss_type)
    spec = get_loss("dpo")
    rows = [{**p, "ref_chosen_logp": -50.0 - i, "ref_rejected_logp": -55.0 + i} for i, p in enumerate(PAIRS)]
    collate = spec.collator_factory(tok, cfg)
    model = AnswerLogits(peft_lm)
    params = [p for p in peft_lm.parameters() if p.requires_grad]

    whole = collate(rows)
    loss, parts = spec.compute(model, whole, cfg, StepContext())
    g_whole = torch.autograd.grad(loss, params)

    shards = [collate(rows[:1]), collate(rows[1:])]
    count = sum(spec.count_fn(b) for b in shards)
    assert count == spec.count_fn(whole) == len(rows)
    outs = [spec.compute(model, b, cfg, StepContext(world_size=2, rank=r, global_count=count))
            for r, b in enumerate(shards)]
    total = sum(l for l, _ in outs)
    g_shards = torch.autograd.grad(total, params)
    torch.testing.assert_close(total, loss, rtol=1e-5, atol=1e-5)
    assert set(parts) == {"dpo", "sft", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"}
    for k in parts:
        torch.testing.assert_close(sum(p[k] for _, p in outs), parts[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_shards, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # padding changes matmul shapes
