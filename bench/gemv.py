"""Decode projections at M = 1..8 rows on one card: which GEMV reads the weights nearest copy bandwidth (issue 17).

Llama-3.1-8B decode shapes, x [M, K] bf16, W [N, K] bf16: (K, N) = (4096, 6144) merged q/k/v, (4096, 4096) o,
(4096, 28672) merged gate/up, (14336, 4096) down, (4096, 128256) LM head; M in {1, 2, 4, 8}. Variants:
  cublas      F.linear (cuBLAS)
  inductor    torch.compile(F.linear), Inductor defaults
  autotune    torch.compile with max_autotune + coordinate_descent_tuning (Triton mm templates; compile time noted;
              cases stop at --autotune-budget-s of compile time, recorded as skipped; M = 1 first, then 8, 4, 2)
  decomposed  torch.compile((x[:, None, :] * W).sum(-1))  (Inductor's own reduction kernel)
  triton      our GEMV (adakv_compile/kernels/triton_gemv.py) with its heuristic config (what AdaKVConfig.gemv runs)
  triton_best the best of a small sweep of launch configs (listed per row: tunes the heuristic; cases stop
              at --sweep-budget-s)
Timing: CUDA graphs (each graph replays many launches; median of replays), the weight set rotated over enough copies
(>= --rotate-mb, default 256 MB, 5x the H200's 50 MB L2) that no launch finds its weight in L2. "% copy" is the
weight bytes / time against a plain device copy of the SAME bytes (same copies, same graphing) measured in this run
(copy bandwidth = read + written bytes / time, as bench/e2e.py's floor). A "32-layer chain" row per variant: every
projection of 32 layers + the LM head (15.0 GB) in one CUDA graph, against the floor (bytes / copy bandwidth).

First (GPU, skip with --no-check): AdaKVConfig(gemv=True) on a small fp32 Llama, batch 1 and 3: greedy tokens equal the
eager reference and Inductor's generated code launches the GEMV kernel (inlined).

GPU (H200, ~6 min):  python bench/gemv.py            -> bench/results/gemv-<card>.json and .md
CPU smoke (~1 min):  python bench/gemv.py --small     (tiny shapes, Triton interpreter, host timers; numbers mean
                                                       nothing; writes /tmp/gemv-cpu.json unless --out)
No GPU (~30 s):      python bench/gemv.py --compile-only 90   (every launch config compiled for sm_90 by the installed
                                                       Triton; registers and spills from cuobjdump)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

if "--small" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ADAKV_KERNELS", "interpret")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import md_header  # noqa: E402
import adakv_compile  # noqa: E402,F401  (registers adakv::gemv)
from adakv_compile.kernels.triton_gemv import GemvConfig, choose_config, gemv_triton  # noqa: E402

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
          ("lm_head", 4096, 128256)]
SMALL_SHAPES = [("qkv", 64, 96), ("o", 64, 64), ("gate_up", 64, 224), ("down", 112, 64), ("lm_head", 64, 500)]
VARIANTS = ("cublas", "inductor", "autotune", "decomposed", "triton", "triton_best")
DEVICE = "cuda"
LAYERS = 32


def _linear_b(x, w):
    return F.linear(x, w)


def _linear_c(x, w):
    return F.linear(x, w)


def _decomposed(x, w):
    return (x[:, None, :] * w).sum(-1)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sweep_configs(M: int, N: int, K: int) -> list[GemvConfig]:
    """A small, listed sweep (bf16): reduction path (M = 1) and tensor-core path, a few tiles/warps/splits."""
    if M == 1:
        cfgs = [GemvConfig(8, 256, 4), GemvConfig(16, 256, 4), GemvConfig(16, 512, 4), GemvConfig(16, 512, 8),
                GemvConfig(32, 256, 8), GemvConfig(32, 512, 8), GemvConfig(8, 256, 4, num_stages=1),
                GemvConfig(16, 256, 4, dot=True), GemvConfig(64, 128, 4, dot=True)]
    else:
        cfgs = [GemvConfig(16, 256, 4, dot=True), GemvConfig(32, 256, 4, dot=True), GemvConfig(64, 128, 4, dot=True),
                GemvConfig(16, 512, 8, dot=True), GemvConfig(32, 128, 4, dot=True), GemvConfig(64, 256, 8, dot=True),
                GemvConfig(16, 256, 4, dot=True, num_stages=5)]
    if N <= 8192:
        cfgs += [c._replace(split=2) for c in cfgs[:2]] + [cfgs[0]._replace(split=4)]
    if DEVICE != "cuda":
        cfgs = [c._replace(block_k=32) for c in cfgs[:3]]
    return cfgs


class Timer:
    """Seconds per call of ``calls`` (a list of zero-argument callables, one launch each), replayed as one
    CUDA graph of ``repeat`` passes over the list (CPU: host timer)."""

    def __init__(self, target_ms: float = 2.0, replays: int = 15):
        self.target_ms, self.replays = target_ms, replays

    def __call__(self, calls, est_s: float) -> float:
        for f in calls:  # warm: compile, autotune, allocate
            f()
        _sync()
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            for f in calls:
                f()
            return (time.perf_counter() - t0) / len(calls)
        repeat = max(1, math.ceil(self.target_ms * 1e-3 / max(est_s * len(calls), 1e-7)))
        repeat = min(repeat, max(1, 4000 // len(calls)))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # a side-stream warm-up, as torch.cuda.graphs recommends
            for f in calls:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(repeat):
                for f in calls:
                    f()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.replays):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        del g
        return statistics.median(times) / (repeat * len(calls))


def _rel_err(y, ref) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class Bench:
    def __init__(self, args):
        self.args = args
        self.timer = Timer()
        self.dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        self.fns = {}
        self.compile_s_autotune = 0.0
        self.t_start = time.perf_counter()
        if DEVICE == "cuda":
            self.fns["inductor"] = torch.compile(_linear_b, dynamic=False)
            self.fns["autotune"] = torch.compile(_linear_c, dynamic=False, options={
                "max_autotune": True, "coordinate_descent_tuning": True})
        else:  # CPU smoke: Inductor's CPU GEMM templates are not what is measured here
            self.fns["inductor"] = torch.compile(_linear_b, dynamic=False)
            self.fns["autotune"] = torch.compile(_linear_c, dynamic=False, options={"coordinate_descent_tuning": True})
        self.fns["decomposed"] = torch.compile(_decomposed, dynamic=False)
        self.best_cfg = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def call(self, variant, x, w, cfg=None):
        if variant == "cublas":
            return F.linear(x, w)
        if variant == "triton":
            return torch.ops.adakv.gemv(x, w, None)
        if variant == "triton_best":
            return gemv_triton(x, w, None, cfg or self.best_cfg.get((x.shape[0], w.shape[0], w.shape[1])))
        return self.fns[variant](x, w)

    def weights(self, N, K, rotate_bytes):
        wbytes = N * K * torch.empty((), dtype=self.dtype).element_size()
        copies = max(2, math.ceil(rotate_bytes / wbytes)) if DEVICE == "cuda" else 1
        g = torch.Generator(device=DEVICE).manual_seed(N * 7 + K)
        ws = [(torch.randn(N, K, device=DEVICE, generator=g) / K ** 0.5).to(self.dtype) for _ in range(copies)]
        return ws, wbytes

    def copy_time(self, ws) -> float:
        """A copy of the same bytes, rotated the same way; each copy into its own buffer (one reused buffer of
        < 50 MB would absorb the writes in L2 and flatter the copy)."""
        dsts = [torch.empty_like(w) for w in ws]
        t = self.timer([lambda w=w, d=d: d.copy_(w) for w, d in zip(ws, dsts)],
                       ws[0].numel() * ws[0].element_size() * 2 / 4e12)
        del dsts
        return t

    def time_variant(self, variant, x, ws, wbytes, cfg=None) -> float:
        return self.timer([lambda w=w: self.call(variant, x, w, cfg) for w in ws], wbytes / 4e12)


def _short_card(card: str) -> str:
    if card == "cpu":
        return "cpu"
    m = re.search(r"\b([A-Z]+\d{2,}[A-Za-z]*)\b", card)  # "NVIDIA H200" -> h200
    return (m.group(1) if m else card.split()[-1]).lower()


def run(args, res, out: Path) -> None:
    b = Bench(args)
    shapes = SMALL_SHAPES if args.small else SHAPES
    ms = [int(m) for m in args.m.split(",")]
    variants = [v for v in args.variants.split(",")]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r} (choose from {VARIANTS})")
    rotate = args.rotate_mb * 2 ** 20
    # 1. the device copy bandwidth (1 GiB, graphed), the floor's denominator
    big = torch.empty(1 << (30 if DEVICE == "cuda" else 22), dtype=torch.uint8, device=DEVICE)
    big2 = torch.empty_like(big)
    t = b.timer([lambda: big2.copy_(big)], 2 * big.numel() / 4e12)
    res["copy_GBps"] = 2 * big.numel() / t / 1e9
    print(f"{res['device']}: copy {res['copy_GBps']:.0f} GB/s ({big.numel() / 2 ** 20:.0f} MiB device copy, "
          "read + written)", flush=True)
    del big, big2
    rows = {}
    weights = {}
    # 2. every variant but the autotuned one and the sweep, per (shape, M): M = 1 first (the chain needs it)
    fast = [v for v in variants if v not in ("autotune", "triton_best")]
    for M in sorted(ms):
        for name, K, N in shapes:
            if (N, K) not in weights:
                weights[(N, K)] = b.weights(N, K, rotate)
            ws, wbytes = weights[(N, K)]
            x = torch.randn(M, K, device=DEVICE).to(b.dtype)
            ref = F.linear(x.float(), ws[0].float())
            copy_s = b.copy_time(ws)
            row = rows[(name, M)] = dict(shape=name, K=K, N=N, M=M, weight_bytes=wbytes, copies=len(ws),
                                         copy_us=copy_s * 1e6, floor_us=wbytes / (2 * wbytes / copy_s) * 1e6,
                                         heuristic=choose_config(M, N, K, b.dtype, x.device).short(), variants={})
            for v in fast:
                row["variants"][v] = _measure(b, v, x, ws, wbytes, ref, copy_s)
            _print_row(row)
        _write(res, rows, out)
    order = sorted(ms, key=lambda m: (m != min(ms), -m))  # the chain's M first, then the largest
    # 3. the 32-layer chain (M = first of --m) for the fast variants
    chain_m = sorted(ms)[0]
    chain = _Chain(b, shapes, chain_m, LAYERS if not args.small else 2)
    copy_ms = chain.copy_ms()  # the floor as the rows' floor_us: half a copy (read + write) of the same tensors
    res["chain"] = {"M": chain_m, "layers": chain.layers, "bytes": chain.bytes, "floor_ms": copy_ms / 2,
                    "copy_ms": copy_ms, "variants": {}}
    for v in fast:
        res["chain"]["variants"][v] = chain.run(v)
        _print_chain(res["chain"], v)
    _write(res, rows, out)
    # 4. the Triton launch-config sweep (tunes the heuristic), until its time budget
    if "triton_best" in variants:
        t_sweep = time.perf_counter()
        for M in order:
            for name, K, N in shapes:
                row = rows[(name, M)]
                if time.perf_counter() - t_sweep > args.sweep_budget_s:
                    row["variants"]["triton_best"] = {"skipped": f"sweep budget {args.sweep_budget_s} s spent"}
                    continue
                ws, wbytes = weights[(N, K)]
                x = torch.randn(M, K, device=DEVICE).to(b.dtype)
                sweep = []
                for cfg in _sweep_configs(M, N, K):
                    try:
                        s = b.time_variant("triton_best", x, ws, wbytes, cfg)
                        sweep.append((cfg, s))
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  {cfg.short()}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                row["sweep"] = {c.short(): s * 1e6 for c, s in sweep}
                if sweep:
                    cfg, s = min(sweep, key=lambda cs: cs[1])
                    b.best_cfg[(M, N, K)] = cfg
                    y = b.call("triton_best", x, ws[0], cfg)
                    row["variants"]["triton_best"] = dict(
                        us=s * 1e6, pct_copy=100 * (row["copy_us"] / 2) / (s * 1e6), config=cfg.short(),
                        rel_err=_rel_err(y, F.linear(x.float(), ws[0].float())))
                _print_row(row, only="triton_best")
            _write(res, rows, out)
        if all((M, N, K) in b.best_cfg for (M, N, K) in [(chain_m, N, K) for _, K, N in shapes]):
            res["chain"]["variants"]["triton_best"] = chain.run("triton_best")
            _print_chain(res["chain"], "triton_best")
    # 5. Inductor max-autotune (Triton templates), until its compile budget is spent
    if "autotune" in variants:
        for M in order:
            for name, K, N in shapes:
                row = rows[(name, M)]
                if b.compile_s_autotune > args.autotune_budget_s:
                    row["variants"]["autotune"] = {"skipped": f"compile budget {args.autotune_budget_s} s spent"}
                    continue
                ws, wbytes = weights[(N, K)]
                x = torch.randn(M, K, device=DEVICE).to(b.dtype)
                m = row["variants"]["autotune"] = _measure(b, "autotune", x, ws, wbytes,
                                                            F.linear(x.float(), ws[0].float()), row["copy_us"] * 1e-6)
                b.compile_s_autotune += m.get("compile_s", 0.0)
                _print_row(row, only="autotune")
            _write(res, rows, out)
        if all("us" in rows[(name, chain_m)]["variants"].get("autotune", {}) for name, _, _ in shapes):
            res["chain"]["variants"]["autotune"] = chain.run("autotune")
            _print_chain(res["chain"], "autotune")
        _write(res, rows, out)
    res["wall_s"] = b.elapsed()
    _write(res, rows, out)


def compile_only(arch: int = 90) -> list[dict]:
    """Compile every launch config this run would use (heuristic + sweep, all shapes and M) for sm_``arch`` with the
    installed Triton, no GPU needed; registers and local memory (spills) from cuobjdump -res-usage. Catches a kernel that would not compile on
    the card before device time is spent."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import adakv_compile.kernels.triton_gemv as tg

    tg._sm_count = lambda device: 132  # an H200's SMs: the heuristic's choices for that card
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    cuobjdump = next((p for p in (nvidia / "bin" / "cuobjdump", nvidia / "cuobjdump") if p.exists()), None)
    seen, rows = {}, []
    for M in (1, 2, 4, 8):
        for name, K, N in SHAPES:
            cfgs = [("heuristic", choose_config(M, N, K, torch.bfloat16, torch.device("cuda")))]
            cfgs += [("sweep", c) for c in _sweep_configs(M, N, K)]
            for kind, cfg in cfgs:
                dot = cfg.dot or M > 1
                kps = triton.cdiv(triton.cdiv(K, cfg.split), cfg.block_k) * cfg.block_k
                split = triton.cdiv(K, kps)
                const = dict(HAS_BIAS=False, SPLIT=split, DOT=dot, IEEE=False, DOT_F32=False,
                             EVEN_K=K % cfg.block_k == 0 and kps % cfg.block_k == 0, EVEN_N=N % cfg.block_n == 0,
                             BLOCK_M=16 if dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages)
                key = (tuple(const.items()), cfg.num_warps)
                if key not in seen:
                    sig = {a: "i32" for a in ("M", "N", "K", "K_PER_SPLIT", "sxm", "swn", "sos", "som", "son")}
                    sig = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*fp32" if split > 1 else "*bf16", **sig,
                           **{c: "constexpr" for c in const}}
                    names = list(sig)  # pointers and ints divisible by 16, as Triton specialises them at launch
                    attrs = {(names.index(a),): [["tt.divisibility", 16]]
                             for a in ("X", "W", "B", "OUT", "K_PER_SPLIT", "sxm", "swn", "sos", "som")
                             + (("N", "K") if const["EVEN_K"] and const["EVEN_N"] else ())}
                    try:
                        k = triton.compile(ASTSource(tg._gemv_kernel, sig, constexprs=const, attrs=attrs),
                                           target=GPUTarget("cuda", arch, 32),
                                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                        info = "compiled"
                        if cuobjdump is not None:
                            with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
                                f.write(k.asm["cubin"])
                                f.flush()
                                usage = subprocess.run([str(cuobjdump), "-res-usage", f.name],
                                                       capture_output=True, text=True).stdout
                            regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
                            if regs:
                                info = f"{regs.group(1)} regs, {local.group(1) if local else '?'} B local (spills)"
                    except Exception as e:  # noqa: BLE001 - reported, the other configs still compile
                        info = f"FAILED {type(e).__name__}: {str(e)[:300]}"
                    seen[key] = info
                rows.append(dict(shape=name, M=M, kind=kind, config=cfg.short(), split=split, result=seen[key]))
                print(f"{name:>8} M={M} {kind:<9} {cfg.short():<18} split {split}: {seen[key]}", flush=True)
    return rows


def check_fast_path(device: str = "cuda") -> dict:
    """AdaKVConfig(gemv=True) on the GPU, small fp32 Llama (bench/e2e.py's), batch 1 (reduction path) and 3
    (tensor-core path): greedy tokens equal the eager reference, and Inductor's code launches ``_gemv_kernel``."""
    from torch._inductor.utils import run_and_get_code

    import e2e
    from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
    from adakv_compile.cache import cache_kwarg
    from adakv_compile.reference import ReferenceSession

    res = {}
    cfg = AdaKVConfig(budget=64, window=8, gemv=True)
    for batch in (1, 3):
        model = e2e.build(2, torch.float32, small=True, device=device)
        ref_model = e2e.build(2, torch.float32, small=True, device=device)
        ref_model.load_state_dict(model.state_dict())
        g = torch.Generator(device=device).manual_seed(batch)
        ids = torch.randint(1, 512, (batch, 300), device=device, generator=g)
        am = torch.ones_like(ids)
        am[1:, :120] = 0
        ids = ids * am
        ref = ReferenceSession(ref_model, cfg).generate(ids, attention_mask=am, max_new_tokens=12)[:, -12:]
        backend = compile_model(model, cfg)
        cache = AdaKVCache(model, backend, batch_size=batch, max_new_tokens=12)
        got, codes = run_and_get_code(lambda: model.generate(
            ids, attention_mask=am, max_new_tokens=12, do_sample=False, **{cache_kwarg(model): cache}))
        got = got[:, -12:].cpu()
        res[f"batch{batch}"] = dict(
            tokens_equal_reference=bool(torch.equal(got, ref.cpu())),
            token_agreement=float((got == ref.cpu()).float().mean()),
            gemv_per_graph=[gr.get("gemv") for gr in backend.graphs],
            gemv_kernel_in_inductor_code="_gemv_kernel" in "\n".join(codes),
            cudagraphs=[gr.get("cudagraphs") for gr in backend.graphs])
        print("check:", batch, json.dumps(res[f"batch{batch}"]), flush=True)
        del model, ref_model, cache, backend
        torch._dynamo.reset()
    return res


def _measure(b: Bench, v, x, ws, wbytes, ref, copy_s) -> dict:
    try:
        t0 = time.perf_counter()
        y = b.call(v, x, ws[0])
        _sync()
        compile_s = time.perf_counter() - t0
        s = b.time_variant(v, x, ws, wbytes)
    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
        print(f"  {v}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    m = dict(us=s * 1e6, pct_copy=100 * (copy_s / 2) / s, rel_err=_rel_err(y, ref))
    if v in ("inductor", "autotune", "decomposed"):
        m["compile_s"] = compile_s
    return m


class _Chain:
    """Every projection of ``layers`` layers + the LM head, distinct weights, one CUDA graph per variant."""

    def __init__(self, b: Bench, shapes, M, layers):
        self.b, self.layers = b, layers
        per_layer = [s for s in shapes if s[0] != "lm_head"]
        head = [s for s in shapes if s[0] == "lm_head"]
        self.ws = []
        g = torch.Generator(device=DEVICE).manual_seed(1)
        for _ in range(layers):
            for name, K, N in per_layer:
                self.ws.append((torch.randn(N, K, device=DEVICE, generator=g) / K ** 0.5).to(b.dtype))
        for name, K, N in head:
            self.ws.append((torch.randn(N, K, device=DEVICE, generator=g) / K ** 0.5).to(b.dtype))
        self.xs = {K: torch.randn(M, K, device=DEVICE).to(b.dtype) for _, K, _ in shapes}
        self.bytes = sum(w.numel() * w.element_size() for w in self.ws)

    def copy_ms(self) -> float:
        dst = torch.empty(max(w.numel() for w in self.ws), dtype=self.b.dtype, device=DEVICE)
        calls = [lambda w=w: dst[:w.numel()].view_as(w).copy_(w) for w in self.ws]
        return self.b.timer(calls, 2 * self.bytes / len(self.ws) / 4e12) * len(self.ws) * 1e3

    def run(self, v) -> dict:
        try:
            calls = [lambda w=w: self.b.call(v, self.xs[w.shape[1]], w) for w in self.ws]
            ms = self.b.timer(calls, self.bytes / len(self.ws) / 4e12) * len(self.ws) * 1e3
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return {"ms": ms}


def _print_row(row, only=None):
    cells = []
    for v, m in row["variants"].items():
        if only and v != only:
            continue
        cells.append(f"{v} {m['us']:8.1f} us {m['pct_copy']:5.1f}%" if "us" in m else f"{v} --")
    print(f"{row['shape']:>8} M={row['M']} {row['weight_bytes'] / 1e6:7.1f} MB floor {row['floor_us']:7.1f} us | "
          + " | ".join(cells), flush=True)


def _print_chain(chain, v):
    m = chain["variants"][v]
    print(f"chain {chain['layers']}L M={chain['M']} {v:<12} " + (
        f"{m['ms']:.3f} ms = {m['ms'] / chain['floor_ms']:.2f}x floor ({chain['floor_ms']:.3f} ms)" if "ms" in m
        else m["error"]), flush=True)


def _write(res, rows, out: Path) -> None:
    res["rows"] = list(rows.values())
    out.write_text(json.dumps(res, indent=1))
    lines = [f"# Decode GEMV, {res['device']} (torch {res['torch']}, triton {res['triton']}; copy "
             f"{res.get('copy_GBps', float('nan')):.0f} GB/s)", "",
             "µs per call (CUDA graph, weights rotated beyond L2) and % of copy bandwidth for the same bytes. "
             "`python " + " ".join(res["commands"][-1:]) + "`", "",
             "| shape | M | MB | floor µs | " + " | ".join(VARIANTS) + " | best config | heuristic |",
             "|---|---|---|---|" + "---|" * len(VARIANTS) + "---|---|"]
    for r in res["rows"]:
        cells = []
        for v in VARIANTS:
            m = r["variants"].get(v, {})
            cells.append(f"{m['us']:.1f} ({m['pct_copy']:.0f}%)" if "us" in m else ("skip" if "skipped" in m
                                                                                    else "err" if "error" in m else "—"))
        best = r["variants"].get("triton_best", {}).get("config", "—")
        lines.append(f"| {r['shape']} | {r['M']} | {r['weight_bytes'] / 1e6:.1f} | {r['floor_us']:.1f} | "
                     + " | ".join(cells) + f" | {best} | {r['heuristic']} |")
    ch = res.get("chain")
    if ch:
        lines += ["", f"**{ch['layers']}-layer chain** (all projections + LM head, {ch['bytes'] / 1e9:.2f} GB, "
                      f"M = {ch['M']}, one CUDA graph): floor {ch['floor_ms']:.3f} ms (copy of the same tensors: "
                      f"{ch['copy_ms'] / 2:.3f} ms)", "", "| variant | ms | × floor |", "|---|---|---|"]
        for v, m in ch["variants"].items():
            lines.append(f"| {v} | {m['ms']:.3f} | {m['ms'] / ch['floor_ms']:.2f}× |" if "ms" in m
                         else f"| {v} | {m.get('error', '')[:60]} | |")
    compile_s = {v: sum(r["variants"].get(v, {}).get("compile_s", 0.0) for r in res["rows"])
                 for v in ("inductor", "autotune", "decomposed")}
    lines += ["", "Compile time, all rows (first call, s): " + ", ".join(f"{v} {s:.1f}" for v, s in compile_s.items())]
    if "check" in res:
        lines.append("GPU check, AdaKVConfig(gemv=True) on a small fp32 Llama vs the eager reference: `"
                     + json.dumps(res["check"]) + "`")
    if "wall_s" in res:
        lines.append(f"Wall time {res['wall_s']:.0f} s.")
    out.with_suffix(".md").write_text(md_header(res["device"], torch=res["torch"], triton=res["triton"])
                                      + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU smoke: tiny shapes, Triton interpreter")
    ap.add_argument("--m", default="1,2,4,8", help="rows of x (the decode batch)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rotate-mb", type=int, default=256, help="weight copies per shape cover at least this")
    ap.add_argument("--autotune-budget-s", type=float, default=75.0,
                    help="stop compiling max-autotune cases after this much compile time")
    ap.add_argument("--sweep-budget-s", type=float, default=60.0,
                    help="no new case of the Triton config sweep after this much sweep time")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gemv-<card>.json)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the GPU check of AdaKVConfig(gemv=True) against the eager reference")
    ap.add_argument("--compile-only", type=int, metavar="ARCH", default=None,
                    help="no GPU: compile every launch config for sm_ARCH (e.g. 90); registers and spills")
    a = ap.parse_args()
    if a.compile_only is not None:
        rows = compile_only(a.compile_only)
        failed = [r for r in rows if r["result"].startswith("FAILED")]
        raise SystemExit(f"{len(failed)} of {len(rows)} launch configs failed to compile" if failed else 0)
    global DEVICE
    if a.small:
        DEVICE = "cpu"
        a.m = "1,3" if a.m == "1,2,4,8" else a.m
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gemv.py needs a CUDA device (or --small for the CPU smoke test)")
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    import triton
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    out = Path(a.out) if a.out else (Path("/tmp/gemv-cpu.json") if a.small else
                                     Path(__file__).resolve().parent / "results" / f"gemv-{_short_card(card)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": card, "torch": torch.__version__, "triton": triton.__version__,
           "commands": ["bench/gemv.py " + " ".join(sys.argv[1:])]}
    if not a.small and not a.no_check:
        try:
            res["check"] = check_fast_path()
        except Exception as e:  # noqa: BLE001 - recorded; the timings still run
            import traceback
            traceback.print_exc()
            res["check"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    with torch.no_grad():
        run(a, res, out)
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
