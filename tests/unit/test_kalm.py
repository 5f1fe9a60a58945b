"""KaLM: rows and inverse relations, the false-negative mask, the loss's properties, filtered ranking.

Fast: hand-made tensors, the builtin UMLS triples and the tiny random Llama (no Ray, no vLLM).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kale_ray.config import ConfigError, TrainConfig, load_config
from kale_ray.core.kg import KnowledgeGraph
from kale_ray.core.losses import info_nce
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kalm.config import KaLMJobConfig, KaLMTrainConfig
from kale_ray.methods.kalm.data import (
    FALSE,
    TRUE,
    KGText,
    completion_messages,
    kgqa_items,
    split_kg,
    tails_by_query,
    training_rows,
    with_inverse,
)
from kale_ray.methods.kalm.evaluate import completion_queries, embedding_ranks, filtered_ranks, ranking_metrics
from kale_ray.methods.kalm.losses import (
    KaLMCollator,
    exp_loss_sum,
    false_negative_mask,
    global_batch_share,
    last_token_pool,
)
from kale_ray.train.registry import StepContext, get_loss, list_losses

TOY = [("aspirin", "treats", "headache"), ("aspirin", "treats", "fever"), ("ibuprofen", "treats", "headache"),
       ("fever", "symptom_of", "flu"), ("aspirin", "symptom_of", "fever")]


def toy_kg() -> KnowledgeGraph:
    return KnowledgeGraph.from_named_triples(TOY, source="toy")


def render(messages) -> str:
    return "USER: " + messages[-1]["content"] + "\nASSISTANT:"


@pytest.fixture(scope="module")
def tiny():
    from kale_ray.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("builtin:tiny-llama")
    torch.manual_seed(0)
    return load_tokenizer(path), load_causal_lm(path).eval()


# =========================================================================== data


def test_rows_include_inverse_relations_with_their_own_text():
    kg = toy_kg()  # entities: aspirin 0, headache 1, fever 2, ibuprofen 3, flu 4; relations: treats 0, symptom_of 1
    text = KGText.from_kg(kg, "prefix")
    assert text.relations == ["treats", "symptom of", "inverse of treats", "inverse of symptom of"]
    assert KGText.from_kg(kg, "suffix").relations[2:] == ["treats (reverse)", "symptom of (reverse)"]
    rows = training_rows(kg.triples, text, render, "<eos>")
    assert len(rows) == 2 * len(TOY)
    fwd, inv = rows[0], rows[len(TOY)]
    assert (fwd["id"], fwd["head"], fwd["relation"], fwd["tail"]) == ("t0", 0, 0, 1)
    assert (inv["id"], inv["head"], inv["relation"], inv["tail"]) == ("t0~inv", 1, 2, 0)
    assert fwd["query_text"] == "[ aspirin, treats ]" and fwd["key_text"] == "{ headache }"
    assert inv["query_text"] == "[ headache, inverse of treats ]" and inv["key_text"] == "{ aspirin }"
    assert inv["completion"] == "aspirin<eos>"
    assert inv["prompt"] == render(completion_messages("headache", "inverse of treats"))
    assert "write a tail entity that completes the triple" in fwd["prompt"]
    # known tails: aspirin treats {headache, fever}; inverse: headache is treated by {aspirin, ibuprofen}
    assert fwd["known_tails"] == [1, 2] and inv["known_tails"] == [0, 3]
    assert len(training_rows(kg.triples, text, render, "", add_inverse=False)) == len(TOY)


def test_with_inverse_and_tails_by_query():
    t = np.array([[0, 0, 1], [0, 0, 2], [3, 1, 0]])
    inv = with_inverse(t, num_relations=2)
    assert inv.tolist() == [[0, 0, 1], [0, 0, 2], [3, 1, 0], [1, 2, 0], [2, 2, 0], [0, 3, 3]]
    known = tails_by_query(inv)
    assert known[(0, 0)].tolist() == [1, 2] and known[(1, 2)].tolist() == [0]


def test_official_umls_split(umls_kg):
    split = split_kg(umls_kg, "official")
    assert (len(split.train), len(split.valid), len(split.test)) == (5216, 652, 661)
    assert len(split.all_true) == len(umls_kg.triples)
    random = split_kg(umls_kg, "random", test_fraction=0.1, seed=1)
    assert len(random.test) == len(random.valid) == round(0.1 * len(umls_kg.triples))
    assert sorted(map(tuple, random.all_true.tolist())) == sorted(map(tuple, umls_kg.triples.tolist()))


# =========================================================================== false negatives

BATCH = [(0, 0, 1), (0, 0, 2), (3, 0, 1), (4, 1, 5), (0, 1, 2)]
TRAIN = BATCH + [(6, 1, 5)]
# Off-diagonal pairs (query i, key j) that must be masked, worked out by hand:
#   row 0 = (0, 0), known tails {1, 2}: keys 1 (tail 2), 2 (tail 1), 4 (tail 2)
#   row 1 = (0, 0), known tails {1, 2}: keys 0 (tail 1), 2 (tail 1), 4 (tail 2)
#   row 2 = (3, 0), known tails {1}:    key 0 (tail 1)
#   row 3 = (4, 1), known tails {5}:    none (no other key is entity 5)
#   row 4 = (0, 1), known tails {2}:    key 1 (tail 2)    -- but not key 0: (0, 1, 1) is no triple
EXPECTED_MASKED = {(0, 1), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4), (2, 0), (4, 1)}


def _mask_pairs(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(i, j) for i, j in mask.nonzero().tolist() if i != j}


def test_false_negative_mask_removes_exactly_the_known_tails():
    known = tails_by_query(np.array(TRAIN))
    tails = torch.tensor([t for _, _, t in BATCH])
    width = max(len(known[(h, r)]) for h, r, _ in BATCH)
    known_t = torch.full((len(BATCH), width), -1)
    for i, (h, r, _) in enumerate(BATCH):
        known_t[i, : len(known[(h, r)])] = torch.from_numpy(known[(h, r)])
    mask = false_negative_mask(tails, known_t)
    assert _mask_pairs(mask) == EXPECTED_MASKED
    assert mask.diagonal().all()


def test_collated_rows_give_the_same_mask(tiny):
    """Through the real path: triples -> training rows -> collator -> mask."""
    tok, _ = tiny
    names = [f"entity {i}" for i in range(7)]
    kg = KnowledgeGraph(entities=names, relations=["r0", "r1"], triples=np.array(TRAIN))
    rows = training_rows(np.array(BATCH), KGText.from_kg(kg), render, tok.eos_token, add_inverse=False,
                         known_triples=np.array(TRAIN))
    batch = KaLMCollator(tok, max_seq_len=64, max_embed_len=32)(rows)
    assert _mask_pairs(false_negative_mask(batch["tail_ids"], batch["known_tails"])) == EXPECTED_MASKED


def test_masked_pairs_are_exactly_the_ones_left_out_of_the_loss():
    """info_nce with the mask == a loop over the kept pairs only (row i's and column j's denominators)."""
    torch.manual_seed(0)
    q, k = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in EXPECTED_MASKED:
        mask[i, j] = True
    tau, margin = 0.05, 0.02
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    s = (qn @ kn.T - margin * torch.eye(5, dtype=torch.float64)) / tau
    rows = [-s[i, i] + torch.logsumexp(torch.stack([s[i, j] for j in range(5) if (i, j) not in EXPECTED_MASKED]), 0)
            for i in range(5)]
    cols = [-s[j, j] + torch.logsumexp(torch.stack([s[i, j] for i in range(5) if (i, j) not in EXPECTED_MASKED]), 0)
            for j in range(5)]
    ref = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    torch.testing.assert_close(info_nce(q, k, tau=tau, margin=margin, false_negative_mask=mask), ref)
    unmasked = info_nce(q, k, tau=tau, margin=margin)
    assert float(unmasked) > float(ref)  # masking only ever removes terms from the denominators


# =========================================================================== loss


def test_last_token_pool_right_and_left_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert last_token_pool(hidden, right)[:, 0].tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left)[:, 0].tolist() == [3.0, 7.0]


def umls_rows(umls_kg, n: int, tok) -> list[dict]:
    from kale_ray.core.prompts import render_chat

    split = split_kg(umls_kg, "official")
    rows = training_rows(split.train[:n], KGText.from_kg(umls_kg), lambda m: render_chat(m, tok), tok.eos_token,
                         known_triples=split.train)
    return rows[: n // 2] + rows[n: n + n // 2]  # forward and inverse rows


def test_kalm_is_registered_and_the_loss_is_invariant_to_batch_order(tiny, umls_kg):
    tok, lm = tiny
    assert "kalm" in list_losses()
    from kale_ray.train.heads import AnswerLogits

    spec = get_loss("kalm")
    cfg = KaLMTrainConfig(loss="kalm", max_seq_len=96)
    cfg.kalm.lm_weight = 0.5  # make the LM term visible
    collate = spec.collator_factory(tok, cfg)
    model = AnswerLogits(lm)
    rows = umls_rows(umls_kg, 8, tok)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    loss, parts = spec.compute(model, collate(rows), cfg, StepContext())
    loss_p, parts_p = spec.compute(model, collate([rows[i] for i in perm]), cfg, StepContext())
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
    for key in ("exp", "lm", "pos_cos", "negatives"):
        assert float(parts_p[key]) == pytest.approx(float(parts[key]), rel=1e-5, abs=1e-6), key
    assert float(loss.detach()) == pytest.approx(float(parts["exp"]) + 0.5 * float(parts["lm"]), rel=1e-6)
    assert spec.count_fn(collate(rows)) == 8
    assert 0 < float(parts["negatives"]) <= 7


def test_lm_term_adds_up_over_shards(tiny, umls_kg):
    """L_LM with the global row count: two shards sum to the whole batch (L_exp is per micro-batch by design)."""
    tok, lm = tiny
    from kale_ray.train.heads import AnswerLogits

    spec = get_loss("kalm")
    cfg = KaLMTrainConfig(loss="kalm", max_seq_len=96)
    collate = spec.collator_factory(tok, cfg)
    rows = umls_rows(umls_kg, 6, tok)
    model = AnswerLogits(lm)
    _, whole = spec.compute(model, collate(rows), cfg, StepContext())
    shards = [spec.compute(model, collate(part), cfg, StepContext(world_size=2, rank=r, global_count=6))
              for r, part in enumerate((rows[:2], rows[2:]))]
    assert sum(float(p["lm"]) for _, p in shards) == pytest.approx(float(whole["lm"]), rel=1e-5)
    assert sum(float(p["pos_cos"]) for _, p in shards) == pytest.approx(float(whole["pos_cos"]), rel=1e-5)


def test_gathered_negatives_sharded_gradient_equals_the_full_batch():
    """gather_negatives on two fake workers: values add up to the full loss, gradients too."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4, dtype=torch.float64)
    xq, xk = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 3] = mask[3, 0] = True
    kw = dict(tau=0.05, margin=0.02, symmetric=True)

    full = exp_loss_sum(proj(xq), proj(xk), mask, **kw) / 6
    g_full = torch.autograd.grad(full, proj.weight)[0]
    with torch.no_grad():
        gq, gk = proj(xq), proj(xk)  # what all_gather returns (no gradient)
    total, grads = 0.0, torch.zeros_like(proj.weight)
    for rank, (lo, hi) in enumerate(((0, 2), (2, 6))):  # unequal shards
        share = global_batch_share(proj(xq[lo:hi]), proj(xk[lo:hi]), gq, gk, lo, 2, mask, global_count=6, **kw)
        total += float(share.detach())
        grads += torch.autograd.grad(share, proj.weight)[0]
    assert total == pytest.approx(float(full.detach()), rel=1e-10)
    torch.testing.assert_close(grads, g_full, rtol=1e-9, atol=1e-12)


