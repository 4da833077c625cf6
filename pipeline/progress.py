"""One live progress line per long stage, fed from ``progress.json`` in the stage folder.

The training loop's rank 0 writes ``<stage>/progress.json`` at its logging cadence (step, total,
a few scalars, throughput, ETA); the driver polls that file while the stage runs and renders one
line. Going through storage works for every launcher (Ray Train workers on other nodes, a local
loop in this process) and leaves the last progress readable by ``status``-like tools.

On a terminal the line is rewritten in place; elsewhere (CI logs, ``ray job submit`` logs) a
line is printed at each quarter of the run and at its end, so logs stay short.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from pipeline.storage import Storage, join

PROGRESS = "progress.json"


def progress_uri(stage_uri: str) -> str:
    return join(stage_uri, PROGRESS)


def record(step: int, total: int, rate: float, unit: str, scalars: dict[str, float],
           elapsed_s: float, steps_per_s: float) -> dict[str, Any]:
    """What the loop writes: ``rate`` in ``unit``/s for the line, ``eta_s`` from the recent
    steps per second (None before it is known)."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else None
    return {"step": step, "total": total, "rate": rate, "unit": unit, "scalars": scalars,
            "eta_s": eta, "elapsed_s": elapsed_s, "time": time.time()}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def render(stage: str, rec: dict[str, Any]) -> str:
    """``[stage] step 120/200 (60%) loss/total 0.521 | 19.6 images/s | ETA 0:41``."""
    step, total = int(rec["step"]), max(1, int(rec["total"]))
    parts = [f"[{stage}] step {step}/{total} ({100 * step // total}%)"]
    parts += [f"{k} {v:.4g}" for k, v in rec.get("scalars", {}).items()]
    text = " ".join(parts)
    text += f" | {rec['rate']:.3g} {rec['unit']}/s" if rec.get("rate") else ""
    if step < total:
        text += f" | ETA {_clock(rec.get('eta_s'))}"
    else:
        text += f" | {_clock(rec.get('elapsed_s'))} this run"
    return text


class ProgressLine:
    """Renders progress records of one stage on ``stream``."""

    def __init__(self, stage: str, stream: IO[str] | None = None, quarters: bool | None = None):
        self.stage, self.stream = stage, stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quarters = (not tty) if quarters is None else quarters
        self._next_quarter, self._live = 1, False

    def update(self, rec: dict[str, Any]) -> None:
        text = render(self.stage, rec)
        if not self.quarters:
            self.stream.write("\r\033[K" + text)
            self._live = True
            self.stream.flush()
            return
        done = 4 * int(rec["step"]) // max(1, int(rec["total"]))
        if done >= self._next_quarter:  # one line per quarter crossed, however many at once
            self._next_quarter = done + 1
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False


@contextlib.contextmanager
def watch(storage: Storage, stage_uri: str, stage: str, every_s: float = 2.0,
          stream: IO[str] | None = None) -> Iterator[ProgressLine]:
    """While the body runs, poll ``progress.json`` every ``every_s`` and render new steps; the
    last record is rendered once more at exit. A record older than the body is ignored (it is
    the previous run's)."""
    line = ProgressLine(stage, stream)
    stop = threading.Event()
    started = time.time()
    seen = {"step": -1}

    def poll() -> None:
        try:
            rec = json.loads(storage.read_text(progress_uri(stage_uri)))
        except (FileNotFoundError, ValueError, OSError):
            return
        if rec.get("time", 0) >= started and rec["step"] != seen["step"]:
            seen["step"] = rec["step"]
            line.update(rec)

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield line
    finally:
        stop.set()
        thread.join()
        poll()
        line.close()
