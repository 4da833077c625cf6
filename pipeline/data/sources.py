"""Listing the inputs of the shard stage: an image folder, a file list, or a builtin dataset.

Listing runs on the driver and only names inputs (no image is read); workers fetch each one with
:func:`load_item`. Every input gets a stable WebDataset key derived from its source path, so the
same file keeps its key across runs, roots and machines.

Source kinds (``shard.source``):

- ``builtin:digits[:N]`` / ``builtin:photos[:N]`` (see :mod:`pipeline.data.builtin`);
- a URI ending in ``.csv``, ``.jsonl`` or ``.parquet``: a file list with a ``path`` column and an
  optional ``label`` column (and, for paired conditions, a column of condition paths); relative
  paths are relative to the list's folder;
- anything else: a folder (local or ``s3://…``) searched recursively for image files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.data import NO_LABEL, builtin
from pipeline.storage import Storage, basename, join

LIST_EXTS = (".csv", ".jsonl", ".parquet")
IMAGE_EXTS = frozenset({"jpg", "jpeg", "jpe", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm",
                        "pgm", "pbm", "pnm"})
LABEL_MODES = ("auto", "folders", "none")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_SLUG_CHARS = 48


@dataclass(frozen=True)
class Item:
    """One input: its WebDataset key, where it comes from, and its class id (-1: none).

    ``cond``: the URI of its paired condition file (:mod:`pipeline.data.conditions`); ``""``
    when the file list names none for it; None when the run pairs no condition files.
    """

    key: str
    uri: str
    label: int = NO_LABEL
    cond: str | None = None


@dataclass
class Listing:
    """What a source holds. ``rejected``: inputs dropped at listing time (skip records)."""

    kind: str  # builtin | file_list | folder
    items: list[Item]
    classes: list[str]
    ignored_files: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)


def source_kind(source: str) -> str:
    """``builtin``, ``file_list`` or ``folder``, from the source string alone."""
    if source.startswith("builtin:"):
        return "builtin"
    if basename(source).lower().endswith(LIST_EXTS):
        return "file_list"
    return "folder"


def make_key(rel: str) -> str:
    """A WebDataset key for a source path: ``<slug of the path>_<10 hex digits>``.

    WebDataset splits a member name at the first dot of its basename, so keys must hold no dots
    (nor slashes, which would make tar folders). The slug keeps the path's readable tail; the
    digest of the full path keeps keys unique (``a/b.jpg``, ``a_b.jpg`` and ``a/b.png`` all
    differ) and stable (the same path always gives the same key).
    """
    stem = rel.rsplit(".", 1)[0] if "." in basename(rel) else rel
    slug = _KEY_UNSAFE.sub("_", stem).strip("_-")[-_KEY_SLUG_CHARS:].strip("_-")
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:10]
    return f"{slug}_{digest}" if slug else digest


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS


def _reject(key: str, uri: str, reason: str, detail: str) -> dict[str, Any]:
    return {"key": key, "source": uri, "reason": reason, "detail": detail}


def list_folder(source: str, storage: Storage, labels: str) -> Listing:
    """Image files below ``source`` (recursive, hidden entries ignored).

    ``labels == "folders"``: the first path segment below ``source`` is the class (ids follow
    the sorted names); files directly in ``source`` are rejected (``no_class_folder``).
    """
    root = source.rstrip("/")
    files = storage.walk_files(root)
    ignored = 0
    rels: list[tuple[str, str]] = []
    for uri in files:
        rel = uri[len(root):].lstrip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or not _is_image_name(parts[-1]):
            ignored += 1
            continue
        rels.append((rel, uri))
    listing = Listing("folder", [], [], ignored_files=ignored)
    if labels != "folders":
        listing.items = [Item(make_key(rel), uri) for rel, uri in rels]
        return listing
    listing.classes = sorted({rel.split("/", 1)[0] for rel, _ in rels if "/" in rel})
    ids = {name: i for i, name in enumerate(listing.classes)}
    for rel, uri in rels:
        if "/" not in rel:
            listing.rejected.append(_reject(make_key(rel), uri, "no_class_folder",
                                            "labels: folders, but the file is not in a "
                                            "class subfolder"))
        else:
            listing.items.append(Item(make_key(rel), uri, ids[rel.split("/", 1)[0]]))
    return listing


def _read_rows(uri: str, storage: Storage) -> list[dict[str, Any]]:
    data = storage.read_bytes(uri)
    name = basename(uri).lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8-sig")
    if name.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{uri}: line {n} is not a JSON object")
                rows.append(row)
        return rows
    return list(csv.DictReader(io.StringIO(text)))


def _label_value(v: Any) -> Any:
    """Missing (None, "", NaN) → None; integral numbers and digit strings → int; else str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, int):
        return v
    s = str(v).strip()
    if not s:
        return None
    return int(s) if s.isdigit() else s


