"""Stage 'allocate': from scores to the set of kept tokens per (row, KV head) (docs/algorithm.md)."""
from __future__ import annotations

import torch

from ..config import AdaKVConfig, alpha_floor, layer_keep


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim: higher first, ties to the lower index (0 = best)."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def head_budgets(scores: torch.Tensor, budget: int, alpha: float, safeguard: str = "official") -> torch.Tensor:
    """Ada-KV head budgets for one row: scores [H, m] (candidates), ``budget`` = B' per head on average.

    One top-(H*B') over all heads counts winners per head; the safeguard keeps floor(alpha*B') per head
    and apportions the rest by those counts (largest remainder, so the total is exactly H*B').
    """
    H, m = scores.shape
    T = H * budget
    f = alpha_floor(alpha, budget)
    if safeguard == "kvpress":
        forced = _ranks(scores) < f
        boosted = scores.masked_fill(forced, float("inf"))
        return (_ranks(boosted.reshape(-1)) < T).view(H, m).sum(-1)
    win = _ranks(scores.reshape(-1)) < T
    counts = win.view(H, m).sum(-1)
    pool = T - H * f
    num = counts * pool
    share = num // T
    rem = num - share * T
    left = pool - int(share.sum())
    bonus = (_ranks(rem.to(torch.float64)) < left).to(share.dtype)
    return f + share + bonus


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig, layer: int,
              num_layers: int) -> torch.Tensor:
    """Kept tokens [B, Hkv, n] bool: chosen candidates + the window; uncompressed rows keep all valid."""
    B, H, n = scores.shape
    w = config.window
    keep = valid[:, None, :].expand(B, H, n).clone()
    m = n - w
    for b in range(B):
        n_b = int(valid[b].sum())
        keep_l = layer_keep(config, n_b, layer, num_layers)
        if n_b <= keep_l:
            continue
        bp = keep_l - w
        cand = scores[b, :, :m]
        if config.allocation == "adaptive" and config.scorer == "snapkv":
            budgets = head_budgets(cand, bp, config.alpha, config.safeguard)
        else:
            budgets = torch.full((H,), bp, device=scores.device, dtype=torch.long)
        keep[b, :, :m] = _ranks(cand) < budgets[:, None]
        keep[b, :, m:] = True
    return keep
