"""Host arithmetic sizing the compacted caches: how many tokens a layer / a tensor-parallel rank may keep.

Here, below both ``cache.py`` (which sizes an AdaKVCache) and ``kernels/`` (``kernels/shard.py`` caps a rank's
rows by it), so that ``kernels/`` imports nothing above it. Depends on ``config.py`` only.
"""
from __future__ import annotations

from typing import Optional

from .config import AdaKVConfig, alpha_floor, keep_for_row


def kept_per_head_bound(config: AdaKVConfig, max_prompt_len: Optional[int], layer: int) -> int:
    """Tokens (window included) any one layer keeps per KV head *on average* over a row's heads, at most."""
    if layer in config.skip_layers or config.budget is None:
        if max_prompt_len is None:
            what = "skip_layers" if layer in config.skip_layers else "compression_ratio"
            raise ValueError(f"AdaKVCache(max_prompt_len=None): a config with {what} keeps a number of "
                             "tokens that depends on the prompt length; give max_prompt_len")
        if layer in config.skip_layers:
            return max_prompt_len
    keep = config.budget if config.budget is not None else keep_for_row(config, max_prompt_len)
    if config.layer_schedule == "pyramid":
        base = keep - config.window
        keep = 2 * base - base // config.pyramid_beta + config.window  # the first layer's, the largest
    if max_prompt_len is not None:
        keep = min(keep, max_prompt_len)
    return keep


def rank_kept_bound(config: AdaKVConfig, heads: int, local: int, kept_per_head: int,
                    max_prompt_len: Optional[int]) -> int:
    """Tokens one tensor-parallel rank's ``local`` KV heads of a row may keep, at most.

    With ``tp_allocation="global"`` (adaptive) the layer's top-k over all ``heads`` may give one rank's heads
    far more than their even share: everything but the other heads' minimum (window + the safeguard
    floor ``floor(alpha * B')`` each). ``"per-rank"`` (or uniform budgets) keeps the even share.
    """
    if config.tp_allocation == "per-rank" or config.allocation != "adaptive" or config.scorer == "streaming":
        return local * kept_per_head
    w = config.window
    floor = alpha_floor(config.alpha, kept_per_head - w) \
        if config.layer_schedule == "flat" and config.budget is not None and not config.skip_layers else 0
    bound = heads * kept_per_head + (heads + 1) // 2 - (heads - local) * (w + floor)
    if max_prompt_len is not None:
        bound = min(bound, local * max_prompt_len)
    return max(bound, local * kept_per_head)
