"""Turn training rows into padded token batches, with a reason for every row left out.

A row is ``{"id", "prompt", "completion"}`` (plus ``"teacher_prompt"`` for KALE).
``prompt``/``teacher_prompt`` are complete, already chat-formatted model inputs and
``completion`` is the answer text (end-of-turn text included). Each text is tokenized on
its own (``add_special_tokens=False``) and the pieces are concatenated, so that the
completion tokens are *the same ids* in every view of a row (KALE's KL compares the
student and the teacher token for token).

Layout of one view (``B`` rows, ``T`` = longest row of the batch, right padding)::

    input_ids       [bos?] prompt... completion... pad...     (B, T) long
    attention_mask  1      1         1             0          (B, T) long
    labels          -100   -100      completion... -100       (B, T) long

``labels`` are not shifted: position ``t`` predicts ``labels[:, t+1]``
(:func:`kale_ray.core.losses.select_positions`).

Too long for ``max_seq_len``: the prompt is cut from the *left* (the end of the prompt,
next to the answer, is kept; a needed BOS stays first); the completion is never cut. A row
whose completion does not fit with at least one context token is rejected
(``completion_too_long``). Rejected rows are counted per reason in ``collator.rejects``
(a :class:`kale_ray.core.rejects.Rejects`; a row with the same ``id`` and reason is counted
once, however many epochs read it), never dropped silently; truncations are counted in
``collator.stats``.

Pure Python + torch + a tokenizer: imports no Ray or DeepSpeed.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch

from kale_ray.core.losses import IGNORE_INDEX
from kale_ray.core.rejects import Rejects

# Reasons a row is rejected (also the keys of the trainer's summary).
COMPLETION_TOO_LONG = "completion_too_long"
EMPTY_COMPLETION = "empty_completion"
MISSING_FIELD = "missing_field"
REJECT_REASONS = (COMPLETION_TOO_LONG, EMPTY_COMPLETION, MISSING_FIELD)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts BOS in front of plain text by default (Llama-2/3 style).

    SmolLM2/Qwen-style tokenizers do not (their chat template carries its own markers), and
    then no BOS is added here either.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def build_sequence(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    max_seq_len: int,
    bos_id: int | None = None,
) -> tuple[list[int] | None, int, str | None, bool]:
    """Concatenate ``[bos] + prompt + completion`` within ``max_seq_len``.

    Returns ``(input_ids, n_context, reject_reason, truncated)``: ``n_context`` is the number
    of leading tokens that are not labelled (BOS + kept prompt). On rejection ``input_ids``
    is ``None``.

    >>> build_sequence([5, 6, 7], [8, 9], max_seq_len=4)
    ([6, 7, 8, 9], 2, None, True)
    >>> build_sequence([5], [8, 9, 10, 11], max_seq_len=4)
    (None, 0, 'completion_too_long', False)
    """
    completion = list(completion_ids)
    if not completion:
        return None, 0, EMPTY_COMPLETION, False
    head = [bos_id] if bos_id is not None and (not prompt_ids or prompt_ids[0] != bos_id) else []
    prompt = head + list(prompt_ids)
    # At least one context token, so that every completion token is predicted from something.
    room = max_seq_len - len(completion)
    if room < 1:
        return None, 0, COMPLETION_TOO_LONG, False
    truncated = len(prompt) > room
    if truncated:
        keep_head = 1 if (bos_id is not None and prompt and prompt[0] == bos_id and room >= 2) else 0
        tail = room - keep_head
        prompt = prompt[:keep_head] + prompt[len(prompt) - tail:]
    return prompt + completion, len(prompt), None, truncated


def pad_views(seqs: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``[(input_ids, n_context), ...]`` to the longest; labels -100 on context and padding."""
    width = max(len(ids) for ids, _ in seqs)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (ids, n_ctx) in enumerate(seqs):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        attention_mask[i, : len(ids)] = 1
        labels[i, n_ctx: len(ids)] = row[n_ctx:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def rows_from_columns(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A columnar batch (Ray Data ``batch_format="numpy"``/pandas dict) -> list of row dicts."""
    if isinstance(batch, list):
        return batch
    keys = list(batch.keys())
    if not keys:
        return []
    n = len(batch[keys[0]])
    cols = {k: list(batch[k]) for k in keys}
    return [{k: cols[k][i] for k in keys} for i in range(n)]


class RowCollator:
    """What every collator shares: the tokenizer's pad / BOS ids, a length cap, rejected rows kept with
    their reason (each (id, reason) counted once, however many epochs read the row) and counters."""

    def __init__(self, tokenizer: Any, max_seq_len: int, keep_rejected: int = 1000, min_seq_len: int = 2):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it with kale_ray.models.load_tokenizer")
        if max_seq_len < min_seq_len:
            raise ValueError(f"max_seq_len must be >= {min_seq_len}, got {max_seq_len}")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_id = int(tokenizer.pad_token_id)
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.rejects = Rejects(keep=keep_rejected)
        # (id, reason) already counted: a bad row read again in a later epoch is counted once.
        self.rejected_keys: set[tuple[str, str]] = set()
        self.stats: Counter[str] = Counter()

    def _reject(self, row: Mapping[str, Any], reason: str, **record: Any) -> None:
        row_id = row.get("id")
        if row_id is not None:
            key = (str(row_id), reason)
            if key in self.rejected_keys:
                return
            self.rejected_keys.add(key)
        self.rejects.add(reason, id=None if row_id is None else str(row_id), **record)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


class PromptCompletionCollator(RowCollator):
    """Collate rows into one or more views that share the completion tokens.

    ``views`` maps a key prefix to the row field holding that view's prompt:
    ``{"": "prompt"}`` gives ``input_ids/attention_mask/labels``;
    ``{"": "prompt", "teacher_": "teacher_prompt"}`` adds
    ``teacher_input_ids/teacher_attention_mask/teacher_labels``.

    ``collator(rows)`` returns the batch dict, or ``None`` when every row was rejected.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, views: Mapping[str, str], keep_rejected: int = 1000):
        super().__init__(tokenizer, max_seq_len, keep_rejected)
        self.views = dict(views)
        # stats: rows_in, rows_out, <view>prompt_truncated

    def _valid(self, row: Mapping[str, Any]) -> str | None:
        for field in ("completion", *self.views.values()):
            if not isinstance(row.get(field), str):
                return field
        return None

    def __call__(self, rows: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        rows = rows_from_columns(rows) if isinstance(rows, Mapping) else list(rows)
        self.stats["rows_in"] += len(rows)
        ok_rows = []
        for row in rows:
            missing = self._valid(row)
            if missing is not None:
                self._reject(row, MISSING_FIELD, field=missing)
            else:
                ok_rows.append(row)
        completions = self._tokenize([r["completion"] for r in ok_rows])
        prompts = {prefix: self._tokenize([r[field] for r in ok_rows]) for prefix, field in self.views.items()}

        kept: dict[str, list[tuple[list[int], int]]] = {prefix: [] for prefix in self.views}
        for i, row in enumerate(ok_rows):
            built = {}
            reason = None
            for prefix in self.views:
                ids, n_ctx, reason, truncated = build_sequence(
                    prompts[prefix][i], completions[i], self.max_seq_len, self.bos_id
                )
                if reason is not None:
                    break
                built[prefix] = (ids, n_ctx, truncated)
            if reason is not None:
                self._reject(row, reason, completion_tokens=len(completions[i]), max_seq_len=self.max_seq_len)
                continue
            for prefix, (ids, n_ctx, truncated) in built.items():
                if truncated:
                    self.stats[f"{prefix}prompt_truncated"] += 1
                kept[prefix].append((ids, n_ctx))
        n_out = len(next(iter(kept.values())))
        self.stats["rows_out"] += n_out
        if n_out == 0:
            return None
        batch: dict[str, torch.Tensor] = {}
        for prefix, seqs in kept.items():
            for key, value in pad_views(seqs, self.pad_id).items():
                batch[prefix + key] = value
        self._check_same_completions(batch)
        return batch

    def _check_same_completions(self, batch: dict[str, torch.Tensor]) -> None:
        """Every view must label exactly the same completion tokens, row by row."""
        ref = batch["labels"]
        for prefix in self.views:
            if not prefix:
                continue
            other = batch[prefix + "labels"]
            for i in range(ref.shape[0]):
                a = ref[i][ref[i] != IGNORE_INDEX]
                b = other[i][other[i] != IGNORE_INDEX]
                assert torch.equal(a, b), f"row {i}: completion tokens differ between views '' and {prefix!r}"


def sft_collator(tokenizer: Any, max_seq_len: int) -> PromptCompletionCollator:
    """Collator for SFT: one view from ``prompt``."""
    return PromptCompletionCollator(tokenizer, max_seq_len, {"": "prompt"})


def kale_collator(tokenizer: Any, max_seq_len: int) -> PromptCompletionCollator:
    """Collator for KALE: student view from ``prompt``, teacher view from ``teacher_prompt``."""
    return PromptCompletionCollator(tokenizer, max_seq_len, {"": "prompt", "teacher_": "teacher_prompt"})
