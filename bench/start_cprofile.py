"""Where a cold first ``generate`` spends its host time, function by function: one ``bench/start.py`` child
(empty Inductor/Triton caches) run under cProfile, its top functions by cumulative and by own time written out.

bench/start_profile.py splits the time into stages (Dynamo, our passes, AOTAutograd, Inductor, run); this
says what *inside* a stage costs (e.g. Inductor lowering vs Triton compiling vs waiting for the compile
workers, whose own work cProfile does not see: it shows as time waiting on futures). cProfile slows Python
down (~1.3-2x), so read shares, not seconds.

    python bench/start_cprofile.py --device cuda --layers 8 --context 8192 --new 16 --method adakv \
        --out bench/results/start-cprofile-8L-h200.txt
    python bench/start_cprofile.py --device cpu --small --layers 2 --context 256 --new 2 --out /tmp/scp.txt
"""
from __future__ import annotations

import argparse
import io
import json
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from start import child_args, child_env  # noqa: E402  (the child it profiles is bench/start.py's)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--top", type=int, default=70)
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--out", default="bench/results/start-cprofile.txt")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adakv-cprofile-") as tmp:
        cache = Path(tmp) / "cache"
        prof = Path(tmp) / "child.prof"
        env = child_env(cache, a.method)
        cmd = [sys.executable, "-m", "cProfile", "-o", str(prof)] + child_args(a, a.method, a.layers, a.context,
                                                                                a.new)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        child = proc.stdout.strip().splitlines()[-1]
        device = "cpu"
        if a.device == "cuda":
            import torch
            device = torch.cuda.get_device_name(0)
        text = [json.dumps({"device": device}),  # the stamp bench/stamp.py gives a non-Markdown result
                f"# Cold first generate under cProfile, {device}: {a.layers} layers, {a.batch} x {a.context} + "
                f"{a.new}, method {a.method}; process {wall:.1f} s (profiled); child result {child}", ""]
        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            stats = pstats.Stats(str(prof), stream=buf)
            stats.sort_stats(key).print_stats(a.top)
            body = re.sub(r"\S*/(site-packages|dist-packages)/", "", buf.getvalue()).replace(str(ROOT) + "/", "")
            text += [f"## by {key}", "", body]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(text) + "\n")
    print(text[1], flush=True)


if __name__ == "__main__":
    main()
