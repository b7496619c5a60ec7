"""Stage 'plan': decide, per attention, what the rewrite does — and say why when it does less."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from ..config import AdaKVConfig
from .detect import AttentionSite, Skipped
from .trace import CacheFlow

_LAYER_RE = re.compile(r"layers?[_.](?:modules_)?(\d+)|h_(\d+)|layer_(\d+)|blocks?_(\d+)")


@dataclass
class PlannedSite:
    """One attention and its fate. ``mode``: exact | compress (prefill) | store (decode/extend) |
    static-compress | static-store (the same on an AdaKVCache) | window-fill | window-attend (an
    AdaKVCache's sliding-window ring, prefill / decode; exact) | none."""
    site: AttentionSite | Skipped
    flow: CacheFlow | None
    ordinal: int        # attention depth (dataflow.attention_depths): the layer index schedules use
    layer: int
    mode: str
    reason: str = ""

    @property
    def action(self) -> str:
        return "skipped" if self.mode == "none" else "rewritten"

    @property
    def phase(self) -> str:
        return self.flow.phase if self.flow is not None else "unknown"


def layer_of(site, ordinal: int) -> int:
    """Best-effort model layer index: from module paths / cache input names, else the ordinal."""
    names = []
    stack = site.anchor.meta.get("nn_module_stack") or {}
    names += [str(v[0]) if isinstance(v, tuple) else str(v) for v in stack.values()]
    if isinstance(site, AttentionSite):
        for n in (site.k, site.v, site.q):
            names.append(n.name)
            names += [a.name for a in n.all_input_nodes]
    for name in reversed(names):
        m = _LAYER_RE.search(name)
        if m:
            return int(next(g for g in m.groups() if g is not None))
    return ordinal


def plan(found: list, flows: list, config: AdaKVConfig, needs_grad: bool = False,
         depths: list[int] | None = None) -> list[PlannedSite]:
    planned = []
    depths = depths if depths is not None else list(range(len(found)))
    for ordinal, site, flow in zip(depths, found, flows):
        layer = layer_of(site, ordinal)
        if isinstance(site, Skipped):
            planned.append(PlannedSite(site, None, ordinal, layer, "none", site.reason))
            continue
        if flow.static is not None:
            planned.append(_plan_static(site, flow, ordinal, layer, config, needs_grad))
        elif site.bias and config.compresses and flow.phase != "no-cache" and (why := bias_unproven(site, flow)):
            planned.append(PlannedSite(site, flow, ordinal, layer, "exact", f"cache kept in full: {why}"))
        elif not config.compresses or flow.phase == "no-cache":
            planned.append(PlannedSite(site, flow, ordinal, layer, "exact", flow.reason))
        elif needs_grad:
            planned.append(PlannedSite(site, flow, ordinal, layer, "exact",
                                       "cache kept in full: gradients are on (compression is for "
                                       "inference: call under torch.no_grad() or torch.inference_mode())"))
        elif not flow.compressible:
            planned.append(PlannedSite(site, flow, ordinal, layer, "exact",
                                       f"cache kept in full: {flow.reason}"))
        elif flow.phase != "prefill" and site.is_causal:
            planned.append(PlannedSite(site, flow, ordinal, layer, "none",
                                       "is_causal=True with a cache is SDPA's top-left causal mask (a "
                                       "query shorter than the keys does not see the end of the cache): "
                                       "a compressed cache cannot reproduce it"))
        elif flow.phase != "prefill" and site.mask is not None and (why := decode_mask_unusable(site, flow)):
            planned.append(PlannedSite(site, flow, ordinal, layer, "exact", f"cache kept in full: {why}"))
        else:
            mode = "compress" if flow.phase == "prefill" else "store"
            planned.append(PlannedSite(site, flow, ordinal, layer, mode))
    return planned


BIAS_REASON = ("a per-head additive bias (ALiBi / relative positions) on an AdaKVCache: the cache shows the "
               "model chunk-sized masks (static shapes), so the model's bias at decode does not cover the kept "
               "positions; the general path (DynamicCache) compresses it")


def bias_unproven(site: AttentionSite, flow: CacheFlow) -> str:
    """'' when every per-head additive term (ALiBi) of ``site`` provably indexes [batch, head, query, key]
    with a key axis covering every position the cache has seen (the prompt at prefill, past + chunk after):
    the ops then add ``bias[b, h, i, pos]`` at each kept token's position, exactly the model's logit.
    Else the reason (shapes are compared without guards: 'cannot prove' leaves the cache in full)."""
    return _terms_unproven(site, flow, site.bias, "a per-head additive bias (ALiBi)")


def decode_mask_unusable(site: AttentionSite, flow: CacheFlow) -> str:
    """'' when the mask of a decode / extend attention can be applied to a compacted store: proven
    causal(+padding) (passes/mask.py: the store's own rule, the mask is not read), or indexing [batch, head,
    query, key] over every position seen (the rewrite adds it, as a bias, at each kept token's position).
    Else the reason: the cache is kept in full (a compacted one then raises StoreError, never attends
    without the mask)."""
    why = _terms_unproven(site, flow, [(site.mask, False, 1.0)], "the model's decode mask")
    if why:
        from .mask import decode_unproven
        if decode_unproven(site):  # not causal either: the mask cannot be applied to the kept tokens
            return why
    return ""


def _terms_unproven(site: AttentionSite, flow: CacheFlow, terms, what: str) -> str:
    """'' when every term (node, folded, factor) indexes [batch, head, query, key] of ``site`` over every
    key position the cache has seen, else the reason (``what`` names the terms)."""
    from .detect import _guarded_equal, _same, val
    q = val(site.q)
    keys = flow.k_new if flow.phase == "prefill" else flow.k_cat
    kv = val(keys) if keys is not None else None
    if q is None or kv is None:
        return f"{what} on an attention whose shapes were not recorded"
    B, H, t = q.shape[0], q.shape[1], q.shape[2]
    for node, folded, _ in terms:
        bv = val(node)
        if bv is None:
            return f"{what} whose shape was not recorded"
        shape = list(bv.shape)
        if folded:  # [B·H, q, k]: the rewrite unflattens it to [B, H, q, k]
            shape = [B, H] + shape[1:]
        lead = [1] * (4 - len(shape)) + shape[:-2]
        if len(shape) < 2 or len(lead) != 2 or not (_same(lead[0], 1) or _same(lead[0], B)) \
                or not (_same(lead[1], 1) or _same(lead[1], H)) or not (_same(shape[-2], 1) or _same(shape[-2], t)):
            return (f"{what} of shape {tuple(bv.shape)} that does not index "
                    "[batch, head, query, key] of this attention")
        if not (_same(shape[-1], kv.shape[2]) or _guarded_equal(shape[-1], kv.shape[2])):
            return (f"{what} over {shape[-1]} keys, not provably the {kv.shape[2]} "
                    "positions the cache has seen: it cannot be gathered at the kept positions")
    return ""


def _plan_static(site, flow: CacheFlow, ordinal: int, layer: int, config: AdaKVConfig,
                 needs_grad: bool) -> PlannedSite:
    """An AdaKVCache layer: compressed or left alone (its marker then raises when run: never dense)."""
    why = ""
    if site.bias:
        why = BIAS_REASON
    elif not config.compresses:
        why = "an AdaKVCache needs a compressing config (budget or compression_ratio)"
    elif needs_grad:
        why = "an AdaKVCache is for inference: call under torch.no_grad() or torch.inference_mode()"
    elif not flow.compressible:
        why = flow.reason
    if why:
        return PlannedSite(site, flow, ordinal, layer, "none", why)
    if flow.window:
        mode = "window-fill" if flow.phase == "prefill" else "window-attend"
        return PlannedSite(site, flow, ordinal, layer, mode, "sliding-window layer: a ring of its window, exact "
                           "(not compressed)")
    mode = "static-compress" if flow.phase == "prefill" else "static-store"
    return PlannedSite(site, flow, ordinal, layer, mode)
