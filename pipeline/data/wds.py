"""WebDataset tar shards: a reproducible writer and readers by URI (local or object storage).

Writing: :func:`shard_writer` wraps ``webdataset.TarWriter`` with every tar header field fixed
(mtime, owner, mode, USTAR format), so the same samples always give the same bytes, and hashes
the stream as it is written (no second read for the sha256).

Reading: :func:`iter_samples` streams one shard through webdataset's own tar expansion and key
grouping, opened with :class:`~pipeline.storage.Storage` so ``s3://`` works without ``pipe:``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pipeline.storage import Storage

# Tar header fields are fixed so that shards are byte-for-byte reproducible. (TarWriter 1.0.2
# ignores its `format` argument: tarfile's default PAX format applies, which writes plain ustar
# headers, with no extended records, for short ASCII names and an integer mtime — our keys.)
TAR_MTIME = 0
TAR_USER = "pipeline"
TAR_MODE = 0o444


class HashingWriter:
    """A write-only file object that forwards to ``fh`` and counts and hashes what passes."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.bytes += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


@contextlib.contextmanager
def shard_writer(fh: IO[bytes]) -> Iterator[tuple[Any, HashingWriter]]:
    """A reproducible ``TarWriter`` on ``fh`` and the :class:`HashingWriter` under it.

    Samples are dicts ``{"__key__": key, ext: bytes, ...}``; nothing is re-encoded.
    Read ``.bytes``/``.sha256`` of the hashing writer after the block: closing the tar writes
    its end-of-archive padding.
    """
    from webdataset import TarWriter

    sink = HashingWriter(fh)
    tar = TarWriter(sink, encoder=False, user=TAR_USER, group=TAR_USER, mode=TAR_MODE,
                    mtime=TAR_MTIME)
    try:
        yield tar, sink
    finally:
        tar.close()


def iter_samples(storage: Storage, uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset groups them: ``{"__key__", "__url__", ext: bytes}``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with storage.open(uri, "rb") as fh:
        yield from group_by_keys(tar_file_expander([{"url": uri, "stream": fh}]))


def iter_shards(storage: Storage, uris: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Samples of several shards, in order."""
    for uri in uris:
        yield from iter_samples(storage, uri)


def digest(storage: Storage, uri: str) -> tuple[int, str, list[str]]:
    """(size in bytes, sha256, keys in order) of a finalized shard, read back in one pass."""
    sha = hashlib.sha256()
    size = 0

    class _Tee:
        def __init__(self, fh: IO[bytes]) -> None:
            self.fh = fh

        def read(self, n: int = -1) -> bytes:
            nonlocal size
            data = self.fh.read(n)
            sha.update(data)
            size += len(data)
            return data

    from webdataset.tariterators import group_by_keys, tar_file_expander

    keys = []
    with storage.open(uri, "rb") as fh:
        tee = _Tee(fh)
        for sample in group_by_keys(tar_file_expander([{"url": uri, "stream": tee}])):
            keys.append(sample["__key__"])
        while tee.read(1 << 20):  # the end-of-archive blocks the tar reader stops before
            pass
    return size, sha.hexdigest(), keys
