"""Stage 'trace': where an attention's K/V come from and where they go.

The cache forms we understand (the same for HF DynamicCache, traced through ``cache.update``, and for a
hand-written model that keeps a tuple):
- prefill: ``cat([<empty tensor>, k_new], dim=-2)`` returned by the graph, or ``k_new`` itself returned;
- decode / extend: ``cat([<graph input>, k_new], dim=-2)`` returned by the graph (q length 1 / > 1);
- no cache: K/V are not returned (encoders, or a model called without a cache).
- static (``AdaKVCache``): K/V are the outputs of the ``adakv::cache_slot`` marker that the cache's
  ``update`` traces to; its arguments name the layer's static tensors, its ``compressed`` flag the phase.
A cache that is sliced after the cat (sliding-window layers), written anywhere else, or read by other
ops is reported with the reason, and its attention is rewritten in exact mode only.
"""
from __future__ import annotations

import operator

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..kernels import window as _window  # noqa: F401  (registers torch.ops.adakv.window_slot)
from .detect import AttentionSite, val

SHAPE_ONLY = {"size", "dim", torch.ops.aten.sym_size.int}


@dataclass
class CacheFlow:
    phase: str                    # prefill | decode | extend | no-cache
    k_new: fx.Node
    v_new: fx.Node
    k_cat: Optional[fx.Node] = None   # the node whose value is written back as the cache
    v_cat: Optional[fx.Node] = None
    k_past: Optional[fx.Node] = None  # graph input holding the past cache (decode/extend)
    v_past: Optional[fx.Node] = None
    compressible: bool = False
    reason: str = ""
    static: Optional[fx.Node] = None  # the adakv::cache_slot / adakv::window_slot marker (AdaKVCache)
    window: bool = False              # the marker is a sliding-window layer's (hybrid.AdaKVWindowLayer)

    def static_arg(self, name: str):
        """An argument of the marker by name (cache_slot: pool_k, pool_v, off, lens, pos, seen, room, sem;
        window_slot: keys, values, wpos, seen); None for an optional one the marker was not given."""
        i = (_WINDOW_ARGS if self.window else _SLOT_ARGS).index(name)
        return self.static.args[i] if i < len(self.static.args) else self.static.kwargs.get(name)

    def window_tensors(self) -> tuple:
        """A window layer's ring: (keys, values, wpos, seen)."""
        return tuple(self.static_arg(a) for a in ("keys", "values", "wpos", "seen"))

    def static_tensors(self) -> tuple:
        """The layer's static tensors: (pool_k, pool_v, off, lens, pos, seen), the ops' argument order."""
        return tuple(self.static_arg(a) for a in ("pool_k", "pool_v", "off", "lens", "pos", "seen"))


_SLOT_ARGS = ("k_new", "v_new", "pool_k", "pool_v", "off", "lens", "pos", "seen", "room", "compressed", "sem")
_WINDOW_ARGS = ("k_new", "v_new", "keys", "values", "wpos", "seen", "filled")
_MARKERS = ("cache_slot", "window_slot")


def _is_marker(target) -> bool:
    return any(target in (getattr(torch.ops.adakv, m), getattr(torch.ops.adakv, m).default) for m in _MARKERS)


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _is_cat(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        torch.cat, torch.concat, torch.ops.aten.cat.default)


