"""Start time: the first ``model.generate`` of a process (compile + run), cold and after a restart.

For each size (layers x context x new tokens) and method, two child processes, each timing its first
``generate`` end to end (model already on the device; Llama-3.1-8B shapes, random bf16 weights):
  cold   a fresh TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR (nothing compiled before)
  warm   a restart on the cache dir the cold process left (Inductor FX-graph / AOTAutograd / Triton caches)
The warm child also times a second ``generate`` in the same process (``second_s``: no compile at all).
Methods:
  hf_static  HF's static cache and its own auto-compile (``cache_implementation="static"``)
  adakv      ``compile_model`` + ``AdaKVCache`` (the fast path), budget ``--budget``
  adakv_regions  the same with ``AdaKVConfig(prefill_compiler="regions")``: the prefill's position-wise regions
             are compiled once per kind for all layers (also when no chunking is needed), not inside the whole graph
  adakv_eager_prefill  the same with ``AdaKVConfig(prefill_compiler="eager")``: the rewritten prefill graph and
             its chunked regions run without Inductor (only the decode graph is compiled, as HF static does)
  adakv_compress_per_layer  ``adakv`` with the compression inlined into every layer (``ADAKV_COMPRESS_ONCE=0``)
  adakv_once, adakv_regions_once, adakv_eager_prefill_once  ``adakv``, ``adakv_regions``, ``adakv_eager_prefill``
             with one layer's compression compiled once for all layers at any depth (``ADAKV_COMPRESS_ONCE=1``)
  adakv_untraced  ``AdaKVConfig(prefill_compiler="untraced")``: the prompt runs through the model's eager forward
             (no Dynamo trace of the prefill), each layer's SDPA call intercepted to compress (untraced.py)
  adakv_untraced_eager_compress, adakv_untraced_compiled_compress  the same with the compression's eager body
             (``ADAKV_UNTRACED_COMPILED_COMPRESS=0``; the default since session 13) or compiled once for all layers
             (``=1``; the default in bench/results/start-profile-s13-8L/32L-h200, where ``adakv_untraced`` used it)
  adakv_untraced_nogemv  ``adakv_untraced`` with ``gemv=False`` (cuBLAS projections in the decode graph)
  adakv_untraced_decode_opaque  ``adakv_untraced`` with the decode graph's Triton ops as opaque ops
             (``ADAKV_DECODE_OPAQUE=1``, passes/opaque.py; the default for CUDA-graphed decode since session 14)
  adakv_untraced_prewarm, adakv_untraced_noprewarm  ``adakv_untraced`` with / without helper processes compiling
             the opaque decode ops' Triton kernels during the decode graph's compile (``ADAKV_PREWARM=1`` / ``0``,
             prewarm.py; off by default since it showed no gain — in start-profile-s14-8L-prewarm*-h200 the
             ``adakv_untraced`` rows ran with it on, the default while they were measured)
  adakv_untraced_decode_inlined, adakv_decode_inlined  ``adakv_untraced`` / ``adakv`` with the decode graph's
             Triton ops inlined by Inductor (``ADAKV_DECODE_OPAQUE=0``, the default before session 14)

    python bench/start.py --sizes 8x8192x16 --out bench/results/start-h200.json
    python bench/start.py --sizes 32x32768x256 --append --out bench/results/start-h200.json
    python bench/start.py --sizes 8x8192x16,32x32768x256 --methods adakv_regions,adakv_eager_prefill --append \
        --out bench/results/start-h200.json
    python bench/start.py --device cpu --small --sizes 2x256x4 --out /tmp/start-cpu.json   # smoke test

Writes JSON rows ``layers``, ``context``, ``new_tokens``, ``method``, ``cold_s``, ``warm_s``, ``second_s``,
``device`` (+ cache counters of the warm child) and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


ADAKV_METHODS = {"adakv": {}, "adakv_regions": {"prefill_compiler": "regions"},  # method -> AdaKVConfig fields
                 "adakv_eager_prefill": {"prefill_compiler": "eager"}, "adakv_compress_per_layer": {},
                 "adakv_once": {}, "adakv_regions_once": {"prefill_compiler": "regions"},
                 "adakv_eager_prefill_once": {"prefill_compiler": "eager"},
                 "adakv_untraced": {"prefill_compiler": "untraced"},
                 "adakv_untraced_eager_compress": {"prefill_compiler": "untraced"},
                 "adakv_untraced_compiled_compress": {"prefill_compiler": "untraced"},
                 "adakv_untraced_nogemv": {"prefill_compiler": "untraced", "gemv": False},
                 "adakv_untraced_decode_opaque": {"prefill_compiler": "untraced"},
                 "adakv_untraced_decode_inlined": {"prefill_compiler": "untraced"}, "adakv_decode_inlined": {},
                 "adakv_untraced_noprewarm": {"prefill_compiler": "untraced"},
                 "adakv_untraced_prewarm": {"prefill_compiler": "untraced"}}
# method -> environment of its child: the compression inlined into every layer (as before compress_once), or
# compiled once for all layers whatever the layer count (passes/compress_once.py)
_ONCE = {"ADAKV_COMPRESS_ONCE": "1"}
METHOD_ENV = {"adakv_compress_per_layer": {"ADAKV_COMPRESS_ONCE": "0"}, "adakv_once": _ONCE,
              "adakv_regions_once": _ONCE, "adakv_eager_prefill_once": _ONCE,
              "adakv_untraced_eager_compress": {"ADAKV_UNTRACED_COMPILED_COMPRESS": "0"},
              "adakv_untraced_compiled_compress": {"ADAKV_UNTRACED_COMPILED_COMPRESS": "1"},
              "adakv_untraced_decode_opaque": {"ADAKV_DECODE_OPAQUE": "1"},
              "adakv_untraced_decode_inlined": {"ADAKV_DECODE_OPAQUE": "0"}, "adakv_decode_inlined": {"ADAKV_DECODE_OPAQUE": "0"},
              "adakv_untraced_noprewarm": {"ADAKV_PREWARM": "0"}, "adakv_untraced_prewarm": {"ADAKV_PREWARM": "1"}}


def child(a) -> dict:
    """One process: build, compile, first generate (timed), second generate (timed)."""
    import torch
    from e2e import build

    from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
    from adakv_compile.cache import cache_kwarg

    dev = a.device
    model = build(a.layers, torch.float32 if dev == "cpu" else torch.bfloat16, small=a.small, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (a.batch, a.context), device=dev, generator=g)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    caches = []

    def generate():
        if a.method == "hf_static":
            return model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                  cache_implementation="static")
        if caches:  # the second call reuses the cache, as a server would (a new one = new static addresses)
            caches[0].reset()
        else:
            caches.append(AdaKVCache(model, backend, batch_size=a.batch, max_new_tokens=a.new))
        cache = caches[0]
        return model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                              **{cache_kwarg(model): cache})

    sync()
    t0 = time.perf_counter()
    if a.method in ADAKV_METHODS:
        backend = compile_model(model, AdaKVConfig(budget=a.budget, **ADAKV_METHODS[a.method]))
    elif a.method != "hf_static":
        raise ValueError(f"--method {a.method!r}: hf_static or one of {sorted(ADAKV_METHODS)}")
    with torch.no_grad():
        out = generate()
        sync()
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        out2 = generate()
        sync()
        second = time.perf_counter() - t1
    from torch._dynamo.utils import counters
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return dict(first_s=first, second_s=second, new_tokens=int(out.shape[1] - ids.shape[1]),
                same_tokens_twice=bool(torch.equal(out, out2)),
                fx_hit=ind["fxgraph_cache_hit"], fx_miss=ind["fxgraph_cache_miss"],
                fx_bypass=ind["fxgraph_cache_bypass"], aot_hit=aot["autograd_cache_hit"],
                aot_miss=aot["autograd_cache_miss"], aot_bypass=aot["autograd_cache_bypass"])


def child_env(cache_dir: Path, method: str = "") -> dict:
    """The environment of a child process whose Inductor and Triton caches live in ``cache_dir`` (empty: cold;
    left by an earlier child: warm), importing this checkout; plus the method's switches (``METHOD_ENV``)."""
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TRITON_CACHE_DIR=str(cache_dir / "triton"),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **METHOD_ENV.get(method, {}))


