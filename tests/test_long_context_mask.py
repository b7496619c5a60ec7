"""A prompt mask proven causal(+padding) from the graph that builds it (passes/mask.py): no n × n tensor.

- HF's mask construction (either transformers stack: 5.17 always builds it, 5.24 with a padding mask) is
  proven, rewritten to ``adakv::attention_proven`` / ``is_causal`` and removed from the graph; logits (real
  positions) equal the plain model, and under compression the kept positions equal the unproven path's.
- Windows (mistral sliding) are not proven and keep the tensor path.
- Fuzz: random mask constructions from aranges, shifts, windows, padding reads and ``& | ~``; whatever the
  proof accepts must equal ``(kv <= q) ∧ pad[b, kv]`` element by element on random padding masks.
"""
from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.fx as fx

from adakv_compile import AdaKVConfig, adakv_backend
from adakv_compile.passes import mask as mask_pass
from tests.prompts import assert_same_kept
from tests.zoo import build


def _nxn_bool_nodes(gm: fx.GraphModule, n: int) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        v = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() >= 2 and \
                tuple(v.shape[-2:]) == (n, n) and node.op != "placeholder":
            out.append(node.name)
    return out


class _Spy:
    """An adakv backend that keeps the rewritten graph (to look for n × n nodes after the pass)."""

    def __init__(self, config):
        self.inner = adakv_backend(config, inner="eager")
        self.graphs = []

    def __call__(self, gm, example_inputs):
        fn = self.inner(gm, example_inputs)
        self.graphs.append(gm)
        return fn


