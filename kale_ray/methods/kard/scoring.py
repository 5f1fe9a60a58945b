"""Choice scoring by log-likelihood: the verifier's "which answer does this rationale lead to".

:func:`choice_logprobs` is a torch pass sharing the prompt's KV cache (no Ray); :class:`ChoiceScorer` is the Ray Data
callable class around it. A row carries ``prompt`` (chat-rendered, ending where the assistant
answers) and ``choices`` (JSON list); the output ``choice_scores`` is a JSON object
``{choice: mean (or summed) log-prob of "Answer: <choice>"}``, ``score_error`` names a failure.

A row fails (``score_error`` set, the rationale rejected as ``verifier_failed``) only for what a
row can legitimately cause: :class:`ScoringInputError` (no choices, an empty continuation, no room
left for the prompt) or running out of memory on it. Anything else is a bug and fails the job.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


class ScoringInputError(ValueError):
    """A row that cannot be scored: no choices, an empty continuation, or no room for the prompt."""


def choice_logprobs(model, tokenizer, prompt: str, continuations: Sequence[str], length_normalise: bool = True,
                    max_len: int = 1024) -> list[float]:
    """Log-prob of each continuation given one prompt: the prompt is run once, its KV cache shared.

    The prompt is cut from the left so that prompt + the longest continuation fit ``max_len``.
    Continuations are right-padded in one batch (padding after a sequence cannot change its
    earlier positions under a causal mask).
    """
    import torch

    if not continuations:
        raise ScoringInputError("no choices to score")
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if not all(conts):
        empty = [c for c, ids in zip(continuations, conts) if not ids]
        raise ScoringInputError(f"a continuation has no tokens: {empty!r}")
    if max(len(c) for c in conts) >= max_len:
        raise ScoringInputError(f"the longest continuation ({max(len(c) for c in conts)} tokens) leaves no room for "
                                f"the prompt in max_len {max_len}")
    pi = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pi = pi[max(0, len(pi) + max(len(c) for c in conts) - max_len):]
    with torch.no_grad():
        first = model(input_ids=torch.tensor([pi]), use_cache=True)
        cache = first.past_key_values
        last_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # (V,) predicts the first cont token
        cache.batch_repeat_interleave(len(conts))
        width = max(len(c) for c in conts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(conts), width), pad, dtype=torch.long)
        att = torch.zeros((len(conts), len(pi) + width), dtype=torch.long)
        att[:, : len(pi)] = 1
        for j, c in enumerate(conts):
            ids[j, : len(c)] = torch.tensor(c)
            att[j, len(pi): len(pi) + len(c)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att, past_key_values=cache).logits.float(), -1)
    out = []
    for j, c in enumerate(conts):
        lps = [float(last_logp[c[0]])] + [float(logp[j, t - 1, c[t]]) for t in range(1, len(c))]
        out.append(sum(lps) / len(lps) if length_normalise else sum(lps))
    return out


class ChoiceScorer:
    """Ray Data callable class: rows with ``prompt``, ``choices`` -> ``choice_scores`` (JSON)."""

    def __init__(self, model_path: str, prefix: str, length_normalise: bool = True,
                 max_len: int = 1024, trust_remote_code: bool = False) -> None:
        import torch

        from kale_ray.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.model = load_causal_lm(model_path, "float32", trust_remote_code).eval()
        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.prefix, self.norm, self.max_len = prefix, length_normalise, max_len

    def __call__(self, batch: dict) -> dict:
        import torch

        choices = [json.loads(c) for c in batch["choices"]]
        scores_out: list[dict] = [{} for _ in choices]
        errors = [""] * len(choices)
        for i, (p, cs) in enumerate(zip(batch["prompt"], choices)):
            try:
                lps = choice_logprobs(self.model, self.tok, str(p), [self.prefix + c for c in cs], self.norm,
                                      self.max_len)
                scores_out[i] = dict(zip(cs, lps))
            # A row that cannot be scored is marked (rejected with the reason), never dropped; any
            # other error is a bug and propagates: it must not turn every rationale into verifier_failed.
            except (ScoringInputError, torch.OutOfMemoryError, MemoryError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
        batch["choice_scores"] = np.array([json.dumps(s) for s in scores_out], dtype=object)
        batch["score_error"] = np.array(errors, dtype=object)
        return batch
