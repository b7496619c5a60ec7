"""Long prompts on one card: peak memory and prefill time against the context, per method (issue 15).

Llama-3.1-8B shapes (random bf16 weights) × --layers, batch 1, one process per layer count. Methods:
  eager          the uncompiled HF model, SDPA, DynamicCache (full cache)
  compiled       plain torch.compile (Inductor), DynamicCache
  adakv          the fast path: adakv backend + AdaKVCache (budget --budget); the mask is proven from its
                 construction (passes/mask.py) and the position-wise regions run over chunks (passes/chunk.py)
  adakv_general  adakv backend + DynamicCache (the general path); by default only at --general-context
Per row: layers, context, method, peak_gb (torch.cuda.max_memory_allocated over the prefill and the decode),
prefill_s (the first call, compile included, as a user sees it; ``prefill_warm_s`` a second prefill when
--warm: compile excluded, ``warm_prefill_compiles`` counts Dynamo graphs it compiled, 0 expected),
decode_ms (the median over --steps decode steps after the prefill, measured as bench/e2e.py does: its
``decode_loop``, pipelined steps between CUDA events, no host sync between steps, CUDA-graph replay on the
fast path; ``decode_synced_ms`` each step synchronised alone), floor_ms (e2e.py's ``weight_floor_ms``:
every weight read once per step at the copy bandwidth measured in this run), oom (ran out of memory:
recorded, the run goes on), device. Each (layers, context, method) row replaces the one already in the
results file, so several commands (one per method or context range) fill one file.

    python bench/long_context.py --layers 8 --methods adakv                       # GPU (H200)
    python bench/long_context.py --layers 8 --methods eager,compiled
    python bench/long_context.py --layers 32 --methods adakv,eager --contexts 131072,262144,524288
    python bench/long_context.py --small                                          # CPU, tiny shapes
Writes bench/results/long-context-<card>.json, .md and .png (peak GB against context, log-log, one line per
method, the card's memory drawn).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend  # noqa: E402
from adakv_compile.cache import cache_kwarg  # noqa: E402
from adakv_compile.passes import mask as mask_pass  # noqa: E402
from stamp import md_header, png_metadata  # noqa: E402
import e2e  # noqa: E402  (the decode loop, graph counter, copy bandwidth and weight floor)

METHODS = ("eager", "compiled", "adakv", "adakv_general")
K = 1024
WARM = 8  # decode steps before the timed ones (bench/e2e.py's default)


def build(layers: int, small: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 21)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                          rope_theta=500000.0)
        dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_one(model, orig_forward, method: str, n: int, a, device: str) -> dict:
    """One (method, context) row; an out-of-memory error is recorded, not raised."""
    kw = cache_kwarg(model)
    row = dict(layers=model.config.num_hidden_layers, context=n, method=method, peak_gb=None, prefill_s=None,
               decode_ms=None, floor_ms=a.floor_ms, oom=False)
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    state = {}
    mask_pass.STATS.update(proven=0, unproven={})
    try:
        ids = torch.randint(3, model.config.vocab_size, (1, n), device=device)
        if method in ("eager", "compiled"):
            from transformers import DynamicCache
            fwd = orig_forward if method == "eager" else torch.compile(orig_forward)
            make = lambda: DynamicCache(config=model.config)  # noqa: E731
        else:
            backend = adakv_backend(AdaKVConfig(budget=a.budget, prefill_chunk=a.chunk))
            state["backend"] = backend
            fwd = torch.compile(orig_forward, backend=backend)  # 1st call static: chunked
            if method == "adakv":
                cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=WARM + 2 * a.steps + 8)

                def make():
                    cache.reset()
                    return cache
            else:
                from transformers import DynamicCache
                make = lambda: DynamicCache(config=model.config)  # noqa: E731

        def prefill():
            c = make()
            with torch.no_grad():
                out = fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: c})
            return out, c

        _sync(device)
        t0 = time.perf_counter()
        out, c = prefill()
        _sync(device)
        row["prefill_s"] = time.perf_counter() - t0
        if a.warm:  # the same graphs again: compile excluded (checked: no new Dynamo graph)
            del out, c
            graphs = e2e.unique_graphs()
            t0 = time.perf_counter()
            out, c = prefill()
            _sync(device)
            row["prefill_warm_s"] = time.perf_counter() - t0
            row["warm_prefill_compiles"] = e2e.unique_graphs() - graphs
        if a.steps:
            tok = out.logits[:, -1:].argmax(-1)
            with torch.no_grad():  # as bench/e2e.py: WARM steps (compile, CUDA-graph recording), then timed
                row["decode_ms"], row["decode_synced_ms"] = e2e.decode_loop(fwd, kw, c, tok, a.steps, WARM)
        if "backend" in state:
            g = state["backend"].graphs
            row["chunked_regions"] = max((x.get("chunked_regions", 0) for x in g), default=0)
            row["masks_proven"] = mask_pass.STATS["proven"]
            row["masks_unproven"] = dict(mask_pass.STATS["unproven"])
        del out, c
    except Exception as e:  # noqa: BLE001  (an OOM anywhere, also inside compile, is a result)
        if not _is_oom(e):
            raise
        row["oom"] = True
        row["error"] = str(e).splitlines()[0][:200]
    finally:
        state.clear()
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.empty_cache()
    if row["oom"]:
        row["prefill_s"] = row["decode_ms"] = row["decode_synced_ms"] = None
    return row


def write(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=1))
    rows = sorted(res["rows"], key=lambda r: (r["layers"], r["context"], METHODS.index(r["method"])))
    lines = [md_header(res["device"], torch=res.get("torch"), transformers=res.get("transformers")),
             f"Long prompts, {res['device']} ({res.get('memory_gb') or '?'} GB), {res.get('model')}, batch 1, "
             f"budget {res.get('budget')}; weight floor per decode step (bench/e2e.py's weight_floor_ms): "
             + ", ".join(f"{k} layers {v:.2f} ms" for k, v in res.get("weight_floor_ms", {}).items() if v),
             "decode ms: median of pipelined steps (CUDA events, no host sync between steps, as bench/e2e.py); "
             "prefill s: first call (compile included); warm: a second prefill (compile excluded)",
             "", "| layers | context | method | peak GB | prefill s | warm prefill s | decode ms | floor ms "
             "| decode / floor | OOM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        ctx = f"{r['context'] // K}k" if r["context"] % K == 0 else str(r["context"])
        ratio = r["decode_ms"] / r["floor_ms"] if r.get("decode_ms") and r.get("floor_ms") else None
        lines.append(f"| {r['layers']} | {ctx} | {r['method']} | {f(r['peak_gb'], 1)} | "
                     f"{f(r['prefill_s'])} | {f(r.get('prefill_warm_s'))} | {f(r['decode_ms'])} | "
                     f"{f(r.get('floor_ms'))} | {f(ratio)} | {'yes' if r['oom'] else ''} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layer_counts = sorted({r["layers"] for r in rows}) or [0]
    fig, axes = plt.subplots(len(layer_counts), 2, figsize=(11, 4.2 * len(layer_counts)), squeeze=False)
    for (ax, axt), layers in zip(axes, layer_counts):
        for m in METHODS:
            mine = [r for r in rows if r["layers"] == layers and r["method"] == m]
            pts = [(r["context"], r["peak_gb"]) for r in mine if not r["oom"] and r["peak_gb"]]
            tpts = [(r["context"], r["prefill_s"]) for r in mine if not r["oom"] and r["prefill_s"]]
            oom = [r["context"] for r in mine if r["oom"]]
            color = f"C{METHODS.index(m)}"
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, color=color)
            if tpts:
                axt.plot(*zip(*tpts), marker="o", label=m, color=color)
            for x in oom:
                ax.plot([x], [res.get("memory_gb") or 1.0], marker="x", markersize=10, color=color)
        if res.get("memory_gb"):
            ax.axhline(res["memory_gb"], color="gray", linestyle="--", label="device memory")
        for a_, what in ((ax, "peak GB (x: out of memory)"), (axt, "prefill s (first call)")):
            a_.set_xscale("log", base=2)
            a_.set_yscale("log")
            a_.set_xlabel("context (tokens)")
            a_.set_ylabel(what)
            a_.set_title(f"{layers} layers: {what}")
            if a_.get_legend_handles_labels()[0]:
                a_.legend(fontsize=8)
    fig.suptitle(f"Long prompts, batch 1, {res['device']}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110, metadata=png_metadata(res["device"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --small)")
    ap.add_argument("--methods", default="eager,compiled,adakv,adakv_general")
    ap.add_argument("--contexts", default=None, help="comma-separated token counts (default: 32k..1M at 8 "
                    "layers, 128k..512k otherwise)")
    ap.add_argument("--general-context", type=int, default=131072,
                    help="the one context adakv_general runs at (when --contexts does not name it: skipped)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=None, help="AdaKVConfig.prefill_chunk (default automatic)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warm", action="store_true", help="also time a second prefill (compile excluded)")
    ap.add_argument("--quick", action="store_true", help="two contexts, 8 decode steps")
    ap.add_argument("--small", action="store_true", help="CPU, tiny Llama, contexts 256..1024 (a smoke run)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.layers is None:
        a.layers = 2 if a.small else 8
    device = "cpu" if a.small or not torch.cuda.is_available() else "cuda"
    if a.contexts:
        contexts = [int(x) for x in a.contexts.split(",")]
    elif a.small:
        contexts = [256, 512, 1024]
    elif a.layers <= 8:
        contexts = [32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1024 * K]
    else:
        contexts = [128 * K, 256 * K, 512 * K]
    if a.quick:
        contexts, a.steps = contexts[:2], min(a.steps, 8)
    methods = [m.strip() for m in a.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (choose from {METHODS})")
    import transformers
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    model_no = re.search(r"\b([A-Z]+\d{2,}[A-Za-z]*)\b", card)  # "NVIDIA H200 NVL" -> h200
    short = "cpu" if device == "cpu" else (model_no.group(1) if model_no else card.split()[-1]).lower()
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"long-context-{short}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update(model="tiny Llama (--small)" if a.small else "Llama-3.1-8B shapes", device=card, torch=torch.__version__, transformers=transformers.__version__, budget=a.budget,
               memory_gb=(torch.cuda.get_device_properties(0).total_memory / 1e9 if device == "cuda" else None))
    res.setdefault("rows", [])
    res.setdefault("weight_floor_ms", {})
    res.setdefault("commands", [])
    res["commands"].append("python bench/long_context.py " + " ".join(sys.argv[1:]))
    e2e.DEVICE = device
    model = build(a.layers, a.small, device)
    a.floor_ms = e2e.weight_floor_ms(model, e2e.copy_bandwidth())
    res["weight_floor_ms"][str(a.layers)] = a.floor_ms
    orig_forward = model.forward
    for n in contexts:
        for m in methods:
            if m == "adakv_general" and n != a.general_context and not a.small:
                continue
            row = run_one(model, orig_forward, m, n, a, device)
            row["device"] = card
            res["rows"] = [r for r in res["rows"] if (r["layers"], r["context"], r["method"]) !=
                           (row["layers"], row["context"], row["method"])] + [row]
            print(json.dumps(row), flush=True)
            write(res, out)
    print(f"wrote {out} (+ .md, .png)")


if __name__ == "__main__":
    main()
