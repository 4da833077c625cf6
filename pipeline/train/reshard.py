"""Loading a checkpoint written by another number of workers into this run's engines."""

from __future__ import annotations

from typing import Any


def load_resharded(folder: str, engines: dict[str, Any], tag: str, written_by: int,
                   where: str) -> None:
    """Load every engine's state from local checkpoint ``folder`` (written by ``written_by``
    workers) into ``engines``, re-partitioned for this run's count."""
    raise RuntimeError(
        f"checkpoint {where} was written by {written_by} workers; re-partitioning DeepSpeed "
        f"engine states for another count is not supported yet: resume with "
        f"num_workers={written_by}")