def class_ids(values: list[Any]) -> tuple[dict[Any, int], list[str]]:
    """Label values → (value → class id, class names).

    All non-negative integers: kept as ids, names "0".."max". Otherwise: sorted distinct names
    (as strings) → 0..n-1.
    """
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and v >= 0 for v in present):
        top = max(present)
        return {v: v for v in set(present)}, [str(i) for i in range(top + 1)]
    names = sorted({str(v) for v in present})
    ids = {name: i for i, name in enumerate(names)}
    return {v: ids[str(v)] for v in set(present)}, names


def _resolve(parent: str, rel: str) -> str:
    return rel if ("://" in rel or rel.startswith("/")) else join(parent, rel)


def list_file_list(source: str, storage: Storage, labels: str,
                   cond_column: str | None = None) -> Listing:
    """Rows of a CSV/JSONL/Parquet file list (``path`` required, ``label`` optional).

    Relative paths resolve against the list's folder. A repeated path is rejected
    (``duplicate_entry``); with labels in use, a row without one is rejected (``no_label``).
    ``cond_column``: a column of condition paths (resolved like ``path``) → ``Item.cond``, ``""``
    for an empty cell; a list without that column is a ValueError.
    """
    rows = _read_rows(source, storage)
    if rows and "path" not in rows[0]:
        raise ValueError(f"{source}: a file list needs a 'path' column (found: "
                         f"{', '.join(map(str, rows[0]))})")
    if cond_column and rows and not any(cond_column in r for r in rows):
        raise ValueError(f"{source}: no condition column {cond_column!r} (found: "
                         f"{', '.join(map(str, rows[0]))})")
    parent = source.rstrip("/").rsplit("/", 1)[0] if "/" in source else "."
    use_labels = labels != "none" and any("label" in r for r in rows)
    values = [_label_value(r.get("label")) for r in rows] if use_labels else [None] * len(rows)
    use_labels = use_labels and any(v is not None for v in values)
    mapping, classes = class_ids(values) if use_labels else ({}, [])
    listing = Listing("file_list", [], classes)
    seen: set[str] = set()
    for row, value in zip(rows, values):
        rel = str(row.get("path") or "").strip()
        if not rel:
            listing.rejected.append(_reject("", "", "no_path", "a row with an empty path"))
            continue
        uri = _resolve(parent, rel)
        key = make_key(rel)
        if key in seen:
            listing.rejected.append(_reject(key, uri, "duplicate_entry",
                                            "the path is listed more than once"))
            continue
        seen.add(key)
        if use_labels and value is None:
            listing.rejected.append(_reject(key, uri, "no_label", "the row has no label"))
            continue
        cond = None
        if cond_column:
            cell = str(row.get(cond_column) or "").strip()
            cond = _resolve(parent, cell) if cell else ""
        listing.items.append(Item(key, uri, mapping[value] if use_labels else NO_LABEL, cond))
    return listing


def list_builtin(source: str, seed: int, labels: str) -> Listing:
    entries, classes = builtin.entries(source, seed)
    if labels == "none":
        return Listing("builtin", [Item(k, u) for k, u, _ in entries], [])
    return Listing("builtin", [Item(k, u, label) for k, u, label in entries], classes)


def list_source(source: str, storage: Storage, labels: str = "auto", seed: int = 0,
                cond_column: str | None = None) -> Listing:
    """Every input of ``source`` (see module docstring), items sorted by key.

    ``labels``: ``auto`` (builtin labels, a file list's ``label`` column, none for folders),
    ``folders`` (folder sources: first-level subfolders are classes) or ``none``.
    ``cond_column``: file lists only, see :func:`list_file_list`.
    """
    kind = source_kind(source)
    if kind == "builtin":
        listing = list_builtin(source, seed, labels)
    elif kind == "file_list":
        listing = list_file_list(source, storage, labels, cond_column)
    else:
        listing = list_folder(source, storage, labels)
    listing.items.sort(key=lambda it: it.key)
    listing.rejected.sort(key=lambda r: (r["key"], r["source"]))
    return listing


def load_item(item: Item, storage: Storage) -> bytes | Image.Image:
    """The raw input: file bytes, or a Pillow image for builtin items.

    Raises what reading raises (FileNotFoundError, PermissionError, …).
    """
    if item.uri.startswith("builtin:"):
        return builtin.render(item.uri)
    return storage.read_bytes(item.uri)


def content_hash(item: Item, storage: Storage) -> str | None:
    """sha256 of an input's bytes (for builtin items: of mode, size and pixels); None if unreadable.

    Unreadable inputs are not deduplicated; the shard pass records why they are skipped.
    """
    try:
        data = load_item(item, storage)
    except OSError:
        return None
    h = hashlib.sha256()
    if isinstance(data, Image.Image):
        h.update(f"{data.mode}:{data.size[0]}x{data.size[1]}:".encode())
        data = data.tobytes()
    h.update(data)
    return h.hexdigest()
