"""Decode graphs: the projections' ``linear``/``mm``/``addmm`` of a few rows become ``adakv::gemv``.

Why: at batch 1..8 a decode step's projections are GEMVs bound by reading the weights; the Triton GEMV
(kernels/triton_gemv.py) is built for that, and as a ``triton_op`` Inductor inlines its launch into the decode
step's generated code and CUDA graph. Whether it beats cuBLAS on a card is measured (bench/gemv.py, bench/e2e.py),
so by default (``AdaKVConfig.gemv`` None) the pass runs only on the cards where it was: compute capability 9.0.

What is rewritten, in a graph whose every attention is at the *decode* phase (never a prefill or extend
graph), after ``merge_linears`` (so a merged q/k/v or gate/up is one GEMV):
- ``linear(x, W, b)`` with x of 1..8 static rows (the product of its leading dims) and ``W`` a graph input
  or module attribute (a parameter, or a merged weight buffer);
- ``mm(x, W.t())`` and ``addmm(b, x, W.t())`` (alpha = beta = 1), ``W`` as above.
Left alone, with a logged reason: other dtypes, a weight computed in the graph, dynamic or too many rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..kernels.gemv import covered
from .fake_values import fill_fake_values
from .merge_linears import LINEAR_TARGETS

log = logging.getLogger("adakv_compile")

MM_TARGETS = (torch.mm, torch.ops.aten.mm.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
_TRANSPOSES = ("t", "transpose", "permute")


# (major, minor) compute capabilities where the GEMV was measured to beat cuBLAS end to end (H100/H200 class)
MEASURED_CAPABILITIES = ((9, 0),)


def gemv_wanted(setting: Optional[bool], example_inputs) -> bool:
    """``AdaKVConfig.gemv`` for one graph: True / False as given; None: whether the graph's tensors live on a
    CUDA card of a measured capability (the first CUDA tensor among the example inputs decides)."""
    if setting is not None:
        return setting
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return torch.cuda.get_device_capability(x.device) in MEASURED_CAPABILITIES
    return False


@dataclass
class GemvResult:
    rewritten: int = 0
    skipped: list = field(default_factory=list)   # (node name, reason)


def _val(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _is_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def _untransposed(node) -> Optional[fx.Node]:
    """``W`` when ``node`` is ``W.t()`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)`` / ``torch.t(W)`` of a weight."""
    if not isinstance(node, fx.Node):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in _TRANSPOSES or not node.args:
        return None
    rest = tuple(node.args[1:])
    if name == "transpose" and sorted(a % 2 if isinstance(a, int) else -1 for a in rest) != [0, 1]:
        return None
    if name == "permute" and rest not in (((1, 0),), (1, 0)):
        return None
    w = node.args[0]
    return w if _is_weight(w) else None


def _operands(node: fx.Node):
    """(x, W, b) of a linear-like node, or None; W [N, K] as ``F.linear`` takes it."""
    if node.op != "call_function":
        return None
    args = list(node.args)
    if node.target in LINEAR_TARGETS:
        vals = args + [None] * (3 - len(args))
        for i, n in enumerate(("input", "weight", "bias")):
            if n in node.kwargs:
                vals[i] = node.kwargs[n]
        x, w, b = vals[:3]
        return (x, w, b) if _is_weight(w) and (b is None or _is_weight(b)) else None
    if node.target in MM_TARGETS and len(args) == 2 and not node.kwargs:
        w = _untransposed(args[1])
        return (args[0], w, None) if w is not None else None
    if node.target in ADDMM_TARGETS and len(args) == 3 and all(
            node.kwargs.get(k, 1) == 1 for k in ("alpha", "beta")) and set(node.kwargs) <= {"alpha", "beta"}:
        w = _untransposed(args[2])
        return (args[1], w, args[0]) if w is not None and _is_weight(args[0]) else None
    return None


def is_decode_graph(phases: list[str]) -> bool:
    """Every attention of the graph appends one token per row to a cache (HF's decode step)."""
    return bool(phases) and all(p == "decode" for p in phases)


def replace_gemv(gm: fx.GraphModule, phases: list[str]) -> GemvResult:
    """Rewrite ``gm`` in place (see the module docstring); ``phases``: the graph's attention phases."""
    result = GemvResult()
    if not is_decode_graph(phases):
        return result
    graph = gm.graph
    op = torch.ops.adakv.gemv.default
    for node in list(graph.nodes):
        ops = _operands(node)
        if ops is None:
            continue
        x, w, b = ops
        xv, wv, bv = _val(x), _val(w), _val(b) if b is not None else None
        if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or (b is not None and bv is None):
            why = "no fake value for an operand"
        else:
            why = covered(xv, wv, bv)
        if why:
            result.skipped.append((node.name, why))
            log.info("adakv: gemv: %s left as it is: %s", node.name, why)
            continue
        with graph.inserting_before(node):
            new = graph.call_function(op, (x, w, b))
        if "example_value" in node.meta:
            new.meta["example_value"] = node.meta["example_value"]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for arg in node.args:  # an mm's ``W.t()``, now unread (nothing else is removed: writes stay)
            if isinstance(arg, fx.Node) and arg.op != "placeholder" and not arg.users and _untransposed(arg):
                graph.erase_node(arg)
        result.rewritten += 1
    if result.rewritten:
        fill_fake_values(graph)
        graph.lint()
        gm.recompile()
    return result
