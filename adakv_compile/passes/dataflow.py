"""Dataflow questions over the FX graph, answered with networkx.

``attention_depths``: how many attentions lie upstream of each attention (its layer depth). Per-layer
schedules (PyramidKV budgets, ``skip_layers``) key on it, so two attentions that run side by side (a
parallel block, or two branches of one layer) get the same depth instead of consecutive numbers, and the
numbering does not depend on the order Dynamo happened to emit nodes in.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph as a DAG of nodes (edges: producer -> consumer)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def attention_depths(graph: fx.Graph, anchors: list[fx.Node]) -> dict[fx.Node, int]:
    """For each anchor, the largest number of other anchors on any path from the inputs to it."""
    g = to_digraph(graph)
    marks = set(anchors)
    depth: dict[fx.Node, int] = {}
    for node in nx.topological_sort(g):
        preds = list(g.predecessors(node))
        depth[node] = max((depth[p] + (p in marks) for p in preds), default=0)
    return {a: depth[a] for a in anchors}
