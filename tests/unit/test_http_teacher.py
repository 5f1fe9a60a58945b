"""The OpenAI-compatible HTTP teacher client against a local server on 127.0.0.1 (no Ray).

The server is a stand-in for the endpoint's protocol only; real generation is tested
through vLLM in the integration tests.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from kale_ray.config import GenerationConfig
from kale_ray.llm import HttpGenerator


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({"auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][-1]["content"]
        if "FAIL" in user:
            self.send_response(500)
            self.end_headers()
            return
        out = {"choices": [{"message": {"content": f"echo: {user[:20]}"}}], "usage": {"completion_tokens": 3}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_http_generator_fills_rows_and_reports_failures(server, monkeypatch):
    monkeypatch.setenv("KALE_TEST_KEY", "sk-test-123")
    gen = GenerationConfig(backend="http", http_base_url=server, http_model="teacher-x", http_api_key_env="KALE_TEST_KEY",
                           max_retries=1, http_timeout_s=5, batch_size=4)
    g = HttpGenerator(gen, "ignored")
    msgs = [json.dumps([{"role": "user", "content": "explain A"}]), json.dumps([{"role": "user", "content": "FAIL B"}])]
    out = g({"id": np.array(["a", "b"], dtype=object), "messages_json": np.array(msgs, dtype=object)})
    assert out["generation"][0] == "echo: explain A"
    assert out["gen_tokens"][0] == 3 and out["gen_error"][0] == ""
    assert out["generation"][1] == "" and out["gen_error"][1].startswith("http_error")
    # the key goes in the header, read from the environment; the model name from the config
    assert _Handler.seen[0]["auth"] == "Bearer sk-test-123"
    assert _Handler.seen[0]["body"]["model"] == "teacher-x"
    # a failing row was retried max_retries times, then given up
    assert sum("FAIL" in s["body"]["messages"][-1]["content"] for s in _Handler.seen) == 2
