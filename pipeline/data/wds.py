"""WebDataset tar shards: a reproducible writer and readers by URI (local or object storage).

Writing: :func:`shard_writer` wraps ``webdataset.TarWriter`` with every tar header field fixed
(mtime, owner, mode, USTAR format), so the same samples always give the same bytes, and hashes
the stream as it is written (no second read for the sha256).

Reading: :func:`iter_tar_groups` is the one tar reader of the project (image shards, code shards,
read-back checks): WebDataset's grouping rule (a sample is the run of members sharing the name up
to the first dot of the basename), streamed, with damage raised as :class:`CorruptShardError`
naming the shard. :func:`iter_samples` gives WebDataset's sample dicts, opened with
:class:`~pipeline.storage.Storage` so ``s3://`` works without ``pipe:``.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pipeline.data.hashing import HashingReader, HashingWriter
from pipeline.storage import Storage

# Tar header fields are fixed so that shards are byte-for-byte reproducible. (TarWriter 1.0.2
# ignores its `format` argument: tarfile's default PAX format applies, which writes plain ustar
# headers, with no extended records, for short ASCII names and an integer mtime — our keys.)
TAR_MTIME = 0
TAR_USER = "pipeline"
TAR_MODE = 0o444


class CorruptShardError(ValueError):
    """A shard that cannot be trusted: ``uri`` names it, ``why`` says what is wrong."""

    def __init__(self, uri: str, why: str) -> None:
        self.uri = uri
        self.why = why
        super().__init__(f"corrupt shard {uri}: {why}")



def iter_tar_groups(fh: IO[bytes], uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` for each run of consecutive tar members sharing a key.

    Grouping is WebDataset's: the key is a member's name up to the first dot of its basename,
    the suffix the rest. Tar-level damage raises :class:`CorruptShardError`. A tar cut exactly
    at a member boundary reads as a shorter valid tar: only a count or hash check catches that.
    """
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, suffix = base.partition(".")
                if not dot:
                    raise CorruptShardError(uri, f"member {member.name!r} has no extension")
                k = f"{folder}/{stem}" if folder else stem
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                if suffix in group:
                    raise CorruptShardError(uri, f"sample {k!r} holds {suffix!r} twice")
                data = tar.extractfile(member)
                group[suffix] = data.read() if data is not None else b""
                if len(group[suffix]) != member.size:
                    raise CorruptShardError(uri, f"member {member.name!r} is truncated")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptShardError(uri, f"unreadable tar ({type(e).__name__}: {e})") from e
    if key is not None:
        yield key, group



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
    """Samples of one shard, ``{"__key__", "__url__", ext: bytes}`` (WebDataset's sample form),
    grouped by :func:`iter_tar_groups`."""
    with storage.open(uri, "rb") as fh:
        for key, group in iter_tar_groups(fh, uri):
            yield {"__key__": key, "__url__": uri, **group}


def iter_shards(storage: Storage, uris: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Samples of several shards, in order."""
    for uri in uris:
        yield from iter_samples(storage, uri)


def digest(storage: Storage, uri: str) -> tuple[int, str, list[str]]:
    """(size in bytes, sha256, keys in order) of a finalized shard, read back in one pass."""
    with storage.open(uri, "rb") as fh:
        reader = HashingReader(fh)
        keys = [key for key, _ in iter_tar_groups(reader, uri)]
        reader.drain()
    return reader.bytes, reader.sha256, keys


__all__ = ["CorruptShardError", "digest", "iter_samples", "iter_shards", "iter_tar_groups",
           "shard_writer"]
