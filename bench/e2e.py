"""End-to-end decode on the GPU: Llama-3.1-8B shapes cut to N layers (random bf16 weights).

Measures, in one process and on one card, time per output token and KV bytes for:
  hf-eager      uncompiled HF model, DynamicCache (the baseline users have)
  compile-full  plain torch.compile (Inductor), DynamicCache            (--with-plain-compile)
  adakv-B       adakv backend (Inductor + Triton store kernels), budget B
  adakv-B-plain the same compiled graphs with the plain-PyTorch store path (ADAKV_KERNELS=plain)
and the weight-read floor (weight bytes / measured copy bandwidth), the ceiling of any decoder.

    python bench/e2e.py --batch 8 --context 8192 --budget 1024 --out bench/results/e2e-h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.kernels import store  # noqa: E402


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        t.append(s.elapsed_time(e) / 1e3)
    return 2 * x.numel() / statistics.median(t)


def build(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def kv_bytes(cache) -> int:
    return sum(store.store_bytes(l.keys) + store.store_bytes(l.values) for l in cache.layers)


def decode(fn, model, ids, steps: int, warm: int):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(warm + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            if i >= warm:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, kv_bytes(cache)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--with-plain-compile", action="store_true")
    ap.add_argument("--out", default="e2e.json")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformers": transformers.__version__, "args": vars(a), "runs": {}}
    bw = copy_bandwidth()
    model = build(a.layers)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["copy_bandwidth_GBps"] = bw / 1e9
    res["weight_bytes"] = wbytes
    res["weight_floor_ms"] = wbytes / bw * 1e3
    print(f"copy {bw / 1e9:.0f} GB/s; weights {wbytes / 1e9:.2f} GB; floor {res['weight_floor_ms']:.2f} ms/token",
          flush=True)
    ids = torch.randint(0, 128256, (a.batch, a.context), device="cuda")
    runs = [("hf-eager", None, None)]
    if a.with_plain_compile:
        runs.append(("compile-full", "plain", None))
    runs += [(f"adakv-{a.budget}", "adakv", "triton"), (f"adakv-{a.budget}-plain", "adakv-same", "plain")]
    backend = None
    fn = model
    for name, how, kern in runs:
        t0 = time.perf_counter()
        if how == "plain":
            torch._dynamo.reset()
            fn = torch.compile(model.forward)
        elif how == "adakv":
            torch._dynamo.reset()
            backend = adakv_backend(AdaKVConfig(budget=a.budget), inner="inductor")
            fn = torch.compile(model.forward, backend=backend)
        if kern:
            os.environ["ADAKV_KERNELS"] = kern
        ms, kvb = decode(fn, model, ids, a.steps, warm=4)
        res["runs"][name] = {"ms_per_token": ms, "kv_bytes": kvb, "wall_s": time.perf_counter() - t0}
        print(f"{name:<22} {ms:8.2f} ms/token  KV {kvb / 1e9:6.3f} GB  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    if backend is not None:
        res["graphs_compiled"] = backend.graphs_compiled
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
