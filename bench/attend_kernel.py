"""Benchmark of the Triton store attention (``adakv_compile/kernels/triton_attend.py``) at decode shapes.

In one process:
1. the device copy ceiling: a large device-to-device copy, bytes read + written / median time;
2. compacted stores at decode shapes (B in {1, 8, 32}, Hkv=8, G=4, D=128, bf16, ~{512, 2048} kept tokens
   per KV head with a skewed Ada-like per-head allocation out of a 4x longer uncompressed context),
   with one chunk of ``--chunk`` tokens appended;
3. correctness: Triton kernel vs the plain path (``attend.store_attention``), max relative error, on fresh
   random data (plus one fp32 case);
4. timings (``triton.testing.do_bench``, median, L2 flushed between reps): the Triton kernel (heuristic
   config, and the best of a small BLOCK_N x num_splits sweep), the plain path, and full-cache SDPA with
   ``enable_gqa`` over the uncompressed length (the baseline); CUDA-graph timings (launch overhead removed,
   L2 not flushed) for the Triton kernel and SDPA where capture works;
5. achieved bandwidth = bytes of live K+V read / time, against the copy ceiling.
Prints a table and writes JSON to ``--out``. Columns: ``spl`` = num_splits chosen by the launcher without /
with ``max_len_hint`` (= the store's host ``max_len``); ``triton us`` = launcher defaults (no hint); ``hint us``
= with the hint; ``best`` = best of the BLOCK_N x num_splits sweep; ``graph us`` = CUDA-graph timing.

GPU:        python bench/attend_kernel.py --out bench/results/kernels.json
CPU smoke:  TRITON_INTERPRET=1 python bench/attend_kernel.py --cpu-smoke     (tiny shapes, correctness only)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from adakv_compile.kernels import store as kv_store  # noqa: E402
from adakv_compile.kernels.attend import store_attention  # noqa: E402
from adakv_compile.kernels.triton_attend import (  # noqa: E402
    SKEW, choose_splits, default_config, store_attention_triton)


def skewed_budgets(B: int, Hkv: int, kept: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Ada-like per-head budgets [B, Hkv]: each row's total is Hkv * kept, split by lognormal weights."""
    w = torch.exp(torch.randn(B, Hkv, generator=gen) * 0.9)
    w = w / w.sum(-1, keepdim=True)
    budget = (w * (kept * Hkv)).round().long()
    return budget.clamp(min=min(16, n), max=n)


