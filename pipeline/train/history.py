"""history.jsonl: the logged scalars of a training stage, kept beside its checkpoints.

W&B is optional; this file is not. Rows are rewritten whole (atomically) on every flush, which
is cheap at logging cadence and works on object storage, where appending is impossible.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.storage import Storage


class MetricsLog:
    """Rows ``{"step": n, ...}``. Opened at ``resume_step``: rows after it are dropped (they
    belong to steps the resumed run replays)."""

    def __init__(self, storage: Storage, uri: str, resume_step: int = 0) -> None:
        self.storage, self.uri = storage, uri
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and storage.exists(uri):
            rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line]
            self.rows = [r for r in rows if r.get("step", 0) <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        self.storage.write_text(self.uri, text)


def read_history(storage: Storage, uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line]
