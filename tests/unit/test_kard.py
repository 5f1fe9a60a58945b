"""KARD's pure core: corpus parsing, BM25, verifier, prompts/vote, data steps, reranker losses and max-sim."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kale_ray.core.qa import QAExample
from kale_ray.core.rejects import Rejects
from kale_ray.methods.kard import data as kd
from kale_ray.methods.kard.kb import CorpusFormatError, build_kb, hpo_passages, kg_passages, read_corpus_jsonl
from kale_ray.methods.kard.losses import maxsim, maxsim_paired, rerank_ce_loss, rerank_kl_loss
from kale_ray.methods.kard.prompts import majority_vote, parse_student_answer, student_completion, student_messages
from kale_ray.methods.kard.retrieval import BM25Index
from kale_ray.methods.kard.verify import verify_by_scores, verify_rationale

CHOICES = ["plant", "fungus", "animal", "virus"]


# --------------------------------------------------------------------------- corpus + KB


def _write(tmp_path, lines):
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_corpus_reads_ids_titles_and_default_ids(tmp_path):
    p = _write(tmp_path, [json.dumps({"id": "a", "title": "Alga", "text": "alga  is a\tplant"}), "",
                          json.dumps({"text": "no id here"})])
    ps = list(read_corpus_jsonl(p))
    assert [x.id for x in ps] == ["a", "corpus:3"]
    assert ps[0].text == "alga is a plant" and ps[0].full_text == "Alga: alga is a plant"


@pytest.mark.parametrize("line,reason,msg", [
    ("{not json", "bad_json", "not valid JSON"),
    ('["a list"]', "not_an_object", "expected a JSON object"),
    ('{"title": "t"}', "missing_text", "'text'"),
    ('{"text": "   "}', "missing_text", "'text'"),
    ('{"text": "x", "title": 3}', "bad_title", "'title'"),
])
def test_corpus_bad_line_names_file_and_line(tmp_path, line, reason, msg):
    p = _write(tmp_path, [json.dumps({"text": "fine"}), line])
    with pytest.raises(CorpusFormatError, match=rf"corpus.jsonl:2: .*{msg}"):
        list(read_corpus_jsonl(p))
    rejects = Rejects()
    ps = list(read_corpus_jsonl(p, rejects, on_error="skip"))
    assert len(ps) == 1 and rejects.counts() == {reason: 1}
    assert rejects.rows[0]["line"] == 2 and rejects.rows[0]["file"] == str(p)


def test_corpus_duplicate_id_rejected(tmp_path):
    p = _write(tmp_path, [json.dumps({"id": "x", "text": "a"}), json.dumps({"id": "x", "text": "b"})])
    with pytest.raises(CorpusFormatError, match="corpus.jsonl:2: passage id 'x' appears twice"):
        list(read_corpus_jsonl(p))


def test_hpo_passages_real_obo():
    ps = list(hpo_passages(max_terms=50))
    assert len(ps) == 50 and len({p.id for p in ps}) == 50
    assert all(p.id.startswith("HP:") and p.title and p.text for p in ps)
    assert any("Synonyms:" in p.text for p in ps)


def test_kg_passages_cover_every_entity(umls_kg):
    ps = list(kg_passages(umls_kg, facts_per_passage=5))
    titles = {p.title for p in ps}
    assert all(umls_kg.entity_name(e) in titles for e in range(umls_kg.num_entities))
    assert max(p.text.count(".") for p in ps) <= 5 + 5  # <= 5 facts (names may hold dots: allow some)


def test_build_kb_cuts_long_passages_and_counts(tmp_path, umls_kg):
    p = _write(tmp_path, [json.dumps({"id": "long", "text": " ".join(["word"] * 50)}), "{bad"])
    rejects = Rejects()
    ps, info = build_kb([str(p), "builtin:kg"], umls_kg, rejects, on_error="skip", max_passage_words=10)
    assert info["per_source"][str(p)] == 1 and info["cut_to_max_words"] >= 1
    assert ps[0].text.endswith("...") and len(ps[0].text.split()) == 11
    assert rejects.counts() == {"bad_json": 1}
    with pytest.raises(ValueError, match="unknown builtin KB source"):
        build_kb(["builtin:nope"], umls_kg, Rejects())


# --------------------------------------------------------------------------- BM25


def test_bm25_returns_passage_with_rare_term(tmp_path):
    texts = ["the cell is a unit of life", "the cell membrane holds the cell",
             "zygomycota is a rare fungal division", "a plant makes food from light", "the cell divides"]
    idx = BM25Index.build([f"p{i}" for i in range(len(texts))], texts)
    i, s = idx.search(["which cell division is zygomycota"], k=2)
    assert i[0][0] == 2 and s[0][0] > s[0][1]
    idx.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert again.ids == idx.ids and again.search(["zygomycota"], k=1)[0][0][0] == 2
    # targets for the reranker: the passage naming the rare word scores highest; unknown words score 0
    sc = again.score("zygomycota fungal", [0, 2, 3])
    assert sc[1] > 0 and sc[0] == 0 and sc[2] == 0
    assert again.score("qqqq", [0, 1]).tolist() == [0.0, 0.0]


def test_bm25_k_capped_and_deterministic():
    idx = BM25Index.build(["a", "b"], ["red apple", "green apple"])
    i, s = idx.search(["apple"], k=10)
    assert i.shape == (1, 2) and list(i[0]) == [0, 1]  # equal scores: by index


# --------------------------------------------------------------------------- verifier


def test_verifier_rejects_rationale_pointing_to_wrong_answer():
    ok, reason = verify_rationale("Alga is a fungus, clearly. So the answer is fungus.", ["plant"], CHOICES)
    assert (ok, reason) == (False, "contradicts_gold")
    scores = {"plant": -3.0, "fungus": -0.5, "animal": -4.0, "virus": -5.0}
    ok, reason = verify_rationale("Alga grows in water and is green.", ["plant"], CHOICES, scores)
    assert (ok, reason) == (False, "verifier_wrong_answer")


def test_verifier_keeps_rationale_leading_to_gold():
    scores = {"plant": -0.2, "fungus": -2.0, "animal": -4.0, "virus": -5.0}
    assert verify_rationale("Alga makes food from light. So the answer is plant.", ["plant"], CHOICES, scores) == (True, "")
    assert verify_by_scores({"plant": -1.0, "fungus": -1.0}, ["plant"]) == (False, "verifier_tie")
    assert verify_by_scores({"fungus": -1.0}, ["plant"]) == (False, "gold_not_in_choices")
    assert verify_rationale("  ", ["plant"], CHOICES) == (False, "empty_generation")
    assert verify_rationale("Green things.", ["plant"], CHOICES, require_mention=True) == (False, "answer_not_mentioned")


def _q(**kw) -> QAExample:
    base = dict(id="q1", question="Which concept X satisfies: alga is a X?", answer="plant", choices=CHOICES,
                all_answers=["plant"], hops=[["alga", "isa", "plant"]], num_hops=1)
    base.update(kw)
    return QAExample(**base)


def test_select_rationales_reasons_dedup_and_fallback():
    good = {"plant": 0.0, "fungus": -3.0, "animal": -3.0, "virus": -3.0}
    gens = [
        {"sample": 0, "text": "It photosynthesises. So the answer is plant.", "error": "", "choice_scores": good, "teacher": "t"},
        {"sample": 1, "text": "It photosynthesises.  So the answer is plant.", "error": "", "choice_scores": good, "teacher": "t"},
        {"sample": 2, "text": "So the answer is virus.", "error": "", "choice_scores": good, "teacher": "t"},
        {"sample": 3, "text": "", "error": "boom", "reason": "generation_failed", "teacher": "t"},
    ]
    kept, rej = kd.select_rationales(_q(), gens, fallback="Alga is a plant. So the answer is plant.")
    assert [k["sample"] for k in kept] == [0]
    assert sorted(r["reason"] for r in rej) == ["contradicts_gold", "duplicate_rationale", "generation_failed"]
    kept, rej = kd.select_rationales(_q(), gens[2:], fallback="Alga is a plant. So the answer is plant.")
    assert kept == [{"qid": "q1", "sample": -1, "rationale": "Alga is a plant. So the answer is plant.",
                     "teacher": kd.TEMPLATE_FALLBACK}] and len(rej) == 2
    assert kd.select_rationales(_q(), gens[2:], fallback=None)[0] == []


def test_chain_rationale_uses_kg_text(umls_kg):
    h, r, t = umls_kg.triples[0].tolist()
    q = _q(hops=[[umls_kg.entities[h], umls_kg.relations[r], umls_kg.entities[t]]], answer=umls_kg.entity_name(t))
    text = kd.chain_rationale(q, umls_kg)
    assert umls_kg.entity_name(h) in text.lower() and text.endswith(f"So the answer is {umls_kg.entity_name(t)}.")
    assert kd.chain_rationale(_q(hops=[["nope", "isa", "plant"]]), umls_kg) is None
    assert kd.chain_rationale(_q(hops=[]), umls_kg) is None


# --------------------------------------------------------------------------- prompts, vote, rows


def test_student_format_and_parse():
    msgs = student_messages("Q?", CHOICES, ["alga: alga is a plant."])
    assert msgs[1]["content"].startswith("Question: Q?\nChoices: plant; fungus") and "\nKnowledge: alga: alga" in msgs[1]["content"]
    assert "Knowledge" not in student_messages("Q?", CHOICES)[1]["content"]
    comp = student_completion("Alga is green.", "plant", "</s>")
    assert comp == "Explanation: Alga is green.\nAnswer: plant</s>"
    assert parse_student_answer(comp.replace("</s>", ""), CHOICES) == "plant"
    assert parse_student_answer("Explanation: hmm. So the answer is virus.", CHOICES) == "virus"
    assert parse_student_answer("Answer: banana", CHOICES) is None


def test_majority_vote():
    assert majority_vote(["plant", "virus", "virus", None]) == ("virus", 0.5)
    assert majority_vote(["plant", "virus"]) == ("plant", 0.5)  # tie: first to reach the top count
    assert majority_vote([None, None]) == (None, 0.0)


def test_candidates_best_and_hits():
    assert kd.merge_candidates([3, 1, 2], [2, 5, 3], limit=0) == [3, 1, 2, 5]
    assert kd.best_by_target([7, 8, 9], [0.5, 2.0, 2.0]) == 8
    assert kd.best_by_target([7, 8], [0.0, 0.0]) is None
    assert kd.hit_at_k(8, [9, 8, 7], 1) is False and kd.hit_at_k(8, [9, 8, 7], 2) is True


def test_student_row_renders_prompt_and_completion():
    row = kd.student_row("q1#0", _q(), "Alga is green.", ["K1"], lambda m: "|".join(x["content"] for x in m), "<e>", "t")
    assert "Knowledge: K1" in row["prompt"] and row["completion"].endswith("Answer: plant<e>")
    assert row["with_knowledge"] is True and row["qid"] == "q1"


# --------------------------------------------------------------------------- losses


def test_maxsim_hand_made_embeddings():
    # query tokens e1, e2; passage A has e1 and (e1+e2)/sqrt2, passage B has -e1 and a pad token equal to e2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    q = torch.stack([e1, e2])[None]  # (1, 2, 2)
    qm = torch.ones(1, 2, dtype=torch.long)
    p = torch.stack([torch.stack([e1, (e1 + e2) / math.sqrt(2)]), torch.stack([-e1, e2])])  # (2, 2, 2)
    pm = torch.tensor([[1, 1], [1, 0]])
    s = maxsim(q, qm, p, pm)  # (1, 2)
    # A: max(e1.e1, e1.u)=1 + max(e2.e1, e2.u)=1/sqrt2 ; B: only -e1 counts: -1 + 0 = -1
    assert torch.allclose(s, torch.tensor([[1 + 1 / math.sqrt(2), -1.0]]))
    # a padded query token contributes nothing
    s2 = maxsim(q, torch.tensor([[1, 0]]), p, pm)
    assert torch.allclose(s2, torch.tensor([[1.0, -1.0]]))
    paired = maxsim_paired(q, qm, p[None], pm[None])
    assert torch.allclose(paired, s)


def test_rerank_kl_golden_value():
    # targets [0, ln 3] at t1=1 -> p = [1/4, 3/4]; scores [0, 0] -> q = [1/2, 1/2]
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812...
    scores = torch.zeros(1, 2)
    targets = torch.tensor([[0.0, math.log(3.0)]])
    mask = torch.ones(1, 2, dtype=torch.long)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert rerank_kl_loss(scores, targets, mask).item() == pytest.approx(want, abs=1e-6)
    # a padded third candidate changes nothing, whatever its values
    s3, t3 = torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([[0.0, math.log(3.0), 9.0]])
    assert rerank_kl_loss(s3, t3, torch.tensor([[1, 1, 0]])).item() == pytest.approx(want, abs=1e-6)


def test_rerank_kl_properties_and_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 6) * 3
    m = torch.ones(4, 6, dtype=torch.long)
    assert rerank_kl_loss(t, t, m).item() == pytest.approx(0.0, abs=1e-6)  # KL(p||p) = 0
    assert rerank_kl_loss(s, t, m).item() > 0
    # t1 -> large: the target becomes uniform; then KL vanishes for uniform scores
    assert rerank_kl_loss(torch.zeros(4, 6), t, m, t1=1e6).item() == pytest.approx(0.0, abs=1e-6)
    # scores/t2 with t2 = 2 equals halving the scores
    assert rerank_kl_loss(s, t, m, t2=2.0).item() == pytest.approx(rerank_kl_loss(s / 2, t, m).item(), rel=1e-6)
    # a sharper target (t1 smaller) vs the same scores: different loss, both >= 0
    sharp, soft = rerank_kl_loss(s, t, m, t1=0.1).item(), rerank_kl_loss(s, t, m, t1=10.0).item()
    assert sharp >= 0 and soft >= 0 and sharp != pytest.approx(soft)
    # a row without candidates does not count in the mean
    m2 = m.clone()
    m2[3] = 0
    assert rerank_kl_loss(s, t, m2).item() == pytest.approx(rerank_kl_loss(s[:3], t[:3], m[:3]).item(), rel=1e-6)
    assert rerank_kl_loss(s, t, torch.zeros_like(m)).item() == 0.0


def test_rerank_ce_golden_and_gradient():
    scores = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    targets = torch.tensor([[5.0, 1.0]])  # argmax = candidate 0; q0 = 1/4 -> CE = ln 4
    loss = rerank_ce_loss(scores, targets, torch.ones(1, 2, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(4.0), abs=1e-6)
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # pushes the target candidate up
    # t2 = 2 halves the logits: q0 = 1/(1+sqrt3)
    l2 = rerank_ce_loss(scores.detach(), targets, torch.ones(1, 2, dtype=torch.long), t2=2.0)
    assert l2.item() == pytest.approx(math.log(1 + math.sqrt(3.0)), abs=1e-6)


class _CharTok:
    """A stub tokenizer: one id per character (ids 1..), pad 0."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 40) for c in text]}


