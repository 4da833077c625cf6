"""Hash what passes: file-object wrappers that count and sha256 the bytes written or read through
them (a shard's hash costs no second pass), and the streamed hash of a stored object."""

from __future__ import annotations

import hashlib
from typing import IO

from pipeline.storage import Storage

CHUNK = 8 << 20  # bytes per read when hashing a whole object


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


class HashingReader:
    """A read-only file object that hashes and counts the bytes read through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (a tar reader stops before the end-of-archive padding)."""
        while self.read(CHUNK):
            pass

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def sha256_of(storage: Storage, uri: str) -> str:
    """sha256 of a stored object, streamed (exports can be hundreds of MB)."""
    with storage.open(uri, "rb") as fh:
        reader = HashingReader(fh)
        reader.drain()
    return reader.sha256


__all__ = ["HashingReader", "HashingWriter", "sha256_of"]
