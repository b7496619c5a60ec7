"""A restart hits Inductor's caches: the pass and ops put nothing process-specific into the graph.

Two processes share one TORCHINDUCTOR_CACHE_DIR (tests/cache_worker.py: a tiny Llama on the fast path,
compressed, merged linears, Inductor). The second — which also makes an unrelated backend first, as a
benchmark or a test suite would — must hit the FX-graph cache for every graph it compiles and miss none
(and the AOTAutograd cache likewise), and generate the same tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cache_dir: Path, *args: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.cache_worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_restart_hits_every_graph(tmp_path):
    """With a chunked prefill (prefill_chunk=20 of 40 tokens): the regions, compiled at their first run outside
    Dynamo, hit too, and their keys in the prefill graph are the same in both processes."""
    cold = _run(tmp_path, "--chunk", "20")
    compiles = cold["graphs"] + cold["regions"]
    assert cold["graphs"] >= 2 and cold["regions"] >= 1 and cold["fx_hit"] == 0 and cold["fx_bypass"] == 0, cold
    assert cold["fx_miss"] == compiles, cold
    warm = _run(tmp_path, "--other-backend-first", "--chunk", "20")
    assert warm["fx_miss"] == 0 and warm["fx_bypass"] == 0, warm
    assert warm["fx_hit"] == compiles and warm["graphs"] == cold["graphs"], warm
    assert warm["aot_miss"] == 0 and warm["aot_bypass"] == 0 and warm["aot_hit"] == compiles, warm
    assert warm["tokens"] == cold["tokens"]


def test_restart_hits_the_compression_compiled_once(tmp_path):
    """Compression inlined (as on CUDA) and compiled once for all layers (passes/compress_once.py): three
    layers, one compile of the one-layer compression graph, and a restart hits it too."""
    cold = _run(tmp_path, "--inline", "--layers", "3")
    assert cold["compress_once"] == 1, cold  # three layers, one compile
    compiles = cold["graphs"] + cold["regions"] + cold["compress_once"]
    assert cold["fx_hit"] == 0 and cold["fx_bypass"] == 0 and cold["fx_miss"] == compiles, cold
    warm = _run(tmp_path, "--other-backend-first", "--inline", "--layers", "3")
    assert warm["fx_miss"] == 0 and warm["fx_bypass"] == 0 and warm["fx_hit"] == compiles, warm
    assert warm["aot_miss"] == 0 and warm["aot_bypass"] == 0 and warm["aot_hit"] == compiles, warm
    assert warm["tokens"] == cold["tokens"]