def test_choice_logprobs_cached_equals_full_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kale_ray.methods.kard.scoring import choice_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16)).eval()
    tok = _CharTok()
    prompt, conts = "question: which? explanation: so", [" plant", " fungus kingdom", " ab"]
    got = choice_logprobs(model, tok, prompt, conts, length_normalise=False)
    want = []
    for c in conts:
        p, ci = tok(prompt)["input_ids"], tok(c)["input_ids"]
        ids = torch.tensor([p + ci])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want.append(sum(float(lp[len(p) + t - 1, ci[t]]) for t in range(len(ci))))
    assert got == pytest.approx(want, abs=1e-4)
    normed = choice_logprobs(model, tok, prompt, conts, length_normalise=True)
    assert normed == pytest.approx([w / len(tok(c)["input_ids"]) for w, c in zip(want, conts)], abs=1e-4)


def test_reranker_lora_save_load_roundtrip_and_collate(tmp_path):
    """A tiny random BERT with the MiniLM tokenizer: LoRA-merged save/load scores the same; collate pads K."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from kale_ray.config import LoRAConfig
    from kale_ray.methods.kard.config import RerankerConfig
    from kale_ray.methods.kard.rerank_train import collate
    from kale_ray.methods.kard.reranker import build_reranker, encode, load_reranker, rerank_scores, resolve_encoder, save_reranker

    tok = AutoTokenizer.from_pretrained(resolve_encoder("builtin:minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "enc", safe_serialization=True)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"])
    model = build_reranker(str(tmp_path / "enc"), num_layers=1, dim=8, lora=lora, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("proj.") for n in trainable)
    with torch.no_grad():  # make LoRA non-zero so that merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval()
    texts = ["alga is a plant", "a virus is not alive", "fungi are not plants"]
    q = encode(model, tok, ["is alga a plant?"], 16)[0]
    before = rerank_scores(q, encode(model, tok, texts, 16))
    assert q.shape[1] == 8 and torch.allclose(q.norm(dim=-1), torch.ones(q.shape[0]), atol=1e-5)
    save_reranker(model, tok, tmp_path / "rr", {"test": True})
    loaded, tok2, meta = load_reranker(tmp_path / "rr")
    after = rerank_scores(encode(loaded, tok2, ["is alga a plant?"], 16)[0], encode(loaded, tok2, texts, 16))
    assert meta["dim"] == 8 and torch.allclose(before, after, atol=1e-4)

    cfg = RerankerConfig(max_query_len=8, max_passage_len=6)
    rows = [{"query": "q one", "passages": ["a b", "c"], "targets": [1.0, 2.0]},
            {"query": "q two", "passages": ["d"], "targets": [3.0]}]
    qb, pb, targets, mask, k = collate(rows, tok, cfg)
    assert k == 2 and pb["input_ids"].shape[0] == 4 and pb["input_ids"].shape[1] <= 6
    assert mask.tolist() == [[1, 1], [1, 0]] and targets.tolist() == [[1.0, 2.0], [3.0, 0.0]]


def test_kard_config_file_and_validation():
    from pathlib import Path

    from kale_ray.config import ConfigError, load_config
    from kale_ray.methods.kard.config import KARDJobConfig

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(KARDJobConfig, root / "configs" / "kard_umls.yaml", ["teacher.num_rationales=3"])
    assert cfg.teacher.num_rationales == 3 and cfg.train.loss == "sft" and cfg.reranker.loss == "kl"
    for bad, msg in (("train.loss=kale", "train.loss"), ("reranker.t2=0", "reranker.t1 and reranker.t2"),
                     ("teacher.num_rationales=0", "teacher.num_rationales"), ("kb.sources=[]", "kb.sources"),
                     ("reranker.losss=kl", "did you mean 'reranker.loss'")):
        with pytest.raises(ConfigError, match=msg):
            load_config(KARDJobConfig, None, [bad])


def _scorer(monkeypatch, fn):
    import kale_ray.methods.kard.scoring as scoring

    monkeypatch.setattr(scoring, "choice_logprobs", fn)
    scorer = object.__new__(scoring.ChoiceScorer)  # no model load: the per-row handling alone
    scorer.model, scorer.tok, scorer.prefix, scorer.norm, scorer.max_len = None, None, "Answer: ", True, 64
    return scorer


def _batch():
    import numpy as np

    return {"prompt": np.array(["p1", "p2"], dtype=object),
            "choices": np.array([json.dumps(["a", "b"]), json.dumps(["c", "d"])], dtype=object)}


def test_choice_scorer_lets_an_unexpected_error_propagate(monkeypatch):
    """A verifier bug must fail the job, not turn every rationale into verifier_failed."""
    def bug(*a, **k):
        raise RuntimeError("a bug in the verifier")

    with pytest.raises(RuntimeError, match="a bug in the verifier"):
        _scorer(monkeypatch, bug)(_batch())


def test_choice_scorer_marks_a_row_that_cannot_be_scored(monkeypatch):
    from kale_ray.methods.kard.scoring import ScoringInputError

    def fn(model, tok, prompt, conts, norm, max_len):
        if prompt == "p2":
            raise ScoringInputError("no room for the prompt")
        return [-1.0] * len(conts)

    out = _scorer(monkeypatch, fn)(_batch())
    assert list(out["score_error"]) == ["", "ScoringInputError: no room for the prompt"]
    assert json.loads(out["choice_scores"][0]) == {"a": -1.0, "b": -1.0} and out["choice_scores"][1] == "{}"


def test_choice_logprobs_rejects_rows_it_cannot_score():
    from kale_ray.methods.kard.scoring import ScoringInputError, choice_logprobs

    tok = _CharTok()
    with pytest.raises(ScoringInputError, match="no choices"):
        choice_logprobs(None, tok, "p", [])
    with pytest.raises(ScoringInputError, match="no tokens"):
        choice_logprobs(None, tok, "p", ["a", ""])
    with pytest.raises(ScoringInputError, match="no room"):
        choice_logprobs(None, tok, "p", ["abcdef"], max_len=6)


# --------------------------------------------------------------------------- the recipe's stages


class _Stop(Exception):
    """Raised by a patched stage: the recipe goes no further (no Ray, no model)."""


def _questions_only(monkeypatch):
    """run_kard runs its real questions stage, then stops at the knowledge base; starting Ray fails the test."""
    import kale_ray.methods.kard.recipe as recipe
    import kale_ray.methods.kard.stages as stages
    import kale_ray.runtime.ray

    def stop(*a, **k):
        raise _Stop()

    def boom(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(stages, "stage_kb", stop)
    monkeypatch.setattr(kale_ray.runtime.ray, "init_ray", boom)
    return recipe.run_kard


def _snapshot(out):
    return {p: (out / p).read_bytes() for p in ("config.yaml", "qa/train.jsonl", "qa/test.jsonl", "stages/questions.json")}


def test_kard_rerun_with_other_settings_is_refused_or_recomputed(monkeypatch, tmp_path, capsys):
    from kale_ray import cli
    from kale_ray.config import load_config
    from kale_ray.methods.kard.config import KARDJobConfig
    from kale_ray.methods.kard.stages import train_config
    from kale_ray.runtime.stages import StaleOutputError

    run_kard = _questions_only(monkeypatch)
    out = tmp_path / "kard"
    base = [f"out={out}", "qa.num_questions=30", "eval.max_questions=4"]
    cfg = load_config(KARDJobConfig, None, base)
    assert cfg.on_change == "error" and train_config(cfg, "kard", out).on_change == cfg.train.on_change
    with pytest.raises(_Stop):
        run_kard(cfg, progress=lambda m: None)
    record = json.loads((out / "stages" / "questions.json").read_text())
    assert record["status"] == "complete" and record["result"]["test"] == 4
    before = _snapshot(out)

    # another seed: refused at the first stage, naming the key; nothing written
    with pytest.raises(StaleOutputError, match=r"qa\.seed: 0 -> 1.*on_change=overwrite"):
        run_kard(load_config(KARDJobConfig, None, base + ["qa.seed=1"]), progress=lambda m: None)
    assert _snapshot(out) == before
    # the CLI: exit 2, one line, nothing written
    assert cli.main(["kard", *base, "qa.seed=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kale-ray kard: ") and "qa.seed: 0 -> 1" in err, err
    assert _snapshot(out) == before

    # overwrite: the questions are made again with the new seed (and reach the trainer's own record)
    over = load_config(KARDJobConfig, None, base + ["qa.seed=1", "on_change=overwrite"])
    assert train_config(over, "kard", out).on_change == "overwrite"
    with pytest.raises(_Stop):
        run_kard(over, progress=lambda m: None)
    after = _snapshot(out)
    assert after["qa/train.jsonl"] != before["qa/train.jsonl"] and after["config.yaml"] != before["config.yaml"]
    assert json.loads(after["stages/questions.json"])["settings"]["settings"]["qa"]["seed"] == 1
    # the same settings again: the questions are reused, not remade
    said = []
    with pytest.raises(_Stop):
        run_kard(over, progress=said.append)
    assert any("questions: reusing" in m for m in said) and _snapshot(out)["qa/train.jsonl"] == after["qa/train.jsonl"]
