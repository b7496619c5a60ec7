"""A fast start (issue 17): chunked regions of equal structure compile once; ``prefill_compiler="eager"``.

- Regions of a decoder's layers are the same graph on other weights: one compile serves them all
  (``passes/chunk.structure_key``), and the chunked prefill still equals the plain model.
- ``AdaKVConfig(prefill_compiler="regions")``: the regions are cut even when no chunking is needed, so a
  short prompt's prefill also compiles each kind of region once, not every layer inside the whole graph.
- ``AdaKVConfig(prefill_compiler="eager")``: the prefill graph and its regions run without the inner compiler;
  tokens and kept positions equal the default mode and the eager reference generator; the rewritten prefill
  graph still holds no n × n mask (the proof and the chunking are unchanged).
The compiled side uses ``inner="aot_eager"`` (AOTAutograd, no C++ compile: CPU CI time).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend, compile_model
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes import chunk as chunk_pass
from adakv_compile.reference import ReferenceSession
from tests.prompts import left_padded
from tests.test_long_context_mask import _nxn_bool_nodes
from tests.test_static_cache import build, twin


def _counting(backend):
    """Count the inner compiler's calls (graph and region compiles) of ``backend``."""
    calls = []
    real = backend._inner

    def inner(gm, example_inputs, cudagraphs=False):
        calls.append(gm)
        return real(gm, example_inputs, cudagraphs)
    backend._inner = inner
    return calls


def test_regions_of_equal_structure_compile_once():
    model = build("llama", seed=3, layers=4)
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    backend = adakv_backend(AdaKVConfig(prefill_chunk=16), inner="eager")
    calls = _counting(backend)
    with torch.no_grad():
        got = torch.compile(model.forward, backend=backend)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    regions = backend.graphs[0]["chunked_regions"]
    assert regions >= 5  # before the first attention, between each two, after the last
    region_compiles = len(calls) - 1  # the outer graph is one
    # two chunk sizes (16 rows, the 8-row remainder); the middle layers' regions share one compile each
    assert region_compiles < 2 * regions and region_compiles <= 2 * 3, (region_compiles, regions)


def test_regions_mode_cuts_regions_without_chunking():
    """``prefill_compiler="regions"``: a prompt far below the chunk size still gets its regions cut (one chunk
    of all rows), the layers' regions share compiles, and the logits equal the plain model."""
    model = build("llama", seed=4, layers=4)
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for mode, regions in (("inductor", 0), ("regions", 5)):
        torch._dynamo.reset()
        backend = adakv_backend(AdaKVConfig(prefill_compiler=mode), inner="eager")
        calls = _counting(backend)
        with torch.no_grad():
            got = torch.compile(model.forward, backend=backend)(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert backend.graphs[0]["chunked_regions"] >= regions and (regions or not backend.graphs[0]["chunked_regions"])
        assert len(calls) - 1 <= 3  # region compiles: before the first attention, between two, after the last


def _graph(c: float, transpose: bool = False) -> fx.Graph:
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = g.call_function(torch.mul, (x, w))
    if transpose:
        y = g.call_method("t", (y,))
    g.output(g.call_function(torch.add, (y, c)))
    return g


def test_structure_key_sees_literals_ops_and_layouts_not_names():
    a = [torch.randn(3, 4), torch.randn(3, 4)]
    g1, g2 = _graph(1.0), _graph(1.0)
    for node in g2.nodes:  # other names, same structure
        node.name = node.name + "_layer7"
    key = chunk_pass.structure_key
    assert key(g1, a) == key(g2, a)
    assert key(g1, a) != key(_graph(2.0), a)
    assert key(g1, a) != key(_graph(1.0, transpose=True), a)
    assert key(g1, a) != key(g1, [a[0].t().contiguous().t(), a[1]])  # same shape, other strides
    assert key(g1, a) != key(g1, [a[0].double(), a[1]])


def test_prefill_compiler_config():
    assert AdaKVConfig().prefill_compiler == "inductor"
    for bad in ("Eager", None, "aot_eager"):
        with pytest.raises(ValueError, match="prefill_compiler"):
            AdaKVConfig(prefill_compiler=bad)
    backend = adakv_backend(AdaKVConfig(budget=48))
    with pytest.raises(ValueError, match="prefill_compiler"):
        backend.reconfigure(AdaKVConfig(budget=64, prefill_compiler="eager"))


def _generate(model, cfg, ids, am, new):
    backend = compile_model(model, cfg, inner="aot_eager")
    calls = _counting(backend)
    cache = AdaKVCache(model, backend, batch_size=ids.shape[0], max_new_tokens=new)
    out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False,
                         **{cache_kwarg(model): cache})[:, -new:]
    return out, cache, backend, calls


def test_eager_prefill_equals_the_default_and_the_reference():
    torch._dynamo.reset()
    kwargs = dict(budget=24, window=4, prefill_chunk=32)  # 96-token prompt: chunked regions
    ids, am = left_padded([96, 48, 12], seed=5)
    model = build("llama", seed=5)
    ref = ReferenceSession(twin(model), AdaKVConfig(**kwargs), record=True)
    expect = ref.generate(ids, attention_mask=am, max_new_tokens=6)[:, -6:]
    runs = {}
    for mode in ("eager", "inductor", "regions"):
        torch._dynamo.reset()
        runs[mode] = _generate(twin(model), AdaKVConfig(prefill_compiler=mode, **kwargs), ids, am, 6)
    for mode, (got, cache, backend, calls) in runs.items():
        assert torch.equal(got, expect), mode
        prefill = [g for g in backend.graphs if g.get("chunked_regions")]
        assert prefill and all(g.get("compiler") == ("eager" if mode == "eager" else None) for g in prefill)
        if mode != "eager":  # regions: 3 kinds (before, between, after the attentions) x 2 chunk sizes at most
            assert 0 < len(calls) - backend.graphs_compiled <= 6
        for layer, per_row in enumerate(ref.kept_positions()):
            got_pos = cache.kept_positions(layer)
            for row in range(3):
                for head in range(2):
                    assert torch.equal(got_pos[row][head][:-5], per_row[row][head][:-5].to(torch.int32))
    eager_calls, default_calls = runs["eager"][3], runs["inductor"][3]
    assert len(eager_calls) == 1  # the decode graph only: no prefill graph, no region went to the compiler
    assert len(default_calls) > len(eager_calls)


def test_eager_prefill_keeps_the_proven_mask():
    """The rewritten prefill graph run in eager mode holds no n × n tensor (the proof replaced the mask)."""
    torch._dynamo.reset()
    model = build("llama", seed=7)
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(7))
    graphs = []
    backend = adakv_backend(AdaKVConfig(budget=8, window=2, prefill_compiler="eager", prefill_chunk=16),
                            inner="aot_eager")

    def spy(gm, example_inputs):
        fn = backend(gm, example_inputs)
        graphs.append(gm)
        return fn
    cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=2)
    with torch.no_grad():
        got = torch.compile(model.forward, backend=spy)(input_ids=ids, use_cache=True,
                                                        **{cache_kwarg(model): cache}).logits
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert backend.graphs[0]["compiler"] == "eager" and backend.graphs[0]["chunked_regions"] >= 2
    assert _nxn_bool_nodes(graphs[0], ids.shape[1]) == []
    assert torch.ops.adakv.attention_proven.default in {n.target for n in graphs[0].graph.nodes}
