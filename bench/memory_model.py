"""Memory model of tensor-parallel serving with adakv, on paper (issue 11): bytes per rank of weights, full KV
and compacted KV, and the max batch, for Llama-3.1-70B at 128k on 4 and 8 GPUs; checked against what the
2-GPU run of bench/tp.py measured for Llama-3.1-8B shapes (bench/results/tp-h200-tp2.json).

    python bench/memory_model.py            # prints the Markdown tables (docs/design.md quotes them)

Sizes follow the code: the full cache is 2 x layers x local KV heads x (context + room) x head_dim x 2 B per
row; AdaKVCache per layer holds ``slots_per_row`` slots of K and V (head_dim x 2 B each) and an int32 position,
with the per-rank slot count of ``cache.rank_kept_bound`` (global allocation: a rank's heads may keep all
but the other heads' window + safeguard floor), 1.25 x the even share (``AdaKVCache(tp_reserve=1.25)``) or the
even share (``tp_allocation="per-rank"``). transformers
5.17 leaves the input embedding unsharded (measured: 8B weights per rank = (total - embedding) / N + embedding).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import AdaKVConfig  # noqa: E402
from adakv_compile.cache import kept_per_head_bound, rank_kept_bound  # noqa: E402

MODELS = {
    "Llama-3.1-8B": dict(layers=32, hidden=4096, heads=32, kv=8, dim=128, inter=14336, vocab=128256),
    "Llama-3.1-70B": dict(layers=80, hidden=8192, heads=64, kv=8, dim=128, inter=28672, vocab=128256),
}


def weights(m) -> tuple[int, int]:
    """(total bytes, embedding bytes), bf16."""
    h, kvd = m["hidden"], m["kv"] * m["dim"]
    layer = 2 * h * h + 2 * h * kvd + 3 * h * m["inter"] + 2 * h
    emb = m["vocab"] * h
    return 2 * (m["layers"] * layer + 2 * emb + h), 2 * emb


def per_rank(m, ranks: int, context: int, budget: int, room: int, tp_allocation: str) -> dict:
    total, emb = weights(m)
    local = m["kv"] // ranks
    full = 2 * m["layers"] * local * (context + room) * m["dim"] * 2
    cfg = AdaKVConfig(budget=budget, tp_allocation="global" if tp_allocation == "reserve" else tp_allocation)
    kept = kept_per_head_bound(cfg, None, 0)
    if tp_allocation == "reserve":  # AdaKVCache(tp_reserve=1.25)
        kept = math.ceil(1.25 * kept)
    elif ranks > 1:
        kept = -(-rank_kept_bound(cfg, m["kv"], local, kept, None) // local)
    slots = local * kept + (local + 1) // 2 + local * room
    adakv = m["layers"] * slots * (2 * m["dim"] * 2 + 4)
    return dict(weights=(total - emb) / ranks + emb if ranks > 1 else total, full=full, adakv=adakv,
                repeat=2 * (m["heads"] // ranks) * (context + room) * m["dim"] * 2)  # HF 5.17 decode temporaries


def table(name: str, context: int, budget: int, room: int, gpus: list[int], card_gb: float, reserve_gb: float):
    m = MODELS[name]
    lines = [f"| GPUs | weights GB/rank | full KV GB/row/rank | adakv-{budget} MB/row/rank: global worst case / "
             f"tp_reserve 1.25 / per-rank | max batch ({card_gb:.0f} GB cards, {reserve_gb:.0f} GB reserve): full / "
             "adakv worst case / reserve 1.25 / per-rank |", "|---|---|---|---|---|"]
    for n in gpus:
        g, r, p = (per_rank(m, n, context, budget, room, how) for how in ("global", "reserve", "per-rank"))
        free = card_gb * 1e9 - g["weights"] - reserve_gb * 1e9
        mb = [max(0, int(free // x)) for x in (g["full"] + g["repeat"], g["adakv"], r["adakv"], p["adakv"])]
        lines.append(f"| {n} | {g['weights'] / 1e9:.1f} | {g['full'] / 1e9:.2f} | {g['adakv'] / 1e6:.0f} / "
                     f"{r['adakv'] / 1e6:.0f} / {p['adakv'] / 1e6:.0f} | {mb[0]} / {mb[1]} / {mb[2]} / {mb[3]} |")
    return lines


def check_against_runs(paths=("bench/results/tp-h200-tp2.json", "bench/results/tp-h200-tp2-reserve1.25.json")):
    m = MODELS["Llama-3.1-8B"]
    room = 32 + 16  # bench/tp.py: steps + 16
    lines = ["Check against the 2-GPU runs (NVIDIA H200, Llama-3.1-8B shapes, 32768 tokens):", "",
             "| quantity | model | measured |", "|---|---|---|"]
    for i, path in enumerate(paths):
        run = json.loads(Path(path).read_text())
        how = "global" if run.get("tp_reserve") is None else "reserve"
        p = per_rank(m, run["ranks"], run["context"], run["budget"], room, how)
        cap = {r["method"]: r for r in run["capacity"]}
        rows = [("adakv-1024 MB/row/rank, " + ("worst case" if how == "global" else "tp_reserve 1.25"),
                 p["adakv"] / 1e6, cap["adakv"]["per_row_bytes_per_rank"] / 1e6)]
        if i == 0:
            rows = [("weights GB/rank", p["weights"] / 1e9, run["weights_gb_per_rank"]),
                    ("full KV GB/row/rank", p["full"] / 1e9, cap["full"]["per_row_bytes_per_rank"] / 1e9)] + rows
        lines += [f"| {q} | {a:.2f} | {b:.2f} |" for q, a, b in rows]
    return lines


def main():
    out = ["### Llama-3.1-70B, 131072-token requests, budget 1024, 64 decode slots per head", ""]
    out += table("Llama-3.1-70B", 131072, 1024, 64, [4, 8], 80, 6) + [""]
    out += table("Llama-3.1-70B", 131072, 1024, 64, [4, 8], 141, 6) + [""]
    out += check_against_runs()
    print("\n".join(out))


if __name__ == "__main__":
    main()
