"""Stages that know the settings behind their outputs.

A stage's output folder holds ``stages/<name>.json``: the settings that made it (the config
subtree that decides the output, plus the identity of its input files) and their hash. A rerun
with the same settings reuses or resumes the output; a rerun with other settings never mixes old
and new outputs: it stops with the keys that changed (``on_change="error"``, the default) or
deletes the stage's outputs and starts again (``on_change="overwrite"``).

Pure: json + hashlib over a ``Storage`` (kale_ray.runtime.storage) or a local folder.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable


class StaleOutputError(ValueError):
    """An output folder holds results made with other settings (a config error: exit 2, one line)."""


def fingerprint(settings: Any) -> str:
    """A stable hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (unset) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (unset)")
            else:
                out.extend(settings_diff(old[k], new[k], key))
        return out
    return [] if old == new else [f"{prefix or '(settings)'}: {old!r} -> {new!r}"]


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies an input file's content cheaply: resolved path, size, mtime (ns)."""
    p = Path(path).expanduser()
    if not p.exists():
        return {"path": str(p), "missing": True}
    if p.is_dir():
        return {"path": str(p.resolve()), "files": [file_identity(x) for x in sorted(p.iterdir()) if x.is_file()]}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def content_identity(path: str | Path) -> dict[str, Any]:
    """A hash of a file's (or a folder's files') bytes: for inputs rewritten with the same content."""
    p = Path(path).expanduser()
    if not p.exists():
        return {"path": str(p), "missing": True}
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"path": str(p.resolve()), "files": len(files), "blake2b": h.hexdigest()}


def without(tree: dict, keys: Iterable[str]) -> dict:
    """A deep copy of ``tree`` without the dotted ``keys`` (settings that do not change outputs)."""
    tree = json.loads(json.dumps(tree, default=str))
    for dotted in keys:
        node = tree
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


def inherit_on_change(job_on_change: str, own: str) -> str:
    """A sub-job's ``on_change`` (a trainer's, a synthesis's): the job's ``overwrite`` reaches it, else its own."""
    return "overwrite" if job_on_change == "overwrite" else own


def stage_config(section: Any, job_on_change: str, **changes: Any) -> Any:
    """A stage's own copy of a config section with ``changes`` (e.g. a training run's ``data`` and
    ``out_dir``): a deep copy, its ``on_change`` inherited from the job's (:func:`inherit_on_change`).
    A training section given another ``loss`` becomes that loss's TrainConfig (``config.with_loss``),
    so the run's dumped config.yaml loads back as it ran."""
    from kale_ray.config import TrainConfig, with_loss

    section = copy.deepcopy(section)
    on_change = inherit_on_change(job_on_change, section.on_change)
    if isinstance(section, TrainConfig) and "loss" in changes:
        return with_loss(section, changes.pop("loss"), on_change=on_change, **changes)
    return dataclasses.replace(section, on_change=on_change, **changes)


class Stage:
    """One stage's settings record under ``<out>/stages/<name>.json``.

    >>> st = Stage(storage, "synthesis", settings)
    >>> st.claim(on_change="error")     # fresh or same settings: go on (resume); else StaleOutputError
    >>> ...                             # the stage writes its outputs, shard by shard
    >>> st.finish(rows_out=12)          # marks it complete, with what it produced
    """

    def __init__(self, storage, name: str, settings: dict) -> None:
        self.storage = storage
        self.name = name
        self.settings = settings
        self.hash = fingerprint(settings)
        self.rel = f"stages/{name}.json"

    def previous(self) -> dict | None:
        if not self.storage.exists(self.rel):
            return None
        return json.loads(self.storage.read_text(self.rel))

    def claim(self, on_change: str = "error", outputs: Iterable[str] = (),
              wipe: Callable[[], None] | None = None) -> dict | None:
        """Check the folder's earlier settings. Returns the earlier record when it matches (reuse/resume).

        ``outputs``: names that exist only if an earlier run wrote into this folder (used when the
        folder predates settings records: such a folder is refused as well, since its settings are
        unknown).
        """
        prev = self.previous()
        stale = self._stale(prev, outputs)
        if stale is not None:
            if on_change != "overwrite":
                raise self._error(stale)
            if wipe is not None:
                wipe()
            prev = None
        if prev is None:
            self._write({"status": "running", "started": time.time()})
        return prev

    def check(self, on_change: str = "error", outputs: Iterable[str] = ()) -> None:
        """``claim``'s refusal without writing anything (for checks before a job starts)."""
        stale = self._stale(self.previous(), outputs)
        if stale is not None and on_change != "overwrite":
            raise self._error(stale)

    def _stale(self, prev: dict | None, outputs: Iterable[str]) -> str | None:
        if prev is not None and prev.get("hash") != self.hash:
            changes = settings_diff(prev.get("settings", {}), self.settings)
            return "; ".join(changes[:8]) + (f"; ... ({len(changes)} changes)" if len(changes) > 8 else "")
        if prev is None and any(self.storage.exists(o) for o in outputs):
            return "the folder holds outputs without a settings record (an older run)"
        return None

    def _error(self, stale: str) -> StaleOutputError:
        return StaleOutputError(
            f"{self.storage.uri}: holds {self.name} outputs made with other settings ({stale}). "
            f"Use a new out_dir, or add on_change=overwrite to delete them and start again.")

    def finish(self, **info: Any) -> None:
        self._write({"status": "complete", "finished": time.time(), **info})

    def complete(self) -> bool:
        prev = self.previous()
        return bool(prev and prev.get("hash") == self.hash and prev.get("status") == "complete")

    def _write(self, info: dict) -> None:
        rec = {"stage": self.name, "hash": self.hash, "settings": self.settings, "pid": os.getpid(), **info}
        self.storage.write_atomic(self.rel, json.dumps(rec, indent=2, default=str))


