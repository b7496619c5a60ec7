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


KEEP_TABLES = ("exact-match accuracy", "KL(full", "Ada-SnapKV", "Ada-Pyramid")


def quality_summary(md: str) -> str:
    """From the quality report keep what it ran on and, per mode, the accuracy, KL and Ada-vs-non-Ada
    tables (the full report, with partial credit, top-1 and memory, is linked)."""
    out = []
    md = md.split("\n## Breakdown", 1)[0]  # per-task breakdown stays in the full report
    for block in re.split(r"\n(?=## |\*\*)", md):
        head = block.lstrip()
        if head.startswith("## "):
            head = "#" + head  # nested under the README's own section heading
        if head.startswith("# "):
            block = re.sub(r"^# .*\n+", "", head)
            out.append(block.strip())
        elif head.startswith("### "):
            out.append(head.strip())
        elif head.startswith("**"):
            if any(k in head.split("\n", 1)[0] for k in KEEP_TABLES):
                out.append(head.strip())
        else:
            out.append(head.strip())
    out.append("Full report (partial credit, top-1 agreement, answer-token KL, KV memory): "
               "[bench/results/quality-default.md](bench/results/quality-default.md).\n\n"
               "![accuracy vs budget](bench/results/quality-default-accuracy.png)\n"
               "![KL vs budget](bench/results/quality-default-kl.png)")
    return "\n\n".join(x for x in out if x)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, src in SOURCES.items():
        if src.exists():
            body = src.read_text()
            body = re.sub(r"^<!--.*?-->\n", "", body, count=1)  # bench/stamp.md_header's device line
            body = re.sub(r"^# .*\n+", "", body, count=1)  # the section has its own heading
            if name == "quality":
                body = quality_summary(body)
            text = fill(text, name, body)
    readme.write_text(text)


if __name__ == "__main__":
    main()
