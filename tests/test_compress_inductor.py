"""Prefill compression lowered through Inductor (issue 17): ``adakv::prefill_compress`` is a ``triton_op``
whose body (scorer, allocation, compaction) the compiler traces into the prefill graph.

- Inductor: the prefill graph's code calls no adakv compress op (its work is inlined) and its cache equals
  the eager oracle's (kept positions, pool contents, logits).
- aot_eager (the same traced body, no code generation: cheap): ``backend.reconfigure`` recompiles the
  prefill graph for the new config (its values are graph constants), which changes the kept set as the
  oracle says; more configs and a GQA-max model against the oracle.
- The body with its Triton kernels (raw launches in eager; ``wrap_triton`` when traced, GPU only) under
  the interpreter equals the torch fallback.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded
from tests.test_static_cache import build, twin
from tests.triton_device import DEVICE, interpreter_subprocess_test, needs_device

test_in_interpreter_subprocess = interpreter_subprocess_test(__file__)


def _prefill(model, backend, ids, am):
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=4, max_prompt_len=ids.shape[1])
    position_ids = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)  # as the oracle (and HF generate) number them
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=position_ids, use_cache=True,
                    **{cache_kwarg(model): cache})
    return out.logits, cache


def _assert_equals_oracle(model_twin, cfg, ids, am, logits, cache):
    """Logits, kept positions and the K/V each segment holds, against ReferenceSession."""
    ref = ReferenceSession(model_twin, cfg)
    want = ref.prefill(ids, am)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    kept = ref.kept_positions()
    for layer, per_row in enumerate(kept):
        lay = cache.layers[layer]
        got = cache.kept_positions(layer)
        for b, heads in enumerate(per_row):
            for h, pos in enumerate(heads):
                assert torch.equal(got[b][h], pos.to(torch.int32)), (cfg, layer, b, h)
                o, n = int(lay.off[b, h]), int(lay.lens[b, h])
                torch.testing.assert_close(lay.pool_k[o:o + n], ref._keys[layer][b][h], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(lay.pool_v[o:o + n], ref._values[layer][b][h], rtol=1e-5, atol=1e-5)
    return kept


def reconfigure_rounds(model, model_twin, backend, ids, am, configs, count) -> tuple[dict, list]:
    """Prefill once under each config in turn (``backend.reconfigure``), each checked against the oracle:
    the kept positions by config, and ``count()`` after each round."""
    kept, counts = {}, []
    for cfg in configs:
        backend.reconfigure(cfg)
        logits, cache = _prefill(model, backend, ids, am)
        got = _assert_equals_oracle(model_twin, cfg, ids, am, logits, cache)
        kept[cfg] = [[[p.tolist() for p in heads] for heads in rows] for rows in got]
        counts.append(count())
    return kept, counts


@pytest.fixture(autouse=True)
def _inline_compress(monkeypatch):
    """The inlined path is the default on CUDA only (passes/rewrite.py ``inline_compress``); force it here."""
    monkeypatch.setenv("ADAKV_INLINE_COMPRESS", "1")


def test_inline_compress_switch(monkeypatch):
    """Unset: inlined on CUDA, opaque elsewhere; 0/1 force it; anything else names the variable."""
    from adakv_compile.passes.rewrite import inline_compress

    monkeypatch.delenv("ADAKV_INLINE_COMPRESS")
    assert inline_compress(torch.device("cuda", 0)) and not inline_compress(torch.device("cpu"))
    assert not inline_compress(None)
    monkeypatch.setenv("ADAKV_INLINE_COMPRESS", "0")
    assert not inline_compress(torch.device("cuda", 0))
    monkeypatch.setenv("ADAKV_INLINE_COMPRESS", "1")
    assert inline_compress(torch.device("cpu"))
    monkeypatch.setenv("ADAKV_INLINE_COMPRESS", "yes")
    with pytest.raises(ValueError, match="ADAKV_INLINE_COMPRESS"):
        inline_compress(torch.device("cpu"))


def test_inductor_inlines_compression():
    """No compress extern call in the prefill's generated code, and no scan either (issue 17: Inductor's
    split-scan lowering of the slots' ``cumsum`` over the prompt failed on torch 2.11 / CUDA): the slot
    layout is our own kernel on the GPU and scan-free torch here."""
    from torch._inductor.utils import run_and_get_code

    seed = int(torch.randint(0, 1 << 16, ()))  # fresh inputs each run (the seed is in the failure message)
    model = build("llama", seed=seed, layers=1)
    ids, am = left_padded([70, 45, 12], seed=seed)
    cfg = AdaKVConfig(budget=20, window=4)
    backend = compile_model(model, cfg, inner="inductor")
    (logits, cache), codes = run_and_get_code(lambda: _prefill(model, backend, ids, am))
    calls = set(re.findall(r"torch\.ops\.adakv\.(\w+)", "\n".join(codes)))
    assert not calls & {"static_compress", "prefill_compress"}, (seed, calls)
    code = "\n".join(codes)
    scans = sorted(set(re.findall(r"\w*(?:cumsum|cumprod|cummax|cummin|logcumsumexp|scan)\w*", code)))
    assert not scans, scans
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


def test_reconfigure_recompiles_the_prefill_graph():
    """The config's values are constants of the traced body: after ``reconfigure`` (same cache sizes, so
    Dynamo does not retrace) the backend compiles the prefill graph for the new config, once; going back
    reuses the first. aot_eager traces the same body as Inductor and recompiles the same way."""
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed)
    other = twin(model)
    ids, am = left_padded([70, 45, 12], seed=seed)
    first = AdaKVConfig(budget=20, window=4)
    second = AdaKVConfig(budget=20, window=4, pooling="avg", kernel_size=3, alpha=0.5)  # same cache sizes
    backend = compile_model(model, first, inner="aot_eager")
    traced = []
    from adakv_compile.kernels import static
    body = static._compress
    static._compress = lambda *a, **k: (traced.append(1), body(*a, **k))[1]
    try:
        kept, counts = reconfigure_rounds(model, other, backend, ids, am, (first, second, first, second),
                                          lambda: len(traced))
    finally:
        static._compress = body
    assert kept[first] != kept[second], seed
    assert backend.graphs_compiled == 1  # Dynamo traced once: the backend recompiled the graph
    assert 0 < counts[0] < counts[1] == counts[2] == counts[3], counts  # traced again for the second only


CASES = [
    ("llama", dict(budget=32, window=8, layer_schedule="pyramid", pooling="avg", alpha=0.5, head_floor=4)),
    ("qwen2", dict(compression_ratio=0.6, window=6, scorer="critical", gqa_reduce="max")),
]


@pytest.mark.parametrize("family, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_traced_body_equals_oracle(family, kwargs):
    seed = int(torch.randint(0, 1 << 16, ()))
    model = build(family, seed=seed)
    cfg = AdaKVConfig(**kwargs)
    ids, am = left_padded([96, 50, 9], seed=seed)
    backend = compile_model(model, cfg, inner="aot_eager")
    logits, cache = _prefill(model, backend, ids, am)
    _assert_equals_oracle(twin(model), cfg, ids, am, logits, cache)


def _op_inputs(seed, B=2, Hq=4, Hkv=2, n=45, D=16, room=3, budget=12):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g)
    k = torch.randn(B, n, Hkv, D, generator=g).transpose(1, 2)  # HF's layout: not contiguous
    v = torch.randn(B, Hkv, n, D, generator=g)
    am = torch.ones(B, 1, n, n, dtype=torch.bool).tril()
    am[1, ..., :7] = False  # left padding in row 1
    slots = Hkv * (budget + room) + Hkv
    pools = (torch.zeros(B * slots + 1, D), torch.zeros(B * slots + 1, D), torch.zeros(B, Hkv, dtype=torch.int32),
             torch.zeros(B, Hkv, dtype=torch.int32), torch.full((B * slots + 1,), -1, dtype=torch.int32),
             torch.zeros((), dtype=torch.int64))
    return (q, k, v, am), room, pools


def _run_op(kernels: str, cfg: AdaKVConfig, seed: int):
    """The op in eager. Traced, its launches go through ``wrap_triton``, which hands interpreted kernels
    back unwrapped (torch 2.13): the traced launches run on the GPU only (bench/e2e.py --check)."""
    from adakv_compile.kernels.static import inline_config_key

    (q, k, v, am), room, pools = _op_inputs(seed)
    key = inline_config_key(cfg)

    old = os.environ.get("ADAKV_KERNELS")
    os.environ["ADAKV_KERNELS"] = kernels
    try:
        torch.ops.adakv.prefill_compress(q, k, v, am, 0.25, 0.0, 0, 2, key, room, *pools)
    finally:
        os.environ.pop("ADAKV_KERNELS") if old is None else os.environ.__setitem__("ADAKV_KERNELS", old)
    return pools


@needs_device
@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter run (CPU); on a GPU bench/e2e.py --check covers it")
def test_triton_launches_equal_torch_fallback():
    seed = int(torch.randint(0, 1 << 16, ()))
    cfg = AdaKVConfig(budget=12, window=4, head_floor=2)
    plain = _run_op("plain", cfg, seed)
    got = _run_op("interpret", cfg, seed)  # the op's body with its Triton kernels launched in eager
    for a, b, name in zip(plain, got, ("pool_k", "pool_v", "off", "lens", "pos")):
        if name in ("pool_k", "pool_v", "pos"):  # the plain path also writes the trash slot
            a, b = a[:-1], b[:-1]
        assert torch.equal(a, b), (seed, name)


def test_dynamic_prefill_keeps_the_opaque_op():
    """A prefill graph with a symbolic prompt length runs the opaque ``static_compress`` (traced, the body
    would specialise it on the length): the body only ever sees real tensors, and the result is the oracle's."""
    from adakv_compile.kernels import static

    seed = int(torch.randint(0, 1 << 16, ()))
    model = build("llama", seed=seed)
    other = twin(model)
    cfg = AdaKVConfig(budget=20, window=4)
    backend = compile_model(model, cfg, inner="aot_eager", dynamic=True)
    seen, body = [], static._compress
    static._compress = lambda *a, **k: (seen.append(type(a[1])), body(*a, **k))[1]
    try:
        for lengths in ([70, 45, 12], [50, 33, 40]):
            ids, am = left_padded(lengths, seed=seed)
            logits, cache = _prefill(model, backend, ids, am)
            _assert_equals_oracle(other, cfg, ids, am, logits, cache)
    finally:
        static._compress = body
    assert seen == [torch.Tensor] * 4, seen  # 2 prefills x 2 layers, run (never traced) by the opaque op
