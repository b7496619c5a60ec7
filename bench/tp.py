"""Tensor-parallel decode, capacity and prefill gather cost (issue 11): Llama-3.1-8B shapes, all 32 layers,
random bf16 weights, transformers' ``tp_plan="auto"`` over N GPUs of one host.

    python bench/tp.py --make /tmp/llama8b                                   # once: save the random model
    torchrun --nproc-per-node N bench/tp.py --model /tmp/llama8b --out bench/results/tp-<card>-tpN.json
    (N = 1 runs the same model unsharded, in one process)

Per method (StaticCache full cache + reduce-overhead; adakv-<budget> with AdaKVCache, global allocation):
  decode ms/token at batch 1 with a --context cache (random K/V as a prefill leaves them; CUDA events,
  median of --steps pipelined steps, rank 0's clock);
  the largest batch of --context requests: the cache's bytes per row on each rank (measured from the
  allocated tensors) plus decode activations per row (estimated as in prefill.py), against the free memory
  of the tightest rank after the weights; the cache is then allocated at that batch on every rank (it fits)
  and, with --verify, decode steps run at that batch (tokens/s).
--tp-reserve R sizes every AdaKVCache at R times the even share per rank (``AdaKVCache(tp_reserve=R)``).
Prefill (adakv, 1 x --context, global allocation): wall time, tokens trimmed by the reserve, each rank's kept tokens as a share of its
even share (the imbalance the global top-k creates), and the score all-gather alone (``dist.all_gather``
of [B, Hkv/N, n] fp32 per layer, x layers) at batch 1 and 8.
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
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402

from e2e import build  # noqa: E402
from prefill import cache_nbytes, filled_cache, release  # noqa: E402


def local_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def min_over_ranks(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


def sync_all():
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


TP_RESERVE: dict = {}  # AdaKVCache(tp_reserve=...) when --tp-reserve is given


def make_cache(model, method: str, budget: int, batch: int, n: int, room: int, heads: int):
    if method == "full":
        return filled_cache(model, None, batch, n, room, heads)
    return filled_cache(model, budget, batch, n, room, heads, **TP_RESERVE)


def decode(model, fwd0, method: str, budget: int, batch: int, n: int, steps: int, heads: int) -> dict:
    room = steps + 16
    torch.cuda.reset_peak_memory_stats()
    cache, backend = make_cache(model, method, budget, batch, n, room, heads)
    fwd = (torch.compile(fwd0, mode="reduce-overhead") if method == "full"
           else torch.compile(fwd0, backend=backend))
    kw = cache_kwarg(model)
    tok = torch.randint(1, model.config.vocab_size, (batch, 1), device="cuda")
    if dist.is_initialized():
        dist.broadcast(tok, 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(4):
            tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync_all()
        first_s = time.perf_counter() - t0
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        for i in range(steps):
            ev[i].record()
            tok = fwd(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        ev[steps].record()
        sync_all()
    ms = statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(steps))
    out = dict(method=method, batch=batch, ms_per_token=ms, tokens_per_s=batch / ms * 1e3,
               cache_gb_per_rank=cache_nbytes(cache) / 1e9, warmup_s=first_s,
               peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    if backend is not None:
        out["rewritten"] = sum(r.action == "rewritten" for r in backend.report)
    del cache, fwd
    torch._dynamo.reset()
    release()
    return out


def capacity(model, method: str, budget: int, n: int, steps: int, heads: int, margin_gb: float) -> dict:
    c = model.config
    D = c.hidden_size // c.num_attention_heads
    room = steps + 16
    probe, _ = make_cache(model, method, budget, 1, n, room, heads)
    per_row = cache_nbytes(probe)
    del probe
    release()
    world = dist.get_world_size() if dist.is_initialized() else 1
    hq = c.num_attention_heads // world
    act = c.vocab_size * 6 + c.intermediate_size // world * 8 + c.hidden_size * 32
    if method == "full":  # HF's decode graph (5.17) repeats one layer's K and V to every q head
        act += 2 * hq * (n + room) * D * 2
    free = min_over_ranks(torch.cuda.mem_get_info()[0]) - margin_gb * 1e9
    batch = max(0, int(free // (per_row + act)))
    row = dict(method=method, per_row_bytes_per_rank=per_row, act_per_row_bytes=act, max_batch=batch)
    if batch:
        cache, _ = make_cache(model, method, budget, batch, n, room, heads)  # it fits on every rank
        row["cache_gb_per_rank"] = cache_nbytes(cache) / 1e9
        del cache
        release()
    return row


def gather_ms(heads: int, n: int, batch: int, layers: int, reps: int = 5) -> float:
    if not dist.is_initialized():
        return 0.0
    x = torch.randn(batch, heads, n, device="cuda")
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    for _ in range(2):
        dist.all_gather(parts, x)
    sync_all()
    t0 = time.perf_counter()
    for _ in range(reps * layers):
        dist.all_gather(parts, x)
    sync_all()
    return (time.perf_counter() - t0) / reps * 1e3


def prefill(model, fwd0, budget: int, n: int, reps: int = 2) -> dict:
    """adakv prefill wall time (1 x n, global allocation) and how many tokens each rank's heads kept."""
    backend = adakv_backend(AdaKVConfig(budget=budget))
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=16, **TP_RESERVE)
    fwd = torch.compile(fwd0, backend=backend)
    kw = cache_kwarg(model)
    ids = torch.randint(1, model.config.vocab_size, (1, n), device="cuda")
    if dist.is_initialized():
        dist.broadcast(ids, 0)
    times = []
    for i in range(reps + 1):
        cache.reset()
        sync_all()
        t0 = time.perf_counter()
        with torch.no_grad():
            fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        sync_all()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    kept = torch.stack([layer.lens.to(torch.int64).sum() for layer in cache.layers])  # [L] this rank's heads
    world = dist.get_world_size() if dist.is_initialized() else 1
    every = [torch.empty_like(kept) for _ in range(world)]
    if dist.is_initialized():
        dist.all_gather(every, kept)
    else:
        every = [kept]
    share = torch.stack(every).float() / (cache.layers[0].num_heads * budget)     # [ranks, L], 1 = even share
    out = dict(prefill_ms=statistics.median(times), tp_trimmed=cache.tp_trimmed(), kept_share_max=share.max().item(),
               kept_share_min=share.min().item(), kept_share_per_rank_mean=share.mean(1).tolist(),
               rewritten=sum(r.action == "rewritten" for r in backend.report))
    del cache, fwd
    torch._dynamo.reset()
    release()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", help="save a random Llama-3.1-8B-shaped model (bf16) here and exit")
    ap.add_argument("--layers", type=int, default=32, help="layers of the --make model")
    ap.add_argument("--model")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--margin-gb", type=float, default=6.0)
    ap.add_argument("--parts", default="decode,capacity,prefill")
    ap.add_argument("--verify", action="store_true", help="run decode at the adakv max batch (tokens/s)")
    ap.add_argument("--tp-reserve", type=float, help="AdaKVCache(tp_reserve=...): per-rank reserve in even shares "
                    "(default: the global allocation's worst case)")
    ap.add_argument("--out", default="tp.json")
    a = ap.parse_args()
    if a.make:
        model = build(a.layers)
        model.save_pretrained(a.make, max_shard_size="4GB")
        print("saved", a.make, flush=True)
        return
    if a.tp_reserve is not None:
        TP_RESERVE["tp_reserve"] = a.tp_reserve
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    t0 = time.perf_counter()
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        model = AutoModelForCausalLM.from_pretrained(a.model, tp_plan="auto", dtype=torch.bfloat16).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    c = model.config
    heads = c.num_key_value_heads // world
    res = dict(device=torch.cuda.get_device_name(0), ranks=world, torch=torch.__version__,
               transformers=transformers.__version__, layers=c.num_hidden_layers, context=a.context,
               budget=a.budget, load_s=time.perf_counter() - t0, weights_gb_per_rank=local_bytes(model) / 1e9,
               kv_heads_per_rank=heads, tp_reserve=a.tp_reserve, decode=[], capacity=[])
    fwd0 = model.forward
    out = Path(a.out)

    def save():
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1))
            print(json.dumps(res), flush=True)

    parts = a.parts.split(",")

    def attempt(fn, **tag):
        """Run one measurement; an error is recorded (the other parts still run)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            torch._dynamo.reset()
            release()
            return dict(tag, error=f"{type(e).__name__}: {str(e)[:300]}")

    for method in ("full", "adakv"):
        if "decode" in parts:
            res["decode"].append(attempt(lambda: decode(model, fwd0, method, a.budget, 1, a.context, a.steps,
                                                        heads), method=method))
            save()
        if "capacity" in parts:
            row = attempt(lambda: capacity(model, method, a.budget, a.context, a.steps, heads, a.margin_gb),
                          method=method)
            if a.verify and method == "adakv" and row.get("max_batch"):
                row["verified"] = attempt(lambda: decode(model, fwd0, method, a.budget, row["max_batch"],
                                                         a.context, a.steps, heads), method=method)
            res["capacity"].append(row)
            save()
    if "prefill" in parts:
        res["prefill"] = attempt(lambda: prefill(model, fwd0, a.budget, a.context))
        res["score_gather_ms"] = attempt(lambda: {f"{b}x{a.context}": gather_ms(heads, a.context, b,
                                                                                c.num_hidden_layers)
                                                  for b in (1, 8)})
        save()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
