"""Choice scoring by log-likelihood: the verifier's "which answer does this rationale lead to".

:func:`choice_logprobs` is a batched torch pass (no Ray); :class:`ChoiceScorer` is the Ray Data
callable class around it. A row carries ``prompt`` (chat-rendered, ending where the assistant
answers) and ``choices`` (JSON list); the output ``choice_scores`` is a JSON object
``{choice: mean (or summed) log-prob of "Answer: <choice>"}``, ``score_error`` names a failure.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def choice_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
                    length_normalise: bool = True, max_len: int = 1024) -> list[float]:
    """Log-prob of each continuation given its prompt (prompt cut from the left to fit ``max_len``)."""
    import torch

    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(prompts), batch_size):
        seqs, starts = [], []
        for p, c in zip(prompts[i: i + batch_size], continuations[i: i + batch_size]):
            pi = tokenizer(p, add_special_tokens=False)["input_ids"]
            ci = tokenizer(c, add_special_tokens=False)["input_ids"]
            pi = pi[max(0, len(pi) + len(ci) - max_len):]
            seqs.append(pi + ci)
            starts.append(len(pi))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), dim=-1)  # (B, T, V)
        for j, s in enumerate(seqs):
            pos = torch.arange(starts[j], len(s))
            tok_lp = logp[j, pos - 1, ids[j, pos]]  # position t-1 predicts token t
            total = float(tok_lp.sum())
            out.append(total / max(1, len(pos)) if length_normalise else total)
    return out


class ChoiceScorer:
    """Ray Data callable class: rows with ``prompt``, ``choices`` -> ``choice_scores`` (JSON)."""

    def __init__(self, model_path: str, prefix: str, batch_size: int = 16, length_normalise: bool = True,
                 max_len: int = 1024, trust_remote_code: bool = False) -> None:
        import torch

        from kale_ray.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.model = load_causal_lm(model_path, "float32", trust_remote_code).eval()
        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.prefix, self.batch_size, self.norm, self.max_len = prefix, batch_size, length_normalise, max_len

    def __call__(self, batch: dict) -> dict:
        prompts, conts, owner = [], [], []
        choices = [json.loads(c) for c in batch["choices"]]
        for i, (p, cs) in enumerate(zip(batch["prompt"], choices)):
            for c in cs:
                prompts.append(str(p))
                conts.append(self.prefix + c)
                owner.append(i)
        scores_out = [dict() for _ in choices]
        errors = [""] * len(choices)
        try:
            lps = choice_logprobs(self.model, self.tok, prompts, conts, self.batch_size, self.norm, self.max_len)
            k = 0
            for i, cs in enumerate(choices):
                for c in cs:
                    scores_out[i][c] = lps[k]
                    k += 1
        except Exception as e:  # a failed batch is marked per row (rejected with the reason), never dropped
            errors = [f"{type(e).__name__}: {e}"] * len(choices)
        batch["choice_scores"] = np.array([json.dumps(s) for s in scores_out], dtype=object)
        batch["score_error"] = np.array(errors, dtype=object)
        return batch
