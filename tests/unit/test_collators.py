"""Collators: masks, labels, truncation, rejects, KALE views (real SmolLM2 tokenizer, no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kale_ray.models import load_tokenizer, resolve_model
from kale_ray.train.collators import (
    COMPLETION_TOO_LONG,
    MISSING_FIELD,
    build_sequence,
    kale_collator,
    rows_from_columns,
    sft_collator,
    tokenizer_adds_bos,
)

PROMPT = "Question: what does A affect?\nAnswer:"
TEACHER = "Knowledge: A affects B.\nQuestion: what does A affect?\nAnswer:"
COMPLETION = " B<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("builtin:tiny-llama"))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_masks_and_labels(tok):
    p, c = ids(tok, PROMPT), ids(tok, COMPLETION)
    assert c == [389, 2]  # " B", "<|im_end|>" in SmolLM2's vocabulary
    assert not tokenizer_adds_bos(tok)  # SmolLM2: no BOS in front of plain text
    col = sft_collator(tok, max_seq_len=64)
    batch = col([
        {"id": "1", "prompt": PROMPT, "completion": COMPLETION},
        {"id": "2", "prompt": "Q?", "completion": COMPLETION},
    ])
    n = len(p) + len(c)
    assert batch["input_ids"].shape == (2, n)
    assert batch["input_ids"][0].tolist() == p + c
    assert batch["attention_mask"][0].tolist() == [1] * n
    assert batch["labels"][0].tolist() == [-100] * len(p) + c
    # second row: right-padded with the pad id, padding unlabelled and masked out
    short = len(ids(tok, "Q?")) + len(c)
    assert batch["input_ids"][1, short:].tolist() == [tok.pad_token_id] * (n - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (n - short)
    assert batch["labels"][1].tolist() == [-100] * (short - len(c)) + c + [-100] * (n - short)
    assert col.rejects.total() == 0 and col.stats["rows_out"] == 2


def test_left_truncation_keeps_completion(tok):
    p, c = ids(tok, PROMPT), ids(tok, COMPLETION)
    col = sft_collator(tok, max_seq_len=5)
    batch = col([{"id": "1", "prompt": PROMPT, "completion": COMPLETION}])
    assert batch["input_ids"][0].tolist() == p[-3:] + c  # the prompt's end survives, next to the answer
    assert batch["labels"][0].tolist() == [-100] * 3 + c
    assert col.stats["prompt_truncated"] == 1 and col.rejects.total() == 0


def test_completion_too_long_is_rejected_with_reason(tok):
    col = sft_collator(tok, max_seq_len=4)
    long = " word" * 10 + "<|im_end|>"
    batch = col([
        {"id": "long", "prompt": PROMPT, "completion": long},
        {"id": "ok", "prompt": PROMPT, "completion": COMPLETION},
        {"id": "bad", "prompt": None, "completion": COMPLETION},
    ])
    assert batch["input_ids"].shape[0] == 1
    assert col.rejects.counts() == {COMPLETION_TOO_LONG: 1, MISSING_FIELD: 1}
    assert {r["id"] for r in col.rejects.rows} == {"long", "bad"}
    # a batch where everything is rejected is None (and still counted)
    assert col([{"id": "long2", "prompt": PROMPT, "completion": long}]) is None
    assert col.rejects.counts()[COMPLETION_TOO_LONG] == 2
    # the same row read again (next epoch) is not counted twice
    col([{"id": "long", "prompt": PROMPT, "completion": long}])
    assert col.rejects.counts()[COMPLETION_TOO_LONG] == 2


def test_build_sequence_rules():
    # completion must leave room for one context token
    assert build_sequence([1, 2], [7, 8, 9], max_seq_len=3)[2] == COMPLETION_TOO_LONG
    assert build_sequence([1, 2], [7, 8, 9], max_seq_len=4) == ([2, 7, 8, 9], 1, None, True)
    assert build_sequence([1, 2], [], max_seq_len=4)[2] == "empty_completion"
    # a tokenizer that wants BOS: prepended once, and kept first when the prompt is cut
    assert build_sequence([5, 6], [9], max_seq_len=8, bos_id=0) == ([0, 5, 6, 9], 3, None, False)
    assert build_sequence([0, 5, 6], [9], max_seq_len=8, bos_id=0) == ([0, 5, 6, 9], 3, None, False)
    assert build_sequence([5, 6, 7, 8], [9], max_seq_len=4, bos_id=0) == ([0, 7, 8, 9], 3, None, True)


def test_kale_views_share_completion_tokens(tok):
    col = kale_collator(tok, max_seq_len=64)
    batch = col([
        {"id": "1", "prompt": PROMPT, "teacher_prompt": TEACHER, "completion": COMPLETION},
        {"id": "2", "prompt": "Q?", "teacher_prompt": "K. " * 5 + "Q?", "completion": " C D<|im_end|>"},
    ])
    keys = {"input_ids", "attention_mask", "labels", "teacher_input_ids", "teacher_attention_mask", "teacher_labels"}
    assert set(batch) == keys
    assert batch["teacher_input_ids"].shape[1] > batch["input_ids"].shape[1]
    for i in range(2):
        s = batch["labels"][i][batch["labels"][i] != -100]
        t = batch["teacher_labels"][i][batch["teacher_labels"][i] != -100]
        assert torch.equal(s, t) and len(s) > 0
    # the teacher view is what rejects a row when its (longer) prompt cannot be cut enough
    col = kale_collator(tok, max_seq_len=3)
    assert col([{"id": "x", "prompt": "Q", "teacher_prompt": TEACHER, "completion": COMPLETION}]) is not None
    assert col.stats["teacher_prompt_truncated"] == 1


def test_kale_requires_teacher_prompt(tok):
    col = kale_collator(tok, max_seq_len=64)
    assert col([{"id": "1", "prompt": PROMPT, "completion": COMPLETION}]) is None
    assert col.rejects.counts() == {MISSING_FIELD: 1}


def test_columnar_batches_from_ray_data(tok):
    cols = {"id": np.array(["1", "2"], dtype=object), "prompt": np.array([PROMPT, "Q?"], dtype=object),
            "completion": np.array([COMPLETION, COMPLETION], dtype=object)}
    assert rows_from_columns(cols)[1] == {"id": "2", "prompt": "Q?", "completion": COMPLETION}
    assert sft_collator(tok, 64)(cols)["input_ids"].shape[0] == 2
