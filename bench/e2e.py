"""End-to-end decode on the GPU: Llama-3.1-8B shapes (random bf16 weights), one process, one card.

Per shape (batch x context), time per output token (median over --steps decode steps after warm-up:
pipelined, CUDA events between step starts, no host sync; and each step synchronised alone), KV bytes, peak memory, recompiles and CUDA-graph recordings, and compile time
(first prefill + first decode call) for:
  floor          weight bytes / device-to-device copy bandwidth measured in this run (no decoder is faster)
  static_ro      HF StaticCache (full cache) + torch.compile(mode="reduce-overhead"): the strongest baseline
  compile_dyn    plain torch.compile (Inductor) + DynamicCache                       (--with-dynamic)
  adakv          adakv fast path: AdaKVCache + adakv backend (Triton ops inlined, CUDA-graph decode)
  adakv_nomerge  the same with AdaKVConfig(merge_linears=False) (q/k/v, gate/up as the model's own GEMMs)
  adakv_gemv     the same with AdaKVConfig(gemv=True) (decode projections by the Triton GEMV, passes/gemv.py)
  adakv_fm, adakv_gemv_fm  adakv / adakv_gemv with ADAKV_FUSED_MERGE=1 (split-K merge inside the attention launch)
  adakv_general  adakv general path: DynamicCache + adakv backend                    (--with-general)

    python bench/e2e.py --shapes 1x8192,1x32768,8x32768,32x8192 --layers 8 --out bench/results/e2e-<card>.json
    python bench/e2e.py --shapes 1x32768 --layers 32 --append --out bench/results/e2e-<card>.json
    python bench/e2e.py --device cpu --small --layers 2 --shapes 1x256 --methods adakv,adakv_nomerge \
        --budget 64 --steps 4 --warm 2 --out /tmp/e2e-cpu.json                  # smoke test of the script

Writes JSON (rows with ``batch``, ``context``, ``budget``, ``layers``, ``floor_ms``, ``static_ro_ms``,
``adakv_ms``, ... and ``device``), a Markdown table and a PNG next to it. ``--check`` first verifies the
fast path on a small fp32 model: greedy tokens equal the eager reference generator, and Inductor's output
code contains the Triton kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, also when imported as bench.e2e
from stamp import md_header, png_metadata  # noqa: E402
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.kernels import store  # noqa: E402


# the fast-path methods: AdaKVConfig fields of each (budget aside)
ADAKV_FAST = {"adakv": {}, "adakv_nomerge": {"merge_linears": False}, "adakv_gemv": {"gemv": True},
              "adakv_cublas": {"gemv": False},
              "adakv_fm": {}, "adakv_gemv_fm": {"gemv": True},
              "adakv_untraced": {"prefill_compiler": "untraced"},  # the decode is adakv's: for --check
              "adakv_decode_opaque": {}, "adakv_decode_inlined": {}}
# environment switches of a fast-path method, set while it compiles and runs (the rewrite reads them at trace time)
ADAKV_ENV = {"adakv_fm": {"ADAKV_FUSED_MERGE": "1"}, "adakv_gemv_fm": {"ADAKV_FUSED_MERGE": "1"},
             "adakv_decode_opaque": {"ADAKV_DECODE_OPAQUE": "1"},  # the default for CUDA-graphed decode since s14
             "adakv_decode_inlined": {"ADAKV_DECODE_OPAQUE": "0"}}


@contextlib.contextmanager
def method_env(name: str):
    """Set ``ADAKV_ENV[name]`` for the duration (restoring what was there)."""
    env = ADAKV_ENV.get(name, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
DEVICE = "cuda"  # --device cpu: the script's own smoke test (tiny shapes, host timers)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    if DEVICE != "cuda":
        x = torch.randint(0, 255, (1 << 26,), dtype=torch.uint8)
        y = torch.empty_like(x)
        t0 = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        return 2 * x.numel() * 5 / (time.perf_counter() - t0)
    x = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * x.numel() / statistics.median(times)


def weight_floor_ms(model, bandwidth: float) -> float:
    """The decode floor: every parameter read once per step at ``bandwidth`` (bytes/s, copy_bandwidth()).
    bench/long_context.py uses it too (one definition)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / bandwidth * 1e3


