"""core.io: atomic JSON / JSONL files (pure, ms)."""
from __future__ import annotations

import numpy as np
import pytest

from kale_ray.core.io import read_jsonl, write_json, write_jsonl


def test_jsonl_round_trip_with_numpy_values_and_no_temp_left(tmp_path):
    p = tmp_path / "d" / "rows.jsonl"
    assert write_jsonl(p, ({"i": np.int64(i), "v": np.arange(2)} for i in range(3))) == 3
    assert read_jsonl(p) == [{"i": 0, "v": [0, 1]}, {"i": 1, "v": [0, 1]}, {"i": 2, "v": [0, 1]}]
    assert sorted(x.name for x in p.parent.iterdir()) == ["rows.jsonl"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    write_jsonl(p, [{"a": 1}])

    def bad():
        yield {"a": 2}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_jsonl(p, bad())
    assert read_jsonl(p) == [{"a": 1}] and sorted(x.name for x in tmp_path.iterdir()) == ["rows.jsonl"]


def test_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not JSON"):
        read_jsonl(p)
    write_json(tmp_path / "m.json", {"n": np.float32(0.5)})
    assert (tmp_path / "m.json").read_text().startswith("{")
