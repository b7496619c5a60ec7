"""Stage 'allocate' across tensor-parallel ranks: one layer-wide top-k when the KV heads are sharded.

Under tensor parallelism (transformers ``tp_plan="auto"``: q/k/v column-sharded, o_proj row-sharded) rank
r of the TP group holds KV heads ``[r * Hl, (r + 1) * Hl)`` and scores only those. Ada-KV's allocation is
one top-k over *all* KV heads of a layer, so by default (``tp_allocation="global"``) each rank
all-gathers the pooled scores ``[B, Hl, n]`` of its heads (in rank order: the global head order), runs
the single-GPU allocation on ``[B, H, n]`` — the same inputs on every rank, so the same result — and
keeps its own heads' rows of the mask. ``"per-rank"`` skips the collective: each rank allocates
``Hl x B'`` over its own heads (equal memory per rank, a different selection).

The gather runs inside the compress op (an opaque custom op, eager at run time, never in a CUDA graph),
so a plain ``torch.distributed`` collective is used; the graph pass finds the TP group's name in the
graph's own functional collectives (``passes/shard.py``).
"""
from __future__ import annotations

import torch

from ..config import AdaKVConfig
from .allocate import _ranks, keep_mask
from ..sizing import kept_per_head_bound, rank_kept_bound


def resolve_group(name: str):
    """The process group a graph's functional collectives name (``_c10d_functional.all_reduce(x, op, name)``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def needs_gather(config: AdaKVConfig, tp_group: str) -> bool:
    """Whether the allocation must see the other ranks' heads (uniform budgets are per head already)."""
    return bool(tp_group) and config.tp_allocation == "global" and config.allocation == "adaptive" \
        and config.scorer != "streaming" and config.compresses


def keep_mask_tp(scores: torch.Tensor, valid: torch.Tensor, config: AdaKVConfig, layer: int, num_layers: int,
                 tp_group: str = "") -> torch.Tensor:
    """``keep_mask`` of this rank's heads ``[B, Hl, n]``, allocated over the whole TP group's heads."""
    if not needs_gather(config, tp_group):
        return keep_mask(scores, valid, config, layer, num_layers)
    import torch.distributed as dist

    group = resolve_group(tp_group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hl, n = scores.shape
    parts = [torch.empty_like(scores) for _ in range(world)]
    dist.all_gather(parts, scores.contiguous(), group=group)
    full = torch.cat(parts, dim=1)                                            # [B, world * Hl, n]
    keep = keep_mask(full, valid, config, layer, num_layers)
    return keep[:, rank * Hl:(rank + 1) * Hl].contiguous()


def cap_rows(keep: torch.Tensor, scores: torch.Tensor, cap: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``cap`` tokens per row over this rank's heads: ``(keep, trimmed tokens)``.

    Rows within the cap are unchanged. A row over it (the global allocation gave this rank's heads more
    than its cache reserves: ``AdaKVCache(tp_reserve=...)``) keeps its window tokens and its best-scored
    chosen candidates over all local heads, ``cap - heads x window`` of them. Never triggers with the
    default reserve (the worst case), which is what makes the default equal to one GPU.
    """
    B, H, n = keep.shape
    counts = keep.sum((1, 2))                                                 # [B]
    excess = (counts - cap).clamp(min=0)
    m = n - window
    if m <= 0:
        return keep, excess.sum()
    chosen = keep[..., :m]
    flat = scores[..., :m].float().masked_fill(~chosen, float("-inf")).reshape(B, H * m)
    allowed = cap - (keep[..., m:].sum((1, 2)))                               # [B] room left after the window
    trimmed = chosen & (_ranks(flat).reshape(B, H, m) < allowed[:, None, None])
    capped = torch.cat([trimmed, keep[..., m:]], dim=-1)
    return torch.where((excess > 0)[:, None, None], capped, keep), excess.sum()


def worst_rank_share(config: AdaKVConfig, tp_group: str, local: int, n: int, layer: int) -> int:
    """The most tokens a prompt of n tokens can make this rank's ``local`` heads keep per row in ``layer``
    (host arithmetic, no device read): ``sizing.rank_kept_bound`` under the global allocation, the even
    share otherwise."""
    per_head = kept_per_head_bound(config, n, layer)
    if not needs_gather(config, tp_group):
        return local * per_head
    import torch.distributed as dist
    heads = local * dist.get_world_size(resolve_group(tp_group))
    return rank_kept_bound(config, heads, local, per_head, n)
