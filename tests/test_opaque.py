"""passes/opaque.py: a decode graph replayed as a CUDA graph (or any, under ``ADAKV_DECODE_OPAQUE=1``) calls our
Triton ops' opaque twins.

Exact by construction (same bodies); checked on a tiny Llama under Inductor on the CPU: the decode graph's
generated code calls the twins as extern ops (GEMVs, appends, attentions: none traced), tokens equal the eager
oracle, and the prefill graph is left alone. On the GPU (bench/gpu_plan/19-decode-opaque.txt, H200): the same
decode step, a shorter cold start at 32 layers; so it is the default where the decode graph is CUDA-graphed.
prewarm.py (``ADAKV_PREWARM=1``, off) compiles the twins' kernels in helper processes.
"""
from __future__ import annotations

import re

import pytest

import torch

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded
from tests.test_triton_gemv import _tiny_llama


def _generate_equals_oracle(cfg: AdaKVConfig, lengths: list[int], new: int = 3):
    """Compiled ``generate`` of a tiny Llama into an AdaKVCache on fresh random prompts, asserted equal to the
    oracle's tokens; returns the backend and Inductor's generated codes."""
    from torch._inductor.utils import run_and_get_code

    ids, am = left_padded(lengths, seed=int(torch.randint(0, 1 << 16, ())), vocab=96)
    expect = ReferenceSession(_tiny_llama(), cfg).generate(ids, attention_mask=am, max_new_tokens=new)[:, -new:]
    model = _tiny_llama()
    backend = compile_model(model, cfg, inner="inductor")
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    with torch.no_grad():
        out, codes = run_and_get_code(lambda: model.generate(ids, attention_mask=am, max_new_tokens=new,
                                                             do_sample=False, **{cache_kwarg(model): cache}))
    assert torch.equal(out[:, -new:], expect)
    return backend, codes


def test_decode_ops_become_extern_calls_and_tokens_equal_the_oracle(monkeypatch):
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "1")
    backend, codes = _generate_equals_oracle(AdaKVConfig(budget=12, window=4, gemv=True), [30, 18])
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


def test_graphed_decode_gets_the_twins_by_default(monkeypatch):
    """With the switch unset the backend swaps in the twins exactly for the graphs it replays as CUDA graphs
    (faked on the CPU: Inductor then skips the CUDA graph of CPU tensors), and tokens equal the oracle."""
    from adakv_compile.backend import AdaKVBackend

    monkeypatch.delenv("ADAKV_DECODE_OPAQUE", raising=False)
    real = AdaKVBackend._replay_as_cuda_graph
    monkeypatch.setattr(AdaKVBackend, "_replay_as_cuda_graph",
                        lambda self, result, inputs: result.static is not None and result.static.phase == "append")
    backend, _ = _generate_equals_oracle(AdaKVConfig(budget=10, window=3), [22, 29])
    assert [g.get("cudagraphs") for g in backend.graphs] == [False, True]
    opaque = [g.get("opaque") for g in backend.graphs]
    assert opaque[0] is None and opaque[1] >= 2 * 2, opaque  # an append and an attention a layer, at least
    assert real is not AdaKVBackend._replay_as_cuda_graph


def test_opaque_wanted_follows_cuda_graph_replay_unless_forced(monkeypatch):
    """Unset: the twins exactly where the decode graph is replayed as a CUDA graph; 1 / 0 force it; else an error."""
    from adakv_compile.passes.opaque import opaque_wanted

    monkeypatch.delenv("ADAKV_DECODE_OPAQUE", raising=False)
    assert opaque_wanted(True) and not opaque_wanted(False)
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "0")
    assert not opaque_wanted(True)
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "1")
    assert opaque_wanted(False)
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "yes")
    with pytest.raises(ValueError, match="ADAKV_DECODE_OPAQUE"):
        opaque_wanted(True)


def test_prewarm_helper_replays_the_decode_ops_layouts(monkeypatch):
    """``ADAKV_PREWARM=1`` (prewarm.py): the backend hands each distinct twin call's argument layouts to helper
    processes; each rebuilds them (shape, stride, storage offset, dtype) and runs every call without error.
    The tokens are unchanged (the helpers share nothing with this process)."""
    from adakv_compile import prewarm

    started = []
    real_start = prewarm.start
    monkeypatch.setattr("adakv_compile.backend.start_prewarm", lambda calls: started.append(real_start(calls)))
    monkeypatch.setenv("ADAKV_DECODE_OPAQUE", "1")
    monkeypatch.setenv("ADAKV_PREWARM", "1")
    backend, _ = _generate_equals_oracle(AdaKVConfig(budget=12, window=4, gemv=True), [26, 15])
    calls = [g.get("prewarm") for g in backend.graphs]
    assert calls[0] is None and calls[1] >= 3, calls  # distinct calls: GEMV shapes, one append, one attention
    procs = [p for batch in started for p in batch]
    assert procs
    for proc in procs:
        assert proc.wait(timeout=120) == 0
        text = open(proc.logfile).read()
        done, total = re.search(r"(\d+) of (\d+) calls", text).groups()
        assert done == total, text


def test_prewarm_layouts_round_trip():
    """A view's layout (offset, strides) comes back as the same layout, on fresh random tensors."""
    from adakv_compile.prewarm import _layout, _make

    base = torch.randn(5, 7, 6)
    for t in (base, base[1:, 2:5, ::2], base.transpose(0, 2)[3], torch.randint(0, 9, (4, 3), dtype=torch.int32)):
        made = _make(_layout(t))
        assert (made.shape, made.stride(), made.storage_offset(), made.dtype) == \
            (t.shape, t.stride(), t.storage_offset(), t.dtype)
    assert _make(_layout([1, None, 2.5, (t, True)]))[3][0].shape == t.shape
