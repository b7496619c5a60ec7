"""Does Inductor compile the inlined prefill compression (``adakv::prefill_compress``) on this GPU stack?

Issue 17: on the H200 stack (torch 2.11, triton 3.6, transformers 5.17) Inductor failed on the traced body at
two configurations; this script compiles the fast-path prefill with the inline op at both and prints OK or the
exception per case (each case in its own process: a device assert cannot poison the next one).

  llama8b-attn-512k  Llama-3.1-8B attention (32 q / 8 KV heads, head_dim 128), 1 layer, hidden 256, batch 1,
                     a 524288-token prompt: q's batch stride is 32 x 524288 x 128 = 2**31 (failure 2, "'int'
                     object has no attribute 'xreplace'", a kernel int argument above int32)
  gemma3-8k          Gemma-3-12B attention (16 q / 8 KV heads, head_dim 256), 1 sliding + 1 global layer, 8k
  gpt-oss-8k         gpt-oss-20b attention (64 q / 8 KV heads, head_dim 64, sinks, eager attention), 1 sliding
                     + 1 full layer, 4 small experts, 8k (gemma3/gpt-oss at 8k: failure 1, Inductor's SplitScan
                     of the slots' cumsum, "list indices must be integers or slices, not NoneType")

Per case: ``ok`` (compiled and ran), ``error`` (the exception's last line), ``inlined`` (no compress op left as
an extern call in Inductor's code), ``scan_free`` (no cumsum/scan traced from the compress op in it; the model's own, e.g. gpt-oss's MoE offsets,
are listed as ``model_scan_ops``), ``slot_kernel`` (our slot kernel in it),
with ``--compare`` ``kept_agreement`` (kept positions of the compressed layers against the opaque
``adakv::static_compress`` run on the same model: |same| / |union|; random weights make near-ties, so it is
reported, not required; a second compile per case), seconds. Token equality with the eager oracle (inline path
on) is ``bench/e2e.py --check``'s.

    python bench/inline_check.py --out bench/results/inline-check-<card>.json          # GPU, ~3 min
    python bench/inline_check.py --device cpu --small --out /tmp/inline-check-cpu.json  # CPU smoke (tiny)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CASES = ("llama8b-attn-512k", "gemma3-8k", "gpt-oss-8k")


def build(case: str, small: bool, device: str):
    """(model, prompt length, AdaKVConfig kwargs)."""
    import torch
    import transformers

    torch.manual_seed(0)
    dtype = torch.float32 if small else torch.bfloat16
    common = dict(vocab_size=512, hidden_size=64 if small else 256, intermediate_size=128 if small else 512,
                  max_position_embeddings=1 << 21 if case.startswith("llama") else 131072)
    if case == "llama8b-attn-512k":
        heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16) if small else \
            dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128)
        cfg = transformers.LlamaConfig(num_hidden_layers=1, **heads, **common)
        cls, n = transformers.LlamaForCausalLM, 96 if small else 524288
    elif case == "gemma3-8k":
        heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                     query_pre_attn_scalar=32) if small else \
            dict(num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                 query_pre_attn_scalar=256)
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                            **heads, **common)
        cls, n = transformers.Gemma3ForCausalLM, 96 if small else 8192
    elif case == "gpt-oss-8k":
        heads = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=16) if small else \
            dict(num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128)
        cfg = transformers.GptOssConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                        num_local_experts=4, num_experts_per_tok=4, **heads, **common)
        cfg._attn_implementation = "eager"
        cls, n = transformers.GptOssForCausalLM, 96 if small else 8192
    else:
        raise ValueError(f"--case {case!r}: one of {', '.join(CASES)}")
    from e2e_hybrid import instantiate

    model = instantiate(cls, cfg, dtype, device, sinks=case == "gpt-oss-8k")
    cfg_kw = dict(budget=24, window=4) if small else dict(budget=1024)
    return model, n, cfg_kw


def prefill(model, ids, cfg_kw: dict, inline: bool):
    """Compile (Dynamo reset first) and run one prefill; returns (cache, Inductor's code)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend
    from adakv_compile.cache import cache_kwarg

    os.environ["ADAKV_INLINE_COMPRESS"] = "1" if inline else "0"  # read by the rewrite at compile time
    torch._dynamo.reset()
    backend = adakv_backend(AdaKVConfig(**cfg_kw))
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=4)
    fwd = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        _, codes = run_and_get_code(
            lambda: fwd(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}))
    if ids.is_cuda:
        torch.cuda.synchronize()
    return cache, "\n".join(codes)


