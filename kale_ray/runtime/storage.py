"""Storage URIs for outputs and inputs: local paths, file://, s3://, gs://, hdfs:// on pyarrow filesystems.

Pure: imports pyarrow only (no ray / vllm). A :class:`Storage` is a base location plus relative names; it is
picklable (Ray Data workers receive it) and rebuilds its pyarrow filesystem lazily after unpickling, so
credentials are never pickled: a worker resolves them from its own environment (standard AWS env vars,
~/.aws, instance roles), while the non-secret S3 settings (endpoint, scheme, region) travel with it.

Writes are atomic: locally a temp file + fsync + os.replace; on object stores one upload of the whole object
(readers see the old or the new object, never a partial one).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any, Iterable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from kale_ray.core.io import json_default

__all__ = ["Storage", "StorageError", "open_input"]

_SUPPORTED = ("file", "s3", "gs", "hdfs")
_SUPPORTED_TEXT = "local paths, file://, s3://, gs://, hdfs://"
_OBJECT_STORES = ("s3", "gs")
# "name:" followed by "/" (or a known scheme name with anything after it) is a URI, never a local path:
# otherwise "s3:/bucket/x" would quietly become a local folder "s3:".
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):(.*)$", re.S)
_TMP_SUFFIX = ".kaletmp"


class StorageError(ValueError):
    """A storage URI that cannot be used; the one-line message names the URI."""


def _split_scheme(uri: str) -> tuple[str | None, str]:
    m = _SCHEME_RE.match(uri)
    if m and (m.group(2).startswith("/") or m.group(1).lower() in _SUPPORTED):
        return m.group(1).lower(), m.group(2)
    return None, uri


def _s3_options_from_env() -> dict[str, Any]:
    # allow_delayed_open: an object under the part size (pyarrow: 10 MiB) goes up as ONE PutObject at close();
    # without it pyarrow 26 uses a multipart upload (3 requests) even for a 1-byte marker. Both are atomic:
    # a multipart object only appears on CompleteMultipartUpload.
    opts: dict[str, Any] = {"allow_delayed_open": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        endpoint = endpoint.strip()
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            opts["scheme"] = parts.scheme or "https"
            opts["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        else:
            opts["scheme"] = "https"
            opts["endpoint_override"] = endpoint.rstrip("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    elif endpoint:
        opts["region"] = "us-east-1"  # S3-compatible servers accept any region; avoid an AWS region lookup
    return opts


_json_default = json_default  # numpy-aware (kale_ray.core.io)


class Storage:
    """A base location (local folder or object-store prefix) with atomic writes of named files under it."""

    def __init__(self, uri: str, scheme: str, base: str, options: dict[str, Any] | None = None,
                 what: str = "out_dir", fs: pafs.FileSystem | None = None):
        self.uri = uri
        self.scheme = scheme  # "local", "file", "s3", "gs", "hdfs"
        self._base = base
        self._options = dict(options or {})
        self.what = what
        self._fs = fs

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_uri(cls, uri: str, *, what: str = "out_dir") -> "Storage":
        """Storage for a local path (~ expanded, made absolute) or a file:// / s3:// / gs:// / hdfs:// URI.

        S3: endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000), region from
        AWS_REGION / AWS_DEFAULT_REGION, credentials from the standard AWS chain. ``what`` names the setting
        in error messages (``out_dir``, ``qa_path``...)."""
        if not isinstance(uri, (str, os.PathLike)):
            raise StorageError(f"{what} {uri!r}: expected a path or URI string")
        uri = os.fspath(uri)
        if not uri.strip():
            raise StorageError(f"{what} {uri!r}: empty path")
        scheme, rest = _split_scheme(uri)
        if scheme is None:
            base = os.path.abspath(os.path.expanduser(uri))
            return cls(base, "local", base, what=what, fs=pafs.LocalFileSystem())
        if scheme not in _SUPPORTED:
            raise StorageError(f"{what} {uri!r}: unsupported storage scheme {scheme!r} "
                               f"(supported: {_SUPPORTED_TEXT})")
        if not rest.startswith("//"):
            raise StorageError(f"{what} {uri!r}: malformed storage URI (expected {scheme}://...)")
        if scheme == "s3":
            base = rest[2:].strip("/")
            if not base or base.startswith("/") or "?" in base:
                raise StorageError(f"{what} {uri!r}: malformed storage URI (expected s3://bucket/prefix)")
            st = cls(f"s3://{base}", "s3", base, _s3_options_from_env(), what=what)
        else:
            try:
                fs, base = pafs.FileSystem.from_uri(uri)
            except ImportError as e:
                raise StorageError(f"{what} {uri!r}: {scheme}:// support is missing in this pyarrow ({e})") from e
            except Exception as e:  # ArrowNotImplementedError, ArrowInvalid, OSError (e.g. no libhdfs)
                raise StorageError(f"{what} {uri!r}: cannot open {scheme}:// storage "
                                   f"({type(e).__name__}: {e})") from e
            base = base.rstrip("/") or base
            norm = "file://" + base if scheme == "file" else uri.rstrip("/")
            st = cls(norm, scheme, base, {"uri": uri}, what=what, fs=fs)
        st._ensure_fs()  # fail now on missing pyarrow support, not in a worker
        return st

    def _ensure_fs(self) -> pafs.FileSystem:
        if self._fs is not None:
            return self._fs
        try:
            if self.scheme in ("local", "file"):
                self._fs = pafs.LocalFileSystem()
            elif self.scheme == "s3":
                opts = dict(self._options)
                if "region" not in opts and "endpoint_override" not in opts:
                    try:  # real AWS with no region configured: ask the bucket (once; pickles carry it)
                        opts["region"] = self._options["region"] = pafs.resolve_s3_region(self._base.split("/")[0])
                    except Exception:
                        pass
                self._fs = pafs.S3FileSystem(**opts)
            else:
                self._fs = pafs.FileSystem.from_uri(self._options["uri"])[0]
        except ImportError as e:
            raise StorageError(f"{self.what} {self.uri!r}: {self.scheme}:// support is missing in this "
                               f"pyarrow ({e})") from e
        except Exception as e:
            raise StorageError(f"{self.what} {self.uri!r}: cannot open {self.scheme}:// storage "
                               f"({type(e).__name__}: {e})") from e
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # rebuilt lazily in the worker; never pickles credentials
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and (self.uri, self.scheme, self._base) == (
            other.uri, other.scheme, other._base)

    def __hash__(self) -> int:
        return hash((self.uri, self.scheme, self._base))

    # ---------------------------------------------------------------- naming
    @property
    def fs(self) -> pafs.FileSystem:
        return self._ensure_fs()

    @property
    def is_local(self) -> bool:
        return self.scheme in ("local", "file")

    @property
    def is_object_store(self) -> bool:
        return self.scheme in _OBJECT_STORES

    @staticmethod
    def _rel(rel: str) -> str:
        rel = str(rel).replace("\\", "/").strip("/")
        if any(p == ".." for p in rel.split("/")):
            raise ValueError(f"relative storage name {rel!r} must not contain '..'")
        return rel

    def sub(self, *parts: str) -> "Storage":
        rel = self._rel("/".join(str(p) for p in parts if str(p)))
        if not rel:
            return Storage(self.uri, self.scheme, self._base, self._options, self.what, self._fs)
        base = os.path.join(self._base, *rel.split("/")) if self.scheme == "local" else f"{self._base}/{rel}"
        uri = base if self.scheme == "local" else f"{self.uri.rstrip('/')}/{rel}"
        return Storage(uri, self.scheme, base, self._options, self.what, self._fs)

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (local: an absolute path; s3: bucket/key)."""
        rel = self._rel(rel)
        if not rel:
            return self._base
        if self.scheme == "local":
            return os.path.join(self._base, *rel.split("/"))
        return f"{self._base}/{rel}"

    def uri_of(self, rel: str = "") -> str:
        rel = self._rel(rel)
        if not rel:
            return self.uri
        return self.path(rel) if self.scheme == "local" else f"{self.uri.rstrip('/')}/{rel}"

    def _oserror(self, rel: str, action: str, e: BaseException) -> OSError:
        msg = f"{self.what} {self.uri_of(rel)!r}: {action} failed ({type(e).__name__}: {e})"
        if isinstance(e, FileNotFoundError):
            return FileNotFoundError(msg)
        if isinstance(e, PermissionError):
            return PermissionError(msg)
        return OSError(msg)

    # ---------------------------------------------------------------- reading
    def exists(self, rel: str = "") -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except StorageError:
            raise
        except Exception as e:
            raise self._oserror(rel, "stat", e) from e

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except StorageError:
            raise
        except Exception as e:
            raise self._oserror(rel, "read", e) from e

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_jsonl(self, rel: str) -> list[dict]:
        return [json.loads(line) for line in self.read_text(rel).splitlines() if line.strip()]

    def list(self, rel_dir: str = "", suffix: str = "") -> list[str]:
        """Sorted names (not paths) of the files directly in ``rel_dir``; [] when it does not exist.

        Directories (and object-store directory markers) and in-flight temp files are left out."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True,
                                                            recursive=False))
        except StorageError:
            raise
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:
            raise self._oserror(rel_dir, "list", e) from e
        names = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            name = posixpath.basename(info.path.rstrip("/"))
            if not name or name.endswith(_TMP_SUFFIX) or not name.endswith(suffix):
                continue
            names.append(name)
        return sorted(names)

    # ---------------------------------------------------------------- writing
    def makedirs(self, rel: str = "") -> None:
        """Create the folder (local / hdfs). Object stores have no folders: a no-op (no marker objects)."""
        if self.is_object_store:
            return
        try:
            self.fs.create_dir(self.path(rel), recursive=True)
        except StorageError:
            raise
        except Exception as e:
            raise self._oserror(rel, "mkdir", e) from e

    def write_atomic(self, rel: str, data: bytes | str) -> None:
        """Write ``rel`` so that readers see the old or the new content, never a partial file."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = bytes(data)
        if not self._rel(rel):
            raise ValueError("write_atomic needs a file name")
        if self.scheme == "local":
            self._write_local(rel, data)
            return
        try:
            fs = self.fs
            if not self.is_object_store:  # file:// / hdfs: temp name + rename
                self._write_via_rename(fs, rel, data)
                return
            # Object stores: the whole object in one upload, completed only by close(). On an error before
            # close the stream is not closed by us, so no object (old content stays).
            out = fs.open_output_stream(self.path(rel))
            out.write(data)
            out.close()
        except StorageError:
            raise
        except Exception as e:
            raise self._oserror(rel, "write", e) from e

    def _write_local(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = os.path.dirname(final)
        tmp = os.path.join(parent, f".{os.path.basename(final)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
        try:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, Exception):
                raise self._oserror(rel, "write", e) from e
            raise
        try:  # make the rename durable
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _write_via_rename(self, fs: pafs.FileSystem, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = posixpath.dirname(final)
        tmp = f"{parent}/.{posixpath.basename(final)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
        fs.create_dir(parent, recursive=True)
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, final)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except Exception:
                pass
            raise

    def write_jsonl_atomic(self, rel: str, rows: Iterable[dict]) -> int:
        """One JSON object per line (numpy scalars / arrays allowed), written atomically; returns the count."""
        lines = [json.dumps(row, ensure_ascii=False, default=_json_default) for row in rows]
        self.write_atomic(rel, "".join(line + "\n" for line in lines))
        return len(lines)

    def delete(self, rel: str) -> None:
        """Delete a file (or a folder with everything under it); missing is fine.

        On S3, pyarrow's delete_file re-creates the parent "dir/" marker object when the folder would become
        empty (so exists(parent) stays True); list() leaves markers out."""
        path = self.path(rel)
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                self.fs.delete_file(path)
            elif info.type == pafs.FileType.Directory and self._rel(rel):
                self.fs.delete_dir(path)
        except StorageError:
            raise
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._oserror(rel, "delete", e) from e

    def check_writable(self) -> None:
        """Write and delete a probe object; StorageError naming the URI and the OS / S3 reason otherwise."""
        probe = f".kale_write_probe-{uuid.uuid4().hex[:12]}"
        try:
            self.makedirs()
            self.write_atomic(probe, b"probe")
            self.delete(probe)
        except StorageError:
            raise
        except Exception as e:
            reason = str(e.__cause__ or e)
            raise StorageError(f"{self.what} {self.uri!r}: not writable ({type(e.__cause__ or e).__name__}: "
                               f"{reason})") from e


def open_input(uri: str, *, what: str = "input") -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path) for reading an input file (QA / KG) given as a local path or URI."""
    st = Storage.from_uri(uri, what=what)
    return st.fs, st.path()
