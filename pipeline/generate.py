"""Images from a finished run: find its exports, load the GPT and the VQGAN, sample code grids
(plain, or sliding-window for grids larger than the trained one), decode them, write PNGs.

Shared by the ``sample`` stage and ``python -m pipeline sample RUN_URI``. Everything here runs in
one process on one device; nothing needs Ray.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.dag import stage_folder, stage_of_folder
from pipeline.manifests import GPTOutputs, VQGANOutputs
from pipeline.storage import MANIFEST, Storage, basename, join

log = logging.getLogger("pipeline")

TRANSFORMER = "train_transformer"
VQGAN_STAGE = "train_vqgan"


@dataclass(frozen=True)
class SampleOptions:
    """How codes are drawn: ``temperature`` (0 = greedy), ``top_k`` (None = off), ``top_p``
    (None = off), ``cfg_scale`` (classifier-free guidance; 1 = off, needs a class-conditional
    model trained with ``cond_drop`` > 0 to mean anything)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0

    def check(self) -> None:
        """ValueError naming the option when a value is out of range."""
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1 (or off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale: must be >= 0, got {self.cfg_scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- finding a run's models ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunModels:
    """Where a finished train_transformer stage and its VQGAN left their exports."""

    transformer_uri: str  # the train_transformer stage folder
    gpt_weights: str
    gpt_config: str
    vqgan_weights: str
    vqgan_config: str
    grid: tuple[int, int]  # the trained code grid (h, w): the sampling window
    classes: list[str]  # class names, [] when unconditional
    # A GPT that reads condition maps (issue #16): kind, classes, grid, length, vqgan {weights,
    # config} (URIs relocated like the others); None for other models.
    condition: dict[str, Any] | None = None


def _finished(storage: Storage, stage_uri: str, stage: str) -> dict[str, Any] | None:
    manifest = storage.read_manifest(stage_uri)
    return manifest if manifest is not None and manifest.get("stage") == stage else None


def _newest(storage: Storage, run_uri: str, stage: str) -> str | None:
    """The most recently finished folder of ``stage`` in a run folder, or None."""
    found = []
    for uri in storage.listdir(run_uri):
        if stage_of_folder(basename(uri)) == stage:
            m = _finished(storage, uri, stage)
            if m is not None:
                found.append((m.get("finished_at", ""), uri))
    return max(found)[1] if found else None


def _transformer_folder(storage: Storage, uri: str) -> str | None:
    if _finished(storage, uri, TRANSFORMER) is not None:
        return uri
    run_json = join(uri, "run.json")
    if storage.exists(run_json):
        planned = storage.read_json(run_json).get("stages", {}).get(TRANSFORMER, {})
        if planned.get("uri"):  # by name: the run folder may have been moved since
            folder = join(uri, basename(planned["uri"]))
            if _finished(storage, folder, TRANSFORMER) is not None:
                return folder
    return _newest(storage, uri, TRANSFORMER) if storage.exists(uri) else None


def relocator(recorded_stage_uri: str, actual_stage_uri: str) -> Callable[[str], str]:
    """Manifests record absolute URIs. When a run folder was copied or synced elsewhere (another
    bucket, a laptop), map URIs under the recorded run folder onto the actual one."""
    old = recorded_stage_uri.rstrip("/").rsplit("/", 1)[0] + "/"
    new = actual_stage_uri.rstrip("/").rsplit("/", 1)[0] + "/"
    return lambda u: new + u[len(old):] if u.startswith(old) else u


def run_models(storage: Storage, manifest: dict[str, Any], folder: str) -> RunModels:
    """The models of a finished train_transformer ``manifest`` found in ``folder`` (where the
    manifest's URIs are, after :func:`relocator`). The VQGAN is the one its outputs record;
    manifests written before that was recorded name it by fingerprint (``upstream``), and the
    DAG's folder rule (:func:`pipeline.dag.stage_folder`) gives its folder."""
    out = GPTOutputs.from_dict(manifest.get("outputs", {}),
                               f"{TRANSFORMER} outputs ({folder})")
    moved = relocator(manifest["uri"], folder)
    vq = out.vqgan
    if vq is None:
        vq_fp = manifest.get("upstream", {}).get(VQGAN_STAGE, "")
        vq_folder = stage_folder(folder.rsplit("/", 1)[0], VQGAN_STAGE, vq_fp)
        vq_manifest = _finished(storage, vq_folder, VQGAN_STAGE)
        if vq_manifest is None:
            raise FileNotFoundError(f"{vq_folder}: the VQGAN this GPT was trained on is not "
                                    f"finished or was removed")
        vq = VQGANOutputs.from_dict(vq_manifest["outputs"], f"{VQGAN_STAGE} outputs").export
    cond = out.condition
    if cond is not None:
        cond = {**cond, "vqgan": {k: moved(v) for k, v in cond["vqgan"].items()}}
    return RunModels(
        transformer_uri=folder, gpt_weights=moved(out.export.weights),
        gpt_config=moved(out.export.config), vqgan_weights=moved(vq.weights),
        vqgan_config=moved(vq.config), grid=(int(out.grid[0]), int(out.grid[1])),
        classes=[str(c) for c in out.classes] if out.n_classes else [], condition=cond)


def find_models(storage: Storage, uri: str) -> RunModels:
    """The models of a run. ``uri``: a run folder (``<root>/<run>``, holding run.json) or a
    finished train_transformer stage folder. Within a run folder, the train_transformer of the
    last ``run`` (run.json) is used when it finished, else the most recently finished one. The
    run folder may have been moved or copied (:func:`relocator`). FileNotFoundError saying what
    is missing otherwise."""
    uri = uri.rstrip("/")
    folder = _transformer_folder(storage, uri)
    manifest = _finished(storage, folder, TRANSFORMER) if folder else None
    if folder is None or manifest is None:
        raise FileNotFoundError(
            f"{uri}: no finished {TRANSFORMER} stage here (give a run folder <root>/<run> or a "
            f"{TRANSFORMER}-<fp> folder holding {MANIFEST}); run the pipeline first")
    return run_models(storage, manifest, folder)


def load_models(storage: Storage, models: RunModels, device: str = "cpu") -> tuple[Any, Any]:
    """(GPT, VQGAN), both fp32 in eval mode on ``device``."""
    from pipeline.models.gpt import GPT
    from pipeline.models.vqgan import VQGAN

    gpt = GPT.from_bytes(storage.read_text(models.gpt_config),
                         storage.read_bytes(models.gpt_weights), map_location=device)
    vqgan = VQGAN.from_bytes(storage.read_text(models.vqgan_config),
                             storage.read_bytes(models.vqgan_weights), map_location=device)
    return gpt.eval(), vqgan.eval()


def load_cond_vqgan(storage: Storage, models: RunModels, device: str = "cpu") -> Any:
    """The condition VQGAN of a GPT that reads condition maps (fp32, eval mode)."""
    from pipeline.models.vqgan import VQGAN

    if models.condition is None:
        raise ValueError(f"{models.transformer_uri}: this GPT reads no condition maps")
    exp = models.condition["vqgan"]
    return VQGAN.from_bytes(storage.read_text(exp["config"]), storage.read_bytes(exp["weights"]),
                            map_location=device).eval()


def condition_input(models: RunModels) -> Any:
    """How the run's condition VQGAN reads a map (:func:`pipeline.data.conditions.
    condition_input`: a ConditionInput, or a LowResInput for ``downsample:N``)."""
    from pipeline.data.conditions import condition_input as reader_of

    assert models.condition is not None
    return reader_of(models.condition["kind"], int(models.condition.get("classes") or 0))


def encode_condition(cond_vqgan: Any, reader: Any, data: bytes, name: str,
                     window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's condition map (PNG bytes, stored as the shard stage stores ``kind``: label ids
    in an L PNG, 16-bit depth, 8-bit edges or gray, a low-resolution RGB image for
    ``downsample:N``) → (its codes [1, H, W] under the condition VQGAN, the map's model input
    [1, C, H·f, W·f]), center-cropped so that the model input is a multiple of the VQGAN's
    factor ``f`` (a ``downsample:N`` image is enlarged N times first: super-resolution).
    ValueError naming ``name`` when it is not such a map or is smaller than the trained size
    (``window`` codes)."""
    import math

    from pipeline.data.conditions import COND

    factor = cond_vqgan.config.downsample_factor
    scale = getattr(reader, "scale", 1)
    try:
        hwc = reader.array({COND: data, "__key__": name})
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: not a {reader.kind} map ({e})") from e
    step = factor // math.gcd(factor, scale)  # map pixels per whole code
    h, w = hwc.shape[0] // step * step, hwc.shape[1] // step * step
    try:
        grid = code_grid((h * scale, w * scale), factor, window)
    except ValueError as e:
        raise ValueError(f"{name}: {hwc.shape[0]}x{hwc.shape[1]} px map"
                         + (f" (x{scale}: {hwc.shape[0] * scale}x{hwc.shape[1] * scale} px)"
                            if scale > 1 else "") + f": {e}") from e
    top, left = (hwc.shape[0] - h) // 2, (hwc.shape[1] - w) // 2
    try:
        x = reader.tensor(hwc[top:top + h, left:left + w]).unsqueeze(0)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
    device = next(cond_vqgan.parameters()).device
    with torch.inference_mode():
        codes = cond_vqgan.encode(x.to(device)).indices
    assert tuple(codes.shape[-2:]) == grid
    return codes, x


# -- sampling --------------------------------------------------------------------------------------


def code_grid(size: tuple[int, int], factor: int, window: tuple[int, int]) -> tuple[int, int]:
    """Image size (H, W) in pixels -> code grid (H/f, W/f). ValueError when a side is not a
    multiple of the VQGAN's factor or the grid is smaller than the trained window."""
    if size[0] % factor or size[1] % factor:
        raise ValueError(f"size: {size[0]}x{size[1]} px must be a multiple of the VQGAN's "
                         f"downsampling factor {factor}")
    grid = (size[0] // factor, size[1] // factor)
    if grid[0] < window[0] or grid[1] < window[1]:
        raise ValueError(f"size: {size[0]}x{size[1]} px is smaller than the trained size "
                         f"{window[0] * factor}x{window[1] * factor} px")
    return grid


@dataclass
class Generated:
    """Sampled codes [N, H, W] (int64), their decoded images [N, 3, H·f, W·f] in [-1, 1], the
    labels used ([N] or None), wall seconds of sampling and decoding, and codes drawn."""

    codes: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate(
    gpt: Any, vqgan: Any, n: int, labels: torch.Tensor | None, window: tuple[int, int],
    grid: tuple[int, int] | None = None, options: SampleOptions = SampleOptions(), seed: int = 0,
    batch_size: int = 64, progress: bool = False, cond_grids: torch.Tensor | None = None,
) -> Generated:
    """``n`` samples (``labels`` [n] class ids, or None: unconditional) on a code ``grid``
    (default: the trained ``window``; larger: sliding-window sampling), decoded by ``vqgan``.
    ``cond_grids`` [n, H, W] (a GPT that reads condition maps): each sample's condition codes on
    the same grid (one row may be expanded to all n). One generator seeded with ``seed`` draws
    every batch: the same arguments give the same images."""
    from tqdm.auto import tqdm

    from pipeline.kernels import decode as native_decode
    from pipeline.models.sampling import sample, sample_sliding

    native_decode.install()  # the C one-token kernels as the samplers' "native" set, where built
    options.check()
    grid = grid or window
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels: {len(labels)} for n={n}")
    if cond_grids is not None:
        cond_grids = cond_grids.expand(n, -1, -1) if len(cond_grids) == 1 else cond_grids
        if tuple(cond_grids.shape) != (n, *grid):
            raise ValueError(f"cond_grids: {list(cond_grids.shape)}, expected [{n}, "
                             f"{grid[0]}, {grid[1]}] (the code grid)")
    device = next(gpt.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                  cfg_scale=options.cfg_scale, generator=gen)
    codes, images = [], []
    t0 = time.perf_counter()
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        b = min(batch_size, n - start)
        cond = labels[start:start + b].to(device) if labels is not None else None
        maps = cond_grids[start:start + b].to(device) if cond_grids is not None else None
        if grid == window:
            c = sample(gpt, b, cond, grid[0] * grid[1], **kwargs,
                       cond_codes=None if maps is None else maps.reshape(b, -1)).view(b, *grid)
        else:
            c = sample_sliding(gpt, b, cond, grid=grid, window=window, **kwargs,
                               cond_grid=maps)
        with torch.inference_mode():
            images.append(vqgan.decode_indices(c).float().clamp(-1, 1).cpu())
        codes.append(c.cpu())
    seconds = time.perf_counter() - t0
    return Generated(torch.cat(codes), torch.cat(images), labels, seconds,
                     n * grid[0] * grid[1])


def class_labels(n_per_class: int, classes: Sequence[int]) -> torch.Tensor:
    """[len(classes) · n_per_class] labels, class-major: k0 ×n, k1 ×n, ..."""
    return torch.tensor(list(classes), dtype=torch.long).repeat_interleave(n_per_class)


# -- PNGs ------------------------------------------------------------------------------------------


def display_factor(side: int, target: int = 64) -> int:
    """Integer enlargement so a ``side``-px image shows at >= ``target`` px in a viewer."""
    return max(1, -(-target // max(1, side)))


def sample_names(labels: torch.Tensor | None, n: int, classes: Sequence[str]) -> list[str]:
    """File names of the individual PNGs: ``class-<k>-<name>-<i>.png`` (i counts within the
    class) or ``sample-<i>.png``."""
    if labels is None:
        return [f"sample-{i:04d}.png" for i in range(n)]
    names, seen = [], {}
    for k in labels.tolist():
        i = seen.get(k, 0)
        seen[k] = i + 1
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", classes[k]) if k < len(classes) else str(k)
        names.append(f"class-{k:03d}-{tag}-{i:03d}.png")
    return names


def write_pngs(storage: Storage, out_uri: str, images: torch.Tensor, names: Sequence[str],
               cols: int) -> tuple[list[str], str]:
    """One PNG per image (native resolution) under ``out_uri`` and ``grid.png`` (``cols`` per
    row, enlarged to >= 64 px cells). Returns (individual URIs, grid URI). Atomic writes."""
    from pipeline.metrics import grid, png_bytes, to_uint8, upscale

    pixels = to_uint8(images)  # [N,H,W,3]
    uris = []
    for name, img in zip(names, pixels, strict=True):
        uri = join(out_uri, name)
        storage.write_bytes(uri, png_bytes(img))
        uris.append(uri)
    sheet = upscale(grid(pixels, cols=cols), display_factor(pixels.shape[1]))
    grid_uri = join(out_uri, "grid.png")
    storage.write_bytes(grid_uri, png_bytes(sheet))
    return uris, grid_uri


def highres_png(images: torch.Tensor) -> np.ndarray:
    """High-resolution samples [N,3,H,W] stacked vertically, enlarged to >= 256 px tall each."""
    from pipeline.metrics import grid, to_uint8, upscale

    pixels = to_uint8(images)
    return upscale(grid(pixels, cols=1), display_factor(pixels.shape[1], 256))


__all__ = ["Generated", "RunModels", "SampleOptions", "class_labels", "code_grid",
           "display_factor", "find_models", "generate", "highres_png", "load_models", "relocator",
           "run_models", "sample_names", "write_pngs"]
