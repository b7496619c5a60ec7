"""The graph pass pipeline: detect → trace → plan → rewrite, run by ``run_passes`` on a Dynamo graph.

Each stage is its own module; data flows one way. ``PASS_UUID`` names the pipeline's version so that
anything cached from its output can be keyed on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..config import AdaKVConfig
from ..kernels.ops import register_config
from .dataflow import attention_depths
from .fake_values import fill_fake_values
from .detect import AttentionSite, Skipped, find_attention, val
from .plan import PlannedSite, plan
from .rewrite import rewrite_site
from .shard import find_tp_group
from .trace import CacheFlow, trace_cache

from .cache_key import PASS_UUID  # noqa: E402,F401  (the pipeline version; cache_key.py)


@dataclass
class PassResult:
    planned: list[PlannedSite] = field(default_factory=list)
    dense_cache_inputs: list[str] = field(default_factory=list)  # placeholders read as full caches
    # (graph output index, placeholder index): the output is a view of that cache input's store
    store_links: list[tuple[int, int]] = field(default_factory=list)
    static: "StaticUse | None" = None  # how the graph uses an AdaKVCache, when it does
    tp_group: str = ""  # the process group sharding the attention heads (tensor parallelism), if any

    @property
    def rewritten(self) -> int:
        return sum(p.action == "rewritten" for p in self.planned)


@dataclass
class StaticUse:
    """What the backend's wrapper needs to keep an AdaKVCache's host-side count right, per call.

    ``cache_input``: a placeholder index whose tensor belongs to the cache (``tensor._adakv_cache``);
    ``phase``: prefill | append; ``chunk``: tokens the call adds to the cache (prompt or appended chunk), an
    int, or ``("input", i)`` for a SymInt graph input, or ``("size", i, dim)`` for a dimension of a tensor
    input (dynamic shapes). The wrapper advances the cache's ``seen`` by it after the call: no graph
    writes a tensor the model itself reads (see cache.AdaKVCache.advance).
    """
    cache_input: int
    phase: str
    chunk: object = 0


def run_passes(gm: fx.GraphModule, config: AdaKVConfig, config_key: str | None = None,
               needs_grad: bool = False) -> PassResult:
    """Rewrite every attention of ``gm`` in place; returns what was done."""
    graph = gm.graph
    found = find_attention(graph)
    flows = [trace_cache(s, graph) if isinstance(s, AttentionSite) else None for s in found]
    depths = attention_depths(graph, [s.anchor for s in found])
    planned = plan(found, flows, config, needs_grad, [depths[s.anchor] for s in found])
    tp_group, tp_problem = find_tp_group(graph, [s.anchor for s in found if isinstance(s, AttentionSite)])
    if tp_problem:
        planned = [_uncompressed(p, tp_problem) for p in planned]
    key = register_config(config, config_key)
    cached = [p for p in planned if p.mode != "none"]
    num_layers = 1 + max((p.ordinal for p in planned), default=-1)
    static = _static_use(graph, planned)  # before the rewrite: dead markers lose their arguments
    hints: dict = {}  # one causal check per mask node, shared by the attentions that use it
    for p in planned:
        rewrite_site(graph, p, key, num_layers, tp_group, hints)
    graph.eliminate_dead_code(is_impure_node=_impure)
    fill_fake_values(graph)  # AOTAutograd's cache needs them on the nodes we added (passes/fake_values.py)
    graph.lint()
    gm.recompile()
    dense = [p.flow.k_past.name for p in cached
             if p.mode == "exact" and p.flow is not None and p.flow.k_past is not None]
    dense += [p.flow.v_past.name for p in cached
              if p.mode == "exact" and p.flow is not None and p.flow.v_past is not None]
    return PassResult(planned, dense, _store_links(graph), static, tp_group)


def _uncompressed(p: PlannedSite, why: str) -> PlannedSite:
    """A prefill site that must not compress: the general path keeps its cache full (exact), an
    AdaKVCache layer is left alone (its marker raises: the cache is never filled wrongly)."""
    if p.mode == "compress":
        return PlannedSite(p.site, p.flow, p.ordinal, p.layer, "exact", f"cache kept in full: {why}")
    if p.mode == "static-compress":
        return PlannedSite(p.site, p.flow, p.ordinal, p.layer, "none", why)
    return p


def _impure(node: fx.Node) -> bool:
    """FX's purity test, plus in-place tensor methods (``y.add_(1)`` with no users is still a write)."""
    if node.is_impure():
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_ / or_ (a mask's construction) are pure despite their trailing "_"
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") \
        and not name.startswith("_")


def _static_use(graph: fx.Graph, planned: list[PlannedSite]) -> StaticUse | None:
    sites = [p for p in planned if p.mode in ("static-compress", "static-store", "window-fill", "window-attend")]
    if not sites:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first = sites[0].flow
    pool = first.static_arg("keys" if first.window else "pool_k")
    if pool not in placeholders:
        return None
    phase = "prefill" if sites[0].mode in ("static-compress", "window-fill") else "append"
    t = val(first.k_new).shape[2]
    if isinstance(t, int):
        return StaticUse(placeholders.index(pool), phase, int(t))
    for i, ph in enumerate(placeholders):  # dynamic chunk length: find the graph input that carries it
        ex = ph.meta.get("example_value", ph.meta.get("val"))
        if isinstance(ex, torch.SymInt) and ex.node.expr == t.node.expr:
            return StaticUse(placeholders.index(pool), phase, ("input", i))
    for i, ph in enumerate(placeholders):
        ex = ph.meta.get("example_value", ph.meta.get("val"))
        if isinstance(ex, torch.Tensor):
            for d, size in enumerate(ex.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == t.node.expr:
                    return StaticUse(placeholders.index(pool), phase, ("size", i, d))
    raise RuntimeError("adakv: cannot find the chunk length (tokens per call) among the graph inputs")


def _store_links(graph: fx.Graph) -> list[tuple[int, int]]:
    import torch

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    links = []
    for i, node in enumerate(values):
        if isinstance(node, fx.Node) and node.target is torch.as_strided and node.args[0] in placeholders:
            links.append((i, placeholders.index(node.args[0])))
    return links


__all__ = ["run_passes", "PassResult", "PlannedSite", "AttentionSite", "Skipped", "CacheFlow", "PASS_UUID"]
