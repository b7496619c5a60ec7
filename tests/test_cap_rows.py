"""``shard.cap_rows``: a row over its cap keeps its window and its best-scored chosen tokens over all local
heads, exactly ``cap`` of them; rows within the cap are untouched (fresh random scores, oracle by sorting)."""
from __future__ import annotations

import torch

from adakv_compile import AdaKVConfig
from adakv_compile.kernels.allocate import keep_mask
from adakv_compile.kernels.shard import cap_rows


def test_cap_rows_keeps_window_and_best_chosen():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    B, H, n, w = 3, 4, 60, 5
    cfg = AdaKVConfig(budget=20, window=w)
    scores = torch.rand(B, H, n, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    keep = keep_mask(scores, valid, cfg, 0, 1)
    counts = keep.sum((1, 2))
    cap = int(counts[0]) - 7                                   # row 0 (and any row as large) is over the cap
    capped, trimmed = cap_rows(keep, scores, cap, w)
    assert int(trimmed) == int((counts - cap).clamp(min=0).sum())
    for b in range(B):
        if counts[b] <= cap:
            assert torch.equal(capped[b], keep[b])
            continue
        assert int(capped[b].sum()) == cap
        assert bool(capped[b, :, n - w:].all())                 # the window stays
        assert bool((capped[b] <= keep[b]).all())                # only removes
        chosen = scores[b, :, :n - w][keep[b, :, :n - w]]
        best = chosen.sort(descending=True).values[:cap - H * w]
        assert torch.equal(scores[b, :, :n - w][capped[b, :, :n - w]].sort(descending=True).values, best)


def test_tp_arguments_of_adakv_cache_are_checked():
    import pytest
    from transformers import LlamaConfig

    from adakv_compile import AdaKVCache

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    ak = AdaKVConfig(budget=16, window=4)
    for kw, name in (({"tp_size": 3}, "tp_size"), ({"tp_size": 2, "tp_reserve": 0.5}, "tp_reserve"),
                     ({"tp_size": 2, "tp_reserve": True}, "tp_reserve")):
        with pytest.raises(ValueError, match=name):
            AdaKVCache(cfg, ak, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32, **kw)
    even = AdaKVCache(cfg, ak, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32, tp_size=2,
                      tp_reserve=1)
    worst = AdaKVCache(cfg, ak, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32, tp_size=2)
    one = AdaKVCache(cfg, ak, batch_size=1, max_new_tokens=4, device="cpu", dtype=torch.float32)
    assert even.layers[0].num_heads == worst.layers[0].num_heads == 2 and one.layers[0].num_heads == 4
    assert even.nbytes() < worst.nbytes() < one.nbytes()