def build(layers: int, dtype=torch.bfloat16, small: bool = False, device: str | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0)
    with torch.device(device or DEVICE):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class Recordings:
    """Counts CUDA-graph recordings (cudagraph trees) while active."""

    def __init__(self):
        self.n = 0
        self._orig = None

    def __enter__(self):
        from torch._inductor import cudagraph_trees as ct
        self._cls = ct.CUDAGraphNode
        self._orig = ct.CUDAGraphNode.__init__
        rec = self

        def init(node, *a, **k):
            rec.n += 1
            return rec._orig(node, *a, **k)

        ct.CUDAGraphNode.__init__ = init
        return self

    def __exit__(self, *exc):
        self._cls.__init__ = self._orig


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def decode_loop(fwd, kw, cache, first_tok, steps: int, warm: int):
    """(pipelined ms, synchronised ms) per decode step, medians over ``steps`` steps each.

    pipelined: CUDA events at each step's start, no host synchronisation between steps (as a generation
    loop runs: the host may run ahead of the GPU) — the time per output token. synchronised: each step
    timed alone with a host sync before and after (its latency when nothing overlaps)."""
    def step(tok):
        out = fwd(input_ids=tok, use_cache=True, **{kw: cache})
        return out.logits[:, -1:].argmax(-1)

    tok = first_tok
    for _ in range(warm):
        tok = step(tok)
    if DEVICE != "cuda":  # host timers only (smoke test): both numbers are the synchronised step time
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = step(tok)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, statistics.median(times) * 1e3
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    for i in range(steps):
        events[i].record()
        tok = step(tok)
    events[steps].record()
    torch.cuda.synchronize()
    pipelined = statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(steps))
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = step(tok)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return pipelined, statistics.median(times) * 1e3


