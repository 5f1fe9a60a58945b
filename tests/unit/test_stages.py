"""Settings records (runtime/stages.py) and shard planning (core/qa.line_offsets): pure, milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kale_ray.core.qa import line_offsets, read_qa_jsonl
from kale_ray.runtime.stages import Stage, StaleOutputError, fingerprint, settings_diff, without


class LocalDir:
    """The part of runtime.storage.Storage that Stage uses, over a folder (pure test double)."""

    def __init__(self, root: Path) -> None:
        self.root, self.uri = root, str(root)

    def exists(self, rel):
        return (self.root / rel).exists()

    def read_text(self, rel):
        return (self.root / rel).read_text()

    def write_atomic(self, rel, data):
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(data)


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": {"c": 2}}) == fingerprint({"b": {"c": 2}, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_settings_diff_names_dotted_keys():
    assert settings_diff({"qa": {"source": "generate", "k": 1}}, {"qa": {"source": "x.jsonl", "k": 1}}) == [
        "qa.source: 'generate' -> 'x.jsonl'"]
    assert settings_diff({"a": 1}, {"a": 1, "b": 2}) == ["b: (unset) -> 2"]


def test_without_drops_dotted_keys_and_copies():
    tree = {"out_dir": "x", "generation": {"batch_size": 4, "max_tokens": 9}}
    assert without(tree, ["out_dir", "generation.batch_size"]) == {"generation": {"max_tokens": 9}}
    assert tree["generation"]["batch_size"] == 4


def test_stage_fresh_same_changed_and_overwrite(tmp_path):
    store = LocalDir(tmp_path)
    assert Stage(store, "s", {"k": 3}).claim() is None  # fresh
    Stage(store, "s", {"k": 3}).finish(rows=5)
    prev = Stage(store, "s", {"k": 3}).claim()
    assert prev["status"] == "complete" and prev["rows"] == 5  # same settings: reuse / resume
    with pytest.raises(StaleOutputError, match=r"k: 3 -> 1.*on_change=overwrite"):
        Stage(store, "s", {"k": 1}).claim()
    wiped = []
    assert Stage(store, "s", {"k": 1}).claim("overwrite", wipe=lambda: wiped.append(1)) is None
    assert wiped == [1]
    assert json.loads((tmp_path / "stages" / "s.json").read_text())["settings"] == {"k": 1}


def test_stage_refuses_a_folder_with_outputs_but_no_record(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(StaleOutputError, match="without a settings record"):
        Stage(LocalDir(tmp_path), "s", {"k": 1}).claim(outputs=["summary.json"])


def _qa_file(path: Path, n: int, blank_every: int = 0) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"id": f"q{i}", "question": f"what is {i}?", "answer": str(i)}))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("n,every", [(10, 3), (9, 3), (1, 5), (25, 1)])
def test_line_offsets_slices_cover_every_line_once_with_right_line_numbers(tmp_path, n, every):
    f = _qa_file(tmp_path / "qa.jsonl", n, blank_every=4)
    slices = line_offsets(f, every, chunk=7)  # tiny chunks: lines cross chunk borders
    ids, lines = [], []
    for start, end, first in slices:
        from kale_ray.core.rejects import Rejects

        ids += [q.id for q in read_qa_jsonl(f, Rejects(), byte_range=(start, end), first_line=first)]
        lines.append(first)
    assert ids == [q.id for q in read_qa_jsonl(f)]
    assert lines == [1 + k * every for k in range(len(slices))]


def test_line_offsets_shard_rejects_name_the_file_line(tmp_path):
    from kale_ray.core.rejects import Rejects

    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "a?", "answer": "b"}\n{"question": "a?", "answer": "b"}\nnot json\n')
    (start, end, first), = [s for s in line_offsets(f, 2) if s[2] == 3]
    rej = Rejects()
    assert list(read_qa_jsonl(f, rej, byte_range=(start, end), first_line=first)) == []
    assert rej.rows[0]["line"] == 3 and rej.rows[0]["reason"] == "malformed_qa"


def test_line_offsets_no_trailing_newline_and_max_lines(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("a\nb\nc")
    assert line_offsets(f, 2) == [(0, 4, 1), (4, 5, 3)]
    assert line_offsets(f, 2, max_lines=2) == [(0, 4, 1)]
