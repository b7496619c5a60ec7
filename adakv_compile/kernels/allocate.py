"""Stage 'allocate': from scores to the set of kept tokens per (row, KV head) (docs/algorithm.md).

Everything is batched over rows and heads: per-row budgets are tensors computed from the per-row valid
counts (left padding), so there is no Python loop over rows or heads and no host synchronisation.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from ..config import AdaKVConfig


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim: higher first, ties to the lower index (0 = best)."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def _fraction(x: float) -> tuple[int, int]:
    """``x`` as an exact fraction p/q (denominator <= 2**20), the convention of ``config.alpha_floor``."""
    f = Fraction(x).limit_denominator(1 << 20)
    return f.numerator, f.denominator


def row_keep(config: AdaKVConfig, n_real: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
    """``config.layer_keep`` as tensor arithmetic: tokens per KV head (window included) for each row of
    ``n_real`` [B] valid tokens (int64). Rows whose result is >= n_real are not compressed."""
    n_real = n_real.long()
    if layer in config.skip_layers:
        return n_real
    w = config.window
    if config.budget is not None:
        keep = torch.full_like(n_real, config.budget)
    else:
        num, den = _fraction(config.ratio_fraction)
        keep = (n_real - torch.div(n_real * num, den, rounding_mode="floor")).clamp(min=w + 1)
    if config.layer_schedule == "flat" or num_layers <= 1:
        return keep
    base = keep - w
    lo = torch.div(base, config.pyramid_beta, rounding_mode="floor")
    hi = 2 * base - lo
    clamped = hi >= n_real - w
    hi = torch.where(clamped, n_real - w, hi)
    lo = torch.where(clamped, 2 * base - hi, lo)
    steps = torch.div(hi - lo, num_layers - 1, rounding_mode="floor")
    return hi - layer * steps + w


def _round_half_even(num: torch.Tensor, den) -> torch.Tensor:
    """round(num / den), halves to even (``torch.round``'s rule), in exact integer arithmetic (``den`` an int
    or a positive tensor broadcastable to ``num``)."""
    fl = torch.div(num, den, rounding_mode="floor")
    twice = 2 * (num - fl * den)
    up = (twice > den) | ((twice == den) & (fl % 2 == 1))
    return fl + up.long()


def adaptive_budgets(scores: torch.Tensor, budget: torch.Tensor, alpha: float,
                     safeguard: str = "official", head_floor: int = 0) -> torch.Tensor:
    """Ada-KV head budgets [B, H] (int64) from candidate scores [B, H, m] (-inf = not a candidate) and the
    per-row selectable budget ``budget`` [B] (B' of each row; H*B' slots per row).

    ``f = floor(alpha * B')`` (alpha an exact fraction p/q), raised to ``F = max(f, min(head_floor, B'))``
    (docs/algorithm.md, Head floor); ``c[h]`` = entries of head h among the row's global top H*B' (higher
    score first, ties to the lower flat index h*m + j).
    - "official": ``a = round(c * (1 - alpha) + f)`` half to even, computed exactly as
      ``round((c*(q-p) + f*q) / q)`` in integers; where the head floor is above f, the same blend with
      ``alpha' = F / B'``: ``round((c*(B'-F) + F*B') / B')``; clamped to the head's candidates (total ~ H*B');
    - "exact-total": F + the largest-remainder apportionment of H*B' - H*F by c (total exactly H*B');
    - "kvpress": each head's top F forced, the rest to the best remaining entries of all heads.
    """
    B, H, m = scores.shape
    budget = budget.long()
    p, q = _fraction(alpha)
    f = torch.div(budget * p, q, rounding_mode="floor")  # [B]
    floor = torch.maximum(f, budget.clamp(max=head_floor))  # [B] F
    raised = floor > f
    T = H * budget
    if safeguard == "kvpress":
        forced = _ranks(scores) < floor[:, None, None]
        scores = scores.masked_fill(forced, float("inf"))
    win = _ranks(scores.reshape(B, H * m)) < T[:, None]
    c = win.view(B, H, m).sum(-1)  # [B, H]
    if safeguard == "kvpress":
        return c
    if safeguard == "official":
        a = _round_half_even(c * (q - p) + (f * q)[:, None], q)
        bp = budget.clamp(min=1)[:, None]
        a_floor = _round_half_even(c * (bp - floor[:, None]) + floor[:, None] * bp, bp)
        a = torch.where(raised[:, None], a_floor, a)
        return torch.minimum(a, torch.isfinite(scores).sum(-1))
    pool = (T - H * floor)[:, None]
    t = T.clamp(min=1)[:, None]
    num = c * pool
    share = torch.div(num, t, rounding_mode="floor")
    rem = num - share * t
    left = pool - share.sum(-1, keepdim=True)
    bonus = (_ranks(rem) < left).long()
    return floor[:, None] + share + bonus


def head_budgets(scores: torch.Tensor, budget: int, alpha: float, safeguard: str = "official",
                 head_floor: int = 0) -> torch.Tensor:
    """Ada-KV head budgets [H] of one row: scores [H, m] (candidates), ``budget`` = B' per head on average
    (see :func:`adaptive_budgets`)."""
    b = torch.full((1,), budget, dtype=torch.long, device=scores.device)
    return adaptive_budgets(scores[None], b, alpha, safeguard, head_floor)[0]


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig, layer: int,
              num_layers: int) -> torch.Tensor:
    """Kept tokens [B, Hkv, n] bool: chosen candidates + the window; uncompressed rows keep all valid."""
    B, H, n = scores.shape
    w = config.window
    m = n - w
    everything = valid[:, None, :].expand(B, H, n)
    if m <= 0 or layer in config.skip_layers or not config.compresses:
        return everything.clone()
    n_real = valid.sum(-1)
    keep_l = row_keep(config, n_real, layer, num_layers)
    compress = n_real > keep_l  # [B]
    bp = (keep_l - w).clamp(min=0, max=m)  # B' of each row (meaningful where compress)
    cand = scores[..., :m]
    if config.allocation == "adaptive" and config.scorer != "streaming":
        budgets = adaptive_budgets(cand, bp, config.alpha, config.safeguard, config.head_floor)
    else:
        budgets = bp[:, None].expand(B, H)
    chosen = _ranks(cand) < budgets[..., None]
    compressed = torch.cat([chosen, chosen.new_ones(B, H, w)], dim=-1)
    return torch.where(compress[:, None, None], compressed, everything)