def test_collator_rejects_and_truncates_with_reasons(tiny):
    tok, _ = tiny
    ok = {"id": "a", "tail": 1, "known_tails": [1], "query_text": "[ a, b ]", "key_text": "{ c }",
          "prompt": "Q:", "completion": " c" + tok.eos_token}
    long = dict(ok, id="b", completion=" x" * 50)
    missing = {k: v for k, v in ok.items() if k != "key_text"} | {"id": "c"}
    wide = dict(ok, id="d", query_text="[ " + "word " * 40 + "]")
    col = KaLMCollator(tok, max_seq_len=16, max_embed_len=8)
    batch = col([ok, long, missing, wide])
    assert batch["tail_ids"].tolist() == [1, 1] and batch["query_input_ids"].shape[1] == 8
    assert col.rejects.counts() == {"completion_too_long": 1, "missing_field": 1}
    assert col.stats["query_truncated"] == 1 and col.stats["rows_out"] == 2
    assert col([long]) is None


# =========================================================================== ranking


SCORES = torch.tensor([
    [0.9, 0.5, 0.7, 0.7, 0.1],
    [0.2, 0.8, 0.6, 0.9, 0.3],
    [0.4, 0.3, 0.2, 0.1, 0.0],
    [0.5, 0.6, 0.7, 0.8, 0.55],
], dtype=torch.float64)
GOLD = [2, 0, 0, 4]
FILTERED = [[0], [], [], [1, 3]]


