"""Synthesis into an S3 bucket on a real S3-compatible server (moto's server mode, on 127.0.0.1):
the same shard files and markers as on a local disk, and a resume after a SIGKILL mid-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kale_ray.core.qa import read_qa_jsonl
from kale_ray.runtime.storage import Storage

pytestmark = pytest.mark.integration

RUNNER = """
import os, sys, time, ray
from kale_ray.config import SynthConfig, load_config
from kale_ray.synth import pipeline
if __name__ == "__main__":
    if os.environ.get("TEST_PAUSE_AFTER_FIRST_SHARD"):
        def stall(shard, counts):  # test-only plug-in: the driver stalls once a shard is marked done
            print(f"stalling after shard {shard}", flush=True)
            time.sleep(3600)
        pipeline._on_shard_done = stall
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pipeline.run_synthesis(load_config(SynthConfig, None, sys.argv[1:]))
"""


def _run(args, log, **env):
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def test_synthesis_to_s3_killed_and_resumed_every_row_once(s3_server, tmp_path):
    uri = "s3://bucket/runs/synth"
    args = [f"out_dir={uri}", "generation.backend=template", "qa.num_questions=40", "shard_size=8",
            "paths.k=10", "paths.oversample=10", "paths.max_hops=4"]
    proc = _run(args, tmp_path / "run1.log", TEST_PAUSE_AFTER_FIRST_SHARD="1")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if "stalling after shard" in (tmp_path / "run1.log").read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    st = Storage.from_uri(uri)
    assert not os.path.exists("s3:"), "never a local folder named after the scheme"
    done_before = set(st.list("data", suffix=".done"))
    assert done_before, "the killed run had marked a shard done on S3"
    before = {n: st.read_text(f"data/{n[:-5]}.jsonl") for n in done_before}

    proc = _run(args, tmp_path / "run2.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    assert "shards already done" in (tmp_path / "run2.log").read_text()
    for n, text in before.items():  # finished shards were not redone
        assert st.read_text(f"data/{n[:-5]}.jsonl") == text

    qa_local = tmp_path / "train.jsonl"
    qa_local.write_bytes(st.read_bytes("qa/train.jsonl"))
    train_ids = sorted(q.id for q in read_qa_jsonl(qa_local))
    kept = [r for n in st.list("data", suffix=".jsonl") for r in st.read_jsonl(f"data/{n}")]
    rejected = [r for n in st.list("rejects", suffix=".jsonl") if n.startswith("shard-")
                for r in st.read_jsonl(f"rejects/{n}") if not r.get("kept_with_fallback")]
    ids = [r["id"] for r in kept] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids)), "no row twice"
    assert sorted(ids) == train_ids, "every question exactly once, across kept + rejected"
    summary = json.loads(st.read_text("summary.json"))
    assert summary["rows_in"] == len(train_ids) and summary["rows_out"] == len(kept)
    assert st.exists("stages/synthesis.json")
