"""Fake values (``meta["example_value"]``) for the nodes our passes add to a Dynamo graph.

Why: AOTAutograd's cache refuses a graph with a method call on a node it cannot tell is a tensor (one with
no ``example_value``) — "Unsupported call_method target attention_default" — and then recompiles every
time (no warm restart). Dynamo gives its own nodes fake values; this gives ours the same, by running each
new node on the fake values of its inputs in the graph's fake mode. A node whose value cannot be computed is
left without one (only the cache is lost, never correctness).
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.node import map_arg

log = logging.getLogger("adakv_compile")


def graph_fake_mode(graph: fx.Graph):
    for n in graph.nodes:
        v = n.meta.get("example_value")
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return torch._guards.detect_fake_mode()


def run_node(node: fx.Node, args, kwargs, mode):
    """A call node's value on (fake) ``args`` / ``kwargs``, in ``mode``."""
    with mode:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def fill_fake_values(graph: fx.Graph) -> int:
    """Give every call node without ``meta["example_value"]`` one; returns how many still lack it."""
    mode = graph_fake_mode(graph)
    if mode is None:
        return 0
    missing = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or "example_value" in node.meta:
            continue
        if isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.returns:
            # nothing to compute (an op that only writes its arguments, e.g. the prefill compression): running
            # its fake kernel would trace its whole body once per layer (~60 ms a layer)
            node.meta["example_value"] = None
            continue
        lacking = []

        def value(n):
            if "example_value" not in n.meta:
                lacking.append(n)
            return n.meta.get("example_value")

        args = map_arg(node.args, value)
        kwargs = map_arg(node.kwargs, value)
        if lacking:
            missing += 1
            continue
        try:
            out = run_node(node, args, kwargs, mode)
        except Exception as e:  # noqa: BLE001  (a value we cannot compute costs the cache, not correctness)
            log.debug("adakv: no fake value for %s: %s", node.name, e)
            missing += 1
            continue
        node.meta["example_value"] = out
    return missing


def layout_value(node: fx.Node, memo: dict, mode):
    """``node``'s fake value with the layout it has in the graph as rewritten. A view's value is recomputed from
    its inputs': Dynamo's describes the graph before our rewrites, e.g. ``v`` as a view of its own projection
    where merged linears made it a view of the shared q/k/v output (other strides). A fresh tensor keeps
    Dynamo's value: Inductor hands a custom op such a tensor in the stride order it was traced with. Used where
    an op's argument layouts are read ahead of its run (passes/compress_once.py, prewarm.py)."""
    if node in memo:
        return memo[node]
    v = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(v, torch.Tensor) and v._is_view() and node.op in ("call_function", "call_method") \
            and mode is not None:
        args = fx.node.map_arg(node.args, lambda n: layout_value(n, memo, mode))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: layout_value(n, memo, mode))
        try:
            v = run_node(node, args, kwargs, mode)
        except Exception as e:  # noqa: BLE001  (Dynamo's value then; a wrong guess costs a run-time compile)
            log.debug("adakv: no fresh fake value for %s: %s", node.name, e)
    memo[node] = v
    return v
