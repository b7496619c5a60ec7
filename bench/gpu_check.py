"""One-call check on the GPU machine (torch 2.11 + transformers 5.17 there): the pass on that stack's
graphs (repeat_kv + explicit masks), the plain path on CUDA tensors, and a first decode timing.

    python bench/gpu_check.py --out bench/results/gpu-check-<card>.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.kernels import store  # noqa: E402


def tiny(device, dtype, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def gen(model, ids, am, n, backend=None, plain=False):
    m = model
    if backend is not None:
        m.forward = torch.compile(m.forward.__func__.__get__(m), backend=backend)
    elif plain:
        m.forward = torch.compile(m.forward.__func__.__get__(m))
    out = m.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False,
                     return_dict_in_generate=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--no-timing", action="store_true", help="checks only (skip the decode timing)")
    args = ap.parse_args()
    dev = "cuda"
    res = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0), "python": platform.python_version(), "checks": {}}
    print(res)
    # 1) exact mode == plain torch.compile, fp32, Inductor, padded batch
    model = tiny(dev, torch.float32)
    ids = torch.randint(1, 256, (2, 48), device=dev)
    am = torch.ones_like(ids)
    am[1, :10] = 0
    torch._dynamo.reset()
    plain = gen(model, ids, am, 8, plain=True).sequences
    del model.forward
    torch._dynamo.reset()
    b = adakv_backend(AdaKVConfig(), inner="inductor")
    ours = gen(model, ids, am, 8, backend=b).sequences
    del model.forward
    res["checks"]["exact_equals_plain_compile"] = plain.tolist() == ours.tolist()
    res["report_exact"] = [str(r) for r in b.report]
    print(b.report.table())
    # 2) compression on CUDA, bf16, Inductor
    torch._dynamo.reset()
    model = tiny(dev, torch.bfloat16, layers=4)
    b = adakv_backend(AdaKVConfig(budget=64, window=16), inner="inductor")
    ids = torch.randint(1, 256, (3, 400), device=dev)
    am = torch.ones_like(ids)
    am[1, :150] = 0
    am[2, :380] = 0
    out = gen(model, ids, am, 16, backend=b)
    kv = out.past_key_values.layers[0].keys
    lens = [[len(x) for x in r] for r in store.unpack(kv)]
    res["checks"]["compressed_lengths_layer0"] = lens
    res["checks"]["store_is_view"] = store.is_store_view(kv)
    res["report_compress"] = [str(r) for r in b.report]
    print(b.report.table())
    print("lengths", lens)
    # 2b) compiled (Inductor + Triton kernels on CUDA) == eager reference generator, fp32, padded batch
    from adakv_compile.reference import ReferenceSession
    torch._dynamo.reset()
    cfg = AdaKVConfig(budget=48, window=8)
    ids = torch.randint(1, 256, (3, 300), device=dev)
    am = torch.ones_like(ids)
    am[1, :100] = 0
    am[2, :280] = 0
    ref_model = tiny(dev, torch.float32, layers=3, seed=1)
    ref_model.generation_config.eos_token_id = None
    ref = ReferenceSession(ref_model, cfg).generate(ids, attention_mask=am, max_new_tokens=12)
    model = tiny(dev, torch.float32, layers=3, seed=1)
    model.generation_config.eos_token_id = None
    model.forward = torch.compile(model.forward, backend=adakv_backend(cfg, inner="inductor"))
    got = model.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False)
    res["checks"]["cuda_triton_equals_reference_generator"] = got.tolist() == ref.tolist()
    print("cuda == reference:", res["checks"]["cuda_triton_equals_reference_generator"])
    # 3) timing: decode step, compressed vs full (exact backend), batch 8, 4k prompt, 4 layers bf16
    import os
    timings = () if args.no_timing else (("full", AdaKVConfig(), "triton"),
                                         ("adakv-512", AdaKVConfig(budget=512), "triton"),
                                         ("adakv-512-plain", AdaKVConfig(budget=512), "plain"))
    for name, cfg, kern in timings:
        os.environ["ADAKV_KERNELS"] = kern
        torch._dynamo.reset()
        model = tiny(dev, torch.bfloat16, layers=4)
        bk = adakv_backend(cfg, inner="inductor")
        model.forward = torch.compile(model.forward, backend=bk)
        ids = torch.randint(1, 256, (8, 4096), device=dev)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            o = model(input_ids=ids, past_key_values=cache, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)
            times = []
            for i in range(40):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                o = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = o.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        kv_bytes = sum(store.store_bytes(l.keys) + store.store_bytes(l.values) for l in cache.layers)
        res["checks"][f"decode_ms_{name}"] = sorted(times[10:])[len(times[10:]) // 2] * 1e3
        res["checks"][f"kv_bytes_{name}"] = kv_bytes
        print(name, res["checks"][f"decode_ms_{name}"], "ms/step", kv_bytes, "bytes")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["checks"], indent=1))


if __name__ == "__main__":
    main()