def test_filtered_ranking_golden():
    """Hand-computed ranks (rank = 1 + #higher + #tied / 2, filtered entities and gold left out):

    q0: gold e2 = 0.7; e0 = 0.9 is higher but filtered; e3 = 0.7 ties -> 1 + 0 + 1/2 = 1.5
    q1: gold e0 = 0.2; e1, e2, e3, e4 (0.8, 0.6, 0.9, 0.3) are higher      -> 5
    q2: gold e0 = 0.4 is the highest                                       -> 1
    q3: gold e4 = 0.55; e1 = 0.6, e3 = 0.8 filtered; e2 = 0.7 higher       -> 2   (raw: 4)
    MR = (1.5 + 5 + 1 + 2) / 4 = 2.375
    MRR = (1/1.5 + 1/5 + 1 + 1/2) / 4 = (0.6666667 + 0.2 + 1 + 0.5) / 4 = 0.5916667
    Hits@1 = 1/4 (q2; 1.5 > 1), Hits@3 = 3/4 (q0, q2, q3), Hits@10 = 1.
    """
    gold_scores = SCORES[torch.arange(4), torch.tensor(GOLD)]
    ranks = filtered_ranks(lambda qs, es: SCORES[qs, es], gold_scores, GOLD, FILTERED, num_entities=5)
    assert ranks.tolist() == [1.5, 5.0, 1.0, 2.0]
    m = ranking_metrics(ranks)
    assert m["n"] == 4 and m["mr"] == pytest.approx(2.375)
    assert m["mrr"] == pytest.approx(0.5916667, abs=1e-7)
    assert (m["hits@1"], m["hits@3"], m["hits@10"]) == (0.25, 0.75, 1.0)
    raw = filtered_ranks(lambda qs, es: SCORES[qs, es], gold_scores, GOLD, [[]] * 4, num_entities=5)
    assert raw.tolist() == [2.5, 5.0, 1.0, 4.0]
    # any chunking gives the same ranks
    for qc, ec in ((1, 1), (3, 2), (2, 5)):
        assert filtered_ranks(lambda qs, es: SCORES[qs, es], gold_scores, GOLD, FILTERED, 5, qc, ec).tolist() == \
            ranks.tolist()


