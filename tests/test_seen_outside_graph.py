"""Regression: the fast path's prefill under Inductor gave logits off by ~0.05 from the uncompressed model.

The compress op wrote ``seen`` (the tokens-seen counter the model reads for its positions) inside the
graph; Inductor fused a RoPE recomputation that read it *after* layer 0's write, so later layers rotated
q and k with positions shifted by the prompt length. ``seen`` is now advanced by the backend's wrapper
between graph calls. Prefill logits must equal the plain model's (no token is dropped before the first
decode step), with Inductor, on 2+ layers, for fresh random weights and prompts.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adakv_compile import AdaKVCache, AdaKVConfig, compile_model
from adakv_compile.cache import cache_kwarg


def test_prefill_logits_equal_the_plain_model_under_inductor():
    seed = int(torch.randint(0, 10**6, ()))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    backend = compile_model(model, AdaKVConfig(budget=8, window=4), inner="inductor")
    cache = AdaKVCache(model, backend, batch_size=2, max_new_tokens=4)
    with torch.no_grad():
        got = model(ids, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]
        assert int(cache.get_seq_length()) == 37
        step = model(want.argmax(-1, keepdim=True), use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"seed {seed}")
    assert int(cache.get_seq_length()) == 38 and torch.isfinite(step).all()
