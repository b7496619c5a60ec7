"""Device stamps for result files that are not JSON (Markdown, PNG, logs), so every file under bench/results
says which card it came from in the same machine-readable way as the JSON (``"device": ...``).

Writers use ``md_header`` (an HTML comment on the first line of a Markdown table) and ``png_metadata``
(``savefig(metadata=...)``: a PNG text chunk, as bench/quality.py does). ``python bench/stamp.py FILE...``
stamps existing files from their sibling JSON's ``device`` (or ``--device``); stamped files are left as they are.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def md_header(device: str, **meta) -> str:
    return "<!-- " + json.dumps({"device": device, **meta}) + " -->\n"


def png_metadata(device: str) -> dict:
    return {"Description": json.dumps({"device": device})}


def _device_of(path: Path) -> str | None:
    for cand in (path.with_suffix(".json"), path.with_name(path.stem.replace("-check", "") + ".json")):
        if cand.exists():
            d = json.loads(cand.read_text())
            return d.get("device") or d.get("machine")
    return None


def stamp(path: Path, device: str) -> None:
    data = path.read_bytes()
    if b'"device"' in data:
        return
    if path.suffix == ".png":
        from PIL import Image, PngImagePlugin
        img = Image.open(path)
        info = PngImagePlugin.PngInfo()
        for k, v in img.text.items():
            if k != "Description":
                info.add_text(k, v)
        info.add_text("Description", png_metadata(device)["Description"])
        img.save(path, pnginfo=info)
    else:  # Markdown: an HTML comment; logs: a JSON line
        head = md_header(device) if path.suffix == ".md" else json.dumps({"device": device}) + "\n"
        path.write_text(head + data.decode())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--device", help="the card, when no sibling JSON names it")
    a = ap.parse_args()
    for f in a.files:
        p = Path(f)
        device = a.device or _device_of(p)
        if device is None:
            raise SystemExit(f"{p}: no sibling JSON names the device; pass --device")
        stamp(p, device)
        print(p, device)


if __name__ == "__main__":
    main()
