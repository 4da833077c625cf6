"""Where the LPIPS(vgg16) weights come from: the VGG16 trunk and the linear heads, each from a
URI when one is configured, else from its standard source.

- Heads (``perceptual.lin_weights`` unset): ``lpips/weights/v0.1/vgg.pth`` from the installed
  ``lpips`` 0.1.4 wheel, the file the reference downloads (md5 checked). The package is found
  through its metadata and never imported: it imports torchvision, which is not installed (the
  only torchvision on the registry matching our torch pin is a CUDA build that fails to import
  beside the CPU torch), so ``make install`` installs lpips with ``--no-deps``.
- Trunk (``perceptual.vgg_weights`` unset): torchvision's ImageNet VGG16 (:data:`VGG16_URL`,
  keys ``features.N.*``) through the torch hub cache (``$TORCH_HOME/hub/checkpoints``): used
  when there, else downloaded once (528 MB, sha256 prefix checked). No torchvision needed.
- A URI (``s3://``, a path, ...) is read through :class:`pipeline.storage.Storage`.

Unavailable weights raise :class:`LPIPSWeightsError`, which names the config key to set.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = VGG16_URL.rsplit("/", 1)[1]
VGG16_SHA256_PREFIX = "397923af"  # torchvision's convention: the file name carries it
LPIPS_PACKAGE = "lpips"
LPIPS_HEADS_FILE = "lpips/weights/v0.1/vgg.pth"
LPIPS_HEADS_MD5 = "d507d7349b931f0638a25a48a722f98a"  # the reference's vgg.pth
VGG_KEY, LIN_KEY = "perceptual.vgg_weights", "perceptual.lin_weights"


class LPIPSWeightsError(RuntimeError):
    """LPIPS weights that cannot be had; ``key`` is the config key that would provide them."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def _load(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_uri(uri: str, storage: Any, key: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except Exception as e:  # a missing object, no credentials, ...: say which key to fix
        raise LPIPSWeightsError(key, f"{uri} cannot be read ({type(e).__name__}: {e})") from None


# -- heads --------------------------------------------------------------------------------------


def lpips_heads_path() -> Path | None:
    """The heads file of the installed lpips package, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(LPIPS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(LPIPS_HEADS_FILE)))
    return path if path.is_file() else None


def lpips_heads(uri: str | None, storage: Any) -> tuple[dict[str, Any], str]:
    """(heads state dict, where it came from): ``uri`` if given, else the lpips wheel's file."""
    if uri:
        return _load(_read_uri(uri, storage, LIN_KEY)), uri
    path = lpips_heads_path()
    if path is None:
        raise LPIPSWeightsError(LIN_KEY, "unset, and the lpips package that ships the LPIPS heads "
                                "is not installed: `pip install --no-deps lpips==0.1.4` (its "
                                "torchvision is not needed), or set it to a URI of the "
                                "reference's vgg.pth")
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() != LPIPS_HEADS_MD5:
        raise LPIPSWeightsError(LIN_KEY, f"unset, and {path} is not the reference's vgg.pth "
                                f"(md5 differs); reinstall lpips 0.1.4 or set a URI")
    version = importlib.metadata.version(LPIPS_PACKAGE)
    return _load(data), f"lpips {version} wheel ({path}, md5 ok)"


# -- trunk --------------------------------------------------------------------------------------


def vgg16_cache_path() -> Path:
    """Where the torch hub cache keeps torchvision's VGG16 (follows ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def fetch_vgg16() -> tuple[Path, str]:
    """(path of torchvision's VGG16 file, "cache" or "download"): the hub cache's copy, else
    downloaded into it (sha256 prefix checked). Offline without a cached copy:
    :class:`LPIPSWeightsError` naming ``perceptual.vgg_weights``."""
    path = vgg16_cache_path()
    if path.is_file():
        return path, "cache"
    log.info("LPIPS: downloading torchvision's VGG16 ImageNet weights (528 MB, once) from %s "
             "to %s", VGG16_URL, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Looked up at call time (not imported by name), so tests can stand in for the network.
        torch.hub.download_url_to_file(VGG16_URL, str(path), VGG16_SHA256_PREFIX, progress=False)
    except Exception as e:  # offline, proxy, bad hash: the same advice
        raise LPIPSWeightsError(
            VGG_KEY, f"unset, and torchvision's VGG16 ImageNet weights are neither in the torch "
            f"hub cache ({path}) nor downloadable ({VGG16_URL}: {type(e).__name__}: {e}). Set "
            f"train_vqgan.{VGG_KEY} to a URI of that file (a torchvision vgg16 state dict, "
            f"e.g. copied to s3://...), put it at {path}, or set "
            f"train_vqgan.perceptual.backbone=random for an offline demo") from None
    return path, "download"


def vgg16_weights(uri: str | None, storage: Any) -> tuple[dict[str, Any], str]:
    """(torchvision vgg16 state dict, where it came from): ``uri`` if given, else
    :func:`fetch_vgg16`'s file."""
    if uri:
        return _load(_read_uri(uri, storage, VGG_KEY)), uri
    path, how = fetch_vgg16()
    where = "torch hub cache" if how == "cache" else "downloaded into the torch hub cache"
    return _load(path.read_bytes()), f"torchvision ImageNet VGG16, {where} ({path})"


def check_sources(vgg_uri: str | None, lin_uri: str | None, storage: Any) -> dict[str, str]:
    """Before training: every part can be had (URIs exist, the heads are installed, the VGG16
    file is cached, else downloaded now, once, instead of by every worker). Returns
    {part: source}; raises :class:`LPIPSWeightsError`."""
    sources = {}
    for key, uri in ((VGG_KEY, vgg_uri), (LIN_KEY, lin_uri)):
        if uri and not storage.exists(uri):
            raise LPIPSWeightsError(key, f"{uri} does not exist")
        if uri:
            sources[key] = uri
    if not lin_uri:
        sources[LIN_KEY] = lpips_heads(None, storage)[1]
    if not vgg_uri:
        path, how = fetch_vgg16()
        sources[VGG_KEY] = f"torchvision ImageNet VGG16 ({how}: {path})"
    return sources


def build_lpips(backbone: str, vgg_uri: str | None, lin_uri: str | None, storage: Any) -> Any:
    """The frozen LPIPS module with its weights (``backbone="random"``: none needed); logs
    where each part came from."""
    from pipeline.models.lpips import LPIPS

    lpips = LPIPS(backbone)
    if backbone == "vgg16":
        vgg, vgg_src = vgg16_weights(vgg_uri, storage)
        lin, lin_src = lpips_heads(lin_uri, storage)
        lpips.load_weights(vgg, lin)
        log.info("LPIPS vgg16: trunk from %s; heads from %s", vgg_src, lin_src)
    return lpips
