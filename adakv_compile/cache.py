"""AdaKVCache: the fast path's cache — preallocated, static addresses, graph-replayable decode.

HF's own fast path needs ``StaticCache``; ours needs this one (one line in user code)::

    backend = adakv_compile.compile_model(model, AdaKVConfig(budget=1024))
    cache = AdaKVCache(model, backend, batch_size=8, max_new_tokens=256)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=256)

Each layer holds fixed-size tensors (``kernels/static.py`` has the layout): nothing is allocated,
moved or resized after construction, so the compiled decode step replays as one CUDA graph. The pools are
sized from the config: per row, every KV head's kept tokens (window included, with the official
safeguard's rounding slack) plus ``max_new_tokens`` free slots per head for the tokens appended after the
prompt (generated tokens, or a question after a compressed context). Appending more raises
``StoreError`` before the step runs.

``update`` (traced by Dynamo inside the model) calls the ``adakv::cache_slot`` marker, which the
backend's pass rewrites into compress (prefill) or append + attend (decode). Without that rewrite —
uncompiled model, another backend — the marker raises: a compacted cache never reaches code that would
read it as a dense one.
"""
from __future__ import annotations

import weakref
from typing import Optional, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import AdaKVConfig, keep_for_row
from .kernels import static as _static  # noqa: F401  (registers torch.ops.adakv.cache_slot & co)
from .kernels.store import StoreError


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


