"""The fused append (issue 17, ``ADAKV_FUSED_APPEND=1``): one launch appends the chunk and attends over the
segments; outputs and pool / lens / pos equal the two-launch path (``static_append`` then
``static_attend``) bit for bit. Kernels run through Triton's interpreter on CPU (tests/conftest.py)."""
import os

import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes.rewrite import fused_append
from tests.prompts import left_padded
from tests.test_static_cache import build

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")


def _case(seed, B, Hkv, G, D, t, S, dtype):
    """A static store with odd, random segment lengths (one empty head), room for t more tokens each."""
    g = torch.Generator().manual_seed(seed)
    per = S // Hkv
    lens = torch.randint(0, per - t + 1, (B, Hkv), generator=g, dtype=torch.int32)
    lens[0, 0] = 0
    lens[-1, -1] = per - t  # a full head
    off = (torch.arange(B)[:, None] * S + torch.arange(Hkv)[None] * per).to(torch.int32)
    pool_k = torch.randn(B * S + 1, D, generator=g).to(dtype)
    pool_v = torch.randn(B * S + 1, D, generator=g).to(dtype)
    pos = torch.randint(0, 999, (B * S + 1,), generator=g, dtype=torch.int32)
    seen = torch.tensor(123 + seed)
    # the chunk as the model produces it: a transposed projection (non-contiguous), maybe another dtype
    k_new = torch.randn(B, t, Hkv, D, generator=g).transpose(1, 2)
    v_new = torch.randn(B, t, Hkv, D, generator=g).transpose(1, 2)
    q = torch.randn(B, Hkv * G, t, D, generator=g).to(dtype)
    sinks = torch.randn(Hkv * G, generator=g)
    return [x.to(DEV) for x in (q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, sinks)]


# (B, Hkv, G, D, t, S, dtype, launch kwargs): one pass, split-K with a merge launch, fixed pieces,
# fewer programs than pieces (grid_pieces)
CASES = [
    (2, 2, 2, 16, 1, 80, torch.float32, {}),
    (3, 2, 4, 24, 1, 96, torch.float32, dict(num_splits=3, block_n=16)),
    (2, 3, 2, 16, 3, 120, torch.bfloat16, dict(max_len_bound=120, split_tokens=16, block_n=16)),
    (1, 4, 1, 16, 1, 160, torch.float32, dict(max_len_bound=160, split_tokens=16, block_n=16, grid_pieces=2)),
]


@needs_triton
@pytest.mark.parametrize("case, with_sinks", [(0, False), (0, True), (1, True), (2, False), (3, True)])
def test_fused_kernel_equals_two_launches(case, with_sinks):
    from adakv_compile.kernels.triton_append import static_append_triton
    from adakv_compile.kernels.triton_attend import store_attention_triton

    B, Hkv, G, D, t, S, dtype, kw = CASES[case]
    q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, sinks = _case(case, B, Hkv, G, D, t, S, dtype)
    sinks = sinks if with_sinks else None
    two = [x.clone() for x in (pool_k, pool_v, lens, pos)]
    static_append_triton(two[0], two[1], off, two[2], two[3], seen, k_new, v_new)
    want = store_attention_triton(q, two[0], two[1], off, two[2], t, D ** -0.5, sinks=sinks, **kw)
    one = [x.clone() for x in (pool_k, pool_v, lens, pos)]
    got = store_attention_triton(q, one[0], one[1], off, one[2], t, D ** -0.5, sinks=sinks,
                                 fused_append=(k_new, v_new, one[3], seen), **kw)
    assert torch.equal(got, want)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.equal(one[2], lens + t)


