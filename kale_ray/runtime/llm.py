"""LLM generation backends on Ray Data.

* ``vllm``: ``ray.data.llm`` vLLM processor (one engine per actor; ``concurrency=(min, max)``
  makes an autoscaling actor pool). Prompts arrive pre-rendered (``prompt`` column) so the
  model sees exactly the string training used; the chat-template stage is off.
* ``http``: any OpenAI-compatible ``/chat/completions`` endpoint (a vLLM server, GPT-4o, ...) on the
  official ``openai`` client (async, bounded concurrency per actor, retry rules below).
* ``template``: no LLM (handled by the caller).

Every row comes back: a row whose request failed has ``gen_error`` set, never vanishes.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from typing import Any

import numpy as np

from kale_ray.config import ConfigError, GenerationConfig


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
# Retry rules: 429 and 5xx (and connection errors / timeouts) are retried up to
# generation.max_retries times; the wait is the server's Retry-After (seconds or an HTTP date;
# capped at RETRY_AFTER_CAP_S) or else exponential backoff (BACKOFF_BASE_S * 2**attempt, capped
# at BACKOFF_CAP_S, with jitter). Every other 4xx fails its row at once: ``http_<status>: <message>``.
RETRYABLE_STATUS = frozenset({429})  # and every status >= 500
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
RETRY_AFTER_CAP_S = 60.0


def _retry_after_s(headers) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``Retry-After`` seconds or date), or None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _backoff_s(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(RETRY_AFTER_CAP_S, retry_after)
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.8, 1.0)


def _status_message(e) -> str:
    """The server's own message of an ``openai.APIStatusError`` (``{"error": {"message": ...}}`` or the body)."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error") or json.dumps(body)
    elif body:
        msg = str(body)
    else:
        try:
            msg = e.response.text
        except Exception:  # pragma: no cover - a response without a readable body
            msg = ""
        msg = msg or getattr(e.response, "reason_phrase", "") or str(e)
    return " ".join(str(msg).split())[:300]


