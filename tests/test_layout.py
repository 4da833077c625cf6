"""The import graph runs one way (README, "Layout"): stages import the library, never the
reverse; the models are plain torch; kernels are optional and applied from outside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB_OK = {"__future__", "collections", "contextlib", "dataclasses", "functools", "io", "json",
             "logging", "math", "os", "re", "typing", "warnings", "itertools", "copy", "types",
             "hashlib", "time", "abc", "enum", "numbers", "operator"}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too), as absolute
    dotted names."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import mod`
    return out


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _files("pipeline/models"), ids=lambda p: p.name)
def test_models_import_only_torch_and_each_other(path):
    bad = {m for m in imports_of(path)
           if _top(m) not in {"torch", "numpy", "einops", "pipeline"} | STDLIB_OK
           or (_top(m) == "pipeline" and not m.startswith("pipeline.models"))}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("pipeline"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_stages(path):
    if path.relative_to(REPO).as_posix() == "pipeline/cli.py":  # the stage registry
        return
    bad = {m for m in imports_of(path) if _top(m) == "stages"}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_stages_do_not_import_each_other():
    for path in _files("stages"):
        own = f"stages.{path.stem}"
        bad = {m for m in imports_of(path) if _top(m) == "stages" and not m.startswith(own)
               and path.name != "__init__.py"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_imports_are_resolved_as_absolute_names():
    """The walker itself: a relative import inside pipeline/models is seen as pipeline.models."""
    names = imports_of(REPO / "pipeline" / "models" / "vqgan.py")
    assert any(n.startswith("pipeline.models.") for n in names), names
