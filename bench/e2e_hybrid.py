"""End-to-end decode of hybrid architectures: Gemma-3-like (5 sliding + 1 global layer) and gpt-oss-like
(attention sinks, alternating sliding / full layers) shapes, random bf16 weights, one card.

Per arch and shape (batch x context), time per output token (median over --steps decode steps, CUDA events
between step starts, no host sync) for:
  floor      weight bytes / device-to-device copy bandwidth measured in this run (no decoder is faster)
  static_ro  HF StaticCache (sliding layers as StaticSlidingWindowLayer) + torch.compile(mode="reduce-overhead")
  adakv      adakv fast path: AdaKVCache (compacted global layers, sliding-window rings) + adakv backend

    python bench/e2e_hybrid.py --check --arch gemma3,gpt-oss --out bench/results/e2e-hybrid-h200.json
    python bench/e2e_hybrid.py --small --arch gemma3,gpt-oss --out /tmp/e2e-hybrid-cpu.json   # CPU, tiny

Shapes: ``gemma3`` = Gemma-3-12B attention (hidden 3840, 16 q / 8 KV heads, head_dim 256, window 1024,
intermediate 15360, vocab 262144 tied: 2.0 GB LM head), 6 layers = 5 sliding + 1 global; ``gpt-oss`` =
gpt-oss-20b attention (hidden 2880, 64 q / 8 KV heads, head_dim 64, window 128, sinks) with 4 experts all
active (so the floor counts every weight), 6 layers alternating sliding / full. Rows carry ``arch``.
``--check`` first verifies each arch's fast path on a small fp32 model: greedy tokens equal the eager
oracle (ReferenceSession), every attention rewritten, decode graphs replayed as CUDA graphs.
gpt-oss uses eager attention (HF's only exact kernel for sinks); its static_ro prefill materialises the
[heads, n, n] scores, so its default shape is 1x8192.
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
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import md_header  # noqa: E402
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend, compile_model  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402

DEFAULT_SHAPES = {"gemma3": "1x8192,1x32768,8x8192", "gpt-oss": "1x8192,4x8192"}


def config(arch: str, layers: int, small: bool):
    if arch == "gemma3":
        kinds = ["sliding_attention"] * 5 + ["full_attention"]
        types = [kinds[i % 6] for i in range(layers)]
        if small:
            kw = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, sliding_window=64, query_pre_attn_scalar=32)
        else:
            kw = dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256)
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=layers, layer_types=types,
                                            max_position_embeddings=131072, **kw)
        return cfg, transformers.Gemma3ForCausalLM
    if arch == "gpt-oss":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if small:
            kw = dict(vocab_size=512, hidden_size=128, intermediate_size=128, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, sliding_window=32)
        else:
            kw = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=64, sliding_window=128)
        cfg = transformers.GptOssConfig(num_hidden_layers=layers, layer_types=types, num_local_experts=4,
                                        num_experts_per_tok=4, max_position_embeddings=131072, **kw)
        cfg._attn_implementation = "eager"
        return cfg, transformers.GptOssForCausalLM
    raise ValueError(f"--arch {arch!r}: gemma3 or gpt-oss")


def build(arch: str, layers: int, dtype, device, small: bool = False):
    torch.manual_seed(0)
    cfg, cls = config(arch, layers, small)
    model = instantiate(cls, cfg, dtype, device, sinks=arch == "gpt-oss")
    model.generation_config.pad_token_id = 0
    return model


def instantiate(cls, cfg, dtype, device, sinks: bool = False):
    """A random model for generation (no EOS); ``sinks``: gpt-oss's learned sinks drawn from N(0, 1) (they are
    initialised to zero, which would not exercise them)."""
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    if sinks:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1.0)
    model.generation_config.eos_token_id = None
    return model


def copy_bandwidth(device) -> float:
    """The card's copy bandwidth (bytes/s, bench/e2e.py's measurement); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    import e2e
    return e2e.copy_bandwidth()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(name, model, orig_forward, ids, budget, steps, warm) -> dict:
    kw = cache_kwarg(model)
    device = ids.device
    B, n = ids.shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    backend = None
    if name == "static_ro":
        cache = StaticCache(config=model.config, max_cache_len=n + warm + steps + 8)
        fwd = torch.compile(orig_forward, mode="reduce-overhead")
        prefill = orig_forward  # HF's recipe: eager prefill, compiled decode
    elif name == "adakv":
        backend = adakv_backend(AdaKVConfig(budget=budget))
        cache = AdaKVCache(model, backend, batch_size=B, max_new_tokens=warm + steps + 8)
        fwd = prefill = torch.compile(orig_forward, backend=backend)
    else:
        raise ValueError(name)

    def step(tok):
        return fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = prefill(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        _sync(device)
        prefill_s = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(warm):
            tok = step(tok)
        _sync(device)
        if device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            for i in range(steps):
                events[i].record()
                tok = step(tok)
            events[steps].record()
            torch.cuda.synchronize()
            ms = statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(steps))
        else:
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                tok = step(tok)
                times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times)
    row = dict(ms=ms, prefill_s=prefill_s)
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if name == "adakv":
        row["kv_bytes"] = cache.nbytes()
        row["cudagraphs"] = [g.get("cudagraphs") for g in backend.graphs]
        row["modes"] = sorted({r.mode for r in backend.report})
    else:
        row["kv_bytes"] = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    del cache, fwd, out
    torch._dynamo.reset()
    return row