def _batch(seed, B=3, n=13, holes=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (B, n), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    am[-1, :n - 4] = 0
    if holes:
        am[1, 5:7] = 0
    return ids, am


def _exact_like_eager(model, ids, am) -> "_Spy":
    """Compile ``model.forward`` in exact mode through a spying backend and check its logits equal eager's
    on the real (non-padding) positions; returns the spy (its graphs)."""
    spy = _Spy(AdaKVConfig())
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
        got = torch.compile(model.forward, backend=spy)(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    return spy


@pytest.mark.parametrize("family,holes", [("llama", False), ("qwen2", True)])
def test_proven_mask_is_dropped_and_exact(family, holes):
    model = build(family, attn="sdpa")
    ids, am = _batch(3, holes=holes)
    spy = _exact_like_eager(model, ids, am)
    gm = spy.graphs[0]
    assert _nxn_bool_nodes(gm, ids.shape[1]) == []
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.adakv.attention_proven.default in targets
    assert sum(n.target is torch.ops.adakv.mask_plan.default for n in gm.graph.nodes) == 1


def test_window_mask_is_not_proven():
    model = build("mistral_sw", attn="sdpa")
    ids, am = _batch(4, n=15)
    spy = _exact_like_eager(model, ids, am)
    targets = {n.target for n in spy.graphs[0].graph.nodes}
    assert torch.ops.adakv.attention_proven.default not in targets


def test_compressed_prefill_same_kept_positions_as_the_mask_tensor(monkeypatch):
    """Budget compression of a left-padded batch: the proven path keeps the same positions and gives the
    same logits as the tensor path (proof switched off)."""
    from adakv_compile.kernels.store import unpack
    from transformers import DynamicCache

    model = build("llama", attn="sdpa")
    ids, am = _batch(5, n=40)
    cfg = AdaKVConfig(budget=12, window=4)

    def run():
        torch._dynamo.reset()
        cache = DynamicCache(config=model.config)
        f = torch.compile(model.forward, backend=adakv_backend(cfg, inner="eager"))
        with torch.no_grad():
            from adakv_compile.cache import cache_kwarg
            out = f(input_ids=ids, attention_mask=am, use_cache=True, **{cache_kwarg(model): cache})
        kept = [unpack(l.keys, l.values, positions=True)[2] for l in cache.layers]
        return out.logits, kept

    got, kept = run()
    monkeypatch.setattr(mask_pass, "proven_args", lambda graph, site: "switched off")
    want, kept_want = run()
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    assert_same_kept(kept, kept_want)


@pytest.mark.parametrize("B,n", [(1, 9), (3, 17)])
def test_attention_proven_equals_masked_sdpa(B, n):
    """The op under every padding kind (none, left, holes, a fully padded row) equals SDPA with the mask."""
    import torch.nn.functional as F

    q, k, v = torch.randn(B, 4, n, 8), torch.randn(B, 2, n, 8), torch.randn(B, 2, n, 8)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for pads in ("none", "left", "holes", "empty"):
        pad = torch.ones(B, n, dtype=torch.bool)
        if pads == "left":
            for b in range(B):
                pad[b, :b * 3] = False
        elif pads == "holes":
            pad[:, n // 2] = False
        elif pads == "empty":
            pad[0] = False
        got = mask_pass.attention_proven(q, k, v, pad, mask_pass.plan_rows(pad), 0.3, 0.0)
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=causal[None, None] & pad[:, None, None, :], scale=0.3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=pads)


# --------------------------------------------------------------------------------------------- fuzz


def _random_mask_graph(rng: random.Random, B: int, n: int):
    """An FX graph building a [B, 1, n, n] bool mask from aranges and a [B, n] int padding mask."""
    g = fx.Graph()
    pad_in = g.placeholder("pad")
    seen = g.placeholder("seen")  # a cache's count of tokens seen: [1] int64
    padb = g.call_method("to", (pad_in,), {"dtype": torch.bool})
    idx = {}
    for name, size, where in (("b", B, (slice(None), None, None, None)), ("q", n, (None, None, slice(None), None)),
                              ("kv", n, (None, None, None, slice(None)))):
        ar = g.call_function(torch.arange, (size,))
        shift = rng.choice([0, 0, 0, 1, -1, 2])
        base = g.call_function(operator.add, (ar, shift)) if name != "b" else ar
        idx[name] = (g.call_function(operator.getitem, (base, where)), shift if name != "b" else 0)

    def q_kv():
        (q, sq), (kv, skv) = idx["q"], idx["kv"]
        return q, kv, sq, skv

    def atom(depth):
        q, kv, _, _ = q_kv()
        r = rng.randrange(12)
        if r == 11:  # query positions offset by the count seen (a static cache)
            return g.call_function(operator.le, (kv, g.call_function(operator.add, (q, seen))))
        if r == 0:
            return g.call_function(operator.le, (kv, q))
        if r == 1:
            return g.call_function(operator.ge, (q, kv))
        if r == 2:
            return g.call_function(operator.lt, (kv, g.call_function(operator.add, (q, 1))))
        if r == 3:
            return g.call_function(operator.invert, (g.call_function(operator.gt, (kv, q)),))
        if r == 4:  # a window
            return g.call_function(operator.gt, (kv, g.call_function(operator.sub, (q, rng.choice([2, 5])))))
        if r == 5:  # shifted diagonal
            return g.call_function(operator.le, (kv, g.call_function(operator.add, (q, rng.choice([-1, 1])))))
        if r == 6:
            return g.call_function(operator.getitem, (padb, (idx["b"][0], kv)))
        if r == 7:  # padding read at the query position: not a key padding mask
            return g.call_function(operator.getitem, (padb, (idx["b"][0], q)))
        if r == 8:
            return g.call_method("new_ones", (q, ()), {"dtype": torch.bool})
        if r == 9:
            return g.call_function(operator.eq, (kv, q))
        return g.call_function(operator.le, (kv, g.call_function(operator.getitem, (
            g.call_function(torch.arange, (n,)), (None, None, slice(None), None)))))

    def expr(depth):
        if depth == 0 or rng.random() < 0.3:
            return atom(depth)
        op = rng.choice([operator.and_, operator.and_, operator.or_, operator.invert])
        if op is operator.invert:
            return g.call_function(op, (expr(depth - 1),))
        return g.call_function(op, (expr(depth - 1), expr(depth - 1)))

    e = expr(3)
    out = g.call_method("expand", (e, B, -1, n, n))
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g), out


class _Record(fx.Interpreter):
    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta["val"] = result
        return result


def test_fuzz_a_mask_that_is_not_causal_is_never_proven_causal():
    rng = random.Random(int(torch.randint(0, 10**6, ())))
    proven = wrong = 0
    for trial in range(150):
        B, n = rng.choice([(1, 6), (2, 7), (3, 5)])
        gm, out = _random_mask_graph(rng, B, n)
        pads = [torch.randint(0, 2, (B, n)) for _ in range(6)] + [torch.ones(B, n, dtype=torch.long)]
        seens = [torch.tensor([rng.choice([0, 0, 1, 3])]) for _ in pads]
        try:
            masks = [_Record(gm).run(p, s) for p, s in zip(pads, seens)]
            _Record(gm).run(pads[0], torch.tensor([0]))  # the recorded example: seen = 0
        except (RuntimeError, IndexError):  # a shifted index out of range: not a mask graph
            continue
        verdict = mask_pass.prove(out)
        if isinstance(verdict, str):
            continue
        proven += 1
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for p, m, s in zip(pads, masks, seens):
            if verdict.zero and int(s) != 0:  # proven assuming seen == 0 (mask_plan checks it at run time)
                continue
            want = causal[None, None] & (p.bool()[:, None, None, :] if verdict.pad is not None else True)
            if not torch.equal(m.expand(B, 1, n, n), want.expand(B, 1, n, n)):
                wrong += 1
    assert wrong == 0
    assert proven > 5  # the fuzzer does reach provable constructions


def test_equivalent_spellings_are_proven():
    """Spellings of the same causal+padding mask (q >= kv, ~(kv > q), kv < q + 1) are all proven."""
    for spell in range(3):
        g = fx.Graph()
        pad = g.placeholder("pad")
        padb = g.call_method("to", (pad,), {"dtype": torch.bool})
        b = g.call_function(operator.getitem, (g.call_function(torch.arange, (2,)), (slice(None), None, None, None)))
        q = g.call_function(operator.getitem, (g.call_function(torch.arange, (5,)), (None, None, slice(None), None)))
        kv = g.call_function(operator.getitem, (g.call_function(torch.arange, (5,)), (None, None, None, slice(None))))
        c = [g.call_function(operator.ge, (q, kv)),
             g.call_function(operator.invert, (g.call_function(operator.gt, (kv, q)),)),
             g.call_function(operator.lt, (kv, g.call_function(operator.add, (q, 1))))][spell]
        m = g.call_function(operator.and_, (g.call_function(operator.getitem, (padb, (b, kv))), c))
        out = g.call_method("expand", (m, 2, -1, 5, 5))
        g.output(out)
        _Record(fx.GraphModule(torch.nn.Module(), g)).run(torch.ones(2, 5, dtype=torch.long))
        verdict = mask_pass.prove(out)
        assert not isinstance(verdict, str), verdict
        assert verdict.pad is pad


def test_static_cache_prefill_mask_is_proven_assuming_nothing_seen():
    """With an AdaKVCache, HF offsets the query positions by the cache's ``seen`` tensor: the mask is proven
    for seen == 0 (a prefill), which ``adakv::mask_plan`` checks at run time; same logits as the tensor
    path, no n × n node left."""
    from adakv_compile import AdaKVCache
    from adakv_compile.cache import cache_kwarg

    model = build("llama", attn="sdpa")
    ids = torch.randint(3, 200, (1, 21), generator=torch.Generator().manual_seed(7))
    outs, graphs = [], []
    for proof_on in (True, False):
        torch._dynamo.reset()
        spy = _Spy(AdaKVConfig(budget=8, window=2))
        if not proof_on:
            real = mask_pass.proven_args
            mask_pass.proven_args = lambda graph, site: "off"
        try:
            cache = AdaKVCache(model, spy.inner, batch_size=1, max_new_tokens=4)
            with torch.no_grad():
                outs.append(torch.compile(model.forward, backend=spy)(
                    input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits)
        finally:
            if not proof_on:
                mask_pass.proven_args = real
        graphs.append(spy.graphs[0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    assert _nxn_bool_nodes(graphs[0], ids.shape[1]) == [] and _nxn_bool_nodes(graphs[1], ids.shape[1])
    with pytest.raises(RuntimeError, match="not 0"):
        mask_pass.mask_plan(None, [torch.tensor([3])])
