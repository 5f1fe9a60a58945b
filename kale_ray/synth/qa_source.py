"""Users' QA datasets read as our question rows: Parquet, CSV/TSV, ``datasets`` folders and files,
other JSONL shapes -> ``qa/source.jsonl`` in the synthesis folder (converted once, by
``kale_ray.core.qa_formats``'s column rules), and a ``qa.test_file`` of any of those shapes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


from kale_ray.config import SynthConfig
from kale_ray.core import qa_formats
from kale_ray.core.qa import read_qa_jsonl
from kale_ray.core.rejects import Rejects
from kale_ray.runtime.stages import file_identity
from kale_ray.runtime.storage import Storage


CONVERTED_QA = "qa/source.jsonl"
_CONVERTED_INFO = "qa/source.json"
_BATCH_ROWS = 1024
_DATASETS_EXT = {".json": "json", ".arrow": "arrow"}


def qa_source_kind(path: str | Path) -> str:
    """How ``qa.source`` is read: jsonl (ours, or another shape line by line), parquet, csv, tsv,
    disk (a ``datasets.save_to_disk`` folder) or datasets (``datasets.load_dataset``: a .json/.arrow file, a folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        marks = ("dataset_info.json", "state.json", "dataset_dict.json")
        return "disk" if any((p / m).exists() for m in marks) else "datasets"
    ext = p.suffix.lower()
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    return "datasets" if ext in _DATASETS_EXT else "jsonl"


def tree_identity(path: str) -> dict:
    """file_identity of a file, or of every file under a folder (a DatasetDict keeps its splits in sub-folders)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return file_identity(p)
    files = sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".") and "cache-" not in x.name)
    return {"path": str(p.resolve()), "files": [dict(file_identity(x), path=str(x.relative_to(p))) for x in files]}


def _jsonl_rows(path: Path) -> Iterator[list]:
    """Batches of a JSONL file's rows; a line that is not a JSON object is a RowError in its place, a blank one None."""
    from kale_ray.core.qa import _byte_range_lines

    batch: list = []
    for _, raw in _byte_range_lines(path, None, 1):
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            batch.append(None)  # a blank line: skipped, as the reader does (it keeps its line)
        else:
            try:
                obj = json.loads(text)
                batch.append(obj if isinstance(obj, dict) else qa_formats.RowError("malformed_qa", "expected a JSON object"))
            except (ValueError, RecursionError) as e:
                batch.append(qa_formats.RowError("malformed_qa", f"not valid JSON ({type(e).__name__})"))
        if len(batch) >= _BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _csv_rows(path: Path, delimiter: str) -> Iterator[list]:
    """Batches of a CSV/TSV file's rows, every cell as text (the header names the columns), streamed by pyarrow."""
    import csv

    import pyarrow as pa
    from pyarrow import csv as pacsv

    with path.open(newline="", encoding="utf-8-sig") as f:
        names = next(csv.reader(f, delimiter=delimiter), [])
    if not names:
        return
    reader = pacsv.open_csv(str(path), parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    for batch in reader:
        yield batch.to_pylist()


def _dataset_rows(ds) -> Iterator[list]:
    for cols in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(cols)
        yield [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]


def _pick_split(ds, split: str, path: Path):
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
        if split not in ds:
            raise ValueError(f"qa.split={split!r}: {path} holds the splits {sorted(ds)}")
        return ds[split]
    return ds


def _source_rows(path: Path, kind: str, split: str) -> Iterator[list]:
    """The rows of ``qa.source`` in batches, in file order (deterministic)."""
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=_BATCH_ROWS):
            yield batch.to_pylist()
    elif kind in ("csv", "tsv"):
        yield from _csv_rows(path, "\t" if kind == "tsv" else ",")
    else:
        import tempfile

        import datasets

        datasets.disable_progress_bars()
        if kind == "disk":
            yield from _dataset_rows(_pick_split(datasets.load_from_disk(str(path)), split, path))
            return
        with tempfile.TemporaryDirectory(prefix="kale-qa-") as cache:  # no cache left behind, none reused
            if path.is_dir():
                ds = datasets.load_dataset(str(path), split=split, cache_dir=cache)
            else:
                ds = datasets.load_dataset(_DATASETS_EXT[path.suffix.lower()], data_files=str(path), split="train",
                                           cache_dir=cache)
            yield from _dataset_rows(ds)
            del ds


def _jsonl_format(path: Path, columns: dict) -> str:
    """The format of a JSONL file's first row (ours when that row does not parse: the reader rejects it with its line)."""
    for batch in _jsonl_rows(path):
        for row in batch:
            if isinstance(row, dict):
                try:
                    return qa_formats.detect_format(row, columns)
                except ValueError:
                    return "kale"
            if row is not None:
                return "kale"
    return "kale"


def qa_conversion_format(path: str | Path, fmt: str, columns: dict) -> str | None:
    """The format a QA file is converted with (``auto`` when detected from its first row), or None:
    our JSONL, read in place."""
    if qa_source_kind(path) == "jsonl":
        fmt = _jsonl_format(Path(path).expanduser(), columns) if fmt == "auto" else fmt
        if fmt == "kale" and not columns:
            return None
    return fmt


def converted_rows(path: str | Path, fmt: str, columns: dict, split: str, rejects: Rejects, max_rows: int = 0,
                   state: dict | None = None) -> Iterator[dict | None]:
    """A QA source's rows as our rows, in source order; None for a blank or rejected row (rejected into
    ``rejects`` with file, row, line = row + 1 and reason). ``state["format"]``: the format used."""
    path = Path(path).expanduser()
    state = state if state is not None else {}
    state["format"], n = fmt, 0
    for batch in _source_rows(path, qa_source_kind(path), split):
        for row in batch:
            if max_rows and n >= max_rows:
                return
            i, n = n, n + 1
            state["rows"] = n
            if row is None:
                yield None
                continue
            try:
                if isinstance(row, qa_formats.RowError):
                    raise row
                if state["format"] == "auto":
                    state["format"] = qa_formats.detect_format(row, columns)
                ex = qa_formats.convert_row(row, state["format"], columns, source=path.name, index=i)
            except qa_formats.RowError as e:
                rejects.add(e.reason, file=str(path), row=i, line=i + 1, message=e.message,
                            text=json.dumps(row, ensure_ascii=False, default=str)[:200])
                yield None
            else:
                yield ex


def _qa_columns(cfg: SynthConfig) -> dict:
    return {k: v for k, v in vars(cfg.qa.columns).items() if v}


def convert_qa_source(cfg: SynthConfig, storage: Storage) -> dict | None:
    """A ``qa.source`` that is not our JSONL, converted once into ``qa/source.jsonl``; None for our JSONL.

    Line k of ``qa/source.jsonl`` is source row k-1: a row that does not convert leaves its line empty
    (the reader skips it) and goes to ``rejects/qa_lines/source.jsonl`` with file, row and reason, so
    every later reject's line names its source row. Written streaming to a temporary file, then moved
    into place; ``qa/source.json`` (written last) marks it done and holds the counts (a rerun reuses it:
    the stage's settings hold the source's identity, ``qa.format``, ``qa.columns`` and ``qa.split``).
    """
    import tempfile

    qa, columns = cfg.qa, _qa_columns(cfg)
    path = Path(qa.source).expanduser()
    fmt = qa_conversion_format(path, qa.format, columns)
    if fmt is None:
        return None
    if storage.exists(_CONVERTED_INFO):
        return json.loads(storage.read_text(_CONVERTED_INFO))
    if storage.is_local:
        Path(storage.path("qa")).mkdir(parents=True, exist_ok=True)
    rejects, state, kept = Rejects(), {}, 0
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl", delete=False,
                                     dir=storage.path("qa") if storage.is_local else None) as f:
        tmp = Path(f.name)
        try:
            for ex in converted_rows(path, fmt, columns, qa.split, rejects, cfg.max_rows, state):
                f.write("\n" if ex is None else json.dumps(ex, ensure_ascii=False, default=str) + "\n")
                kept += ex is not None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        if storage.is_local:
            os.replace(tmp, storage.path(CONVERTED_QA))
        else:
            storage.write_atomic(CONVERTED_QA, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    if rejects.total():
        storage.write_jsonl_atomic("rejects/qa_lines/source.jsonl", rejects.rows)
    first = rejects.rows[0] if rejects.rows else None
    info = {"format": state["format"] if state["format"] != "auto" else "kale", "source_kind": qa_source_kind(path),
            "source_rows": state.get("rows", 0), "converted": kept, "source_rejected": rejects.counts(),
            "first_reject": f"{path.name}:row {first['row']}: {first['message']}" if first else ""}
    storage.write_atomic(_CONVERTED_INFO, json.dumps(info))
    return info


def read_test_file(cfg: SynthConfig, rej: Rejects):
    """``qa.test_file``'s questions: our JSONL as it is, another source converted (split ``qa.test_split``)."""
    import tempfile

    qa, columns = cfg.qa, _qa_columns(cfg)
    fmt = qa_conversion_format(qa.test_file, qa.format, columns)
    if fmt is None:
        return list(read_qa_jsonl(qa.test_file, rej))
    with tempfile.TemporaryDirectory(prefix="kale-qa-test-") as d:
        tmp = Path(d) / "test.jsonl"
        with tmp.open("w", encoding="utf-8") as f:
            for ex in converted_rows(qa.test_file, fmt, columns, qa.test_split, rej):
                if ex is not None:
                    f.write(json.dumps(ex, ensure_ascii=False, default=str) + "\n")
        return list(read_qa_jsonl(tmp, rej))
