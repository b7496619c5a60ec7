"""Sliding-window layers of the fast path: a fixed-size ring buffer per layer (static shapes and addresses).

``AdaKVWindowLayer`` (``adakv_compile/hybrid.py``) preallocates, per sliding-window layer:

    keys, values  [B, Hkv, W, D]  the last W tokens of each row; token at logical position p sits in slot p % W
    wpos          [B, W] int32     the logical position (index in the padded sequence) of each slot's token;
                                   -1 for an empty slot or a padding token (never attended)

The window layer is exact (nothing is dropped that the model's window would keep): a query at position p
attends to the slots with ``p - W < wpos <= p``, which is HF's sliding-window mask (``kv_idx > q_idx - W``)
with the padding excluded. Decode attends over the ring *before* the chunk is written (plus the chunk
itself, causally), so a chunk of t > 1 tokens never overwrites a slot one of its own queries still needs.

Ops (registered here; the graph pass inserts them, users never call them):
- ``adakv::window_slot``   what ``AdaKVWindowLayer.update`` traces to (a marker, like ``adakv::cache_slot``);
                           run un-rewritten it raises.
- ``adakv::window_fill``   prefill: write the prompt's last W tokens (and their positions) into the ring.
- ``adakv::window_attend`` decode/extend: attention of the chunk over ring + chunk (pure).
- ``adakv::window_write``  decode/extend: write the chunk into the ring (declared mutation, after attend).
All are ``triton_op``s with plain-PyTorch bodies: Inductor traces them into the graph (fused, no host
work, no syncs), so the decode step stays one CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .attend import exact_attention, sink_attention
from .ops import valid_from_mask
from .static import _EAGER_MESSAGE
from .store import StoreError


@torch.library.custom_op("adakv::window_slot", mutates_args=())
def window_slot(k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                wpos: torch.Tensor, seen: torch.Tensor, filled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Marker: (k_new, v_new) as the attention's K/V, and the window layer's ring for the pass.
    ``filled``: False at prefill."""
    raise StoreError(_EAGER_MESSAGE)


@window_slot.register_fake
def _(k_new, v_new, keys, values, wpos, seen, filled):
    return torch.empty_like(k_new), torch.empty_like(v_new)


@triton_op("adakv::window_fill", mutates_args=("keys", "values", "wpos"))
def window_fill(k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], keys: torch.Tensor,
                values: torch.Tensor, wpos: torch.Tensor) -> None:
    """Prefill (the cache is empty, positions 0..n-1): the last min(n, W) prompt tokens into the ring.

    Valid keys come from the mask's last query row (as compress does); under a sliding-window mask that
    row allows exactly the valid tokens of the last W, which are the ones stored."""
    B, H, n, D = k.shape
    W = keys.shape[2]
    m = min(n, W)
    valid = valid_from_mask(attn_mask, B, n, k.device)[:, n - m:]               # [B, m]
    pos = torch.arange(n - m, n, device=k.device)
    slot = pos % W
    wpos.fill_(-1)
    keys.index_copy_(2, slot, k[:, :, n - m:].to(keys.dtype))
    values.index_copy_(2, slot, v[:, :, n - m:].to(values.dtype))
    wpos.index_copy_(1, slot, torch.where(valid, pos, -1).to(wpos.dtype))


def window_allowed(wpos: torch.Tensor, seen: torch.Tensor, t: int, window: int) -> torch.Tensor:
    """[B, 1, t, W + t] bool: which of (ring slots, chunk tokens) each chunk query may attend."""
    B = wpos.shape[0]
    qpos = seen + torch.arange(t, device=wpos.device)                              # [t]
    kpos = torch.cat([wpos.to(torch.int64), qpos.expand(B, t)], 1)                 # [B, W + t]
    kp, qp = kpos[:, None, :], qpos[None, :, None]
    return ((kp >= 0) & (kp <= qp) & (kp > qp - window))[:, None]


@triton_op("adakv::window_attend", mutates_args=())
def window_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, wpos: torch.Tensor, seen: torch.Tensor, scale: float,
                  softcap: float, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of q [B, Hq, t, D] (positions seen..seen+t-1) over the ring (before the chunk is written)
    and the chunk."""
    t, W = q.shape[2], keys.shape[2]
    k = torch.cat([keys, k_new.to(keys.dtype)], 2)
    v = torch.cat([values, v_new.to(values.dtype)], 2)
    allowed = window_allowed(wpos, seen, t, W)
    if sinks is not None:
        return sink_attention(q, k, v, allowed, scale, False, softcap, sinks).to(q.dtype).contiguous()
    return exact_attention(q, k.to(q.dtype), v.to(q.dtype), allowed, scale, False, softcap).contiguous()


@triton_op("adakv::window_write", mutates_args=("keys", "values", "wpos"))
def window_write(k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 wpos: torch.Tensor, seen: torch.Tensor) -> None:
    """The chunk's last min(t, W) tokens into their slots (positions seen..seen+t-1)."""
    B, H, t, D = k_new.shape
    W = keys.shape[2]
    m = min(t, W)
    pos = seen + torch.arange(t - m, t, device=k_new.device)
    slot = pos % W
    keys.index_copy_(2, slot, k_new[:, :, t - m:].to(keys.dtype))
    values.index_copy_(2, slot, v_new[:, :, t - m:].to(values.dtype))
    wpos.index_copy_(1, slot, pos.to(wpos.dtype).expand(B, m).contiguous())
