"""Stage 'detect': find attention in a Dynamo FX graph.

Recognised forms (docs/graph-survey.md shows the graphs they come from):
- SDPA: ``scaled_dot_product_attention(q, k, v, attn_mask=, dropout_p=, is_causal=, scale=, enable_gqa=)``
  with arguments positional or keyword, bool or additive mask;
- the eager chain ``matmul(q, kᵀ) → [·scale | /scale] → [softcap: /c → tanh → ·c] → [+mask | masked_fill]
  → softmax(-1) → [cast] → [dropout(p=0 or training=False)] → matmul(·, v)``;
- either of them with K/V repeated per query group: ``x[:, :, None].expand(..).reshape(..)`` (HF
  ``repeat_kv``) or ``repeat_interleave(G, dim=1)``.
Anything else that looks like attention but does not fit is reported as a *candidate* with the reason,
and left alone.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class ScaleExpr:
    """A scale known only at run time: ``const`` times/divided by SymFloat nodes (dynamic=True)."""
    const: float
    terms: list


@dataclass
class AttentionSite:
    """One attention found in the graph; ``k``/``v`` are the un-repeated [B, Hkv, S, D] tensors."""
    pattern: str
    anchor: fx.Node              # its value is the attention output [B, Hq, q, Dv]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    mask_is_bool_inverted: bool  # masked_fill form: the node marks *disallowed* positions
    is_causal: bool
    scale: "float | fx.Node | ScaleExpr"
    softcap: float
    internal: list = field(default_factory=list)  # nodes only the pattern uses (removed with it)


@dataclass
class Skipped:
    anchor: fx.Node
    pattern: str
    reason: str


def val(node) -> Optional[torch.Tensor]:
    """The example value Dynamo recorded for a node (a FakeTensor), if any."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _is_call(node, *targets) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in [t for t in targets if isinstance(t, str)]
    return False