def test_chunked_ranking_equals_unchunked_and_a_full_matrix_reference():
    rng = np.random.default_rng(0)
    # Small integer vectors: exact float64 products, so ties are real ties in every chunking.
    q = torch.from_numpy(rng.integers(-2, 3, size=(37, 4)).astype(np.float64))
    e = torch.from_numpy(rng.integers(-2, 3, size=(53, 4)).astype(np.float64))
    gold = rng.integers(0, 53, size=37).tolist()
    filtered = [sorted(set(rng.integers(0, 53, size=rng.integers(0, 6)).tolist()) - {g}) for g in gold]
    whole = embedding_ranks(q, e, gold, filtered, query_chunk=10_000, entity_chunk=10_000, atol=0.0)
    chunked = embedding_ranks(q, e, gold, filtered, query_chunk=4, entity_chunk=7, atol=0.0)
    assert chunked.tolist() == whole.tolist()
    full = (q @ e.T).numpy()  # (37, 53): the reference only, never built by the evaluator
    for i, g in enumerate(gold):
        keep = np.ones(53, bool)
        keep[filtered[i]] = False
        keep[g] = False
        ref = 1 + (full[i, keep] > full[i, g]).sum() + 0.5 * (full[i, keep] == full[i, g]).sum()
        assert whole[i] == ref