class HttpGenerator:
    """Ray Data callable class: rows with ``messages_json`` -> ``generation`` via an OpenAI-compatible
    ``/chat/completions`` endpoint, on the official ``openai`` client (``AsyncOpenAI``).

    Per actor, up to ``generation.batch_size`` requests are in flight at once (an
    ``asyncio.Semaphore`` on the actor's own event loop); ``generation.concurrency`` actors run.
    The client's own retries are off (``max_retries=0``): the rules above apply (see
    :data:`RETRYABLE_STATUS`). Output columns: ``generation``, ``gen_tokens`` and
    ``prompt_tokens`` (from the response's ``usage``) and ``gen_error`` ("" when fine); a row that
    fails keeps its place with its error, it never vanishes.

    The API key is read from the environment variable named by ``generation.http_api_key_env``
    (on the actor), sent only as the ``Authorization`` header, never stored in configs, logged,
    or put in an error message. ``json_schema``: structured output
    (``response_format={"type": "json_schema", ...}``), honoured by vLLM serve and OpenAI.
    """

    def __init__(self, gen: GenerationConfig, model: str, json_schema: dict | None = None) -> None:
        self.gen = gen
        self.model = gen.http_model or model
        self.base_url = gen.http_base_url.rstrip("/")
        self.json_schema = json_schema
        self.concurrency = max(1, int(gen.batch_size))
        self.retries = {"attempts": 0, "retried": 0}  # counters over this actor's life
        self._key = os.environ.get(gen.http_api_key_env, "") if gen.http_api_key_env else ""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._sem: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never the key
        return f"HttpGenerator(model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self):  # a copy of this object carries no key, loop or client
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_key", "_lock", "_loop", "_thread", "_client", "_sem")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._key = os.environ.get(self.gen.http_api_key_env, "") if self.gen.http_api_key_env else ""
        self._lock = threading.Lock()
        self._loop = self._thread = self._client = self._sem = None

    # -- the actor's event loop, on its own thread (whatever loop the caller's thread runs) --
    def _run(self, coro):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="kale-http-teacher", daemon=True)
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _get_client(self):
        if self._client is None:
            from openai import AsyncOpenAI

            t = float(self.gen.http_timeout_s)
            self._client = AsyncOpenAI(
                base_url=self.base_url,
                # no key: a placeholder the client wants, and no Authorization header is sent
                # (_request_kwargs omits it; a local vLLM server without --api-key)
                api_key=self._key or "no-key",
                max_retries=0,  # our retry rules, not the client's
                timeout=t,
            )
        return self._client

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _request_kwargs(self, messages) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": int(self.gen.max_tokens),
            "temperature": float(self.gen.temperature),
            "top_p": float(self.gen.top_p),
            "seed": int(self.gen.seed),
        }
        if not self._key:
            import openai

            kw["extra_headers"] = {"Authorization": openai.Omit()}
        if self.json_schema is not None:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": self.json_schema, "strict": False}}
        return kw

    async def _one(self, sem: asyncio.Semaphore, messages) -> tuple[str, int, int, str]:
        import openai

        client = self._get_client()
        kw = self._request_kwargs(messages)
        err = ""
        for attempt in range(int(self.gen.max_retries) + 1):
            retry_after = None
            async with sem:
                self.retries["attempts"] += 1
                try:
                    resp = await client.chat.completions.create(**kw)
                except openai.APIStatusError as e:
                    status = int(e.status_code)
                    err = f"http_{status}: {_status_message(e)}"
                    if status not in RETRYABLE_STATUS and status < 500:
                        return "", 0, 0, self._scrub(err)  # bad request, auth, not found...: never retried
                    retry_after = _retry_after_s(e.response.headers)
                except openai.APITimeoutError:
                    err = f"http_timeout: no response within {self.gen.http_timeout_s:g}s"
                except openai.APIConnectionError as e:
                    cause = e.__cause__ or e
                    err = f"http_connection_error: {type(cause).__name__}: {cause}"
                except Exception as e:  # noqa: BLE001 - e.g. a body that is not a chat completion: this row only
                    return "", 0, 0, self._scrub(f"http_bad_response: {type(e).__name__}: {e}"[:400])
                else:
                    try:
                        text = resp.choices[0].message.content or ""
                    except (AttributeError, IndexError, TypeError):
                        return "", 0, 0, "http_bad_response: no choices[0].message in the response"
                    usage = getattr(resp, "usage", None)
                    return (text, int(getattr(usage, "completion_tokens", 0) or 0),
                            int(getattr(usage, "prompt_tokens", 0) or 0), "")
            if attempt < self.gen.max_retries:
                self.retries["retried"] += 1
                await asyncio.sleep(_backoff_s(attempt, retry_after))  # outside the semaphore
        return "", 0, 0, self._scrub(err)

    async def _all(self, msgs: list) -> list[tuple[str, int, int, str]]:
        if self._sem is None:  # one per actor, on the actor's loop: the bound holds across batches
            self._sem = asyncio.Semaphore(self.concurrency)
        return await asyncio.gather(*(self._one(self._sem, m) for m in msgs))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        msgs = [json.loads(m) for m in batch["messages_json"]]
        results = self._run(self._all(msgs)) if msgs else []
        batch["generation"] = np.array([r[0] for r in results], dtype=object)
        batch["gen_tokens"] = np.array([r[1] for r in results], dtype=np.int64)
        batch["prompt_tokens"] = np.array([r[2] for r in results], dtype=np.int64)
        batch["gen_error"] = np.array([r[3] for r in results], dtype=object)
        return batch

    def close(self) -> None:
        """Close the client and stop the actor's loop (also at garbage collection)."""
        loop, client, thread = self._loop, self._client, self._thread
        self._loop = self._client = self._sem = None
        if loop is None:
            return
        if thread is threading.current_thread():  # collected on the loop's own thread: just stop it
            loop.call_soon(loop.stop)
            return
        if client is not None:
            try:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5)
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass
