"""Stage 'detect': find attention in a Dynamo FX graph, by what it computes rather than how it is spelled.

Recognised (docs/graph-survey.md shows the graphs they come from; README "Limitations" the rules):
- SDPA: ``scaled_dot_product_attention(q, k, v, attn_mask=, dropout_p=, is_causal=, scale=, enable_gqa=)``
  with arguments positional or keyword, bool or additive mask;
- eager attention: a softmax over the last dim whose input is ``q·kᵀ`` passed only through
    scales       mul/div by constants, SymFloats or constant 0-d tensors (``/=``, ``div_``, ``mul_`` too),
    soft-capping ``/c → tanh → ·c`` (any scales before the tanh, a constant after it),
    one mask     additive (``+``, ``+=``, ``add_``, ``baddbmm``'s input) or boolean (``masked_fill[_]`` or
                 ``where`` with a fill ≤ -1e4), the same for every head,
    casts        to the query's dtype or a wider float (``float()``, ``.to``, softmax's ``dtype=``),
  and whose output, through casts and an inactive dropout (eval or p=0), is the left operand of the
  product with V. ``q·kᵀ`` and the product with V may be ``matmul``/``@``, ``bmm``/``baddbmm`` over a
  ``[batch·heads, q, k]`` layout (reshape/view to and from ``[B, H, ·, ·]``), or ``einsum``; softmax may
  be ``F.softmax``, ``torch.softmax``, ``x.softmax``, an ``nn.Softmax`` module, with dim -1 or last;
- either of them with K/V repeated per query group: ``x[:, :, None].expand(..).reshape(..)`` (HF
  ``repeat_kv``), ``repeat_interleave(G, dim=1)``, or MQA K/V of one head broadcast by the matmul.
In-place ops are followed through their aliases: every reader of the scores (and of the attention
weights) between ``q·kᵀ`` and the product with V must be one of the ops above. Anything else that looks
like attention (a softmax that meets V) is reported as ``Skipped`` with the reason, and left alone.
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

# a masked_fill / where fill value at or below this is a mask (exp underflows to 0 in every float dtype)
MASK_FILL_MAX = -1e4


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
    # the value the model writes at masked positions (eager masked_fill / where): a query row with no
    # allowed key gets SDPA's output (zeros) after the rewrite, not the eager uniform average / NaN
    mask_fill: Optional[float] = None
    # attention sinks (gpt-oss): a node holding one logit per query head that joins the softmax as an extra
    # column, dropped after it; None for plain attention
    sinks: Optional[fx.Node] = None
    # per-head additive terms (ALiBi, relative-position biases): (node, folded [B·H, ·, ·] layout, factor);
    # the rewritten attention adds Σ factor·node to the logits, mask included; compressed where plan.py proves
    # the term covers every seen position (the ops gather it at the kept positions)
    bias: list = field(default_factory=list)


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


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _arg(node: fx.Node, i: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


# Small constant subgraphs a scale may be written with: torch.tensor(16.).sqrt(), torch.full((), c), ...
_FOLDABLE = {torch.tensor, torch.scalar_tensor, torch.full, torch.sqrt, torch.rsqrt, torch.reciprocal,
             math.sqrt, operator.truediv, operator.mul, operator.pow, operator.neg, operator.add,
             operator.sub, torch.pow, torch.div, torch.mul, torch.true_divide}
_FOLDABLE_METHODS = {"sqrt", "rsqrt", "reciprocal", "to", "float", "double", "half", "item", "pow", "mul",
                     "div", "neg"}


def _const(x, depth: int = 6):
    """A Python number for a constant argument, or for a node computing a constant scalar; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node) or depth == 0 or x.op not in ("call_function", "call_method"):
        return None
    if x.op == "call_function" and x.target not in _FOLDABLE:
        return None
    if x.op == "call_method" and x.target not in _FOLDABLE_METHODS:
        return None
    if x.target is torch.full and not (x.args and list(x.args[0]) == []):
        return None
    if "out" in x.kwargs:
        return None

    def fold(a):
        if isinstance(a, fx.Node):
            c = _const(a, depth - 1)
            if c is None:
                raise ValueError
            return torch.tensor(c, dtype=torch.float64) if val(a) is not None else c
        if isinstance(a, (list, tuple)):
            return type(a)(fold(b) for b in a)
        return a

    try:
        args, kwargs = fold(x.args), {k: fold(v) for k, v in x.kwargs.items() if k != "device"}
        if x.op == "call_method":
            out = getattr(args[0], x.target)(*args[1:], **kwargs)
        else:
            out = x.target(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if out.numel() != 1 or not (out.is_floating_point() or out.dtype in (torch.int64, torch.int32)):
                return None
            out = out.item()
        return float(out) if isinstance(out, (int, float)) and not isinstance(out, bool) else None
    except Exception:
        return None


def _is_symbolic_number(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    v = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool)


def _same(a, b) -> bool:
    """Shape entries equal without adding guards (SymInts compare only when provably equal)."""
    return _sizes_equal(a, b, guard=False)


def _guarded_equal(a, b) -> bool:
    """``a == b`` for symbolic sizes true at the traced sizes, made a guard of the graph (Dynamo recompiles
    where it fails, and the new graph is planned again). Needed where the model slices its bias with
    ``max(0, longest - seen)`` (mpt): equal to ``seen`` only while ``seen <= longest``."""
    return _sizes_equal(a, b, guard=True)


def _sizes_equal(a, b, guard: bool) -> bool:
    """``a == b`` for ints or SymInts: proven without guards, or (``guard``) true now and made a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true
        return bool((guard_or_false if guard else statically_known_true)(a == b))
    except Exception:
        return False


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _int(x) -> Optional[int]:
    if isinstance(x, int):
        return x
    try:
        from torch.fx.experimental.symbolic_shapes import is_concrete_int
        return int(x) if is_concrete_int(x) else None
    except Exception:
        return None


def strip_repeat(node: fx.Node) -> tuple[fx.Node, int, list]:
    """Undo a per-group repeat of K/V: returns (base [B, Hkv, S, D], groups, internal nodes)."""
    out = val(node)
    # repeat_interleave(G, dim=1)
    if _is_call(node, torch.repeat_interleave, "repeat_interleave"):
        base = node.args[0]
        bv = val(base)
        reps = _arg(node, 1, "repeats")
        dim = _arg(node, 2, "dim")
        if bv is not None and out is not None and bv.dim() == 4 and isinstance(reps, int) \
                and dim in (1, -3) and _same(out.shape[1], bv.shape[1] * reps):
            return base, reps, [node]
    # reshape(expand(x[:, :, None]))
    if _is_call(node, "reshape", "view", torch.reshape):
        exp = node.args[0]
        if _is_call(exp, "expand", torch.Tensor.expand) and len(exp.users) == 1:
            unsq = exp.args[0]
            base = None
            if _is_call(unsq, operator.getitem) and isinstance(unsq.args[1], tuple):
                idx = unsq.args[1]
                if len(idx) >= 3 and idx[2] is None and all(
                        isinstance(i, slice) and i == slice(None) for i in idx[:2]) and all(
                        isinstance(i, slice) and i == slice(None) or i is Ellipsis for i in idx[3:]):
                    base = unsq.args[0]
            elif _is_call(unsq, "unsqueeze", torch.unsqueeze) and unsq.args[1] in (2, -3):
                base = unsq.args[0]
            bv = val(base) if base is not None else None
            ev = val(exp)
            if bv is not None and out is not None and ev is not None and bv.dim() == 4 and out.dim() == 4 \
                    and ev.dim() == 5 and len(unsq.users) == 1 and _same(out.shape[0], bv.shape[0]) \
                    and _same_shape(out.shape[2:], bv.shape[2:]) and _same_shape(ev.shape[3:], bv.shape[2:]) \
                    and _same_shape(ev.shape[:2], bv.shape[:2]):
                g = _int(ev.shape[2])
                if g is not None and _same(out.shape[1], bv.shape[1] * g):
                    return base, g, [node, exp, unsq]
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
    if gk != gv:
        (k, ik), (v, iv) = (a["key"], []), (a["value"], [])
    pattern = "sdpa" + ("+repeat_kv" if gk > 1 and gk == gv else "")
    mask = a["attn_mask"]
    if mask is not None and not isinstance(mask, fx.Node):
        return Skipped(node, pattern, "attn_mask is not a tensor")
    bias = []
    if mask is not None:
        why = _per_head(mask)
        mv = val(mask)
        if why and mv is not None and mv.is_floating_point():  # a per-head additive mask (ALiBi folded in)
            bias, mask, pattern = [(a["attn_mask"], False, 1.0)], None, pattern + "+bias"
        elif why:
            return Skipped(node, pattern, why)
    scale = scale if isinstance(scale, fx.Node) else float(scale)
    return AttentionSite(pattern, node, a["query"], k, v, mask, False, a["is_causal"], scale, 0.0, ik + iv,
                         bias=bias)


# ------------------------------------------------------------------------------------------------
# eager attention
# ------------------------------------------------------------------------------------------------

_MATMUL = (torch.matmul, operator.matmul, "matmul")
_BMM = (torch.bmm, "bmm")
_BADDBMM = (torch.baddbmm, "baddbmm")
_EINSUM = (torch.einsum, torch.functional.einsum)
_SOFTMAX = (F.softmax, torch.softmax, "softmax", torch.special.softmax)
_MUL = (operator.mul, torch.mul, torch.multiply, "mul", "multiply")
_IMUL = (operator.imul, "mul_", "multiply_")
_DIV = (operator.truediv, torch.div, torch.true_divide, torch.divide, "div", "true_divide", "divide")
_IDIV = (operator.itruediv, "div_", "true_divide_", "divide_")
_ADD = (operator.add, torch.add, "add")
_IADD = (operator.iadd, "add_")
_MFILL = (torch.masked_fill, "masked_fill")
_IMFILL = ("masked_fill_",)
_WHERE = (torch.where, "where")
_TANH = (torch.tanh, F.tanh, "tanh")
_ITANH = ("tanh_",)
_CAST = ("to", "type", "type_as", "float", "half", "bfloat16", "double")
_IDENTITY = ("contiguous", "clone", torch.clone)
_DROPOUT = (F.dropout, torch.dropout, "dropout")
_LAYOUT = ("view", "reshape", torch.reshape, "flatten", torch.flatten, "unflatten", torch.unflatten)
_SHAPE_READERS = ("size", "dim", "numel", torch.ops.aten.sym_size.int)
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                  operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                  operator.ilshift, operator.irshift, operator.imatmul}
_PREC = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


class _Reject(Exception):
    def __init__(self, reason: str, node: Optional[fx.Node] = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        t = node.target
        return t.endswith("_") and not t.startswith("_")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or "out" in node.kwargs
    return False


def _reads_data(user: fx.Node) -> bool:
    """False for users that only read metadata (sizes)."""
    return not _is_call(user, *_SHAPE_READERS)


def _einsum_form(node: fx.Node):
    """(a, b, transposed_b) when ``einsum`` is a batched ``a @ b`` (``transposed_b``: ``a @ bᵀ``)."""
    eq = node.args[0] if node.args else None
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq or "." in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (len(a) == len(b) == len(out) and len(a) in (3, 4)) or any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    i, c = a[-2:]
    if out[-2] != i or c in out:
        return None
    j = out[-1]
    if b[-2:] == c + j:
        return ops[0], ops[1], False
    if b[-2:] == j + c:
        return ops[0], ops[1], True
    return None


def _product(node: fx.Node):
    """(left, right, right_is_transposed, extra) when ``node`` is a batched matrix product; extra holds
    baddbmm's (input, beta, alpha)."""
    if _is_call(node, *_MATMUL, *_BMM):
        if "out" in node.kwargs or len(node.args) < 2:
            return None
        return node.args[0], node.args[1], False, None
    if _is_call(node, *_BADDBMM):
        if "out" in node.kwargs:
            return None
        inp = _arg(node, 0, "input")
        b1, b2 = _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
        return b1, b2, False, (inp, node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1))
    if _is_call(node, *_EINSUM):
        form = _einsum_form(node)
        return None if form is None else (*form, None)
    return None


