"""``ADAKV_DECODE_OPAQUE=1`` (passes/opaque.py): the decode graph's Triton ops become opaque twins.

Exact by construction (same bodies); checked on a tiny Llama under Inductor on the CPU: the decode graph's
generated code calls the twins as extern ops (GEMVs, appends, attentions: none traced), tokens equal the eager
oracle, and the prefill graph is left alone. The GPU question — the same decode step, a shorter start — is
bench/gpu_plan/19-decode-opaque.txt.
"""
from __future__ import annotations

import re

import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded
from tests.test_triton_gemv import _tiny_llama


def test_decode_ops_become_extern_calls_and_tokens_equal_the_oracle(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    cfg = AdaKVConfig(budget=12, window=4, gemv=True)
    ids, am = left_padded([30, 18], seed=int(torch.randint(0, 1 << 16, ())), vocab=96)
    new = 3
    expect = ReferenceSession(_tiny_llama(), cfg).generate(ids, attention_mask=am, max_new_tokens=new)[:, -new:]
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "1")
    model = _tiny_llama()
    backend = compile_model(model, cfg, inner="inductor")
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: model.generate(ids, attention_mask=am, max_new_tokens=new,
                                                             do_sample=False, **{cache_kwarg(model): cache}))
    assert torch.equal(out[:, -new:], expect)
    decode = [c for c in codes if "_opaque" in c]
    assert len(decode) == 1, [c[:200] for c in codes]
    calls = re.findall(r"torch\.ops\.adakv\.(\w+)\.default\(", decode[0])
    layers = 2
    assert calls.count("gemv_opaque") == 4 * layers + 1, calls
    assert calls.count("static_append_opaque") == layers, calls
    assert sum(c.startswith("static_attend") and c.endswith("_opaque") for c in calls) == layers, calls
    assert not re.search(r"\b(gemv|static_append|static_attend|static_attend_merged)\.default\(", decode[0])
    assert not re.search(r"\.copy_\(arg", decode[0]), "a pool copied instead of written in place"
    assert [g.get("opaque") for g in backend.graphs] == [None, 4 * layers + 1 + 2 * layers]
