"""Typed configuration: dataclass schema <- YAML file <- dotted command-line overrides.

The root schema is assembled from the pipeline's base sections (``run``, ``storage``, ``tracking``,
``ray``) plus one section per registered stage, each stage owning its own dataclass. Loading
merges the schema defaults, the YAML file and ``key=value`` overrides with OmegaConf, converts to
plain dataclasses and validates. Every failure raises :class:`ConfigError` naming the dotted key,
before anything is written anywhere.

Conventions for config dataclasses:

- a field with ``metadata={"fingerprint": False}`` does not change a stage's result (logging
  cadence, worker counts) and is left out of the stage fingerprint;
- a field made with :func:`fingerprint_unless_default` (an option added after a stage shipped)
  is left out of the fingerprint while it holds its default, so adding it keeps the
  fingerprints, and hence the finished outputs, of every existing config;
- a ``validate(self)`` method may raise :class:`ConfigError` with a key relative to its section.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

TRACKING_MODES = ("auto", "online", "offline", "disabled")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A bad config: ``key`` is the dotted key at fault (``""`` for the file as a whole)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key prefixed by the enclosing section."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def no_fingerprint(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that does not change a stage's outputs (kept out of its fingerprint)."""
    return field(default=default, metadata={"fingerprint": False}, **kwargs)


# The ``fingerprint`` metadata value of fields made by fingerprint_unless_default.
_UNLESS_DEFAULT = "unless_default"


def fingerprint_unless_default(**kwargs: Any) -> Any:
    """A dataclass field (``default=`` or ``default_factory=``) that is part of the fingerprint
    only when it differs from its default: the way to add an option to a shipped stage without
    re-running what every existing config already produced."""
    return field(metadata={"fingerprint": _UNLESS_DEFAULT}, **kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _in_fingerprint(section: Any, f: dataclasses.Field) -> bool:
    mode = f.metadata.get("fingerprint", True)
    if mode == _UNLESS_DEFAULT:
        return getattr(section, f.name) != _field_default(f)
    return bool(mode)


@dataclass
class StorageConfig:
    """Where every stage writes: a URI (local path, file://, s3://, memory://).

    Credentials are never configured here: s3fs reads them from the environment (AWS_* variables,
    instance roles). ``endpoint_url`` points at S3-compatible servers (MinIO, R2, moto).
    """

    root: str = "./runs"
    endpoint_url: str | None = None
    region: str | None = None

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("root", "must be a non-empty URI")
        if self.endpoint_url and not re.match(r"^https?://", self.endpoint_url):
            raise ConfigError("endpoint_url", f"must start with http:// or https://, got "
                              f"{self.endpoint_url!r}")


@dataclass
class TrackingConfig:
    """W&B tracking. ``auto`` is online when WANDB_API_KEY is set, offline otherwise."""

    mode: str = "auto"
    project: str = "taming-pipeline"
    entity: str | None = None
    # Local folder for W&B files; default: <root>/<run>/wandb for a local root, else
    # ./wandb-offline/<run> (W&B cannot write to object storage).
    dir: str | None = None

    def validate(self) -> None:
        if self.mode not in TRACKING_MODES:
            raise ConfigError("mode", f"must be one of {', '.join(TRACKING_MODES)}, got "
                              f"{self.mode!r}")


@dataclass
class RayConfig:
    """How the driver gets a Ray cluster.

    ``address`` unset: attach to the cluster when launched by ``ray job submit`` (RAY_ADDRESS is
    set), else start an embedded local Ray with ``num_cpus`` (all cores when unset).
    """

    address: str | None = None
    num_cpus: int | None = None
    # Kept for old configs and ignored: the embedded Ray always starts its dashboard on
    # 127.0.0.1, because Ray Train's State API queries need it (pipeline/runtime.py).
    dashboard: bool = False

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("num_cpus", f"must be >= 1, got {self.num_cpus}")


@dataclass
class PipelineConfig:
    """Sections every pipeline has; stage sections are added by :func:`make_schema`."""

    run: str = "default"
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        if not _RUN_NAME.match(self.run):
            raise ConfigError("run", f"must match {_RUN_NAME.pattern} (a path-safe name), got "
                              f"{self.run!r}")


def make_schema(sections: dict[str, type]) -> type:
    """The root config class: :class:`PipelineConfig` plus one field per stage section."""
    reserved = {f.name for f in dataclasses.fields(PipelineConfig)}
    clash = reserved & sections.keys()
    if clash:
        raise ValueError(f"stage names clash with base config sections: {sorted(clash)}")
    extra = [(name, cls, field(default_factory=cls)) for name, cls in sections.items()]
    return dataclasses.make_dataclass("Config", extra, bases=(PipelineConfig,))


def _check_override_key(schema: type, key: str) -> None:
    """Raise ConfigError naming the whole dotted ``key`` if the schema has no such field.

    Walks a default instance; a free-form ``dict`` field accepts any sub-key.
    """
    node: Any = schema()
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            return
        names = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) \
            else set()
        if part not in names:
            where = ".".join(parts[:i]) or "the root"
            raise ConfigError(key, f"unknown key (no {part!r} in {where})"
                                   f"{renamed_hint(node, part)}")
        node = getattr(node, part)