def check(arch: str, device) -> dict:
    """Small fp32 model: fast-path greedy tokens == the eager oracle; every attention rewritten."""
    from adakv_compile.reference import ReferenceSession

    model = build(arch, 6, torch.float32, device, small=True)
    ref_model = build(arch, 6, torch.float32, device, small=True)
    cfg = AdaKVConfig(budget=48, window=8)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, 512, (2, 200), device=device, generator=g)
    am = torch.ones_like(ids)
    am[1, :70] = 0
    ids = ids * am
    want = ReferenceSession(ref_model, cfg).generate(ids, attention_mask=am, max_new_tokens=12)[:, -12:]
    backend = compile_model(model, cfg)
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=12)
    got = model.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -12:]
    res = dict(arch=arch, tokens_equal_reference=bool(torch.equal(got.cpu(), want.cpu())),
               token_agreement=float((got.cpu() == want.cpu()).float().mean()),
               all_rewritten=all(r.action == "rewritten" for r in backend.report),
               modes=sorted({r.mode for r in backend.report}),
               cudagraphs=[gr.get("cudagraphs") for gr in backend.graphs])
    print("check:", json.dumps(res), flush=True)
    torch._dynamo.reset()
    return res


def write_outputs(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=1))
    lines = [md_header(res["device"]), "| arch | layers | batch x context | floor ms | static_ro ms | adakv ms | "
             "adakv / floor | adakv / static_ro | KV adakv / static |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        a, s = r.get("adakv_ms"), r.get("static_ro_ms")
        kv = (r["methods"].get("adakv", {}).get("kv_bytes"), r["methods"].get("static_ro", {}).get("kv_bytes"))

        def f(x, p=2):
            return "-" if x is None or x != x else f"{x:.{p}f}"
        lines.append(f"| {r['arch']} | {r['layers']} | {r['batch']}x{r['context']} | {f(r['floor_ms'])} | {f(s)} | "
                     f"{f(a)} | {f(a / r['floor_ms'] if a else None)} | {f(a / s if a and s else None)} | "
                     f"{f(kv[0] / kv[1] if all(kv) else None, 3)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gemma3,gpt-oss")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shapes", default=None, help="e.g. 1x32768,8x8192 (default: per arch)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--methods", default="static_ro,adakv")
    ap.add_argument("--check", action="store_true", help="first verify each arch's fast path (small fp32 model)")
    ap.add_argument("--small", action="store_true", help="tiny models and shapes (runs on the CPU)")
    ap.add_argument("--out", default="e2e-hybrid.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    res = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "budget": a.budget, "steps": a.steps, "rows": [], "checks": []}
    archs = a.arch.split(",")
    if a.check:
        res["checks"] = [check(arch, device) for arch in archs]
    bw = copy_bandwidth(device)
    res["copy_GBps"] = bw / 1e9
    for arch in archs:
        model = build(arch, a.layers, dtype, device, small=a.small)
        orig_forward = model.forward
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = wbytes / bw * 1e3
        print(f"{name} {arch}: weights {wbytes / 1e9:.2f} GB; floor {floor:.2f} ms/token", flush=True)
        shapes = a.shapes or ("1x256,2x256" if a.small else DEFAULT_SHAPES[arch])
        budget = min(a.budget, 64) if a.small else a.budget
        for shape in shapes.split(","):
            B, n = (int(x) for x in shape.split("x"))
            ids = torch.randint(1, model.config.vocab_size, (B, n), device=device)
            row = dict(device=name, arch=arch, layers=a.layers, batch=B, context=n, budget=budget,
                       weight_bytes=wbytes, floor_ms=floor, methods={})
            for meth in a.methods.split(","):
                try:
                    m = run_method(meth, model, orig_forward, ids, budget, a.steps, a.warm)
                except Exception as e:  # record and go on
                    import traceback
                    traceback.print_exc()
                    m = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    torch._dynamo.reset()
                row["methods"][meth] = m
                if "ms" in m:
                    row[f"{meth}_ms"] = m["ms"]
                print(f"{arch:<8} {B:>3}x{n:<6} {meth:<10} " + (f"{m['ms']:8.2f} ms/token  KV {m['kv_bytes'] / 1e9:.3f} GB"
                                                                if "ms" in m else m["error"]), flush=True)
            res["rows"].append(row)
            write_outputs(res, out)
        del model, orig_forward
    write_outputs(res, out)


if __name__ == "__main__":
    main()