def _peel(node, limit: int = 8):
    """Follow layout ops up from a matmul operand: returns (base, swaps of the last two dims, nodes).

    Accepted: transposes/permutes of the last two dims and reshapes that merge the first two dims of a
    4-D tensor into one (the ``[batch·heads, ·, ·]`` layout)."""
    nodes, swaps = [], 0
    for _ in range(limit):
        v = val(node)
        if v is None:
            break
        if _is_call(node, "transpose", torch.transpose) and len(node.args) >= 3:
            d = sorted(int(x) % v.dim() for x in node.args[1:3])
            if d != [v.dim() - 2, v.dim() - 1]:
                break
            swaps += 1
        elif _is_call(node, "permute", torch.permute):
            perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
                else node.args[1:]
            n = v.dim()
            if [int(p) % n for p in perm] != list(range(n - 2)) + [n - 1, n - 2]:
                break
            swaps += 1
        elif _is_call(node, getattr) and node.args[1] == "mT":
            swaps += 1
        elif _is_call(node, *_LAYOUT) or _is_call(node, "view_as", "reshape_as"):
            src = val(node.args[0])
            if src is None or src.dim() != 4 or v.dim() != 3 or not _same_shape(v.shape[1:], src.shape[2:]) \
                    or not _same(v.shape[0], src.shape[0] * src.shape[1]):
                break
        else:
            break
        nodes.append(node)
        node = node.args[0]
    return node, swaps, nodes


def _peel_expand(node: fx.Node) -> fx.Node:
    while _is_call(node, "expand", torch.Tensor.expand, "expand_as", "broadcast_to", torch.broadcast_to):
        node = node.args[0]
    return node


def _per_head(mask: fx.Node) -> str:
    """A reason when a mask is not the same for every head (an ALiBi-like bias), else ''."""
    mv = val(_peel_expand(mask))
    if mv is None:
        return "the mask has no recorded shape"
    if mv.dim() > 4:
        return "the mask has more than 4 dims"
    if mv.dim() >= 3 and not _same(mv.shape[-3], 1):
        what = "mask" if mv.dtype == torch.bool else "additive term (an ALiBi-like per-head bias, not a mask)"
        return (f"the {what} differs per head: the compressed decode path applies no mask, so it is left "
                "alone")
    return ""


def _bool_not(m):
    """(x, True) when ``m`` is ``~x`` / ``x.logical_not()`` / ``x == 0`` of a boolean ``x``, else (m, False)."""
    if _is_call(m, operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "bitwise_not",
                "__invert__") and len(m.args) == 1:
        x = m.args[0]
    elif _is_call(m, operator.eq, torch.eq, "eq") and len(m.args) == 2 and m.args[1] in (0, False):
        x = m.args[0]
    else:
        return m, False
    xv = val(x)
    return (x, True) if xv is not None and xv.dtype == torch.bool else (m, False)


def _scalar(x):
    """('const', float) or ('sym', node) for a scale operand, else None."""
    c = _const(x)
    if c is not None:
        return ("const", c)
    if isinstance(x, fx.Node) and _is_symbolic_number(x):
        return ("sym", x)
    return None


_CAT = (torch.cat, torch.concat, torch.concatenate, "cat")
_MAX = ("max", torch.max, "amax", torch.amax)
_CLAMP = (torch.max, torch.maximum, "max", "maximum", torch.clamp_min, "clamp_min", torch.clamp, "clamp")
_SUB = (operator.sub, torch.sub, "sub")


def _sink_of(other) -> Optional[fx.Node]:
    """The per-head logits node when ``other`` (concatenated after the scores) is one logit per head,
    broadcast over batch and queries: ``p.reshape(1, -1, 1, 1).expand(B, -1, q, -1)`` (gpt-oss)."""
    if not isinstance(other, fx.Node):
        return None
    base = _peel_expand(other)
    bv, ov = val(base), val(other)
    if bv is None or ov is None or ov.dim() != 4 or not _same(ov.shape[-1], 1) or bv.dim() != 4:
        return None
    if not (_same(bv.shape[0], 1) and _same(bv.shape[2], 1) and _same(bv.shape[3], 1)):
        return None
    return base


def _shift(pending: list, alias: set):
    """(the subtraction node, the max nodes) when the scores' readers are ``x - x.max(-1, keepdim=True)``
    (a value-neutral shift before a softmax, gpt-oss), else None."""
    if len(pending) != 2:
        return None
    mx = next((n for n in pending if _is_call(n, *_MAX)), None)
    sb = next((n for n in pending if _is_call(n, *_SUB)), None)
    if mx is None or sb is None or mx.args[0] not in alias:
        return None
    dim = _arg(mx, 1, "dim")
    keep = _arg(mx, 2, "keepdim", False)
    xv = val(mx.args[0])
    if xv is None or dim not in (-1, xv.dim() - 1) or keep is not True:
        return None
    red = mx
    if mx.target in ("max", torch.max):
        users = list(mx.users)
        if len(users) != 1 or not (_is_call(users[0], operator.getitem) and users[0].args[1] == 0
                                   or _is_call(users[0], getattr) and users[0].args[1] == "values"):
            return None
        red = users[0]
    if sb.args[0] not in alias or (sb.args[1] if len(sb.args) > 1 else None) is not red or len(red.users) != 1:
        return None
    return sb, [mx] + ([red] if red is not mx else [])


def _drops_last(u: fx.Node) -> bool:
    """``x[..., :-1]`` (or ``x[:, :, :, :-1]``): the sink's column dropped after the softmax."""
    if not _is_call(u, operator.getitem) or not isinstance(u.args[1], tuple):
        return False
    idx = u.args[1]
    last = idx[-1] if idx else None
    if not (isinstance(last, slice) and last.start in (None, 0) and last.stop == -1 and last.step in (None, 1)):
        return False
    head = idx[:-1]
    return head == (Ellipsis,) or (len(head) == 3 and all(isinstance(i, slice) and i == slice(None) for i in head))


@dataclass
class _Op:
    kind: str            # scale | tanh | mask | cast | identity | layout | softmax | pv | sink | drop
    node: fx.Node
    factor: object = None       # scale: ('const', c) / ('sym', node), with op mul|div in `how`
    how: object = None
    mask: Optional[fx.Node] = None
    inverted: bool = False
    fill: Optional[float] = None
    dtype: object = None


def _which(u: fx.Node, alias: set, candidates: list):
    """Index of the single candidate operand that is an alias; the others must not be aliases."""
    hits = [i for i, a in enumerate(candidates) if isinstance(a, fx.Node) and a in alias]
    others = [n for n in u.all_input_nodes if n in alias]
    if len(hits) != 1 or len(others) != 1:
        raise _Reject(f"{_name(u)} reads the scores more than once or in an unexpected position", u)
    return hits[0]


def _classify(u: fx.Node, alias: set, after_softmax: bool) -> _Op:
    """What one reader of the current scores (or weights) does to them."""
    what = "attention weights" if after_softmax else "scores"
    if u.op not in ("call_function", "call_method"):
        raise _Reject(f"the {what} are also {'returned by the graph' if u.op == 'output' else 'used'} "
                      f"({u.name})", u)
    if "out" in u.kwargs:
        raise _Reject(f"{_name(u)}(out=...) on the {what}", u)
    inplace = _is_inplace(u)
    vu = val(u)
    # the product with V
    prod = _product(u)
    if prod is not None and not _is_call(u, *_BADDBMM):
        left, right, _, _ = prod
        if _which(u, alias, [left, right]) != 0:
            raise _Reject(f"the {what} are the right operand of {_name(u)}", u)
        if not after_softmax:
            raise _Reject(f"the scores meet {_name(u)} before any softmax", u)
        return _Op("pv", u)
    if _is_call(u, *_SOFTMAX):
        _which(u, alias, [u.args[0]])
        if after_softmax:
            raise _Reject("a second softmax on the attention weights", u)
        dim = _arg(u, 1, "dim")
        dtype = u.kwargs.get("dtype")
        if dtype is None and _is_call(u, F.softmax) and len(u.args) > 3:
            dtype = u.args[3]
        elif dtype is None and not _is_call(u, F.softmax) and len(u.args) > 2:
            dtype = u.args[2]
        sv = val(u.args[0])
        if sv is None or not isinstance(dim, int) or dim not in (-1, sv.dim() - 1):
            raise _Reject(f"softmax over dim {dim!r}, not the last dimension", u)
        return _Op("softmax", u, dtype=dtype)
    if _is_call(u, *_CAST):
        _which(u, alias, [u.args[0]])
        src = val(u.args[0])
        if vu is None or src is None or not vu.is_floating_point() or vu.device != src.device \
                or not _same_shape(vu.shape, src.shape):
            raise _Reject(f"{_name(u)} on the {what} is not a float cast", u)
        return _Op("cast", u, dtype=vu.dtype)
    if _is_call(u, *_IDENTITY):
        _which(u, alias, [u.args[0]])
        return _Op("identity", u)
    if _is_call(u, *_DROPOUT):
        _which(u, alias, [u.args[0]])
        p = _arg(u, 1, "p", 0.5)
        training = _arg(u, 2, "training" if not _is_call(u, torch.dropout) else "train", True)
        if not isinstance(p, (int, float)) or not isinstance(training, bool):
            raise _Reject("dropout with a p or training flag that is not a constant", u)
        if p != 0 and training:
            raise _Reject(f"attention dropout is active (p={p}, training mode)", u)
        return _Op("identity", u)
    if _is_call(u, *_LAYOUT) or _is_call(u, "view_as", "reshape_as"):
        _which(u, alias, [u.args[0]])
        src = val(u.args[0])
        if vu is None or src is None or vu.dim() not in (3, 4) or src.dim() not in (3, 4) \
                or not _same_shape(vu.shape[-2:], src.shape[-2:]) \
                or not _same(math.prod(vu.shape[:-2]), math.prod(src.shape[:-2])):
            raise _Reject(f"{_name(u)} on the {what} is not a [batch·heads] ↔ [batch, heads] reshape", u)
        return _Op("layout", u)
    if after_softmax and _drops_last(u):
        _which(u, alias, [u.args[0]])
        return _Op("drop", u)
    if after_softmax:
        raise _Reject(f"the attention weights pass through {_name(u)} before meeting V", u)
    # scales
    if _is_call(u, *_MUL, *_IMUL, *_DIV, *_IDIV):
        is_div = _is_call(u, *_DIV, *_IDIV)
        a, b = u.args[0], _arg(u, 1, "other")
        if is_div and u.kwargs.get("rounding_mode") is not None:
            raise _Reject(f"{_name(u)} with rounding_mode on the scores", u)
        i = _which(u, alias, [a, b])
        if is_div and i != 0:
            raise _Reject("the scores are a divisor", u)
        s = _scalar(b if i == 0 else a)
        if s is None:
            other = b if i == 0 else a
            kind = "a tensor that is not a constant" if isinstance(other, fx.Node) else repr(other)
            raise _Reject(f"the scores are {'divided' if is_div else 'multiplied'} by {kind}", u)
        return _Op("scale", u, factor=s, how=operator.truediv if is_div else operator.mul)
    if _is_call(u, *_TANH, *_ITANH):
        _which(u, alias, [u.args[0]])
        return _Op("tanh", u)
    if _is_call(u, *_CAT) and not inplace:
        parts = _arg(u, 0, "tensors")
        dim = _arg(u, 1, "dim", 0)
        sv = val(parts[0]) if isinstance(parts, (list, tuple)) and parts else None
        if isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] in alias and sv is not None \
                and dim in (-1, sv.dim() - 1):
            sink = _sink_of(parts[1])
            if sink is not None and parts[1] not in alias:
                return _Op("sink", u, mask=sink)
        raise _Reject("the scores are concatenated with something that is not one logit per head (a sink)", u)
    if _is_call(u, *_CLAMP) and not inplace:  # max(scores, finfo.min) and the like: value-neutral (xglm)
        a, b = u.args[0], (u.args[1] if len(u.args) > 1 else u.kwargs.get("other", u.kwargs.get("min")))
        if _is_call(u, torch.clamp, "clamp") and (len(u.args) > 2 or u.kwargs.get("max") is not None):
            raise _Reject("the scores are clamped from above", u)
        i = _which(u, alias, [a, b])
        bound = _const(b if i == 0 else a)
        if bound is None or bound > MASK_FILL_MAX:
            raise _Reject(f"the scores pass through {_name(u)} with a bound that is not a mask value", u)
        return _Op("identity", u)
    # masks
    if _is_call(u, *_ADD, *_IADD):
        a, b = u.args[0], _arg(u, 1, "other")
        if u.kwargs.get("alpha", 1) != 1:
            raise _Reject("add with alpha on the scores", u)
        i = _which(u, alias, [a, b])
        m = b if i == 0 else a
        if not isinstance(m, fx.Node) or val(m) is None or val(m).dim() == 0:
            raise _Reject("a constant is added to the scores", u)
        return _Op("mask", u, mask=m)
    if _is_call(u, *_MFILL, *_IMFILL):
        _which(u, alias, [u.args[0]])
        m, fill = _arg(u, 1, "mask"), _const(_arg(u, 2, "value"))
        if fill is None or fill > MASK_FILL_MAX:
            raise _Reject(f"masked_fill with a value that is not a mask (≤ {MASK_FILL_MAX:g})", u)
        m, negated = _bool_not(m)
        return _Op("mask", u, mask=m, inverted=not negated, fill=fill)
    if _is_call(u, *_WHERE):
        if u.op == "call_method":
            cond, x, y = u.args[1], u.args[0], _arg(u, 2, "other")
        else:
            cond, x, y = u.args[0], _arg(u, 1, "input"), _arg(u, 2, "other")
        if isinstance(cond, fx.Node) and cond in alias:
            raise _Reject("the scores are the condition of a where", u)
        i = _which(u, alias, [x, y])
        fill = _const(y if i == 0 else x)
        if fill is None or fill > MASK_FILL_MAX:
            raise _Reject(f"where with a value that is not a mask (≤ {MASK_FILL_MAX:g})", u)
        cond, negated = _bool_not(cond)
        return _Op("mask", u, mask=cond, inverted=(i == 1) != negated, fill=fill)
    raise _Reject(f"the {what} pass through {_name(u)}, which is not a scale, cast, mask or soft-cap", u)


def _walk(qk: fx.Node, order: dict) -> list:
    """Every reader of the scores from ``q·kᵀ`` to the product with V, in order; raises _Reject."""
    ops, alias, done = [], {qk}, set()
    after_softmax = False
    while True:
        pending = sorted({u for a in alias for u in a.users if u not in done and _reads_data(u)},
                         key=lambda n: order.get(n, -1))
        if not pending:
            raise _Reject("the attention weights are not multiplied by V" if after_softmax
                          else "the scores are not passed to a softmax")
        shift = None if after_softmax else _shift(pending, alias)
        if shift is not None:  # x - x.max(-1, keepdim=True): the softmax does not see it
            sb, extra = shift
            ops.append(_Op("identity", sb))
            ops.extend(_Op("identity", n) for n in extra)
            alias, done = {sb}, set()
            continue
        u = pending[0]
        op = _classify(u, alias, after_softmax)
        if _is_inplace(u):
            if op.kind in ("softmax", "pv", "layout", "cast", "identity"):
                raise _Reject(f"{_name(u)} in place on the scores", u)
            done.add(u)
            alias.add(u)
        else:
            if len(pending) > 1:
                what = "attention weights" if after_softmax else "scores"
                others = ", ".join(sorted({_name(n) for n in pending[1:]}))
                raise _Reject(f"the {what} are also read by other ops ({others})", pending[1])
            alias, done = {u}, set()
        ops.append(op)
        if op.kind == "softmax":
            after_softmax = True
        if op.kind == "pv":
            return ops


def _eager_site(sm: fx.Node, order: dict):
    """The attention around softmax node ``sm``: AttentionSite, Skipped, or None (not attention)."""
    pv = _find_pv(sm)
    if pv is None:
        return None  # the softmax output never meets a matrix product: nothing to rewrite
    ancestors, qks = _find_qk(sm)
    if not qks:
        return Skipped(pv, "eager", "softmax input is not q·kᵀ (no matrix product feeds it)")
    first_reason = None
    for qk in qks:
        try:
            ops = _walk(qk, order)
            if not any(op.node is sm for op in ops):
                continue  # this product feeds another softmax
            return _fit(qk, ops, order)
        except _Reject as r:
            on_path = r.node is None or r.node in ancestors or _reaches(sm, r.node) or any(
                a in ancestors for a in r.node.all_input_nodes)
            if first_reason is None and on_path:
                first_reason = r.reason
    return Skipped(pv, "eager", first_reason or "softmax input is not q·kᵀ")


def _reaches(src: fx.Node, dst: fx.Node, depth: int = 10) -> bool:
    """dst is downstream of src within a few steps."""
    frontier = {src}
    for _ in range(depth):
        frontier = {u for n in frontier for u in n.users}
        if dst in frontier:
            return True
        if not frontier:
            return False
    return False


def _find_pv(sm: fx.Node, depth: int = 8) -> Optional[fx.Node]:
    """A matrix product downstream of ``sm`` whose left operand comes from it."""
    frontier, seen = [sm], {sm}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                prod = _product(u)
                if prod is not None and not _is_call(u, *_BADDBMM) and prod[0] in seen:
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def _find_qk(sm: fx.Node, depth: int = 12):
    """(ancestor set, candidate q·kᵀ products nearest first) upstream of ``sm``."""
    seen, found = {sm}, []
    frontier = [sm]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen or a.op not in ("call_function", "call_method"):
                    continue
                seen.add(a)
                prod = _product(a)
                if prod is not None:
                    found.append(a)
                else:
                    nxt.append(a)
        frontier = nxt
    return seen, found


