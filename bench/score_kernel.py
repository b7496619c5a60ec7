"""Benchmark of the Triton SnapKV scorer (``kernels/triton_score.window_scores_triton``) against the plain
PyTorch scorer (``kernels/score.window_scores``) at prefill shapes.

Shapes: B in {1, 8}, n in {8192, 32768}, Hq=32, Hkv=8 (G=4), D=128, window 32, bf16, defaults of
``AdaKVConfig`` (max pooling 7, mean GQA reduction); row 1 of a batch is left-padded by n/8 tokens.
For each shape and scorer: median time (``triton.testing.do_bench``, ms, Python launch overhead
included) and the CUDA-graph replay time (``graph ms``: GPU time alone), the call's peak extra GPU memory
(``max_memory_allocated`` during one call minus what was allocated before it: workspaces + output), the
max abs and relative error of the Triton scores (relative = / the largest finite reference score) and the
kept sets (``allocate.keep_mask``, budget 1024, adaptive) compared: ``kept_diff`` = entries that differ.
One fp32 case (B=1, n=8192) checks the IEEE path. ``--sweep`` also times a small BLOCK_N x num_warps x
row_tile grid (CUDA-graph timings) and reports the best.

GPU:        python bench/score_kernel.py --out bench/results/score_kernel.json [--sweep]
CPU smoke:  python bench/score_kernel.py --cpu-smoke     (tiny shapes under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from adakv_compile.config import AdaKVConfig  # noqa: E402
from adakv_compile.kernels.allocate import keep_mask  # noqa: E402
from adakv_compile.kernels.score import window_scores  # noqa: E402
from adakv_compile.kernels.triton_score import default_config, window_scores_triton  # noqa: E402


def make_case(B, Hq, Hkv, n, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, n, D, generator=g).to(device, dtype)
    valid = torch.ones(B, n, dtype=torch.bool, device=device)
    if B > 1:
        valid[1, : n // 8] = False
    return q, k, valid


def timed(fn, device, reps: int, graph: bool = False) -> float | None:
    """Median ms: ``do_bench`` (launches included, L2 flushed), or with ``graph`` a CUDA-graph replay
    (``do_bench_cudagraph``: GPU time without the Python launch overhead); None if it fails."""
    if device.type != "cuda":
        if graph:
            return None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    try:
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=5, rep=reps, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a failing variant must not stop the run
        print(f"  (timing failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def peak_extra(fn, device) -> float | None:
    """GiB allocated at the peak of one call beyond what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**30


def compare(out, ref, valid, cfg) -> dict:
    fin = torch.isfinite(ref)
    same_inf = bool(torch.equal(torch.isfinite(out), fin))
    diff = (out - ref)[fin].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = max_abs / max(float(ref[fin].abs().max()), 1e-30) if diff.numel() else 0.0
    ka, kb = keep_mask(out, valid, cfg, 0, 1), keep_mask(ref, valid, cfg, 0, 1)
    return dict(same_inf_pattern=same_inf, max_abs_err=max_abs, max_rel_err=rel,
                kept_diff=int((ka != kb).sum()), kept=int(kb.sum()))