def _cat_parts(node: fx.Node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return list(tensors), dim


def _is_empty(node) -> bool:
    v = val(node)
    return v is not None and v.numel() == 0


def _read_elsewhere(readers, what: str) -> str:
    """The reason a cache is kept in full when ``readers`` (other than the attention) use it; else ""."""
    if not readers:
        return ""
    names = sorted({str(getattr(u.target, "__name__", u.target)) for u in readers})
    return f"{what} also read by other ops ({', '.join(names)})"


def _others(node: fx.Node, skip: set) -> list:
    """Users of ``node`` outside ``skip`` that read its data (shape reads do not)."""
    return [u for u in node.users if u not in skip and u.target not in SHAPE_ONLY]


def _decode_or_extend(phase: str, q: fx.Node) -> str:
    """A cached step of more than one query token is an extend chunk."""
    qv = val(q)
    if phase == "decode" and qv is not None and not (isinstance(qv.shape[2], int) and qv.shape[2] == 1):
        return "extend"
    return phase


def _one(node: fx.Node, out: fx.Node, site_nodes: set):
    """Trace one of K/V: (phase, new, cat, past, reason)."""
    returned = out in node.users
    if _is_cat(node):
        parts, dim = _cat_parts(node)
        if len(parts) != 2:
            return "no-cache", node, None, None, f"cache cat of {len(parts)} tensors"
        past, new = parts
        nv = val(new)
        if nv is None or nv.dim() != 4 or dim not in (2, -2):
            return "no-cache", node, None, None, "cache cat is not along the sequence dim of 4-D K/V"
        if _is_empty(past):
            phase = "prefill"
        elif isinstance(past, fx.Node) and past.op == "placeholder":
            phase = "decode"
        else:
            return "no-cache", node, None, None, f"cache concatenated to a computed tensor ({past.name})"
        if not returned:
            return phase, new, node, past if phase == "decode" else None, \
                "the cache kept is not the concatenation itself (a sliding-window layer keeps a slice)"
        reason = _read_elsewhere(_others(node, site_nodes | {out}), "the concatenated cache is")
        return phase, new, node, past if phase == "decode" else None, reason
    if returned:
        return "prefill", node, node, None, _read_elsewhere(_others(node, site_nodes | {out}),
                                                            "the cached K/V are")
    return "no-cache", node, None, None, ""


def _slot_of(node):
    """(marker, output index) when ``node`` is ``getitem(adakv::cache_slot(...), i)``."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and _is_marker(node.args[0].target)):
        return node.args[0], node.args[1]
    return None, None


def _static_flow(site: AttentionSite, marker: fx.Node, site_nodes: set) -> CacheFlow:
    k_new, v_new = marker.args[0], marker.args[1]
    window = marker.target in (torch.ops.adakv.window_slot, torch.ops.adakv.window_slot.default)
    compressed = marker.args[-1] if window else marker.args[_SLOT_ARGS.index("compressed")]
    phase = _decode_or_extend("prefill" if not compressed else "decode", site.q)
    others = [u for g in marker.users for u in _others(g, site_nodes)]
    others += [g for g in marker.users if g.target is not operator.getitem]
    reason = _read_elsewhere(others, "the static cache's K/V are")
    return CacheFlow(phase, k_new, v_new, compressible=not reason, reason=reason, static=marker, window=window)


def trace_cache(site: AttentionSite, graph: fx.Graph) -> CacheFlow:
    out = output_node(graph)
    site_nodes = set(site.internal) | {site.anchor}
    mk, ik = _slot_of(site.k)
    mv, iv = _slot_of(site.v)
    if mk is not None or mv is not None:
        if mk is not mv or (ik, iv) != (0, 1):
            return CacheFlow("no-cache", site.k, site.v,
                             reason="keys and values come from different AdaKVCache slots")
        return _static_flow(site, mk, site_nodes)
    pk, k_new, k_cat, k_past, rk = _one(site.k, out, site_nodes)
    pv, v_new, v_cat, v_past, rv = _one(site.v, out, site_nodes)
    if pk != pv:
        return CacheFlow("no-cache", site.k, site.v, reason=f"keys look like {pk} but values like {pv}")
    phase = _decode_or_extend(pk, site.q)
    reason = rk or rv
    if phase == "no-cache":
        return CacheFlow(phase, site.k, site.v, reason=reason)
    kv, vv = val(k_new), val(v_new)
    if kv is not None and vv is not None and kv.shape[-1] != vv.shape[-1]:
        reason = reason or "keys and values have different head_dim"
    return CacheFlow(phase, k_new, v_new, k_cat, v_cat, k_past, v_past, compressible=not reason,
                     reason=reason)
