"""Stage 'attend': attention math of the plain-PyTorch path.

``exact_attention`` is what the rewritten model runs where nothing is compressed (and at prefill, where
attention over the whole prompt stays exact). ``store_attention`` attends over a compacted store:
each (row, KV head) has its own length; a chunk of t new queries is causal within itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import store as kv_store


def exact_attention(q, k, v, attn_mask, scale: float, is_causal: bool, softcap: float):
    """Same function as SDPA (bool or additive mask, GQA by grouping), optional logit soft-capping."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=Hq != Hkv)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = torch.tanh(logits / softcap) * softcap
    if is_causal:
        nq, nk = q.shape[-2], k.shape[-2]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def store_attention(q, pool_k, pool_v, offsets, lengths, max_len: int, t: int, scale: float,
                    softcap: float):
    """Attention of q [B, Hq, t, D] over the store *after* the chunk's t tokens were appended.

    ``offsets``/``lengths`` [B, Hkv]: each segment's first slot and used length; ``max_len`` bounds
    the lengths (host int, so no device read is needed).
    """
    B, Hq, _, D = q.shape
    Hkv = offsets.shape[1]
    G = Hq // Hkv
    keys, _ = kv_store.gather_padded(pool_k, offsets, lengths, max_len, D)      # [B, Hkv, L, D]
    vals, _ = kv_store.gather_padded(pool_v, offsets, lengths, max_len, D)
    # query i of the chunk sees slots < len - t + i + 1 of its head
    pos = torch.arange(max_len, device=q.device)
    limit = (lengths.to(torch.int64) - t)[:, :, None] + torch.arange(1, t + 1, device=q.device)
    allowed = pos[None, None, None, :] < limit[..., None]                       # [B, Hkv, t, L]
    qg = q.float().reshape(B, Hkv, G * t, D)
    logits = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale           # [B, Hkv, G*t, L]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = allowed[:, :, None].expand(B, Hkv, G, t, max_len).reshape(B, Hkv, G * t, max_len)
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = torch.matmul(p, vals.float())
    return out.reshape(B, Hq, t, D).to(q.dtype)