def run_method(name, model, orig_forward, ids, budget, steps, warm):
    """One method on one shape: returns a dict of measurements."""
    kw = cache_kwarg(model)
    B, n = ids.shape
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    graphs0 = unique_graphs()
    backend = None
    if name == "static_ro":
        cache = StaticCache(config=model.config, max_cache_len=n + warm + 2 * steps + 8)
        fwd = torch.compile(orig_forward, mode="reduce-overhead", fullgraph=True)
        prefill = orig_forward  # HF's recipe: eager prefill, compiled decode
    elif name == "compile_dyn":
        cache = DynamicCache(config=model.config)
        fwd = prefill = torch.compile(orig_forward)
    elif name in ADAKV_FAST:
        backend = adakv_backend(AdaKVConfig(budget=budget, **ADAKV_FAST[name]))
        cache = AdaKVCache(model, backend, batch_size=B, max_new_tokens=warm + 2 * steps + 8)
        fwd = prefill = torch.compile(orig_forward, backend=backend)
    elif name == "adakv_general":
        backend = adakv_backend(AdaKVConfig(budget=budget))
        cache = DynamicCache(config=model.config)
        fwd = prefill = torch.compile(orig_forward, backend=backend)
    else:
        raise ValueError(name)
    with torch.no_grad(), Recordings() as rec:
        _sync()
        t0 = time.perf_counter()
        out = prefill(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        _sync()
        prefill_s = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        out = fwd(input_ids=tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        _sync()
        first_decode_s = time.perf_counter() - t1
        # a second prefill-free warm step, then count from here
        graphs_warm, rec_warm = unique_graphs(), rec.n
        ms, ms_synced = decode_loop(fwd, kw, cache, tok, steps, warm)
        graphs_end, rec_end = unique_graphs(), rec.n
    if name == "static_ro":
        kvb = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    elif name in ADAKV_FAST:
        kvb = cache.nbytes()
    else:
        kvb = sum(store.store_bytes(layer.keys) + store.store_bytes(layer.values) for layer in cache.layers)
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else 0.0
    row = dict(ms=ms, ms_synced=ms_synced, kv_bytes=kvb, peak_gb=peak,
               first_call_s=prefill_s + first_decode_s, prefill_s=prefill_s,
               graphs_compiled=graphs_end - graphs0,
               recompiles_during_decode=graphs_end - graphs_warm, recordings_during_decode=rec_end - rec_warm,
               recordings=rec.n)
    if backend is not None:
        row["cudagraphs"] = [g.get("cudagraphs") for g in backend.graphs]
        row["rewritten"] = [g["rewritten"] for g in backend.graphs]
        row["merged_linears"] = [len(g.get("merged_linears", [])) for g in backend.graphs]
        row["gemv"] = [g.get("gemv", 0) for g in backend.graphs]
    del cache, fwd, out
    torch._dynamo.reset()
    return row


def profile_fast_path(model, orig_forward, ids, budget: int, out_dir: Path, steps: int = 20) -> str:
    """Where a fast-path decode step spends GPU time (kernels by total CUDA time over ``steps`` steps)."""
    from torch.profiler import ProfilerActivity, profile

    kw = cache_kwarg(model)
    backend = adakv_backend(AdaKVConfig(budget=budget))
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=steps + 16)
    fwd = torch.compile(orig_forward, backend=backend)
    with torch.no_grad():
        out = fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(6):
            tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    (out_dir / "profile-fast-path.txt").write_text(f"# {torch.cuda.get_device_name(0)}, {ids.shape[0]}x"
                                                   f"{ids.shape[1]}, {steps} decode steps\n" + table)
    del cache, fwd
    torch._dynamo.reset()
    return table


def check_fast_path(out_dir: Path, method: str = "adakv") -> dict:
    """Small fp32 model on the GPU: fast-path greedy tokens == eager reference; kernels in Inductor code.
    ``method`` (a key of ADAKV_FAST) picks the AdaKVConfig fields of the fast path under test."""
    from torch._inductor.utils import run_and_get_code

    from adakv_compile import compile_model
    from adakv_compile.reference import ReferenceSession

    res = {}
    model = build(2, torch.float32, small=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AdaKVConfig(budget=64, window=8)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, 512, (3, 400), device="cuda", generator=g)
    am = torch.ones_like(ids)
    am[1, :150] = 0
    am[2, :300] = 0
    ids = ids * am
    ref_model = build(2, torch.float32, small=True)
    ref_model.load_state_dict(state)
    ref = ReferenceSession(ref_model, cfg).generate(ids, attention_mask=am, max_new_tokens=16)[:, -16:]
    backend = compile_model(model, dataclasses.replace(cfg, **ADAKV_FAST[method]))
    cache = AdaKVCache(model, backend, batch_size=3, max_new_tokens=16)
    kw = cache_kwarg(model)
    got, codes = run_and_get_code(
        lambda: model.generate(ids, attention_mask=am, max_new_tokens=16, do_sample=False, **{kw: cache}))
    got = got[:, -16:]
    res["tokens_equal_reference"] = bool(torch.equal(got.cpu(), ref.cpu()))
    res["token_agreement"] = float((got.cpu() == ref.cpu()).float().mean())
    code = "\n".join(codes)
    # decode: append + attention; prefill (adakv::prefill_compress inlined): the scorer's passes and the
    # compaction; and no compress op left as an extern call
    res["kernels_in_inductor_code"] = {k: (k in code) for k in
                                       ("_static_append_kernel", "_store_attn_fwd", "_score_stats",
                                        "_score_reduce", "_score_pool", "_segment_slots_kernel",
                                        "_scatter_kept_kernel")}
    import re
    res["compress_extern_calls"] = sorted(set(re.findall(r"torch\.ops\.adakv\.(\w*compress\w*)", code)))
    from inline_check import scans  # the compress body's scan ops (issue 17: none expected)
    res["compress_scan_ops"] = scans(code)[0]
    res["cudagraphs"] = [gr.get("cudagraphs") for gr in backend.graphs]
    # issue 17, ADAKV_FUSED_MERGE: Triton launches in each decode graph's code (those with the append kernel)
    res["fused_merge"] = os.environ.get("ADAKV_FUSED_MERGE", "")
    res["decode_triton_launches"] = [c.count(".run(") for c in codes if "_static_append_kernel" in c]
    res["merge_kernel_in_code"] = "_store_attn_merge" in code
    # passes/opaque.py (default for CUDA-graphed decode graphs): the decode ops as extern calls of the twins
    res["decode_opaque_calls"] = [len(re.findall(r"torch\.ops\.adakv\.\w+_opaque\.default\(", c)) for c in codes]
    res["report"] = backend.report.table()
    res["gemv"] = [gr.get("gemv", 0) for gr in backend.graphs]
    (out_dir / f"e2e-check-inductor-code-{method}.txt").write_text(code[:2_000_000])
    print(f"check {method}:", json.dumps({k: v for k, v in res.items() if k != "report"}), flush=True)
    print(res["report"], flush=True)
    return res


def write_outputs(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=1))
    card = res["device"]
    lines = [f"# End-to-end decode, {card}", "",
             f"torch {res['torch']}, transformers {res['transformers']}; copy {res['copy_GBps']:.0f} GB/s; "
             f"budget {res['budget']}; ms per output token (median of {res['steps']} pipelined decode steps, "
             "CUDA events, no host sync between steps)", "",
             "| layers | batch × context | floor | StaticCache + reduce-overhead | adakv fast | adakv / static | "
             "adakv / floor | adakv, linears not merged | general path | compile+DynamicCache | KV GB static / adakv | peak GB static / adakv "
             "| first call s static / adakv | recompiles, recordings in decode (adakv) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m = r["methods"]

        def ms(k):
            return f"{m[k]['ms']:.2f}" if k in m and "ms" in m[k] else "—"
        st, ad = m.get("static_ro", {}), m.get("adakv", {})
        sp = f"{st['ms'] / ad['ms']:.2f}×" if "ms" in st and "ms" in ad else "—"
        fl = f"{ad['ms'] / r['floor_ms']:.2f}×" if "ms" in ad else "—"

        def pair(key, f1, f2, scale=1.0):  # static / adakv, "—" for a method this row did not run
            a = f"{st[key] * scale:{f1}}" if key in st else "—"
            b = f"{ad[key] * scale:{f2}}" if key in ad else "—"
            return f"{a} / {b}"
        kv = pair("kv_bytes", ".2f", ".3f", 1e-9)
        pk = pair("peak_gb", ".1f", ".1f")
        fc = pair("first_call_s", ".0f", ".0f")
        rr = f"{ad.get('recompiles_during_decode', '—')}, {ad.get('recordings_during_decode', '—')}"
        lines.append(f"| {r['layers']} | {r['batch']} × {r['context']} | {r['floor_ms']:.2f} | {ms('static_ro')} | "
                     f"{ms('adakv')} | {sp} | {fl} | {ms('adakv_nomerge')} | {ms('adakv_general')} | {ms('compile_dyn')} | {kv} | {pk} | "
                     f"{fc} | {rr} |")
    for meth, what in (("adakv_gemv", "`AdaKVConfig(gemv=True)` (Triton GEMV, passes/gemv.py)"),
                       ("adakv_fm", "`ADAKV_FUSED_MERGE=1` (split-K merge in the attention launch)"),
                       ("adakv_gemv_fm", "`gemv=True` and `ADAKV_FUSED_MERGE=1`")):
        extra = [r for r in res["rows"] if "ms" in r["methods"].get(meth, {})]
        if not extra:  # each extra fast-path variant: its own lines, the table above unchanged
            continue
        lines += ["", f"adakv fast path with {what}, ms per token:", ""]
        lines += [f"- {r['layers']} layers, {r['batch']} × {r['context']}: {r['methods'][meth]['ms']:.2f} "
                  f"({r['methods'][meth]['ms'] / r['floor_ms']:.2f}× floor"
                  + (f"; StaticCache + reduce-overhead {r['methods']['static_ro']['ms']:.2f}"
                     if "ms" in r["methods"].get("static_ro", {}) else "")
                  + (f"; GEMVs per graph {r['methods'][meth].get('gemv')}" if "gemv" in meth else "") + ")"
                  for r in extra]
    out.with_suffix(".md").write_text(md_header(card) + "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, batch_filter in zip(axes, (lambda b: b == 1, lambda b: b > 1)):
            rows = [r for r in res["rows"] if batch_filter(r["batch"]) and r["layers"] == res["rows"][0]["layers"]]
            if not rows:
                continue
            labels = [f"{r['batch']}×{r['context'] // 1024}k" for r in rows]
            xs = range(len(rows))
            for key, style in (("static_ro", "o-"), ("adakv", "s-"), ("adakv_nomerge", "d-."), ("adakv_general", "^--"),
                               ("compile_dyn", "x:")):
                ys = [r["methods"].get(key, {}).get("ms") for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=key)
            ax.plot(xs, [r["floor_ms"] for r in rows], "k--", label="weight-read floor")
            ax.set_xticks(list(xs), labels)
            ax.set_ylabel("ms / output token")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.suptitle(f"Decode, Llama-3.1-8B shapes × {res['rows'][0]['layers']} layers, {card}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110, metadata=png_metadata(card))
    except Exception as e:  # the plot is a convenience; the JSON is the record
        print("plot failed:", e)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shapes", default="1x8192,1x32768,8x32768,32x8192")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--methods", default="static_ro,adakv")
    ap.add_argument("--check", action="store_true", help="first verify the fast path (small fp32 model)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    ap.add_argument("--profile", action="store_true", help="profile the fast path on the first shape")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: smoke test of this script (with --small); numbers mean nothing there")
    ap.add_argument("--small", action="store_true", help="a tiny Llama instead of Llama-3.1-8B shapes")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": card, "torch": torch.__version__,
           "transformers": transformers.__version__, "budget": a.budget, "steps": a.steps, "rows": []}
    if a.append and out.exists():
        res = json.loads(out.read_text())
        if res["device"] != card:
            sys.exit(f"{out} holds results from {res['device']}: not appending numbers from another card")
    if a.check:  # the default fast path, and each other fast-path method asked for
        for name in ["adakv"] + [m for m in a.methods.split(",") if m in ADAKV_FAST and m != "adakv"]:
            with method_env(name):
                res["check" if name == "adakv" else f"check_{name}"] = check_fast_path(out.parent, name)
            torch._dynamo.reset()
    bw = copy_bandwidth()
    res["copy_GBps"] = bw / 1e9
    model = build(a.layers, torch.bfloat16 if DEVICE == "cuda" else torch.float32, small=a.small)
    orig_forward = model.forward
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weight_floor_ms(model, bw)
    print(f"{res['device']}: copy {bw / 1e9:.0f} GB/s; weights {wbytes / 1e9:.2f} GB; floor {floor:.2f} ms/token",
          flush=True)
    if a.profile:
        B, n = (int(x) for x in a.shapes.split(",")[0].split("x"))
        ids = torch.randint(1, model.config.vocab_size, (B, n), device=DEVICE)
        print(profile_fast_path(model, orig_forward, ids, a.budget, out.parent), flush=True)
    for shape in a.shapes.split(","):
        B, n = (int(x) for x in shape.split("x"))
        ids = torch.randint(1, model.config.vocab_size, (B, n), device=DEVICE)
        row = dict(device=res["device"], layers=a.layers, batch=B, context=n, budget=a.budget,
                   weight_bytes=wbytes, floor_ms=floor, methods={})
        for name in a.methods.split(","):
            try:
                with method_env(name):
                    m = run_method(name, model, orig_forward, ids, a.budget, a.steps, a.warm)
            except Exception as e:  # record and go on: one method failing must not lose the others
                import traceback
                traceback.print_exc()
                m = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                torch._dynamo.reset()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            row["methods"][name] = m
            if "ms" in m:
                row[f"{name}_ms"] = m["ms"]
            print(f"{a.layers:>2}L {B:>3}x{n:<6} {name:<14} " + (
                f"{m['ms']:8.2f} ms/token ({m['ms_synced']:.2f} synced)  KV {m['kv_bytes'] / 1e9:6.3f} GB  peak {m['peak_gb']:5.1f} GB  "
                f"first call {m['first_call_s']:5.1f} s  decode recompiles {m['recompiles_during_decode']} "
                f"recordings {m['recordings_during_decode']}" if "ms" in m else m["error"]), flush=True)
        res["rows"].append(row)
        write_outputs(res, out)
    write_outputs(res, out)


if __name__ == "__main__":
    main()