def renamed_hint(section: Any, name: str) -> str:
    """``"; renamed: ..."`` when a config section lists ``name`` in its ``RENAMED`` class
    attribute (old key -> what replaced it), else ``""``."""
    new = getattr(section, "RENAMED", {}).get(name)
    return f"; it was renamed: use {new}" if new else ""


def _renamed_in(schema: type, key: str) -> str:
    """:func:`renamed_hint` for a dotted ``key`` of ``schema`` (OmegaConf's unknown-key errors)."""
    node: Any = schema()
    *parents, last = key.split(".")
    for part in parents:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return ""
        node = getattr(node, part)
    return renamed_hint(node, last) if dataclasses.is_dataclass(node) else ""


def parse_overrides(overrides: list[str], schema: type) -> list[str]:
    """Check ``key=value`` strings against the schema; returns them unchanged."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value")
        key = item.split("=", 1)[0].strip()
        if not key:
            raise ConfigError(item, "an override must look like key=value")
        _check_override_key(schema, key)
    return overrides


def _validate(obj: Any, prefix: str = "") -> None:
    """Run every nested dataclass's ``validate()``, re-raising errors with full dotted keys."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            try:
                _validate(value)
            except ConfigError as e:
                raise e.under(f.name) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:  # model configs raise "key: message" ValueErrors (torch-only code)
            key, sep, message = str(e).partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.]*", key):
                raise ConfigError(key, message) from None
            raise ConfigError("", str(e)) from None


def load_config(path: str | None, overrides: list[str], schema: type) -> Any:
    """Load, merge and validate a config; returns an instance of ``schema``.

    Raises ConfigError (with the dotted key) for unknown keys, wrong types and bad values.
    """
    overrides = parse_overrides(list(overrides), schema)
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            try:
                with open(path) as fh:
                    data = yaml.safe_load(fh) or {}
            except FileNotFoundError:
                raise ConfigError("", f"config file not found: {path}") from None
            except yaml.YAMLError as e:
                raise ConfigError("", f"{path} is not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError("", f"{path} must hold a mapping at the top level")
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).split("\n")[0]
        raise ConfigError(str(key), msg + _renamed_in(schema, str(key))) from None
    _validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON view of a config dataclass."""
    return dataclasses.asdict(cfg)


def fingerprint_view(section: Any) -> Any:
    """The parts of a section that change results: fields marked ``fingerprint=False`` dropped,
    and :func:`fingerprint_unless_default` fields dropped while they hold their default."""
    if dataclasses.is_dataclass(section):
        return {
            f.name: fingerprint_view(getattr(section, f.name))
            for f in dataclasses.fields(section)
            if _in_fingerprint(section, f)
        }
    if isinstance(section, (list, tuple)):
        return [fingerprint_view(v) for v in section]
    if isinstance(section, dict):
        return {str(k): fingerprint_view(v) for k, v in section.items()}
    return section


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML (for logs and ``--print-config``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