class AdaKVLayer(CacheLayerMixin):
    """One attention layer's static compacted store (tensors laid out as in ``kernels/static.py``)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "AdaKVCache", batch_size: int, heads: int, head_dim: int, kept_per_head: int,
                 room: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        # slack (heads + 1) // 2: the official safeguard rounds each head's budget (sum may exceed by 1/2 a head)
        self.slots_per_row = heads * kept_per_head + (heads + 1) // 2 + heads * room
        self.batch_size, self.num_heads, self.head_dim, self.room = batch_size, heads, head_dim, room
        n = batch_size * self.slots_per_row + 1
        self.pool_k = torch.zeros(n, head_dim, dtype=dtype, device=device)
        self.pool_v = torch.zeros(n, head_dim, dtype=dtype, device=device)
        self.off = torch.zeros(batch_size, heads, dtype=torch.int32, device=device)
        self.lens = torch.zeros(batch_size, heads, dtype=torch.int32, device=device)
        self.pos = torch.zeros(n, dtype=torch.int32, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.device = device
        ref = weakref.ref(owner)
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)
            t._adakv_cache = ref  # lets the backend's wrapper find the cache from a graph input
        self.compressed = False
        self.is_initialized = True

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.pool_k, self.pool_v, self.off, self.lens, self.pos, self.seen

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != self.batch_size or key_states.shape[1] != self.num_heads:
            raise StoreError(f"AdaKVCache was built for batch {self.batch_size} x {self.num_heads} KV heads, got "
                             f"K/V of shape {tuple(key_states.shape)}")
        k, v = torch.ops.adakv.cache_slot(key_states, value_states, self.pool_k, self.pool_v, self.off,
                                          self.lens, self.pos, self.seen, self.room, self.compressed)
        self.compressed = True
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The rewritten attention ignores the model's mask after prefill (the store holds no padding);
        # a chunk-sized mask keeps shapes static and consistent with the K/V the marker returns.
        return query_length, 0

    def get_seq_length(self):
        return self.seen  # a 0-d device tensor, like HF's StaticLayer: positions are computed in-graph

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.lens.zero_()
        self.off.zero_()
        self.seen.zero_()
        self.compressed = False

    def _unsupported(self, *args, **kwargs):
        raise StoreError("AdaKVCache does not support this cache operation (beam-search reorder, crop, batch "
                         "repeat/select, offloading): its per-head segments cannot be reindexed in place")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = offload = prefetch = _unsupported


class AdaKVCache(Cache):
    """A preallocated compacted KV cache for ``batch_size`` rows and ``max_new_tokens`` appended tokens.

    model: the HF model (or its config; then pass ``device`` and ``dtype``).
    config: the AdaKVConfig, or the backend (its config is used; the backend checks they match).
    max_prompt_len: needed only when the kept count depends on the prompt (compression_ratio, skip_layers).
    """

    def __init__(self, model, config, batch_size: int, max_new_tokens: int,
                 max_prompt_len: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        from .backend import AdaKVBackend

        if isinstance(config, AdaKVBackend):
            config = config.config
        if not isinstance(config, AdaKVConfig):
            raise TypeError(f"AdaKVCache(config=...) needs an AdaKVConfig or an adakv backend, got "
                            f"{type(config).__name__}")
        if not config.compresses:
            raise ValueError("AdaKVCache(config=...): the config keeps every token (no budget or "
                             "compression_ratio); use a DynamicCache or StaticCache for exact mode")
        for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaKVCache({name}={value!r}): must be an integer >= 1")
        if max_prompt_len is not None and (not isinstance(max_prompt_len, int) or max_prompt_len < 1):
            raise ValueError(f"AdaKVCache(max_prompt_len={max_prompt_len!r}): must be an integer >= 1")
        if isinstance(model, torch.nn.Module):
            p = next(model.parameters())
            device = p.device if device is None else torch.device(device)
            dtype = p.dtype if dtype is None else dtype
            mconf = model.config
        else:
            mconf = model
            if device is None or dtype is None:
                raise ValueError("AdaKVCache(model=<config>): pass device= and dtype= with a config")
            device = torch.device(device)
        text = mconf.get_text_config() if hasattr(mconf, "get_text_config") else mconf
        layer_types = getattr(text, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError("AdaKVCache: the model has non-full-attention layers "
                             f"({sorted(set(layer_types) - {'full_attention'})}); use a DynamicCache (general "
                             "path), which keeps such layers in full")
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.appended = 0  # tokens appended since the prefill (the backend's wrapper counts them)
        layers = [AdaKVLayer(self, batch_size, heads, head_dim,
                             kept_per_head_bound(config, max_prompt_len, i), max_new_tokens, dtype, device)
                  for i in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def reset(self):
        super().reset()
        self.appended = 0

    # called by the backend's wrapper around each compiled graph that reads this cache
    def before_prefill(self, config: AdaKVConfig) -> None:
        if config.key() != self.config.key():
            raise StoreError("AdaKVCache was sized for another AdaKVConfig than the backend compresses with "
                             f"(cache: {self.config}, backend: {config}); build it from the backend: "
                             "AdaKVCache(model, backend, ...)")
        if any(layer.compressed for layer in self.layers):
            raise StoreError("AdaKVCache already holds a compressed prompt; call cache.reset() (or make a new "
                             "cache) before prefilling another one")
        self.appended = 0

    def before_append(self, t: int) -> None:
        if self.appended + t > self.max_new_tokens:
            raise StoreError(f"AdaKVCache(max_new_tokens={self.max_new_tokens}) is full: {self.appended} tokens "
                             f"were appended after the prompt and {t} more do not fit; size the cache for all "
                             "tokens generated or appended after the prefill")
        self.appended += t

    def kept_positions(self, layer: int) -> list[list[torch.Tensor]]:
        """Per row and KV head, the positions (in the padded prompt + appended tokens) a layer holds."""
        lay = self.layers[layer]
        off, lens = lay.off.tolist(), lay.lens.tolist()
        return [[lay.pos[o:o + n].clone() for o, n in zip(orow, nrow)] for orow, nrow in zip(off, lens)]

    def nbytes(self) -> int:
        """Bytes held by all layers' tensors (what the cache costs, independent of what is used)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


def cache_kwarg(model) -> str:
    """The name under which ``model`` (and its ``generate``) takes a cache: ``cache`` on transformers that
    renamed it (5.24+: ``past_key_values`` warns there), ``past_key_values`` before."""
    import inspect

    fn = getattr(model, "forward", model)
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
