"""Run as a script (tests/test_ttir_memo.py): the TTIR analysis memo (kernels/ttir_memo.py) against torch's own
analysis, the CUDA target's TTIR compiled here without a GPU (Triton's driver swapped for a stand-in, as in
tests/attend_writes.py). Prints one JSON line.

``unit``: every launch of our kernels (attention one-pass / split / split-fused, the static append, the scorer's
and the fill's kernels, the GEMV) captured on CPU tensors; per launch: the memo's answer equals torch's (real
and fake tensors), a repeat is a hit that does not call torch, the result names only kernel arguments; on the
attention launch a changed constexpr / dtype / int specialisation is a miss (and still equals torch's); a
mutated result does not corrupt the memo; a foreign kernel is not memoised. Times torch's call and a hit.

``compile``: how many analysis calls reach torch while Inductor compiles two decode layers (static_append then
static_attend and an adakv::gemv projection, each layer its own cache tensors and weight; ADAKV_KERNELS=interpret, lowering stopped before codegen).
``compile off``: the same without the memo (``ttir_memo.uninstall()``).
"""
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime  # noqa: E402


from tests.sm90_target import capturing_launcher, use_sm90_target  # noqa: E402

use_sm90_target()

import torch._higher_order_ops.triton_kernel_wrap as tkw  # noqa: E402

from adakv_compile.kernels import ttir_memo  # noqa: E402  (installed by adakv_compile.kernels)

PART = sys.argv[1] if len(sys.argv) > 1 else "unit"
TORCH_CALLS = [0]
ANALYSIS_S = [0.0]


def _timed(fn):
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            ANALYSIS_S[0] += time.perf_counter() - t0
    return timed


def _counting(fn):
    def counted(*a, **k):
        TORCH_CALLS[0] += 1
        return fn(*a, **k)
    return counted


if PART == "compile":
    if sys.argv[2:] == ["off"]:
        ttir_memo.uninstall()
    ttir_memo.wrap_torch(_counting)
    import torch._inductor.graph as ind_graph  # noqa: E402

    from adakv_compile.kernels import triton_attend as ta  # noqa: E402

    os.environ["ADAKV_KERNELS"] = "interpret"  # the ops' Triton branch on CPU tensors (traced, never run)
    from adakv_compile.kernels import triton_gemv as tg  # noqa: E402

    ta._sm_count = tg._sm_count = lambda device: 132  # split as on an H200
    tg._interpreting = lambda device: False  # the CUDA configs
    ta.is_interpreted = lambda: True  # CPU tensors stand in for the device ones (traced only, never run)

    class _Stop(Exception):
        pass

    lowered = []

    def _stop(self, *a, **k):  # after lowering (UserDefinedTritonKernel built), before codegen
        lowered.append(1)
        raise _Stop

    ind_graph.GraphLowering.compile_to_module = _stop
    B, Hkv, G, D, S, t, L = 1, 2, 4, 64, 256, 1, 2
    layers = []
    for _ in range(L):
        st = dict(pool_k=torch.zeros(B * S + 1, D, dtype=torch.bfloat16),
                  pool_v=torch.zeros(B * S + 1, D, dtype=torch.bfloat16),
                  off=torch.zeros(B, Hkv, dtype=torch.int32), lens=torch.zeros(B, Hkv, dtype=torch.int32),
                  pos=torch.zeros(B * S + 1, dtype=torch.int32), seen=torch.zeros((), dtype=torch.int64))
        for x in st.values():
            torch._dynamo.mark_static_address(x)
        st["w"] = torch.randn(Hkv * G * D, Hkv * G * D, dtype=torch.bfloat16)  # a projection (adakv::gemv)
        layers.append(st)

    def model(q, k_new, v_new):
        out = q
        for st in layers:
            torch.ops.adakv.static_append(k_new, v_new, st["pool_k"], st["pool_v"], st["off"], st["lens"],
                                          st["pos"], st["seen"])
            out = out + torch.ops.adakv.static_attend(out, st["pool_k"], st["pool_v"], st["off"], st["lens"],
                                                      0.1, 0.0, S)
            out = torch.ops.adakv.gemv(out.reshape(B, -1), st["w"]).reshape(out.shape)
        return out

    q = torch.randn(B, Hkv * G, t, D, dtype=torch.bfloat16)
    kv = torch.randn(B, Hkv, t, D, dtype=torch.bfloat16)
    ttir_memo.wrap_torch(lambda fn: _timed(fn))
    t0 = time.perf_counter()
    try:
        torch.compile(model, backend="inductor", fullgraph=True)(q, kv, kv)
    except Exception:  # noqa: BLE001 - _Stop, wrapped by Dynamo
        if not lowered:
            raise
    print(json.dumps(dict(ttir_memo.stats(), layers=L, analysis_calls=TORCH_CALLS[0], lowered=len(lowered),
                          compile_s=time.perf_counter() - t0, analysis_s=ANALYSIS_S[0])))
    sys.exit(0)

