"""Stage 'score': how much each prompt token matters to each KV head (docs/algorithm.md, Scores)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AdaKVConfig


def window_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig,
                  scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV scores [B, Hkv, n] (fp32), in the official order: window attention, mean over the window
    queries, GQA reduction over each KV group, then pooling of the reduced scores.

    Columns that are not candidates (window positions, padding) are -inf. The queries of a KV group are
    stacked (``[B, Hkv, G*w, D]``) against the group's keys: K is never repeated to the query heads.
    No host synchronisation. ``sinks`` ([Hq] logits, gpt-oss): the probabilities the model computes, the
    sink's column in the softmax (docs/algorithm.md, "Attention sinks"). ``bias``: the model's per-head
    additive term (ALiBi), broadcastable to [B, Hq, n or 1, n]: its window rows join the logits, so the
    scores are the probabilities the model computes (docs/algorithm.md, "Per-head additive biases").
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    w = config.window
    m = n - w
    fixed = scores_without_attention(valid, config, Hkv, n)
    if fixed is not None:
        return fixed
    qw = q[:, :, m:].float().reshape(B, Hkv, G * w, D)
    logits = torch.matmul(qw, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*w, n]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.view(B, Hkv, G, w, n)
    if bias is not None:
        logits = logits + bias_rows(bias, B, Hq, n, m, w).reshape(B, Hkv, G, w, n)
    qpos = torch.arange(m, n, device=q.device)[:, None]
    kpos = torch.arange(n, device=q.device)[None, :]
    allowed = (kpos <= qpos)[None, None, None] & valid[:, None, None, None, :]
    # the lowest finite value, not -inf: a window query with no visible key (a padding query of a row too
    # short to be compressed) then gives finite weights instead of NaN; elsewhere exp() of it is exactly 0.
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    if sinks is not None:
        col = sinks.float().reshape(1, Hkv, G, 1, 1).expand(B, Hkv, G, w, 1)
        p = torch.softmax(torch.cat([logits, col], -1), dim=-1)[..., :n]
    else:
        p = torch.softmax(logits, dim=-1)
    s = p.mean(dim=3)[..., :m]  # [B, Hkv, G, m]
    red = s.mean(dim=2) if config.gqa_reduce == "mean" else s.amax(dim=2)  # [B, Hkv, m]
    flat = red.reshape(B * Hkv, 1, m)
    pad = config.kernel_size // 2
    if config.pooling == "max":
        pooled = F.max_pool1d(flat, config.kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, config.kernel_size, stride=1, padding=pad, count_include_pad=True)
    pooled = pooled.view(B, Hkv, m).masked_fill(~valid[:, None, :m], float("-inf"))
    window = pooled.new_full((B, Hkv, w), float("-inf"))
    return torch.cat([pooled, window], dim=-1)


def bias_rows(bias: torch.Tensor, B: int, Hq: int, nq: int, q0: int, t: int) -> torch.Tensor:
    """Rows ``q0 .. q0+t`` of a per-head additive term ``bias`` [.., q, k] (q: ``nq`` rows, or 1 broadcast
    over the queries; batch and heads may broadcast) as fp32 [B, Hq, t, k]."""
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)
    if b.shape[-2] != 1:
        if b.shape[-2] != nq:
            raise ValueError(f"bias: {tuple(bias.shape)} has {b.shape[-2]} query rows, expected 1 or {nq}")
        b = b[..., q0:q0 + t, :]
    return b.float().expand(B, Hq, t, b.shape[-1])  # the rows read, converted (not the whole term)


def scores_without_attention(valid: torch.Tensor, config: AdaKVConfig, heads: int, n: int) -> torch.Tensor | None:
    """The scores when no window attention is needed (both scorers): all -inf when the prompt is no longer
    than the window (no candidates), StreamingLLM's positional scores; None otherwise."""
    if n <= config.window:
        return torch.full((valid.shape[0], heads, n), float("-inf"), device=valid.device)
    if config.scorer == "streaming":
        return streaming_scores(valid, config, heads, n)
    return None


def streaming_scores(valid: torch.Tensor, config: AdaKVConfig, heads: int, n: int) -> torch.Tensor:
    """StreamingLLM as scores: sinks score 2, other candidates j/n (recent first), the rest -inf."""
    B = valid.shape[0]
    m = n - config.window
    pos = torch.arange(n, device=valid.device)
    start = n - valid.sum(-1, keepdim=True)  # first valid position per row (left padding)
    sink = valid & (pos[None] - start < config.sink_tokens)
    s = torch.where(sink, 2.0, pos[None].float() / n)
    s = s.masked_fill(~valid | (pos[None] >= m), float("-inf"))
    return s[:, None, :].expand(B, heads, n).clone()
