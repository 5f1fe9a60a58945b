"""Teacher and student generation for KnowTuning on Ray Data, with bounded retries: the thin layer.

:func:`generate` is :func:`kale_ray.runtime.generate.generate` (the one generation path: the
``ray.data.llm`` vLLM processor with guided JSON decoding when a schema is given, or the
OpenAI-compatible HTTP backend with ``response_format={"type": "json_schema"}``); every row
comes back with its text or its error.

:func:`teacher_step` runs one teacher step over items: render each item's chat messages with
the teacher's template (too long -> rejected ``prompt_too_long``), generate, parse with a pure
parser from :mod:`kale_ray.methods.knowtuning.atomic`; the items that do not parse go again with
another seed (and ``retry_temperature``: greedy decoding would repeat itself), up to
``max_attempts``; what still fails is rejected with the last reason, its attempts and its
last generation. Each attempt is one pass (one engine start on vLLM).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable, Sequence

from kale_ray.config import GenerationConfig, ModelConfig
from kale_ray.methods.knowtuning.atomic import GENERATION_FAILED, PROMPT_TOO_LONG

# Backends that take a JSON schema: vLLM guided decoding, the http teacher's response_format.
_STRUCTURED = ("vllm", "http")


def generate(rows: Sequence[dict[str, Any]], model_path: str, gen: GenerationConfig, model: ModelConfig,
             max_tokens: int | None = None, json_schema: dict | None = None) -> dict[str, dict[str, Any]]:
    """``{key: {"text", "tokens", "error"}}`` for rows ``{key, prompt, messages}`` (Ray must be up): the
    project's one generation path, :func:`kale_ray.runtime.generate.generate`, with the positional
    signature :func:`teacher_step`'s ``generate_fn`` takes."""
    from kale_ray.runtime.generate import generate as generate_rows

    return generate_rows(rows, model_path, gen, model, max_tokens=max_tokens, json_schema=json_schema)


@dataclasses.dataclass
class StepResult:
    """What one teacher step gave: parsed values by key, rejects with reasons, and its costs."""

    parsed: dict[str, Any]
    rejected: list[dict[str, Any]]
    attempts: dict[str, int]  # key -> attempts used (parsed keys too)
    stats: dict[str, Any]

    def reasons(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejected))


def teacher_step(items: Sequence[dict[str, Any]], parse: Callable[[dict[str, Any], str], tuple[Any, str | None]],
                 model: ModelConfig, gen: GenerationConfig, max_attempts: int = 3, retry_temperature: float = 0.7,
                 max_tokens: int = 192, json_schema: dict | None = None, label: str = "teacher",
                 progress: Callable[[str], None] = print, generate_fn: Callable[..., dict] | None = None,
                 tokenizer: Any = None) -> StepResult:
    """Items ``{key, messages, ...}`` -> :class:`StepResult`; ``parse(item, text)`` is a pure parser.

    ``generate_fn`` (default :func:`generate`) and ``tokenizer`` (default the teacher's) can be
    passed in: the retry logic is tested with a fake generator, without Ray or vLLM.
    """
    from kale_ray.core.prompts import render_chat
    from kale_ray.models import resolve_model

    t0 = time.perf_counter()
    generate_fn = generate_fn or generate
    model_path = resolve_model(model.name, model.cache_dir) if tokenizer is None else model.name
    if tokenizer is None:
        from kale_ray.models import load_tokenizer

        tokenizer = load_tokenizer(model_path, model.trust_remote_code)
    tok = tokenizer
    budget = model.max_model_len - max_tokens
    parsed: dict[str, Any] = {}
    rejected: list[dict[str, Any]] = []
    attempts: dict[str, int] = {}
    last: dict[str, tuple[str, str]] = {}  # key -> (reason, generation)
    pending: list[dict[str, Any]] = []
    for it in items:
        prompt = render_chat(it["messages"], tok)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if n > budget:
            rejected.append({"key": it["key"], "reason": PROMPT_TOO_LONG, "attempts": 0,
                             "detail": f"{n} prompt tokens > max_model_len {model.max_model_len} - max_tokens {max_tokens}"})
        else:
            pending.append(dict(it, prompt=prompt))
    tokens = 0
    passes = 0
    for attempt in range(max_attempts):
        if not pending:
            break
        g = gen if attempt == 0 else dataclasses.replace(
            gen, seed=gen.seed + 7919 * attempt, temperature=max(gen.temperature, retry_temperature))
        out = generate_fn(pending, model_path, g, model, max_tokens, json_schema if gen.backend in _STRUCTURED else None)
        passes += 1
        still = []
        for it in pending:
            key = it["key"]
            attempts[key] = attempt + 1
            res = out[key]
            tokens += res["tokens"]
            if res["error"]:
                last[key] = (GENERATION_FAILED, res["error"][:300])
                still.append(it)
                continue
            value, reason = parse(it, res["text"])
            if reason is None:
                parsed[key] = value
            else:
                last[key] = (reason, res["text"][:500])
                still.append(it)
        progress(f"[{label}] attempt {attempt + 1}: {len(pending) - len(still)} of {len(pending)} parsed")
        pending = still
    for it in pending:
        reason, text = last[it["key"]]
        rejected.append({"key": it["key"], "reason": reason, "attempts": attempts[it["key"]], "generation": text})
    stats = {"items": len(items), "parsed": len(parsed), "rejected": len(rejected), "passes": passes,
             "tokens_generated": tokens, "structured_output": json_schema is not None and gen.backend in _STRUCTURED,
             "seconds": round(time.perf_counter() - t0, 2),
             "parsed_by_attempt": dict(Counter(str(attempts[k]) for k in parsed))}
    return StepResult(parsed, rejected, attempts, stats)
