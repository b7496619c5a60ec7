"""passes/liveness.py (the peak-memory model) and the prefill order it checks (issue 15).

The chunked prefill of the fast path places each position-wise region right before its first reader, so a
layer's compress (which reads its q/k/v) runs before the next region allocates the next layer's q/k/v: the
model of the final graph never has two layers' q/k/v live together. The reordered graph computes what the
unchunked one does (logits, kept positions).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from adakv_compile import AdaKVCache, AdaKVConfig, adakv_backend
from adakv_compile.cache import cache_kwarg
from adakv_compile.passes.liveness import attention_qkv, liveness, stale_qkv_at_regions
from bench.prefill_liveness import final_prefill_graph
from tests.prompts import assert_same_kept
from tests.zoo import build


def test_liveness_counts_views_once_and_frees_after_the_last_reader():
    def f(x, w):
        a = x @ w            # [64, 32] allocated
        b = a.view(32, 64)   # a view of a: no bytes
        c = b.relu()         # [32, 64] allocated; a is still read below
        d = c.sum() + a.sum()
        e = (c * 2).exp()    # after a's last reader: a is dead here
        return d, e
    gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 16), torch.randn(16, 32))
    res = liveness(gm)
    f32 = 4
    assert res.resident == (64 * 16 + 16 * 32) * f32
    a = c = tmp = 64 * 32 * f32
    # the largest point: (c * 2) is computed while c and a's sum... are both no longer needed by exp;
    # the brute-force peak over the timeline is at least a + c, and never more than a + c + one temporary
    assert res.resident + a + c <= res.peak <= res.resident + a + c + tmp
    names = {x.name for x in res.live}
    assert not any(n.startswith("view") for n in names)  # the view shares a's storage


def _tiny_llama(layers: int, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def test_no_two_layers_qkv_live_together_in_the_chunked_prefill():
    """Meta tensors (nothing runs): 4 layers, a 4096-token prompt in chunks of 512."""
    gm = final_prefill_graph(_tiny_llama(4, "meta"), 4096, AdaKVConfig(budget=64, prefill_chunk=512))
    qkv = attention_qkv(gm)
    assert len(qkv) == 4
    res = liveness(gm)
    assert stale_qkv_at_regions(gm, res) == {}  # a region runs once the previous layer's q/k/v are freed
    # at the peak, one layer's O(n) working set: the residual, q, k, v and the attention output (the next
    # residual and q are written into the old residual and the attention output), RoPE's cos/sin besides
    cos_bytes = 4096 * 16 * 4  # [n, head_dim] fp32: RoPE's cos (and sin), made once for all layers
    big = [x for x in res.live if 4096 in x.shape and x.nbytes > cos_bytes]
    assert len(big) <= 5, res.table()
    chunked = [n for n in gm.graph.nodes if "chunked" in str(n.target)]
    assert len(chunked) == 5  # before layer 0, between the 4 layers, after the last
    assert sum("chunked_into" in str(n.target) for n in chunked) == 4  # all but the first write in place


def test_reordered_chunked_prefill_equals_unchunked():
    """Fast path (AdaKVCache, compression), 3 layers: the chunked prefill in its new order gives the
    unchunked graph's logits and kept positions."""
    model = _tiny_llama(3)
    ids = torch.randint(3, 250, (1, 61), generator=torch.Generator().manual_seed(3))
    runs = []
    for chunk in (0, 16):
        torch._dynamo.reset()
        backend = adakv_backend(AdaKVConfig(budget=24, window=4, prefill_chunk=chunk), inner="eager")
        cache = AdaKVCache(model, backend, batch_size=1, max_new_tokens=4)
        with torch.no_grad():
            out = torch.compile(model.forward, backend=backend)(
                input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        runs.append((out.logits, [cache.kept_positions(i) for i in range(3)],
                     backend.graphs[0].get("chunked_regions", 0)))
    (want, kept_want, regions_off), (got, kept, regions_on) = runs
    assert regions_off == 0 and regions_on == 4
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert_same_kept(kept, kept_want)


def test_donated_rows_are_written_after_every_result_of_their_chunk_is_read():
    """Region.run with output 0 written into its input: a result that is a view of that input (output 1,
    here the input's own rows) must still give the input's old rows."""
    from adakv_compile.passes.chunk import Region

    def compile_fn(gm, example):
        return lambda x: (x * 2, x[:])  # output 1 is a view of the donor's rows

    r = Region("test-donate", 10, 3, [], [None], [0], [None, None], [0, 0],
               [((10,), torch.float32), ((10,), torch.float32)], compile_fn, donated={0: 0})
    r.build = lambda rows: None
    x = torch.arange(10.0)
    outs = [x, torch.empty(10)]
    r.run([], outs)
    torch.testing.assert_close(outs[0], torch.arange(10.0) * 2)
    torch.testing.assert_close(outs[1], torch.arange(10.0))
