"""Stage 'score': how much each prompt token matters to each KV head (docs/algorithm.md, Scores)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AdaKVConfig


def window_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig,
                  scale: float, softcap: float | None = None) -> torch.Tensor:
    """SnapKV scores [B, Hkv, n] (fp32): window attention, mean over window queries, pooled, GQA-reduced.

    Columns that are not candidates (window positions, padding) are -inf.
    """
    B, Hq, n, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    w = config.window
    out = torch.full((B, Hkv, n), float("-inf"), device=q.device)
    m = n - w
    if m <= 0:
        return out
    if config.scorer == "streaming":
        return streaming_scores(valid, config, Hkv, n)
    qw = q[:, :, m:].float()
    kk = k.float().repeat_interleave(G, dim=1)
    logits = torch.matmul(qw, kk.transpose(-1, -2)) * scale  # [B, Hq, w, n]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    qpos = torch.arange(m, n, device=q.device)[:, None]
    kpos = torch.arange(n, device=q.device)[None, :]
    allowed = (kpos <= qpos)[None, None] & valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    s = p.mean(dim=2)[..., :m]  # [B, Hq, m]
    flat = s.reshape(B * Hq, 1, m)
    pad = config.kernel_size // 2
    if config.pooling == "max":
        pooled = F.max_pool1d(flat, config.kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, config.kernel_size, stride=1, padding=pad, count_include_pad=True)
    pooled = pooled.reshape(B, Hkv, G, m)
    red = pooled.mean(dim=2) if config.gqa_reduce == "mean" else pooled.amax(dim=2)
    red = red.masked_fill(~valid[:, None, :m], float("-inf"))
    out[..., :m] = red
    return out


def streaming_scores(valid: torch.Tensor, config: AdaKVConfig, heads: int, n: int) -> torch.Tensor:
    """StreamingLLM as scores: sinks score 2, other candidates j/n (recent first), the rest -inf."""
    B = valid.shape[0]
    m = n - config.window
    pos = torch.arange(n, device=valid.device)
    start = n - valid.sum(-1, keepdim=True)  # first valid position per row (left padding)
    sink = valid & (pos[None] - start < config.sink_tokens)
    s = torch.where(sink, 2.0, pos[None].float() / n)
    s = s.masked_fill(~valid, float("-inf"))
    s[:, m:] = float("-inf")
    return s[:, None, :].expand(B, heads, n).clone()
