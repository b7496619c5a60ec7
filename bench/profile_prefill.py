"""Where a 1 x n prefill spends its GPU time: eager HF vs plain torch.compile vs adakv (8B shapes).

Variants: eager (HF, DynamicCache), compiled (plain torch.compile), adakv (the traced prefill),
adakv_untraced (``prefill_compiler="untraced"``: eager forward, compression compiled once:
``ADAKV_UNTRACED_COMPILED_COMPRESS=1``) and adakv_untraced_eager_compress (the same with the compression's
eager body, ``=0``, the default since session 13).
Wall time: the best of three warmed-up prefills.

    python bench/profile_prefill.py --context 32768 --out bench/results/profile-prefill-<card>.txt
Prints (and writes) the top CUDA kernels of one warmed-up prefill per variant, and each variant's
wall time, so a slow compiled prefill can be attributed (attention kernel, mask, MLP, scoring).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402

from e2e import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--out", default="profile-prefill.txt")
    ap.add_argument("--variants", default="eager,compiled,adakv", help="comma-separated subset")
    a = ap.parse_args()
    model = build(a.layers)
    fwd0 = model.forward
    kw = cache_kwarg(model)
    ids = torch.randint(1, model.config.vocab_size, (1, a.context), device="cuda")
    backend = adakv_backend(AdaKVConfig(budget=1024))
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=64)
    variants = [("eager", fwd0, lambda: DynamicCache(config=model.config)),
                ("compiled", torch.compile(fwd0), lambda: DynamicCache(config=model.config)),
                ("adakv", torch.compile(fwd0, backend=backend), lambda: (cache.reset(), cache)[1])]
    from adakv_compile.untraced import untraced_forward

    untraced = adakv_backend(AdaKVConfig(budget=1024, prefill_compiler="untraced"))
    ucache = AdaKVCache(model, untraced, batch_size=1, max_new_tokens=64)
    ufwd = untraced_forward(fwd0, torch.compile(fwd0, backend=untraced), untraced, model)
    variants += [("adakv_untraced", ufwd, lambda: (ucache.reset(), ucache)[1]),
                 ("adakv_untraced_eager_compress", ufwd, lambda: (ucache.reset(), ucache)[1])]
    env = {"adakv_untraced_eager_compress": "0", "adakv_untraced": "1"}
    variants = [v for v in variants if v[0] in a.variants.split(",")]
    card = torch.cuda.get_device_name(0)
    lines = [json.dumps({"device": card}),  # the stamp bench/stamp.py gives a non-Markdown result
             f"# {card}, 1 x {a.context}, {a.layers} layers"]
    for name, fwd, make in variants:
        if name in env:
            os.environ["ADAKV_UNTRACED_COMPILED_COMPRESS"] = env[name]

        def go():
            with torch.no_grad():
                fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: make()})
        go()
        go()
        walls = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            go()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
        wall = min(walls)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            go()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
        lines += ["", f"## {name}: {wall:.1f} ms wall", table]
        print("\n".join(lines[-3:]), flush=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
        if name.startswith("adakv"):
            if name == "adakv":
                print(backend.report.table(), flush=True)
            lines += ["", f"### {name}: every GPU kernel (GPU µs total, launches), longest first", "",
                      *kernel_list(prof)]
            Path(a.out).write_text("\n".join(lines) + "\n")


def kernel_list(prof) -> list[str]:
    """Each device-side kernel of a profile: total GPU time and launch count, longest first (to attribute the
    compression's share kernel by kernel: the scorer's, the allocation's and the compaction's)."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0 and e.cpu_time_total == 0:  # a kernel (device event), not an operator
            rows.append((us, e.count, e.key))
    total = sum(r[0] for r in rows) or 1.0
    return [f"{us:10.1f} µs {100 * us / total:5.1f} % {count:5d}x  {key[:150]}" for us, count, key in
            sorted(rows, reverse=True)]


if __name__ == "__main__":
    main()