def test_op_fallback_equals_the_two_ops():
    """Where the kernel does not run (plain CPU path), the op is ``static_append`` then ``static_attend``."""
    B, Hkv, G, D, t, S = 2, 2, 3, 16, 2, 64
    q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, sinks = (
        x.cpu() for x in _case(7, B, Hkv, G, D, t, S, torch.float32))
    two = [x.clone() for x in (pool_k, pool_v, lens, pos)]
    torch.ops.adakv.static_append(k_new, v_new, two[0], two[1], off, two[2], two[3], seen)
    want = torch.ops.adakv.static_attend(q, two[0], two[1], off, two[2], 0.3, 0.0, S // Hkv, sinks)
    one = [x.clone() for x in (pool_k, pool_v, lens, pos)]
    got = torch.ops.adakv.static_attend_append(q, k_new, v_new, one[0], one[1], off, one[2], one[3], seen,
                                               0.3, 0.0, S // Hkv, sinks)
    assert torch.equal(got, want)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_too_many_query_rows_is_refused_by_the_kernel():
    from adakv_compile.kernels.triton_attend import store_attention_triton

    q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, _ = _case(1, 1, 1, 8, 16, 9, 64, torch.float32)
    with pytest.raises(ValueError, match="G \\* t <= 64"):
        store_attention_triton(q, pool_k, pool_v, off, lens, 9, 0.25, fused_append=(k_new, v_new, pos, seen))


def test_fused_merge_is_refused():
    from adakv_compile.kernels.triton_attend import store_attention_triton

    q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, _ = _case(1, 2, 2, 2, 16, 1, 80, torch.float32)
    with pytest.raises(ValueError, match="fused_merge"):
        store_attention_triton(q, pool_k, pool_v, off, lens, 1, 0.25, max_len_bound=80, split_tokens=16,
                               fused_merge=True, fused_append=(k_new, v_new, pos, seen))


def test_env_is_validated(monkeypatch):
    monkeypatch.setenv("ADAKV_FUSED_APPEND", "yes")
    with pytest.raises(ValueError, match="ADAKV_FUSED_APPEND must be 0 or 1"):
        fused_append()
    monkeypatch.setenv("ADAKV_FUSED_APPEND", "0")
    assert not fused_append()
    monkeypatch.delenv("ADAKV_FUSED_APPEND")
    assert not fused_append()


def _generate(monkeypatch, fused: str, kernels: str):
    monkeypatch.setenv("ADAKV_FUSED_APPEND", fused)
    monkeypatch.setenv("ADAKV_KERNELS", kernels)
    torch._dynamo.reset()
    cfg = AdaKVConfig(budget=24, window=4)
    ids, am = left_padded([100, 50], seed=3)
    model = build(seed=24)
    backend = compile_model(model, cfg, inner="eager")
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=6)
    out = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -6:]
    return out, cache


@needs_triton
def test_fast_path_generate_is_unchanged(monkeypatch):
    """Tiny Llama on the fast path: the same tokens and cache state with the fused op (its kernel run by the
    interpreter: ADAKV_KERNELS=interpret) as with the two ops (plain path)."""
    from adakv_compile.kernels import triton_attend

    want, ref_cache = _generate(monkeypatch, "0", "plain")
    fused_calls = []
    launch = triton_attend.store_attention_triton

    def spy(*args, **kw):
        fused_calls.append(kw.get("fused_append") is not None)
        return launch(*args, **kw)

    monkeypatch.setattr(triton_attend, "store_attention_triton", spy)
    got, cache = _generate(monkeypatch, "1", "interpret")
    assert fused_calls and all(fused_calls), fused_calls  # 5 decode steps x 2 layers, all fused
    assert torch.equal(got, want)
    for layer in range(len(cache.layers)):
        a, b = cache.layers[layer], ref_cache.layers[layer]
        assert torch.equal(a.lens, b.lens)
        assert torch.equal(cache.kept_positions(layer)[1][1], ref_cache.kept_positions(layer)[1][1])


@needs_triton
@pytest.mark.parametrize("fused", [False, True])
def test_every_kernel_argument_is_passed(monkeypatch, fused):
    """A traced launch (wrap_triton, Inductor) must name every kernel argument: with a defaulted one left out
    Inductor's mutation analysis fails and treats every input (the pools too) as mutated — cloned per call."""
    from adakv_compile.kernels import triton_attend

    seen_launches = []
    real = triton_attend.launcher

    def checking(kernel, probe):
        launch = real(kernel, probe)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    named = set(kernel.arg_names[:len(args)]) | (set(kw) & set(kernel.arg_names))
                    assert named == set(kernel.arg_names), set(kernel.arg_names) - named
                    seen_launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel)
                    return launch[grid](*args, **kw)
                return call
        return Grid()

    monkeypatch.setattr(triton_attend, "launcher", checking)
    q, k_new, v_new, pool_k, pool_v, off, lens, pos, seen, _ = _case(2, 2, 2, 2, 16, 1, 80, torch.float32)
    extra = dict(fused_append=(k_new, v_new, pos, seen)) if fused else {}
    triton_attend.store_attention_triton(q, pool_k, pool_v, off, lens, 1, 0.25, max_len_bound=80, split_tokens=16,
                                         block_n=16, **extra)
    assert len(seen_launches) == 2  # the pieces and the merge


def test_inductor_sees_exactly_the_declared_writes():
    """Inductor's mutation analysis of the launches (CUDA target's TTIR, compiled without a GPU in a fresh
    process): the fused kernels write the pools, pos and lens and nothing else of the caller's; by default the
    attention writes only its output and workspaces. (A failed analysis reads as 'every input written', and
    Inductor would then copy the pools every step.)"""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    script = os.path.join(os.path.dirname(__file__), "fused_append_writes.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "assuming every input is mutated" not in run.stderr, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {
        "one-pass/default/_store_attn_fwd": ["OUT"],
        "one-pass/fused/_store_attn_fwd": ["K", "LEN", "OUT", "POS", "V"],
        "split/default/_store_attn_fwd": ["WS_ACC", "WS_L", "WS_M"],
        "split/default/_store_attn_merge": ["OUT"],
        "split/fused/_store_attn_fwd": ["K", "POS", "V", "WS_ACC", "WS_L", "WS_M"],
        "split/fused/_store_attn_merge": ["LEN", "OUT"],
    }, got
