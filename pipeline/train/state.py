"""TrainState: what a checkpoint must hold, beyond weights, for a run to continue exactly."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Progress counters saved with every checkpoint.

    ``step`` counts optimizer steps done; ``samples_seen`` counts samples over all ranks;
    ``global_batch`` is the samples per step, fixed for the run (0: a checkpoint from before it
    was recorded); ``data`` is the data loader's own position (opaque here, see
    pipeline.data.loader). In ``state.json`` it is rank 0's; a restored state holds every rank's
    merged (pipeline.train.checkpoint).
    """

    step: int = 0
    samples_seen: int = 0
    global_batch: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def advance(self, samples: int, position: Any) -> None:
        """One optimizer step of ``samples`` (over all ranks) done, this rank's loader now at
        ``position``."""
        self.step += 1
        self.samples_seen += samples
        self.global_batch = samples
        self.data = {"position": position}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
