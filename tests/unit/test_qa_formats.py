"""Common QA dataset shapes -> our rows (kale_ray.core.qa_formats), and the source readers of the pipeline."""
from __future__ import annotations

import json

import pytest

from kale_ray.core.qa import read_qa_jsonl
from kale_ray.core.qa_formats import RowError, convert_row, detect_format

CSQA_NESTED = {"id": "q1", "question": {"stem": "Where is a fish?",
                                        "choices": [{"label": "A", "text": "sea"}, {"label": "B", "text": "sky"}]},
               "answerKey": "A"}
CSQA_FLAT = {"id": "q2", "question": "Where is a bird?", "question_concept": "bird",
             "choices": {"label": ["A", "B", "C"], "text": ["sea", "sky", "rock"]}, "answerKey": "B"}
OBQA = {"id": "o1", "question_stem": "The sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
        "answerKey": "A"}
MEDQA = {"question": "Which drug?", "answer": "aspirin", "options": {"A": "insulin", "B": "aspirin"},
         "meta_info": "step1", "answer_idx": "B"}
MEDQA_LIST = {"question": "Which drug?", "options": ["insulin", "aspirin"], "answer_idx": 0}
MMLU = {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
STRATEGY = {"qid": "s1", "term": "x", "question": "Is the sea wet?", "answer": True, "facts": []}
OURS = {"id": "k1", "question": "What is X?", "answer": "fish", "choices": ["fish", "bird"]}


@pytest.mark.parametrize("row, fmt, want", [
    (CSQA_NESTED, "csqa", {"id": "q1", "question": "Where is a fish?", "answer": "sea", "choices": ["sea", "sky"]}),
    (CSQA_FLAT, "csqa", {"id": "q2", "question": "Where is a bird?", "answer": "sky",
                         "choices": ["sea", "sky", "rock"]}),
    (OBQA, "csqa", {"id": "o1", "question": "The sun is a", "answer": "star", "choices": ["star", "moon"]}),
    (MEDQA, "medqa", {"id": "med.jsonl:3", "question": "Which drug?", "answer": "aspirin",
                      "choices": ["insulin", "aspirin"]}),
    (MEDQA_LIST, "medqa", {"id": "med.jsonl:3", "question": "Which drug?", "answer": "insulin",
                           "choices": ["insulin", "aspirin"]}),
    (MMLU, "mmlu", {"id": "med.jsonl:3", "question": "2+2?", "answer": "4", "choices": ["3", "4", "5", "6"]}),
    (dict(MMLU, answer="C"), "mmlu", {"id": "med.jsonl:3", "question": "2+2?", "answer": "5",
                                      "choices": ["3", "4", "5", "6"]}),
    (STRATEGY, "strategyqa", {"id": "s1", "question": "Is the sea wet?", "answer": "yes", "choices": ["yes", "no"]}),
    (dict(STRATEGY, answer="false"), "strategyqa", {"id": "s1", "question": "Is the sea wet?", "answer": "no",
                                                   "choices": ["yes", "no"]}),
    (OURS, "kale", OURS),
    (dict(OURS, answer="B"), "kale", dict(OURS, answer="bird")),
])
def test_each_shape_becomes_our_row_and_reads_back(row, fmt, want, tmp_path):
    got = convert_row(row, fmt, source="med.jsonl", index=3)
    assert got == want
    assert list(got)[0] == "id"
    p = tmp_path / "qa.jsonl"  # what the shards read: our reader takes it with no reject
    p.write_text(json.dumps(got) + "\n")
    ex = list(read_qa_jsonl(p, on_error="error"))
    assert [(e.id, e.question, e.answer, e.choices) for e in ex] == [(want["id"], want["question"], want["answer"],
                                                                      want["choices"])]


@pytest.mark.parametrize("row, fmt", [(CSQA_NESTED, "csqa"), (CSQA_FLAT, "csqa"), (OBQA, "csqa"), (MEDQA, "medqa"),
                                      (MEDQA_LIST, "medqa"), (MMLU, "mmlu"), (STRATEGY, "strategyqa"), (OURS, "kale"),
                                      ({"question": "q", "answer": "a"}, "kale")])
def test_auto_detection_from_the_first_rows_keys(row, fmt):
    assert detect_format(row) == fmt


def test_detection_says_what_to_set_when_nothing_fits():
    with pytest.raises(ValueError, match="qa.format"):
        detect_format({"text": "x", "label": 1})
    assert detect_format({"q": "x?", "a": "y"}, {"question": "q", "answer": "a"}) == "kale"


def test_column_mapping():
    row = {"uid": 7, "prompt": "Largest ocean?", "gold": "b", "opts": ["Atlantic", "Pacific"]}
    cols = {"question": "prompt", "answer": "gold", "id": "uid", "choices": "opts"}
    assert convert_row(row, "kale", cols) == {"id": "7", "question": "Largest ocean?", "answer": "Pacific",
                                              "choices": ["Atlantic", "Pacific"]}
    # several columns as the options (an MMLU-style CSV: question, A, B, C, D, answer letter)
    csv_row = {"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "target": "B"}
    got = convert_row(csv_row, "mmlu", {"choices": "A,B,C,D", "answer": "target"}, source="mmlu.csv", index=0)
    assert got == {"id": "mmlu.csv:0", "question": "2+2?", "answer": "4", "choices": ["3", "4", "5", "6"]}
    # a CSV cell holding the choices as JSON
    assert convert_row({"question": "q?", "choices": '["x", "y"]', "answer": "1"}, "mmlu")["answer"] == "y"
    with pytest.raises(RowError, match="no column 'nope'"):
        convert_row(row, "kale", {"question": "nope"})


@pytest.mark.parametrize("row, fmt, reason, message", [
    (dict(CSQA_FLAT, answerKey="E"), "csqa", "answer_not_in_choices", "answerKey 'E' not among choice labels A-C"),
    (dict(CSQA_FLAT, answerKey=""), "csqa", "malformed_qa", "missing or empty 'answerKey'"),
    (dict(CSQA_FLAT, question=""), "csqa", "malformed_qa", "missing or empty 'question'"),
    (dict(CSQA_FLAT, choices={"label": ["A", "A"], "text": ["x", "y"]}), "csqa", "malformed_qa", "repeats a label"),
    (dict(MMLU, answer=4), "mmlu", "answer_not_in_choices", "answer 4 out of range for 4 choices"),
    (dict(MMLU, choices=[]), "mmlu", "malformed_qa", "missing or empty 'choices'"),
    (dict(MEDQA, answer="insulin"), "medqa", "answer_not_in_choices", "disagrees with answer_idx 'B'"),
    (dict(MEDQA, answer_idx="Z"), "medqa", "answer_not_in_choices", "neither a choice label"),
    (dict(STRATEGY, answer="maybe"), "strategyqa", "malformed_qa", "must be a boolean"),
    (dict(STRATEGY, answer=None), "strategyqa", "malformed_qa", "must be a boolean"),
    (dict(OURS, answer="whale"), "kale", "answer_not_in_choices", "neither a choice label"),
    ({"question": "q?", "answer": ["a"]}, "kale", "malformed_qa", "'answer' must be text"),
])
def test_bad_rows_get_a_reason_never_a_guess(row, fmt, reason, message):
    with pytest.raises(RowError, match=message) as e:
        convert_row(row, fmt)
    assert e.value.reason == reason


def test_an_unknown_format_is_a_config_error():
    with pytest.raises(ValueError, match="qa.format"):
        convert_row(OURS, "squad")


# --------------------------------------------------------------------------- #
# The pipeline's source readers (no Ray): file -> qa/source.jsonl with rejects by file and row
# --------------------------------------------------------------------------- #
def _convert(tmp_path, source, *extra):
    from kale_ray.config import SynthConfig, load_config
    from kale_ray.runtime.storage import Storage
    from kale_ray.synth.qa_source import CONVERTED_QA, convert_qa_source

    out = tmp_path / "out"
    cfg = load_config(SynthConfig, None, [f"out_dir={out}", f"qa.source={source}", *extra])
    storage = Storage.from_uri(str(out))
    storage.makedirs()
    info = convert_qa_source(cfg, storage)
    if info is None:
        return None, [], []
    lines = (out / CONVERTED_QA).read_text().split("\n")[:-1]
    rej = out / "rejects" / "qa_lines" / "source.jsonl"
    return info, lines, [json.loads(x) for x in rej.read_text().splitlines()] if rej.exists() else []


def _csqa_rows(n: int, bad: int) -> list[dict]:
    rows = [dict(CSQA_FLAT, id=f"c{i}") for i in range(n)]
    rows[bad] = dict(rows[bad], answerKey="E")
    return rows


def test_parquet_source_converted_with_rejects_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(_csqa_rows(20, 17)), src, row_group_size=7)
    info, lines, rej = _convert(tmp_path, src)
    assert info["format"] == "csqa" and info["source_rows"] == 20 and info["converted"] == 19
    assert info["source_rejected"] == {"answer_not_in_choices": 1}
    assert info["first_reject"] == "qa.parquet:row 17: answerKey 'E' not among choice labels A-C"
    assert len(lines) == 20 and lines[17] == ""  # line k is row k-1: every reject's line names its row
    assert json.loads(lines[3])["id"] == "c3"
    assert [(r["row"], r["line"], r["reason"]) for r in rej] == [(17, 18, "answer_not_in_choices")]
    assert rej[0]["file"] == str(src)


def test_csv_source_every_cell_as_text(tmp_path):
    src = tmp_path / "mmlu.csv"
    src.write_text('question,A,B,C,D,answer\n"2+2, in base 10?",3,4,5,6,1\nbad,3,4,5,6,9\n')
    info, lines, rej = _convert(tmp_path, src, "qa.format=mmlu", "qa.columns.choices=A,B,C,D")
    assert info["converted"] == 1
    assert json.loads(lines[0]) == {"id": "mmlu.csv:0", "question": "2+2, in base 10?", "answer": "4",
                                    "choices": ["3", "4", "5", "6"]}
    assert rej[0]["row"] == 1 and "out of range" in rej[0]["message"]


def test_save_to_disk_folder_and_a_split_of_a_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([STRATEGY, dict(STRATEGY, qid="s2", answer=False)])
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    info, lines, _ = _convert(tmp_path, tmp_path / "dd")
    assert info["format"] == "strategyqa" and info["source_kind"] == "disk"
    assert [json.loads(x)["answer"] for x in lines] == ["yes", "no"]
    with pytest.raises(ValueError, match="holds the splits"):
        _convert(tmp_path / "x", tmp_path / "dd", "qa.split=test")


def test_datasets_json_file_and_other_shaped_jsonl(tmp_path):
    pytest.importorskip("datasets")
    src = tmp_path / "medqa.json"
    src.write_text(json.dumps([MEDQA, MEDQA_LIST]))
    info, lines, _ = _convert(tmp_path, src)
    assert info["format"] == "medqa" and info["source_kind"] == "datasets" and info["converted"] == 2
    jl = tmp_path / "csqa.jsonl"  # CommonsenseQA's own JSONL: converted line by line, a bad line kept aside
    jl.write_text(json.dumps(CSQA_NESTED) + "\n\n{not json\n" + json.dumps(dict(CSQA_NESTED, id="q9")) + "\n")
    info, lines, rej = _convert(tmp_path / "j", jl)
    assert info["format"] == "csqa" and info["converted"] == 2 and len(lines) == 4
    assert [(r["line"], r["reason"]) for r in rej] == [(3, "malformed_qa")]


def test_our_jsonl_is_read_in_place(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps(OURS) + "\n")
    assert _convert(tmp_path, src)[0] is None
    # a column mapping on our JSONL converts it
    src.write_text(json.dumps({"q": "What is X?", "a": "fish"}) + "\n")
    info, lines, _ = _convert(tmp_path / "m", src, "qa.columns.question=q", "qa.columns.answer=a")
    assert json.loads(lines[0]) == {"id": "qa.jsonl:0", "question": "What is X?", "answer": "fish", "choices": []}


def test_conversion_is_deterministic_and_a_changed_source_is_a_changed_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kale_ray.config import SynthConfig, load_config
    from kale_ray.synth.pipeline import synthesis_settings

    src = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(_csqa_rows(5, 0)), src)
    _, a, _ = _convert(tmp_path / "a", src)
    _, b, _ = _convert(tmp_path / "b", src)
    assert a == b
    cfg = load_config(SynthConfig, None, [f"qa.source={src}"])
    before = synthesis_settings(cfg)
    assert before["inputs"]["qa_conversion"] >= 1 and before["qa"]["format"] == "auto"
    pq.write_table(pa.Table.from_pylist(_csqa_rows(6, 0)), src)
    assert synthesis_settings(cfg)["inputs"]["qa"] != before["inputs"]["qa"]
    # a save_to_disk DatasetDict keeps its data in sub-folders: those count too
    datasets = pytest.importorskip("datasets")
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([STRATEGY])}).save_to_disk(str(dd))
    cfg = load_config(SynthConfig, None, [f"qa.source={dd}"])
    before = synthesis_settings(cfg)["inputs"]["qa"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([STRATEGY, STRATEGY])}).save_to_disk(str(dd))
    assert synthesis_settings(cfg)["inputs"]["qa"] != before


def test_a_test_file_in_another_format_is_converted_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kale_ray.config import SynthConfig, load_config
    from kale_ray.core.rejects import Rejects
    from kale_ray.synth.qa_source import read_test_file

    src = tmp_path / "dev.parquet"
    pq.write_table(pa.Table.from_pylist(_csqa_rows(3, 1)), src)
    cfg = load_config(SynthConfig, None, [f"qa.source={src}", f"qa.test_file={src}"])
    rej = Rejects()
    got = read_test_file(cfg, rej)
    assert [(q.id, q.answer, q.all_answers) for q in got] == [("c0", "sky", ["sky"]), ("c2", "sky", ["sky"])]
    assert rej.counts() == {"answer_not_in_choices": 1} and rej.rows[0]["row"] == 1
