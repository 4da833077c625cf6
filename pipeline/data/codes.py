"""Code shards: the tokenize stage's output format, and its validating reader.

A code shard is a WebDataset tar matched by name to one image shard (``train/shard-000003.tar``
→ ``train/shard-000003.tar`` in the tokenize stage folder), holding per sample, in the image
shard's order:

- ``{key}.codes.npy``: the code grid, ``np.save`` of an ``[h, w]`` array of ``uint16`` indices
  (``uint32`` when the codebook has more than 65,536 entries);
- ``{key}.flip.npy``: the grid of the horizontally flipped image (only when the stage ran with
  ``flip: true``), same shape and dtype;
- ``{key}.cls``: the class id as decimal text, copied from the image shard (absent when
  unlabelled);
- ``{key}.cond.npy`` / ``{key}.cond.flip.npy``: the code grids of the sample's condition map
  (and of its mirror), encoded by the condition VQGAN (only for runs with conditions, issue
  #16: their grid, dtype and codebook may differ from the image's).

Writers use :func:`pipeline.data.wds.shard_writer` (fixed tar headers, so the same codes give
the same bytes). Readers go through :func:`iter_code_samples` / :func:`load_code_shard`, which
check what they read against a :class:`CodeShardSpec` (from the tokenize manifest) and raise
:class:`CorruptShardError` naming the shard and the reason: an unreadable or truncated tar, a
sample without codes, a grid of the wrong shape or dtype, a sample count or sha256 that differs
from the manifest's.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from pipeline.data import NO_LABEL
from pipeline.data.hashing import HashingReader
from pipeline.data.wds import CorruptShardError, iter_tar_groups
from pipeline.manifests import TokenizeOutputs
from pipeline.storage import Storage

CODES = "codes.npy"
FLIP = "flip.npy"
LABEL = "cls"
COND = "cond.npy"
COND_FLIP = "cond.flip.npy"


def code_dtype(n_embed: int) -> np.dtype:
    """The smallest unsigned dtype holding every index of an ``n_embed`` codebook."""
    if n_embed < 1:
        raise ValueError(f"n_embed must be >= 1, got {n_embed}")
    return np.dtype(np.uint16) if n_embed <= 1 << 16 else np.dtype(np.uint32)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` bytes of ``array`` (no pickle): the content of a ``.npy`` member."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def parse_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`npy_bytes`; raises ValueError for anything that is not a plain array."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class CodeShardSpec:
    """What a code shard must hold. ``None`` fields are not checked.

    ``grid`` is ``(h, w)``, ``dtype`` a numpy dtype name, ``flip`` whether every sample carries a
    flipped grid, ``n_embed`` the codebook size; ``cond`` whether every sample carries condition
    codes, of ``cond_grid`` / ``cond_dtype`` / ``cond_n_embed``. The tokenize manifest gives all
    of them (:func:`shard_specs`).
    """

    uri: str
    samples: int | None = None
    sha256: str | None = None
    grid: tuple[int, int] | None = None
    dtype: str | None = None
    flip: bool | None = None
    n_embed: int | None = None  # every code must be below it
    cond: bool | None = None
    cond_grid: tuple[int, int] | None = None
    cond_dtype: str | None = None
    cond_n_embed: int | None = None

    def cond_view(self) -> CodeShardSpec:
        """The spec the condition grids are checked against (their grid, dtype, codebook)."""
        return CodeShardSpec(self.uri, grid=self.cond_grid, dtype=self.cond_dtype,
                             n_embed=self.cond_n_embed)


def shard_specs(outputs: TokenizeOutputs | dict[str, Any],
                split: str | None = None) -> list[CodeShardSpec]:
    """The code shards listed in a tokenize stage's outputs (the record, or the manifest's
    ``outputs`` dict; one split, or all), in manifest order, each with the checks its reader
    should make."""
    if isinstance(outputs, dict):
        outputs = TokenizeOutputs.from_dict(outputs)
    c = outputs.condition
    return [CodeShardSpec(uri=s.uri, samples=s.samples, sha256=s.sha256, grid=outputs.grid,
                          dtype=outputs.dtype, flip=outputs.flip, n_embed=outputs.n_embed,
                          cond=c is not None, cond_grid=c.grid if c else None,
                          cond_dtype=c.dtype if c else None, cond_n_embed=c.n_embed if c else None)
            for s in outputs.shards if split is None or s.split == split]


@dataclass(frozen=True)
class CodeSample:
    """One sample of a code shard. ``label`` is ``NO_LABEL`` for unlabelled data."""

    key: str
    codes: np.ndarray  # [h, w]
    label: int
    flip: np.ndarray | None = None  # [h, w], codes of the horizontally flipped image
    cond: np.ndarray | None = None  # [hc, wc], codes of the condition map (runs with conditions)
    cond_flip: np.ndarray | None = None  # [hc, wc], of the mirrored map (with flip)


def _grid(uri: str, key: str, suffix: str, data: bytes | None,
          spec: CodeShardSpec) -> np.ndarray:
    if data is None:
        raise CorruptShardError(uri, f"sample {key!r} has no .{suffix}")
    try:
        grid = parse_npy(data)
    except (ValueError, EOFError, OSError) as e:
        raise CorruptShardError(uri, f"sample {key!r}: .{suffix} is not a valid .npy ({e})") \
            from e
    if grid.ndim != 2 or grid.dtype.kind != "u":
        raise CorruptShardError(uri, f"sample {key!r}: .{suffix} must be a 2-D unsigned grid, "
                                     f"got {grid.dtype} {list(grid.shape)}")
    if spec.grid is not None and tuple(grid.shape) != tuple(spec.grid):
        raise CorruptShardError(uri, f"sample {key!r}: .{suffix} grid {list(grid.shape)} != "
                                     f"expected {list(spec.grid)}")
    if spec.dtype is not None and grid.dtype != np.dtype(spec.dtype):
        raise CorruptShardError(uri, f"sample {key!r}: .{suffix} dtype {grid.dtype} != "
                                     f"expected {spec.dtype}")
    if spec.n_embed is not None and grid.size and int(grid.max()) >= spec.n_embed:
        raise CorruptShardError(uri, f"sample {key!r}: .{suffix} holds code {int(grid.max())}, "
                                     f"outside the codebook of {spec.n_embed}")
    return grid


def _label(uri: str, key: str, data: bytes | None) -> int:
    if data is None:
        return NO_LABEL
    try:
        return int(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptShardError(uri, f"sample {key!r}: .cls is not an integer ({data[:20]!r})") \
            from e


def _layout(layout: tuple[tuple[int, ...], np.dtype, bool]) -> str:
    shape, dtype, flip = layout
    return f"{dtype} {list(shape)} grid{', with flip' if flip else ''}"


def _cond_grids(uri: str, key: str, group: dict[str, bytes], spec: CodeShardSpec,
                flip: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A sample's condition grids (None, None without): checked against ``spec``'s cond fields;
    ``flip``: whether the sample carries a flipped image grid (then it needs a flipped map's)."""
    if spec.cond is False or (spec.cond is None and COND not in group):
        if COND in group:
            raise CorruptShardError(uri, f"sample {key!r} has .{COND} but the shard has none")
        return None, None
    view = spec.cond_view()
    cond = _grid(uri, key, COND, group.get(COND), view)
    cond_flip = _grid(uri, key, COND_FLIP, group.get(COND_FLIP), view) if flip else None
    if cond_flip is not None and cond_flip.shape != cond.shape:
        raise CorruptShardError(uri, f"sample {key!r}: .{COND_FLIP} {list(cond_flip.shape)} != "
                                     f".{COND} {list(cond.shape)}")
    return cond, cond_flip