def make_case(B, Hkv, G, D, kept, ratio, t, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    n = kept * ratio
    budgets = skewed_budgets(B, Hkv, kept, n, gen)
    k = torch.randn(B, Hkv, n, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, n, D, device=device, dtype=dtype)
    # keep the `budget` highest of random scores per head (rank < budget)
    scores = torch.rand(B, Hkv, n, device=device)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    keep = rank < budgets.to(device)[..., None]
    view_k, view_v = kv_store.build(k, v, keep, reserve=max(8, t))
    k_new = torch.randn(B, Hkv, t, D, device=device, dtype=dtype)
    v_new = torch.randn(B, Hkv, t, D, device=device, dtype=dtype)
    pool_k, pool_v, off, lens, meta = kv_store.append(view_k, view_v, k_new, v_new)
    q = torch.randn(B, Hkv * G, t, D, device=device, dtype=dtype)
    k_full = torch.cat([k, k_new], 2)
    v_full = torch.cat([v, v_new], 2)
    del k, v, scores, rank, keep
    return dict(q=q, pool_k=pool_k, pool_v=pool_v, off=off, lens=lens, max_len=meta.max_len,
                k_full=k_full, v_full=v_full, n=n, t=t,
                views=(view_k, view_v))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def bench(fn, graph: bool = False) -> float | None:
    """Median milliseconds (do_bench), or the CUDA-graph timing when ``graph``; None if it fails."""
    try:
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a failing variant must not stop the run
        print(f"  (timing failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def copy_ceiling(device) -> dict:
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return dict(bytes=2 * nbytes, ms=ms, gbps=2 * nbytes / (ms * 1e-3) / 1e9)


def run(args) -> dict:
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    Hkv, G, D, ratio, t = 8, 4, 128, 4, args.chunk
    if smoke:
        Hkv, batches, kepts = 2, [1, 2], [24, 80]
    else:
        batches, kepts = [1, 8, 32], [1024, 2048]
    scale = D ** -0.5
    res: dict = dict(
        env=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                 device=(torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET)"),
                 sms=(torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else None)),
        params=dict(Hkv=Hkv, G=G, D=D, dtype=str(dtype), uncompressed_ratio=ratio, chunk=t, smoke=smoke),
        cases=[])
    t_start = time.time()
    if not smoke:
        res["copy"] = copy_ceiling(device)
        print(f"copy ceiling: {res['copy']['gbps']:.0f} GB/s (1 GiB D2D copy, read+write)", flush=True)
    ceiling = res.get("copy", {}).get("gbps")

    # fp32 sanity check (IEEE dots): one small case
    c = make_case(2, Hkv, G, D, kepts[0], ratio, t, torch.float32, device, seed=1)
    out = store_attention_triton(c["q"], c["pool_k"], c["pool_v"], c["off"], c["lens"], t, scale)
    ref = store_attention(c["q"], c["pool_k"], c["pool_v"], c["off"], c["lens"], c["max_len"], t, scale, 0.0)
    res["fp32_rel_err"] = rel_err(out, ref)
    print(f"fp32 check: max rel err {res['fp32_rel_err']:.2e}", flush=True)
    del c, out, ref

    seed = 10
    for kept in kepts:
        for B in batches:
            seed += 1
            c = make_case(B, Hkv, G, D, kept, ratio, t, dtype, device, seed)
            q, pk, pv, off, lens, max_len = c["q"], c["pool_k"], c["pool_v"], c["off"], c["lens"], c["max_len"]
            lens_cpu = lens.cpu()
            live = int(lens_cpu.sum())
            elem = pk.element_size()
            live_bytes = 2 * live * D * elem  # K + V
            full_bytes = 2 * B * Hkv * (c["n"] + t) * D * elem
            block_m, block_n, _, _ = default_config(D, G * t)
            n_prog = B * Hkv * math.ceil(G * t / block_m)
            mean_cap = (pk.numel() // D) / (B * Hkv)
            splits = choose_splits(n_prog, mean_cap, SKEW * mean_cap, device)           # launcher default
            splits_hint = choose_splits(n_prog, mean_cap, max(mean_cap, max_len), device)  # hint = meta.max_len

            tri = lambda: store_attention_triton(q, pk, pv, off, lens, t, scale)  # noqa: E731
            plain = lambda: store_attention(q, pk, pv, off, lens, max_len, t, scale, 0.0)  # noqa: E731
            sdpa = lambda: F.scaled_dot_product_attention(q, c["k_full"], c["v_full"], scale=scale,  # noqa: E731
                                                          enable_gqa=True)
            ref = plain()
            err = rel_err(tri(), ref)
            err_split = {}
            for ns in (1, 3):
                o = store_attention_triton(q, pk, pv, off, lens, t, scale, num_splits=ns)
                err_split[ns] = rel_err(o, ref)
            row = dict(B=B, Hkv=Hkv, G=G, D=D, t=t, kept_mean=live / (B * Hkv), kept_min=int(lens_cpu.min()),
                       kept_max=int(lens_cpu.max()), n_full=c["n"] + t, live_bytes=live_bytes,
                       full_bytes=full_bytes, heuristic_splits=splits, hint_splits=splits_hint,
                       block_n=block_n,
                       rel_err=err, rel_err_splits=err_split)
            if not smoke:
                row["triton_ms"] = bench(tri)
                row["triton_hint_ms"] = bench(lambda: store_attention_triton(
                    q, pk, pv, off, lens, t, scale, max_len_hint=max_len))
                row["plain_ms"] = bench(plain)
                row["sdpa_full_ms"] = bench(sdpa)
                row["triton_graph_ms"] = bench(tri, graph=True)
                # fixed-size pieces (the static cache's mode; bound = the longest head here)
                fixed = lambda: store_attention_triton(q, pk, pv, off, lens, t, scale,  # noqa: E731
                                                       max_len_bound=max_len)
                row["rel_err_fixed"] = rel_err(fixed(), ref)
                row["fixed_ms"] = bench(fixed)
                row["fixed_graph_ms"] = bench(fixed, graph=True)
                fsweep = {}
                for piece in (128, 256, 512, 1024):  # CUDA-graph timings: decode replays as a graph
                    for bn in (64, 128):
                        for nw in (4, 8):
                            for st in (2, 3):
                                ms = bench(lambda piece=piece, bn=bn, nw=nw, st=st: store_attention_triton(
                                    q, pk, pv, off, lens, t, scale, max_len_bound=max_len, split_tokens=piece,
                                    block_n=bn, num_warps=nw, num_stages=st), graph=True)
                                if ms is not None:
                                    fsweep[f"piece{piece}_bn{bn}_w{nw}_s{st}"] = ms
                row["fixed_sweep_ms"] = fsweep
                if fsweep:
                    bestf = min(fsweep, key=fsweep.get)
                    row["fixed_best_cfg"], row["fixed_best_ms"] = bestf, fsweep[bestf]
                row["sdpa_full_graph_ms"] = bench(sdpa, graph=True)
                sweep = {}
                for bn in (32, 64, 128):
                    for ns in sorted({1, max(1, splits // 2), splits, 2 * splits, splits_hint}):
                        ms = bench(lambda bn=bn, ns=ns: store_attention_triton(
                            q, pk, pv, off, lens, t, scale, num_splits=ns, block_n=bn))
                        if ms is not None:
                            sweep[f"bn{bn}_s{ns}"] = ms
                row["sweep_ms"] = sweep
                if sweep:
                    best = min(sweep, key=sweep.get)
                    row["best_cfg"], row["best_ms"] = best, sweep[best]
                for key in ("triton_ms", "triton_hint_ms", "best_ms", "triton_graph_ms", "fixed_ms",
                            "fixed_graph_ms", "fixed_best_ms"):
                    if row.get(key):
                        row[key.replace("_ms", "_gbps")] = live_bytes / (row[key] * 1e-3) / 1e9
                if row.get("sdpa_full_ms"):
                    row["sdpa_full_gbps"] = full_bytes / (row["sdpa_full_ms"] * 1e-3) / 1e9
                if ceiling and row.get("triton_gbps"):
                    row["triton_frac_of_copy"] = row["triton_gbps"] / ceiling
                for key in ("fixed", "fixed_graph", "fixed_best", "triton_graph"):  # fixed_best: graph-timed
                    if ceiling and row.get(f"{key}_gbps"):
                        row[f"{key}_frac_of_copy"] = row[f"{key}_gbps"] / ceiling
            res["cases"].append(row)
            _print_row(row, smoke, first=len(res["cases"]) == 1)
            del c, q, pk, pv, off, lens, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t_start
    return res


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def _print_row(r, smoke, first):
    if first:
        hdr = f"{'B':>3} {'kept':>6} {'min/max':>11} {'n_full':>6} {'spl':>5} {'relerr':>8}"
        if not smoke:
            hdr += (f" {'triton us':>9} {'GB/s':>6} {'%copy':>5} {'hint us':>8} {'best us':>8} {'best cfg':>10}"
                    f" {'graph us':>8}"
                    f" {'plain us':>9} {'sdpa us':>8} {'sdpa/tri':>8}")
        print(hdr, flush=True)
    line = (f"{r['B']:>3} {r['kept_mean']:>6.0f} {str(r['kept_min']) + '/' + str(r['kept_max']):>11} "
            f"{r['n_full']:>6} {str(r['heuristic_splits']) + '/' + str(r['hint_splits']):>5} {r['rel_err']:>8.1e}")
    if not smoke:
        us = lambda k: r[k] * 1e3 if r.get(k) else None  # noqa: E731
        ratio = r["sdpa_full_ms"] / r["triton_ms"] if r.get("sdpa_full_ms") and r.get("triton_ms") else None
        line += (f" {_fmt(us('triton_ms'), '9.1f')} {_fmt(r.get('triton_gbps'), '6.0f')}"
                 f" {_fmt(100 * r['triton_frac_of_copy'] if r.get('triton_frac_of_copy') else None, '5.0f')}"
                 f" {_fmt(us('triton_hint_ms'), '8.1f')} {_fmt(us('best_ms'), '8.1f')} {r.get('best_cfg', '-'):>10}"
                 f" {_fmt(us('triton_graph_ms'), '8.1f')}"
                 f" {_fmt(us('plain_ms'), '9.1f')} {_fmt(us('sdpa_full_ms'), '8.1f')} {_fmt(ratio, '8.2f')}"
                 f" | fixed {_fmt(us('fixed_ms'), '7.1f')} graph {_fmt(us('fixed_graph_ms'), '6.1f')}"
                 f" ({_fmt(100 * r['fixed_graph_frac_of_copy'] if r.get('fixed_graph_frac_of_copy') else None, '3.0f')}%)"
                 f" best {_fmt(us('fixed_best_ms'), '6.1f')} {r.get('fixed_best_cfg', '-')}"
                 f" ({_fmt(100 * r['fixed_best_frac_of_copy'] if r.get('fixed_best_frac_of_copy') else None, '3.0f')}%)")
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1, "
                                                             "correctness only (no timing)")
    ap.add_argument("--chunk", type=int, default=1, help="tokens appended per step (1 = decode)")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke (with TRITON_INTERPRET=1) for a CPU correctness run")
    torch.manual_seed(0)
    res = run(args)
    bad = [c for c in res["cases"] if not (c["rel_err"] < 3e-2 and max(c["rel_err_splits"].values()) < 3e-2)]
    ok = res["fp32_rel_err"] < 1e-4 and not bad
    res["correct"] = ok
    print(f"correctness: {'OK' if ok else 'FAILED'} (fp32 {res['fp32_rel_err']:.1e}, bf16 worst "
          f"{max(max(c['rel_err'], *c['rel_err_splits'].values()) for c in res['cases']):.1e}); "
          f"wall {res['wall_s']:.1f}s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.out}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
