"""kale_ray.runtime.storage on local paths: round trips, atomicity, naming, pickling, error messages."""
from __future__ import annotations

import os
import pickle

import pytest

from kale_ray.runtime.storage import Storage, StorageError, open_input


def test_local_round_trip(tmp_path):
    st = Storage.from_uri(str(tmp_path / "out"))
    assert st.is_local and st.path() == str(tmp_path / "out")
    st.write_atomic("a/b.txt", "héllo")
    assert st.read_text("a/b.txt") == "héllo"
    assert st.read_bytes("a/b.txt") == "héllo".encode()
    assert (tmp_path / "out" / "a" / "b.txt").read_text() == "héllo"
    st.write_atomic("a/b.txt", b"new")  # overwrite
    assert st.read_bytes("a/b.txt") == b"new"
    np = pytest.importorskip("numpy")
    n = st.write_jsonl_atomic("rows.jsonl", [{"x": np.int64(3), "v": np.arange(2), "f": np.float32(0.5)}, {"y": 1}])
    assert n == 2
    assert st.read_jsonl("rows.jsonl") == [{"x": 3, "v": [0, 1], "f": 0.5}, {"y": 1}]
    sub = st.sub("a")
    assert sub.read_text("b.txt") == "new" and sub.path("b.txt") == st.path("a/b.txt")


def test_tilde_and_file_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Storage.from_uri("~/x").path() == str(tmp_path / "x")
    st = Storage.from_uri(f"file://{tmp_path}/f")
    assert st.is_local
    st.write_atomic("k.txt", "v")
    assert (tmp_path / "f" / "k.txt").read_text() == "v"
    assert st.list() == ["k.txt"]


def test_atomic_write_leaves_no_temp_file_on_error(tmp_path, monkeypatch):
    st = Storage.from_uri(str(tmp_path))
    st.write_atomic("x.json", "old")

    def boom(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="x.json"):
        st.write_atomic("x.json", "new")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
    assert st.read_text("x.json") == "old"


def test_list_exists_delete(tmp_path):
    st = Storage.from_uri(str(tmp_path / "o"))
    assert st.list() == [] and st.list("nope") == [] and not st.exists("a.jsonl")
    for name in ("b.jsonl", "a.jsonl", "c.done"):
        st.write_atomic(f"shards/{name}", "x")
    st.write_atomic("shards/deeper/z.jsonl", "x")
    assert st.list("shards") == ["a.jsonl", "b.jsonl", "c.done"]
    assert st.list("shards", suffix=".jsonl") == ["a.jsonl", "b.jsonl"]
    assert st.exists("shards/a.jsonl") and st.exists("shards")
    st.delete("shards/a.jsonl")
    st.delete("shards/a.jsonl")  # missing is fine
    assert not st.exists("shards/a.jsonl")
    assert st.list("shards") == ["b.jsonl", "c.done"]
    with pytest.raises(FileNotFoundError, match="a.jsonl"):
        st.read_bytes("shards/a.jsonl")


def test_pickling(tmp_path):
    st = Storage.from_uri(str(tmp_path)).sub("run")
    st.write_atomic("m.txt", "1")
    st2 = pickle.loads(pickle.dumps(st))
    assert st2 == st and st2._fs is None
    assert st2.read_text("m.txt") == "1"


@pytest.mark.parametrize("uri", ["s3x://a", "ftp://host/x", "s3x:/a"])
def test_unsupported_scheme(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheme = uri.split(":")[0]
    with pytest.raises(StorageError) as ei:
        Storage.from_uri(uri)
    msg = str(ei.value)
    assert msg == (f"out_dir {uri!r}: unsupported storage scheme {scheme!r} "
                   "(supported: local paths, file://, s3://, gs://, hdfs://)")
    assert "\n" not in msg
    assert os.listdir(tmp_path) == []


def test_exact_message_for_s3x():
    with pytest.raises(StorageError, match=r"^out_dir 's3x://a': unsupported storage scheme 's3x' \(supported: "
                                           r"local paths, file://, s3://, gs://, hdfs://\)$"):
        Storage.from_uri("s3x://a")


def test_no_colon_folder_is_ever_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: never reach a network
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = Storage.from_uri("s3://bucket/x")
    assert not st.is_local and st.path("a.txt") == "bucket/x/a.txt" and st.uri_of("a.txt") == "s3://bucket/x/a.txt"
    for bad in ("s3:/bucket/x", "s3:bucket/x", "s3://"):
        with pytest.raises(StorageError, match="malformed"):
            Storage.from_uri(bad)
    st.makedirs()  # object stores: no folders, and certainly no local ones
    assert os.listdir(tmp_path) == []
    assert not any(":" in p for _, dirs, files in os.walk(tmp_path) for p in dirs + files)


def test_check_writable(tmp_path):
    Storage.from_uri(str(tmp_path / "new" / "dir")).check_writable()
    assert os.listdir(tmp_path / "new" / "dir") == []
    with pytest.raises(StorageError, match=r"^out_dir '/proc/x': not writable \(.+\)$"):
        Storage.from_uri("/proc/x").check_writable()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_writable_readonly_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            Storage.from_uri(str(ro)).check_writable()
    finally:
        ro.chmod(0o700)


def test_open_input(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"q": 1}\n')
    fs, path = open_input(str(p))
    with fs.open_input_stream(path) as f:
        assert f.read() == b'{"q": 1}\n'
    with pytest.raises(StorageError, match="qa_path 'zz://x'"):
        open_input("zz://x", what="qa_path")
