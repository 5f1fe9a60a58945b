"""Checks a job's inputs and outputs before Ray or any engine starts (``kale-ray`` runs them first).

:func:`preflight` takes a loaded job config and, in a second or two on the CPU:

* every input file the config names exists and can be read: ``kg.source`` (unless ``builtin:``),
  ``kg.names``, ``qa.source`` / ``qa.test_file`` when they are files, ``pairs.source``,
  ``kb.sources``, ``general`` (unless ``builtin:``) and the ``data`` / ``synth`` input of ``train``,
  ``evaluate`` and ``prepare``;
  found wherever the section sits in the job's tree (``synth.kg.source`` in the demo);
* a local KG of at most :data:`PARSE_LIMIT` bytes parses (malformed lines raise the KG reader's
  own one-line ``file:line: reason`` error under ``kg.on_error=error``); bigger KGs are parsed by
  the job, with the same message; the general questions (``eval.general``) parse likewise;
* the job's output folder (``out_dir`` / ``out``) is writable (a probe written and deleted through
  :class:`~kale_ray.runtime.storage.Storage`, so ``/proc/x`` or a path below a file fails here);
* settings that cannot work together are refused (``qa.test_file`` with generated questions).

Everything wrong raises :class:`PreflightError` (or the reader's / storage's own error), one line
naming the key and the file. Pure Python: imports no Ray, torch or vLLM.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

from kale_ray.config import EvalConfig, KGConfig, QAConfig

# Local KGs up to this size (all files together) are parsed before Ray starts.
PARSE_LIMIT = 16 << 20


class PreflightError(ValueError):
    """An input is missing or unreadable, the output is not writable, or settings conflict; one line."""


# Per section class: (field, values that are not files). ``*`` marks a list of sources.
def _input_fields() -> dict[type, list[tuple[str, tuple[str, ...]]]]:
    from kale_ray.methods.kard.config import KBConfig
    from kale_ray.methods.knowtuning.config import LongFormQAConfig, PairsConfig

    return {
        KGConfig: [("source", ()), ("names", ())],
        QAConfig: [("source", ("generate",)), ("test_file", ())],
        LongFormQAConfig: [("source", ("kg",)), ("test_file", ())],
        PairsConfig: [("source", ("neighbourhood",))],
        KBConfig: [("*sources", ())],
        EvalConfig: [("general", ())],
    }


# Top-level inputs of the jobs that read another job's output (the recipes make theirs themselves).
_JOB_INPUTS = {"train": ("data",), "evaluate": ("data",), "prepare": ("synth",)}


def _sections(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted prefix, section) for ``obj`` and every dataclass section below it."""
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _sections(value, f"{prefix}{f.name}.")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()


