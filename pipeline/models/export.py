"""Export of a model's fp32 weights + config, the layout both ``vqgan.pt``/``vqgan.json`` and
``gpt.pt``/``gpt.json`` use (diffusers-style: the config saved beside the weights)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import fields
from typing import Any, ClassVar, Self

import torch
from torch import Tensor


def check_keys(config_class: type, data: dict[str, Any]) -> None:
    """ValueError naming the keys of ``data`` that are not fields of the dataclass
    ``config_class`` (a typo in a saved config must not pass silently)."""
    unknown = sorted(set(data) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} keys: {unknown}")


class Exportable:
    """Mixin for an ``nn.Module`` with a dataclass ``config`` (``to_dict``/``from_dict``).

    Subclasses set ``weights_name``, ``config_name`` and ``config_class``. Weights are an fp32
    CPU state dict that ``torch.load(..., weights_only=True)`` reads; the config is JSON.
    """

    weights_name: ClassVar[str]
    config_name: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def export_state_dict(self) -> dict[str, Tensor]:
        """fp32, CPU, contiguous copy of the state dict (integer buffers keep their dtype)."""
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in self.state_dict().items()  # type: ignore[attr-defined]
        }

    def state_bytes(self) -> bytes:
        """The weights file's content: :meth:`export_state_dict` serialised by ``torch.save``."""
        buf = io.BytesIO()
        torch.save(self.export_state_dict(), buf)
        return buf.getvalue()

    def config_json(self) -> str:
        """The config file's content."""
        return json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_bytes(cls, config: Any, data: bytes,
                   map_location: str | torch.device = "cpu") -> Self:
        """A model (eval mode) from the config file's content (dataclass, dict or JSON text)
        and the weights file's bytes. Strict: missing or unexpected keys raise."""
        if isinstance(config, str | bytes):
            config = json.loads(config)
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        model = cls(config)  # type: ignore[call-arg]
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        model.load_state_dict(state, strict=True)  # type: ignore[attr-defined]
        return model.to(map_location).eval()  # type: ignore[attr-defined]

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the weights and config files into a local directory (created if needed). For
        object storage, write :meth:`state_bytes` / :meth:`config_json` through the storage
        layer instead."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, self.weights_name), "wb") as f:
            f.write(self.state_bytes())
        with open(os.path.join(directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(self.config_json())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        map_location: str | torch.device = "cpu") -> Self:
        """Load what :meth:`save_pretrained` wrote (eval mode)."""
        with open(os.path.join(directory, cls.config_name), encoding="utf-8") as f:
            config = json.load(f)
        with open(os.path.join(directory, cls.weights_name), "rb") as f:
            data = f.read()
        return cls.from_bytes(config, data, map_location=map_location)