def _samples(stream: IO[bytes], spec: CodeShardSpec) -> Iterator[CodeSample]:
    """Parse and check every sample of an open code shard (no count or hash check)."""
    uri = spec.uri
    first: tuple[tuple[int, ...], np.dtype, bool] | None = None
    cond_first: tuple[tuple[int, ...], np.dtype] | None = None
    for n_seen, (key, group) in enumerate(iter_tar_groups(stream, uri)):
        codes = _grid(uri, key, CODES, group.get(CODES), spec)
        flip = None
        if spec.flip or (spec.flip is None and FLIP in group):
            flip = _grid(uri, key, FLIP, group.get(FLIP), spec)
        elif spec.flip is False and FLIP in group:
            raise CorruptShardError(uri, f"sample {key!r} has .{FLIP} but the shard has none")
        # Without a full spec, all samples must at least agree with the first one.
        layout = (tuple(codes.shape), codes.dtype, flip is not None)
        first = first or layout
        if layout != first or (flip is not None and flip.shape != codes.shape):
            raise CorruptShardError(uri, f"sample {key!r}: {_layout(layout)} differs from the "
                                         f"shard's first sample ({_layout(first)})")
        cond, cond_flip = _cond_grids(uri, key, group, spec, flip is not None)
        cond_layout = (tuple(cond.shape), cond.dtype) if cond is not None else None
        if n_seen == 0:
            cond_first = cond_layout
        elif cond_layout != cond_first:
            raise CorruptShardError(uri, f"sample {key!r}: condition codes {cond_layout} differ "
                                         f"from the shard's first sample's ({cond_first})")
        yield CodeSample(key, codes, _label(uri, key, group.get(LABEL)), flip, cond, cond_flip)


