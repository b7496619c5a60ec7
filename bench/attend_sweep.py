"""Launch-parameter sweep of the Triton decode attention (``kernels/triton_attend.py``) in the static cache's
mode (fixed-size split-K pieces), for issue 17's targets: decode attention >= 85 % of copy bandwidth at
batch 8 and 32 with ~2k kept tokens per head, and fewer launches per layer at batch 1 (the 32-layer decode
step, ~4 MB of K/V a layer with ``--kept 1024``: latency bound, where the merge launch is one of two).

Shapes: Llama-3.1-8B attention (32 query / 8 KV heads, D 128, bf16), one decode token, a skewed Ada-like
allocation of ``--kept`` tokens per KV head on average (bench/attend_kernel.py ``make_case``). Every config is
CUDA-graph timed (decode replays as one graph; ``triton.testing.do_bench_cudagraph``, median) and checked
against the plain path once (max relative error). Swept:

* ``bound``: the host bound that sizes the grid of pieces: ``row`` = a row's slots (what the static cache
  passes: ``max_len = (slots - 1) // B``, so most pieces of most heads are empty), ``head`` = the longest head;
* ``piece`` tokens per piece (``split_tokens``; ``auto`` = ``choose_chunk``, the launcher's default),
  ``BLOCK_N`` (64, 128), ``num_stages`` (2, 3), 4 warps (``--wide``: also 8 warps and 4 stages; the
  H200 sweep of bench/attend_kernel.py found 4 warps best at every shape);
* ``grid`` (row bound only): ``gridKx`` launches K x (a mean head's pieces) programs per head, each looping
  over its head's pieces (``grid_pieces``), instead of one program per piece of the bound;
* ``fused``: the split-K merge done by the last piece to finish (``fused_merge=True``, counting on a
  ``semaphores`` buffer as the compiled path's ``ADAKV_FUSED_MERGE=1`` does) vs a second launch. Per batch
  ``fused_merge`` sums up: the default config (what the static cache launches) with the merge launch and
  fused, and the best of each. (The fused append was measured here too and removed: docs/design.md.)
* ``merge_stages`` (per batch, after the sweep): the default and the best merge-launch config again with the
  merge's loads of the pieces as a plain loop (0: one dependent load chain per piece) and software-pipelined
  (``store_attention_triton(merge_stages=2..4)``; the launcher's default is ``DEFAULT_MERGE_STAGES`` = 3, which the
  sweep's other merge-launch rows use).

Bandwidth = bytes of live K+V read / time. ``%copy`` is against a 1 GiB device copy (read + write / time,
the ceiling bench/attend_kernel.py uses); ``%copy_same`` against a graph-timed copy moving the same number of
bytes (read + write = the live K+V bytes), the realistic ceiling for a transfer this small.

GPU (H200, ~4 min, 128 configs x 2 batches):  python bench/attend_sweep.py --out bench/results/attend-sweep-h200.json
GPU, issue 17's three batches (~5 min):  python bench/attend_sweep.py --batches 1 8 32 --kept 1024 \
                                           --out bench/results/attend-sweep-b1-h200.json
CPU smoke:             python bench/attend_sweep.py --cpu-smoke   (interpreter, tiny shapes, correctness only)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from bench.attend_kernel import copy_ceiling, make_case, rel_err  # noqa: E402
from adakv_compile.kernels.attend import store_attention  # noqa: E402
from adakv_compile.kernels.triton_attend import (  # noqa: E402
    DEFAULT_MERGE_STAGES, choose_chunk, merge_counters, store_attention_triton)


def graph_ms(fn, rep: int) -> float | None:
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a failing variant must not stop the sweep
        print(f"  (timing failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def same_size_copy_ms(nbytes: int, device, rep: int) -> float | None:
    """A device copy moving ``nbytes`` in all (half read, half written), graph-timed."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src), rep)
    del src, dst
    return ms


