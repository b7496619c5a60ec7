"""Stage 'rewrite': replace each planned attention by the project's ops, in the Dynamo graph.

exact    → ``adakv.attention(q, k, v, mask, ...)`` on the (un-repeated) K/V; caches untouched. A bool mask
           gets one ``adakv.causal_hint`` node (right after it, shared by every attention using it).
compress → exact ``adakv.attention`` on the prompt, and ``adakv.compress`` whose zero-stride views
           replace the K/V the graph returns (so the model's cache holds the compacted store).
store    → ``adakv.attend_append(q, k_new, v_new, k_past, v_past)``; the graph returns
           ``as_strided`` views of the past inputs one chunk longer (no data is copied).
static-compress → exact ``adakv.attention`` on the prompt, and ``adakv.prefill_compress`` (a triton_op Inductor
           inlines; ``adakv.static_compress``, opaque, under tensor parallelism or dynamic shapes) writing the
           kept K/V into the AdaKVCache layer's tensors (declared mutations).
static-store → ``adakv.static_append`` (declared mutations) then ``adakv.static_attend`` (on CUDA,
           unless ``ADAKV_FUSED_MERGE=0``: ``adakv.static_attend_merged``, the split-K merge inside the launch).
window-fill → exact ``adakv.attention`` on the prompt, and ``adakv.window_fill`` (the last W tokens into the
           sliding-window layer's ring). window-attend → ``adakv.window_attend`` over ring + chunk, then
           ``adakv.window_write`` (declared mutations). See kernels/window.py.
The ``adakv.cache_slot`` marker of a static layer is left without users and removed as dead code.
A site with per-head additive terms (ALiBi) passes their fp32 sum to the compress / decode ops as ``bias``
(after the optional sinks argument; ``static_attend`` also gets ``pos``): scored with, and gathered at the
kept positions at decode (docs/algorithm.md, "Per-head additive biases").
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..kernels import ops as adakv_ops  # noqa: F401  (registers torch.ops.adakv)
from ..kernels.dispatch import switch
from ..kernels.ops import config_for
from ..kernels.static import inline_config_key
from . import mask as mask_proof
from .detect import ScaleExpr, val
from .plan import PlannedSite
from .trace import SHAPE_ONLY, output_node


def _prompt_mask(graph: fx.Graph, site, hints: dict, allow_proof: bool = True) -> tuple:
    """(mask argument, its ``adakv.causal_hint`` node or None) of an attention over a whole prompt, made once
    per mask node of the graph and placed right after it: every attention sharing HF's mask shares one
    causal check (one sync per forward). A masked_fill-style mask is inverted here, once. ``allow_proof``
    False (sinks, ALiBi, sliding-window fills: attention that needs the mask's values) always materialises it."""
    if site.mask is None:
        return None, None
    key = (site.mask, site.mask_is_bool_inverted) + (() if allow_proof else ("materialised",))
    if key not in hints:  # proven causal(+padding) from its construction: the n × n tensor is not read
        proven = mask_proof.proven_args(graph, site) if allow_proof else "the attention reads the mask's values"
        if not isinstance(proven, str):
            hints[key] = ("proven",) + proven
            return hints[key][:2]
        hints.setdefault("unproven", {})[site.mask] = proven
        at = site.mask
        if at.op == "placeholder":  # a mask passed in: after the last input (inputs stay first)
            at = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(at):
            arg = (graph.call_function(torch.logical_not, (site.mask,)) if site.mask_is_bool_inverted
                   else site.mask)
        hint = None
        v = val(site.mask)
        if v is not None and v.dtype == torch.bool:
            with graph.inserting_after(arg if arg is not site.mask else at):
                hint = graph.call_function(torch.ops.adakv.causal_hint.default, (arg,))
        hints[key] = (arg, hint)
    return hints[key][:2]


def _bias_sum(graph: fx.Graph, site, fp32: bool = True) -> fx.Node:
    """The site's per-head terms (ALiBi), each times its factor, summed in fp32: [.., q, k] (a folded
    [B·H, q, k] term unflattened to [B, H, q, k]). What the compress / decode ops take as ``bias``; with
    ``fp32`` False one term of factor 1 stays in its dtype (a falcon prompt's [B, H, n, n] term is not
    copied: the ops convert only the rows they read)."""
    H = val(site.q).shape[1]
    if not fp32 and len(site.bias) == 1 and site.bias[0][2] == 1.0:
        node, folded, _ = site.bias[0]
        return graph.call_method("unflatten", (node, 0, (-1, H))) if folded else node
    total = None
    for node, folded, factor in site.bias:
        b = graph.call_method("unflatten", (node, 0, (-1, H))) if folded else node
        b = graph.call_method("to", (b, torch.float32))
        if factor != 1.0:
            b = graph.call_function(operator.mul, (b, float(factor)))
        total = b if total is None else graph.call_function(operator.add, (total, b))
    return total


def _bias_mask(graph: fx.Graph, site, mask) -> fx.Node:
    """One additive mask [.., q, k] in the query's dtype: the site's summed per-head terms (``_bias_sum``)
    plus the mask (``mask``: the attention's mask argument, bool = allowed, or additive)."""
    dt = val(site.q).dtype
    total = _bias_sum(graph, site)
    if mask is not None and val(site.mask) is not None and val(site.mask).dtype != torch.bool:
        total = graph.call_function(operator.add, (total, graph.call_method("to", (mask, torch.float32))))
    total = graph.call_method("to", (total, dt))
    if mask is not None and val(site.mask) is not None and val(site.mask).dtype == torch.bool:
        total = graph.call_function(torch.where, (mask, total, torch.finfo(dt).min))
    return total


def _decode_mask_read(site, hints: dict | None) -> str:
    """Why a decode / extend attention must apply its mask to the compacted store ('' when it need not):
    a mask that passes/mask.py does not prove causal(+padding) (the store's own rule). Memoised per mask."""
    if site.mask is None:
        return ""
    memo = {} if hints is None else hints.setdefault("decode", {})
    key = (site.mask, site.mask_is_bool_inverted)
    if key not in memo:
        memo[key] = mask_proof.decode_unproven(site)
    return memo[key]


def _decode_mask_bias(graph: fx.Graph, site, bias) -> fx.Node:
    """The decode mask as an fp32 additive term [.., t, S] (bool: 0 / -inf), plus ``bias`` (the fp32 ALiBi
    sum) when given: what ``attend_append`` gathers at the kept tokens' positions (docs/design.md, "The
    model's own decode mask"). plan.decode_mask_unusable checked it indexes every position seen."""
    m = site.mask
    if val(m).dtype == torch.bool:
        allowed, blocked = (float("-inf"), 0.0) if site.mask_is_bool_inverted else (0.0, float("-inf"))
        term = graph.call_function(torch.where, (m, allowed, blocked))
    else:
        term = graph.call_method("to", (m, torch.float32))
    return term if bias is None else graph.call_function(operator.add, (bias, term))


def inline_compress(device: torch.device | None = None) -> bool:
    """Whether a static-shape prefill compresses through ``adakv::prefill_compress`` (Inductor traces it)
    instead of the opaque ``adakv::static_compress``. ``ADAKV_INLINE_COMPRESS`` = 1 / 0; unset: inline on
    CUDA, where it removes the Python-launched kernels (H200: compression adds 3.2 ms = 5.9 % to a 1 × 8k
    prefill at 8 layers, bench/results/prefill-inline-h200.md; ~26 % opaque), opaque elsewhere (on the CPU
    the body is plain torch either way; tracing it only costs compile time). On torch 2.11 Inductor first
    failed on the traced body (a SplitScan lowering of the slots' int64 cumsum; a user kernel's int argument
    above 2**31 - 1): both are avoided by construction (our own slot kernel, int32-safe kernel arguments:
    docs/design.md, "Compression through Inductor"); bench/inline_check.py passed on the H200."""
    value = switch("ADAKV_INLINE_COMPRESS")
    return device is not None and device.type == "cuda" if value is None else value


def fused_merge(device: torch.device | None = None) -> bool:
    """Whether a static-store site attends through ``adakv::static_attend_merged`` (the split-K merge done
    by the attention launch's last piece, counting on the layer's ``sem``: one launch instead of two) instead
    of ``static_attend``. ``ADAKV_FUSED_MERGE`` = 1 / 0; unset: on for CUDA, where it was measured (H200, 32
    layers 1 x 8k: 4.53 vs 4.67 ms per token with the GEMV, tokens equal to the eager reference,
    bench/results/e2e-32L-check-h200.md; batch-8 attention 84.5-85.4 % of copy instead of 76 %), off
    elsewhere (the plain path has no split-K; docs/design.md, "Fused split-K merge")."""
    value = switch("ADAKV_FUSED_MERGE")
    return device is not None and device.type == "cuda" if value is None else value


def _scale_arg(graph: fx.Graph, site):
    """The scale as an op argument: a float, or FX nodes computing it (SymFloat under dynamic=True)."""
    if not isinstance(site.scale, ScaleExpr):
        return site.scale
    value = site.scale.const
    for op, node in site.scale.terms:
        value = graph.call_function(op, (value, node))
    return value


def _size(graph: fx.Graph, node: fx.Node, dim: int):
    v = val(node)
    if v is not None and isinstance(v.shape[dim], int):
        return int(v.shape[dim])
    return graph.call_function(torch.ops.aten.sym_size.int, (node, dim))


def _redirect(cat: fx.Node, replacement: fx.Node, out: fx.Node) -> None:
    """Point the graph output (and shape-only readers) of a cache tensor at ``replacement``."""
    out.replace_input_with(cat, replacement)
    for user in list(cat.users):
        if user is not out and user.target in SHAPE_ONLY:
            user.replace_input_with(cat, replacement)


def _static_shapes(*nodes: fx.Node) -> bool:
    """Whether the nodes' shapes are all known ints (a prefill graph compiled for one prompt shape)."""
    for node in nodes:
        v = val(node)
        if v is None or not all(isinstance(d, int) for d in v.shape):
            return False
    return True


def _device(node: fx.Node) -> torch.device | None:
    v = val(node)
    return v.device if isinstance(v, torch.Tensor) else None


def rewrite_site(graph: fx.Graph, p: PlannedSite, config_key: str, num_layers: int, tp_group: str = "",
                 hints: dict | None = None) -> None:
    """Rewrite one planned attention; ``hints`` (shared over a graph's sites) memoises mask checks."""
    s, f = p.site, p.flow
    if p.mode == "none":
        return
    out = output_node(graph)
    mask = hint = None  # decode/extend attend over the store: the model's mask is not theirs to read
    proven = None
    if p.mode in ("exact", "compress", "static-compress", "window-fill"):  # exact attention over a whole prompt
        hints = {} if hints is None else hints
        plain = getattr(s, "sinks", None) is None and not getattr(s, "bias", None) and p.mode != "window-fill"
        mask, hint = _prompt_mask(graph, s, hints, allow_proof=plain)
        if mask == "proven":
            proven = hints[(s.mask, s.mask_is_bool_inverted)][1:]
            mask, hint = proven[2], None  # compress reads the valid keys from the mask's last row
    with graph.inserting_before(s.anchor):
        scale = _scale_arg(graph, s)
        sinks = getattr(s, "sinks", None)
        if sinks is not None:  # one logit per query head, [Hq]
            sinks = graph.call_method("reshape", (sinks, -1))
        tail = () if sinks is None else (sinks,)  # the ops' optional last argument
        bias = None
        unproven = _decode_mask_read(s, hints) if p.mode == "store" else ""
        if getattr(s, "bias", None):  # ALiBi: bias + mask as one additive mask (no causal hint)
            bias = _bias_sum(graph, s, fp32=bool(unproven))
            mask, hint = _bias_mask(graph, s, mask), None
            tail = (sinks, bias)  # compress / decode ops: the bias gathered at the kept positions
        if unproven:  # the model's own decode mask, at the kept positions (plain decode path)
            bias = _decode_mask_bias(graph, s, bias)
            tail = (sinks, bias)
            p.reason = p.reason or f"decode mask added at the kept positions (not proven causal: {unproven})"

        def prompt_attention(k, v):
            """Exact attention over a whole prompt (with the sink column when the model has one; without an
            n × n mask when its construction was proven causal(+padding), passes/mask.py)."""
            if sinks is not None:
                return graph.call_function(torch.ops.adakv.sink_attention.default,
                                           (s.q, k, v, mask, scale, s.is_causal, s.softcap, sinks))
            if proven is not None:
                pad, plan, _ = proven
                if plan is None:
                    return graph.call_function(torch.ops.adakv.attention.default,
                                               (s.q, k, v, None, scale, True, s.softcap, None))
                return graph.call_function(torch.ops.adakv.attention_proven.default,
                                           (s.q, k, v, pad, plan, scale, s.softcap))
            return graph.call_function(torch.ops.adakv.attention.default,
                                       (s.q, k, v, mask, scale, s.is_causal, s.softcap, hint))

        if p.mode == "exact":
            new = prompt_attention(s.k, s.v)
        elif p.mode == "compress":
            new = prompt_attention(f.k_new, f.v_new)
            pair = graph.call_function(torch.ops.adakv.compress.default,
                                       (s.q, f.k_new, f.v_new, mask, scale, s.softcap, p.ordinal,
                                        num_layers, config_key, tp_group) + tail)
            kview = graph.call_function(operator.getitem, (pair, 0))
            vview = graph.call_function(operator.getitem, (pair, 1))
        elif p.mode == "static-compress":
            new = prompt_attention(f.k_new, f.v_new)
            if tp_group or not _static_shapes(s.q, f.k_new) or not inline_compress(_device(s.q)):  # the opaque op
                graph.call_function(torch.ops.adakv.static_compress.default,
                                    (s.q, f.k_new, f.v_new, mask, scale, s.softcap, p.ordinal, num_layers,
                                     config_key, f.static_arg("room")) + f.static_tensors() + (tp_group,) + tail)
            else:  # Inductor inlines it; the config's values become graph constants (kernels/static.py)
                graph.call_function(torch.ops.adakv.prefill_compress.default,
                                    (s.q, f.k_new, f.v_new, mask, scale, s.softcap, p.ordinal, num_layers,
                                     inline_config_key(config_for(config_key)), f.static_arg("room"))
                                    + f.static_tensors() + tail)
        elif p.mode == "static-store":
            pool_k, pool_v, off, lens, _, _ = f.static_tensors()
            rows, slots = val(f.k_new).shape[0], val(pool_k).shape[0]
            max_len = (int(slots) - 1) // int(rows)  # a segment never outgrows its row
            graph.call_function(torch.ops.adakv.static_append.default, (f.k_new, f.v_new) + f.static_tensors())
            sem = f.static_arg("sem")
            if bias is None and sem is not None and fused_merge(_device(s.q)):  # one attention launch (kernels/static.py)
                new = graph.call_function(torch.ops.adakv.static_attend_merged.default,
                                          (s.q, pool_k, pool_v, off, lens, scale, s.softcap, max_len, sem) + tail)
            else:
                new = graph.call_function(torch.ops.adakv.static_attend.default,
                                          (s.q, pool_k, pool_v, off, lens, scale, s.softcap, max_len) + tail
                                          + (() if bias is None else (f.static_arg("pos"),)))
        elif p.mode == "window-fill":
            new = prompt_attention(f.k_new, f.v_new)
            keys, values, wpos, _ = f.window_tensors()
            graph.call_function(torch.ops.adakv.window_fill.default, (f.k_new, f.v_new, mask, keys, values, wpos))
        elif p.mode == "window-attend":
            new = graph.call_function(torch.ops.adakv.window_attend.default,
                                      (s.q, f.k_new, f.v_new) + f.window_tensors() + (scale, s.softcap) + tail)
            graph.call_function(torch.ops.adakv.window_write.default, (f.k_new, f.v_new) + f.window_tensors())
        elif p.mode == "store":
            new = graph.call_function(torch.ops.adakv.attend_append.default,
                                      (s.q, f.k_new, f.v_new, f.k_past, f.v_past, scale, s.softcap) + tail)
            views = []
            for past, fresh in ((f.k_past, f.k_new), (f.v_past, f.v_new)):
                length = graph.call_function(operator.add,
                                             (_size(graph, past, 2), _size(graph, fresh, 2)))
                shape = [_size(graph, past, 0), _size(graph, past, 1), length, _size(graph, past, 3)]
                views.append(graph.call_function(torch.as_strided, (past, shape, [0, 0, 0, 1])))
            kview, vview = views
        else:
            return
    s.anchor.replace_all_uses_with(new)
    if p.mode in ("static-compress", "static-store", "window-fill", "window-attend"):  # shape reads of the marker's K/V: same shapes
        for g in list(f.static.users):
            fresh = f.k_new if g.args[1] == 0 else f.v_new
            for user in list(g.users):
                if user.target in SHAPE_ONLY:
                    user.replace_input_with(g, fresh)
    if p.mode in ("compress", "store"):
        _redirect(f.k_cat, kview, out)
        _redirect(f.v_cat, vview, out)
