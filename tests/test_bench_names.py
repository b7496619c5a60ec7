"""``python bench/X.py`` puts bench/ first on ``sys.path``, so a bench script named like an installed package
shadows it for everything the script imports: bench/kernels.py hid Hugging Face's ``kernels`` package, and
transformers >= 5.24 imports it (``from kernels import CUDAProperties``), so every bench script that loaded
a model failed on the CPU stack. No bench module may share its name with an importable top-level module."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_shadows_an_installed_module(monkeypatch):
    root = str(BENCH.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", root, str(BENCH))])
    names = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
    assert names, "no bench scripts found"
    shadowing = []
    for name in names:
        cached = sys.modules.get(name)
        if cached is not None and str(BENCH) in str(getattr(cached, "__file__", "")):
            continue  # a bench module imported by name earlier in this process: not an installed one
        if name in sys.builtin_module_names or importlib.util.find_spec(name) is not None:
            shadowing.append(name)
    assert not shadowing, f"bench scripts named like installed modules (rename them): {shadowing}"