def child_args(a, method: str, layers: int, context: int, new: int) -> list[str]:
    """This script's ``--child`` arguments (after the interpreter): one first ``generate`` (``child``)."""
    return [str(Path(__file__).resolve()), "--child", "--method", method, "--layers", str(layers),
            "--context", str(context), "--new", str(new), "--batch", str(a.batch), "--budget", str(a.budget),
            "--device", a.device] + (["--small"] if a.small else [])


def spawn(a, method: str, layers: int, context: int, new: int, cache_dir: Path) -> dict:
    env = child_env(cache_dir, method)
    cmd = [sys.executable] + child_args(a, method, layers, context, new)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "process_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def write(res: dict, out: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from stamp import md_header

    out.write_text(json.dumps(res, indent=1))
    lines = [f"# First `generate` of a process, {res['device']}", "",
             f"torch {res['torch']}, transformers {res['transformers']}; batch {res['batch']}, budget "
             f"{res['budget']}; seconds from `compile_model` (adakv) / the call (HF) to the end of the first "
             "`generate`; cold = empty Inductor/Triton cache dirs, warm = a new process on the cache the cold one "
             "left; second = the next `generate` in the warm process.", "",
             "| layers | context + new | method | cold s | warm s | second s | adakv / HF cold | adakv / HF warm |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["layers"], r["context"], r["new_tokens"], r["method"]): r for r in res["rows"]}
    for r in res["rows"]:
        hf = by.get((r["layers"], r["context"], r["new_tokens"], "hf_static"), {})

        def ratio(k):
            return f"{r[k] / hf[k]:.2f}×" if r["method"] != "hf_static" and r.get(k) and hf.get(k) else ""

        def s(k):
            return f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "—"
        lines.append(f"| {r['layers']} | {r['context']} + {r['new_tokens']} | {r['method']} | {s('cold_s')} | "
                     f"{s('warm_s')} | {s('second_s')} | {ratio('cold_s')} | {ratio('warm_s')} |")
    out.with_suffix(".md").write_text(md_header(res["device"]) + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8x8192x16,32x32768x256", help="layers x context x new tokens, comma-separated")
    ap.add_argument("--methods", default="hf_static,adakv", help="hf_static, " + ", ".join(ADAKV_METHODS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="a tiny Llama (CPU smoke test)")
    ap.add_argument("--timeout", type=int, default=480, help="seconds per child process")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--out", default="bench/results/start.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--new", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    import torch
    import transformers
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "batch": a.batch, "budget": a.budget, "rows": []}
    if a.append and out.exists():
        res = json.loads(out.read_text())
        if res["device"] != device:
            sys.exit(f"{out} holds results from {res['device']}: not appending numbers from another card")
    for size in a.sizes.split(","):
        layers, context, new = (int(x) for x in size.split("x"))
        for method in a.methods.split(","):
            with tempfile.TemporaryDirectory(prefix="adakv-start-") as tmp:
                cold = spawn(a, method, layers, context, new, Path(tmp))
                warm = spawn(a, method, layers, context, new, Path(tmp)) if "error" not in cold else cold
            row = dict(layers=layers, context=context, new_tokens=new, batch=a.batch, method=method,
                       cold_s=cold.get("first_s"), warm_s=warm.get("first_s"), second_s=warm.get("second_s"),
                       device=device, cold=cold, warm=warm)
            res["rows"] = [r for r in res["rows"] if (r["layers"], r["context"], r["new_tokens"], r["method"])
                           != (layers, context, new, method)] + [row]
            print(f"{layers:>2}L {context}+{new} {method:<10} cold {row['cold_s']} s  warm {row['warm_s']} s  "
                  f"second {row['second_s']} s  warm cache fx {warm.get('fx_hit')}/{warm.get('fx_miss')} "
                  f"aot {warm.get('aot_hit')}/{warm.get('aot_miss')} (hit/miss)"
                  + (f"  ERROR {cold.get('error') or warm.get('error')}" if row["cold_s"] is None
                     or row["warm_s"] is None else ""), flush=True)
            write(res, out)


if __name__ == "__main__":
    main()
