"""One tensor-parallel run for tests/test_tp.py (launched with torchrun, 2 CPU ranks, gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py \
        MODEL_DIR OUT.json PATH(general|fast) TP_ALLOCATION(global|per-rank) INNER SEED [TP_RESERVE]

Loads the saved model with ``tp_plan="auto"``, compiles it with the adakv backend, greedy-generates from
a left-padded batch, and writes (rank 0) the generated tokens and the kept positions per (layer, row, KV
head) in the model's global head order (ranks' heads concatenated), plus each rank's local head count.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVCache, AdaKVConfig, compile_model  # noqa: E402
from adakv_compile.kernels.store import unpack  # noqa: E402
from tests.prompts import left_padded  # noqa: E402

PROMPTS, NEW_TOKENS = [40, 29], 5


def config(tp_allocation: str) -> AdaKVConfig:
    return AdaKVConfig(budget=10, window=4, tp_allocation=tp_allocation)


def kept_positions(cache, path: str) -> list:
    """[layer][row][local head] -> sorted kept positions (ints)."""
    out = []
    for i, layer in enumerate(cache.layers):
        if path == "fast":
            rows = cache.kept_positions(i)
        else:
            _, _, rows = unpack(layer.keys, layer.values, positions=True)
        out.append([[sorted(int(p) for p in head.tolist()) for head in row] for row in rows])
    return out


def generate(model, path: str, tp_allocation: str, inner: str, seed: int, kw_cache: dict,
             tp_reserve: float | None = None):
    backend = compile_model(model, config(tp_allocation), inner=inner)
    ids, mask = left_padded(PROMPTS, seed=seed, vocab=model.config.vocab_size)
    extra = {}
    if path == "fast":
        extra[kw_cache["name"]] = AdaKVCache(model, backend, batch_size=len(PROMPTS), max_new_tokens=NEW_TOKENS,
                                             **({} if tp_reserve is None else {"tp_reserve": tp_reserve}))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True, **extra)
    cache = extra.get(kw_cache["name"], out.past_key_values)
    # fast path: (tokens trimmed by the reserve, kept-token capacity per row of each layer on this rank)
    trimmed = (cache.tp_trimmed(), [lay.slots_per_row - lay.num_heads * lay.room for lay in cache.layers]) \
        if path == "fast" else (0, [])
    return out.sequences[:, ids.shape[1]:].tolist(), kept_positions(cache, path), backend, trimmed


def main():
    model_dir, out_path, path, tp_allocation, inner, seed = sys.argv[1:7]
    tp_reserve = float(sys.argv[7]) if len(sys.argv) > 7 else None
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    from adakv_compile.cache import cache_kwarg
    name = cache_kwarg(model)
    tokens, kept, backend, trimmed = generate(model, path, tp_allocation, inner, int(seed), {"name": name},
                                              tp_reserve)
    rank, world = dist.get_rank(), dist.get_world_size()
    every = [None] * world
    dist.all_gather_object(every, {"kept": kept, "tokens": tokens, "trimmed": trimmed,
                                   "rewritten": sum(r.action == "rewritten" for r in backend.report),
                                   "reasons": sorted({r.reason for r in backend.report if r.reason})})
    if rank == 0:
        merged = [[sum((every[r]["kept"][layer][row] for r in range(world)), [])
                   for row in range(len(kept[layer]))] for layer in range(len(kept))]
        Path(out_path).write_text(json.dumps({
            "tokens": tokens, "kept": merged, "world": world,
            "local_heads": [len(every[r]["kept"][0][0]) for r in range(world)],
            "tokens_per_rank": [every[r]["tokens"] for r in range(world)],
            "trimmed": [every[r]["trimmed"][0] for r in range(world)],
            "caps": [every[r]["trimmed"][1] for r in range(world)],
            "kept_per_rank": [every[r]["kept"] for r in range(world)],
            "rewritten": [every[r]["rewritten"] for r in range(world)],
            "reasons": [every[r]["reasons"] for r in range(world)]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
