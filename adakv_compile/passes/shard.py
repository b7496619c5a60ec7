"""Which process group shards a graph's attention heads (tensor parallelism), answered from the graph.

Under transformers' tensor parallelism the output projection is row-parallel: each rank multiplies its
heads' attention output by its slice of o_proj and a sum all-reduce over the TP group adds the parts.
Dynamo turns that in-place ``dist.all_reduce`` into ``_c10d_functional.all_reduce(x, "sum", group)``,
so an attention whose output flows into such an all-reduce holds only its rank's heads, and ``group``
names the ranks holding the others. The compress ops then gather scores over it (kernels/shard.py).
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from .dataflow import to_digraph


def _is_all_reduce(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    try:
        ops = torch.ops._c10d_functional
        return node.target in (ops.all_reduce, ops.all_reduce.default, ops.all_reduce_, ops.all_reduce_.default)
    except AttributeError:  # pragma: no cover - builds without distributed
        return False


def find_tp_group(graph: fx.Graph, anchors: list[fx.Node]) -> tuple[str, str]:
    """``(group, why_not)``: the TP group name ("" when the graph has no collectives), or a reason why
    the heads' sharding cannot be told (then nothing may be compressed: a per-rank allocation would
    silently differ from the model's one-GPU allocation)."""
    reduces = [n for n in graph.nodes if _is_all_reduce(n)]
    if not reduces or not anchors:
        return "", ""
    g = to_digraph(graph)
    names = set()
    for a in anchors:
        after = nx.descendants(g, a)
        reached = {str(n.args[2]) for n in reduces if n in after and len(n.args) > 2 and n.args[1] == "sum"}
        if not reached:
            return "", ("the graph has all-reduce collectives but this attention's output reaches none of them "
                        "(a graph break between attention and o_proj?): cannot tell whether its KV heads are "
                        "sharded over ranks")
        names |= reached
    if len(names) > 1:
        return "", f"attention outputs reach all-reduces over several process groups {sorted(names)}"
    return names.pop(), ""
