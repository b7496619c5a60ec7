"""Where the first ``model.generate`` of a process goes: compile stage by stage, cold and on a warm cache.

For each layer count and method, two child processes on one fresh ``TORCHINDUCTOR_CACHE_DIR`` (cold, then a
restart: warm). Each builds a small Llama (hidden 256, fp32 on the CPU; Llama-3.1-8B shapes on CUDA unless
``--small``), times its first ``generate`` end to end and splits that time, *exclusively* (a stage's time
excludes the stages it calls), over:
  dynamo            Dynamo's bytecode tracing and guards (``convert_frame._compile`` less the backend)
  adakv: detect / trace / dataflow / plan / shard / rewrite / mask proof / fake_values / passes other
                    the pass pipeline (``run_passes``); ``mask proof`` is ``passes.mask.prove`` (sympy + SAT)
  adakv: chunk / merge_linears / config_variants / backend other
                    the backend's own work around the passes
  aot[kind]         AOTAutograd (``compile_fx`` less Inductor's inner compile; with the AOTAutograd cache
                    this is also the cache lookup and load)
  inductor[kind]    Inductor's ``_compile_fx_inner``: FX-graph cache lookup, lowering, codegen, C++/Triton
                    compile; kind = prefill | decode | region (a chunked region, compiled at its first run)
                    | hf (HF static's own compile)
  triton analysis   torch's TTIR access analysis of traced Triton launches (``identify_accessed_tensors``, from
                    AOT functionalization and Inductor's lowering): the calls that reach torch -- memo misses and
                    calls the memo does not take (kernels/ttir_memo.py; hits cost microseconds, in their caller).
                    Each row also has ``ttir_memo`` (hits, misses, foreign, bypass, torch_calls, torch_s)
  run               everything else: the model's eager code, the compiled code, the cache setup
Methods: ``hf_static`` (HF's static cache; on the CPU its auto-compile is switched on with
``CompileConfig._compile_all_devices``, on CUDA it is on by itself), ``adakv`` (``compile_model`` +
``AdaKVCache``), ``adakv_regions`` / ``adakv_eager_prefill`` (the same with ``AdaKVConfig(prefill_compiler=
"regions" / "eager")``).

    python bench/start_profile.py                                  # CPU: 8 and 32 layers, 1 x 2048 + 8
    python bench/start_profile.py --layers 2 --context 256 --new 2 --out /tmp/sp.json   # smoke test
    python bench/start_profile.py --device cuda --layers 8 --context 8192 --new 16 \
        --out bench/results/start-profile-8L-h200.json

``--no-ttir-memo``: the children take the memo out (``ttir_memo.uninstall``; torch's analysis on every launch),
to compare.

Writes JSON (rows: layers, context, method, phase cold|warm, total_s, stages{...}, cache counters, device)
and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from start import child_env  # noqa: E402  (the children's cache environment, as bench/start.py)

TOTAL: dict = defaultdict(float)
COUNT: dict = defaultdict(int)
_STACK: list = []
_KIND = ["hf"]


def _timed(name: str, orig, kind=None, sets_kind=None):
    """``orig`` wrapped to add its exclusive wall time to ``TOTAL[name]`` (``{kind}`` in ``name`` is the
    graph kind being compiled). ``kind``: the kind while inside; ``sets_kind(result)``: the kind from here on
    (run_passes tells prefill from decode)."""

    @functools.wraps(orig)
    def wrapper(*a, **k):
        prev = _KIND[0]
        if kind is not None:
            _KIND[0] = kind
        label = name.format(kind=_KIND[0])
        t0 = time.perf_counter()
        _STACK.append(0.0)
        restore = True
        try:
            out = orig(*a, **k)
            if sets_kind is not None:
                _KIND[0] = sets_kind(out)
                restore = False
            return out
        finally:
            el = time.perf_counter() - t0
            inner = _STACK.pop()
            TOTAL[label] += el - inner
            COUNT[label] += 1
            if _STACK:
                _STACK[-1] += el
            if restore:
                _KIND[0] = prev
    return wrapper


def _patch(obj, attr: str, name: str, **kw) -> None:
    if not hasattr(obj, attr):  # another torch version: that stage is then counted in its caller
        print(f"start_profile: {getattr(obj, '__name__', obj)}.{attr} not found; not timed apart", file=sys.stderr)
        return
    setattr(obj, attr, _timed(name, getattr(obj, attr), **kw))


def instrument(no_memo: bool = False) -> None:
    import torch._dynamo.convert_frame as cf
    import torch._inductor.compile_fx as cfx

    import adakv_compile.backend as backend
    import adakv_compile.passes as passes
    import adakv_compile.passes.chunk as chunk
    import adakv_compile.passes.mask as mask

    _patch(cf, "_compile", "dynamo")
    _patch(cfx, "compile_fx", "aot[{kind}]")
    _patch(cfx, "_compile_fx_inner", "inductor[{kind}]")
    for attr, name in (("find_attention", "detect"), ("trace_cache", "trace"), ("attention_depths", "dataflow"),
                       ("plan", "plan"), ("find_tp_group", "shard"), ("rewrite_site", "rewrite"),
                       ("fill_fake_values", "fake_values")):
        _patch(passes, attr, "adakv: " + name)
    _patch(mask, "prove", "adakv: mask proof")

    def kind_of(result):
        if result.static is not None:
            return "prefill" if result.static.phase == "prefill" else "decode"
        return "prefill" if any(p.phase == "prefill" for p in result.planned) else "decode"
    backend.run_passes = _timed("adakv: passes other", backend.run_passes, sets_kind=kind_of)
    _patch(backend.AdaKVBackend, "__call__", "adakv: backend other", kind="graph")
    _patch(backend.AdaKVBackend, "_chunked", "adakv: chunk")
    _patch(backend, "merge_linears", "adakv: merge_linears")
    _patch(backend.AdaKVBackend, "_config_variants", "adakv: config_variants")
    _patch(chunk.Region, "run", "run", kind="region")
    from adakv_compile.kernels import ttir_memo
    if no_memo:
        ttir_memo.uninstall()
    ttir_memo.wrap_torch(lambda fn: _timed("triton analysis", fn))  # behind the memo: misses + unmemoised calls


def torch_phases() -> dict:
    """torch's own ``dynamo_timed`` phases (inclusive seconds, summed over every graph of the process): what
    *inside* Dynamo / AOTAutograd / Inductor costs (lowering, scheduling, codegen, waiting for compile workers,
    cache loads), which the exclusive stages above do not split."""
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", {})  # name -> [seconds per call]
    return {name: round(sum(times), 4) for name, times in metrics.items() if times}


BACKEND = [None]  # the child's adakv backend, for its compress_once counts


def child(a) -> dict:
    import torch
    from e2e import build

    instrument(a.no_ttir_memo)
    from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
    from adakv_compile.cache import cache_kwarg

    dev = a.device
    model = build(a.layers, torch.float32 if dev == "cpu" else torch.bfloat16, small=a.small, device=dev)
    ids = torch.randint(1, model.config.vocab_size, (a.batch, a.context), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(0))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    kwargs = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)

    def first():
        if a.method == "hf_static":
            if dev != "cuda":
                from transformers import CompileConfig
                model.generation_config.compile_config = CompileConfig()
                model.generation_config.compile_config._compile_all_devices = True
            return model.generate(ids, cache_implementation="static", **kwargs)
        from start import ADAKV_METHODS
        if a.method not in ADAKV_METHODS:
            raise ValueError(f"--method {a.method!r}: hf_static or one of {sorted(ADAKV_METHODS)}")
        extra = dict(ADAKV_METHODS[a.method])
        if a.prefill_chunk is not None and a.prefill_chunk >= 0:
            extra["prefill_chunk"] = a.prefill_chunk
        backend = BACKEND[0] = compile_model(model, AdaKVConfig(budget=a.budget, **extra))
        cache = AdaKVCache(model, backend, batch_size=a.batch, max_new_tokens=a.new)
        return model.generate(ids, **{cache_kwarg(model): cache}, **kwargs)

    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        run = _timed("run", first)
        out = run()
        sync()
    total = time.perf_counter() - t0
    from torch._dynamo.utils import counters
    ind, aot = counters["inductor"], counters["aot_autograd"]
    from adakv_compile.kernels import ttir_memo
    stages = {k: round(v, 4) for k, v in sorted(TOTAL.items(), key=lambda kv: -kv[1])}
    phases = torch_phases()
    once = {}
    if BACKEND[0] is not None:  # compress_once: calls whose one-layer graph was compiled with the prefill graph,
        from adakv_compile.passes import compress_once  # and how many one-layer graphs exist after the run
        g = next((g for g in BACKEND[0].graphs if g.get("compress_once")), {})
        once = dict(calls=g.get("compress_once", 0), ahead=g.get("compress_once_ahead", 0),
                    compiled=len(compress_once.compiled_graphs(BACKEND[0]._key)))
    graphs = None if BACKEND[0] is None else dict(count=len(BACKEND[0].graphs),  # untraced: decode only
                                                  untraced_off=BACKEND[0]._untraced_off)
    return dict(compress_once=once, graphs=graphs, total_s=total, stages=stages, calls=dict(COUNT), new_tokens=int(out.shape[1] - ids.shape[1]),
                tokens=out[0, -a.new:].tolist(), fx_hit=ind["fxgraph_cache_hit"],
                fx_miss=ind["fxgraph_cache_miss"], aot_hit=aot["autograd_cache_hit"],
                aot_miss=aot["autograd_cache_miss"], aot_bypass=aot["autograd_cache_bypass"],
                ttir_memo=ttir_memo.stats(), phases=phases,
                inductor_counters={k: v for k, v in ind.items() if v})


def spawn(a, method: str, layers: int, cache_dir: Path) -> dict:
    env = child_env(cache_dir, method)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--method", method, "--layers", str(layers),
           "--context", str(a.context), "--new", str(a.new), "--batch", str(a.batch), "--budget", str(a.budget),
           "--device", a.device] + (["--small"] if a.small else []) + (
               ["--no-ttir-memo"] if a.no_ttir_memo else []) + (
               ["--prefill-chunk", str(a.prefill_chunk)] if a.prefill_chunk is not None else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


GROUPS = ("dynamo", "adakv", "aot", "inductor", "triton", "run")


def grouped(stages: dict) -> dict:
    out = {g: 0.0 for g in GROUPS}
    for k, v in stages.items():
        out[next(g for g in GROUPS if k.startswith(g))] += v
    return out


def write(res: dict, out: Path) -> None:
    from stamp import md_header

    out.write_text(json.dumps(res, indent=1))
    rows = [r for r in res["rows"] if "stages" in r]
    names = sorted({k for r in rows for k in r["stages"]}, key=lambda k: (GROUPS.index(
        next(g for g in GROUPS if k.startswith(g))), k))
    cols = [f"{r['layers']}L {r['method']} {r['phase']}" for r in rows]
    lines = [f"# First `generate`, stage by stage ({res['device']})", "",
             f"torch {res['torch']}, transformers {res['transformers']}; batch {res['batch']}, context "
             f"{res['context']} + {res['new']} new tokens, budget {res['budget']}, prefill_chunk "
             f"{res['prefill_chunk']}, TTIR analysis memo {'on' if res.get('ttir_memo', True) else 'off'}; seconds, exclusive "
             "(bench/start_profile.py).", "",
             "| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append("| **total** | " + " | ".join(f"**{r['total_s']:.2f}**" for r in rows) + " |")
    for g in GROUPS:
        lines.append(f"| **{g}** | " + " | ".join(f"{grouped(r['stages'])[g]:.2f}" for r in rows) + " |")
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{r['stages'].get(k, 0):.2f}" for r in rows) + " |")
    lines.append("| fx cache hit/miss | " + " | ".join(f"{r['fx_hit']}/{r['fx_miss']}" for r in rows) + " |")
    lines.append("| ttir memo hit/miss (calls to torch) | " + " | ".join(
        f"{m.get('hits', 0)}/{m.get('misses', 0)} ({m.get('torch_calls', 0)})" if m.get("installed") else
        f"off ({r['calls'].get('triton analysis', 0)})" for r in rows for m in [r.get("ttir_memo", {})]) + " |")
    lines += ["", "torch's own phases (`torch._dynamo.utils.compilation_time_metrics`, inclusive, summed over the process's "
              "graphs; phases under 0.2 s in every column left out):", "",
              "| phase | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    phase_names = [k for k in dict.fromkeys(k for r in rows for k in r.get("phases", {}))
                   if max(r.get("phases", {}).get(k, 0) for r in rows) >= 0.2]
    for k in phase_names:
        lines.append(f"| {k} | " + " | ".join(f"{r.get('phases', {}).get(k, 0):.2f}" for r in rows) + " |")
    out.with_suffix(".md").write_text(md_header(res["device"]) + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8,32", help="comma-separated layer counts (child: one)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="AdaKVConfig.prefill_chunk (default: automatic; the CPU default is context/2, so that the "
                         "prefill is chunked as Llama-8B shapes are at 32k on the H200; -1: automatic on the CPU too)")
    ap.add_argument("--methods", default="hf_static,adakv,adakv_eager_prefill")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--small", action="store_true", help="hidden 256 (always on for --device cpu)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-ttir-memo", action="store_true",
                    help="children without the TTIR analysis memo: torch's analysis on every traced launch")
    ap.add_argument("--out", default="bench/results/start-profile-cpu.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.small = a.small or a.device == "cpu"
    if a.prefill_chunk is None and a.device == "cpu" and not a.child:
        a.prefill_chunk = a.context // 2
    if a.child:
        a.layers = int(a.layers)
        print(json.dumps(child(a)), flush=True)
        return
    import torch
    import transformers
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    res = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "batch": a.batch, "context": a.context, "new": a.new, "budget": a.budget,
           "prefill_chunk": a.prefill_chunk, "ttir_memo": not a.no_ttir_memo, "rows": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for layers in (int(x) for x in a.layers.split(",")):
        for method in a.methods.split(","):
            with tempfile.TemporaryDirectory(prefix="adakv-start-profile-") as tmp:
                for phase in ("cold", "warm"):
                    r = spawn(a, method, layers, Path(tmp))
                    res["rows"].append(dict(layers=layers, context=a.context, method=method, phase=phase,
                                            device=device, **r))
                    if "error" in r:
                        print(f"{layers}L {method} {phase}: ERROR {r['error']}", flush=True)
                        break
                    g = grouped(r["stages"])
                    print(f"{layers:>2}L {method:<20} {phase}: {r['total_s']:7.2f} s  " + "  ".join(
                        f"{k} {v:.2f}" for k, v in g.items()) + f"  fx {r['fx_hit']}/{r['fx_miss']}  ttir analyses "
                        f"{r['calls'].get('triton analysis', 0)} (memo hits {r['ttir_memo'].get('hits', 0)})", flush=True)
                    write(res, out)


if __name__ == "__main__":
    main()
