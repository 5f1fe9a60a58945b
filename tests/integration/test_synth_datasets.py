"""Common QA datasets through synthesis on real local Ray (template backend, builtin:umls KG).

A CommonsenseQA-shaped Parquet file and a ``datasets.save_to_disk`` folder (MMLU shape) are
converted once into ``qa/source.jsonl`` and read by the shards; a bad row is kept aside with
file, row and reason. The prepared training rows load with ``datasets.load_dataset("json")`` and
("parquet") as TRL's SFT prompt-completion format (string ``prompt`` / ``completion`` columns).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kale_ray.config import SynthConfig, load_config

pytestmark = pytest.mark.integration
datasets = pytest.importorskip("datasets")


@pytest.fixture
def ray2():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def umls_questions(n: int) -> list[tuple[str, str, list[str]]]:
    """(question, gold, 4 choices with gold first) from UMLS facts: answers are UMLS entity names."""
    from kale_ray.core.kg import load_kg

    kg = load_kg("builtin:umls")
    names = [kg.entity_name(i) for i in range(kg.num_entities)]
    out, seen = [], set()
    for h, r, t in kg.triples.tolist():
        if (h, r) in seen or h == t:
            continue
        seen.add((h, r))
        gold = kg.entity_name(t)
        others = [x for x in names if x not in (gold, kg.entity_name(h))][len(out) % 50:][:3]
        out.append((f"Which concept is {kg.entity_name(h)} {kg.relation_name(r)}?", gold, [gold, *others]))
        if len(out) == n:
            break
    return out


def csqa_rows(n: int) -> list[dict]:
    rows = []
    for i, (q, gold, choices) in enumerate(umls_questions(n)):
        order = choices[i % 4:] + choices[:i % 4]
        labels = "ABCD"
        rows.append({"id": f"csqa-{i}", "question": q, "question_concept": "umls",
                     "choices": {"label": list(labels), "text": order}, "answerKey": labels[order.index(gold)]})
    return rows


def _run(out: Path, source: Path, *extra: str):
    from kale_ray.synth.pipeline import run_synthesis

    cfg = load_config(SynthConfig, None, [f"out_dir={out}", "generation.backend=template", "kg.source=builtin:umls",
                                          f"qa.source={source}", "shard_size=5", *extra])
    log: list[str] = []
    return run_synthesis(cfg, progress=log.append), log


def _accounted(s) -> None:
    assert s.rows_out > 0
    assert s.rows_in == s.rows_out + sum(s.rejected.values())


def test_csqa_parquet_and_a_save_to_disk_folder_through_synthesis(tmp_path, ray2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = csqa_rows(12)
    rows[7] = dict(rows[7], answerKey="E")  # not a label: kept aside, never guessed
    src = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=4)
    out = tmp_path / "csqa"
    s, log = _run(out, src)
    _accounted(s)
    assert s.rows_in == 11 and s.qa["source_rows"] == 12 and s.qa["format"] == "csqa"
    assert s.qa["rejected_lines"] == {"answer_not_in_choices": 1}
    assert any("format csqa (detected from the first row)" in m and "qa.parquet:row 7: answerKey 'E' not among choice "
               "labels A-D" in m for m in log), log
    rej = [json.loads(x) for x in (out / "rejects" / "qa_lines.jsonl").read_text().splitlines()]
    assert [(r["file"], r["row"], r["reason"]) for r in rej] == [(str(src), 7, "answer_not_in_choices")]
    kept = [json.loads(x) for p in sorted((out / "data").glob("shard-*.jsonl")) for x in p.read_text().splitlines()]
    gold = {r["id"]: r for r in rows}
    for k in kept:
        g = gold[k["id"]]
        assert k["answer"] == g["choices"]["text"][g["choices"]["label"].index(g["answerKey"])]
    again, _ = _run(out, src)  # resumed: nothing redone, the conversion reused
    assert again.shards_skipped == again.shards_total and again.rows_out == s.rows_out

    # an MMLU-shaped DatasetDict saved with save_to_disk (its "train" split), integer answers
    mmlu = [{"question": q, "subject": "umls", "choices": c[1:2] + c[:1] + c[2:], "answer": 1}
            for q, _, c in umls_questions(10)]
    folder = tmp_path / "mmlu_disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(mmlu),
                          "test": datasets.Dataset.from_list(mmlu[:2])}).save_to_disk(str(folder))
    out2 = tmp_path / "mmlu"
    s2, log2 = _run(out2, folder, f"qa.test_file={folder}")  # its held-out questions: the "test" split
    _accounted(s2)
    assert s2.qa["format"] == "mmlu" and s2.qa["source_rows"] == s2.rows_in == 10
    assert s2.qa["test"] == 2
    test = [json.loads(x) for x in (out2 / "qa" / "test.jsonl").read_text().splitlines()]
    assert [t["answer"] for t in test] == [m["choices"][1] for m in mmlu[:2]] and all(t["answer_linked"] for t in test)
    assert s2.qa["rejected_lines"] == {}
    ids = sorted(json.loads(x)["id"] for p in (out2 / "data").glob("shard-*.jsonl") for x in p.read_text().splitlines())
    assert ids and all(i.startswith("mmlu_disk:") for i in ids)  # no id column: source name + row index

    # the prepared training rows: datasets.load_dataset("json" / "parquet") and TRL's prompt-completion SFT format
    from kale_ray.models import resolve_model
    from kale_ray.synth.format import write_training_rows

    dest = tmp_path / "train_rows"
    counts = write_training_rows(out, resolve_model("builtin:tiny-llama"), dest)
    assert counts["rows"] == s.rows_out
    parts = sorted(str(p) for p in dest.glob("part-*.jsonl"))
    ds = datasets.load_dataset("json", data_files=parts, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == s.rows_out
    assert {"prompt", "completion"} <= set(ds.column_names)
    assert ds.features["prompt"].dtype == ds.features["completion"].dtype == "string"
    assert all(p and c and not p.endswith(c) for p, c in zip(ds["prompt"], ds["completion"]))
    pq_file = tmp_path / "train_rows.parquet"
    ds.to_parquet(str(pq_file))
    ds2 = datasets.load_dataset("parquet", data_files=str(pq_file), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds2["prompt"] == ds["prompt"] and ds2["completion"] == ds["completion"]


def test_a_changed_parquet_source_is_a_changed_input(tmp_path, ray2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kale_ray.runtime.stages import StaleOutputError

    src = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(csqa_rows(4)), src)
    out = tmp_path / "synth"
    _run(out, src)
    pq.write_table(pa.Table.from_pylist(csqa_rows(5)), src)
    with pytest.raises(StaleOutputError, match="inputs.qa"):
        _run(out, src)