def kept(cache) -> dict:
    """Kept positions per (layer, row, head) of the layers with compacted segments."""
    out = {}
    for i, lay in enumerate(cache.layers):
        if not (hasattr(lay, "off") and hasattr(lay, "lens") and hasattr(lay, "pos")):
            continue
        for b, heads in enumerate(cache.kept_positions(i)):
            for h, pos in enumerate(heads):
                out[(i, b, h)] = set(pos.tolist())
    return out


_SCAN = re.compile(r"cumsum|cummax|cummin|cumprod|logcumsumexp|scan")


def scans(code: str) -> tuple[list[str], list[str]]:
    """Scan ops in Inductor's code, read from its call-site comments ("Topologically Sorted Source Nodes: [...],
    Original ATen: [...]"): (those traced from the compress op's body, the model's own, e.g. gpt-oss's MoE
    offsets over its experts)."""
    ours, model = set(), set()
    for nodes, aten in re.findall(r"Source Nodes: \[(.*?)\], Original ATen: \[(.*?)\]", code):
        ops = {op.strip() for op in aten.split(",") if _SCAN.search(op)}
        (ours if "compress" in nodes else model).update(ops)
    return sorted(ours), sorted(model)


def run_case(case: str, small: bool, device: str, compare: bool) -> dict:
    import torch

    row = dict(case=case, ok=False, error=None)
    t0 = time.perf_counter()
    try:
        model, n, cfg_kw = build(case, small, device)
        row.update(context=n, layers=model.config.num_hidden_layers)
        g = torch.Generator(device=device).manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (1, n), device=device, generator=g)
        cache, code = prefill(model, ids, cfg_kw, inline=True)
        row["ok"] = True
        row["inlined"] = not re.search(r"torch\.ops\.adakv\.\w*compress", code)
        row["scan_ops"], row["model_scan_ops"] = scans(code)
        row["scan_free"] = not row["scan_ops"]
        row["slot_kernel"] = "_segment_slots_kernel" in code
        row["inline_s"] = round(time.perf_counter() - t0, 1)
        if compare:
            got = kept(cache)
            del cache
            ref, _ = prefill(model, ids, cfg_kw, inline=False)
            want = kept(ref)
            same = sum(len(got[k] & want[k]) for k in want if k in got)
            union = sum(len(got.get(k, set()) | want[k]) for k in want)
            row["kept_agreement"] = round(same / max(1, union), 4)
            row["kept_segments"] = len(want)
    except BaseException as e:  # noqa: BLE001 - the point is to report it
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        row["traceback"] = traceback.format_exc()[-4000:]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process (the child)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="tiny shapes (the CPU smoke test)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the opaque op and report kept_agreement (a second compile per case)")
    ap.add_argument("--case-timeout", type=int, default=240, help="seconds per case (its own process)")
    ap.add_argument("--out", default="inline-check.json")
    a = ap.parse_args()
    if a.case:
        print("ROW " + json.dumps(run_case(a.case, a.small, a.device, a.compare)), flush=True)
        return

    import torch
    import transformers
    from stamp import md_header

    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    res = dict(device=card, torch=torch.__version__, transformers=transformers.__version__, small=a.small,
               rows=[])
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    for case in a.cases.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--device", a.device]
        cmd += ["--small"] * a.small + ["--compare"] * a.compare
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=a.case_timeout)
            rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            err = f"process exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        except subprocess.TimeoutExpired:
            rows, err = [], f"timed out after {a.case_timeout} s"
        row = rows[-1] if rows else dict(case=case, ok=False, error=err)
        row["device"] = card
        res["rows"].append(row)
        status = "OK" if row["ok"] else f"FAILED {row['error']}"
        print(f"{case}: {status}  " + json.dumps({k: v for k, v in row.items()
                                                  if k not in ("traceback", "case", "ok", "error", "device")}),
              flush=True)
    res["all_ok"] = all(r["ok"] and r.get("inlined") and r.get("scan_free")
                        and (r.get("slot_kernel") or a.device != "cuda") for r in res["rows"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    lines = [md_header(card, torch=res["torch"], transformers=res["transformers"]),
             "| case | context | ok | inlined | scan-free | slot kernel | kept agreement | s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['case']} | {r.get('context', '')} | {r['ok']} | {r.get('inlined', '')} | "
                     f"{r.get('scan_free', '')} | {r.get('slot_kernel', '')} | {r.get('kept_agreement', '')} | "
                     f"{r.get('seconds', '')} | {r.get('error') or ''} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"all_ok={res['all_ok']}  wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
