"""Building the C kernels: compiler, CPU flags, on-disk cache, probe, self-test, failure log.

The kernels' sources are files of this package (``*.c``, shipped as package data), read by
:func:`read_source`. :func:`build_checked` builds one of them with the system C compiler
(``$CC``, else ``cc``/``gcc``), trying flag sets from the most specific (``-march=native``) to
plainer ones, and keeps the first whose library passes a probe run and the caller's self-test.
A probe executable (the same source with ``-DNATIVE_PROBE``: its ``main`` runs every kernel
once) runs first, so that an instruction the CPU lacks kills the probe, not the caller.

Built libraries are kept in :func:`kernel_cache_dir` under a hash of compiler, flags, source
and CPU, so other processes on the machine (every Ray worker, every restart) load instead of
compiling. Any failure (no compiler, build, probe or load error, a failed self-test) leaves
:func:`build_checked` returning None and the caller on its PyTorch path; why is kept for
:func:`build_failures` and logged at warning level once per build, naming the fallback.
``TAMING_NATIVE_KERNELS=0`` disables every kernel; ``TAMING_KERNEL_CACHE`` moves the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

logger = logging.getLogger(__name__)

ENV_DISABLE = "TAMING_NATIVE_KERNELS"
KERNEL_CACHE_ENV = "TAMING_KERNEL_CACHE"


def read_source(name: str) -> str:
    """The text of the C source ``name`` (e.g. ``"decode.c"``) shipped in this package."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def disabled() -> bool:
    """True where ``TAMING_NATIVE_KERNELS`` is 0, false, no or off (any case): no kernels."""
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler to build kernels with: ``$CC``, else ``cc``, else ``gcc``; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``avx512f``, ...); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Why each kernel library (by its ``what``) did not build in this process, for logs and tests.
_failures: dict[str, list[str]] = {}


def build_failures(what: str) -> list[str]:
    """The reasons, one per flag set tried, that ``what``'s kernels did not build here: compile
    errors (``compile: ...``), probes that died (``probe: ...``; an instruction the CPU lacks, or a
    temporary directory mounted noexec), libraries that would not load (``load: ...``) and
    self-tests that failed (``self-test: ...``). Empty when they built or were never tried."""
    return list(_failures.get(what, []))


def _cpu_signature() -> str:
    """What a ``-march=native`` binary depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def kernel_cache_dir() -> str:
    """Where built kernels are kept between processes: ``$TAMING_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/taming-pipeline/kernels`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(KERNEL_CACHE_ENV) or os.path.join(base, "taming-pipeline", "kernels")


def cache_key(cc: str, flags: list[str], source: str) -> str:
    """The hex digest a library built by ``cc`` with ``flags`` from ``source`` is cached under:
    compiler, flags, source text and this CPU (:func:`_cpu_signature`)."""
    parts = [cc, *flags, source, _cpu_signature()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def build_library(cc: str, flags: list[str], directory: str, name: str, source: str,
                  reasons: list[str] | None = None) -> ctypes.CDLL | None:
    """Compile ``source`` into ``directory/name.so`` and load it, or None on any failure.

    A probe executable built from the same source with ``-DNATIVE_PROBE`` (the source's ``main``
    runs every kernel once) runs first, so that an instruction this CPU lacks kills the probe,
    not the caller. A library that passed its probe is kept in :func:`kernel_cache_dir` under
    :func:`cache_key`, so later processes load it in milliseconds instead of compiling; callers
    still self-test it. On a failure, why is appended to ``reasons`` (see
    :func:`build_failures`)."""
    cached = os.path.join(kernel_cache_dir(), f"{cache_key(cc, flags, source)[:32]}.so")
    if os.path.exists(cached):
        try:
            return ctypes.CDLL(cached)
        except OSError as e:
            logger.debug("cached kernel library %s unusable: %s", cached, e)
    src = os.path.join(directory, f"{name}.c")
    lib = os.path.join(directory, f"{name}.so")
    probe = os.path.join(directory, f"{name}_probe")
    exe_flags = [f for f in flags if f not in ("-shared", "-fPIC")]
    step = "compile"
    try:
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        subprocess.run([cc, src, "-o", lib, *flags], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([cc, "-DNATIVE_PROBE", src, "-o", probe, *exe_flags], check=True,
                       capture_output=True, timeout=120)
        step = "probe"
        subprocess.run([probe], check=True, capture_output=True, timeout=30)
        step = "load"
        loaded = ctypes.CDLL(lib)
    except (OSError, subprocess.SubprocessError) as e:
        reason = _failure_reason(step, e)
        logger.debug("native kernel build failed (%s): %s", " ".join(flags), reason)
        if reasons is not None:
            reasons.append(f"[{' '.join(flags)}] {reason}")
        return None
    _keep(lib, cached)
    return loaded


def _failure_reason(step: str, error: Exception) -> str:
    """``"step: error"``, with the last 600 characters of the compiler's or probe's stderr."""
    detail = getattr(error, "stderr", None) or b""
    detail = detail.decode(errors="replace")[-600:] if isinstance(detail, bytes) else ""
    return f"{step}: {error}{': ' + detail.strip() if detail.strip() else ''}"


def _keep(lib: str, cached: str) -> None:
    """Copy a built library into the cache atomically (best effort: a read-only home is fine)."""
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(lib, tmp)
        os.replace(tmp, cached)
    except OSError as e:
        logger.debug("kernel library not cached: %s", e)


K = TypeVar("K")


def build_checked(what: str, source: str, flag_sets: list[list[str]],
                  wrap: Callable[[ctypes.CDLL], K | None],
                  self_test: Callable[[K], bool]) -> K | None:
    """Build ``source`` with the first of ``flag_sets`` that compiles, passes its probe and
    whose ``wrap``-ped kernels pass ``self_test``; None if none does, if there is no C
    compiler, with ``TAMING_NATIVE_KERNELS=0``, or if ``wrap`` declines the built library
    (returns None: e.g. this CPU lacks what makes the kernels worth it). ``what`` names the
    kernels in the logs and in :func:`build_failures`; a build that fails is logged at warning
    level once, naming the fallback (PyTorch's kernels)."""
    if disabled():
        return None
    cc = compiler()
    if cc is None:
        logger.info("no C compiler: %s kernels not built, PyTorch's are used", what)
        return None
    reasons = _failures.setdefault(what, [])
    reasons.clear()
    try:
        with tempfile.TemporaryDirectory(prefix="taming-native-") as directory:
            for i, flags in enumerate(flag_sets):
                # the mapped library outlives its file
                lib = build_library(cc, flags, directory, f"kernels_{i}", source, reasons)
                if lib is None:
                    continue
                kernels = wrap(lib)
                if kernels is None:
                    return None
                if self_test(kernels):
                    reasons.clear()
                    return kernels
                reasons.append(f"[{' '.join(flags)}] self-test: results differ from torch's")
                logger.warning("%s kernels (%s) failed their self-test", what, " ".join(flags))
    except OSError as e:  # no writable temporary directory
        reasons.append(f"tempdir: {e}")
    if reasons:
        logger.warning("%s kernels not built, PyTorch's are used: %s", what, reasons[-1])
    return None