def _fit(qk: fx.Node, ops: list, order: dict) -> AttentionSite:
    """Match the ops read from ``q·kᵀ`` to softmax(softcap(q·kᵀ·scale) + mask) · V; raises _Reject."""
    left, right, right_t, extra = _product(qk)
    pv = ops[-1].node
    _, v_op, v_t, _ = _product(pv)
    q4, q_sw, q_nodes = _peel(left)
    k4, k_sw, k_nodes = _peel(right)
    v4, v_sw, v_nodes = _peel(v_op)
    if q_sw % 2:
        raise _Reject("the query is transposed", qk)
    if (k_sw + right_t) % 2 != 1:
        raise _Reject("the second operand of q·kᵀ is not a transpose of K over its last two dims", qk)
    if (v_sw + v_t) % 2:
        raise _Reject("V is transposed", pv)
    qv, kv, vv, ov, sv = val(q4), val(k4), val(v4), val(pv), val(qk)
    if any(x is None for x in (qv, kv, vv, ov, sv)):
        raise _Reject("a tensor without a recorded shape", qk)
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise _Reject("q, k and v are not [batch, heads, seq, dim] tensors (single-head or other layout)", qk)
    B, Hq, T, D = qv.shape
    S, Dv = kv.shape[2], vv.shape[3]
    folded, out_folded = sv.dim() == 3, ov.dim() == 3
    for name, t, fold in (("key", kv, folded), ("value", vv, out_folded)):
        if not _same(t.shape[0], B) or not (_same(t.shape[1], Hq) or (_same(t.shape[1], 1) and not fold)):
            raise _Reject(f"the {name} batch/heads do not match the query's", qk)
    if not (_same(kv.shape[3], D) and _same(vv.shape[2], S)):
        raise _Reject("q, k and v sizes do not fit", qk)
    lead_s = [B * Hq] if folded else [B, Hq]
    lead_o = [B * Hq] if out_folded else [B, Hq]
    if not _same_shape(sv.shape, lead_s + [T, S]):
        raise _Reject("the scores are not [batch, heads, q, k] (or [batch·heads, q, k])", qk)
    if not _same_shape(ov.shape, lead_o + [T, Dv]):
        raise _Reject("the product with V is not [batch, heads, q, d] (or [batch·heads, q, d])", pv)
    dt = qv.dtype
    if kv.dtype != dt or vv.dtype != dt or ov.dtype != dt:
        raise _Reject(f"q, k, v and the output do not share one dtype ({dt}, {kv.dtype}, {vv.dtype}, "
                      f"{ov.dtype})", pv)
    if dt not in _PREC:
        raise _Reject(f"attention in {dt}", qk)

    # the chain, in order, against softmax(softcap(s·scale) + mask) [· casts] · V
    const, terms, cap = 1.0, [], 0.0
    stage = "scale"             # scale → (tanh) capped → (mask) masked → (softmax) weights
    mask_op = None
    sink = None                 # the per-head sink logits, when the scores get a sink column
    biases = []                 # [node, folded, factor]: per-head additive terms (ALiBi)
    dropped = False
    post_scale = 1.0            # positive constant scales after a boolean mask
    layout4 = not folded
    internal = [qk] + q_nodes + k_nodes + v_nodes
    if extra is not None:       # baddbmm(input, q, kᵀ, beta, alpha) = beta·input + alpha·q·kᵀ
        inp, beta, alpha = extra
        a = _scalar(alpha)
        if a is None or a[0] != "const" or not isinstance(beta, (int, float)):
            raise _Reject("baddbmm with alpha/beta that are not constants", qk)
        const *= a[1]
        iv = val(inp)
        if beta == 1 and iv is not None and iv.is_floating_point() and iv.dim() == 3 and _int(Hq) not in (None, 1) \
                and _same(iv.shape[0], B * Hq) and not _mask_like(_Op("mask", qk, mask=inp), False, B, Hq):
            # per (batch, head), not a broadcast of one mask: ALiBi (bloom)
            biases.append([inp, True, 1.0])
            stage = "biased"
        elif beta == 1:
            mask_op = _Op("mask", qk, mask=inp)
            stage = "masked"
        elif beta != 0:
            raise _Reject(f"baddbmm with beta={beta} (the input is not a mask)", qk)
    for op in ops[:-1]:
        internal.append(op.node)
        if op.kind in ("identity",):
            continue
        if op.kind == "sink":
            if stage not in ("scale", "capped", "masked") or sink is not None:
                raise _Reject("a sink column after the softmax or a second one", op.node)
            sink, stage = op.mask, "sinked"
            continue
        if op.kind == "drop":
            if sink is None or stage != "weights" or dropped:
                raise _Reject("a column dropped after the softmax that is not a sink's", op.node)
            dropped = True
            continue
        if op.kind == "layout":
            layout4 = val(op.node).dim() == 4
            continue
        if op.kind == "cast":
            _check_cast(op.dtype, dt, op.node)
            continue
        if op.kind == "softmax":
            if op.dtype is not None:
                _check_cast(op.dtype, dt, op.node)
            stage = "weights"
            continue
        if op.kind == "scale":
            kind, f = op.factor
            if stage == "scale":
                if kind == "const":
                    const = op.how(const, f)
                else:
                    terms.append((op.how, f))
            elif stage == "capped" and kind == "const":
                cap = op.how(cap, f)
            elif stage == "biased" and kind == "const" and not cap:  # (s + bias)·c: both scaled (falcon)
                const = op.how(const, f)
                for b in biases:
                    b[2] = op.how(b[2], f)
            elif stage == "masked" and kind == "const" and mask_op.fill is not None:
                post_scale = op.how(post_scale, f)
                const = op.how(const, f)
                if cap:
                    raise _Reject("a scale after soft-capping and the mask", op.node)
            else:
                raise _Reject("a scale after the mask or the soft-cap that is not part of them", op.node)
            continue
        if op.kind == "tanh":
            if stage != "scale":
                raise _Reject("tanh after the mask, the sink or a second tanh", op.node)
            stage, cap = "capped", 1.0
            continue
        if op.kind == "mask":
            mv = val(op.mask)
            if op.fill is None and mv is not None and mv.is_floating_point() and not _mask_like(op, layout4, B, Hq) \
                    and stage in ("scale", "capped", "biased", "masked"):
                if not layout4 and not (mv.dim() == 3 and _int(Hq) not in (None, 1) and _same(mv.shape[0], B * Hq)):
                    raise _Reject("a per-head additive term in the [batch·heads] layout of another shape", op.node)
                biases.append([op.mask, not layout4, 1.0])  # ALiBi / relative-position bias
                stage = "biased" if stage != "masked" else stage
                continue
            if stage not in ("scale", "capped", "biased"):
                raise _Reject("more than one mask (or a mask after the softmax)", op.node)
            if mask_op is not None:
                raise _Reject("more than one mask", op.node)
            mask_op = _with_layout(op, layout4, B, Hq)
            stage = "masked"
            continue
        raise _Reject(f"unexpected {op.kind}", op.node)
    if not (post_scale > 0):
        raise _Reject("a scale ≤ 0 after the mask", pv)
    if sink is not None and not dropped:
        raise _Reject("the sink's column is not dropped after the softmax", pv)
    if sink is not None:
        hv = val(sink)
        if hv is None or not _same(hv.shape[1], Hq) or folded:
            raise _Reject("sink logits that are not one per query head of [batch, heads, q, k] scores", pv)
    if mask_op is not None and mask_op.fill is not None and mask_op.fill != float("-inf") \
            and mask_op.fill * post_scale > MASK_FILL_MAX:
        raise _Reject("the masked value is scaled back into range", pv)
    if cap:
        if cap <= 0:
            raise _Reject("soft-cap with a factor ≤ 0", pv)
        const *= cap
    mask = mask_op.mask if mask_op is not None else None
    inverted = mask_op.inverted if mask_op is not None else False
    if mask_op is not None and mask_op.node is qk:          # baddbmm input, in the folded layout
        mask_op = _with_layout(mask_op, False, B, Hq)
        mask = mask_op.mask
    if mask is not None:
        mv = val(mask)
        if mv is None:
            raise _Reject("the mask has no recorded shape", qk)
        if mask_op.fill is None:
            if mv.dtype != dt:
                raise _Reject(f"an additive {mv.dtype} term on {dt} scores (only float masks of the "
                              "query's dtype are masks)", mask_op.node)
        elif mv.dtype != torch.bool:
            raise _Reject("the mask is not boolean", mask_op.node)
        why = _per_head(mask)
        if why:
            raise _Reject(why, mask_op.node)
    _check_no_mutation(qk, pv, set(internal) | {pv}, order)
    k, gk, ik = strip_repeat(k4)
    v, gv, iv = strip_repeat(v4)
    if gk != gv or not _same(val(k).shape[1], val(v).shape[1]):
        (k, ik), (v, iv), gk = (k4, []), (v4, []), 1
        if not _same(kv.shape[1], vv.shape[1]):
            raise _Reject("keys and values have different numbers of heads", pv)
    pattern = "eager" + ("+sink" if sink is not None else "") + ("+bias" if biases else "") \
        + ("+softcap" if cap else "") \
        + ("+repeat_kv" if gk > 1 else "") \
        + ("+bmm" if folded else "") + ("+einsum" if _is_call(qk, *_EINSUM) else "")
    scale = ScaleExpr(const, terms) if terms else const
    site = AttentionSite(pattern, pv, q4, k, v, mask, inverted, False, scale, cap,
                         internal + ik + iv,
                         mask_fill=mask_op.fill if mask_op is not None else None, sinks=sink,
                         bias=[tuple(b) for b in biases])
    if out_folded:
        site.anchor = _unfolded_output(pv, Hq, q4)
        site.internal.append(pv)
    return site