# ---- unit -----------------------------------------------------------------------------------------------------
NAME = next(n for n in ttir_memo._FUNCS if n in ttir_memo._torch_fn)
torch_fn = ttir_memo._torch_fn[NAME]  # torch's own analysis (no memo)
memo_fn = getattr(tkw, NAME)  # what torch's callers now call
ttir_memo.wrap_torch(_counting)

from adakv_compile.config import AdaKVConfig  # noqa: E402
from adakv_compile.kernels import triton_attend as ta  # noqa: E402
from adakv_compile.kernels import triton_append as tap  # noqa: E402
from adakv_compile.kernels import triton_fill as tf  # noqa: E402
from adakv_compile.kernels import triton_gemv as tg  # noqa: E402
from adakv_compile.kernels import triton_score as ts  # noqa: E402

launches = []


_capture = capturing_launcher(launches)


for mod in (ta, ts, tg):
    mod.launcher = _capture
    mod._interpreting = lambda device: False  # the CUDA code path (DOT_F32 off)
    mod._sm_count = lambda device: 132
for mod in (ta, ts):
    mod.is_interpreted = lambda: True  # CPU tensors stand in for the device ones (only dtypes matter here)


def capture(label, fn):
    launches.clear()
    fn()
    return [(f"{label}/{k.fn.__name__}", k, named) for k, named in launches]


bf = torch.bfloat16
B, Hkv, G, D, S, t = 2, 2, 4, 128, 512, 1
q = torch.randn(B, Hkv * G, t, D, dtype=bf)
pool_k, pool_v = torch.randn(B * S + 1, D, dtype=bf), torch.randn(B * S + 1, D, dtype=bf)
off, lens = torch.zeros(B, Hkv, dtype=torch.int32), torch.zeros(B, Hkv, dtype=torch.int32)
pos, seen = torch.zeros(B * S + 1, dtype=torch.int32), torch.zeros((), dtype=torch.int64)
sem = torch.zeros(64, dtype=torch.int32)
kn, vn = torch.randn(B, Hkv, t, D, dtype=bf), torch.randn(B, Hkv, t, D, dtype=bf)
n, w = 256, 32
qp, kp = torch.randn(B, Hkv * G, n, D, dtype=bf), torch.randn(B, Hkv, n, D, dtype=bf)
keep = torch.rand(B, Hkv, n) < 0.5
cases = []
cases += capture("one-pass", lambda: ta.store_attention_triton(q, pool_k, pool_v, off, lens, t, 0.1, num_splits=1))
cases += capture("split", lambda: ta.store_attention_triton(q, pool_k, pool_v, off, lens, t, 0.1, max_len_bound=S,
                                                            split_tokens=128))
cases += capture("split-fused", lambda: ta.store_attention_triton(q, pool_k, pool_v, off, lens, t, 0.1,
                                                                  max_len_bound=S, split_tokens=128,
                                                                  fused_merge=True, semaphores=sem))
cases += capture("append", lambda: tap.static_append_triton(pool_k, pool_v, off, lens, pos, seen, kn, vn))
cases += capture("score", lambda: ts.window_scores_triton(qp, kp, torch.ones(B, n, dtype=torch.bool),
                                                          AdaKVConfig(budget=64, window=w), 0.1, num_splits=2))
cases += capture("fill", lambda: (tf.segment_slots(keep, keep.sum(-1), 4, S),
                                  tf.scatter_kept(kp, kp, torch.zeros(B * Hkv * n, dtype=torch.int64), pool_k,
                                                  pool_v, pos)))
cases += capture("gemv", lambda: tg.gemv_triton(torch.randn(1, 4096, dtype=bf), torch.randn(256, 4096, dtype=bf),
                                                config=tg.GemvConfig(32, 128, 4, 2, False)))


def norm(result):
    """A comparable form of either torch API's result."""
    if isinstance(result, list):
        return dict(writes=sorted(result))
    rw = result.read_writes
    return dict(writes=sorted(d.name for d in rw.writes), reads=sorted(d.name for d in rw.reads),
                can_fuse_epilogue=result.can_fuse_epilogue)


def probe(kernel, named):
    """(memo's answer, whether it was a hit, torch calls it made)."""
    before, calls = ttir_memo.stats(), TORCH_CALLS[0]
    got = norm(memo_fn(kernel, dict(named), {}))
    after = ttir_memo.stats()
    return got, after["hits"] - before["hits"], TORCH_CALLS[0] - calls


def fake(named):
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    return {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in named.items()}


