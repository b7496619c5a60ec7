"""The model's own decode mask on a compressed cache, on the GPU stack (docs/design.md, "The model's own decode
mask"): tests/test_decode_mask.py's cases with CUDA tensors and the inner compiler of choice.

Per case (sliding window / random bool / random additive decode masks after a prompt longer than the budget,
and a hand-written causal mask built in the graph): ``max_err`` of every output against the algorithm's oracle
(``reference.select`` + ``reference.biased_decode_attention``, on the CPU), ``ok`` (max_err <= tol), the report's
store reasons (``gathered``: the mask is added at the kept positions; the proven causal case must not be), and
``hf_llama``: HF Llama decode + extend with a padded batch: ``attend_append`` calls without a bias (the Triton
decode kernel kept) on this transformers version.

    python bench/decode_mask_check.py --out bench/results/decode-mask-check-h200.json           # GPU, ~2 min
    python bench/decode_mask_check.py --device cpu --inner eager --out /tmp/decode-mask-cpu.json  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adakv_compile import adakv_backend  # noqa: E402
from tests import test_decode_mask as T  # noqa: E402


def run_case(kind: str, chunks: list[int], device: str, inner: str) -> dict:
    gen = torch.Generator().manual_seed(len(chunks) + len(kind))
    xs = [[torch.randn(T.B, T.H, t, T.D, generator=gen) for _ in range(3)] for t in chunks]
    if kind == "own_causal":
        masks, S = [], 0
        for t in chunks:
            S += t
            masks.append(torch.ones(t, S, dtype=torch.bool).tril(S - t)[None, None])
        module = T._OwnCausal()
    else:
        masks = T._masks(kind, chunks, gen)
        module = T._Masked()
    torch._dynamo.reset()
    backend = adakv_backend(T.CFG, inner=inner)
    fn, past, got = torch.compile(module, backend=backend), None, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for (q, k, v), mask in zip(xs, masks):
            args = [x.to(device) for x in (q, k, v)]
            if kind != "own_causal":
                args.append(mask.to(device))
            o, past = fn(*args, past)
            got.append(o.float().cpu())
    seconds = time.perf_counter() - t0
    want = T._oracle(xs, masks)
    err = max(float((g - w).abs().max()) for g, w in zip(got, want))
    reasons = sorted({r.reason for r in backend.report if r.mode == "store"})
    gathered = any("decode mask added" in r for r in reasons)
    ok = err <= 1e-3 and gathered == (kind != "own_causal") and {r.mode for r in backend.report} >= {"store"}
    return {"kind": kind, "chunks": chunks, "max_err": err, "gathered": gathered, "ok": ok,
            "store_reasons": reasons, "seconds": round(seconds, 2)}


def hf_llama(device: str, inner: str) -> dict:
    from tests.prompts import left_padded
    from tests.zoo import build

    torch._dynamo.reset()
    model = build("llama").to(device)
    graphs = []
    backend = adakv_backend(T.CFG, inner=inner)

    def spy(gm, example_inputs):
        fn = backend(gm, example_inputs)
        graphs.append(gm)
        return fn

    ids, am = left_padded([20, 14], seed=5)
    ids, am = ids.to(device), am.to(device)
    fwd = torch.compile(model.forward, backend=spy)
    with torch.no_grad():
        past = fwd(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
        new = torch.randint(3, 100, (2, 3), device=device)
        am = torch.cat([am, torch.ones_like(new)], 1)
        past = fwd(input_ids=new, attention_mask=am, past_key_values=past, use_cache=True).past_key_values
        am = torch.cat([am, torch.ones_like(new[:, :1])], 1)
        fwd(input_ids=new[:, :1], attention_mask=am, past_key_values=past, use_cache=True)
    calls = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.adakv.attend_append.default]
    no_bias = bool(calls) and all(len(n.args) == 7 and not n.kwargs for n in calls)
    return {"attend_append_calls": len(calls), "no_bias": no_bias, "ok": no_bias,
            "phases": sorted({r.phase for r in backend.report if r.mode == "store"})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--inner", default=None, help="inner compiler (default: inductor on CUDA, eager on CPU)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    inner = a.inner or ("inductor" if a.device == "cuda" else "eager")
    import transformers
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu"
    cases = [("sliding", [T.T0, 1, 1, 1]), ("sliding", [T.T0, 3, 1]), ("bool", [T.T0, 1, 1]),
             ("additive", [T.T0, 1, 2]), ("own_causal", [T.T0, 1, 3, 1])]
    out = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
           "inner": inner, "cases": [], "hf_llama": None}
    for kind, chunks in cases:
        try:
            out["cases"].append(run_case(kind, chunks, a.device, inner))
        except Exception as e:  # noqa: BLE001  (one failing case is a result, not the end of the run)
            out["cases"].append({"kind": kind, "chunks": chunks, "ok": False, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(out["cases"][-1]), flush=True)
    try:
        out["hf_llama"] = hf_llama(a.device, inner)
    except Exception as e:  # noqa: BLE001
        out["hf_llama"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out["hf_llama"]), flush=True)
    out["ok"] = all(c["ok"] for c in out["cases"]) and out["hf_llama"]["ok"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("OK" if out["ok"] else "FAILED", a.out)


if __name__ == "__main__":
    main()
