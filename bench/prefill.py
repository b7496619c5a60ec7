"""Prefill cost and capacity on the GPU: Llama-3.1-8B shapes (random bf16 weights), one process, one card.

Part 1, prefill (per shape batch x context): wall time of one prefill (median of --reps after a warm-up
call, so compile time is excluded) and peak memory, for
  eager          the uncompiled HF model, SDPA, full cache (DynamicCache)
  compiled       plain torch.compile (Inductor), DynamicCache
  adakv          adakv backend + AdaKVCache (scores, allocates and compacts every layer)
and the share of the adakv prefill spent in scoring + allocation + compaction: the same work
(``kernels/static.py``: prompt_scores, keep_mask, fill_static) timed alone on random inputs of the
layer's shapes, times the number of layers.

Part 2, capacity at --capacity-context tokens per request: the largest batch whose cache fits on the card,
full cache (HF StaticCache) vs AdaKVCache at budgets --capacity-budgets, and the decode throughput at that
batch (tokens/s, pipelined decode steps; StaticCache + reduce-overhead vs the adakv fast path). The
caches are filled with random data as a prefill would leave them (so no batch-sized prefill is needed:
requests can be prefilled one at a time and joined, see the README).

    python bench/prefill.py --layers 8 --out bench/results/prefill-<card>.json   (or python -m bench.prefill ...)
    python -m bench.prefill --small --layers 2 --shapes 1x256,2x192 --budget 48 --reps 1 --out /tmp/p.json
                                                                               (smoke test: CPU without CUDA)
Writes prefill-<card>.json (rows: batch, context, adakv_prefill_ms, eager_prefill_ms, peak_gb, ...) and
capacity-<card>.json (per budget: max_batch, tokens_per_s; and the full cache's), Markdown and a PNG.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, also when run as python -m bench.prefill
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.kernels.allocate import keep_mask  # noqa: E402
from adakv_compile.kernels.ops import prompt_scores  # noqa: E402
from adakv_compile.kernels.static import fill_static  # noqa: E402

import e2e  # noqa: E402
from e2e import build, copy_bandwidth  # noqa: E402
from stamp import md_header, png_metadata  # noqa: E402


DEV = "cuda"  # --small on a machine without CUDA: "cpu" (the script's own smoke test; prefill part only)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else "n/a"


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def prefill_row(model, orig_forward, B: int, n: int, budget: int, reps: int, plain_compiled: bool = True) -> dict:
    kw = cache_kwarg(model)
    ids = torch.randint(1, model.config.vocab_size, (B, n), device=DEV)
    row = dict(batch=B, context=n, budget=budget)

    def run(fwd, make_cache):
        def go():
            with torch.no_grad():
                fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: make_cache()})
        go()  # warm-up / compile
        _empty_cache()
        ms = timed(go, reps)
        return ms, _peak_gb()

    baselines = [("eager", orig_forward, lambda: DynamicCache(config=model.config))]
    if not plain_compiled:
        row["compiled_prefill_ms"] = row["compiled_peak_gb"] = "skipped"
    else:
        baselines.append(("compiled", torch.compile(orig_forward), lambda: DynamicCache(config=model.config)))
    for name, fwd, make in baselines:
        try:
            row[f"{name}_prefill_ms"], row[f"{name}_peak_gb"] = run(fwd, make)
        except torch.OutOfMemoryError:
            row[f"{name}_prefill_ms"] = row[f"{name}_peak_gb"] = None
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    backend = adakv_backend(AdaKVConfig(budget=budget))
    cache = AdaKVCache(model, backend, batch_size=B, max_new_tokens=64)

    def fresh():
        cache.reset()
        return cache
    fwd = torch.compile(orig_forward, backend=backend)
    try:
        row["adakv_prefill_ms"], row["adakv_peak_gb"] = run(fwd, fresh)
        # the same prefill compiled with the compress op's body emptied (Inductor inlines the body, so it
        # is compiled anew, with Inductor's caches off: the emptied graph has the same cache key): what
        # compression adds to the prefill, launches overlapped with the GPU's work as in real use
        torch._dynamo.reset()
        with _compress_body_emptied(backend):
            fwd = torch.compile(orig_forward, backend=backend)
            row["adakv_no_compress_prefill_ms"], _ = run(fwd, fresh)
        row["compress_in_prefill_ms"] = row["adakv_prefill_ms"] - row["adakv_no_compress_prefill_ms"]
    except torch.OutOfMemoryError:
        row["adakv_prefill_ms"] = row["adakv_peak_gb"] = None
    torch._dynamo.reset()
    del cache, fwd
    torch.cuda.empty_cache()
    row["peak_gb"] = row["adakv_peak_gb"]
    row["compress_ms"] = compress_ms(model, B, n, budget, reps)
    if row["adakv_prefill_ms"]:
        row["compress_share"] = row["compress_ms"] / row["adakv_prefill_ms"]
        row["compress_share_in_prefill"] = row["compress_in_prefill_ms"] / row["adakv_prefill_ms"]
    return row


class _compress_body_emptied:
    """Within (compile and run): the compress ops score, allocate and write nothing (their callees are
    stubs); Inductor's FX-graph and AOTAutograd caches are off, so the emptied body is really compiled, and
    ``backend``'s one-layer compression graphs (passes/compress_once.py) are forgotten on entry and exit."""

    def __init__(self, backend):
        from adakv_compile.passes import compress_once
        self.compiled = compress_once.compiled_graphs(backend._key)

    def __enter__(self):
        self.compiled.clear()
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        from adakv_compile.kernels import static
        self.static, self.saved = static, (static.prompt_scores, static.keep_mask_tp, static.fill_static)
        static.prompt_scores = lambda q, k, valid, *a: valid[:, None, :].expand(k.shape[0], k.shape[1], -1)
        static.keep_mask_tp = lambda scores, *a: scores
        static.fill_static = lambda *a: None
        self.patches = [inductor_config.patch(fx_graph_cache=False),
                        functorch_config.patch(enable_autograd_cache=False)]
        for p in self.patches:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.__exit__(*exc)
        self.static.prompt_scores, self.static.keep_mask_tp, self.static.fill_static = self.saved
        self.compiled.clear()


