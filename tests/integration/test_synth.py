"""KI synthesis end to end on real local Ray + Ray Data + vLLM (CPU) with the tiny Llama teacher.

The vLLM run is killed (SIGKILL of the driver's whole process group) after its first
shard is written, then rerun: the resumed output must hold every question exactly once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kale_ray.config import SynthConfig, load_config
from kale_ray.core.kg import load_kg
from kale_ray.core.qa import read_qa_jsonl

pytestmark = pytest.mark.integration

RUNNER = """
import os, sys, time, ray
from kale_ray.config import SynthConfig, load_config
from kale_ray.synth import pipeline
if __name__ == "__main__":
    if os.environ.get("TEST_PAUSE_AFTER_FIRST_SHARD"):
        # test-only plug-in: the driver stalls once a shard is marked done, so the SIGKILL lands mid-run
        def stall(shard, counts):
            print(f"stalling after shard {shard}", flush=True)
            time.sleep(3600)
        pipeline._on_shard_done = stall
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pipeline.run_synthesis(load_config(SynthConfig, None, sys.argv[1:]))
"""


def vllm_overrides(out: Path) -> list[str]:
    return [
        f"out_dir={out}", "teacher.name=builtin:tiny-llama", "teacher.max_model_len=512",
        "generation.backend=vllm", "generation.max_tokens=24", "generation.batch_size=4",
        "qa.num_questions=32", "qa.seed=1", "shard_size=6", "teacher_min_hops=0",
        "max_teacher_failure_rate=1.0",  # the tiny random teacher fails most rows (their template stays)
    ]


def read_shards(out: Path, kind: str) -> list[dict]:
    rows = []
    for p in sorted((out / kind).glob("shard-*.jsonl")):
        rows += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return rows


def run_driver(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def test_vllm_synthesis_killed_and_resumed(tmp_path):
    out = tmp_path / "synth"
    args = vllm_overrides(out)
    # The driver stalls right after the first shard is marked done (a test-only hook), so the
    # SIGKILL lands mid-run whatever the machine's speed.
    proc = run_driver(args, tmp_path / "run1.log", TEST_PAUSE_AFTER_FIRST_SHARD="1")
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if "stalling after shard" in (tmp_path / "run1.log").read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"run ended before it could be killed:\n{(tmp_path / 'run1.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the vLLM engine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # A shard merge already running in a Ray worker may still land just after the kill: let the
    # local cluster's processes go (they follow their driver), then take stock.
    time.sleep(5)
    done_before = {p.name for p in (out / "data").glob("shard-*.done")}
    train = list(read_qa_jsonl(out / "qa" / "train.jsonl"))
    n_shards = (len(train) + 5) // 6
    assert 1 <= len(done_before) < n_shards, (done_before, n_shards)
    before = {p.name: p.read_text() for p in (out / "data").glob("shard-*.jsonl")
              if p.with_suffix(".done").name in done_before}

    proc = run_driver(args, tmp_path / "run2.log")
    assert proc.wait(timeout=500) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    log2 = (tmp_path / "run2.log").read_text()
    assert f"resuming: {len(done_before)}/{n_shards} shards already done" in log2

    # finished shards were not redone
    for name, text in before.items():
        assert (out / "data" / name).read_text() == text
    kept, rejected = read_shards(out, "data"), read_shards(out, "rejects")
    final_rejects = [r for r in rejected if not r.get("kept_with_fallback")]
    ids = [r["id"] for r in kept] + [r["id"] for r in final_rejects]
    assert sorted(ids) == sorted(q.id for q in train), "every question exactly once, across kept + rejected"
    assert len(ids) == len(set(ids))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == len(train)
    assert summary["rows_out"] == len(kept)
    assert summary["shards_skipped"] == len(done_before)
    # the random tiny teacher writes gibberish: verification must reject it (and say why)
    assert sum(summary["teacher_rejected"].values()) > 0
    assert summary["tokens_generated"] > 0

    kg = load_kg("builtin:umls")
    for row in kept:
        for key in ("id", "question", "answer", "question_entities", "answer_entities", "paths", "rationale", "teacher"):
            assert key in row
        assert row["paths"], row["id"]
        for path in row["paths"]:
            for h, r, t in path:
                assert kg.has_named_triple(h, r, t), (row["id"], h, r, t)
        if row["teacher"].startswith("vllm"):
            assert any(a.lower() in row["rationale"].lower() for a in row["all_answers"])


def test_template_backend_in_process(tmp_path):
    import ray

    from kale_ray.synth.pipeline import run_synthesis

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(SynthConfig, None, [f"out_dir={tmp_path}", "generation.backend=template",
                                          "qa.num_questions=40", "shard_size=16"])
    s = run_synthesis(cfg, progress=lambda m: None)
    assert s.rows_in == s.rows_out + sum(s.rejected.values())
    assert s.teacher_counts == {"template": s.rows_out}
    again = run_synthesis(cfg, progress=lambda m: None)  # everything done: nothing redone
    assert again.shards_skipped == again.shards_total
    assert again.rows_out == s.rows_out


def _template_cfg(out, *extra):
    return load_config(SynthConfig, None, [f"out_dir={out}", "generation.backend=template", *extra])


def _all_rows(out):
    return read_shards(out, "data") + [r for r in read_shards(out, "rejects") if not r.get("kept_with_fallback")]


@pytest.fixture
def ray2():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


@pytest.mark.parametrize("change", ["qa.num_questions=30", "paths.k=1", "shard_size=5"])
def test_rerun_with_changed_settings_is_refused_never_mixed(tmp_path, ray2, change):
    from kale_ray.runtime.stages import StaleOutputError
    from kale_ray.synth.pipeline import run_synthesis

    out = tmp_path / "synth"
    base = ("qa.num_questions=20", "shard_size=8")
    first = run_synthesis(_template_cfg(out, *base), progress=lambda m: None)
    before = sorted(r["id"] for r in _all_rows(out))
    kept_before = read_shards(out, "data")
    key = change.split("=")[0]
    with pytest.raises(StaleOutputError, match=re.escape(key)):
        run_synthesis(_template_cfg(out, *base, change), progress=lambda m: None)
    assert sorted(r["id"] for r in _all_rows(out)) == before  # nothing written by the refused run
    # on_change=overwrite: the old outputs go, the new run is computed under the new settings only
    s = run_synthesis(_template_cfg(out, *base, change, "on_change=overwrite"), progress=lambda m: None)
    rows = _all_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == s.rows_in  # never a duplicated row
    assert s.shards_skipped == 0
    if key == "paths.k":
        assert any(len(r["paths"]) > 1 for r in kept_before)
        assert all(len(r["paths"]) == 1 for r in read_shards(out, "data"))
    if key == "qa.num_questions":
        assert s.rows_in != first.rows_in or sorted(ids) != before


def test_rerun_with_a_changed_question_file_is_refused(tmp_path, ray2):
    from kale_ray.runtime.stages import StaleOutputError
    from kale_ray.synth.pipeline import run_synthesis

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "a1", "question": "What is dorsal fin a part of?", "answer": "fish"}) + "\n")
    out = tmp_path / "synth"
    run_synthesis(_template_cfg(out, f"qa.source={qa}"), progress=lambda m: None)
    qa.write_text(qa.read_text() + json.dumps({"id": "a2", "question": "x?", "answer": "y"}) + "\n")
    with pytest.raises(StaleOutputError, match="inputs.qa"):
        run_synthesis(_template_cfg(out, f"qa.source={qa}"), progress=lambda m: None)


def test_unsupported_storage_scheme_is_a_clear_error_not_a_local_folder(tmp_path, monkeypatch, ray2):
    from kale_ray.runtime.storage import StorageError
    from kale_ray.synth.pipeline import run_synthesis

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="unsupported storage scheme 'nosuch'"):
        run_synthesis(_template_cfg("nosuch://bucket/x"), progress=lambda m: None)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_cli_refuses_a_stale_out_dir_with_one_line_and_exit_2(tmp_path, ray2, capsys):
    from kale_ray.cli import main

    out = tmp_path / "synth"
    assert main(["synthesize", f"out_dir={out}", "generation.backend=template", "qa.num_questions=12"]) == 0
    capsys.readouterr()
    assert main(["synthesize", f"out_dir={out}", "generation.backend=template", "qa.num_questions=13"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qa.num_questions: 12 -> 13" in err[0] and "on_change=overwrite" in err[0], err
    assert main(["synthesize", "out_dir=nosuch://b/x", "generation.backend=template"]) == 2
    assert "unsupported storage scheme" in capsys.readouterr().err
