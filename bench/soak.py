"""Serving soak (issue 16): thousands of requests of mixed lengths through one ``Server`` (prefill alone,
load into a fixed slot, decode together, free), bad calls mixed in, for >= ``--min-steps`` decode steps.

Measured after a warm-up (one request at the shortest and one at the longest prompt, one request decoded
alone, one bad call of each kind):
- ``recompiles_after_warmup``: graphs the adakv backend compiled after warm-up (+ Dynamo's unique-graph
  counter, which also counts graphs of other backends);
- ``rerecords_after_warmup``: CUDA graphs recorded after warm-up (Inductor cudagraph trees);
- ``memory_drift_pct``: device memory allocated at the end vs after warm-up (CPU: the process RSS);
- ``equal_to_alone``: the fraction of checked requests (every ``--check-every``-th) whose tokens equal the
  same request decoded alone (batch 1, no slots). fp32: greedy and sampled tokens must be equal. bf16
  (batch shapes change GEMM rounding): a request also counts as equal when its tokens diverge only after a
  step whose logits were within ``--logit-tol`` (max |difference|) of the alone run up to and including
  the first divergent step (a near-tie flipped); the first divergences are listed.

GPU (H200, ~7 min with compiling):  python -m bench.soak --model 8b --layers 2 --dtype float32 --out bench/results/soak-h200.json
CPU smoke:           python -m bench.soak --small --device cpu --requests 12 --min-steps 30 --out /tmp/soak.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also as bench.soak)
from e2e import Recordings, unique_graphs  # noqa: E402  (one CUDA-graph recorder for the benches)


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.small:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    elif args.model == "8b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0)
    else:
        raise SystemExit(f"--model {args.model!r}: only 8b (Llama-3.1-8B shapes, random weights)")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def memory(device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()}"


def compare(batched, alone, tol: float, exact: bool) -> dict:
    """Tokens equal? Else the first divergent step and the largest logit difference up to it."""
    a, b = batched.tokens, alone.tokens
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    upto = len(a) if first is None else first + 1
    diffs = [float((x - y).abs().max()) for x, y in zip(batched.logits[:upto], alone.logits[:upto])]
    worst = max(diffs, default=0.0)
    ok = first is None or (not exact and worst <= tol)
    return {"id": batched.id, "equal_tokens": first is None, "equal": ok, "first_divergence": first,
            "max_logit_diff": worst, "tokens": len(a)}


class Traffic:
    """Requests of mixed prompt lengths, lengths and sampling settings (half greedy), from one seed."""

    def __init__(self, args, vocab):
        self.g = torch.Generator().manual_seed(args.seed)
        self.args, self.vocab, self.n = args, vocab, 0

    def request(self, prompt_len=None, check=False):
        from adakv_compile.serve import Request

        a, g = self.args, self.g
        n = prompt_len or int(torch.randint(a.prompt_min, a.prompt_max + 1, (), generator=g))
        kind = self.n % 4
        r = Request(prompt=torch.randint(3, self.vocab, (n,), generator=g),
                    max_new_tokens=int(torch.randint(1, a.max_new + 1, (), generator=g)),
                    temperature=0.0 if kind in (0, 2) else 0.8, top_k=50 if kind == 1 else 0,
                    top_p=0.9 if kind == 3 else 1.0, seed=a.seed * 100003 + self.n, eos_token_id=2,
                    id=self.n, record_logits=check)
        self.n += 1
        return r


def bad_calls(server, model, other_cache, traffic):
    """One bad call of each kind, through the model (refused before tracing) and the server."""
    from adakv_compile import RequestError
    from adakv_compile.serve import Request

    kw, dev = server.kw, server.device
    ids = torch.randint(3, traffic.vocab, (1, 16), generator=traffic.g).to(dev)
    longer = torch.randint(3, traffic.vocab, (server.max_batch, server.room + 1), generator=traffic.g).to(dev)
    calls = {
        "wrong_batch": lambda: model(input_ids=ids[:, :8].repeat(2, 1), use_cache=True, **{kw: server.prefill_cache}),
        "empty_prompt": lambda: model(input_ids=ids[:, :0], use_cache=True, **{kw: server.prefill_cache}),
        "used_cache": lambda: model(input_ids=longer, use_cache=True, **{kw: server.cache}),  # a 2nd prefill
        "other_config": lambda: model(input_ids=ids, use_cache=True, **{kw: other_cache}),
        "too_many_new": lambda: server.submit(Request(prompt=ids[0].cpu(), max_new_tokens=server.room + 5)),
        "bad_sampling": lambda: server.submit(Request(prompt=ids[0].cpu(), max_new_tokens=2, top_p=0.0)),
    }
    refused = {}
    for name, call in calls.items():
        try:
            with torch.no_grad():
                call()
        except RequestError:
            refused[name] = 1
        else:
            raise SystemExit(f"bad call {name!r} was not refused")
    return refused


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=2000, help="finish at least this many requests")
    ap.add_argument("--min-steps", type=int, default=20000, help="and run at least this many decode steps")
    ap.add_argument("--check-every", type=int, default=25, help="decode every N-th request alone too")
    ap.add_argument("--bad-every", type=int, default=50, help="a round of bad calls every N requests")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds of soak after warm-up, at most")
    ap.add_argument("--logit-tol", type=float, default=None,
                    help="bf16/fp16: max |logit difference| a near-tie flip may follow (default 0.125; fp32: exact)")
    ap.add_argument("--inner", default=None, help="inner compiler (default inductor; eager on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--small", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
    from adakv_compile.serve import Server

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    exact = dtype == torch.float32
    tol = 0.0 if exact else (0.125 if args.logit_tol is None else args.logit_tol)
    inner = args.inner or ("inductor" if device.type == "cuda" else "eager")
    model = build(args, device, dtype)
    cfg = AdaKVConfig(budget=args.budget, window=args.window)
    backend = compile_model(model, cfg, inner=inner)
    server = Server(model, backend, max_batch=args.max_batch, max_new_tokens=args.max_new)
    other = AdaKVCache(model, AdaKVConfig(budget=args.budget + 8, window=args.window), batch_size=1,
                       max_new_tokens=2)
    traffic = Traffic(args, model.config.vocab_size)
    t0 = time.perf_counter()
    rec = Recordings().__enter__() if device.type == "cuda" and inner == "inductor" else None
    # warm-up: both ends of the prompt range, a full batch, requests alone between batched steps (which
    # decode graph Dynamo picks may depend on the order the variants were seen), every bad call
    warm = [traffic.request(args.prompt_min), traffic.request(args.prompt_max)]
    warm += [traffic.request() for _ in range(args.max_batch)]
    server.run(warm)
    server.generate_alone(warm[0])
    server.run([traffic.request() for _ in range(args.max_batch)])
    server.generate_alone(warm[1])
    refused = bad_calls(server, model, other, traffic)
    server.run([traffic.request() for _ in range(2)])
    server.finished.clear()
    warm_s = time.perf_counter() - t0
    graphs0, unique0, rec0 = backend.graphs_compiled, unique_graphs(), rec.n if rec else 0
    mem0, steps0 = memory(device), server.steps
    print(f"warm-up {warm_s:.1f} s: {graphs0} graphs compiled, {rec0} CUDA graphs recorded, "
          f"{mem0 / 2**20:.1f} MiB", flush=True)

    done, checks, mem_trace = 0, [], []
    t1 = time.perf_counter()
    last_print = t1
    while True:
        steps = server.steps - steps0
        elapsed = time.perf_counter() - t1
        if (done >= args.requests and steps >= args.min_steps) or elapsed > args.time_limit:
            break
        while len(server.queue) < args.max_batch:
            n = traffic.n
            server.submit(traffic.request(check=n % args.check_every == 0))
            if n % args.bad_every == args.bad_every - 1:
                for k, v in bad_calls(server, model, other, traffic).items():
                    refused[k] = refused.get(k, 0) + v
        for r in server.step():
            done += 1
            if r.record_logits:
                checks.append(compare(r, server.generate_alone(r), tol, exact))
                r.logits.clear()
        server.finished.clear()
        if steps % 1000 == 0:
            mem_trace.append(memory(device))
        if time.perf_counter() - last_print > 30:
            last_print = time.perf_counter()
            print(f"{elapsed:6.0f} s: {done} requests, {steps} steps, {backend.graphs_compiled - graphs0} "
                  f"recompiles, {sum(c['equal'] for c in checks)}/{len(checks)} equal to alone", flush=True)
    wall = time.perf_counter() - t1
    while server.busy:  # drain (not counted in wall time)
        for r in server.step():
            done += 1
            if r.record_logits:
                checks.append(compare(r, server.generate_alone(r), tol, exact))
        server.finished.clear()
    if rec:
        rec.__exit__()
    mem1 = memory(device)
    steps = server.steps - steps0
    res = {
        "device": device_name(device), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "python": sys.version.split()[0],
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "tiny" if args.small else f"llama-{args.model}-shapes, {args.layers} layers, random weights",
        "dtype": args.dtype, "inner": inner, "budget": args.budget, "window": args.window,
        "max_batch": args.max_batch, "max_new": args.max_new, "prompt_range": [args.prompt_min, args.prompt_max],
        "requests": done, "steps": steps, "wall_s": round(wall, 1), "warmup_s": round(warm_s, 1),
        "steps_per_s": round(steps / max(wall, 1e-9), 1),
        "complete": done >= args.requests and steps >= args.min_steps,
        "graphs_compiled_in_warmup": graphs0, "cuda_graphs_recorded_in_warmup": rec0,
        "recompiles_after_warmup": max(backend.graphs_compiled - graphs0, unique_graphs() - unique0),
        "rerecords_after_warmup": (rec.n - rec0) if rec else 0,
        "memory_warm_bytes": mem0, "memory_end_bytes": mem1,
        "memory_max_bytes": max(mem_trace + [mem0, mem1]),
        "memory_drift_pct": round(100.0 * (mem1 - mem0) / max(mem0, 1), 3),
        "memory_measure": "torch.cuda.memory_allocated" if device.type == "cuda" else "process RSS",
        "checked": len(checks),
        "equal_to_alone": round(sum(c["equal"] for c in checks) / max(len(checks), 1), 4),
        "tokens_equal_to_alone": round(sum(c["equal_tokens"] for c in checks) / max(len(checks), 1), 4),
        "logit_tolerance": tol, "equality_rule": "tokens equal" if exact else
        f"tokens equal, or max |logit diff| <= {tol} up to and including the first divergent step",
        "max_logit_diff": max((c["max_logit_diff"] for c in checks), default=0.0),
        "first_divergences": [c for c in checks if not c["equal_tokens"]][:20],
        "bad_calls_refused": refused,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "first_divergences"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
