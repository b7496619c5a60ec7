"""Prefill attention with an explicit bool mask that is exactly causal runs as ``is_causal=True`` (flash).

``is_causal_mask`` must say True only for the exact square causal mask, in every batch entry: one wrong
entry anywhere (also across its row chunks), padding, a window or a non-square mask make it False; and
``exact_attention`` with such a mask equals SDPA given the mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adakv_compile.kernels import attend
from adakv_compile.kernels.attend import exact_attention, is_causal_mask


def _causal(B, n):
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(B, 1, n, n).clone()


@pytest.mark.parametrize("step_elements", [1 << 26, 37])  # one chunk; many uneven chunks
def test_only_the_exact_causal_mask_passes(monkeypatch, step_elements):
    monkeypatch.setattr(attend, "_CHECK_ELEMENTS", step_elements)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    B, n = 3, 29
    mask = _causal(B, n)
    assert is_causal_mask(mask, n, n)
    assert is_causal_mask(mask[:1], n, n) and is_causal_mask(mask[0, 0], n, n)
    for _ in range(20):  # one flipped entry anywhere
        b, i, j = (int(torch.randint(0, m, (), generator=g)) for m in (B, n, n))
        bad = mask.clone()
        bad[b, 0, i, j] = ~bad[b, 0, i, j]
        assert not is_causal_mask(bad, n, n)
    padded = mask.clone()
    padded[1, :, :, :4] = False  # left padding of row 1
    assert not is_causal_mask(padded, n, n)
    window = mask & ~torch.ones(n, n, dtype=torch.bool).tril(-8)
    assert not is_causal_mask(window, n, n)
    assert not is_causal_mask(mask[..., 1:, :], n - 1, n)  # a chunk after a cache: not square
    assert not is_causal_mask(mask.float(), n, n) and not is_causal_mask(None, n, n)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)])
def test_exact_attention_with_causal_mask_equals_sdpa(Hq, Hkv):
    B, n, D = 2, 23, 16
    q, k, v = (torch.randn(B, h, n, D) for h in (Hq, Hkv, Hkv))
    for mask in (_causal(B, n), _causal(B, n) & (torch.rand(B, 1, 1, n) > 0.2) | torch.eye(n, dtype=torch.bool)):
        got = exact_attention(q, k, v, mask, 0.3, False, 0.0)
        kr, vr = (t.repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_mask_check_per_forward_not_per_layer(monkeypatch):
    """The pass checks HF's shared mask once per forward (``adakv::causal_hint``), not once per layer: one
    host sync per prefill. Same logits as the plain model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adakv_compile import AdaKVConfig, adakv_backend
    from adakv_compile.kernels import ops
    from tests.prompts import left_padded

    calls = {"hint": 0, "per_layer": 0}
    real = attend.is_causal_mask

    def counted(kind):
        def check(*a):
            calls[kind] += 1
            return real(*a)
        return check
    from adakv_compile.passes import mask as mask_pass  # HF's mask is proven from its construction now:
    monkeypatch.setattr(mask_pass, "proven_args", lambda graph, site: "off")  # test the tensor path
    monkeypatch.setattr(ops, "is_causal_mask", counted("hint"))
    monkeypatch.setattr(attend, "is_causal_mask", counted("per_layer"))
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids, am = left_padded([30, 22], seed=int(torch.randint(0, 10**6, ())))
    with torch.no_grad():
        want = model(ids, attention_mask=am).logits[:, -1]
        f = torch.compile(model.forward, backend=adakv_backend(AdaKVConfig(), inner="aot_eager"))
        got = f(input_ids=ids, attention_mask=am).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert calls == {"hint": 1, "per_layer": 0}


@pytest.mark.parametrize("inverted", [False, True])
def test_mask_passed_in_as_a_graph_input(inverted):
    """A mask that is a graph input (hand-written model): its check goes after the inputs; causal and
    padded masks both give SDPA's result."""
    from adakv_compile import AdaKVConfig, adakv_backend

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            if inverted:  # masked_fill spelling: the mask marks disallowed positions
                s = (q @ k.transpose(-1, -2)) * 0.25
                return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)

    backend = adakv_backend(AdaKVConfig(), inner="aot_eager")
    f = torch.compile(Attn(), backend=backend)
    B, H, n, D = 2, 3, 17, 16
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    for allowed in (_causal(B, n), _causal(B, n) & (torch.rand(B, 1, 1, n) > 0.3) | torch.eye(n, dtype=torch.bool)):
        mask = ~allowed if inverted else allowed
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.25)
        torch.testing.assert_close(f(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    assert any(r.action == "rewritten" for r in backend.report)
