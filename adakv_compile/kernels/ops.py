"""The project's custom ops: what the rewritten graph calls.

- ``adakv::attention``     exact attention (SDPA semantics, + soft-capping) — exact mode and prefill.
- ``adakv::causal_hint``   whether a graph's bool mask is exactly causal (once per mask per forward).
- ``adakv::compress``      prefill: score, allocate, pack the kept K/V into new stores; returns the
                           zero-stride cache views the model keeps (see store.py).
- ``adakv::attend_append`` decode/extend: append the new K/V to the stores *in place* and attend.

``attend_append`` writes into the storage behind its cache inputs without declaring a mutation: the
cache view is a zero-stride alias of the pool, which functionalization would otherwise clone
(O(cache) per step). This is safe because the rewritten graph reads the store only through these ops;
the graph returns ``as_strided`` views of the same inputs, which carry no data. Do not use these ops
outside the rewrite (docs/design.md, "hidden mutation").
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import AdaKVConfig
from . import store as kv_store
from .dispatch import _have_triton, triton_on, use_triton  # noqa: F401  (moved; re-exported here)
from .shard import keep_mask_tp
from .attend import (attention_out, empty_attention_out, exact_attention, is_causal_mask,
                     sink_attention as _sink_attention, store_attention)
from .score import window_scores

_CONFIGS: dict[str, AdaKVConfig] = {}
# Callables run with the compress op's inputs (q, k, v, attn_mask, scale, softcap, layer, num_layers,
# config_key) on every eager execution: bench/quality.py uses this to capture one prefill's inputs and
# then build each method/budget's cache from them. Empty (the default) costs one list check per layer.
COMPRESS_OBSERVERS: list = []


def prompt_scores(q, k, valid, config: AdaKVConfig, scale: float, softcap: Optional[float], v=None, layer: int = 0,
                  num_layers: int = 1, sinks: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SnapKV scores of the prompt: the fused Triton scorer on CUDA (no [B, Hq, w, n] logits in memory),
    the plain-PyTorch ``window_scores`` elsewhere; the same function (tests/test_triton_score.py).
    ``scorer="critical"`` re-weights them by the values (kernels/score_critical.py; needs v and the layer).
    Attention sinks: both scorers add the sink column. ``bias`` (ALiBi): the plain scorer, the model's
    bias rows added to the window logits (the fused one has no bias input)."""
    if bias is not None:
        scores = window_scores(q, k, valid, config, scale, softcap, sinks, bias)
    elif triton_on(q):
        from .triton_score import window_scores_triton
        scores = window_scores_triton(q, k, valid, config, scale, softcap, sinks=sinks)
    else:
        scores = window_scores(q, k, valid, config, scale, softcap, sinks)
    if config.scorer == "critical":
        from .score_critical import value_aware
        scores = value_aware(scores, v, valid, config, layer, num_layers)
    return scores


def register_config(config: AdaKVConfig, key: str | None = None) -> str:
    """Make a config reachable from graphs by a string key (default: the config's own stable key).

    A backend may register under its own key and later point that key at another config: compiled
    graphs then compress with the new settings without recompiling (the ops read it at run time).
    """
    key = config.key() if key is None else key
    _CONFIGS[key] = config
    return key


def config_for(key: str) -> AdaKVConfig:
    try:
        return _CONFIGS[key]
    except KeyError:
        raise RuntimeError(f"adakv: no config registered under {key!r}; build the backend first") from None


def attended(mask: torch.Tensor) -> torch.Tensor:
    """Where a boolean (True = attend) or additive (a very negative value = masked) mask lets attention through."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def valid_from_mask(attn_mask: Optional[torch.Tensor], batch: int, n: int, device) -> torch.Tensor:
    """Valid (non-padding) keys [B, n]: those the last query may attend."""
    if attn_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    last = attn_mask[..., -1, :]
    while last.dim() > 2:
        last = last[:, 0]
    return attended(last).expand(batch, n).contiguous()


@torch.library.custom_op("adakv::causal_hint", mutates_args=())
def causal_hint(attn_mask: torch.Tensor) -> torch.Tensor:
    """Whether ``attn_mask`` [..., n, n] is exactly the causal mask, as a 0-d CPU bool tensor.

    The pass computes it once per mask of a graph (all layers share HF's mask), so the check and its one
    host sync happen once per forward instead of once per layer; ``adakv::attention`` takes the result."""
    n = attn_mask.shape[-1]
    return torch.tensor(is_causal_mask(attn_mask, attn_mask.shape[-2], n))


@causal_hint.register_fake
def _(attn_mask):
    return torch.empty((), dtype=torch.bool, device="cpu")


@torch.library.custom_op("adakv::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
              scale: float, is_causal: bool, softcap: float, mask_is_causal: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """``mask_is_causal``: the mask's ``adakv::causal_hint`` when the graph computed it (else checked here)."""
    return attention_out(exact_attention(q, k, v, attn_mask, scale, is_causal, softcap, mask_is_causal))


@attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, softcap, mask_is_causal=None):
    return empty_attention_out(q, v)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, scale, is_causal, softcap = inputs[:7]
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (scale, is_causal, softcap)


