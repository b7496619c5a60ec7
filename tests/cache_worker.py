"""One process of tests/test_cache_safety.py: compile a tiny model with the adakv backend (fast path,
compressed), generate, and print Inductor's cache counters as one JSON line.

    TORCHINDUCTOR_CACHE_DIR=/tmp/x python -m tests.cache_worker [--merge 0|1] [--chunk ROWS] [--other-backend-first]
        [--inline] [--layers N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adakv_compile import AdaKVCache, AdaKVConfig, compile_model  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.passes import compress_once  # noqa: E402
from tests.zoo import build  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="AdaKVConfig.prefill_chunk (chunked regions)")
    ap.add_argument("--other-backend-first", action="store_true",
                    help="make an unrelated backend first (its config must not shift this one's key)")
    ap.add_argument("--inline", action="store_true",
                    help="ADAKV_INLINE_COMPRESS=1: the prefill compresses through compress_once (compiled once)")
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args(argv)
    if args.inline:
        os.environ["ADAKV_INLINE_COMPRESS"] = "1"
        os.environ["ADAKV_COMPRESS_ONCE"] = "1"  # below compress_once.MIN_LAYERS layers
    torch.set_num_threads(1)
    if args.other_backend_first:
        compile_model(build("llama", num_hidden_layers=1), AdaKVConfig(budget=30, window=8))
    model = build("llama", num_hidden_layers=args.layers)
    backend = compile_model(model, AdaKVConfig(budget=24, window=8, merge_linears=bool(args.merge),
                                                  prefill_chunk=args.chunk))
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=4)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, **{cache_kwarg(model): cache})
    from torch._dynamo.utils import counters
    ind, aot = counters["inductor"], counters["aot_autograd"]
    result = {"graphs": backend.graphs_compiled, "regions": len(backend._region_fns),  # regions: compiled at run
              "compress_once": len(compress_once.compiled_graphs(backend._key)),  # compiled at their first run
              "fx_hit": ind["fxgraph_cache_hit"], "fx_miss": ind["fxgraph_cache_miss"],
              "fx_bypass": ind["fxgraph_cache_bypass"],
              "aot_hit": aot["autograd_cache_hit"], "aot_miss": aot["autograd_cache_miss"],
              "aot_bypass": aot["autograd_cache_bypass"],
              "tokens": out[:, ids.shape[1]:].tolist()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
