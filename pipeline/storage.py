"""Storage by URI string: local paths, file://, s3:// (and S3-compatible), memory://.

Everything the pipeline reads or writes goes through :class:`Storage`. Contracts:

- URIs stay strings end to end (``pathlib.Path`` would collapse ``s3://``); :func:`join` builds
  them.
- Writes are atomic: a reader sees the old object, no object, or the whole new one. Local files
  are written under a hidden temporary name in the target folder and renamed; remote objects are
  spooled to a local temporary file and sent with one upload (an S3 object only appears once its
  PUT or multipart upload completes).
- Credentials are never passed in: s3fs/botocore read them from the environment (AWS_* variables,
  instance roles), so nothing secret is in a config, a manifest, a log or a pickled task.
- A stage is complete iff its ``_manifest.json`` exists and parses (:meth:`Storage.read_manifest`).

A :class:`Storage` holds only its options and builds filesystems lazily, so it pickles cheaply
into Ray tasks, which then authenticate from their own environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

MANIFEST = "_manifest.json"
_TMP_MARK = ".tmp-"
_PIPE_MAX = 32 << 20  # remote objects up to this size are sent from memory in one PUT


def protocol_of(uri: str) -> str:
    """``"file"`` for plain paths and file://, else the URI scheme (``"s3"``, ``"memory"``...)."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(uri: str) -> bool:
    return protocol_of(uri) == "file"


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (plain path or file://)."""
    if not is_local(uri):
        raise ValueError(f"not a local URI: {uri}")
    return uri[len("file://"):] if uri.startswith("file://") else uri


def normalize_root(uri: str) -> str:
    """Absolute path for local roots (Ray workers run in other folders); others unchanged."""
    if is_local(uri):
        return os.path.abspath(os.path.expanduser(local_path(uri)))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join URI segments with ``/`` (for every protocol, local included)."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def is_temporary(name: str) -> bool:
    """Names of unfinished atomic writes; listings skip them."""
    return name.startswith(".") and _TMP_MARK in name


@dataclass(frozen=True)
class Storage:
    """Filesystem access by URI. ``endpoint_url``/``region`` apply to s3:// URIs only."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage_cfg: Any) -> Storage:
        return cls(endpoint_url=storage_cfg.endpoint_url, region=storage_cfg.region)

    # -- filesystems ---------------------------------------------------------------------------

    def options(self, protocol: str) -> dict[str, Any]:
        """fsspec options for a protocol: no credentials, ever."""
        if protocol in ("s3", "s3a"):
            opts: dict[str, Any] = {"use_listings_cache": False}
            client: dict[str, Any] = {}
            if self.endpoint_url:
                client["endpoint_url"] = self.endpoint_url
            if self.region:
                client["region_name"] = self.region
            if client:
                opts["client_kwargs"] = client
            return opts
        if protocol == "file":
            return {"auto_mkdir": True}
        return {}

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem holding ``uri`` and the path inside it."""
        protocol = protocol_of(uri)
        fs = fsspec.filesystem(protocol, **self.options(protocol))
        path = local_path(uri) if protocol == "file" else fs._strip_protocol(uri)
        return fs, path

    # -- reads ---------------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.exists(path)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        return fs.cat_file(path)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def open(self, uri: str, mode: str = "rb") -> IO[Any]:
        """Open for reading (use :meth:`open_atomic` to write)."""
        if "r" not in mode:
            raise ValueError("Storage.open is for reading; write with open_atomic")
        fs, path = self.fs(uri)
        return fs.open(path, mode)

    def size(self, uri: str) -> int:
        fs, path = self.fs(uri)
        return int(fs.size(path))

    def listdir(self, uri: str) -> list[str]:
        """Sorted URIs of the direct children of ``uri``; missing folder → ``[]``.

        Unfinished atomic writes are not listed.
        """
        fs, path = self.fs(uri)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = sorted({basename(e) for e in entries} - {""})
        return [join(uri, n) for n in names if not is_temporary(n)]

    def walk_files(self, uri: str) -> list[str]:
        """Sorted URIs of every file below ``uri`` (recursive); missing folder → ``[]``."""
        fs, path = self.fs(uri)
        try:
            found = fs.find(path)
        except FileNotFoundError:
            return []
        base = path.rstrip("/")
        out = []
        for p in found:
            rel = p[len(base):].lstrip("/") if p.startswith(base) else basename(p)
            if rel and not any(is_temporary(seg) for seg in rel.split("/")):
                out.append(join(uri, rel))
        return sorted(out)

    # -- writes --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """Write ``uri`` atomically: yields a binary file; the object appears on clean exit only.

        On an exception nothing is published and the temporary data is removed.
        """
        fs, path = self.fs(uri)
        if is_local(uri):
            folder = os.path.dirname(path) or "."
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        # Remote: write a local temporary file, then publish it with one upload (s3fs sends
        # big files as a multipart upload, which also appears only once completed).
        fd, tmp = tempfile.mkstemp(prefix="pipeline-upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            if os.path.getsize(tmp) <= _PIPE_MAX:
                with open(tmp, "rb") as fh:
                    fs.pipe_file(path, fh.read())
            else:
                fs.put_file(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri) as fh:
            fh.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def put_file(self, local: str, uri: str) -> None:
        """Copy a local file to ``uri`` atomically."""
        with open(local, "rb") as src, self.open_atomic(uri) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def rm(self, uri: str, recursive: bool = False) -> None:
        """Remove a file or (with ``recursive``) a folder; missing is fine."""
        fs, path = self.fs(uri)
        with contextlib.suppress(FileNotFoundError):
            if is_local(uri) and os.path.isdir(path):
                if recursive:
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            elif fs.exists(path):
                fs.rm(path, recursive=recursive)

    # -- manifests -----------------------------------------------------------------------------

    def read_manifest(self, stage_uri: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when it is missing or does not parse (= incomplete)."""
        try:
            data = self.read_json(join(stage_uri, MANIFEST))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_manifest(self, stage_uri: str, manifest: dict[str, Any]) -> None:
        """Write the manifest last: its presence marks the stage complete."""
        self.write_json(join(stage_uri, MANIFEST), manifest)


def remove_strays(storage: Storage, folder: str, subs: Iterable[str], keep: set[str]) -> int:
    """Delete every file below ``folder/<sub>`` (for each of ``subs``) that is an unfinished
    temporary or not in ``keep`` (URIs), so a resumed stage's folder holds exactly what its
    manifest lists (e.g. shards of a plan that changed). Returns how many were removed."""
    removed = 0
    for sub in subs:
        fs, path = storage.fs(join(folder, sub))
        try:
            found = fs.find(path)
        except FileNotFoundError:
            continue
        base = path.rstrip("/")
        for p in found:
            uri = join(folder, sub, p[len(base):].lstrip("/"))
            if is_temporary(basename(p)) or uri not in keep:
                fs.rm(p)
                removed += 1
    return removed
