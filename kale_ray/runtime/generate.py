"""The one generation path: rows + model + settings -> generations, on vLLM (``ray.data.llm``) or an
OpenAI-compatible endpoint (``HttpGenerator``).

Every method's teacher, rewriter and evaluator calls :func:`generate` (a list of rows in, one
result per row out) or, inside a streaming Ray Data pipeline, :func:`generation_stage` (a
dataset in, the same dataset with generation columns out). What each caller used to redo:
the prompt budget (``max_model_len - max_tokens``, checked with the model's tokenizer before the
engine sees a prompt), the block count, the backend switch and the error columns (``gen_error``
or ``__inference_error__``, ``None`` / ``"None"`` meaning fine), lives here once.

Results: ``{key: {"text", "tokens", "error"}}``; ``error`` is ``""`` when fine, else one of
``prompt_too_long: <n> tokens > <budget>``, the engine's or endpoint's message (``http_<status>:``
...), or ``row lost by the generation pipeline``. Every row comes back.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Sequence

from kale_ray.config import GenerationConfig, ModelConfig

PROMPT_TOO_LONG = "prompt_too_long"
ROW_LOST = "row lost by the generation pipeline"
MAX_BLOCKS = 32
BACKENDS = ("vllm", "http")


def pool(gen: GenerationConfig):
    """Ray Data's ``concurrency`` for the HTTP actors: fixed, or ``(min, max)`` to autoscale."""
    return (gen.concurrency, gen.max_concurrency) if gen.max_concurrency > gen.concurrency else gen.concurrency


