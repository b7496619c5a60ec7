"""The model's own decode mask on a compressed cache (plan.decode_mask_unusable, rewrite._decode_mask_bias).

A tuple-cache attention that passes a mask which is not causal(+padding) at decode (a sliding window, a
random bool or additive mask) must attend with it over the kept tokens: the rewrite adds the mask, as a
bias, at each kept token's original position. Compared against the oracle of the algorithm
(``reference.select`` for the kept tokens at prefill, ``reference.biased_decode_attention`` with the mask
as the bias at decode), on prompts longer than the budget (tokens really are evicted). A mask that cannot
be gathered (its key axis does not cover the positions seen) keeps the cache in full: the compressed cache
then raises StoreError naming the reason, never attends without the mask. HF decode masks (causal +
padding) are proven and keep the fast path: tests/test_hybrid.py, tests/test_long_context_mask.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adakv_compile import AdaKVConfig, adakv_backend
from adakv_compile import reference as ref
from adakv_compile.kernels.store import StoreError

CFG = AdaKVConfig(budget=8, window=2)
B, H, D, T0 = 2, 2, 8, 20
TOL = dict(rtol=1e-4, atol=1e-4)


class _Masked(nn.Module):
    """Tuple-cache attention with the caller's mask at every step (K/V transformed before the cache)."""

    def forward(self, q, k, v, mask, past):
        k, v = k * 0.5, v * 2.0
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            mask = self.decode_mask(q, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (k, v)

    def decode_mask(self, q, mask):
        return mask


def _sliding(T: int, S: int, window: int = 12) -> torch.Tensor:
    qpos = torch.arange(T)[:, None] + S - T
    kpos = torch.arange(S)[None, :]
    return ((kpos <= qpos) & (kpos > qpos - window))[None, None]


def _random_bool(T: int, S: int, gen) -> torch.Tensor:
    m = torch.rand(B, 1, T, S, generator=gen) < 0.6
    m[..., -T:] |= torch.ones(T, T, dtype=torch.bool).tril()  # each query sees itself: no empty row
    return m


def _random_additive(T: int, S: int, gen) -> torch.Tensor:
    return torch.randn(B, 1, T, S, generator=gen) * 2


def _masks(kind: str, chunks: list[int], gen) -> list[torch.Tensor]:
    out, S = [], 0
    for i, t in enumerate(chunks):
        S += t
        if kind == "sliding":
            out.append(_sliding(t, S))
        elif i == 0:  # a causal prompt (a graph input: not proven, its last row says every key is valid)
            out.append(torch.ones(t, t, dtype=torch.bool).tril()[None, None])
        else:
            out.append(_random_bool(t, S, gen) if kind == "bool" else _random_additive(t, S, gen))
    return out


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float()


def _oracle(xs, masks):
    """The algorithm's outputs: exact prompt attention, kept tokens by ``reference.select``, then each chunk
    over the kept tokens + the chunks so far, the mask added at every key's position."""
    (q0, k0, v0), scale = xs[0], 1 / math.sqrt(D)
    k0, v0 = k0 * 0.5, v0 * 2.0
    outs = [F.scaled_dot_product_attention(q0, k0, v0, attn_mask=masks[0])]
    valid = masks[0][:, 0, -1, :].expand(B, T0)
    keep = ref.select(q0, k0, valid, CFG, 0, 1, scale)
    assert int(keep[0, 0].sum()) < int(valid[0].sum()), "nothing evicted: the test would not discriminate"
    keys = [[k0[b, h][keep[b, h]] for h in range(H)] for b in range(B)]
    vals = [[v0[b, h][keep[b, h]] for h in range(H)] for b in range(B)]
    pos = [[keep[b, h].nonzero()[:, 0] for h in range(H)] for b in range(B)]
    seen = T0
    for (q, k, v), mask in zip(xs[1:], masks[1:]):
        t = q.shape[2]
        k, v = k * 0.5, v * 2.0
        rows = []
        for b in range(B):
            for h in range(H):
                keys[b][h] = torch.cat([keys[b][h], k[b, h]])
                vals[b][h] = torch.cat([vals[b][h], v[b, h]])
                pos[b][h] = torch.cat([pos[b][h], torch.arange(seen, seen + t)])
            bias = _additive(mask)[b if mask.shape[0] > 1 else 0]
            rows.append(ref.biased_decode_attention(q[b], keys[b], vals[b], pos[b], bias, scale))
        outs.append(torch.stack(rows))
        seen += t
    return outs


def _run(kind: str, chunks: list[int]):
    gen = torch.Generator().manual_seed(len(chunks) + len(kind))
    xs = [[torch.randn(B, H, t, D, generator=gen) for _ in range(3)] for t in chunks]
    masks = _masks(kind, chunks, gen)
    backend = adakv_backend(CFG, inner="eager")
    fn, past, got = torch.compile(_Masked(), backend=backend), None, []
    with torch.no_grad():
        for (q, k, v), mask in zip(xs, masks):
            o, past = fn(q, k, v, mask, past)
            got.append(o)
    return got, xs, masks, backend


@pytest.mark.parametrize("kind,chunks", [("sliding", [T0, 1, 1, 1]), ("sliding", [T0, 3, 1]),
                                         ("bool", [T0, 1, 1]), ("additive", [T0, 1, 2])])
def test_decode_mask_gathered_at_kept_positions_equals_the_oracle(kind, chunks):
    got, xs, masks, backend = _run(kind, chunks)
    assert all(r.action == "rewritten" for r in backend.report), backend.report.table()
    assert {r.mode for r in backend.report} == {"compress", "store"}, backend.report.table()
    assert all("decode mask added at the kept positions" in r.reason for r in backend.report if r.mode == "store")
    want = _oracle(xs, masks)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **TOL)
    # the mask matters: without it (the old path) the decode outputs differ from the oracle
    plain = _oracle(xs, [masks[0]] + [torch.ones_like(m, dtype=torch.bool) for m in masks[1:]])
    assert not torch.allclose(plain[1], want[1], **TOL)