out = dict(api=NAME, launches={}, variants={})
times = {}
for label, kernel, named in cases:
    ttir_memo.reset()
    want = norm(torch_fn(kernel, dict(named), {}))
    t0 = time.perf_counter()
    first = probe(kernel, named)
    t_miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = probe(kernel, named)
    t_hit = time.perf_counter() - t0
    fk = fake(named)
    third = probe(kernel, fk)
    want_fake = norm(torch_fn(kernel, dict(fk), {}))
    names = set(want["writes"]) | set(want.get("reads", ()))
    out["launches"][label] = dict(
        want=want, first=first[0] == want, first_hit=first[1], first_calls=first[2],
        repeat=second[0] == want, repeat_hit=second[1], repeat_calls=second[2],
        fake=third[0] == want_fake, fake_hit=third[1], fake_calls=third[2],
        names_are_args=names <= set(kernel.arg_names), bypass=ttir_memo.stats()["bypass"])
    times[label] = (t_miss, t_hit)

# variants of the one-pass attention launch: each a miss, each equal to torch's on its own arguments
label, kernel, named = cases[0]
idx = {p.name: p for p in kernel.params}
flag = next(k for k, v in named.items() if idx[k].is_constexpr and isinstance(v, bool))
num = next(k for k, v in named.items() if not idx[k].is_constexpr and type(v) is int and v > 1
           and not idx[k].do_not_specialize)
variants = {
    f"constexpr {flag}": {**named, flag: not named[flag]},
    "dtype fp16": {k: v.to(torch.float16) if isinstance(v, torch.Tensor) and v.dtype == bf else v
                   for k, v in named.items()},
    f"int {num}=1": {**named, num: 1},
    f"int {num}+1": {**named, num: named[num] + 1},
}
ttir_memo.reset()
probe(kernel, named)
for vname, args in variants.items():
    got, hit, calls = probe(kernel, args)
    out["variants"][vname] = dict(equal=got == norm(torch_fn(kernel, dict(args), {})), hit=hit, calls=calls)

# Dynamo wraps a launch given num_warps in a fresh one-config Autotuner per trace: keyed as its JITFunction plus
# the config's kwargs (a config overriding a constexpr is another key)
from triton.runtime.autotuner import Config, autotune  # noqa: E402

for vname, cfg in (("autotuner", Config({}, num_warps=4)), ("autotuner again", Config({}, num_warps=8)),
                   (f"autotuner {flag}", Config({flag: not named[flag]}, num_warps=4))):
    tuned = autotune(configs=[cfg], key=[])(kernel)
    got, hit, calls = probe(tuned, named)
    out["variants"][vname] = dict(equal=got == norm(torch_fn(tuned, dict(named), {})), hit=hit, calls=calls)

# a caller mutating its result does not change the memo
res = memo_fn(kernel, dict(named), {})
(res.clear() if isinstance(res, list) else (res.read_writes.writes.clear(), res.read_writes.reads.clear()))
out["after_mutation"] = probe(kernel, named)[0] == norm(torch_fn(kernel, dict(named), {}))


@triton.jit
def _foreign_kernel(X, Y, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)


fargs = dict(X=torch.zeros(8), Y=torch.zeros(8), N=8, BLOCK=8)
before = ttir_memo.stats()
calls = TORCH_CALLS[0]
f1, f2 = norm(memo_fn(_foreign_kernel, dict(fargs), {})), norm(memo_fn(_foreign_kernel, dict(fargs), {}))
after = ttir_memo.stats()
out["foreign"] = dict(calls=TORCH_CALLS[0] - calls, foreign=after["foreign"] - before["foreign"],
                      entries=after["entries"] - before["entries"], writes=f1["writes"], same=f1 == f2)
# the older torch API (identify_mutated_tensors -> list of names), emulated from the current one
import types  # noqa: E402


def identify_mutated_tensors(kernel, kwargs, tma_descriptor_metadata):
    return norm(torch_fn(kernel, kwargs, tma_descriptor_metadata))["writes"]


old_api = types.SimpleNamespace(identify_mutated_tensors=identify_mutated_tensors)
if "identify_mutated_tensors" not in ttir_memo._torch_fn and ttir_memo._install_into(old_api):
    ttir_memo.reset()
    r1 = old_api.identify_mutated_tensors(kernel, dict(named), {})
    r1.clear()  # the caller's copy
    r2 = old_api.identify_mutated_tensors(kernel, fake(named), {})
    out["old_api"] = dict(list=isinstance(r2, list), writes=r2, want=norm(torch_fn(kernel, dict(named), {}))["writes"],
                          **{k: ttir_memo.stats()[k] for k in ("hits", "misses")})
out["ms"] = {k: [round(1e3 * a, 3), round(1e3 * b, 3)] for k, (a, b) in times.items()}
print("per launch, ms: first call (torch's analysis + memo) / repeat (hit):", file=sys.stderr)
for k, (a, b) in times.items():
    print(f"  {k:40s} {1e3 * a:8.2f} {1e3 * b:8.3f}", file=sys.stderr)
print(json.dumps(out))