def input_files(job: str, cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, path) of every input file or folder ``cfg`` names (builtins and generators left out)."""
    rules = _input_fields()
    found: list[tuple[str, str]] = []
    for prefix, sec in _sections(cfg):
        for name, not_files in rules.get(type(sec), []):
            many = name.startswith("*")
            name = name.lstrip("*")
            values = getattr(sec, name)
            for i, v in enumerate(values if many else [values]):
                if v is None or v == "" or v in not_files or str(v).startswith("builtin:"):
                    continue
                found.append((f"{prefix}{name}" + (f"[{i}]" if many else ""), str(v)))
    for name in _JOB_INPUTS.get(job, ()):
        found.append((name, str(getattr(cfg, name))))
    return found


def output_dirs(job: str, cfg: Any) -> list[tuple[str, str]]:
    """(key, folder or URI) the job writes: its top-level ``out_dir`` or ``out``."""
    return [(k, getattr(cfg, k)) for k in ("out_dir", "out") if isinstance(getattr(cfg, k, None), str)]


def check_readable(key: str, path: str) -> None:
    """PreflightError naming ``key`` and ``path`` unless it is a readable file or a listable folder."""
    if _is_remote(path):
        return  # a storage URI: opened (and its error named) by the job's reader
    p = _local(path)
    if not p.exists():
        raise PreflightError(f"{key}: no such file or folder: {path}")
    try:
        if p.is_dir():
            os.listdir(p)
        else:
            with open(p, "rb") as fh:
                fh.read(1)
    except OSError as e:
        raise PreflightError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def _size(p: Path) -> int:
    """Bytes to parse (a compressed file counted as 8x its size)."""
    if p.is_dir():
        return sum(_size(c) for c in p.iterdir() if c.is_file())
    return p.stat().st_size * (8 if p.suffix in (".gz", ".bz2", ".zst") else 1)


def check_kg_parses(key: str, kg: KGConfig) -> None:
    """Load a small local KG (and its names file) the way the job will: its first bad line stops here."""
    if kg.source.startswith("builtin:") or _is_remote(kg.source):
        return
    paths = [_local(kg.source)] + ([_local(kg.names)] if kg.names and not _is_remote(kg.names) else [])
    if sum(_size(p) for p in paths) > PARSE_LIMIT:
        return
    from kale_ray.core.kg import load_kg

    try:
        load_kg(str(paths[0]), str(paths[1]) if len(paths) > 1 else kg.names, kg.on_error)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:  # e.g. a folder with no triple files
        raise PreflightError(f"{key}: {e}") from None


def check_general_parses(key: str, spec: str) -> None:
    """Read the general questions the way the evaluation will: an unknown ``builtin:`` name, a
    missing file or the first bad row stops here (the QA reader's one-line ``file:line: reason``)."""
    from kale_ray.methods.kale.general import general_file, read_general

    try:
        path = general_file(spec, key)
    except FileNotFoundError as e:
        raise PreflightError(str(e)) from None
    read_general(path)


def check_writable(key: str, uri: str) -> None:
    """StorageError naming ``key``, the URI and the reason unless a probe can be written there and deleted."""
    from kale_ray.runtime.storage import Storage

    Storage.from_uri(uri, what=key).check_writable()


def conflicts(job: str, cfg: Any) -> list[str]:
    """One line per pair of settings that cannot work together (cheap checks only)."""
    out = []
    for prefix, sec in _sections(cfg):
        if isinstance(sec, QAConfig) and sec.test_file and sec.source == "generate":
            out.append(f"{prefix}test_file: read only when {prefix}source is a QA file; {prefix}source=generate "
                       f"splits its own test set (qa.test_fraction); drop {prefix}test_file or give {prefix}source")
    return out


def preflight(job: str, cfg: Any, *, parse: bool = True) -> None:
    """Every check above, in order: conflicts, inputs readable, small KGs parse, outputs writable."""
    for line in conflicts(job, cfg):
        raise PreflightError(line)
    for key, path in input_files(job, cfg):
        check_readable(key, path)
    if parse:
        for prefix, sec in _sections(cfg):
            if isinstance(sec, KGConfig):
                check_kg_parses(f"{prefix}source", sec)
            if isinstance(sec, EvalConfig) and sec.general:
                check_general_parses(f"{prefix}general", sec.general)
    for key, uri in output_dirs(job, cfg):
        check_writable(key, uri)
    check_stale_outputs(job, cfg)


# The stage records a job claims first, and the outputs that show an earlier run without one.
def check_stale_outputs(job: str, cfg: Any) -> None:
    """A rerun into a folder made with other settings is refused here, before Ray starts (the job
    itself checks again when it claims the stage). Jobs without a single settings record: no-op."""
    if job == "synthesize":
        from kale_ray.runtime.stages import Stage
        from kale_ray.runtime.storage import Storage
        from kale_ray.synth.pipeline import STAGE_OUTPUTS, synthesis_settings

        Stage(Storage.from_uri(cfg.out_dir), "synthesis", synthesis_settings(cfg)).check(cfg.on_change, STAGE_OUTPUTS)
    elif job == "train":
        from kale_ray.train.trainer import stage_outputs, training_stage

        if os.path.exists(os.path.expanduser(cfg.data)):
            training_stage(cfg).check(cfg.on_change, stage_outputs())