def iter_code_samples(storage: Storage, shard: CodeShardSpec | str) -> Iterator[CodeSample]:
    """Stream the samples of one code shard, checking them against ``shard``.

    ``shard`` is a :class:`CodeShardSpec` (from :func:`shard_specs`) or a bare URI (then only
    the structure is checked: a readable tar whose samples all hold codes of one shape and
    dtype). Every sample is checked as it is read; the sample count and the sha256 of the bytes
    are checked when the shard ends — after its last sample was yielded, so a consumer that
    stops early skips them (use :func:`load_code_shard` to check before using anything).
    Raises :class:`CorruptShardError`; a missing shard raises FileNotFoundError.
    """
    spec = CodeShardSpec(uri=shard) if isinstance(shard, str) else shard
    n = 0
    with storage.open(spec.uri, "rb") as fh:
        reader = HashingReader(fh)
        for sample in _samples(reader, spec):
            n += 1
            yield sample
        reader.drain()
    _check_totals(spec, n, reader.sha256)


def _check_totals(spec: CodeShardSpec, samples: int, sha256: str) -> None:
    if spec.samples is not None and samples != spec.samples:
        raise CorruptShardError(spec.uri, f"{samples} samples, the manifest lists {spec.samples}")
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise CorruptShardError(spec.uri, f"sha256 {sha256[:16]}… differs from the manifest's "
                                          f"{spec.sha256[:16]}…")


@dataclass
class CodeShard:
    """A whole code shard in memory: ``codes`` [N, h, w], ``labels`` [N] (NO_LABEL: unlabelled),
    ``flip`` [N, h, w] or None; ``cond`` / ``cond_flip`` [N, hc, wc] or None (condition codes)."""

    uri: str
    keys: list[str]
    codes: np.ndarray
    labels: np.ndarray
    flip: np.ndarray | None
    cond: np.ndarray | None = None
    cond_flip: np.ndarray | None = None


def load_code_shard(storage: Storage, shard: CodeShardSpec | str) -> CodeShard:
    """Read one code shard fully and check it (sha256 first, then every sample, then the count)
    before returning anything. Raises :class:`CorruptShardError`."""
    spec = CodeShardSpec(uri=shard) if isinstance(shard, str) else shard
    data = storage.read_bytes(spec.uri)
    if spec.sha256 is not None:
        _check_totals(CodeShardSpec(spec.uri, sha256=spec.sha256), 0,
                      hashlib.sha256(data).hexdigest())
    samples = list(_samples(io.BytesIO(data), spec))
    _check_totals(CodeShardSpec(spec.uri, samples=spec.samples), len(samples), "")
    if samples:
        codes = np.stack([s.codes for s in samples])
        flip = np.stack([s.flip for s in samples]) if samples[0].flip is not None else None
    else:
        h, w = spec.grid or (0, 0)
        codes = np.zeros((0, h, w), dtype=np.dtype(spec.dtype or np.uint16))
        flip = codes.copy() if spec.flip else None
    labels = np.array([s.label for s in samples], dtype=np.int64)
    cond = cond_flip = None
    if samples and samples[0].cond is not None:
        cond = np.stack([s.cond for s in samples])
        if samples[0].cond_flip is not None:
            cond_flip = np.stack([s.cond_flip for s in samples])
    return CodeShard(spec.uri, [s.key for s in samples], codes, labels, flip, cond, cond_flip)