def num_blocks(n_rows: int, batch_size: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Blocks for ``n_rows`` rows: about one engine batch each, at most ``max_blocks``."""
    return max(1, min(max_blocks, n_rows // max(1, batch_size)))


def dataset(rows: Sequence[dict[str, Any]], batch_size: int, max_blocks: int = MAX_BLOCKS):
    """A Ray dataset of ``rows`` in :func:`num_blocks` blocks (Ray must be up), for any Ray Data stage."""
    import ray.data

    return ray.data.from_items(list(rows), override_num_blocks=num_blocks(len(rows), batch_size, max_blocks))


def use_ray(mode: str) -> bool:
    """Where a scoring pass runs (``mode``: "ray", "local" or "auto"): "auto" is Ray when this
    process has started it. Never imports Ray."""
    return mode == "ray" or (mode == "auto" and "ray" in sys.modules and sys.modules["ray"].is_initialized())


def map_in_order(rows: Sequence[dict[str, Any]], fn: Any, batch_size: int, *, what: str,
                 fn_constructor_kwargs: dict[str, Any] | None = None, num_gpus: float | None = None,
                 max_blocks: int = 16) -> list[dict[str, Any]]:
    """``rows`` through one Ray Data actor of the callable class ``fn`` (``map_batches``, one CPU,
    ``num_gpus``), back in their order (an ``idx`` column is added); a row lost on the way is a
    ``RuntimeError`` naming ``what``."""
    items = [{"idx": i, **r} for i, r in enumerate(rows)]
    gpus = {} if num_gpus is None else {"num_gpus": num_gpus}
    out = dataset(items, batch_size, max_blocks).map_batches(
        fn, fn_constructor_kwargs=fn_constructor_kwargs or {}, batch_size=batch_size, batch_format="numpy",
        concurrency=1, num_cpus=1, **gpus)
    got = sorted(out.take_all(), key=lambda r: int(r["idx"]))
    if [int(r["idx"]) for r in got] != list(range(len(items))):
        raise RuntimeError(f"{what} lost rows: {len(items)} in, {len(got)} out")
    return got


def row_error(row: dict) -> str:
    """The row's generation error, ``""`` when fine (``None`` / ``"None"`` / missing are fine)."""
    err = row.get("gen_error") or row.get("__inference_error__") or ""
    return "" if err in (None, "None") else str(err)


def prompt_budget(model: ModelConfig, gen: GenerationConfig) -> int:
    """Tokens a prompt may take: the context length minus the tokens to generate."""
    return int(model.max_model_len) - int(gen.max_tokens)


def too_long(prompt: str, tokenizer: Any, budget: int) -> str:
    """``""`` when ``prompt`` fits ``budget`` tokens, else the ``prompt_too_long: ...`` reason."""
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return f"{PROMPT_TOO_LONG}: {n} tokens > {budget}" if n > budget else ""


# A vLLM engine whose start fails (seen once in this project's CI on a loaded 2-core machine:
# "Engine core initialization failed", the same test green alone and in every other run) is
# replaced by a fresh actor this many times in a row before the stage fails; a model that never
# starts still fails, after one more start.
ENGINE_START_RETRIES = 1


def allow_engine_restarts(ds, retries: int = ENGINE_START_RETRIES):
    """``ds`` whose actor stages replace up to ``retries`` consecutive actors that die while starting."""
    ctx = ds.context
    ctx.max_consecutive_actor_init_deaths = max(int(ctx.max_consecutive_actor_init_deaths), retries)
    return ds


def generation_stage(ds, model_path: str, gen: GenerationConfig, model: ModelConfig, json_schema: dict | None = None,
                     num_cpus: float | None = None):
    """``ds`` with ``prompt`` (vllm) or ``messages_json`` (http) -> ``ds`` with ``generation``,
    ``gen_tokens``, ``prompt_tokens``, ``gen_error``; other columns pass through.

    ``num_cpus``: CPUs of each HTTP actor (network-bound: a fraction, so they never starve the
    stages around them). vLLM engines take their resources from ``ray.data.llm``.
    """
    if gen.backend == "vllm":
        from kale_ray.runtime.llm import build_vllm_processor

        return build_vllm_processor(model_path, gen, model.max_model_len, model.trust_remote_code,
                                    json_schema=json_schema)(allow_engine_restarts(ds))
    if gen.backend == "http":
        from kale_ray.runtime.llm import HttpGenerator

        kw = {} if num_cpus is None else {"num_cpus": num_cpus}
        return ds.map_batches(HttpGenerator, fn_constructor_args=(gen, model.name, json_schema),
                              batch_size=gen.batch_size, concurrency=pool(gen), batch_format="numpy", **kw)
    raise ValueError(f"generation.backend: {gen.backend!r} does not generate text (use one of {', '.join(BACKENDS)})")


def generate(rows: Sequence[dict[str, Any]], model_path: str, gen: GenerationConfig, model: ModelConfig, *,
             tokenizer: Any = None, max_tokens: int | None = None, json_schema: dict | None = None,
             max_blocks: int = MAX_BLOCKS) -> dict[str, dict[str, Any]]:
    """``{key: {"text", "tokens", "error"}}`` for rows ``{key, prompt, messages?}`` (Ray must be up).

    ``tokenizer`` (the model's): prompts longer than the budget are not sent; they come back with
    ``error="prompt_too_long: ..."``. ``max_tokens`` overrides ``gen.max_tokens`` for this call.
    ``messages`` (chat messages) are what the http backend sends; vLLM takes ``prompt``.
    """
    if not rows:
        return {}
    g = dataclasses.replace(gen, max_tokens=int(max_tokens or gen.max_tokens))
    budget = prompt_budget(model, g)
    out: dict[str, dict[str, Any]] = {}
    send, seen = [], set()
    for r in rows:
        key = str(r["key"])
        if key in seen:
            raise ValueError(f"generate: duplicate row key {key!r}")
        seen.add(key)
        reason = too_long(r["prompt"], tokenizer, budget) if tokenizer is not None and g.backend == "vllm" else ""
        if reason:
            out[key] = {"text": "", "tokens": 0, "error": reason}
        else:
            item = {"key": key, "prompt": r["prompt"]}
            if g.backend == "http":
                item["messages_json"] = json.dumps(r.get("messages") or [])
            send.append(item)
    if send:
        ds = dataset(send, g.batch_size, max_blocks)
        for row in generation_stage(ds, model_path, g, model, json_schema).iter_rows():
            text = row.get("generation")
            out[str(row["key"])] = {"text": "" if text is None else str(text), "tokens": int(row.get("gen_tokens") or 0),
                                    "error": row_error(row)}
    for r in rows:  # never silently: a row the engine lost is a failed generation
        out.setdefault(str(r["key"]), {"text": "", "tokens": 0, "error": ROW_LOST})
    return out
