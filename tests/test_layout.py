"""The package's import graph points one way: each layer imports only from itself and the layers below.

The layers follow the data flow (load -> calibrate -> quantize -> permute's objective -> encode -> fine-tune ->
validate -> budget search -> report -> pipeline -> CLI); a module that needs something from a layer above it is in
the wrong place, and this test names the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import onnxpq

PACKAGE = Path(onnxpq.__file__).parent
#: Lowest first; a module's layer is that of its top-level name (``quantize.stats`` is in ``quantize``).
LAYERS = (
    ("errors", "version", "operators", "config", "heap"),
    ("model",),
    ("calibration", "parallel"),
    ("quantize",),
    ("permute",),
    ("encode",),
    ("finetune",),
    ("validate",),
    ("search",),
    ("report", "html_report"),
    ("pipeline",),
    ("cli", "olive_pass", "__init__"),
)


def _layer(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if module.split(".")[0] in names:
            return index
    raise AssertionError(f"onnxpq.{module} is in no layer of tests/test_layout.py: add it")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxpq"):
            base = node.module.removeprefix("onnxpq").lstrip(".")
            found |= {f"{base}.{a.name}".strip(".") for a in node.names} if not base else {base}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("onnxpq.") for a in node.names if a.name.startswith("onnxpq.")}
    return found


def test_every_import_points_down_the_layers() -> None:
    modules = _modules()
    upward = [
        f"onnxpq.{name} (layer {_layer(name)}) imports onnxpq.{target} (layer {_layer(target)})"
        for name, path in sorted(modules.items())
        for target in sorted(_imports(path))
        if _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The scanner itself: an import of the pipeline from a quantize module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from onnxpq.pipeline import compress\nfrom onnxpq import report\n")
    assert _imports(bad) == {"pipeline", "report"}
    assert _layer("pipeline") > _layer("quantize.layer")
