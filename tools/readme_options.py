"""Rewrite the README's ``compress`` option table from the command-line parser (``onnxpq.cli.options_markdown``),
which is built from the settings table in ``onnxpq.config``. tests/test_cli.py fails when they disagree.

    python tools/readme_options.py
"""

from __future__ import annotations

from pathlib import Path

from onnxpq.cli import options_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- options:begin (tools/readme_options.py) -->", "<!-- options:end -->"


def main() -> int:
    text = README.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    README.write_text(f"{head}{BEGIN}\n{options_markdown()}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
