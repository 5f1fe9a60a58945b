"""kale_ray.runtime.storage against a real S3 API (moto server on 127.0.0.1)."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from kale_ray.runtime.storage import Storage, StorageError, open_input

pytestmark = pytest.mark.integration


def test_round_trip_list_exists_delete(s3_server):
    st = Storage.from_uri("s3://bucket/run")
    assert not st.is_local and st.uri == "s3://bucket/run"
    st.check_writable()
    assert st.list() == [] and st.list("shards") == [] and not st.exists("shards/a.jsonl")
    for name in ("b.jsonl", "a.jsonl", "a.done"):
        st.write_atomic(f"shards/{name}", name)
    st.write_atomic("shards/deeper/z.jsonl", "z")
    assert st.read_text("shards/a.jsonl") == "a.jsonl"
    assert st.list("shards") == ["a.done", "a.jsonl", "b.jsonl"]
    assert st.list("shards", suffix=".jsonl") == ["a.jsonl", "b.jsonl"]
    assert st.sub("shards").list() == ["a.done", "a.jsonl", "b.jsonl"]
    assert st.exists("shards/a.jsonl") and st.exists("shards")
    st.delete("shards/a.jsonl")
    st.delete("shards/a.jsonl")
    assert not st.exists("shards/a.jsonl")
    assert st.list("shards") == ["a.done", "b.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"s3://bucket/run/shards/a.jsonl"):
        st.read_bytes("shards/a.jsonl")
    fs, path = open_input("s3://bucket/run/shards/b.jsonl")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"b.jsonl"


def test_jsonl_and_overwrite(s3_server):
    st = Storage.from_uri("s3://bucket/j")
    rows = [{"i": i, "t": "é" * i} for i in range(50)]
    assert st.write_jsonl_atomic("rows.jsonl", rows) == 50
    assert st.read_jsonl("rows.jsonl") == rows
    st.write_atomic("rows.jsonl", '{"i": -1}\n')
    assert st.read_jsonl("rows.jsonl") == [{"i": -1}]
    big = b"x" * (12 * 1024 * 1024)  # above pyarrow's multipart part size: still one whole object
    st.write_atomic("big.bin", big)
    assert st.read_bytes("big.bin") == big
    assert st.list() == ["big.bin", "rows.jsonl"]


def test_missing_bucket_not_writable(s3_server):
    with pytest.raises(StorageError, match=r"^out_dir 's3://no-such-bucket/x': not writable \(.+\)$"):
        Storage.from_uri("s3://no-such-bucket/x").check_writable()


_CHILD = """
import pickle, sys
st = pickle.loads(sys.stdin.buffer.read())
assert st._fs is None
st.write_atomic("from_child.txt", "hello from " + str(type(st).__name__))
print(st.list())
"""


def test_pickled_to_subprocess(s3_server):
    st = Storage.from_uri("s3://bucket/pk").sub("w")
    blob = pickle.dumps(st)
    assert b"testing" not in blob  # credentials are not pickled
    out = subprocess.run([sys.executable, "-c", _CHILD], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert st.read_text("from_child.txt") == "hello from Storage"
    assert Storage.from_uri("s3://bucket/pk/w").list() == ["from_child.txt"]
