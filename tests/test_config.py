"""Config: every shipped config loads; bad keys, types and values are named by dotted key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import default_pipeline
from pipeline.config import ConfigError, fingerprint_view, load_config
from tests.stages_for_tests import make_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    pipe = default_pipeline()
    cfg = load_config(str(path), [], pipe.schema)
    assert cfg.run
    # Every stage is planned (fingerprints computable) without touching storage.
    assert [p.stage.name for p in pipe.plan(cfg)] == pipe.order


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.json")), ids=lambda p: p.name)
def test_every_shipped_json_config_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def _load(tmp_path, text: str, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(str(path), list(overrides), make_pipeline().schema)


@pytest.mark.parametrize(
    "text, overrides, key, words",
    [
        ("alpha:\n  nope: 1\n", [], "alpha.nope", "nope"),
        ("alpha:\n  parts: many\n", [], "alpha.parts", "could not be converted"),
        ("run: ok\n", ["alpha.parts=-3"], "alpha.parts", "must be >= 1"),
        ("run: ok\n", ["no_such.key=1"], "no_such.key", "unknown key"),
        ("run: ok\n", ["alpha.value.deeper=1"], "alpha.value.deeper", "unknown key"),
        ("run: ok\n", ["alpha.parts"], "alpha.parts", "key=value"),
        ("run: ok\n", ["tracking.mode=loud"], "tracking.mode", "must be one of"),
        ("run: ok\n", ["storage.endpoint_url=localhost:9000"], "storage.endpoint_url", "http"),
        ("run: ../escape\n", [], "run", "path-safe"),
    ],
)
def test_errors_name_the_dotted_key(tmp_path, text, overrides, key, words):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text, *overrides)
    assert err.value.key == key
    assert words in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"), [], make_pipeline().schema)
    with pytest.raises(ConfigError, match="mapping"):
        _load(tmp_path, "- a list\n")


def test_merge_order_and_types(tmp_path):
    cfg = _load(tmp_path, "run: fromfile\nalpha:\n  value: 5\n", "alpha.value=7", "beta.scale=4")
    assert (cfg.run, cfg.alpha.value, cfg.alpha.parts, cfg.beta.scale) == ("fromfile", 7, 4, 4)
    assert isinstance(cfg.alpha.value, int)
    assert cfg.storage.root == "./runs"


def test_fingerprint_view_drops_result_neutral_fields(tmp_path):
    cfg = _load(tmp_path, "run: x\n", "beta.log_every=99")
    assert fingerprint_view(cfg.beta) == {"scale": 2}
    assert fingerprint_view(cfg.alpha) == {"value": 1, "parts": 4}


@pytest.mark.parametrize("text, overrides, key, new", [
    ("run: ok\n", ["train_vqgan.flip=false"], "train_vqgan.flip", "random_flip and random_crop"),
    ("tokenize:\n  flip: true\n", [], "tokenize.flip", "store_flipped"),
    ("train_transformer:\n  flip: false\n", [], "train_transformer.flip", "use_flipped"),
])
def test_renamed_keys_say_what_replaced_them(tmp_path, text, overrides, key, new):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), overrides, default_pipeline().schema)
    assert err.value.key == key and f"it was renamed: use {new}" in str(err.value)
