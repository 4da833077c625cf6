"""Fault injection for the resume tests: one test-only mechanism for every stage.

``PIPELINE_FAULT=<stage>:<n>[:<marker path>]`` in the *driver's* environment plans one fault:

- shard, tokenize: the driver raises once ``n`` output shards are finalized (what a crash of
  the driver mid-stage leaves);
- training stages: the last rank dies hard (``os._exit``, no cleanup, like a lost node) right
  after optimizer step ``n``; the marker file it leaves first stops the restarted run from dying
  again (so give one). The driver reads the variable and ships the fault to the workers in the
  loop's spec, so workers need no environment of their own.

Not part of the config schema: nothing a user sets changes because of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "PIPELINE_FAULT"


@dataclass(frozen=True)
class Fault:
    """A planned failure of ``stage`` at count ``at`` (shards finalized, or optimizer steps)."""

    stage: str
    at: int
    marker: str = ""

    def __str__(self) -> str:
        return f"{ENV}={self.stage}:{self.at}" + (f":{self.marker}" if self.marker else "")


def planned(stage: str) -> Fault | None:
    """The fault ``$PIPELINE_FAULT`` plans for ``stage``, or None. ValueError for a malformed
    value (a test that sets it wants it to fire)."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    name, _, rest = value.partition(":")
    count, _, marker = rest.partition(":")
    if not name or not count.lstrip("-").isdigit():
        raise ValueError(f"{ENV}={value!r}: expected <stage>:<n>[:<marker path>]")
    return Fault(name, int(count), marker) if name == stage else None


def raise_if_due(fault: Fault | None, done: int) -> None:
    """Driver side of shard/tokenize: RuntimeError once ``done`` outputs reached the fault's
    count."""
    if fault is not None and done >= fault.at:
        raise RuntimeError(f"{fault}: stopping after {done} finalized shards (injected fault)")


def die_if_due(fault: Fault | None, step: int, rank: int, world: int) -> None:
    """Worker side of training: the last rank exits hard after step ``fault.at``, once."""
    if fault is None or step != fault.at or rank != world - 1:
        return
    if fault.marker:
        if os.path.exists(fault.marker):
            return
        open(fault.marker, "w").close()
    os._exit(1)


__all__ = ["ENV", "Fault", "die_if_due", "planned", "raise_if_due"]