def causal_mask_check(n: int = 4096, reps: int = 5) -> dict:
    """The flash route of ``exact_attention`` for an explicit causal bool mask against SDPA given the
    mask (K/V repeated): max abs difference and both timings (incl. the mask check), bf16, 8B shapes."""
    from adakv_compile.kernels.attend import exact_attention
    import torch.nn.functional as F
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None]
    kr, vr = (t.repeat_interleave(4, 1) for t in (k, v))
    got = exact_attention(q, k, v, mask, 128 ** -0.5, False, 0.0)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=128 ** -0.5)
    return dict(context=n, max_abs_diff=float((got.float() - want.float()).abs().max()),
                flash_route_ms=timed(lambda: exact_attention(q, k, v, mask, 128 ** -0.5, False, 0.0), reps),
                masked_sdpa_ms=timed(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask,
                                                                            scale=128 ** -0.5), reps))


def compress_ms(model, B: int, n: int, budget: int, reps: int) -> float:
    """Scoring + allocation + compaction of all layers, timed alone on random inputs of the layer shapes."""
    c = model.config
    D = c.hidden_size // c.num_attention_heads
    Hq, Hkv, L = c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    cfg = AdaKVConfig(budget=budget)
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, Hq, n, D, device=DEV, dtype=next(model.parameters()).dtype, generator=g)
    k = torch.randn(B, Hkv, n, D, device=DEV, dtype=next(model.parameters()).dtype, generator=g)
    v = torch.randn_like(k)
    valid = torch.ones(B, n, dtype=torch.bool, device=DEV)
    cache = AdaKVCache(model, cfg, batch_size=B, max_new_tokens=64)
    lay = cache.layers[0]

    def one():
        s = prompt_scores(q, k, valid, cfg, D ** -0.5, None)
        keep = keep_mask(s, valid, cfg, 0, L)
        fill_static(k, v, keep, lay.room, lay.pool_k, lay.pool_v, lay.off, lay.lens, lay.pos)
    one()
    ms = timed(one, reps) * L
    del q, k, v, cache
    return ms


def fill_random(tensors):
    for t in tensors:
        if t.is_floating_point():
            t.normal_()


def release() -> None:
    """Free what a failed or finished attempt held: Dynamo's and the CUDA-graph trees' references too."""
    import gc

    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 - older/newer torch: nothing to reset
        pass
    gc.collect()
    torch.cuda.empty_cache()


