"""Where a fast-path decode step goes, per layer: kernels, GPU time by kind, GEMM bandwidth vs copy.

Profiles ``--steps`` decode steps of the adakv fast path (AdaKVCache, CUDA-graph replay; CUPTI sees the
kernels inside the graphs) for each method — ``adakv`` (linears merged), ``adakv_nomerge`` and ``adakv_gemv`` (merged, Triton GEMV) — on
Llama-3.1-8B shapes, and writes per step and per layer: kernel launches, GPU µs by kind (gemm, attention,
append, fused Inductor kernels, other), the GEMMs' effective bandwidth (weight bytes per step / GEMM time)
against the device-to-device copy bandwidth, and the top kernels. This is the before/after table of
docs/design.md ("Decode at 32 layers").

    python bench/profile_decode.py --layers 32 --batch 1 --context 8192 --out bench/results/profile-decode-32L-h200.json
    python bench/profile_decode.py --device cpu --small --layers 2 --context 256 --budget 64 --steps 2 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from stamp import md_header  # noqa: E402
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402

KINDS = (("gemm", ("gemm", "gemv", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "splitk", "aten::mm",
                   "aten::addmm", "aten::linear")),
         ("attention", ("_store_attn", "attn_merge", "_merge")),
         ("append", ("_static_append", "append")),
         ("fused", ("triton_", "cpp_fused")))


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def _time_us(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total", "self_cpu_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def profile_method(name: str, model, orig_forward, ids, budget: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    kw = cache_kwarg(model)
    backend = adakv_backend(AdaKVConfig(budget=budget, **e2e.ADAKV_FAST[name]))
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=3 * steps + 16)
    fwd = torch.compile(orig_forward, backend=backend)

    def step(tok):
        return fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

    cuda = e2e.DEVICE == "cuda"
    with torch.no_grad():
        tok = fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1:].argmax(-1)
        for _ in range(4):
            tok = step(tok)
        ms, ms_synced = e2e.decode_loop(fwd, kw, cache, tok, steps, 2)
        e2e._sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                tok = step(tok)
            e2e._sync()
    per_kind = defaultdict(lambda: {"count": 0, "us": 0.0})
    kernels = []
    for evt in prof.key_averages():
        on_device = str(getattr(evt, "device_type", "")).endswith("CUDA")
        if cuda and not on_device:
            continue
        if not cuda and not (evt.key.startswith("aten::mm") or evt.key.startswith("aten::addmm")
                             or evt.key.startswith("adakv::") or evt.key.startswith("aten::bmm")):
            continue  # CPU smoke mode: a few recognisable ops stand in for kernels
        k = kind(evt.key)
        us = _time_us(evt)
        per_kind[k]["count"] += evt.count
        per_kind[k]["us"] += us
        kernels.append((us, evt.count, evt.key[:90], k))
    layers = model.config.num_hidden_layers
    total_us = sum(v["us"] for v in per_kind.values())
    total_n = sum(v["count"] for v in per_kind.values())
    row = dict(method=name, ms=ms, ms_synced=ms_synced, steps=steps,
               kernels_per_step=total_n / steps, kernels_per_layer=total_n / steps / layers,
               gpu_us_per_step=total_us / steps, gpu_us_per_layer=total_us / steps / layers,
               kinds={k: {"per_step": v["count"] / steps, "per_layer": v["count"] / steps / layers,
                          "us_per_step": v["us"] / steps, "us_per_layer": v["us"] / steps / layers}
                      for k, v in sorted(per_kind.items())},
               top=[dict(us_per_step=us / steps, per_step=n / steps, name=nm, kind=k)
                    for us, n, nm, k in sorted(kernels, reverse=True)[:20]],
               merged_linears=[len(g.get("merged_linears", [])) for g in backend.graphs])
    del cache, fwd
    torch._dynamo.reset()
    return row


def write(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=1))
    bw = res["copy_GBps"]
    lines = [f"# Decode step per layer, {res['device']}", "",
             f"{res['layers']} layers, {res['batch']} × {res['context']}, budget {res['budget']}; weights "
             f"{res['weight_bytes'] / 1e9:.2f} GB (GEMM-read {res['gemm_bytes'] / 1e9:.2f} GB), copy {bw:.0f} GB/s, "
             f"floor {res['floor_ms']:.2f} ms", "",
             "| method | ms/token | kernels / layer | GPU µs / layer | gemm µs / layer | gemm GB/s (% copy) | "
             "attention µs / layer | append µs / layer | fused µs / layer | other µs / layer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        kd = r["kinds"]

        def us(k):
            return f"{kd[k]['us_per_layer']:.1f}" if k in kd else "—"
        g_us = kd.get("gemm", {}).get("us_per_step", 0)
        gbs = res["gemm_bytes"] / (g_us * 1e-6) / 1e9 if g_us else 0
        lines.append(f"| {r['method']} | {r['ms']:.2f} | {r['kernels_per_layer']:.1f} | {r['gpu_us_per_layer']:.1f} | "
                     f"{us('gemm')} | {gbs:.0f} ({100 * gbs / bw:.0f} %) | {us('attention')} | {us('append')} | "
                     f"{us('fused')} | {us('other')} |")
    for r in res["rows"]:
        lines += ["", f"## {r['method']}: top kernels (µs and launches per step)", "", "| µs | n | kind | kernel |",
                  "|---|---|---|---|"]
        lines += [f"| {t['us_per_step']:.1f} | {t['per_step']:.0f} | {t['kind']} | `{t['name']}` |" for t in r["top"]]
    out.with_suffix(".md").write_text(md_header(res["device"]) + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default="adakv_nomerge,adakv")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default="bench/results/profile-decode.json")
    a = ap.parse_args()
    e2e.DEVICE = a.device
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bw = e2e.copy_bandwidth()
    model = e2e.build(a.layers, torch.bfloat16 if a.device == "cuda" else torch.float32, small=a.small)
    orig_forward = model.forward
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    gemm_bytes = wbytes - emb.numel() * emb.element_size() * (emb is not model.get_output_embeddings().weight)
    res = dict(device=card, torch=torch.__version__, layers=a.layers, batch=a.batch, context=a.context,
               budget=a.budget, copy_GBps=bw / 1e9, weight_bytes=wbytes, gemm_bytes=gemm_bytes,
               floor_ms=gemm_bytes / bw * 1e3, rows=[])
    ids = torch.randint(1, model.config.vocab_size, (a.batch, a.context), device=a.device)
    for name in a.methods.split(","):
        row = profile_method(name, model, orig_forward, ids, a.budget, a.steps)
        res["rows"].append(row)
        print(f"{name:<14} {row['ms']:.2f} ms/token  {row['kernels_per_layer']:.1f} kernels/layer  "
              f"{row['gpu_us_per_layer']:.1f} µs/layer  " +
              "  ".join(f"{k} {v['per_layer']:.1f}x {v['us_per_layer']:.1f}µs" for k, v in row["kinds"].items()),
              flush=True)
        write(res, out)


if __name__ == "__main__":
    main()
