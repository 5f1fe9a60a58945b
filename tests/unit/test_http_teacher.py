"""The OpenAI-compatible HTTP teacher (``openai`` client) against a real local HTTP server on 127.0.0.1 (no Ray).

The server speaks the protocol only (real generation is tested against ``vllm serve`` in
tests/integration/test_http_vllm_serve.py); what each request gets depends on its user message:

* ``OK``: 200, a chat completion with ``usage``;
* ``RATE``: 429 with ``Retry-After: 1`` the first time, then 200;
* ``FLAKY``: 500 the first time, then 200;
* ``DOWN``: 503 always;
* ``BAD``: 400 always; ``AUTH``: 401 always (its message echoes the key, as some servers do);
  ``GONE``: 404 always; ``JUNK``: 200 with a body that is not a chat completion.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from kale_ray.config import GenerationConfig
from kale_ray.runtime.llm import HttpGenerator, _retry_after_s

KEY = "sk-test-123-secret"


class _Handler(BaseHTTPRequestHandler):
    seen: list = []
    hits: Counter = Counter()
    lock = threading.Lock()

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def _error(message: str, kind: str) -> dict:
        return {"error": {"message": message, "type": kind, "code": None}}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        tag = user.split()[0]
        with _Handler.lock:
            _Handler.hits[user] += 1
            n = _Handler.hits[user]
            _Handler.seen.append({"t": time.monotonic(), "user": user, "path": self.path,
                                  "auth": self.headers.get("Authorization"), "body": body})
        if tag == "RATE" and n == 1:
            return self._send(429, self._error("Rate limit reached, slow down", "rate_limit"), {"Retry-After": "1"})
        if tag == "FLAKY" and n == 1:
            return self._send(500, self._error("upstream hiccup", "server_error"))
        if tag == "DOWN":
            return self._send(503, self._error("overloaded", "server_error"))
        if tag == "BAD":
            return self._send(400, self._error("max_tokens is too large", "invalid_request_error"))
        if tag == "AUTH":
            key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            return self._send(401, self._error(f"Incorrect API key provided: {key}", "invalid_request_error"))
        if tag == "JUNK":  # a 200 that is not a chat completion
            return self._send(200, {"hello": "world"})
        if tag == "GONE":
            return self._send(404, self._error("The model `teacher-x` does not exist", "invalid_request_error"))
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {user[:20]}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10 + len(user.split()), "completion_tokens": 3,
                      "total_tokens": 13 + len(user.split())},
        })

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.seen, _Handler.hits = [], Counter()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _gen(url: str, **kw) -> GenerationConfig:
    base = dict(backend="http", http_base_url=url, http_model="teacher-x", http_api_key_env="KALE_TEST_KEY",
                max_retries=2, http_timeout_s=5, batch_size=8)
    return GenerationConfig(**{**base, **kw})


def _batch(*users: str) -> dict[str, np.ndarray]:
    msgs = [json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": u}]) for u in users]
    return {"id": np.array([f"r{i}" for i in range(len(users))], dtype=object),
            "messages_json": np.array(msgs, dtype=object)}


def _times(user: str) -> list[float]:
    return [s["t"] for s in _Handler.seen if s["user"] == user]


def test_retry_rules_errors_and_usage(server, monkeypatch, caplog, capfd):
    monkeypatch.setenv("KALE_TEST_KEY", KEY)
    monkeypatch.setenv("OPENAI_LOG", "debug")  # the client's own debug logging must not show the key either
    caplog.set_level(logging.DEBUG)
    g = HttpGenerator(_gen(server), "ignored")
    users = ["OK one two", "RATE a", "FLAKY b", "BAD c", "AUTH d", "GONE e", "DOWN f", "JUNK g"]
    t0 = time.monotonic()
    out = g(_batch(*users))
    wall = time.monotonic() - t0
    res = {u: (out["generation"][i], int(out["gen_tokens"][i]), int(out["prompt_tokens"][i]), out["gen_error"][i])
           for i, u in enumerate(users)}

    # the 200 row: text, completion and prompt tokens from usage; the id column passes through
    assert res["OK one two"] == ("echo: OK one two", 3, 13, "")
    assert list(out["id"]) == [f"r{i}" for i in range(len(users))]
    # 429 then 200: retried once, after the server's Retry-After (1 s), not the 0.5 s backoff
    assert _Handler.hits["RATE a"] == 2
    assert res["RATE a"] == ("echo: RATE a", 3, 12, "")
    ra = _times("RATE a")
    assert ra[1] - ra[0] >= 0.95, ra
    # 500 then 200: retried once with backoff (~0.4-0.5 s)
    assert _Handler.hits["FLAKY b"] == 2 and res["FLAKY b"][3] == ""
    fl = _times("FLAKY b")
    assert 0.35 <= fl[1] - fl[0] < 0.95, fl
    # 503 always: 1 + max_retries attempts, then the row fails with the status and the server's message
    assert _Handler.hits["DOWN f"] == 3
    assert res["DOWN f"] == ("", 0, 0, "http_503: overloaded")
    # other 4xx: never retried, the row fails at once with status and message
    assert _Handler.hits["BAD c"] == 1 and res["BAD c"] == ("", 0, 0, "http_400: max_tokens is too large")
    assert _Handler.hits["AUTH d"] == 1 and res["AUTH d"][3].startswith("http_401: Incorrect API key provided")
    assert _Handler.hits["GONE e"] == 1 and res["GONE e"][3] == "http_404: The model `teacher-x` does not exist"
    # a 200 that is no chat completion fails its row only
    assert _Handler.hits["JUNK g"] == 1 and res["JUNK g"][3].startswith("http_bad_response: "), res["JUNK g"]
    # the rows ran concurrently: every row's first request went out before the second row's retry (1 s
    # after its first; run one row at a time, that retry would precede the later rows' first requests).
    # The 0.4 s backoff retries are not the bound: on a loaded machine the firsts can spread past them.
    firsts = [_times(u)[0] for u in users]
    assert max(firsts) < _times("RATE a")[1], firsts
    assert wall < 15, wall
    assert g.retries == {"attempts": 8 + 1 + 1 + 2, "retried": 1 + 1 + 2}

    # the key: read from the named env var, sent as the Authorization header, in no error or log
    assert {s["auth"] for s in _Handler.seen} == {f"Bearer {KEY}"}
    assert {s["body"]["model"] for s in _Handler.seen} == {"teacher-x"}
    assert {s["path"] for s in _Handler.seen} == {"/v1/chat/completions"}
    assert all(KEY not in str(e) for e in out["gen_error"])
    assert "***" in res["AUTH d"][3]  # the echoed key was scrubbed
    assert KEY not in caplog.text
    captured = capfd.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert KEY not in repr(g) and KEY not in str(g.__getstate__())
    # request parameters come from the generation config
    body = _Handler.seen[0]["body"]
    assert body["max_tokens"] == 96 and body["temperature"] == 0.0 and body["seed"] == 0
    assert "response_format" not in body
    g.close()


def test_no_key_sends_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("KALE_TEST_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-wrong-variable")  # only the named variable counts
    g = HttpGenerator(_gen(server, http_model=""), "fallback-name")
    out = g(_batch("OK x"))
    assert out["gen_error"][0] == "" and out["generation"][0] == "echo: OK x"
    assert _Handler.seen[0]["auth"] is None
    assert _Handler.seen[0]["body"]["model"] == "fallback-name"
    g.close()


def test_json_schema_structured_output_request(server, monkeypatch):
    monkeypatch.setenv("KALE_TEST_KEY", KEY)
    schema = {"type": "object", "properties": {"facts": {"type": "array", "items": {"type": "string"}}},
              "required": ["facts"], "additionalProperties": False}
    g = HttpGenerator(_gen(server, max_tokens=40), "m", json_schema=schema)
    out = g(_batch("OK s"))
    assert out["gen_error"][0] == ""
    rf = _Handler.seen[0]["body"]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema and rf["json_schema"]["name"]
    assert _Handler.seen[0]["body"]["max_tokens"] == 40
    g.close()


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = HttpGenerator(_gen(f"http://127.0.0.1:{port}/v1", max_retries=1, http_api_key_env=""), "m")
    out = g(_batch("OK a", "OK b"))
    assert list(out["generation"]) == ["", ""]
    assert all(e.startswith("http_connection_error: ") for e in out["gen_error"]), list(out["gen_error"])
    assert g.retries == {"attempts": 4, "retried": 2}
    g.close()


def test_bounded_concurrency_per_actor(monkeypatch):
    """batch_size=2: never more than 2 requests in flight from one generator (actor), across batches too."""
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    class Slow(_Handler):
        def do_POST(self):  # noqa: N802
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.2)
            with lock:
                state["now"] -= 1
            super().do_POST()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        g = HttpGenerator(_gen(f"http://127.0.0.1:{srv.server_address[1]}/v1", batch_size=2,
                               http_api_key_env=""), "m")
        out = g(_batch(*[f"OK {i}" for i in range(6)]))
        assert list(out["gen_error"]) == [""] * 6
        assert state["peak"] == 2, state
        # two batches at once (two caller threads): the bound is the generator's, not the batch's
        outs = []
        threads = [threading.Thread(target=lambda j=j: outs.append(g(_batch(*[f"OK {j}-{i}" for i in range(3)]))))
                   for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [list(o["gen_error"]) for o in outs] == [[""] * 3] * 2
        assert state["peak"] == 2, state
        g.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_retry_after_parsing():
    assert _retry_after_s({"retry-after": "2"}) == 2.0
    assert _retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert _retry_after_s({"retry-after": "soon"}) is None
    assert _retry_after_s({}) is None
    from email.utils import formatdate

    assert 3 <= _retry_after_s({"retry-after": formatdate(time.time() + 5, usegmt=True)}) <= 5
