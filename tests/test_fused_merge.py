"""The fused split-K merge on the compiled path (issue 17, ``ADAKV_FUSED_MERGE=1``): the attention launch's
last piece per (row, head) merges the pieces, counting arrivals on the cache layer's ``sem`` buffer, instead
of a second launch. Outputs equal the two-launch path; the counters are left zeroed; Inductor's mutation
analysis sees only the output, workspaces and counters written. Kernels run through Triton's interpreter
on CPU (tests/conftest.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes.rewrite import fused_merge
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded
from tests.test_sinks import gpt_oss
from tests.test_static_cache import build

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")


def _case(seed, B, Hkv, G, D, t, per, dtype):
    """Segments of odd random lengths (one empty, one full) in a static-cache layout of ``per`` slots each."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(t, per + 1, (B, Hkv), generator=g, dtype=torch.int32)
    lens[0, 0] = 0
    lens[-1, -1] = per
    off = (torch.arange(B * Hkv) * per).reshape(B, Hkv).to(torch.int32)
    pool_k = torch.randn(B * Hkv * per + 1, D, generator=g).to(dtype)
    pool_v = torch.randn(B * Hkv * per + 1, D, generator=g).to(dtype)
    q = torch.randn(B, Hkv * G, t, D, generator=g).to(dtype)
    sinks = torch.randn(Hkv * G, generator=g) * 2
    return [x.to(DEV) for x in (q, pool_k, pool_v, off, lens, sinks)]


# (B, Hkv, G, D, t, slots per segment, dtype, launch kwargs): fixed pieces (static cache mode), equal pieces,
# fewer programs than pieces, a chunk of several queries
CASES = [
    (2, 2, 2, 16, 1, 150, torch.float32, dict(max_len_bound=300, split_tokens=32, block_n=16)),
    (3, 2, 4, 24, 1, 97, torch.float32, dict(num_splits=3, block_n=16)),
    (1, 3, 1, 16, 1, 130, torch.float32, dict(max_len_bound=390, split_tokens=32, block_n=16, grid_pieces=2)),
    (2, 2, 3, 16, 3, 77, torch.bfloat16, dict(max_len_bound=154, split_tokens=16, block_n=16)),
]


@needs_triton
@pytest.mark.parametrize("case, with_sinks", [(0, False), (0, True), (1, True), (2, False), (3, True)])
def test_fused_merge_equals_the_merge_launch(case, with_sinks):
    from adakv_compile.kernels.triton_attend import merge_counters, store_attention_triton

    B, Hkv, G, D, t, per, dtype, kw = CASES[case]
    q, pool_k, pool_v, off, lens, sinks = _case(case, B, Hkv, G, D, t, per, dtype)
    sinks = sinks if with_sinks else None
    want = store_attention_triton(q, pool_k, pool_v, off, lens, t, D ** -0.5, sinks=sinks, **kw)
    sem = torch.zeros(merge_counters(B, Hkv, Hkv * G, t, D), dtype=torch.int32, device=DEV)
    for _ in range(2):  # twice: the first launch must leave the counters zeroed for the second
        got = store_attention_triton(q, pool_k, pool_v, off, lens, t, D ** -0.5, sinks=sinks, fused_merge=True,
                                     semaphores=sem, **kw)
        assert torch.equal(got, want)
        assert not sem.any()


@needs_triton
def test_semaphores_are_checked():
    from adakv_compile.kernels.triton_attend import store_attention_triton

    q, pool_k, pool_v, off, lens, _ = _case(0, *CASES[0][:6], torch.float32)
    with pytest.raises(ValueError, match="semaphores"):
        store_attention_triton(q, pool_k, pool_v, off, lens, 1, 0.25, num_splits=2, fused_merge=True,
                               semaphores=torch.zeros(64, dtype=torch.int64, device=DEV))


def test_env_is_validated(monkeypatch):
    monkeypatch.setenv("ADAKV_FUSED_MERGE", "yes")
    with pytest.raises(ValueError, match="ADAKV_FUSED_MERGE must be 0 or 1"):
        fused_merge()
    monkeypatch.setenv("ADAKV_FUSED_MERGE", "1")
    assert fused_merge()
    monkeypatch.delenv("ADAKV_FUSED_MERGE")
    assert not fused_merge() and not fused_merge(torch.device("cpu"))  # unset: on for CUDA only
    assert fused_merge(torch.device("cuda"))
    monkeypatch.setenv("ADAKV_FUSED_MERGE", "0")
    assert not fused_merge(torch.device("cuda"))


