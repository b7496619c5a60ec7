"""The documented serving loop (README, "Serving loop"): continuous batching with ``adakv_compile.serve.Server``.

Requests of mixed prompt lengths, each with its own sampling settings and seed, stream into a server of
``--max-batch`` fixed rows: each is prefilled alone (compressed), copied into a free row, decoded with the
others, and its row is freed when it stops (EOS or its max_new_tokens). Prints each request's tokens, the
graphs compiled (2: one prefill for every prompt length, one decode) and checks a few requests against
themselves decoded alone.

    python -m bench.serve_loop                       # tiny random Llama on the CPU, ~1 min
    python -m bench.serve_loop --model PATH --device cuda --requests 64 --max-batch 16
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a local HF causal LM (default: a tiny random Llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--requests", type=int, default=14)
    ap.add_argument("--prompt-min", type=int, default=60)
    ap.add_argument("--prompt-max", type=int, default=300)
    ap.add_argument("--inner", default=None, help="default: inductor on CUDA, eager on the CPU")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
    from adakv_compile.serve import Request, Server

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        model = model.to(args.device).eval()
    inner = args.inner or ("inductor" if args.device.startswith("cuda") else "eager")
    cfg = AdaKVConfig(budget=args.budget, window=args.window)
    backend = compile_model(model, cfg, inner=inner)
    fits = AdaKVCache.max_batch(model, cfg, max_new_tokens=args.max_new)          # rows that fit now
    print(f"{AdaKVCache.bytes_per_row(model, cfg, args.max_new)} bytes per row; {fits} rows would fit")
    eos = getattr(model.generation_config, "eos_token_id", None)
    server = Server(model, backend, max_batch=min(args.max_batch, fits), max_new_tokens=args.max_new,
                    eos_token_id=eos)

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    reqs = []
    for i in range(args.requests):
        n = int(torch.randint(args.prompt_min, args.prompt_max + 1, (), generator=g))
        reqs.append(Request(prompt=torch.randint(3, vocab, (n,), generator=g), max_new_tokens=args.max_new,
                            temperature=0.0 if i % 2 == 0 else 0.7, top_p=0.9, top_k=40, seed=i, id=i))
    t0 = time.perf_counter()
    pending = list(reqs)
    while pending or server.busy:            # requests arrive while others decode
        if pending:
            server.submit(pending.pop(0))
        for r in server.step():
            print(f"request {r.id:3d}: {r.finish_reason:6s} {r.tokens}")
    print(f"{len(reqs)} requests, {server.steps} decode steps in {time.perf_counter() - t0:.1f} s; "
          f"{backend.graphs_compiled} graphs compiled")
    same = [server.generate_alone(r).tokens == r.tokens for r in reqs[:4]]
    print(f"equal to the request decoded alone: {sum(same)}/{len(same)}")


if __name__ == "__main__":
    main()
