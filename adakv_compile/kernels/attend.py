"""Stage 'attend': attention math of the plain-PyTorch path.

``exact_attention`` is what the rewritten model runs where nothing is compressed (and at prefill, where
attention over the whole prompt stays exact). ``store_attention`` attends over a compacted store:
each (row, KV head) has its own length; a chunk of t new queries is causal within itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import store as kv_store
from .dispatch import switch


def _triton_ok() -> bool:
    from .dispatch import use_triton
    return use_triton()


def heads_last(device: torch.device) -> bool:
    """Whether the prompt attention ops (``adakv::attention``, ``adakv::attention_proven``) return their
    [B, H, n, D] output in heads-last memory ([B, n, H, D] contiguous, as CUDA's flash / cuDNN SDPA write it):
    the model's ``transpose(1, 2).reshape(B, n, H * D)`` is then free, and the op copies nothing (a contiguous
    result cost a 64 MB copy per layer of a 1 x 8k Llama-8B prefill: 0.78 ms of 55 on an H200). On CUDA only
    (elsewhere SDPA writes [B, H, n, D] contiguous); ``ADAKV_HEADS_LAST=0`` turns it off. Fake and real
    outputs follow this one rule, so their strides agree (Inductor asserts them)."""
    return device.type == "cuda" and switch("ADAKV_HEADS_LAST") is not False


def attention_out(out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, n, D] in the prompt attention ops' output layout (``heads_last``), copied only if it is
    not already exactly in it (strides compared in every dim, size-1 dims included)."""
    B, H, n, D = out.shape
    if not heads_last(out.device):
        return out.contiguous()
    want = (n * H * D, D, H * D, 1)
    if tuple(out.stride()) == want:
        return out
    res = torch.empty_strided((B, H, n, D), want, dtype=out.dtype, device=out.device)
    return res.copy_(out)