def _spy_launches(monkeypatch):
    from adakv_compile.kernels import triton_attend

    names = []
    real = triton_attend.launcher

    def spying(kernel, probe):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel, probe)

    monkeypatch.setattr(triton_attend, "launcher", spying)
    # pieces sized as on an H200 (132 SMs) with a 64-token floor (the launcher's is MIN_PIECE = 256): 64-token
    # pieces here, so the decode attention of these tiny models splits on CPU too
    monkeypatch.setattr(triton_attend, "_sm_count", lambda device: 132)
    monkeypatch.setattr(triton_attend, "MIN_PIECE", 64)
    return names


def _generate(monkeypatch, make, cfg, ids, am, new, merged: str):
    monkeypatch.setenv("ADAKV_FUSED_MERGE", merged)
    monkeypatch.setenv("ADAKV_KERNELS", "interpret")
    torch._dynamo.reset()
    launches = _spy_launches(monkeypatch)
    model = make()  # a fresh model per compile (same seed: same weights)
    backend = compile_model(model, cfg, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -new:]
    monkeypatch.undo()
    return out, cache, launches


@needs_triton
@pytest.mark.parametrize("family", ["llama", "gpt-oss"])
def test_fast_path_generate_equals_the_merge_launch_and_the_oracle(monkeypatch, family):
    """Tiny models on the fast path (a budget above one 64-token piece, so the decode attention splits):
    the same tokens with the fused merge as with the merge launch and as the eager oracle; gpt-oss has
    sinks (joined once, by the merging piece)."""
    cfg = AdaKVConfig(budget=80, window=4)
    ids, am = left_padded([200, 150], seed=5)
    make = (lambda: build(seed=80)) if family == "llama" else gpt_oss
    new = 4
    want = ReferenceSession(make(), cfg).generate(ids, attention_mask=am, max_new_tokens=new)[:, -new:]
    two, _, two_launches = _generate(monkeypatch, make, cfg, ids, am, new, "0")
    one, cache, one_launches = _generate(monkeypatch, make, cfg, ids, am, new, "1")
    assert torch.equal(two, want)
    assert torch.equal(one, want)
    full = sum(1 for layer in cache.layers if hasattr(layer, "sem"))
    decode = (new - 1) * full  # decode steps x full-attention layers: one launch each instead of two
    assert two_launches.count("_store_attn_merge") == decode, two_launches
    assert one_launches.count("_store_attn_merge") == 0, one_launches
    assert one_launches.count("_store_attn_fwd") == two_launches.count("_store_attn_fwd")
    assert all(not layer.sem.any() for layer in cache.layers if hasattr(layer, "sem"))
    cache.layers[-1].sem.fill_(3)  # as an aborted launch could leave them: reset() zeroes the counters
    cache.reset()
    assert not cache.layers[-1].sem.any()


def test_inductor_sees_only_the_declared_writes():
    """Inductor's mutation analysis of the launches (CUDA target's TTIR, compiled without a GPU in a fresh
    process): the attention writes its output, workspaces and (fused merge) the counters, never the pools,
    offsets or lengths; every kernel argument is passed. (A failed analysis reads as 'every input written',
    and Inductor would then copy the pools every step.) And the layer's graph after Inductor's reinplacing."""
    pytest.importorskip("triton.backends.nvidia")
    script = os.path.join(os.path.dirname(__file__), "attend_writes.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "assuming every input is mutated" not in run.stderr, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # one decode layer as Inductor lowers it (post-grad graph): the fused merge is one attention launch that
    # writes the layer's counters in place (a graph input), with no copy or clone beyond the default's
    # (the plain CPU append's length update)
    default, merged = got.pop("layer/default"), got.pop("layer/merged")
    assert default["launches"] == ["_store_attn_fwd", "_store_attn_merge"], default
    assert merged["launches"] == ["_store_attn_fwd"] and merged["sem_is_input"], merged
    assert merged["copied"] == default["copied"] and len(default["copied"]) <= 1, (default, merged)
    assert got == {
        "one-pass/_store_attn_fwd": ["OUT"],
        "split/_store_attn_fwd": ["WS_ACC", "WS_L", "WS_M"],
        "split/_store_attn_merge": ["OUT"],
        "split-fused/_store_attn_fwd": ["OUT", "SEM", "WS_ACC", "WS_L", "WS_M"],
    }, got
