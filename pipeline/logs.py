"""Worker output into per-stage log files in the run folder (local or object storage).

The driver starts Ray with ``log_to_driver=False`` (see :mod:`pipeline.runtime`), so what Ray
Train workers, Ray Data actors and tasks print does not flood the console. Long-running worker
code wraps itself in :func:`capture_output` instead; the output then lands in
``<run>/logs/<stage>.log`` (``<stage>.rank-<r>.log`` for ranks other than 0), uploaded while it
runs and once more at the end::

    with capture_output(storage, stage_log_uri(run_uri, "train_vqgan", rank)):
        train(...)

or, for a Ray Train loop, ``TorchTrainer(with_stage_log(loop, storage, run_uri, stage), ...)``.

The capture is at the file-descriptor level (``os.dup2`` on fds 1 and 2), so C/C++ output
(DeepSpeed, gloo, oneDNN) is caught along with ``print``, ``warnings`` and ``logging``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pipeline.storage import Storage, join

log = logging.getLogger("pipeline")

LOG_FOLDER = "logs"


def stage_log_uri(run_uri: str, stage: str, rank: int = 0) -> str:
    """``<run>/logs/<stage>.log`` for rank 0, ``<run>/logs/<stage>.rank-<r>.log`` otherwise."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    name = f"{stage}.log" if rank == 0 else f"{stage}.rank-{rank}.log"
    return join(run_uri, LOG_FOLDER, name)


def _flush_all() -> None:
    """Push buffered output (Python's and C stdio's) down to the file descriptors."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)  # C-level printf buffers (fflush(NULL) = all streams)


def _on_fd(stream: Any, fd: int) -> bool:
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


class _Uploader:
    """Uploads the whole local log file to ``uri`` when it changed since the last upload."""

    def __init__(self, storage: Storage, uri: str, path: str) -> None:
        self.storage, self.uri, self.path = storage, uri, path
        self._lock = threading.Lock()
        self._sent: int | None = None  # size at the last successful upload
        self.failures = 0

    def upload(self, *, force: bool = False) -> None:
        with self._lock:
            with open(self.path, "rb") as fh:
                data = fh.read()
            if not force and self._sent == len(data):
                return
            self.storage.write_bytes(self.uri, data)
            self._sent = len(data)

    def loop(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            _flush_all()
            try:
                self.upload()
            except Exception as e:  # keep running: the next interval (or the exit) retries
                self.failures += 1
                if self.failures in (1, 10, 100):
                    print(f"[pipeline.logs] uploading {self.uri} failed ({self.failures}x): "
                          f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def capture_output(storage: Storage, uri: str, *, every_s: float = 10.0) -> Iterator[str]:
    """Send this process's stdout and stderr (fds 1 and 2) into a log file at ``uri``.

    Inside the block everything written to fd 1 or 2 goes to a local temporary file: C-level
    writes, ``print``, ``warnings``, and ``logging`` handlers that write to ``sys.stdout`` /
    ``sys.stderr``. A daemon thread uploads the file's whole content to ``uri`` with
    :meth:`Storage.write_bytes` (atomic: readers see a complete earlier or later version) every
    ``every_s`` seconds when it grew, and it is uploaded once more on exit. If the block raises,
    the traceback is written into the log, the log is uploaded and the exception propagates. The
    file descriptors (and any stream objects swapped in) are restored on exit and the temporary
    file is removed. Upload failures never fail the block: they are reported on stderr.

    Yields the local temporary file's path. Nesting works (the inner block's output goes to the
    inner log only); the redirection is process-wide, so output of every thread is captured.
    """
    if every_s <= 0:
        raise ValueError(f"every_s must be > 0, got {every_s}")
    _flush_all()
    fd, path = tempfile.mkstemp(prefix="pipeline-log-", suffix=".log")
    saved = {1: os.dup(1), 2: os.dup(2)}
    swapped: list[tuple[str, TextIO]] = []  # sys attributes replaced by us: (name, original)
    handlers: list[tuple[logging.StreamHandler, Any]] = []
    stop = threading.Event()
    thread: threading.Thread | None = None
    uploader = _Uploader(storage, uri, path)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # sys.stdout/sys.stderr normally write to fds 1/2 and so follow the dup2. Where they are
        # other objects (a test harness, a Ray worker's own redirection), point them at the
        # new fds, and move logging handlers that held the old objects along.
        for name, num in (("stdout", 1), ("stderr", 2)):
            old = getattr(sys, name)
            if not _on_fd(old, num):
                new = open(num, "w", buffering=1, encoding="utf-8",  # noqa: SIM115 (closed below)
                           errors="backslashreplace", closefd=False)
                setattr(sys, name, new)
                swapped.append((name, old))
        if swapped:
            replaced = {id(old): getattr(sys, name) for name, old in swapped}
            loggers = [logging.getLogger()] + [
                lg for lg in logging.Logger.manager.loggerDict.values()
                if isinstance(lg, logging.Logger)]
            for lg in loggers:
                for h in lg.handlers:
                    if (isinstance(h, logging.StreamHandler)
                            and not isinstance(h, logging.FileHandler)
                            and id(getattr(h, "stream", None)) in replaced):
                        handlers.append((h, h.stream))
                        h.setStream(replaced[id(h.stream)])
        thread = threading.Thread(target=uploader.loop, args=(stop, every_s),
                                  name="pipeline-log-upload", daemon=True)
        thread.start()
        try:
            yield path
        except BaseException as e:
            if not isinstance(e, GeneratorExit):
                with contextlib.suppress(Exception):
                    traceback.print_exc(file=sys.stderr)
            raise
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=max(30.0, every_s))
        _flush_all()
        for h, stream in handlers:
            with contextlib.suppress(Exception):
                h.setStream(stream)
        for name, old in reversed(swapped):
            new = getattr(sys, name)
            setattr(sys, name, old)
            with contextlib.suppress(Exception):
                new.close()  # closefd=False: only the wrapper goes
        for num, copy in saved.items():
            os.dup2(copy, num)
            os.close(copy)
        os.close(fd)
        try:
            uploader.upload(force=True)
        except Exception as e:
            # Do not hide the block's own outcome (or fail a finished job) over a lost log.
            print(f"[pipeline.logs] final upload of {uri} failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def with_stage_log(fn: Callable[..., Any], storage: Storage, run_uri: str, stage: str, *,
                   every_s: float = 10.0) -> Callable[..., Any]:
    """Wrap a Ray Train loop (or any worker function) so it runs inside :func:`capture_output`.

    The log goes to :func:`stage_log_uri` for the worker's world rank (from
    ``ray.train.get_context()``; 0 outside Ray Train). The wrapper pickles with ``fn``.
    """

    @functools.wraps(fn)  # keeps fn's signature: Ray Train checks how many arguments it takes
    def run(*args: Any, **kwargs: Any) -> Any:
        rank = 0
        if "ray.train" in sys.modules:  # a Ray Train worker has it imported; don't import it here
            with contextlib.suppress(Exception):
                rank = int(sys.modules["ray.train"].get_context().get_world_rank())
        with capture_output(storage, stage_log_uri(run_uri, stage, rank), every_s=every_s):
            return fn(*args, **kwargs)

    return run
