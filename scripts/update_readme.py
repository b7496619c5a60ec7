"""Fill the README's generated sections from files the tests and benchmarks write.

    python scripts/update_readme.py
supported-models ← docs/supported-models.md (written by tests/test_zoo_models.py)
quality          ← bench/results/quality-default.md (written by bench/quality.py), if present
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "supported-models": ROOT / "docs" / "supported-models.md",
    "quality": ROOT / "bench" / "results" / "quality-default.md",
}


def fill(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- BEGIN {re.escape(name)}[^>]*-->\n)(.*?)(<!-- END {re.escape(name)} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"README has no BEGIN/END markers for {name!r}")
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(3), text)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, src in SOURCES.items():
        if src.exists():
            body = src.read_text()
            body = re.sub(r"^# .*\n+", "", body, count=1)  # the section has its own heading
            text = fill(text, name, body)
    readme.write_text(text)


if __name__ == "__main__":
    main()