def test_completion_queries_filter_other_true_answers_in_both_directions():
    kg = toy_kg()
    text = KGText.from_kg(kg)
    queries = completion_queries(np.array([[0, 0, 1]]), kg.triples, text)  # aspirin treats headache
    tail, head = queries
    assert (tail["text"], tail["gold"], tail["filtered"]) == ("[ aspirin, treats ]", 1, [2])  # fever too
    assert (head["text"], head["gold"], head["filtered"]) == ("[ headache, inverse of treats ]", 0, [3])


# =========================================================================== KGQA and config


def test_kgqa_items_have_exactly_one_correct_choice(umls_kg):
    split = split_kg(umls_kg, "official")
    text = KGText.from_kg(umls_kg)
    rejects = Rejects()
    items = kgqa_items(split.test, split.all_true, text, per_task=20, num_choices=4, rng=np.random.default_rng(0),
                       rejects=rejects)
    known = {tuple(t) for t in split.all_true.tolist()}
    ent_id = {name: i for i, name in enumerate(text.entities)}
    rel_id = {name: i for i, name in enumerate(text.relations)}
    by_task = {t: [x for x in items if x["task"] == t] for t in ("tail", "head", "relation", "triple", "tail_open")}
    # A triple whose (r, t) has more than 135 - 3 known heads cannot get 3 wrong heads: skipped, with its reason.
    skipped = {t: sum(1 for r in rejects.rows if r["task"] == t) for t in by_task}
    assert all(len(v) + skipped[t] == 20 for t, v in by_task.items()) and sum(skipped.values()) <= 2
    assert set(rejects.counts()) <= {"not_enough_distractors"}
    for it in by_task["tail"]:
        h, r, t = it["triple"]
        assert len(it["choices"]) == 4 and it["all_answers"] == [text.entities[t]]
        assert [c for c in it["choices"] if (h, r, ent_id[c]) in known] == [text.entities[t]]
        assert text.entities[h] not in it["choices"] or h == t  # an echo of the question names no choice
    for it in by_task["head"]:
        h, r, t = it["triple"]
        assert [c for c in it["choices"] if (ent_id[c], r, t) in known] == [text.entities[h]]
        assert text.entities[t] not in it["choices"] or h == t
    for it in by_task["relation"]:
        h, r, t = it["triple"]
        assert [c for c in it["choices"] if (h, rel_id[c], t) in known] == [text.relations[r]]
    labels = [it["all_answers"][0] for it in by_task["triple"]]
    assert labels.count(TRUE) == labels.count(FALSE) == 10
    for it in by_task["triple"]:
        assert (tuple(it["triple"]) in known) == (it["all_answers"] == [TRUE])
    for it in by_task["tail_open"]:  # the training instruction; any known tail of (h, r) is right
        h, r, t = it["triple"]
        assert it["choices"] == [] and it["messages"] == completion_messages(text.entities[h], text.relations[r])
        assert sorted(it["all_answers"]) == sorted(text.entities[x] for x in range(135) if (h, r, x) in known)
        assert it["chance"] == pytest.approx(len(it["all_answers"]) / 135)
    again = kgqa_items(split.test, split.all_true, text, 20, 4, np.random.default_rng(0))
    assert json.dumps(again) == json.dumps(items)  # seeded: before/after see the same questions