def grid_pieces(cfg, kw, pool_k, n_bh: int, D: int, device) -> int:
    """Programs per (row, head) for ``grid = k``: k x the pieces of a head of mean capacity (the pool's slots
    / heads, host-known), each program looping over its head's pieces (``grid_pieces``)."""
    mean_cap = (pool_k.numel() // D) / n_bh
    block_n = kw["block_n"] or 64
    piece = kw.get("split_tokens") or choose_chunk(n_bh * mean_cap, device, block_n)
    piece = -(-piece // block_n) * block_n
    return max(1, math.ceil(cfg["grid"] * mean_cap / piece))


def launch_kwargs(cfg, bounds: dict, pool_k, n_bh: int, D: int, device, sem=None) -> dict:
    """``store_attention_triton`` keyword arguments for one sweep config (a row's best config too); a fused
    config counts on ``sem`` (the compiled path's argument) when given."""
    kw = dict(max_len_bound=bounds[cfg["bound"]], block_n=cfg["block_n"], num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"], fused_merge=cfg["fused"])
    if cfg["fused"] and sem is not None:
        kw["semaphores"] = sem
    if cfg["piece"] != "auto":
        kw["split_tokens"] = cfg["piece"]
    if cfg["grid"] is not None:
        kw["grid_pieces"] = grid_pieces(cfg, kw, pool_k, n_bh, D, device)
    return kw


def configs(args, smoke: bool):
    if smoke:
        return [dict(bound=b, grid=gp, piece=p, block_n=None, num_warps=None, num_stages=None, fused=f)
                for b, gp, p, f in [("row", None, 32, False), ("row", 1, 32, True), ("head", None, "auto", True)]]
    # the launcher's own choice (no overrides: choose_chunk + fixed_piece_tiles), merge launch and fused
    launcher = [dict(bound="row", grid=None, piece="auto", block_n=None, num_warps=None, num_stages=None, fused=f)
                for f in (False, True)]
    pieces = ["auto", 256, 512, 1024]
    warps, stages = ((4, 8), (2, 3, 4)) if args.wide else ((4,), (2, 3))
    bounds = (("row", None), ("row", 1), ("row", 2), ("head", None))
    grid = itertools.product(bounds, pieces, (64, 128), warps, stages, (False, True))
    return launcher + [dict(bound=b, grid=gp, piece=p, block_n=bn, num_warps=w, num_stages=s, fused=f)
                       for (b, gp), p, bn, w, s, f in grid]


def merge_stage_rows(case, bounds, q, pk, pv, off, lens, t, scale, ref, D, device, rep, smoke) -> list:
    """The split-K merge launch with its loads of the pieces as a plain loop (``merge_stages`` 0) and
    software-pipelined (2..4), for the launcher's default config and the best merge-launch config: at
    batch 1 the merge walked ~17 pieces one dependent load after another (9.3 µs a layer on the H200). Each
    row: rel err, and µs when timed (``base_us``: the config's row, at the launcher's ``DEFAULT_MERGE_STAGES``)."""
    picks = {r["cfg"]: r for r in (case.get("default"), case.get("best")) if r and not r["fused"]}
    if smoke:  # the first merge-launch config of the smoke list, correctness only
        picks = {r["cfg"]: r for r in case["rows"] if not r["fused"]}
        picks = dict(list(picks.items())[:1])
    out = []
    for name, r in picks.items():
        kw = launch_kwargs(r, bounds, pk, off.numel(), D, device, None)  # off: [B, Hkv]
        for stages in (0, 2, 3, 4):
            fn = lambda kw=kw, s_=stages: store_attention_triton(q, pk, pv, off, lens, t, scale,  # noqa: E731
                                                                  merge_stages=s_, **kw)
            row = dict(cfg=name, merge_stages=stages, rel_err=rel_err(fn(), ref), base_us=(r.get("ms") or 0) * 1e3)
            if not smoke:
                ms = graph_ms(fn, rep)
                row["us"] = ms * 1e3 if ms else None
            out.append(row)
            if not smoke:
                print(f"merge_stages={stages} {name:<42} {row['us'] or float('nan'):7.1f} us (default "
                      f"{DEFAULT_MERGE_STAGES}: {row['base_us']:.1f} us)", flush=True)
    return out


def cfg_name(c) -> str:
    grid = "" if c["grid"] is None else f"/grid{c['grid']}x"
    return (f"{c['bound']}{grid}/piece{c['piece']}/bn{c['block_n'] or '-'}/w{c['num_warps'] or '-'}"
            f"/s{c['num_stages'] or '-'}/{'fused' if c['fused'] else 'merge'}")


def run(args) -> dict:
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    Hkv, G, D, ratio, t = 8, 4, 128, 4, 1
    batches, kept = args.batches, args.kept
    if smoke:
        Hkv, D, batches, kept = 2, 64, [1, 2], 40
    scale = D ** -0.5
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET)"
    res: dict = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                     params=dict(Hkv=Hkv, G=G, D=D, dtype=str(dtype), kept=kept, ratio=ratio, t=t, smoke=smoke),
                     cases=[])
    t0 = time.time()
    if not smoke:
        res["copy"] = copy_ceiling(device)
        print(f"copy ceiling: {res['copy']['gbps']:.0f} GB/s (1 GiB device copy)", flush=True)
    ceiling = res.get("copy", {}).get("gbps")
    for B in batches:
        c = make_case(B, Hkv, G, D, kept, ratio, t, dtype, device, seed=100 + B)
        q, pk, pv, off, lens = c["q"], c["pool_k"], c["pool_v"], c["off"], c["lens"]
        del c["k_full"], c["v_full"]
        lens_cpu = lens.cpu()
        live_bytes = 2 * int(lens_cpu.sum()) * D * pk.element_size()
        room = 8
        bounds = dict(row=int(lens_cpu.sum(-1).max()) + Hkv * room, head=int(lens_cpu.max()))
        ref = store_attention(q, pk, pv, off, lens, c["max_len"], t, scale, 0.0)
        sinks = torch.randn(Hkv * G, device=device) * 2
        ref_sink = store_attention(q, pk, pv, off, lens, c["max_len"], t, scale, 0.0, sinks)
        sem = torch.zeros(merge_counters(B, Hkv, Hkv * G, t, D), dtype=torch.int32, device=device)
        case = dict(B=B, kept_mean=float(lens_cpu.float().mean()), kept_max=int(lens_cpu.max()),
                    live_bytes=live_bytes, bounds=bounds, rows=[])
        if not smoke:
            case["copy_same_ms"] = same_size_copy_ms(live_bytes, device, args.rep)
            case["copy_same_gbps"] = live_bytes / (case["copy_same_ms"] * 1e-3) / 1e9
        print(f"\nB={B}: {live_bytes / 1e6:.1f} MB of live K+V, kept mean {case['kept_mean']:.0f} max "
              f"{case['kept_max']}, bounds {bounds}"
              + (f", same-size copy {case['copy_same_ms'] * 1e3:.1f} us" if not smoke else ""), flush=True)
        for cfg in configs(args, smoke):
            kw = launch_kwargs(cfg, bounds, pk, B * Hkv, D, device, sem)
            fn = lambda kw=kw: store_attention_triton(q, pk, pv, off, lens, t, scale, **kw)  # noqa: E731
            row = dict(cfg=cfg_name(cfg), **cfg, rel_err=rel_err(fn(), ref))
            if not smoke:
                row["ms"] = graph_ms(fn, args.rep)
                if row["ms"]:
                    row["gbps"] = live_bytes / (row["ms"] * 1e-3) / 1e9
                    row["frac_copy"] = row["gbps"] / ceiling
                    row["frac_copy_same"] = row["gbps"] / case["copy_same_gbps"]
            case["rows"].append(row)
        timed = [r for r in case["rows"] if r.get("ms") and r["rel_err"] < 3e-2]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            case["best"] = best
            default = next(r for r in case["rows"] if r["bound"] == "row" and r["grid"] is None
                           and r["piece"] == "auto" and r["block_n"] is None and not r["fused"])
            case["default"] = default  # the launcher's own choice, as the static cache launches it
            default_fused = next((r for r in timed if r["cfg"] == default["cfg"].replace("/merge", "/fused")), None)
            merged = [r for r in timed if not r["fused"]]
            fused = [r for r in timed if r["fused"]]
            case["fused_merge"] = {k: (None if r is None else dict(cfg=r["cfg"], us=r["ms"] * 1e3,
                                                                   frac_copy_same=r["frac_copy_same"]))
                                   for k, r in (("default_merge", default), ("default_fused", default_fused),
                                                ("best_merge", min(merged, key=lambda r: r["ms"], default=None)),
                                                ("best_fused", min(fused, key=lambda r: r["ms"], default=None)))}
            kw = launch_kwargs(best, bounds, pk, B * Hkv, D, device, sem)
            fs = lambda: store_attention_triton(q, pk, pv, off, lens, t, scale, sinks=sinks, **kw)  # noqa: E731
            case["best_with_sinks"] = dict(rel_err=rel_err(fs(), ref_sink), ms=graph_ms(fs, args.rep))
            print(f"{'config':<42} {'us':>7} {'GB/s':>6} {'%copy':>6} {'%same':>6} {'relerr':>8}")
            for r in [default] + sorted(timed, key=lambda r: r["ms"])[:args.top]:
                print(f"{r['cfg']:<42} {r['ms'] * 1e3:7.1f} {r['gbps']:6.0f} {100 * r['frac_copy']:6.1f} "
                      f"{100 * r['frac_copy_same']:6.1f} {r['rel_err']:8.1e}", flush=True)
            print(f"best with sinks: {case['best_with_sinks']['ms'] * 1e3:.1f} us "
                  f"(rel err {case['best_with_sinks']['rel_err']:.1e})", flush=True)
            print("fused merge: " + ", ".join(f"{k} {v['us']:.1f} us ({100 * v['frac_copy_same']:.1f} %)"
                                              for k, v in case["fused_merge"].items() if v), flush=True)
        else:
            for r in case["rows"]:
                print(f"{r['cfg']:<42} rel err {r['rel_err']:.1e}", flush=True)
        case["merge_stages"] = merge_stage_rows(case, bounds, q, pk, pv, off, lens, t, scale, ref, D, device,
                                                args.rep, smoke)
        case["bad"] = [r["cfg"] for r in case["rows"] if not r["rel_err"] < 3e-2]
        case["bad"] += [f"{r['cfg']} merge_stages={r['merge_stages']}" for r in case["merge_stages"]
                        if not r["rel_err"] < 3e-2]
        if smoke and sem.any():
            case["bad"].append("fused merge left its counters dirty")
        res["cases"].append(case)
        print(f"(B={B} done at {time.time() - t0:.0f} s)", flush=True)
        del q, pk, pv, off, lens, c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes through TRITON_INTERPRET=1, no timing")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--kept", type=int, default=2048, help="mean kept tokens per KV head")
    ap.add_argument("--rep", type=int, default=30, help="do_bench_cudagraph rep (ms per timing)")
    ap.add_argument("--top", type=int, default=12, help="fastest configs printed per batch")
    ap.add_argument("--wide", action="store_true", help="also 8 warps and 4 stages (3x the configs: ~10 min)")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke for a CPU correctness run")
    torch.manual_seed(0)
    res = run(args)
    bad = [b for c in res["cases"] for b in c["bad"]]
    print(f"\ncorrectness: {'OK' if not bad else 'FAILED: ' + ', '.join(bad)}; wall {res['wall_s']:.0f} s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.out}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
