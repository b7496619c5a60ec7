"""Hybrid models on the fast path: the AdaKVCache layers of the layers that are not full attention.

Gemma 2/3, Cohere2, gpt-oss, Mistral with a window, Qwen3-Next, LFM2 … mix full-attention layers with
sliding-window, linear-attention, SSM or conv layers. Only full-attention layers are compressed (a window
already bounds the others' memory); every layer must still be static (fixed shapes and addresses) so the
decode step replays as one CUDA graph:

- ``full_attention``    → ``cache.AdaKVLayer`` (the compacted store).
- ``sliding_attention`` → ``AdaKVWindowLayer``: a ring buffer of the last W tokens (``kernels/window.py``),
  exact. transformers' ``StaticSlidingWindowLayer`` (its base class here, for ``is_sliding`` and the mask
  dispatch) rolls its buffer and tracks a Python int for the fill level, which Dynamo specialises on (a
  graph per step); the ring keeps every per-step quantity in tensors.
- ``linear_attention`` / ``conv`` (Mamba, gated delta net, LFM2 conv) → transformers' own static layer
  class for the type (``STATIC_LAYER_TYPE_MAPPING``): the model's own fixed-size state, written by the
  model's own code.
Anything else (chunked attention, indexed attention, "hybrid" layers holding both kinds) raises a
``ValueError`` naming the layer type: use a DynamicCache (the general path) for those models.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin, StaticSlidingWindowLayer

from .kernels import window as _window  # noqa: F401  (registers torch.ops.adakv.window_*)
from .kernels.store import StoreError

ATTENTION_TYPES = ("full_attention", "sliding_attention")
STATE_TYPES = ("linear_attention", "conv")


class AdaKVWindowLayer(StaticSlidingWindowLayer):
    """A sliding-window layer's static ring buffer (layout in ``kernels/window.py``); exact, not compressed."""

    is_compileable = True
    is_sliding = True

    def __init__(self, owner, batch_size: int, heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device, seen: torch.Tensor):
        CacheLayerMixin.__init__(self)  # not StaticLayer's: nothing lazy here
        self.keys = torch.zeros(batch_size, heads, window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch_size, heads, window, head_dim, dtype=dtype, device=device)
        self.wpos = torch.full((batch_size, window), -1, dtype=torch.int32, device=device)
        self.seen = seen
        self.batch_size, self.num_heads, self.head_dim, self.window = batch_size, heads, head_dim, window
        self.max_cache_len = window
        self.cumulative_length_int = 0
        self._is_croppable = False
        self.device = device
        ref = weakref.ref(owner)
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)
            t._adakv_cache = ref  # lets the backend's wrapper find the cache from a graph input
        self.filled = False
        self.is_initialized = True

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.wpos, self.seen

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != self.batch_size or key_states.shape[1] != self.num_heads:
            raise StoreError(f"AdaKVCache's window layer was built for batch {self.batch_size} x {self.num_heads} "
                             f"KV heads, got K/V of shape {tuple(key_states.shape)}")
        k, v = torch.ops.adakv.window_slot(key_states, value_states, self.keys, self.values, self.wpos,
                                           self.seen, self.filled)
        self.filled = True
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # prefill: the prompt's own sliding mask (exact attention uses it); after: ignored by the rewrite
        return query_length, 0

    def get_seq_length(self):
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.wpos.fill_(-1)
        self.seen.zero_()
        self.filled = False

    @property
    def is_croppable(self) -> bool:
        return False

    def _unsupported(self, *args, **kwargs):
        raise StoreError("AdaKVCache does not support this cache operation (beam-search reorder, crop, batch "
                         "repeat/select, offloading)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = offload = prefetch = _unsupported


def layer_specs(text) -> list[tuple[str, dict, int, int]]:
    """Per model layer: (layer type, HF layer kwargs, KV heads, head_dim) from a (text) config.

    Layers may differ in heads and head_dim (``config.per_layer_config`` where transformers has it)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, kwargs = get_layer_types_and_kwargs(text)
        if isinstance(kwargs, dict):  # transformers 5.17: one dict for every layer
            kwargs = [kwargs] * len(types)
    except (ImportError, AttributeError):  # transformers without per-layer configs (5.17)
        types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
        window = getattr(text, "sliding_window", None)
        kwargs = [dict(sliding_window=window) if t == "sliding_attention" else {} for t in types]
    per_layer = getattr(text, "per_layer_config", None)
    out = []
    for i, (t, kw) in enumerate(zip(types, kwargs)):
        c = per_layer[i] if per_layer is not None else text
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        out.append((t, dict(kw), heads, head_dim))
    return out


def check_supported(specs) -> None:
    for i, (t, kw, _, _) in enumerate(specs):
        if t not in ATTENTION_TYPES + STATE_TYPES:
            raise ValueError(f"AdaKVCache: layer {i} is a {t!r} layer, which the fast path does not hold (it "
                             f"holds {', '.join(ATTENTION_TYPES + STATE_TYPES)}); use a DynamicCache (general "
                             "path) for this model")
        if t == "sliding_attention" and not kw.get("sliding_window"):
            raise ValueError(f"AdaKVCache: layer {i} is a sliding-window layer without a sliding_window size "
                             "in the config")


def state_layer(layer_type: str, kwargs: dict):
    """transformers' own static layer for a linear-attention / SSM / conv layer (the model's own state)."""
    from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING

    return STATIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)


def mark_states_static(layers) -> None:
    """Linear-attention states are allocated inside the prefill graph (transformers skips the static mark
    while compiling): mark them once they exist, so the decode graph takes them as fixed addresses."""
    for layer in layers:
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for t in (states or {}).values():
                if isinstance(t, torch.Tensor) and not getattr(t, "_adakv_static", False):
                    torch._dynamo.mark_static_address(t)
                    t._adakv_static = True


def window_of(layer) -> Optional[int]:
    return layer.window if isinstance(layer, AdaKVWindowLayer) else None