def _attention_backward(ctx, grad):
    q, k, v, attn_mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        out = exact_attention(*leaves, attn_mask, *ctx.args)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 5


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("adakv::sink_attention", mutates_args=())
def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   scale: float, is_causal: bool, softcap: float, sinks: torch.Tensor) -> torch.Tensor:
    """Exact attention with a per-head sink logit in the softmax, its column dropped (gpt-oss)."""
    return _sink_attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks).to(q.dtype).contiguous()


@sink_attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, softcap, sinks):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@torch.library.custom_op("adakv::compress", mutates_args=())
def compress(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
             scale: float, softcap: float, layer: int, num_layers: int, config_key: str, tp_group: str = "",
             sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``tp_group``: name of the tensor-parallel group whose ranks hold the layer's other KV heads ("" =
    none): the allocation then sees every rank's scores (kernels/shard.py). ``bias``: the model's per-head
    additive term over the prompt ([.., n or 1, n], ALiBi), added to the window logits of the scores."""
    for observe in COMPRESS_OBSERVERS:
        observe(q, k, v, attn_mask, scale, softcap, layer, num_layers, config_key)
    config = config_for(config_key)
    B, Hkv, n, _ = k.shape
    valid = valid_from_mask(attn_mask, B, n, k.device)
    scores = prompt_scores(q, k, valid, config, scale, softcap or None, v, layer, num_layers, sinks, bias)
    keep = keep_mask_tp(scores, valid, config, layer, num_layers, tp_group)
    return kv_store.build(k, v, keep, config.decode_reserve)


@compress.register_fake
def _(q, k, v, attn_mask, scale, softcap, layer, num_layers, config_key, tp_group="", sinks=None, bias=None):
    B, Hkv, n, D = k.shape
    vk = k.new_empty((D,)).as_strided((B, Hkv, n, D), (0, 0, 0, 1))
    vv = v.new_empty((v.shape[-1],)).as_strided((B, Hkv, n, v.shape[-1]), (0, 0, 0, 1))
    return vk, vv


@torch.library.custom_op("adakv::attend_append", mutates_args=())
def attend_append(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, scale: float, softcap: float, sinks: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bias``: the model's per-head additive term over every position seen (ALiBi, [.., t or 1, S] with
    S the cache's length after the append), gathered at the kept tokens' positions (plain path)."""
    if k_new.shape[-1] != v_new.shape[-1]:
        raise kv_store.StoreError("the compacted store needs keys and values of one head_dim")
    if bias is not None and bias.shape[-1] != k_cache.shape[2] + k_new.shape[2]:
        raise kv_store.StoreError(
            f"adakv: the model's additive bias covers {bias.shape[-1]} key positions but the cache has seen "
            f"{k_cache.shape[2] + k_new.shape[2]} tokens: it cannot be gathered at the kept positions")
    pool_k, pool_v, offsets, lengths, meta = kv_store.append(k_cache, v_cache, k_new, v_new)
    t = k_new.shape[2]
    if bias is not None:  # the Triton kernel has no bias input
        positions = kv_store.positions_of(pool_v, meta.slots, k_new.shape[-1])
        return store_attention(q, pool_k, pool_v, offsets, lengths, meta.max_len, t, scale, softcap, sinks,
                               bias, positions)
    if q.is_cuda and use_triton():
        from .triton_attend import store_attention_triton  # lazy: CPU installs need no triton
        return store_attention_triton(q, pool_k, pool_v, offsets, lengths, t, scale, softcap,
                                      max_len_hint=meta.max_len, sinks=sinks)
    return store_attention(q, pool_k, pool_v, offsets, lengths, meta.max_len, t, scale, softcap, sinks)


@attend_append.register_fake
def _(q, k_new, v_new, k_cache, v_cache, scale, softcap, sinks=None, bias=None):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v_new.shape[-1])
