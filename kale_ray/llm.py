"""LLM generation backends on Ray Data.

* ``vllm``: ``ray.data.llm`` vLLM processor (one engine per actor; ``concurrency=(min, max)``
  makes an autoscaling actor pool). Prompts arrive pre-rendered (``prompt`` column) so the
  model sees exactly the string training used; the chat-template stage is off.
* ``http``: any OpenAI-compatible ``/chat/completions`` endpoint (a vLLM server, GPT-4o, ...).
* ``template``: no LLM (handled by the caller).

Every row comes back: a row whose request failed has ``gen_error`` set, never vanishes.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kale_ray.config import ConfigError, GenerationConfig

# Worker env for local runs: progress lines from training reach the driver, vLLM's
# per-request INFO chatter does not.
QUIET_ENV = {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}}


def _on_gpu(gen: GenerationConfig) -> bool:
    return gen.num_gpus_per_replica > 0


def engine_kwargs(gen: GenerationConfig, max_model_len: int, trust_remote_code: bool = False) -> dict[str, Any]:
    dtype = gen.dtype
    if dtype == "auto":
        # fp32 is ~6x faster than bf16 on an AVX2 CPU (measured); GPUs want bf16.
        dtype = "bfloat16" if _on_gpu(gen) else "float32"
    kw: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": max_model_len,
        "enforce_eager": not _on_gpu(gen),
        "trust_remote_code": trust_remote_code,
        "seed": gen.seed,
        "max_num_seqs": max(gen.batch_size, 8),
    }
    if _on_gpu(gen):
        kw["gpu_memory_utilization"] = 0.85
    else:
        # On CPU this is the share of RAM for the KV cache; the default 0.92 fails here.
        kw["gpu_memory_utilization"] = gen.gpu_memory_utilization
    return kw


def sampling_params(gen: GenerationConfig, max_tokens: int | None = None) -> dict[str, Any]:
    sp = {
        "max_tokens": int(max_tokens or gen.max_tokens),
        "temperature": float(gen.temperature),
        "top_p": float(gen.top_p),
        "seed": int(gen.seed),
    }
    if gen.ignore_eos:
        sp["ignore_eos"] = True
    return sp


def _concurrency(gen: GenerationConfig):
    if gen.max_concurrency and gen.max_concurrency > gen.concurrency:
        return (gen.concurrency, gen.max_concurrency)
    return gen.concurrency


def vllm_processor_config(model_path: str, gen: GenerationConfig, max_model_len: int,
                          trust_remote_code: bool = False):
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` of the teacher (no GPU or Ray needed to build it).

    One replica spans ``tp * pp`` GPUs. How Ray 2.60 uses these fields (read in
    ray/llm/_internal/batch/stages/vllm_engine_stage.py, ``vLLMEngineStage.post_init`` and
    ``_ray_scheduling_strategy_fn``; field doc in batch/processor/vllm_engine_proc.py): it reads
    ``engine_kwargs["tensor_parallel_size"]`` / ``["pipeline_parallel_size"]``, bundles per replica
    = tp * pp, and sets ``distributed_executor_backend`` to "uni" (tp*pp == 1) or "ray"
    (setdefault). With "ray" the actor asks for 0 GPUs and ``placement_group_config``
    (``{"bundles": [...], "strategy": PACK|STRICT_PACK|SPREAD|STRICT_SPREAD}``, validated by
    ray/llm/_internal/common/placement.py::PlacementGroupConfig) becomes the placement group the
    vLLM workers run in; with "uni" the bundles' CPU/GPU sum becomes the actor's num_cpus/num_gpus.
    Ray Serve LLM's cross-node-parallelism guide: PACK places workers on as few nodes as possible
    and spills to other nodes; vLLM's docs: TP within a node, PP across nodes.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    tp, pp = gen.tensor_parallel_size, gen.pipeline_parallel_size
    kw = engine_kwargs(gen, max_model_len, trust_remote_code)
    if _on_gpu(gen):
        kw["tensor_parallel_size"] = tp
        kw["pipeline_parallel_size"] = pp
        if pp > 1:
            # Pipeline stages may sit on other nodes: vLLM needs the Ray executor for that.
            kw["distributed_executor_backend"] = "ray"
        pg = {"bundles": [{"GPU": 1, "CPU": 1} for _ in range(tp * pp)],
              # TP all-reduces every layer: keep a replica on one node. PP stages may span nodes.
              "strategy": "STRICT_PACK" if pp == 1 else "PACK"}
    else:
        if tp > 1:
            raise ConfigError("generation.tensor_parallel_size > 1 needs GPUs (generation.num_gpus_per_replica)")
        if pp > 1:
            raise ConfigError("generation.pipeline_parallel_size > 1 needs GPUs (generation.num_gpus_per_replica)")
        pg = {"bundles": [{"CPU": 1}]}
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=kw,
        batch_size=gen.batch_size,
        concurrency=_concurrency(gen),
        chat_template_stage=False,
        # vLLM tokenizes and detokenizes itself: separate stages would each hold an actor
        # (and a CPU) for work the engine does anyway, and deadlock a 2-CPU machine.
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        log_engine_metrics=False,
        placement_group_config=pg,
        accelerator_type=None,
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}},
    )


def build_vllm_processor(model_path: str, gen: GenerationConfig, max_model_len: int,
                         trust_remote_code: bool = False, max_tokens: int | None = None,
                         json_schema: dict | None = None):
    """A ray.data.llm processor: rows with ``prompt`` (str) in, rows with ``generation`` out.

    Other columns pass through. Output columns: ``generation``, ``gen_tokens``,
    ``prompt_tokens``, ``gen_error`` ("" when fine). ``json_schema``: guided decoding to that
    JSON schema (vLLM ``StructuredOutputsParams(json=...)``, which ray.data.llm builds from the
    row's ``sampling_params["structured_outputs"]``).
    """
    import ray.data
    from ray.data.llm import build_processor

    # An engine that fails to start (seen once here: engine core init failed while the machine
    # was loaded) is retried inside its actor (DataContext.actor_init_max_retries, default 3)
    # instead of failing the whole run on the first try.
    ray.data.DataContext.get_current().actor_init_retry_on_errors = True
    sp = sampling_params(gen, max_tokens)
    if not _on_gpu(gen) and sp["temperature"] > 0:
        # vLLM 0.32 CPU: a per-request seeded generator crashes the engine core when a prompt is
        # prefilled in chunks ("CPU Generator does not use offset"); the engine's own seed
        # (engine_kwargs: gen.seed) still makes the sampling reproducible per pass.
        sp.pop("seed", None)
    if json_schema is not None:
        sp["structured_outputs"] = {"json": json.dumps(json_schema)}
    config = vllm_processor_config(model_path, gen, max_model_len, trust_remote_code)

    def preprocess(row: dict) -> dict:
        return dict(row, sampling_params=sp)

    def postprocess(row: dict) -> dict:
        err = row.pop("__inference_error__", "") or ""
        out = {k: v for k, v in row.items() if k not in ("sampling_params", "tokenized_prompt", "generated_tokens",
                                                        "request_id", "time_taken_llm", "params", "embeddings",
                                                        "metrics", "generated_text", "num_generated_tokens",
                                                        "num_input_tokens", "prompt_logprobs", "logprobs")}
        out["generation"] = row.get("generated_text") or ""
        out["gen_tokens"] = int(row.get("num_generated_tokens") or 0)
        out["prompt_tokens"] = int(row.get("num_input_tokens") or 0)
        out["gen_error"] = str(err)
        return out

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


# --------------------------------------------------------------------------- #
# OpenAI-compatible HTTP teacher
# --------------------------------------------------------------------------- #
class HttpGenerator:
    """Ray Data callable class: rows with ``messages`` -> ``generation`` via /chat/completions.

    The API key is read from the environment variable named in the config, never stored
    in configs or logs. Bounded retries with backoff; a row that still fails gets
    ``gen_error`` (the pipeline rejects it with that reason).
    """

    def __init__(self, gen: GenerationConfig, model: str) -> None:
        self.gen = gen
        self.model = gen.http_model or model
        self.url = gen.http_base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(gen.http_api_key_env, "")
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(16, gen.batch_size)))

    def _one(self, messages) -> tuple[str, int, str]:
        payload = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": self.gen.max_tokens,
            "temperature": self.gen.temperature,
            "top_p": self.gen.top_p,
            "seed": self.gen.seed,
        }
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.gen.max_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers)
                with urllib.request.urlopen(req, timeout=self.gen.http_timeout_s) as resp:
                    body = json.loads(resp.read().decode())
                text = body["choices"][0]["message"]["content"] or ""
                toks = int((body.get("usage") or {}).get("completion_tokens") or 0)
                return text, toks, ""
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
                if attempt < self.gen.max_retries:
                    time.sleep(min(8.0, 0.5 * 2 ** attempt))
        return "", 0, f"http_error: {last}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        msgs = [json.loads(m) for m in batch["messages_json"]]
        results = list(self.pool.map(self._one, msgs))
        batch["generation"] = np.array([r[0] for r in results], dtype=object)
        batch["gen_tokens"] = np.array([r[1] for r in results], dtype=np.int64)
        batch["prompt_tokens"] = np.zeros(len(results), dtype=np.int64)
        batch["gen_error"] = np.array([r[2] for r in results], dtype=object)
        return batch
