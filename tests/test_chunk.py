"""passes/chunk.py: the prefill's position-wise regions run over sequence chunks, exactly.

Chunked == unchunked (logits at real positions, kept positions under compression) on tiny models of several
families, an odd prompt length, chunk sizes that do not divide it and a left-padded batch. The regions are
found by dataflow: attention and the cache writes stay outside them.
"""
from __future__ import annotations

import pytest
import torch

from adakv_compile import AdaKVConfig, adakv_backend
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes import chunk as chunk_pass
from tests.prompts import assert_same_kept
from tests.zoo import build


def _batch(seed, B=2, n=23):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (B, n), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding
    return ids, am


def _logits(model, ids, am, config, cache=None):
    torch._dynamo.reset()
    backend = adakv_backend(config, inner="eager")
    f = torch.compile(model.forward, backend=backend)
    kw = {} if cache is None else {"use_cache": True, cache_kwarg(model): cache}
    with torch.no_grad():
        return f(input_ids=ids, attention_mask=am, **kw).logits, backend


@pytest.mark.parametrize("family,chunk", [("llama", 5), ("gpt_neox", 7), ("phi3", 4)])
def test_chunked_equals_unchunked(family, chunk):
    model = build(family, attn="sdpa")
    ids, am = _batch(1)
    with torch.no_grad():  # the unchunked graph computes what the model does (test_long_context_mask)
        want = model(input_ids=ids, attention_mask=am).logits
    got, backend = _logits(model, ids, am, AdaKVConfig(prefill_chunk=chunk))
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    assert backend.graphs[0]["chunked_regions"] >= 2  # before and after each attention
    made = [r for r in chunk_pass.REGIONS.values() if r.chunk == chunk and r.n == ids.shape[1]]
    assert made and all(set(r.compiled) == {chunk, ids.shape[1] % chunk} for r in made[-2:])


def test_compressed_prefill_keeps_the_same_positions():
    from transformers import DynamicCache

    from adakv_compile.kernels.store import unpack

    model = build("qwen3", attn="sdpa")
    ids, am = _batch(2, n=31)
    runs = []
    for chunk in (0, 6):
        cache = DynamicCache(config=model.config)
        logits, _ = _logits(model, ids, am, AdaKVConfig(budget=10, window=4, prefill_chunk=chunk), cache)
        runs.append((logits, [unpack(l.keys, l.values, positions=True)[2] for l in cache.layers]))
    (want, kept_want), (got, kept) = runs
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    assert_same_kept(kept, kept_want)


def test_row_local_refuses_mixing_and_impure_ops():
    """Ops that mix positions (a cumsum over the sequence, a matmul over it) or write in place are never
    put into a region; a plain MLP is."""
    import torch.fx as fx

    n = 11

    class M(torch.nn.Module):
        def forward(self, x, w):
            h = torch.nn.functional.linear(x, w).relu()
            s = h.cumsum(1)
            mix = h.transpose(1, 2) @ h  # [B, d, d]: positions summed
            h.add_(1)
            return s, mix, h * 2

    gm = fx.symbolic_trace(M())
    from torch.fx.passes.shape_prop import ShapeProp
    x, w = torch.randn(2, n, 8), torch.randn(6, 8)

    class Rec(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor):
                node.meta["val"] = out
            return out
    Rec(gm).run(x, w)
    del ShapeProp
    why = {node.name: chunk_pass._row_local(node, n) for node in gm.graph.nodes if node.op.startswith("call")}
    assert why["linear"] == "" and why["relu"] == ""
    assert why["cumsum"] != "" and why["matmul"] != ""
    add_ = next(node for node in gm.graph.nodes if node.target == "add_")
    assert chunk_pass._impure_like(add_)


def test_prefill_chunk_config():
    assert AdaKVConfig().prefill_chunk is None
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            AdaKVConfig(prefill_chunk=bad)
    rows = chunk_pass.default_chunk(100_000, None)
    assert rows >= 1024 and rows & (rows - 1) == 0