def test_job_config_defaults_and_validation():
    cfg = KaLMJobConfig()
    assert cfg.train.loss == "kalm" and cfg.train.lora.r == 8
    assert cfg.train.lora.target_modules == ["gate_proj", "up_proj", "down_proj"]
    assert (cfg.train.kalm.tau, cfg.train.kalm.margin, cfg.train.kalm.lm_weight) == (0.05, 0.02, 0.01)
    cfg = load_config(KaLMJobConfig, None, ["train.max_steps=3", "train.kalm.gather_negatives=true"])
    assert cfg.train.lora.target_modules == ["gate_proj", "up_proj", "down_proj"]  # section defaults kept
    assert cfg.train.max_steps == 3 and cfg.train.kalm.gather_negatives
    with pytest.raises(ConfigError, match="kalm.tau"):
        load_config(KaLMJobConfig, None, ["train.kalm.tau=0"])
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(KaLMJobConfig, None, ["train.loss=sft"])


def test_config_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "kalm_umls.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "kalm" in first
    cfg = load_config(KaLMJobConfig, path)
    assert cfg.train.model.name == "builtin:smollm2-135m" and cfg.train.zero_stage == 2


# =========================================================================== the recipe's stages


def _fake_heavy_stages(monkeypatch) -> list[tuple[str, str]]:
    """run_kalm with the real data stages and stand-ins for Ray, training and evaluation; returns their calls."""
    import types
    from pathlib import Path

    from kale_ray.core.io import read_jsonl, write_json, write_jsonl
    from kale_ray.methods.kalm import evaluate, recipe
    from kale_ray.train import trainer

    calls: list[tuple[str, str]] = []
    import kale_ray.runtime.ray

    monkeypatch.setattr(kale_ray.runtime.ray, "init_ray", lambda *a, **k: "no Ray")

    def fake_eval(model_path, split, text, test, cfg, model_cfg, out_dir, label, **kw):
        calls.append((f"eval_{label}", model_path))
        m = {"label": label, "kg_completion": {"both": {"n": 2 * len(test), "mrr": 0.5, "mr": 2.0},
                                               "num_entities": len(text.entities)},
             "kgqa_per_task": cfg.kgqa_per_task, "seconds": {"kg_completion": 0.0}}
        write_json(Path(out_dir) / "metrics.json", m)
        return m

    def fake_train(tcfg, run_name=None):
        calls.append(("train", tcfg.on_change))
        out = Path(tcfg.out_dir)
        (out / "merged").mkdir(parents=True, exist_ok=True)
        summary = {"steps": 1, "samples": len(read_jsonl(Path(tcfg.data) / "train.jsonl")), "wall_seconds": 0.1}
        write_json(out / "train_summary.json", summary)
        write_jsonl(out / "history.jsonl", [{"step": 1, "loss": 1.0}])
        return types.SimpleNamespace(summary=summary, history=read_jsonl(out / "history.jsonl"),
                                     merged_dir=str(out / "merged"))

    monkeypatch.setattr(evaluate, "evaluate_kalm", fake_eval)
    monkeypatch.setattr(trainer, "run_training", fake_train)
    return calls


