"""The shard stage end to end: real Ray, local and moto-S3 roots (with the source on S3 too).

Every source kind, folder labels, each bad-input kind, dedup, kill-and-resume compared byte for
byte with a clean run, and reading the shards back with webdataset.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import faults
from pipeline.config import load_config
from pipeline.dag import Pipeline, StageFailed
from pipeline.data import builtin, wds
from pipeline.data.sources import make_key
from pipeline.storage import Storage, join
from stages.shard import PARTS, STAGE
from tests.image_fixtures import encoded, fixture_folder, gradient, write_tree

RES = 32


def run_shard(root: str, endpoint: str | None, source: str, *overrides: str,
              run: str = "t") -> dict:
    """Run the one-stage pipeline; returns the shard manifest."""
    pipe = Pipeline([STAGE])
    args = [f"run={run}", f"storage.root={root}", "tracking.mode=disabled",
            f"shard.source={source}", f"shard.resolution={RES}", "shard.progress=false",
            *overrides]
    if endpoint:
        args.append(f"storage.endpoint_url={endpoint}")
    return pipe.run(load_config(None, args, pipe.schema))["shard"]


def upload(storage: Storage, local: Path, uri: str) -> str:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.put_file(str(p), join(uri, p.relative_to(local).as_posix()))
    return uri


def source_for(root: str, endpoint: str | None, local: Path) -> str:
    """The fixture folder where the root is: local, or uploaded next to an S3 root."""
    if endpoint is None:
        return str(local)
    return upload(Storage(endpoint_url=endpoint), local, root.rsplit("/", 1)[0] + "/src")


def read_back(storage: Storage, outputs: dict) -> dict[str, dict]:
    """Every sample of every listed shard, by key; also checks the listed size and hash."""
    import hashlib

    samples = {}
    for shard in outputs["shards"]:
        data = storage.read_bytes(shard["uri"])
        assert len(data) == shard["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        got = list(wds.iter_samples(storage, shard["uri"]))
        assert len(got) == shard["samples"]
        for s in got:
            assert s["__key__"] not in samples
            samples[s["__key__"]] = {**s, "split": shard["split"]}
    return samples


def skipped_records(storage: Storage, outputs: dict) -> list[dict]:
    text = storage.read_text(outputs["skipped_uri"])
    return [json.loads(line) for line in text.splitlines()]


def decoded(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB" and img.size == (RES, RES)
    return np.asarray(img)


# -- folders, labels, bad input ---------------------------------------------------------------


def test_folder_source_labels_and_bad_inputs(ray_session, any_root, tmp_path):
    root, endpoint = any_root
    expect = fixture_folder(tmp_path / "src")
    source = source_for(root, endpoint, tmp_path / "src")
    storage = Storage(endpoint_url=endpoint)

    m = run_shard(root, endpoint, source, "shard.labels=folders", "shard.samples_per_shard=4",
                  "shard.val_fraction=0.2", "shard.ext=png")
    out = m["outputs"]
    assert out["classes"] == ["a", "b"] and out["num_classes"] == 2
    reasons = {**expect["bad"], **expect["rejected"]}
    assert out["skipped"] == dict(sorted(Counter(reasons.values()).items()))
    assert out["totals"]["ignored_files"] == expect["ignored"]
    assert out["totals"]["samples"] == len(expect["good"])
    assert out["splits"]["val"]["samples"] >= 1 and out["splits"]["train"]["samples"] >= 1

    records = skipped_records(storage, out)
    assert [r["key"] for r in records] == sorted(r["key"] for r in records)
    assert {r["source"][len(source) + 1:]: r["reason"] for r in records} == reasons
    assert all(r["detail"] for r in records)

    samples = read_back(storage, out)
    got = {json.loads(s["json"])["source"][len(source) + 1:]: s for s in samples.values()}
    assert set(got) == set(expect["good"])  # exactly the valid inputs
    for rel, s in got.items():
        assert s["__key__"] == make_key(rel)
        assert int(s["cls"]) == out["classes"].index(expect["good"][rel])
        decoded(s["png"])
    meta = json.loads(got["b/rotated.jpg"]["json"])
    assert (meta["width"], meta["height"]) == (30, 60)  # EXIF orientation applied
    assert (decoded(got["b/rgba.png"]["png"])[:, :8] >= 250).all()  # composited on white
    names = [s["name"] for s in out["shards"]]
    assert names == sorted(n for n in names if n.startswith("train/")) + sorted(
        n for n in names if n.startswith("val/"))
    assert names[0] == "train/shard-000000.tar"
    assert all(s["uri"] == join(m["uri"], s["name"]) for s in out["shards"])


def test_shards_read_with_webdataset_pipeline(ray_session, tmp_path):
    """The plain ``webdataset.WebDataset`` reader with its decoders sees the same samples."""
    import webdataset

    write_tree(tmp_path / "src", {f"{c}/img{i}.jpg": encoded(gradient(40, 36, i), "JPEG")
                                  for c in ("cat", "dog") for i in range(5)})
    m = run_shard(str(tmp_path / "runs"), None, str(tmp_path / "src"), "shard.labels=folders",
                  "shard.samples_per_shard=3", "shard.val_fraction=0.2")
    urls = [s["uri"] for s in m["outputs"]["shards"]]
    ds = webdataset.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple(
        "__key__", "jpg", "cls", "json")
    rows = list(ds)
    assert len(rows) == 10
    for key, img, cls, meta in rows:
        assert img.size == (RES, RES)
        rel = meta["source"][len(str(tmp_path / "src")) + 1:]
        assert key == make_key(rel) and cls == ["cat", "dog"].index(rel.split("/")[0])


# -- file lists -------------------------------------------------------------------------------


def write_list(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "csv":
        keys = sorted({k for r in rows for k in r})
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))


@pytest.mark.parametrize("fmt,where", [("csv", "local"), ("jsonl", "local"),
                                       ("parquet", "local"), ("csv", "s3")])
def test_file_list_sources(ray_session, tmp_path, request, fmt, where):
    src = tmp_path / "src"
    write_tree(src, {f"imgs/{i}.png": encoded(gradient(40, 40, i), "PNG") for i in range(6)})
    rows = [{"path": f"imgs/{i}.png", "label": "dog" if i % 2 else "cat"} for i in range(6)]
    rows.append({"path": "imgs/gone.png", "label": "cat"})  # listed, not there
    write_list(src / f"list.{fmt}", rows, fmt)
    root, endpoint = str(tmp_path / "runs"), None
    source_dir = str(src)
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        root = f"{bucket}/runs"
        source_dir = upload(Storage(endpoint_url=endpoint), src, f"{bucket}/src")
    storage = Storage(endpoint_url=endpoint)

    out = run_shard(root, endpoint, f"{source_dir}/list.{fmt}", "shard.val_fraction=0")["outputs"]
    assert out["classes"] == ["cat", "dog"]
    assert out["skipped"] == {"missing": 1}
    assert [r["source"] for r in skipped_records(storage, out)] == [f"{source_dir}/imgs/gone.png"]
    samples = read_back(storage, out)
    assert {make_key(f"imgs/{i}.png"): str(i % 2).encode() for i in range(6)} == {
        k: s["cls"] for k, s in samples.items()}
    assert out["splits"]["val"] == {"shards": 0, "samples": 0, "bytes": 0}


# -- builtin sources --------------------------------------------------------------------------


def test_builtin_digits(ray_session, tmp_path):
    from sklearn.datasets import load_digits

    out = run_shard(str(tmp_path / "runs"), None, "builtin:digits:200",
                    "shard.samples_per_shard=64", "shard.val_fraction=0.1")["outputs"]
    assert out["classes"] == [str(d) for d in range(10)]
    assert out["splits"]["train"]["samples"] == 180 and out["splits"]["val"]["samples"] == 20
    assert [s["samples"] for s in out["shards"]] == [64, 64, 52, 20]
    targets = load_digits().target
    samples = read_back(Storage(), out)
    assert len(samples) == 200
    for key, s in samples.items():
        index = int(key.split("_")[1])
        assert int(s["cls"]) == targets[index]
        assert json.loads(s["json"]) == {"source": f"builtin:digits/{index}", "width": 8,
                                         "height": 8}
        decoded(s["jpg"])
    assert out["skipped"] == {} and skipped_records(Storage(), out) == []


def test_builtin_photos(ray_session, tmp_path):
    out = run_shard(str(tmp_path / "runs"), None, "builtin:photos:21",
                    "shard.samples_per_shard=8", "shard.ext=webp")["outputs"]
    assert out["classes"] == list(builtin.PHOTOS)
    samples = read_back(Storage(), out)
    assert len(samples) == 21
    for key, s in samples.items():
        name = key[len("photos_"):-len("_00000")]
        assert int(s["cls"]) == builtin.PHOTOS.index(name)
        img = Image.open(io.BytesIO(s["webp"]))
        assert img.format == "WEBP" and img.size == (RES, RES)


# -- dedup ------------------------------------------------------------------------------------


def test_dedup_drops_exact_duplicates(ray_session, tmp_path):
    one, two = encoded(gradient(40, 40, 1), "PNG"), encoded(gradient(40, 40, 2), "PNG")
    write_tree(tmp_path / "src", {"a.png": one, "z/copy-of-a.png": one, "b.png": two,
                                  "c/b-again.png": two, "d.png": encoded(gradient(40, 40, 3),
                                                                         "PNG")})
    root, source = str(tmp_path / "runs"), str(tmp_path / "src")
    out = run_shard(root, None, source, "shard.dedup=true")["outputs"]
    assert out["totals"]["samples"] == 3 and out["totals"]["duplicates"] == 2
    keys = {rel: make_key(rel) for rel in ("a.png", "z/copy-of-a.png", "b.png", "c/b-again.png")}
    # The smallest key of each group is kept.
    expected = {max(keys["a.png"], keys["z/copy-of-a.png"]): min(keys["a.png"],
                                                                 keys["z/copy-of-a.png"]),
                max(keys["b.png"], keys["c/b-again.png"]): min(keys["b.png"],
                                                               keys["c/b-again.png"])}
    assert {d["key"]: d["duplicate_of"] for d in out["duplicates"]} == expected
    assert set(read_back(Storage(), out)) == {make_key("d.png"), *expected.values()}

    plain = run_shard(root, None, source, "shard.dedup=false")["outputs"]
    assert plain["totals"]["samples"] == 5 and plain["duplicates"] == []


# -- kill and resume --------------------------------------------------------------------------


def stage_files(storage: Storage, stage_uri: str) -> dict[str, bytes]:
    return {f[len(stage_uri) + 1:]: storage.read_bytes(f) for f in storage.walk_files(stage_uri)}


def comparable(outputs: dict) -> dict:
    """Manifest outputs minus what legitimately differs between runs (timings, URIs)."""
    drop = {"images_per_s", "seconds", "shards_reused", "skipped_uri"}
    out = {k: v for k, v in outputs.items() if k not in drop}
    out["shards"] = [{k: v for k, v in s.items() if k != "uri"} for s in outputs["shards"]]
    return out


def test_kill_and_resume_matches_a_clean_run(ray_session, any_root, tmp_path, monkeypatch):
    root, endpoint = any_root
    local_src = tmp_path / "src"
    fixture_folder(local_src)
    write_tree(local_src, {f"a/more{i}.jpg": encoded(gradient(44, 40, 20 + i), "JPEG")
                           for i in range(6)})
    source = source_for(root, endpoint, local_src)
    storage = Storage(endpoint_url=endpoint)
    opts = ("shard.labels=folders", "shard.samples_per_shard=3", "shard.val_fraction=0.25")

    monkeypatch.setenv(faults.ENV, "shard:2")
    with pytest.raises(StageFailed, match=faults.ENV):
        run_shard(root, endpoint, source, *opts, "shard.num_workers=1")
    monkeypatch.delenv(faults.ENV)
    stage_uri = storage.listdir(join(root, "t"))
    stage_uri = next(u for u in stage_uri if u.rsplit("/", 1)[-1].startswith("shard-"))
    assert not storage.exists(join(stage_uri, "_manifest.json"))
    tars = [f for f in storage.walk_files(stage_uri) if f.endswith(".tar")]
    assert 2 <= len(tars) < 8
    # What a harder kill leaves behind: a tar whose sidecar was never written, an unfinished
    # temporary, and a shard of an earlier listing that the current plan does not have.
    sidecars = [join(stage_uri, PARTS, t[len(stage_uri) + 1:].replace(".tar", ".json"))
                for t in tars]
    assert sum(len(storage.read_json(s)["skipped"]) for s in sidecars) > 0
    for s in sidecars:  # rebuilt from the tars, skip records included
        storage.rm(s)
    storage.write_bytes(join(stage_uri, "train", "shard-000099.tar"), b"stale")
    if endpoint is None:
        Path(stage_uri, "train", ".shard-000005.tar.tmp-deadbeef").write_bytes(b"partial")

    resumed = run_shard(root, endpoint, source, *opts)
    assert resumed["resumed"] is True
    assert resumed["outputs"]["shards_reused"] == len(tars)

    clean_root = str(tmp_path / "clean")
    clean = run_shard(clean_root, endpoint, source, *opts, "shard.num_workers=2")
    assert clean["fingerprint"] == resumed["fingerprint"]
    assert comparable(resumed["outputs"]) == comparable(clean["outputs"])
    got = stage_files(storage, resumed["uri"])
    want = stage_files(storage, clean["uri"])
    keep = {n for n in want if not n.startswith("_")} | {"_manifest.json"}
    assert sorted(got) == sorted(want)  # stale shard removed, nothing extra
    for name in keep - {"_manifest.json"}:
        assert got[name] == want[name], name
    if endpoint is None:
        assert not list(Path(stage_uri, "train").glob(".*tmp-*"))


# -- errors -----------------------------------------------------------------------------------


def test_empty_or_invalid_sources_are_clear_errors(ray_session, tmp_path):
    root = str(tmp_path / "runs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(StageFailed, match="holds no image"):
        run_shard(root, None, str(tmp_path / "empty"), run="e1")
    with pytest.raises(StageFailed, match="holds no image"):
        run_shard(root, None, str(tmp_path / "does-not-exist"), run="e2")
    write_tree(tmp_path / "bad", {"x.jpg": b"", "y.png": b"\x00\x01garbage" * 50})
    with pytest.raises(StageFailed, match="none of 2 inputs is a valid image"):
        run_shard(root, None, str(tmp_path / "bad"), run="e3")
    stage = next(p for p in (tmp_path / "runs" / "e3").iterdir() if p.name.startswith("shard-"))
    lines = (stage / "skipped.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["reason"] for line in lines) == ["empty", "undecodable"]
    shutil.rmtree(tmp_path / "runs")
