"""The graph pass pipeline: detect → trace → plan → rewrite, run by ``run_passes`` on a Dynamo graph.

Each stage is its own module; data flows one way. ``PASS_UUID`` names the pipeline's version so that
anything cached from its output can be keyed on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..config import AdaKVConfig
from ..kernels.ops import register_config
from .dataflow import attention_depths
from .detect import AttentionSite, Skipped, find_attention
from .plan import PlannedSite, plan
from .rewrite import rewrite_site
from .trace import CacheFlow, trace_cache

PASS_UUID = "adakv-passes-v1"


@dataclass
class PassResult:
    planned: list[PlannedSite] = field(default_factory=list)
    dense_cache_inputs: list[str] = field(default_factory=list)  # placeholders read as full caches
    # (graph output index, placeholder index): the output is a view of that cache input's store
    store_links: list[tuple[int, int]] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(p.action == "rewritten" for p in self.planned)


def run_passes(gm: fx.GraphModule, config: AdaKVConfig, config_key: str | None = None,
               needs_grad: bool = False) -> PassResult:
    """Rewrite every attention of ``gm`` in place; returns what was done."""
    graph = gm.graph
    found = find_attention(graph)
    flows = [trace_cache(s, graph) if isinstance(s, AttentionSite) else None for s in found]
    depths = attention_depths(graph, [s.anchor for s in found])
    planned = plan(found, flows, config, needs_grad, [depths[s.anchor] for s in found])
    key = register_config(config, config_key)
    cached = [p for p in planned if p.mode != "none"]
    num_layers = 1 + max((p.ordinal for p in planned), default=-1)
    for p in planned:
        rewrite_site(graph, p, key, num_layers)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    dense = [p.flow.k_past.name for p in cached
             if p.mode == "exact" and p.flow is not None and p.flow.k_past is not None]
    dense += [p.flow.v_past.name for p in cached
              if p.mode == "exact" and p.flow is not None and p.flow.v_past is not None]
    return PassResult(planned, dense, _store_links(graph))


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
