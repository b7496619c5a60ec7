"""What holds memory at the peak of a long adakv prefill, modelled on the CPU (issue 15).

Builds Llama-3.1-8B shapes × --layers on the *meta* device (no memory, no GPU), runs the adakv backend's
passes on the prefill graph Dynamo traces for a --context-token prompt with an AdaKVCache (the fast path
of bench/long_context.py), stops before the inner compiler and models the final graph's live tensor bytes
in execution order (adakv_compile/passes/liveness.py): the peak, where it is and what is live there.
Takes a few seconds at 1M tokens.

    python bench/prefill_liveness.py --layers 8 --context 1048576
    python bench/prefill_liveness.py --layers 32 --context 524288 --chunk 8192
    python bench/prefill_liveness.py --cpu-check      # the model against a measured peak (CPU, Inductor)

Writes bench/results/prefill-liveness-<layers>L-<context>.json (device: "model (meta tensors)") and prints
the table. Inductor compiles the outer graph too and keeps its order up to its own reordering; the CUDA
caching allocator adds fragmentation on top: the measured peak (bench/long_context.py) is the check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVCache, AdaKVConfig  # noqa: E402
from adakv_compile.backend import AdaKVBackend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.passes.liveness import default_workspace, liveness, stale_qkv_at_regions  # noqa: E402

DEVICE = "model (meta tensors)"


class _Captured(Exception):
    pass


class _Capture(AdaKVBackend):
    """The adakv backend, stopped where it would hand the final outer graph to the inner compiler."""

    def _inner(self, gm, example_inputs, cudagraphs: bool = False):
        self.final = gm
        raise _Captured()


def final_prefill_graph(model, n: int, config: AdaKVConfig, batch: int = 1):
    """The backend's final prefill graph of ``model`` for a [batch, n] prompt (an AdaKVCache), not run."""
    torch._dynamo.reset()
    backend = _Capture(config, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=batch, max_new_tokens=40)
    fwd = torch.compile(model.forward, backend=backend)
    ids = torch.zeros((batch, n), dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    except Exception as e:  # noqa: BLE001  (Dynamo wraps the backend's exception)
        if getattr(backend, "final", None) is None:
            raise
        del e
    finally:
        torch._dynamo.reset()
    return backend.final


def llama_8b(layers: int, device: str = "meta"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                      rope_theta=500000.0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def cpu_check(layers: int = 4, n: int = 4096, chunk: int = 512) -> dict:
    """The model against a measurement: a tiny Llama (fp32) compiled with Inductor on the CPU, its second
    prefill's allocator peak (the profiler's memory events) next to the modelled peak of the same graph
    (inputs and weights left out of both; the CPU's plain scorer's window logits counted)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from adakv_compile import adakv_backend

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 16)
    config = AdaKVConfig(budget=64, prefill_chunk=chunk)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    torch._dynamo.reset()
    backend = adakv_backend(config)
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=8)
    fwd = torch.compile(model.forward, backend=backend)
    ids = torch.randint(3, 500, (1, n))
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)  # compiles
        cache.reset()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            del_me = fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
            del del_me
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = measured = 0
    for _, b in events:
        now += b
        measured = max(measured, now)
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cfg).eval()
    modelled = liveness(final_prefill_graph(meta_model, n, config), resident_inputs=False,
                        workspace=lambda node: default_workspace(node, plain_scorer=True))
    h = n * cfg.hidden_size * 4
    return dict(device="cpu", layers=layers, context=n, chunk=chunk, hidden=cfg.hidden_size,
                measured_mb=measured / 1e6, modelled_mb=modelled.peak / 1e6, modelled_at=modelled.at,
                hidden_state_mb=h / 1e6)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=None, help="AdaKVConfig.prefill_chunk (default automatic)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-check", action="store_true", help="instead: measure a tiny Inductor-compiled "
                    "prefill's allocator peak on the CPU next to the model's (~1 min)")
    a = ap.parse_args()
    if a.cpu_check:
        res = cpu_check()
        print(json.dumps(res))
        out = Path(a.out or Path(__file__).resolve().parent / "results" / "prefill-liveness-cpu-check.json")
        out.write_text(json.dumps(dict(res, command="python bench/prefill_liveness.py --cpu-check"), indent=1))
        return
    model = llama_8b(a.layers)
    gm = final_prefill_graph(model, a.context, AdaKVConfig(budget=a.budget, prefill_chunk=a.chunk))
    res = liveness(gm)
    stale = stale_qkv_at_regions(gm, res)
    print(f"Llama-3.1-8B shapes × {a.layers} layers, {a.context} tokens, batch 1, bf16")
    print(res.table())
    print(f"regions run while an earlier layer's q/k/v is live: {len(stale)} {sorted(stale)}")
    out = Path(a.out or Path(__file__).resolve().parent / "results" /
               f"prefill-liveness-{a.layers}L-{a.context}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=DEVICE, torch=torch.__version__, layers=a.layers, context=a.context, budget=a.budget,
        chunk=a.chunk, peak_gb=res.peak / 1e9, at=res.at, resident_gb=res.resident / 1e9,
        workspace_gb=res.workspace / 1e9, regions_with_stale_qkv=sorted(stale),
        live=[dict(name=x.name, shape=list(x.shape), dtype=x.dtype, gb=x.nbytes / 1e9) for x in res.live],
        timeline_gb=[(name, b / 1e9) for name, b in res.timeline],
        command="python bench/prefill_liveness.py " + " ".join(sys.argv[1:])), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