class Run:
    """A recipe's stages over one output folder: ``run.stage(name, fn, settings)`` is the only way
    a recipe reuses, resumes, recomputes or refuses a stage.

    >>> run = Run(out, cfg, on_change=cfg.on_change, stop_after=cfg.stop_after)
    >>> qa = run.stage("qa", lambda: build_qa(cfg, out), settings=to_dict(cfg.qa), outputs=["qa"])
    >>> if run.stops_after("qa"): return run.result(qa=qa)

    Each stage's record (``stages/<name>.json``) holds the settings it was given, the identity of
    its ``inputs`` files and the hash of the stage before it, so a change upstream reaches every
    later stage: with ``on_change="error"`` the first stage whose settings differ stops the run
    (``StaleOutputError``, one line naming the changed keys) before it writes anything; with
    ``"overwrite"`` that stage's ``outputs`` are deleted and it and every later stage run again.
    A stage whose record matches and is complete is not run: its recorded result (``fn``'s
    JSON-able return value) comes back. A matching record left ``running`` (a killed run) runs
    ``fn`` again, which resumes from what it left (e.g. the trainer's checkpoints).

    ``config.yaml`` is written when a stage first runs (not when every stage is reused or the run
    is refused), so it always describes the outputs beside it.
    """

    def __init__(self, out: str | Path, config: Any = None, on_change: str = "error", stop_after: str | None = None,
                 progress: Callable[[str], None] | None = None, label: str = "run") -> None:
        from kale_ray.runtime.storage import Storage

        self.out = Path(out).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.storage = Storage.from_uri(str(self.out))
        self.config, self.on_change, self.stop_after = config, on_change, stop_after
        self.progress = progress or (lambda _msg: None)
        self.label = label
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.ran: list[str] = []
        self._upstream = ""
        self._hashes: dict[str, str] = {}
        self._config_written = False
        self._t0 = time.perf_counter()

    def stage(self, name: str, fn: Callable[[], Any], settings: Any = None, inputs: Iterable[str | Path] = (),
              outputs: Iterable[str] = (), content_inputs: Iterable[str | Path] = (),
              after: str | Iterable[str] | None = None) -> Any:
        """Run (or reuse) one stage; returns its result. ``outputs``: paths under ``out`` it writes.

        ``after``: the earlier stage(s) whose outputs this one reads (default: the stage just
        before it); their settings hashes are part of this stage's settings.
        """
        outputs = list(outputs)
        if after is None:
            upstream: Any = self._upstream
        else:
            names = [after] if isinstance(after, str) else list(after)
            unknown = [n for n in names if n not in self._hashes]
            if unknown:
                raise ValueError(f"stage {name!r}: after={unknown} names no earlier stage of this run")
            upstream = {n: self._hashes[n] for n in names}
        record = {"settings": settings,
                  "inputs": [file_identity(p) for p in inputs] + [content_identity(p) for p in content_inputs],
                  "upstream": upstream}
        st = Stage(self.storage, name, record)
        prev = st.claim(self.on_change, outputs=outputs, wipe=lambda: self._wipe(outputs))
        self._upstream = self._hashes[name] = st.hash
        if prev is not None and prev.get("status") == "complete":
            self.reused.append(name)
            self.seconds[name] = float(prev.get("seconds") or 0.0)
            self.progress(f"[{self.label}] {name}: reusing the outputs in {self.out} (same settings)")
            return prev.get("result")
        self._write_config()
        t = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t, 3)
        st.finish(result=result, seconds=self.seconds[name])
        self.ran.append(name)
        return result

    def stops_after(self, name: str) -> bool:
        """True when the run was asked to stop after ``name`` (``stop_after``)."""
        return self.stop_after == name

    def total_seconds(self) -> float:
        return time.perf_counter() - self._t0

    def timings(self) -> dict[str, float]:
        """Seconds per stage (a reused stage: the seconds it took when it ran) plus this run's total."""
        return {**self.seconds, "total_this_run": round(self.total_seconds(), 3)}

    def _write_config(self) -> None:
        if self.config is not None and not self._config_written:
            from kale_ray.config import dump_config

            dump_config(self.config, self.out / "config.yaml")
            self._config_written = True

    def _wipe(self, outputs: list[str]) -> None:
        for rel in outputs:
            self.storage.delete(rel)
