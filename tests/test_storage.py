"""Storage by URI on local paths, file://, memory:// and a real S3-compatible server."""

from __future__ import annotations

import uuid

import pytest

from pipeline.storage import (
    MANIFEST,
    Storage,
    basename,
    is_temporary,
    join,
    normalize_root,
    protocol_of,
)


@pytest.fixture(params=["path", "file", "memory", "s3"])
def root(request, tmp_path) -> tuple[str, Storage]:
    if request.param == "path":
        return str(tmp_path), Storage()
    if request.param == "file":
        return f"file://{tmp_path}", Storage()
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:8]}", Storage()
    endpoint = request.getfixturevalue("s3_endpoint")
    return request.getfixturevalue("s3_bucket") + "/prefix", Storage(endpoint_url=endpoint)


def test_uri_helpers():
    assert join("s3://b/x/", "/y", "z.tar") == "s3://b/x/y/z.tar"
    assert join("/a", "b") == "/a/b"
    assert protocol_of("s3://b/k") == "s3" and protocol_of("/tmp/x") == "file"
    assert protocol_of("file:///tmp/x") == "file"
    assert basename("s3://b/x/y.tar") == "y.tar"
    assert normalize_root("s3://b/runs/") == "s3://b/runs"
    assert normalize_root("runs").startswith("/")
    assert is_temporary(".x.tar.tmp-abc") and not is_temporary("x.tar")


def test_roundtrip_and_listing(root):
    base, storage = root
    storage.write_text(join(base, "a", "one.txt"), "1")
    storage.write_bytes(join(base, "a", "sub", "two.bin"), b"\x00\x01")
    storage.write_json(join(base, "b.json"), {"k": [1, 2]})
    assert storage.read_text(join(base, "a", "one.txt")) == "1"
    assert storage.read_bytes(join(base, "a", "sub", "two.bin")) == b"\x00\x01"
    assert storage.read_json(join(base, "b.json")) == {"k": [1, 2]}
    assert storage.size(join(base, "a", "sub", "two.bin")) == 2
    assert storage.listdir(base) == [join(base, "a"), join(base, "b.json")]
    assert storage.walk_files(join(base, "a")) == [join(base, "a", "one.txt"),
                                                   join(base, "a", "sub", "two.bin")]
    assert storage.listdir(join(base, "missing")) == []
    with storage.open(join(base, "a", "one.txt")) as fh:
        assert fh.read() == b"1"
    storage.rm(join(base, "a"), recursive=True)
    assert not storage.exists(join(base, "a", "one.txt"))


def test_atomic_write_publishes_nothing_on_error(root):
    base, storage = root
    target = join(base, "shard.tar")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), storage.open_atomic(target) as fh:
        fh.write(b"half of a new")
        raise RuntimeError("killed mid-write")
    assert storage.read_bytes(target) == b"old"
    assert storage.walk_files(base) == [target], "no temporary object may stay visible"
    with storage.open_atomic(join(base, "new.tar")) as fh:
        fh.write(b"partial")
        assert not storage.exists(join(base, "new.tar")), "visible before the write finished"
    assert storage.read_bytes(join(base, "new.tar")) == b"partial"


def test_large_remote_write_spills_to_disk(root):
    base, storage = root
    data = bytes(range(256)) * (33 * 4096)  # 33 MiB: past the in-memory spool
    with storage.open_atomic(join(base, "big.bin")) as fh:
        fh.write(data)
    assert storage.size(join(base, "big.bin")) == len(data)


def test_manifest_presence_means_complete(root):
    base, storage = root
    stage = join(base, "stage-abc")
    assert storage.read_manifest(stage) is None
    storage.write_bytes(join(stage, MANIFEST), b"{not json")
    assert storage.read_manifest(stage) is None, "a manifest that does not parse is incomplete"
    storage.write_manifest(stage, {"stage": "x"})
    assert storage.read_manifest(stage) == {"stage": "x"}


def test_storage_pickles_without_credentials(s3_endpoint):
    import pickle

    blob = pickle.dumps(Storage(endpoint_url=s3_endpoint))
    assert b"AWS-SECRET" not in blob and b"testing-key-id" not in blob