class _OwnCausal(nn.Module):
    """A hand-written model building its own 2-D causal mask after the cache (bottom-right aligned)."""

    def forward(self, q, k, v, past):
        k, v = k * 0.5, v * 2.0
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S, t = k.shape[2], q.shape[2]
        mask = torch.arange(S)[None, :] <= torch.arange(t)[:, None] + (S - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (k, v)


def test_a_causal_decode_mask_built_in_the_graph_is_proven_and_equals_the_oracle():
    gen = torch.Generator().manual_seed(7)
    chunks = [T0, 1, 3, 1]
    xs = [[torch.randn(B, H, t, D, generator=gen) for _ in range(3)] for t in chunks]
    backend = adakv_backend(CFG, inner="eager")
    fn, past, got = torch.compile(_OwnCausal(), backend=backend), None, []
    with torch.no_grad():
        for q, k, v in xs:
            o, past = fn(q, k, v, past)
            got.append(o)
    stores = [r for r in backend.report if r.mode == "store"]
    assert len(stores) >= 2 and not any(r.reason for r in stores), backend.report.table()
    masks, S = [], 0
    for t in chunks:
        S += t
        masks.append(torch.ones(t, S, dtype=torch.bool).tril(S - t)[None, None])
    for g, w in zip(got, _oracle(xs, masks)):
        torch.testing.assert_close(g, w.to(g.dtype), **TOL)


class _OneColumnMask(_Masked):
    """A decode mask [.., t, 1] broadcast over the keys: it cannot be gathered at the kept positions."""

    def decode_mask(self, q, mask):
        return torch.ones(1, 1, q.shape[2], 1, dtype=torch.bool)


def test_a_decode_mask_that_cannot_be_gathered_keeps_the_cache_in_full_and_is_loud():
    gen = torch.Generator().manual_seed(5)
    backend = adakv_backend(CFG, inner="eager")
    fn = torch.compile(_OneColumnMask(), backend=backend)
    with torch.no_grad():
        causal = torch.ones(T0, T0, dtype=torch.bool).tril()[None, None]
        _, past = fn(*[torch.randn(1, H, T0, D, generator=gen) for _ in range(3)], causal, None)
        with pytest.raises(StoreError, match="decode mask"):
            fn(*[torch.randn(1, H, 1, D, generator=gen) for _ in range(3)], None, past)
    decode = [r for r in backend.report if r.phase == "decode"]
    assert decode and all("decode mask" in r.reason and "kept in full" in r.reason for r in decode), \
        backend.report.table()


def test_hf_decode_and_extend_masks_are_proven_and_not_read():
    """HF's causal+padding mask after a cache (decode, and a chunk of 3) is proven (passes/mask.py,
    ``decode=True``): ``attend_append`` gets no bias, the store's fast path is kept."""
    from tests.prompts import left_padded
    from tests.zoo import build

    model = build("llama")
    graphs = []
    inner = adakv_backend(CFG, inner="eager")

    def spy(gm, example_inputs):
        fn = inner(gm, example_inputs)
        graphs.append(gm)
        return fn

    ids, am = left_padded([20, 14], seed=5)
    fwd = torch.compile(model.forward, backend=spy)
    with torch.no_grad():
        past = fwd(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
        new = torch.randint(3, 100, (2, 3))
        am = torch.cat([am, torch.ones_like(new)], 1)
        past = fwd(input_ids=new, attention_mask=am, past_key_values=past, use_cache=True).past_key_values
        am = torch.cat([am, torch.ones_like(new[:, :1])], 1)
        fwd(input_ids=new[:, :1], attention_mask=am, past_key_values=past, use_cache=True)
    assert {r.phase for r in inner.report if r.mode == "store"} == {"extend", "decode"}, inner.report.table()
    calls = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.adakv.attend_append.default]
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert all(len(n.args) == 7 and not n.kwargs for n in calls), [n.args[7:] for n in calls]
    assert not any(r.reason for r in inner.report if r.mode == "store"), inner.report.table()


def _random_decode_mask_graph(rng, B: int, t: int, S: int):
    """An FX graph building a [B, 1, t, S] bool mask (t queries after S - t cached keys) from aranges and
    a [B, S] int padding mask: causal spellings, shifted offsets, windows, padding reads, ``& | ~``."""
    import operator

    import torch.fx as fx

    g = fx.Graph()
    padb = g.call_method("to", (g.placeholder("pad"),), {"dtype": torch.bool})
    b = g.call_function(operator.getitem, (g.call_function(torch.arange, (B,)), (slice(None), None, None, None)))
    past = S - t + rng.choice([0, 0, 0, 1, -1])  # the queries' first position (wrong by one, at times)
    qpos = g.call_function(operator.add, (g.call_function(torch.arange, (t,)), past))
    q = g.call_function(operator.getitem, (qpos, (None, None, slice(None), None)))
    kv = g.call_function(operator.getitem, (g.call_function(torch.arange, (S,)), (None, None, None, slice(None))))
    atoms = [lambda: g.call_function(operator.le, (kv, q)), lambda: g.call_function(operator.ge, (q, kv)),
             lambda: g.call_function(operator.invert, (g.call_function(operator.gt, (kv, q)),)),
             lambda: g.call_function(operator.gt, (kv, g.call_function(operator.sub, (q, rng.choice([2, 4]))))),
             lambda: g.call_function(operator.le, (kv, g.call_function(operator.add, (q, rng.choice([-1, 1]))))),
             lambda: g.call_function(operator.getitem, (padb, (b, kv))),
             lambda: g.call_function(operator.eq, (kv, q))]

    def expr(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(atoms)()
        op = rng.choice([operator.and_, operator.and_, operator.or_, operator.invert])
        if op is operator.invert:
            return g.call_function(op, (expr(depth - 1),))
        return g.call_function(op, (expr(depth - 1), expr(depth - 1)))

    out = g.call_method("expand", (expr(3), B, -1, t, S))
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g), out


def test_fuzz_a_decode_mask_proven_is_the_stores_rule():
    """Whatever ``prove(decode=True)`` accepts equals ``(kv <= q + S - t) ∧ pad[b, kv]`` on random pads."""
    import random

    from adakv_compile.passes import mask as mask_pass
    from tests.test_long_context_mask import _Record

    rng = random.Random(int(torch.randint(0, 10**6, ())))
    proven = wrong = 0
    for _ in range(100):
        B, t, S = rng.choice([(1, 1, 6), (2, 1, 7), (2, 3, 8), (3, 2, 5)])
        gm, out = _random_decode_mask_graph(rng, B, t, S)
        pads = [torch.randint(0, 2, (B, S)) for _ in range(5)] + [torch.ones(B, S, dtype=torch.long)]
        masks = [_Record(gm).run(p) for p in pads]
        verdict = mask_pass.prove(out, decode=True)
        if isinstance(verdict, str):
            continue
        proven += 1
        causal = torch.ones(t, S, dtype=torch.bool).tril(S - t)
        for p, m in zip(pads, masks):
            want = causal[None, None] & (p.bool()[:, None, None, :] if verdict.pad is not None else True)
            wrong += not torch.equal(m.expand(B, 1, t, S), want.expand(B, 1, t, S))
    assert wrong == 0
    assert proven > 5  # the fuzzer does reach provable constructions
