"""Profile adakv decode steps on the GPU (where does the time per token go?).

    python bench/profile_decode.py --batch 8 --context 8192 --budget 1024
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVConfig, adakv_backend  # noqa: E402
from bench.e2e import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", default="profile.txt")
    a = ap.parse_args()
    model = build(a.layers)
    backend = adakv_backend(AdaKVConfig(budget=a.budget), inner="inductor")
    fn = torch.compile(model.forward, backend=backend)
    ids = torch.randint(0, 128256, (a.batch, a.context), device="cuda")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            out = fn(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                out = fn(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    t1 = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    t2 = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    Path(a.out).write_text(t1 + "\n\n" + t2)
    print(t1)
    print(t2)


if __name__ == "__main__":
    main()