def _mask_like(op: _Op, layout4: bool, B, H) -> bool:
    """Whether an additive term is one mask for every head (else a per-head bias such as ALiBi)."""
    try:
        return not _per_head(_with_layout(op, layout4, B, H).mask)
    except _Reject:
        return False


def _check_cast(dtype, dt, node):
    if dtype not in _PREC or (dtype != dt and _PREC[dtype] <= _PREC[dt]):
        raise _Reject(f"a cast to {dtype} on {dt} attention (only casts to the query's dtype or wider)", node)


def _with_layout(op: _Op, layout4: bool, B, H) -> _Op:
    """The mask as a tensor that broadcasts against [B, H, q, k] like it did against the scores."""
    m = op.mask
    mv = val(m)
    if not isinstance(m, fx.Node) or mv is None:
        raise _Reject("the mask is not a tensor", op.node)
    if layout4 or mv.dim() <= 2 or (mv.dim() == 3 and _same(mv.shape[0], 1)):
        return op
    base, swaps, _ = _peel(m)
    base = _peel_expand(base)
    bv = val(base)
    if swaps == 0 and base is not m and bv is not None and bv.dim() == 4:
        return _Op(op.kind, op.node, mask=base, inverted=op.inverted, fill=op.fill)
    raise _Reject("a mask in the [batch·heads] layout that is not a broadcast of a [batch, 1, q, k] mask",
                  op.node)


def _check_no_mutation(qk: fx.Node, pv: fx.Node, chain: set, order: dict) -> None:
    """No in-place op outside the chain runs between q·kᵀ and the product with V (the rewrite reads
    q and k where the product with V was)."""
    lo, hi = order.get(qk, 0), order.get(pv, 0)
    node = qk.next
    while node is not pv and node.op != "root":
        if lo < order.get(node, lo) < hi and node not in chain and _is_inplace(node):
            raise _Reject(f"an in-place {_name(node)} runs between q·kᵀ and the product with V", node)
        node = node.next


def _unfolded_output(pv: fx.Node, H, q4: fx.Node) -> fx.Node:
    """The [B, H, q, d] node for a [B·H, q, d] product with V: its view back to 4-D if the model has
    one, else a new ``unflatten`` (the model's readers get it flattened again)."""
    ov = val(pv)
    users = [u for u in pv.users]
    if len(users) == 1 and _is_call(users[0], "view", "reshape", torch.reshape, "unflatten"):
        uv = val(users[0])
        if uv is not None and uv.dim() == 4 and _same(uv.shape[1], H) and _same_shape(uv.shape[2:], ov.shape[1:]):
            return users[0]
    graph = pv.graph
    with graph.inserting_after(pv):
        h = H if isinstance(H, int) else graph.call_function(torch.ops.aten.sym_size.int, (q4, 1))
        o4 = graph.call_method("unflatten", (pv, 0, (-1, h)))
    with graph.inserting_after(o4):
        o3 = graph.call_method("flatten", (o4, 0, 1))
    o4.meta["example_value"] = ov.unflatten(0, (-1, H))
    o3.meta["example_value"] = ov
    pv.replace_all_uses_with(o3, delete_user_cb=lambda u: u is not o4)
    return o4


def find_attention(graph: fx.Graph) -> list:
    """All attention sites (and skipped candidates) in topological order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = []
    for node in list(graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            found.append(_sdpa_site(node))
        elif _is_call(node, *_SOFTMAX):
            site = _eager_site(node, order)
            if site is not None:
                found.append(site)
    return found
