"""Each attention form the pass claims to understand, built directly (both stacks' graph shapes).

transformers 5.24 / torch 2.13 emit SDPA with ``enable_gqa``; transformers 5.17 / torch 2.11 (the GPU
machine) emit ``repeat_kv`` (getitem-None → expand → reshape) and an explicit mask. These modules
reproduce both shapes, and the eager chain, so both are tested whatever is installed.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adakv_compile import AdaKVConfig, adakv_backend


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attn(nn.Module):
    """q/k/v projections + one attention in the chosen form; optional cache in and out."""

    def __init__(self, form, hq=4, hkv=2, d=16):
        super().__init__()
        self.form, self.hq, self.hkv, self.d = form, hq, hkv, d
        self.q = nn.Linear(32, hq * d)
        self.k = nn.Linear(32, hkv * d)
        self.v = nn.Linear(32, hkv * d)
        self.softmax, self.drop = nn.Softmax(dim=-1), nn.Dropout(0.1)
        self.register_buffer("head_mask", torch.linspace(0.5, 1.0, hq)[None, :, None, None])
        self.register_buffer("alibi", -torch.arange(hq, dtype=torch.float32)[None, :, None, None]
                             * torch.arange(64.0)[None, None, None, :] / 8)

    def forward(self, x, mask=None, past_k=None, past_v=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.hq, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=-2)
            v = torch.cat([past_v, v], dim=-2)
        g = self.hq // self.hkv
        f = self.form
        scale = 1 / math.sqrt(self.d)
        if f == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=past_k is None, enable_gqa=True)
        elif f == "sdpa_positional":
            o = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), mask, 0.0, False, scale=0.3)
        elif f == "sdpa_repeat_mask":
            o = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask,
                                               dropout_p=0.0, scale=scale)
        elif f == "repeat_interleave":
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                               attn_mask=mask)
        elif f in SPELLED or f in UNTOUCHED:
            o = spelled_attention(self, f, q, k, v, mask, g, scale)
        elif f.startswith("eager"):
            kk, vv = repeat_kv(k, g), repeat_kv(v, g)
            w = torch.matmul(q, kk.transpose(2, 3)) * scale
            if f == "eager_softcap":
                w = torch.tanh(w / 5.0) * 5.0
            if f == "eager_masked_fill":
                w = w.masked_fill(~mask, float("-inf"))
            elif mask is not None:
                w = w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.0, training=False)
            o = torch.matmul(w, vv)
        elif f == "sdpa_dropout":
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
        return o.transpose(1, 2).reshape(B, T, -1), k, v


def spelled_attention(mod, f, q, k, v, mask, g, scale):
    """Eager attention as models write it (issue 10 §2); ``mask``: bool allowed, or additive float."""
    B, H, T, D = q.shape
    kk, vv = repeat_kv(k, g), repeat_kv(v, g)
    S = kk.shape[2]
    if f == "in_place":                  # /=, masked_fill_ statement, nn.Softmax module, nn.Dropout (eval)
        s = q @ kk.transpose(-2, -1)
        s /= math.sqrt(D)
        s.masked_fill_(mask == 0, torch.finfo(s.dtype).min)
        return mod.drop(mod.softmax(s)) @ vv
    if f == "div_mul_":                  # div_ / mul_ statements, additive mask via add_
        s = torch.matmul(q, kk.mT)
        s.div_(2.0)
        s.mul_(2 * scale)
        s.add_(mask)
        return torch.softmax(s, dim=3) @ vv
    if f == "bmm":                       # [B·H, q, k] layout, mask added in [B, H, q, k]
        s = torch.bmm(q.reshape(B * H, T, D), kk.reshape(B * H, S, D).transpose(1, 2)) * scale
        s = (s.view(B, H, T, S) + mask).view(B * H, T, S)
        p = F.softmax(s, dim=-1)
        return torch.bmm(p, vv.reshape(B * H, S, D)).view(B, H, T, D)
    if f == "baddbmm":                   # mask as baddbmm's input, scale as alpha; output left 3-D
        m3 = mask.expand(B, H, T, S).reshape(B * H, T, S)
        s = torch.baddbmm(m3, q.reshape(B * H, T, D), kk.transpose(2, 3).reshape(B * H, D, S),
                          beta=1.0, alpha=scale)
        o = torch.bmm(s.softmax(-1), vv.reshape(B * H, S, D))
        return o.unflatten(0, (B, H))
    if f == "einsum_where":              # einsum products, torch.where mask, special.softmax
        s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * scale
        s = torch.where(mask, s, float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", torch.special.softmax(s, -1), vv)
    if f == "fp32_softmax":              # half-precision habit: float32 around the softmax, casts back
        s = (q * scale) @ kk.transpose(2, 3)
        s = s.masked_fill(~mask, float("-inf"))
        p = F.softmax(s.float(), dim=-1).type_as(q)
        return torch.matmul(p, vv)
    # left alone
    s = q @ kk.transpose(-1, -2) * scale
    if f == "head_mask":
        return (F.softmax(s + mask, dim=-1) * mod.head_mask) @ vv
    if f == "train_dropout":
        return F.dropout(F.softmax(s + mask, dim=-1), p=0.1, training=True) @ vv
    if f == "alibi":
        return F.softmax(s + mod.alibi[..., :T, :S], dim=-1) @ vv
    if f == "weights_used":
        p = F.softmax(s + mask, dim=-1)
        return p @ vv + p.sum(-1, keepdim=True)
    if f == "scale_after_mask":
        return F.softmax((s + mask) * 0.5, dim=-1) @ vv
    raise ValueError(f)


SPELLED = {"in_place": "eager+repeat_kv", "div_mul_": "eager+repeat_kv", "bmm": "eager+repeat_kv+bmm",
           "baddbmm": "eager+repeat_kv+bmm", "einsum_where": "eager+repeat_kv+einsum",
           "fp32_softmax": "eager+repeat_kv", "alibi": "eager+bias+repeat_kv"}  # ALiBi: exact (issue 18)
UNTOUCHED = {"head_mask": "attention weights pass through mul", "train_dropout": "dropout is active",
             "weights_used": "also read by other ops",
             "scale_after_mask": "a scale after the mask"}


def _masks(form, B, T, S):
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S).clone()
    if form in ("sdpa_repeat_mask", "sdpa_positional", "repeat_interleave"):
        return allowed
    if form in ("eager_masked_fill", "in_place", "einsum_where", "fp32_softmax"):
        return allowed
    if form.startswith("eager") or form in SPELLED or form in UNTOUCHED:
        return torch.zeros(B, 1, T, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return None


FORMS = {
    "sdpa_gqa": "sdpa", "sdpa_positional": "sdpa+repeat_kv", "sdpa_repeat_mask": "sdpa+repeat_kv",
    "repeat_interleave": "sdpa+repeat_kv", "eager": "eager+repeat_kv",
    "eager_softcap": "eager+softcap+repeat_kv", "eager_masked_fill": "eager+repeat_kv",
    **SPELLED,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("cached", [False, True])
def test_form_is_rewritten_and_exact(form, cached):
    torch.manual_seed(hash((form, cached)) % 1000)
    mod = Attn(form).eval()
    B, T, P = 2, 6, 5
    x = torch.randn(B, T, 32)
    past = (torch.randn(B, 2, P, 16), torch.randn(B, 2, P, 16)) if cached else (None, None)
    S = T + (P if cached else 0)
    mask = _masks(form, B, T, S)
    if form == "sdpa_gqa" and cached:
        mask = None
    ref = mod(x, mask, *past)
    backend = adakv_backend(AdaKVConfig(), inner="eager")
    got = torch.compile(mod, backend=backend, fullgraph=True)(x, mask, *past)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    recs = backend.report
    assert len(recs) == 1 and recs[0].action == "rewritten", backend.report.table()
    assert recs[0].pattern == FORMS[form]
    assert recs[0].phase == ("extend" if cached else "prefill")


@pytest.mark.parametrize("form", list(UNTOUCHED))
def test_spelling_that_is_not_attention_as_we_know_it_is_left_alone(form):
    """Extra ops on the weights, active dropout, per-head biases...: untouched, with the reason."""
    torch.manual_seed(0)
    mod = Attn(form).eval()
    B, T = 2, 6
    x = torch.randn(B, T, 32)
    mask = _masks(form, B, T, T)
    backend = adakv_backend(AdaKVConfig(), inner="eager")
    got = torch.compile(mod, backend=backend, fullgraph=True)(x, mask)
    if form != "train_dropout":
        for r, g in zip(mod(x, mask), got):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    (rec,) = backend.report
    assert rec.action == "skipped" and UNTOUCHED[form] in rec.reason, backend.report.table()


def test_unsupported_attention_is_left_alone_with_a_reason():
    torch.manual_seed(0)
    mod = Attn("sdpa_dropout").eval()
    x = torch.randn(1, 4, 32)
    backend = adakv_backend(AdaKVConfig(), inner="eager")
    torch.compile(mod, backend=backend, fullgraph=True)(x)
    (rec,) = backend.report
    assert rec.action == "skipped" and "dropout_p" in rec.reason


def test_encoder_attention_without_cache_is_no_cache():
    torch.manual_seed(0)

    class Enc(Attn):
        def forward(self, x):
            return super().forward(x)[0]

    mod = Enc("sdpa_gqa").eval()
    x = torch.randn(2, 5, 32)
    backend = adakv_backend(AdaKVConfig(budget=64), inner="eager")
    got = torch.compile(mod, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, mod(x), rtol=1e-5, atol=1e-5)
    (rec,) = backend.report
    assert (rec.action, rec.phase, rec.mode) == ("rewritten", "no-cache", "exact")


def test_parallel_attentions_share_a_layer_depth():
    """Two attentions side by side get the same depth (schedules key on it), the next one depth 1."""
    from adakv_compile.passes.dataflow import attention_depths
    from adakv_compile.passes.detect import find_attention

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = Attn("sdpa_gqa"), Attn("sdpa_gqa"), Attn("sdpa_gqa")

        def forward(self, x):
            y = self.a(x)[0] + self.b(x)[0]
            return self.c(y[..., :32])[0]

    graphs = []

    def grab(gm, ex):
        graphs.append(gm)
        return gm.forward

    torch.compile(Parallel().eval(), backend=grab, fullgraph=True)(torch.randn(1, 5, 32))
    sites = find_attention(graphs[0].graph)
    depths = attention_depths(graphs[0].graph, [s.anchor for s in sites])
    assert sorted(depths.values()) == [0, 0, 1]