def run_case(B, n, dtype, args, device, seed, sweep) -> dict:
    Hq, Hkv, D, w = args.hq, args.hkv, args.head_dim, args.window
    cfg = AdaKVConfig(budget=args.budget, window=w)
    q, k, valid = make_case(B, Hq, Hkv, n, D, dtype, device, seed)
    scale = D ** -0.5
    tri = lambda: window_scores_triton(q, k, valid, cfg, scale)  # noqa: E731
    ref_fn = lambda: window_scores(q, k, valid, cfg, scale)  # noqa: E731
    out = tri()
    ref = ref_fn()
    row = dict(batch=B, n=n, Hq=Hq, Hkv=Hkv, D=D, window=w, dtype=str(dtype).replace("torch.", ""),
               **compare(out, ref, valid, cfg))
    del out, ref
    row["triton_ms"] = timed(tri, device, args.reps)
    row["torch_ms"] = timed(ref_fn, device, args.reps)
    row["triton_graph_ms"] = timed(tri, device, args.reps, graph=True)
    row["torch_graph_ms"] = timed(ref_fn, device, args.reps, graph=True)
    row["triton_peak_gib"] = peak_extra(tri, device)
    row["torch_peak_gib"] = peak_extra(ref_fn, device)
    row["inputs_gib"] = (q.numel() + k.numel()) * q.element_size() / 2**30
    row["config"] = dict(zip(("block_n", "num_warps", "num_stages"), default_config(D, device)))
    if sweep:
        best = None
        for bn in (32, 64, 128):
            for nw in (4, 8):
                for rt in (64, 128):
                    f = lambda: window_scores_triton(q, k, valid, cfg, scale, block_n=bn,  # noqa: E731
                                                     num_warps=nw, row_tile=rt)
                    ms = timed(f, device, args.reps, graph=device.type == "cuda")
                    if ms is None:
                        continue
                    if best is None or ms < best["ms"]:
                        best = dict(ms=ms, block_n=bn, num_warps=nw, row_tile=rt)
        row["sweep_best"] = best
    del q, k, valid
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--sweep", action="store_true", help="also time BLOCK_N x num_warps x row_tile variants")
    ap.add_argument("--reps", type=int, default=100, help="do_bench rep time (ms)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        args.hq, args.hkv, args.head_dim, args.window, args.budget = 4, 2, 32, 8, 24
        shapes = [(1, 67), (2, 130)]
    else:
        args.hq, args.hkv, args.head_dim, args.window, args.budget = 32, 8, 128, 32, 1024
        shapes = [(1, 8192), (1, 32768), (8, 8192), (8, 32768)]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET)"
    res = dict(device=dev_name,
               env=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
               params=dict(Hq=args.hq, Hkv=args.hkv, D=args.head_dim, window=args.window, budget=args.budget,
                           pooling="max", kernel_size=7, gqa_reduce="mean", smoke=smoke),
               fp32=None, cases=[])
    print(f"device: {dev_name}", flush=True)
    fp32_shape = shapes[0]
    res["fp32"] = run_case(*fp32_shape, torch.float32, args, device, seed=1, sweep=False)
    r = res["fp32"]
    print(f"fp32 B={fp32_shape[0]} n={fp32_shape[1]}: max abs err {r['max_abs_err']:.2e}, "
          f"rel {r['max_rel_err']:.2e}, kept diff {r['kept_diff']}/{r['kept']}, "
          f"triton {r['triton_ms']:.3f} ms, torch {r['torch_ms']:.3f} ms", flush=True)
    hdr = (f"{'B':>3} {'n':>6} | {'triton ms':>9} {'torch ms':>9} {'speedup':>7} | {'tri graph':>9} "
           f"{'torch graph':>11} | {'tri GiB':>7} {'torch GiB':>9}"
           f" | {'max abs':>8} {'max rel':>8} {'kept diff':>11}" + (" | best sweep" if args.sweep else ""))
    print(hdr)
    print("-" * len(hdr))
    for i, (B, n) in enumerate(shapes):
        row = run_case(B, n, torch.bfloat16, args, device, seed=10 + i, sweep=args.sweep)
        res["cases"].append(row)
        line = (f"{B:>3} {n:>6} | {row['triton_ms']:>9.3f} {row['torch_ms']:>9.3f} "
                f"{row['torch_ms'] / row['triton_ms']:>6.1f}x | {_fmt(row['triton_graph_ms'], '9.3f'):>9} "
                f"{_fmt(row['torch_graph_ms'], '11.3f'):>11} | {_fmt(row['triton_peak_gib'], '7.3f'):>7} "
                f"{_fmt(row['torch_peak_gib'], '9.3f'):>9} | {row['max_abs_err']:>8.1e} {row['max_rel_err']:>8.1e} "
                f"{row['kept_diff']:>5}/{row['kept']:<5}")
        if args.sweep and row.get("sweep_best"):
            s = row["sweep_best"]
            line += f" | {s['ms']:.3f} ms bn={s['block_n']} nw={s['num_warps']} rt={s['row_tile']}"
        print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