def empty_attention_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fake output of a prompt attention op of ``q`` [B, H, n, _] and ``v`` [..., Dv]: ``attention_out``'s
    layout."""
    B, H, n = q.shape[:3]
    if heads_last(q.device):
        return q.new_empty(B, n, H, v.shape[-1]).transpose(1, 2)
    return q.new_empty(B, H, n, v.shape[-1])


_CHECK_ELEMENTS = 1 << 26  # mask entries compared per step of is_causal_mask (64 MB of bool temporaries)


def is_causal_mask(attn_mask, nq: int, nk: int) -> bool:
    """Whether a bool mask is exactly the square causal mask (every row, every batch entry).

    Compiled HF graphs (transformers 5.17, and any graph with an attention_mask) build an explicit
    ``[B, 1, n, n]`` bool mask even when it is purely causal; SDPA then cannot use flash attention and
    prefill runs ~2× slower than eager at 32k. Reading the mask once (chunks of rows, one host sync) is
    exact and costs a fraction of a millisecond per layer; any padding or window makes it False.
    """
    if attn_mask is None or attn_mask.dtype != torch.bool or nq != nk or attn_mask.dim() < 2 \
            or tuple(attn_mask.shape[-2:]) != (nq, nk):
        return False
    if attn_mask.is_cuda and _triton_ok():
        from .triton_mask import causal_mismatches
        return not bool(causal_mismatches(attn_mask))
    per_row = max(1, attn_mask.numel() // nq)
    step = max(1, _CHECK_ELEMENTS // per_row)
    cols = torch.arange(nk, device=attn_mask.device)
    bad = torch.zeros((), dtype=torch.bool, device=attn_mask.device)
    for r0 in range(0, nq, step):
        rows = torch.arange(r0, min(nq, r0 + step), device=attn_mask.device)
        causal = cols[None, :] <= rows[:, None]
        bad |= (attn_mask[..., r0:r0 + step, :] != causal).any()
    return not bool(bad)


def exact_attention(q, k, v, attn_mask, scale: float, is_causal: bool, softcap: float,
                    mask_is_causal: torch.Tensor | None = None):
    """Same function as SDPA (bool or additive mask, GQA by grouping), optional logit soft-capping.

    A bool mask that is exactly causal (see ``is_causal_mask``) runs as ``is_causal=True`` without the
    mask: the same function, computed by SDPA's flash kernel with GQA instead of a masked kernel.
    ``mask_is_causal`` (a CPU bool from ``adakv::causal_hint``) answers that for the mask when given.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    if not softcap and not is_causal and attn_mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        if mask_is_causal is not None:
            causal = bool(mask_is_causal) and nq == nk and tuple(attn_mask.shape[-2:]) == (nq, nk)
        else:
            causal = is_causal_mask(attn_mask, nq, nk)
        if causal:
            attn_mask, is_causal = None, True
    if not softcap:
        if attn_mask is not None and q.is_cuda and Hq != Hkv:
            # a mask that is not causal (padding, a sliding window): SDPA's GQA path with a mask is the math
            # kernel ([B, Hq, n, n] logits: tens of GB at 32k); repeated K/V take the memory-efficient one
            k = k.repeat_interleave(Hq // Hkv, dim=1)
            v = v.repeat_interleave(Hq // Hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=k.shape[1] != Hq)
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


SINK_BLOCK = 512  # queries per step of sink_attention: [B, Hq, 512, n] fp32 logits at a time


def sink_attention(q, k, v, attn_mask, scale: float, is_causal: bool, softcap: float, sinks: torch.Tensor):
    """Attention with a per-head sink logit (gpt-oss): softmax over [scores, sink], the sink's column
    dropped: ``out = Σ_j p_j v_j`` with ``p = softmax([s_1..s_n, sink])[:n]``. Queries in blocks of
    ``SINK_BLOCK`` (the logits of a 32k prompt are never whole in memory); fp32 softmax.
    ``sinks``: [Hq] logits (not scaled)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    sink = sinks.float().reshape(1, Hq, 1, 1)
    outs = []
    for t0 in range(0, T, SINK_BLOCK):
        qb = q[:, :, t0:t0 + SINK_BLOCK]
        tb = qb.shape[2]
        logits = torch.matmul(qb.float(), k.float().transpose(-1, -2)) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if is_causal:
            rows = torch.arange(t0, t0 + tb, device=q.device)[:, None] + (S - T)
            logits = logits.masked_fill(torch.arange(S, device=q.device)[None, :] > rows, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[..., t0:t0 + tb, :] if attn_mask.shape[-2] == T else attn_mask
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        p = torch.softmax(torch.cat([logits, sink.expand(B, Hq, tb, 1)], -1), dim=-1)[..., :S]
        outs.append(torch.matmul(p.to(v.dtype), v))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def store_attention(q, pool_k, pool_v, offsets, lengths, max_len: int, t: int, scale: float,
                    softcap: float, sinks: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None):
    """Attention of q [B, Hq, t, D] over the store *after* the chunk's t tokens were appended.

    ``offsets``/``lengths`` [B, Hkv]: each segment's first slot and used length; ``max_len`` bounds
    the lengths (host int, so no device read is needed).
    ``bias``: the model's per-head additive term (ALiBi) over *every* key position the model has seen,
    broadcastable to [B, Hq, t or 1, S]; each logit gets ``bias[b, h, i, positions[slot]]`` — the model's
    own bias gathered at the kept tokens' positions (``positions``: int32 position of every slot). The
    Triton kernels have no bias input: the ops take this plain path when a bias is given.
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
    if bias is not None:
        logits = logits + gathered_bias(bias, positions, offsets, lengths, max_len, B, Hq, t)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # a per-query-head sink logit joins the softmax, its column dropped (gpt-oss)
        col = sinks.float().reshape(1, Hkv, G, 1, 1).expand(B, Hkv, G, t, 1).reshape(B, Hkv, G * t, 1)
        p = torch.softmax(torch.cat([logits, col], -1), dim=-1)[..., :max_len]
    else:
        p = torch.softmax(logits, dim=-1)
    out = torch.matmul(p, vals.float())
    return out.reshape(B, Hq, t, D).to(q.dtype)


def gathered_bias(bias, positions, offsets, lengths, max_len: int, B: int, Hq: int, t: int) -> torch.Tensor:
    """``bias[b, h, i, positions[slot]]`` for every padded segment slot, fp32 [B, Hkv, G*t, max_len] (the
    layout of ``store_attention``'s logits). Padding slots read position 0 (their logits are masked)."""
    from .score import bias_rows
    if positions is None:
        raise ValueError("store_attention(bias=...) needs the slots' positions")
    Hkv = offsets.shape[1]
    G = Hq // Hkv
    idx = torch.arange(max_len, device=offsets.device)
    valid = idx < lengths[:, :, None]
    slot = torch.where(valid, offsets.to(torch.int64)[:, :, None] + idx, 0)
    pos = torch.where(valid, positions[slot].to(torch.int64), 0)                  # [B, Hkv, L]
    rows = bias_rows(bias, B, Hq, t, 0, t).reshape(B, Hkv, G * t, -1)           # [B, Hkv, G*t, S]
    return torch.gather(rows, -1, pos[:, :, None, :].expand(B, Hkv, G * t, max_len))
