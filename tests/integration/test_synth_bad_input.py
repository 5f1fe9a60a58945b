"""Synthesis on bad input, end to end on real local Ray (issue 13 items 7, 8, 9, 11).

* a teacher that fails on every row (a real local HTTP endpoint answering 500) stops the run
  with one line and exit 2; a rerun with ``max_teacher_failure_rate=1.0`` resumes and reports a
  teacher share of 0;
* a reused QA id: the later row is rejected as ``duplicate_id`` (file, line, first line), across
  shards and within one, and every line is accounted for once;
* a test row whose answer does not link to the KG is kept, marked and counted;
* a small KG: what was generated per hop count and split, and warnings.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kale_ray.config import SynthConfig, load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray2():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


class _Down(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every request with 500."""

    hits = 0

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Down.hits += 1
        data = json.dumps({"error": {"message": "upstream is down", "type": "server_error", "code": None}}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def down_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Down)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Down.hits = 0
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _rows(out, kind):
    rows = []
    for p in sorted((out / kind).glob("shard-*.jsonl")):
        rows += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return rows


def test_teacher_failing_every_row_stops_early_and_a_higher_rate_resumes(tmp_path, ray2, down_server, capsys):
    from kale_ray.cli import main

    out = tmp_path / "synth"
    args = ["synthesize", f"out_dir={out}", "generation.backend=http", f"generation.http_base_url={down_server}",
            "generation.max_retries=0", "generation.http_timeout_s=10", "generation.batch_size=8",
            "qa.num_questions=40", "shard_size=16", "teacher_min_hops=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    ours = [x for x in err.splitlines() if x.startswith("kale-ray ")]  # the rest: Ray Data's own log lines
    assert len(ours) == 1 and "Traceback" not in err, err[-3000:]
    msg = ours[0]
    assert msg.startswith("kale-ray synthesize: the teacher (http) failed on ")
    assert "max_teacher_failure_rate=0.5" in msg and "generation_failed (http_500)" in msg
    assert "upstream is down" in msg  # the sample error
    assert "max_teacher_failure_rate=1.0" in msg and "generation.backend=template" in msg
    assert "a rerun resumes" in msg
    assert _Down.hits >= 20
    assert not (out / "summary.json").exists()

    # A higher rate is not an output setting: the same out_dir resumes and finishes.
    assert main(args + ["max_teacher_failure_rate=1.0"]) == 0
    printed = capsys.readouterr().out
    assert "teacher share of kept rationales: 0.0%" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["teacher_share"] == 0
    assert s["rows_in"] == s["rows_out"] + sum(s["rejected"].values())
    assert s["rows_out"] > 0 and set(s["teacher_counts"]) == {"template-fallback"}
    assert s["teacher_failures"]["tried"] == s["teacher_failures"]["failed"] > 0
    ids = [r["id"] for r in _rows(out, "data")] + [r["id"] for r in _rows(out, "rejects") if not r.get("kept_with_fallback")]
    assert len(ids) == len(set(ids)) == s["rows_in"]


def _qa_line(q, **change):
    d = q.to_dict()
    d.pop("probes", None)
    d.update(change)
    return json.dumps(d)


def test_duplicate_ids_are_rejected_and_unlinked_test_answers_marked(tmp_path, ray2, umls_questions):
    from kale_ray.synth.pipeline import run_synthesis

    qs = [q for q in umls_questions if q.num_hops <= 2][:12]
    lines = [_qa_line(q, id=f"t{i}") for i, q in enumerate(qs[:9])]  # lines 1-9: t0..t8
    lines.insert(4, "{nope")  # line 5: malformed, no id
    lines.insert(6, _qa_line(qs[9], id="t1"))  # line 7: reuses t1 (line 2), same shard
    lines.append(_qa_line(qs[10], id="t1"))  # line 12: reuses t1 again, another shard
    lines.append(_qa_line(qs[11], id="t6"))  # line 13: reuses t6 (line 9 now)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(lines) + "\n")
    test = tmp_path / "test.jsonl"
    multi = [q for q in umls_questions if q.num_hops >= 2][-3:]
    test.write_text("\n".join([_qa_line(q) for q in multi] + [
        json.dumps({"id": "u1", "question": "Which concept is a unicorn?", "answer": "a unicorn horn"})]) + "\n")
    out = tmp_path / "synth"
    msgs: list[str] = []
    cfg = load_config(SynthConfig, None, [f"out_dir={out}", "generation.backend=template", f"qa.source={qa}",
                                          f"qa.test_file={test}", "shard_size=5"])
    s = run_synthesis(cfg, progress=msgs.append)

    assert s.rejected.get("duplicate_id") == 3, s.rejected
    dup = sorted((r for r in _rows(out, "rejects") if r["reason"] == "duplicate_id"), key=lambda r: r["line"])
    assert [(r["id"], r["line"], r["first_line"]) for r in dup] == [("t1", 7, 2), ("t1", 12, 2), ("t6", 13, 9)]
    assert all(r["file"] == str(qa) for r in dup)
    assert "already used on line 2" in dup[0]["detail"]
    kept = _rows(out, "data")
    by_id = {r["id"]: r for r in kept}
    assert by_id["t1"]["question"] == qs[1].question  # the first line's row is the one kept
    # every line once: 13 lines = 12 rows (kept + rejected) + 1 malformed line
    assert s.rows_in == 12 == s.rows_out + sum(s.rejected.values())
    assert s.qa["rejected_lines"] == {"malformed_qa": 1}
    ids = [r["id"] for r in kept] + [r["id"] for r in _rows(out, "rejects") if r["reason"] != "duplicate_id"]
    assert sorted(ids) == sorted(f"t{i}" for i in range(9))

    # the test row whose answer names no KG entity: kept, marked, counted, warned about
    rows = [json.loads(x) for x in (out / "qa" / "test.jsonl").read_text().splitlines()]
    assert [r["answer_linked"] for r in rows] == [True, True, True, False]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["qa"]["test_unlinked"] == 1 and summary["qa"]["test"] == 4
    assert any("1 of 4 test questions have an answer that does not link" in w for w in summary["warnings"])
    assert any("fewer than 30" in w for w in summary["warnings"])
    assert any("3 rows reuse the id of an earlier line" in m for m in msgs)
    assert any(m.startswith("[synth] warning: ") and "answer_linked=false" in m for m in msgs)
    assert any("teacher share of kept rationales: 0.0%" in m for m in msgs)  # the template backend


def test_small_kg_says_what_was_generated_and_warns(tmp_path, ray2):
    from kale_ray.synth.pipeline import run_synthesis

    kg = tmp_path / "tiny.tsv"  # depth 2 at most: no 3-hop chain exists
    kg.write_text("".join(f"person{i}\tborn_in\tcity{i % 3}\ncity{i % 3}\tlocated_in\tcountry{i % 2}\n" for i in range(6)))
    out = tmp_path / "synth"
    msgs: list[str] = []
    cfg = load_config(SynthConfig, None, [f"out_dir={out}", "generation.backend=template", f"kg.source={kg}",
                                          "qa.num_questions=20", "shard_size=8"])
    s = run_synthesis(cfg, progress=msgs.append)
    qa = s.qa
    assert qa["requested"] == 20 and qa["generated"] < 20
    assert "3" not in qa["generated_by_hops"] and qa["generated_by_hops"]["1"] > 0
    assert qa["test"] == sum(qa["test_by_hops"].values()) < 30
    assert sum(qa["train_by_hops"].values()) == qa["train"] == s.rows_in
    w = s.warnings
    assert any(f"{qa['generated']} questions generated of qa.num_questions=20" in x for x in w), w
    assert any("no 3-hop questions" in x for x in w), w
    assert any("fewer than 30" in x for x in w), w
    assert json.loads((out / "summary.json").read_text())["warnings"] == w
    assert sum(m.startswith("[synth] warning: ") for m in msgs) == len(w)
    line = next(m for m in msgs if m.startswith("[synth] questions: 20 asked"))
    assert f"{qa['generated']} generated" in line and "test" in line and "1-hop" in line
    # a rerun (everything done) says the same from qa/questions.json
    again = run_synthesis(cfg, progress=lambda m: None)
    assert again.warnings == w and again.qa == qa