def _const(x):
    """A Python number for a constant argument, or a node that makes a constant scalar tensor."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in (torch.full, torch.tensor):
        if x.target is torch.full and len(x.args) >= 2 and list(x.args[0]) == []:
            return _const(x.args[1])
        if x.target is torch.tensor and x.args and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
    return None


def _is_symbolic_number(node: fx.Node) -> bool:
    v = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(v, (torch.SymFloat, torch.SymInt, float, int))


def strip_repeat(node: fx.Node) -> tuple[fx.Node, int, list]:
    """Undo a per-group repeat of K/V: returns (base [B, Hkv, S, D], groups, internal nodes)."""
    out = val(node)
    # repeat_interleave(G, dim=1)
    if _is_call(node, torch.repeat_interleave, "repeat_interleave"):
        base = node.args[0]
        bv = val(base)
        if bv is not None and out is not None and bv.dim() == 4 and out.shape[1] % bv.shape[1] == 0:
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
            if dim in (1, -3):
                return base, int(out.shape[1] // bv.shape[1]), [node]
    # reshape(expand(x[:, :, None]))
    if _is_call(node, "reshape", "view", torch.reshape):
        exp = node.args[0]
        if _is_call(exp, "expand", torch.Tensor.expand) and len(exp.users) == 1:
            unsq = exp.args[0]
            base = None
            if _is_call(unsq, operator.getitem) and isinstance(unsq.args[1], tuple):
                idx = unsq.args[1]
                if len(idx) >= 3 and idx[2] is None and all(
                        isinstance(i, slice) and i == slice(None) for i in idx[:2]):
                    base = unsq.args[0]
            elif _is_call(unsq, "unsqueeze", torch.unsqueeze) and unsq.args[1] in (2, -3):
                base = unsq.args[0]
            bv = val(base) if base is not None else None
            if bv is not None and out is not None and bv.dim() == 4 and out.dim() == 4 \
                    and len(unsq.users) == 1 and out.shape[0] == bv.shape[0] \
                    and out.shape[2:] == bv.shape[2:] and out.shape[1] % bv.shape[1] == 0:
                return base, int(out.shape[1] // bv.shape[1]), [node, exp, unsq]
    return node, 1, []


def _sdpa_site(node: fx.Node) -> AttentionSite | Skipped:
    a = dict(_SDPA_DEFAULTS)
    for name, x in zip(_SDPA_ARGS, node.args):
        a[name] = x
    a.update(node.kwargs)
    if a["dropout_p"] not in (0, 0.0):
        return Skipped(node, "sdpa", f"dropout_p={a['dropout_p']!r} (only inference, p=0, is supported)")
    if not isinstance(a["is_causal"], bool):
        return Skipped(node, "sdpa", "is_causal is not a constant")
    qv = val(a["query"])
    if qv is None or qv.dim() != 4:
        return Skipped(node, "sdpa", "query is not a 4-D tensor with a recorded shape")
    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(int(qv.shape[-1]))
    elif isinstance(scale, fx.Node) and _is_symbolic_number(scale):
        pass  # torch.compile(dynamic=True) lifts float attributes: the scale is a SymFloat node
    elif not isinstance(scale, (int, float)):
        return Skipped(node, "sdpa", "scale is not a number")
    k, gk, ik = strip_repeat(a["key"])
    v, gv, iv = strip_repeat(a["value"])
    pattern = "sdpa" + ("+repeat_kv" if gk > 1 else "")
    mask = a["attn_mask"]
    if mask is not None and not isinstance(mask, fx.Node):
        return Skipped(node, pattern, "attn_mask is not a tensor")
    scale = scale if isinstance(scale, fx.Node) else float(scale)
    return AttentionSite(pattern, node, a["query"], k, v, mask, False, a["is_causal"], scale, 0.0, ik + iv)


def _eager_site(pv_matmul: fx.Node) -> AttentionSite | Skipped | None:
    """Match backwards from ``matmul(P, V)``; None when this matmul is not attention at all."""
    p, v_rep = pv_matmul.args[:2]
    internal = [pv_matmul]
    x = p
    # [dropout]
    if _is_call(x, F.dropout, torch.dropout, "dropout"):
        pdrop = x.kwargs.get("p", x.args[1] if len(x.args) > 1 else 0.5)
        training = x.kwargs.get("training", x.args[2] if len(x.args) > 2 else True)
        if pdrop not in (0, 0.0) and training is not False:
            return Skipped(pv_matmul, "eager", "attention dropout active (training mode)")
        internal.append(x)
        x = x.args[0]
    # [cast]
    while _is_call(x, "to", "type", "type_as", "float", "half", "bfloat16"):
        internal.append(x)
        x = x.args[0]
    if not _is_call(x, F.softmax, torch.softmax, "softmax", torch.nn.functional.softmax):
        return None
    dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else None)
    xv = val(x)
    if xv is None or dim not in (-1, xv.dim() - 1):
        return Skipped(pv_matmul, "eager", "softmax is not over the last dimension")
    internal.append(x)
    x = x.args[0]
    mask, inverted = None, False
    # [+ mask] / [masked_fill]
    if _is_call(x, operator.add, torch.add, "add"):
        a, b = x.args[:2]
        internal.append(x)
        x, mask = (a, b) if _leads_to_qk(a) else (b, a)
    elif _is_call(x, "masked_fill", torch.masked_fill):
        fill = _const(x.args[2]) if len(x.args) > 2 else None
        if fill is None or fill > -1e4:
            return Skipped(pv_matmul, "eager", "masked_fill with a value that is not -inf/min")
        internal.append(x)
        mask, inverted = x.args[1], True
        x = x.args[0]
    softcap = 0.0
    # [softcap: mul(tanh(div(y, c)), c)]
    if _is_call(x, operator.mul, torch.mul, "mul") and _is_call(x.args[0], torch.tanh, "tanh"):
        c = _const(x.args[1])
        inner = x.args[0].args[0]
        if c is not None and _is_call(inner, operator.truediv, torch.div, "div") and _const(inner.args[1]) == c:
            softcap = c
            internal += [x, x.args[0], inner]
            x = inner.args[0]
    scale = 1.0
    sym_terms = []  # (operator, SymFloat node) factors, from torch.compile(dynamic=True)
    while True:
        op = (operator.mul if _is_call(x, operator.mul, torch.mul, "mul")
              else operator.truediv if _is_call(x, operator.truediv, torch.div, "div") else None)
        arg = x.args[1] if op is not None and len(x.args) > 1 else None
        sym = isinstance(arg, fx.Node) and _is_symbolic_number(arg)
        if op is None or (_const(arg) is None and not sym):
            break
        if sym:
            sym_terms.append((op, arg))
        else:
            scale = op(scale, _const(arg))
        internal.append(x)
        x = x.args[0]
    if not _is_call(x, torch.matmul, operator.matmul, "matmul"):
        return Skipped(pv_matmul, "eager", f"softmax input is not matmul(q, kᵀ) but {x.target}")
    q, kt = x.args[:2]
    internal.append(x)
    if not _is_call(kt, "transpose", torch.transpose):
        return Skipped(pv_matmul, "eager", "second matmul operand is not a transpose of K")
    dims = tuple(d % 4 for d in kt.args[1:3])
    if sorted(dims) != [2, 3]:
        return Skipped(pv_matmul, "eager", "K is not transposed over its last two dims")
    internal.append(kt)
    k, gk, ik = strip_repeat(kt.args[0])
    v, gv, iv = strip_repeat(v_rep)
    pattern = "eager" + ("+softcap" if softcap else "") + ("+repeat_kv" if gk > 1 else "")
    scale_arg = ScaleExpr(scale, sym_terms) if sym_terms else scale
    return AttentionSite(pattern, pv_matmul, q, k, v, mask, inverted, False, scale_arg, softcap,
                         internal + ik + iv)


def _leads_to_qk(node, depth: int = 8) -> bool:
    for _ in range(depth):
        if _is_call(node, torch.matmul, operator.matmul, "matmul"):
            return True
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def find_attention(graph: fx.Graph) -> list:
    """All attention sites (and skipped candidates) in topological order."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" and node.op != "call_method":
            continue
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            found.append(_sdpa_site(node))
        elif _is_call(node, torch.matmul, operator.matmul, "matmul"):
            site = _eager_site(node)
            if site is not None:
                found.append(site)
    return found