def test_rerun_reuses_refuses_or_recomputes_stages(tmp_path, monkeypatch):
    from kale_ray.methods.kalm.recipe import run_kalm
    from kale_ray.runtime.stages import StaleOutputError

    calls = _fake_heavy_stages(monkeypatch)
    out = tmp_path / "kalm"
    base = [f"out={out}", "train.model.name=builtin:tiny-llama", "data.max_train_triples=8", "eval.max_test_triples=3"]
    job = lambda *extra: load_config(KaLMJobConfig, None, base + list(extra))  # noqa: E731
    quiet = {"progress": lambda _msg: None}
    stages = ["prepare", "test_triples", "eval_before", "train", "eval_after"]

    m = run_kalm(job(), **quiet)
    assert [c[0] for c in calls] == ["eval_before", "train", "eval_after"] and m["reused_stages"] == []
    assert calls[1] == ("train", "error") and calls[2] == ("eval_after", str(out / "train" / "merged"))
    assert m["data"]["training_rows"] == 16 and m["data"]["evaluated_test_triples"] == 3 and m["train"]["samples"] == 16
    assert len(np.loadtxt(out / "test_triples.tsv", ndmin=2)) == 3 and set(m["timings"]) >= set(stages)
    first_config = (out / "config.yaml").read_bytes()

    # Same settings: every stage reused, nothing run, the same results
    calls.clear()
    again = run_kalm(job(), **quiet)
    assert calls == [] and again["reused_stages"] == stages
    assert again["eval"] == m["eval"] and again["data"] == m["data"] and again["train"] == m["train"]

    # A changed setting of the first stage: refused naming the key; nothing on disk changes
    disk = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StaleOutputError, match=r"data\.max_train_triples: 8 -> 4"):
        run_kalm(job("data.max_train_triples=4"), **quiet)
    assert calls == [] and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == disk
    assert (out / "config.yaml").read_bytes() == first_config

    # An evaluation setting: refused as well; with overwrite only the evaluations run again (no retraining)
    with pytest.raises(StaleOutputError, match=r"eval\.kgqa_per_task: 50 -> 3"):
        run_kalm(job("eval.kgqa_per_task=3"), **quiet)
    m2 = run_kalm(job("eval.kgqa_per_task=3", "on_change=overwrite"), **quiet)
    assert [c[0] for c in calls] == ["eval_before", "eval_after"]
    assert m2["reused_stages"] == ["prepare", "test_triples", "train"] and m2["eval"]["after"]["kgqa_per_task"] == 3

    # overwrite with a changed first stage: it and every later stage run again (the trainer told to overwrite too)
    calls.clear()
    m3 = run_kalm(job("eval.kgqa_per_task=3", "data.max_train_triples=4", "on_change=overwrite"), **quiet)
    assert [c[0] for c in calls] == ["eval_before", "train", "eval_after"] and calls[1] == ("train", "overwrite")
    assert m3["reused_stages"] == [] and m3["data"]["training_rows"] == 8 and m3["train"]["samples"] == 8
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 8
    assert "max_train_triples: 4" in (out / "config.yaml").read_text()


def test_kgqa_goes_through_the_one_generation_path(umls_kg, monkeypatch):
    from kale_ray.config import GenerationConfig, ModelConfig
    from kale_ray.methods.kalm.evaluate import kgqa_summary, run_kgqa
    from kale_ray.models import resolve_model
    from kale_ray.runtime import generate as gen_mod

    split = split_kg(umls_kg, "official")
    items = kgqa_items(split.test, split.all_true, KGText.from_kg(umls_kg), 2, 4, np.random.default_rng(0))
    seen = {}

    def fake_generate(rows, model_path, gen, model_cfg, *, tokenizer=None, **kw):
        seen.update(n=len(rows), tokenizer=tokenizer is not None, budget=model_cfg.max_model_len - gen.max_tokens)
        out = {r["key"]: {"text": next(it for it in items if it["item_id"] == r["key"])["all_answers"][0],
                          "tokens": 3, "error": ""} for r in rows}
        out[rows[0]["key"]] = {"text": "", "tokens": 0, "error": "prompt_too_long: 600 tokens > 504"}
        out[rows[1]["key"]] = {"text": "", "tokens": 0, "error": "engine died"}
        return out

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    scored = run_kgqa(resolve_model("builtin:tiny-llama"), items, GenerationConfig(max_tokens=8),
                      ModelConfig(max_model_len=512))
    assert seen == {"n": len(items), "tokenizer": True, "budget": 504}
    assert [r["item_id"] for r in scored] == sorted(it["item_id"] for it in items)
    by_id = {r["item_id"]: r for r in scored}
    first, second = items[0]["item_id"], items[1]["item_id"]  # the rows go out in the items' order
    assert by_id[first]["skipped"] == "prompt_too_long: 600 tokens > 504" and not by_id[first]["correct"]
    assert by_id[second]["skipped"] == "generation_failed: engine died" and not by_id[second]["parsed"]
    rest = [r for r in scored if r["item_id"] not in (first, second)]
    assert rest and all(r["correct"] and r["parsed"] and r["skipped"] == "" for r in rest)
    assert kgqa_summary(scored)["all"]["n"] == len(items)
