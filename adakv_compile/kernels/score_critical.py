"""Stage 'score', value-aware (``scorer="critical"``): a CriticalKV-like re-weighting of the SnapKV scores.

Why: SnapKV ranks a token by the attention it gets, but what a dropped token costs is its contribution to
the attention *output*, attention x value. CriticalKV (Feng et al. 2025, the Ada-KV authors' follow-up;
kvpress ``CriticalKVPress``) therefore scores in two stages: each head first keeps its best
``FIRST_STAGE`` share of its budget by attention alone, the rest goes by ``(attention + EPS) x
||W_o v||_1``. The compress op sees q, k, v but not the output projection W_o, so the value's own L1 norm
``||v||_1`` stands in for ``||W_o v||_1`` (the value-norm weighting of VATP, Guo et al. 2024); with
``AdaKVConfig.allocation="adaptive"`` the scores feed the same layer-wide top-k as SnapKV's.

Same interface as ``score.window_scores`` plus v and the layer (stage 1's size is a share of the layer's
budget). Encoding both stages in one score tensor lets every allocation and path (general, static fast
path, tensor-parallel gather) use it unchanged: stage-1 tokens score ``STAGE1 * (1 + s)`` (above any
stage-2 score, in their own attention order), the others ``(s + EPS) * ||v||_1``; no cross-head reduction,
so a tensor-parallel rank scores its heads exactly as one GPU does. No host synchronisation.
"""
from __future__ import annotations

import torch

from ..config import AdaKVConfig
from .allocate import _ranks, row_keep
from .score import window_scores

EPS = 1e-4          # kvpress CriticalKVPress.epsilon
FIRST_STAGE = (1, 2)  # kvpress first_stage_ratio = 0.5, as an exact fraction (stage-1 tokens = floor(B' / 2))
STAGE1 = 1e6        # stage-1 offset: above every stage-2 score ((s + EPS) * ||v||_1, s <= 1)


def value_aware(base: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig, layer: int,
                num_layers: int) -> torch.Tensor:
    """Critical scores [B, Hkv, n] from SnapKV's ``base`` [B, Hkv, n] (-inf = not a candidate) and the
    values ``v`` [B, Hkv, n, Dv]. Non-candidates stay -inf."""
    B, H, n = base.shape
    m = n - config.window
    if m <= 0:
        return base
    s = base[..., :m]
    cand = torch.isfinite(s)
    norm = v[:, :, :m].float().abs().sum(-1)                                # [B, H, m] ||v||_1
    second = (s.clamp(min=0) + EPS) * norm
    bp = (row_keep(config, valid.sum(-1), layer, num_layers) - config.window).clamp(min=0)
    k1 = torch.div(bp * FIRST_STAGE[0], FIRST_STAGE[1], rounding_mode="floor")  # [B]
    first = _ranks(s) < k1[:, None, None]
    out = torch.where(first, STAGE1 * (1 + s), second).masked_fill(~cand, float("-inf"))
    return torch.cat([out, base[..., m:]], dim=-1)


def critical_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig,
                    scale: float, softcap: float | None = None, layer: int = 0, num_layers: int = 1) -> torch.Tensor:
    """``window_scores`` re-weighted by :func:`value_aware` (the plain-PyTorch scorer; on CUDA
    ``ops.prompt_scores`` re-weights the Triton scorer's output the same way)."""
    return value_aware(window_scores(q, k, valid, config, scale, softcap), v, valid, config, layer, num_layers)