def capacity_row(model, orig_forward, n: int, budget, steps: int, free_margin_gb: float) -> dict:
    """Largest batch of n-token requests whose cache fits, and decode tokens/s at that batch."""
    kw = cache_kwarg(model)
    c = model.config
    D = c.hidden_size // c.num_attention_heads
    Hkv, L = c.num_key_value_heads, c.num_hidden_layers
    room = steps + 16
    if budget is None:
        per_row = L * 2 * Hkv * (n + room) * D * 2
    else:
        S = Hkv * budget + (Hkv + 1) // 2 + Hkv * room
        per_row = L * (2 * S * D * 2 + S * 4)
    # decode activations per row: logits (bf16 + fp32 argmax input) and the MLP's intermediate, generously
    act_per_row = c.vocab_size * 6 + c.intermediate_size * 8 + c.hidden_size * 32
    if budget is None:  # HF's decode graph (transformers 5.17) repeats one layer's K and V to every q head
        act_per_row += 2 * c.num_attention_heads * (n + room) * D * 2
    release()
    free = torch.cuda.mem_get_info()[0] - free_margin_gb * 1e9
    batch = int(free // (per_row + act_per_row))
    row = dict(context=n, budget=budget, per_row_bytes=per_row, estimate=batch)
    for _ in range(8):
        fitted = False
        try:
            row.update(_decode_at(model, orig_forward, kw, n, budget, batch, room, steps))
            row["max_batch"] = fitted = batch
        except torch.OutOfMemoryError as e:
            row.setdefault("oom", []).append(f"{batch}: {str(e)[:160]}")
        release()
        if fitted:
            break
        batch = int(batch * 0.92)
    return row


def filled_cache(model, budget, batch: int, n: int, room: int, heads: int | None = None, **cache_kw):
    """(cache, adakv backend or None) as a prefill of n tokens leaves it, random K/V: a StaticCache (full, for
    budget None) or an AdaKVCache holding ``budget`` tokens per head then ``room`` free slots. ``heads``: KV
    heads on this rank (default: the model's); ``cache_kw``: more AdaKVCache arguments (e.g. tp_reserve)."""
    c = model.config
    D = c.hidden_size // c.num_attention_heads
    heads = c.num_key_value_heads if heads is None else heads
    if budget is None:
        cache = StaticCache(config=model.config, max_cache_len=n + room)
        cache.early_initialization(batch, heads, D, torch.bfloat16, torch.device("cuda"))
        for layer in cache.layers:
            fill_random((layer.keys, layer.values))
            layer.cumulative_length.fill_(n)
        return cache, None
    backend = adakv_backend(AdaKVConfig(budget=budget))
    cache = AdaKVCache(model, backend, batch_size=batch, max_new_tokens=room, **cache_kw)
    for layer in cache.layers:
        fill_random((layer.pool_k, layer.pool_v))
        seg = budget + layer.room
        layer.off.copy_(torch.arange(batch, device="cuda")[:, None] * layer.slots_per_row
                        + torch.arange(layer.num_heads, device="cuda") * seg)
        layer.lens.fill_(budget)
        layer.seen.fill_(n)
        layer.compressed = True
    return cache, backend


def cache_nbytes(cache) -> int:
    """Bytes a StaticCache's K/V or an AdaKVCache's tensors hold."""
    if isinstance(cache, AdaKVCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _decode_at(model, orig_forward, kw, n, budget, batch, room, steps) -> dict:
    c = model.config
    cache, backend = filled_cache(model, budget, batch, n, room)
    fwd = (torch.compile(orig_forward, mode="reduce-overhead", fullgraph=True) if budget is None
           else torch.compile(orig_forward, backend=backend))
    cache_bytes = cache_nbytes(cache)
    tok = torch.randint(1, c.vocab_size, (batch, 1), device="cuda")
    with torch.no_grad():
        for _ in range(4):
            tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        for i in range(steps):
            ev[i].record()
            tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        ev[steps].record()
        torch.cuda.synchronize()
    ms = statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(steps))
    out = dict(ms_per_step=ms, tokens_per_s=batch / ms * 1e3, cache_gb=cache_bytes / 1e9,
               peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    del cache, fwd
    release()
    return out


def plot_prefill(res: dict, png: Path) -> None:
    """Prefill time and peak memory per shape: eager vs plain compiled vs adakv (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = res["rows"]
    labels = [f"{r['batch']}×{r['context'] // 1024}k" for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (key, unit) in enumerate((("prefill_ms", "prefill ms"), ("peak_gb", "peak GB"))):
        for j, name in enumerate(("eager", "compiled", "adakv")):
            vals = [v if isinstance(v := r.get(f"{name}_{key}"), (int, float)) else 0 for r in rows]
            ax[k].bar([i + (j - 1) * 0.27 for i in range(len(rows))], vals, width=0.27, label=name)
        ax[k].set_xticks(range(len(rows)), labels)
        ax[k].set_ylabel(unit)
        if key == "prefill_ms":
            ax[k].set_yscale("log")
    ax[0].legend()
    fig.suptitle(f"Prefill, {res['device']}, Llama-3.1-8B shapes × {res['layers']} layers, budget {res['budget']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110, metadata=png_metadata(res["device"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shapes", default="1x8192,1x32768,8x32768,1x131072")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--capacity-context", type=int, default=32768)
    ap.add_argument("--capacity-budgets", default="full,256,1024,2048")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true", help="no plain torch.compile baseline (one compile less)")
    ap.add_argument("--small", action="store_true",
                    help="a tiny fp32 model (smoke test; on a machine without CUDA: CPU, prefill part only)")
    ap.add_argument("--out", default="prefill.json")
    a = ap.parse_args()
    global DEV
    if a.small and not torch.cuda.is_available():
        DEV = e2e.DEVICE = "cpu"
        a.skip_capacity = True
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cap_out = out.with_name(out.name.replace("prefill", "capacity"))
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    meta = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "layers": a.layers, "copy_GBps": copy_bandwidth() / 1e9}
    model = build(a.layers, torch.float32, small=True, device=DEV) if a.small else build(a.layers)
    orig_forward = model.forward
    if not a.skip_prefill:
        mask_check = causal_mask_check() if not a.small else None
        res = dict(meta, budget=a.budget, causal_mask_check=mask_check, rows=[])
        print(json.dumps(res["causal_mask_check"]), flush=True)
        for shape in a.shapes.split(","):
            B, n = (int(x) for x in shape.split("x"))
            row = prefill_row(model, orig_forward, B, n, a.budget, a.reps, not a.skip_compiled)
            row["device"] = device
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(res, indent=1))
        shapes = "tiny fp32 model" if a.small else "Llama-3.1-8B shapes"
        lines = [f"# Prefill, {device}, {shapes} × {a.layers} layers, budget {a.budget}", "",
                 "| batch × context | eager ms | compiled ms | adakv ms | adakv / eager | scoring+alloc+compaction "
                 "alone, ms (share) | what compression adds to the prefill, ms (share) | peak GB eager / compiled / "
                 "adakv |", "|---|---|---|---|---|---|---|---|"]
        f = lambda x, s=".0f": (format(x, s) if isinstance(x, (int, float))  # noqa: E731
                                else x if isinstance(x, str) else "OOM")
        for r in res["rows"]:
            ratio = (f"{r['adakv_prefill_ms'] / r['eager_prefill_ms']:.2f}×"
                     if r.get("adakv_prefill_ms") and r.get("eager_prefill_ms") else "—")
            lines.append(f"| {r['batch']} × {r['context']} | {f(r['eager_prefill_ms'])} | {f(r.get('compiled_prefill_ms'))} "
                         f"| {f(r['adakv_prefill_ms'])} | {ratio} | {f(r['compress_ms'], '.1f')} "
                         f"({f(100 * r.get('compress_share', 0), '.1f')} %) | {f(r.get('compress_in_prefill_ms'), '.1f')} "
                         f"({f(100 * r.get('compress_share_in_prefill', 0), '.1f')} %) | {f(r['eager_peak_gb'], '.1f')} / "
                         f"{f(r.get('compiled_peak_gb'), '.1f')} / {f(r['adakv_peak_gb'], '.1f')} |")
        out.with_suffix(".md").write_text(md_header(device) + "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        plot_prefill(res, out.with_suffix(".png"))
    if not a.skip_capacity:
        cap = dict(meta, context=a.capacity_context, rows=[])
        for b in a.capacity_budgets.split(","):
            budget = None if b == "full" else int(b)
            row = capacity_row(model, orig_forward, a.capacity_context, budget, a.steps, free_margin_gb=4.0)
            row["device"] = device
            row["method"] = "StaticCache full + reduce-overhead" if budget is None else f"adakv-{budget}"
            cap["rows"].append(row)
            print(json.dumps(row), flush=True)
            cap_out.write_text(json.dumps(cap, indent=1))
        full = next((r for r in cap["rows"] if r["budget"] is None and r.get("max_batch")), None)
        lines = [f"# Capacity at {a.capacity_context} tokens per request, {device}, Llama-3.1-8B shapes × "
                 f"{a.layers} layers", "", "| cache | max batch | × full | decode ms/step | tokens/s | × full |",
                 "|---|---|---|---|---|---|"]
        for r in cap["rows"]:
            if not r.get("max_batch"):
                lines.append(f"| {r['method']} | did not fit | | | | |")
                continue
            xb = f"{r['max_batch'] / full['max_batch']:.1f}×" if full else "—"
            xt = f"{r['tokens_per_s'] / full['tokens_per_s']:.1f}×" if full else "—"
            lines.append(f"| {r['method']} | {r['max_batch']} | {xb} | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {xt} |")
        cap_out.with_suffix(".md").write_text(md_header(device) + "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            rows = [r for r in cap["rows"] if r.get("max_batch")]
            fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
            ax[0].bar([r["method"].split(" ")[0] for r in rows], [r["max_batch"] for r in rows])
            ax[0].set_ylabel(f"max batch of {a.capacity_context // 1024}k requests")
            ax[1].bar([r["method"].split(" ")[0] for r in rows], [r["tokens_per_s"] for r in rows])
            ax[1].set_ylabel("decode tokens/s at that batch")
            fig.suptitle(device)
            fig.tight_layout()
            fig.savefig(cap_out.with_suffix(".png"), dpi=110, metadata=png_metadata(device))
        except Exception as e:
            print("plot failed:", e)


if __name__ == "__main__":
    main()
