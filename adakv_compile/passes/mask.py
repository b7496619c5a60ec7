"""Stage 'mask': prove, from the graph that builds it, that an attention mask is causal (+ padding).

Compiled HF graphs build an explicit ``[B, 1, n, n]`` bool mask from aranges, cache positions and the
2-D padding mask (transformers 5.17 always; 5.24 whenever a padding mask is passed). Materialised, it
costs n² bytes (256 GB at 512k tokens). Instead of reading the tensor, we read its *construction*: each
node of the mask's ancestry is evaluated symbolically (sympy) as a function of its own element indices
``d0, d1, ...`` — ``arange`` is ``start + d0``, indexing with ``None``/slices remaps indices, broadcasting
pins size-1 dims to index 0, comparisons and ``& | ~`` build a boolean formula, and indexing an unknown
tensor ``P`` with index tensors gives an atom ``P(e0, e1)``. The mask is *proven* when its formula equals
``(kv <= q) ∧ bool(P[b, kv])`` (or ``kv <= q`` alone) for every index: relational atoms are put in the
canonical form ``a·x + c <= 0`` over integers; then the two formulas are compared by SAT with every atom
that is not literally the causal comparison or ``P[b, kv]`` left free (sound: a free atom can only make
the formulas look different, never equal). Anything else — a window (``kv > q - W``), a prefix, an op we
do not model — is *not proven*, and the attention keeps today's path (the mask tensor, with its check).

A proven mask is replaced, for every prompt attention reading it, by ``adakv::attention_proven`` on the
2-D padding mask (O(n)) and one ``adakv::mask_plan`` per mask (per-row left-pad offsets, one host sync per
forward); the n × n construction then has no readers left and is removed as dead code.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional

import sympy as sp
import torch
import torch.fx as fx

from ..kernels.attend import attention_out, empty_attention_out, exact_attention
from .detect import _guarded_equal, val


log = logging.getLogger("adakv_compile")
STATS = {"proven": 0, "unproven": {}}  # masks seen by proven_args since import (benchmarks read it)


class Unproven(Exception):
    """The mask (or one node of its construction) is outside what we model; the message says why."""


@dataclass
class MaskProof:
    """A mask proven equal to ``(kv <= q) ∧ pad[b, kv]``; ``pad`` is None when there is no padding term.

    ``pad`` is the node of the indexed tensor (shape [B or 1, n_kv]); ``pad_is_bool`` says whether it is
    already bool (else the mask used ``bool(pad)``, i.e. ``pad != 0``)."""
    mask: fx.Node
    pad: Optional[fx.Node]
    pad_is_bool: bool
    zero: tuple = ()  # scalar integer inputs the proof assumes are 0 (checked at run time by mask_plan)


_D = [sp.Symbol(f"d{i}", integer=True, nonnegative=True) for i in range(8)]
_CMP = {operator.le: sp.Le, operator.lt: sp.Lt, operator.ge: sp.Ge, operator.gt: sp.Gt,
        operator.eq: sp.Eq, operator.ne: sp.Ne, torch.le: sp.Le, torch.lt: sp.Lt, torch.ge: sp.Ge,
        torch.gt: sp.Gt, torch.eq: sp.Eq, torch.ne: sp.Ne}
_CMP_METHODS = {"le": sp.Le, "lt": sp.Lt, "ge": sp.Ge, "gt": sp.Gt, "eq": sp.Eq, "ne": sp.Ne,
                "__le__": sp.Le, "__lt__": sp.Lt, "__ge__": sp.Ge, "__gt__": sp.Gt}
_AND = (operator.and_, torch.logical_and, torch.bitwise_and, "__and__", "logical_and", "bitwise_and")
_OR = (operator.or_, torch.logical_or, torch.bitwise_or, "__or__", "logical_or", "bitwise_or")
_NOT = (operator.invert, torch.logical_not, torch.bitwise_not, "__invert__", "logical_not", "bitwise_not")
_ARITH = {operator.add: operator.add, operator.sub: operator.sub, torch.add: operator.add,
          torch.sub: operator.sub, "add": operator.add, "sub": operator.sub, "__add__": operator.add,
          "__sub__": operator.sub, operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul}


@dataclass
class _Sym:
    """A tensor as a formula of its element indices: ``expr(d0..d{len(shape)-1})``; ``leaf``: the node
    it stands for when it is an unknown tensor (only indexable)."""
    shape: tuple
    expr: object = None
    leaf: Optional[fx.Node] = None
    leaf_bool: bool = False  # the leaf went through bool(): its atoms mean ``leaf[...] != 0``


def _size(x) -> object:
    if isinstance(x, torch.SymInt):
        return x.node.expr  # a symbol: never 1 for our purposes (a broadcast dim is a literal 1)
    return int(x)


def _shape(node) -> tuple:
    v = val(node)
    if v is None:
        raise Unproven(f"{node} has no recorded shape")
    return tuple(_size(s) for s in v.shape)


def _on(s: _Sym, shape: tuple) -> object:
    """``s.expr`` re-indexed by the dims of the broadcast ``shape`` (right aligned; size-1 dims read 0)."""
    if s.leaf is not None:
        v = val(s.leaf)
        if v is None or v.dtype.is_floating_point or v.dtype == torch.bool or any(x != 1 for x in s.shape):
            raise Unproven("an unknown tensor is used as a value, not indexed")
        s = _Sym(s.shape, sp.Symbol(f"S_{s.leaf.name}", integer=True))  # one unknown integer (a count)
    off = len(shape) - len(s.shape)
    subs = {}
    for i, size in enumerate(s.shape):
        subs[_D[i]] = sp.Integer(0) if size == 1 else _T[i + off]
    e = sp.sympify(s.expr).xreplace(subs)
    return e.xreplace({_T[i]: _D[i] for i in range(len(shape))})


_T = [sp.Symbol(f"t{i}", integer=True, nonnegative=True) for i in range(8)]


def _broadcast(*shapes) -> tuple:
    n = max(len(s) for s in shapes)
    out = []
    for i in range(n):
        sizes = [s[i - n + len(s)] for s in shapes if i - n + len(s) >= 0]
        big = [x for x in sizes if x != 1]
        out.append(big[0] if big else 1)
    return tuple(out)


def _const(x):
    if isinstance(x, bool):
        return sp.true if x else sp.false
    if isinstance(x, int):
        return sp.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    raise Unproven(f"the constant {x!r} is not an integer")


class _Eval:
    def __init__(self):
        self.memo: dict = {}

    def __call__(self, x) -> _Sym:
        if not isinstance(x, fx.Node):
            return _Sym((), _const(x))
        if x not in self.memo:
            self.memo[x] = self.node(x)
        return self.memo[x]

    def node(self, n: fx.Node) -> _Sym:
        t, a = n.target, n.args
        kw = n.kwargs
        ex = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(ex, torch.SymInt) or isinstance(ex, int):  # a size computed in the graph
            return _Sym((), _const(ex))
        if n.op == "placeholder" or n.op == "get_attr":
            return _Sym(_shape(n), leaf=n)
        if t is torch.arange:
            if kw.get("step", 1) != 1 or len(a) > 2:
                raise Unproven("arange with a step")
            start, end = (0, a[0]) if len(a) == 1 else a
            start, end = kw.get("start", start), kw.get("end", end)
            return _Sym(_shape(n), _const(self._scalar(start)) + _D[0])
        if t in _ARITH or (n.op == "call_method" and t in _ARITH):
            op = _ARITH[t]
            if kw.get("alpha", 1) != 1:
                raise Unproven("add/sub with alpha")
            x, y = self(a[0]), self(a[1])
            shape = _broadcast(x.shape, y.shape)
            return _Sym(shape, op(_on(x, shape), _on(y, shape)))
        if t in (operator.neg, torch.neg, "neg", "__neg__"):
            x = self(a[0])
            return _Sym(x.shape, -_on(x, x.shape))
        if t in _CMP or (n.op == "call_method" and t in _CMP_METHODS):
            rel = _CMP[t] if t in _CMP else _CMP_METHODS[t]
            x, y = self(a[0]), self(a[1])
            shape = _broadcast(x.shape, y.shape)
            return _Sym(shape, rel(_on(x, shape), _on(y, shape)))
        if t in _AND or t in _OR:
            x, y = self(a[0]), self(a[1])
            shape = _broadcast(x.shape, y.shape)
            f = sp.And if t in _AND else sp.Or
            return _Sym(shape, f(_bool(_on(x, shape)), _bool(_on(y, shape))))
        if t in _NOT:
            x = self(a[0])
            return _Sym(x.shape, sp.Not(_bool(_on(x, x.shape))))
        if n.op == "call_method" and t in ("new_ones", "new_zeros"):
            shape = a[1] if len(a) > 1 else kw.get("size", ())
            if isinstance(shape, (list, tuple)) and len(shape) == 0 and kw.get("dtype") == torch.bool:
                return _Sym((), sp.true if t == "new_ones" else sp.false)
            raise Unproven(f"{t} that is not a bool scalar")
        if n.op == "call_method" and t in ("to", "bool", "type"):
            return self._to(n)
        if n.op == "call_method" and t in ("view", "reshape", "contiguous") and self(a[0]).leaf is not None:
            x = self(a[0])
            if _shape(n) != x.shape:
                raise Unproven(f"{n.name} reshapes an unknown tensor")
            return x
        if n.op == "call_method" and t in ("expand", "expand_as"):
            x = self(a[0])
            shape = _shape(n)
            if x.leaf is not None:
                return _Sym(shape, leaf=x.leaf, leaf_bool=x.leaf_bool) if shape == x.shape else \
                    self._fail(n, "expand of an unknown tensor")
            return _Sym(shape, _on(x, shape))
        if n.op == "call_method" and t == "unsqueeze" or t is torch.unsqueeze:
            x = self(a[0])
            d = a[1] if len(a) > 1 else kw["dim"]
            nd = len(x.shape) + 1
            d = d + nd if d < 0 else d
            return self._index(n, x, (slice(None),) * d + (None,))
        if t is operator.getitem:
            x = self(a[0])
            idx = a[1] if isinstance(a[1], tuple) else (a[1],)
            return self._index(n, x, idx)
        return self._fail(n, f"{getattr(t, '__name__', t)} is not modelled")

    @staticmethod
    def _fail(n, why):
        raise Unproven(f"{why} ({n.name})")

    def _scalar(self, x):
        if isinstance(x, fx.Node):
            ex = x.meta.get("example_value", x.meta.get("val"))
            if isinstance(ex, (int, torch.SymInt)):
                return ex
            raise Unproven(f"arange bound {x.name} is not a size")
        return x

    def _to(self, n: fx.Node) -> _Sym:
        x = self(n.args[0])
        dtype = n.kwargs.get("dtype")
        for arg in n.args[1:]:
            if isinstance(arg, torch.dtype):
                dtype = arg
        if n.target == "bool":
            dtype = torch.bool
        v = val(n)
        if dtype is None and v is not None and v.dtype == val(n.args[0]).dtype:
            return x  # a device move
        if dtype != torch.bool:
            raise Unproven(f"{n.name} converts to {dtype}, not bool")
        if x.leaf is not None:
            return _Sym(x.shape, leaf=x.leaf, leaf_bool=True)
        src = val(n.args[0])
        if src is not None and src.dtype == torch.bool:
            return x
        raise Unproven(f"{n.name} converts integer indices to bool")

    def _index(self, n: fx.Node, x: _Sym, idx: tuple) -> _Sym:
        shape = _shape(n)
        if any(isinstance(i, fx.Node) for i in idx):  # advanced indexing of an unknown tensor
            if x.leaf is None or not all(isinstance(i, fx.Node) for i in idx) or len(idx) != len(x.shape):
                raise Unproven(f"advanced indexing {n.name} is not a plain gather from a tensor")
            subs = [self(i) for i in idx]
            if any(s.leaf is not None for s in subs):
                raise Unproven(f"{n.name} indexes with an unknown tensor")
            args = [_on(s, shape) for s in subs]
            fn = sp.Function(f"P_{x.leaf.name}")
            atom = sp.Eq(fn(*args), 1)  # a Boolean atom: "leaf[args] is true"
            if val(x.leaf).dtype != torch.bool and not x.leaf_bool:
                raise Unproven(f"{n.name} reads values of a non-bool tensor")
            self.leaves = getattr(self, "leaves", {})
            self.leaves[fn.__name__] = (x.leaf, val(x.leaf).dtype == torch.bool)
            return _Sym(shape, atom)
        if x.leaf is not None:
            raise Unproven(f"{n.name} slices an unknown tensor")
        # basic indexing: None inserts a dim, slice(None) keeps one, Ellipsis fills
        if sum(i is Ellipsis for i in idx) > 1:
            raise Unproven("two ellipses")
        kept = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            pos = idx.index(Ellipsis)
            idx = idx[:pos] + (slice(None),) * (len(x.shape) - kept) + idx[pos + 1:]
        else:
            idx = idx + (slice(None),) * (len(x.shape) - kept)
        subs, out_dim, in_dim = {}, 0, 0
        for i in idx:
            if i is None:
                out_dim += 1
            elif isinstance(i, slice) and i == slice(None):
                subs[_D[in_dim]] = _T[out_dim]
                in_dim += 1
                out_dim += 1
            else:
                raise Unproven(f"{n.name} indexes with {i!r}")
        e = sp.sympify(x.expr).xreplace(subs).xreplace({_T[k]: _D[k] for k in range(out_dim)})
        if out_dim != len(shape):
            raise Unproven(f"{n.name}: unexpected result rank")
        return _Sym(shape, e)


def _bool(e):
    if isinstance(e, (sp.logic.boolalg.Boolean, sp.core.relational.Relational)):
        return e
    raise Unproven(f"an integer expression {e} is used as a bool")


def _canonical(rel) -> tuple:
    """``lhs OP rhs`` over integers as (``a``, strict?) meaning ``a <= 0`` / the negation pair, or None."""
    diff = sp.expand(rel.lhs - rel.rhs)
    if isinstance(rel, sp.Le):
        return ("le", diff)
    if isinstance(rel, sp.Lt):
        return ("le", diff + 1)
    if isinstance(rel, sp.Ge):
        return ("le", -diff)
    if isinstance(rel, sp.Gt):
        return ("le", -diff + 1)
    return ("eq" if isinstance(rel, sp.Eq) else "ne", diff)


def _abstract(e, causal: sp.Expr, pad_atom, env: dict):
    """Replace atoms by boolean symbols: the causal comparison → C, ``pad[b, kv]`` → P, others → fresh."""
    if e is sp.true or e is sp.false:
        return e
    if isinstance(e, (sp.And, sp.Or, sp.Not, sp.Xor)):
        return e.func(*[_abstract(x, causal, pad_atom, env) for x in e.args])
    if isinstance(e, sp.core.relational.Relational) and e.has(sp.core.function.AppliedUndef):
        if pad_atom is not None and e == pad_atom:
            return env.setdefault("P", sp.Symbol("P"))
        return env.setdefault(e, sp.Symbol(f"A{len(env)}"))
    if isinstance(e, sp.core.relational.Relational):
        kind, a = _canonical(e)
        if kind == "le" and sp.expand(a - causal) == 0:
            return env.setdefault("C", sp.Symbol("C"))
        if kind == "le" and sp.expand(a + causal - 1) == 0:  # kv - q >= 1: not causal
            return sp.Not(env.setdefault("C", sp.Symbol("C")))
        key = (kind, a)
        return env.setdefault(key, sp.Symbol(f"R{len(env)}"))
    raise Unproven(f"the mask formula has a term {e} that is not boolean")


def prove(mask: fx.Node, inverted: bool = False, decode: bool = False) -> MaskProof | str:
    """A MaskProof when ``mask`` (``~mask`` when ``inverted``) is causal(+padding) for every element,
    else the reason it is not proven (a string). ``decode``: the mask of a chunk of ``nq`` queries after a
    cache (``nk`` keys in all), proven equal to ``(kv <= q + nk - nq) ∧ pad[b, kv]`` for every value of the
    graph's scalar inputs (no 'nothing seen yet' assumption: nothing checks it at run time)."""
    v = val(mask)
    if v is None or v.dtype != torch.bool or not (v.dim() == 4 or decode and v.dim() in (2, 3)):
        return "the mask is not a recorded 4-d bool tensor" + (" (2-d or 3-d at decode)" if decode else "")
    shape4 = (1,) * (4 - v.dim()) + tuple(_size(s) for s in v.shape)  # [q, k] / [1, q, k] broadcast
    B, _, nq, nk = shape4
    if nq != nk and not decode:
        return "the mask is not square (a chunk after a cache)"
    ev = _Eval()
    try:
        s = ev(mask)
        if s.leaf is not None:
            return "the mask is an input of the graph, not built in it"
        e = _bool(_on(s, shape4))
        if inverted:
            e = sp.Not(e)
        q, kv, b = _D[2], _D[3], (_D[0] if shape4[0] != 1 else sp.Integer(0))
        causal = kv - q
        if decode:  # bottom-right aligned; a one-query mask's query index is pinned to 0 (_on)
            causal = kv - (sp.Integer(0) if nq == 1 else q) - (sp.sympify(nk) - sp.sympify(nq))
        leaves = getattr(ev, "leaves", {})
        cands = []
        for name, (node, is_bool) in leaves.items():
            ps = _shape(node)
            same = ps[1] == nk if len(ps) == 2 else False
            if decode and len(ps) == 2 and not same:  # the 2-D padding mask's own length symbol
                same = _guarded_equal(val(node).shape[1], v.shape[-1])
            if len(ps) == 2 and same and ps[0] in (1, B):
                bb = sp.Integer(0) if ps[0] == 1 else b
                cands.append((sp.Eq(sp.Function(name)(bb, kv), 1), node, is_bool))
        targets = [(None, None, True)] + cands
        by_name = {x.name: x for x in ev.memo if isinstance(x, fx.Node)}
        scalars = sorted((x for x in e.free_symbols if x.name.startswith("S_")), key=str)
        # first for every value of the scalar inputs; else assuming they are 0 (a prefill: nothing seen)
        for zero in ((), tuple(scalars)) if scalars and not decode else ((),):
            ez = e.xreplace({x: sp.Integer(0) for x in zero}) if zero else e
            for atom, node, is_bool in targets:
                env: dict = {}
                got = _abstract(ez, causal, atom, env)
                want = sp.Symbol("C") if atom is None else sp.And(sp.Symbol("C"), sp.Symbol("P"))
                env_syms = {"C": sp.Symbol("C"), "P": sp.Symbol("P")}
                got = got.xreplace({env[k]: env_syms[k] for k in ("C", "P") if k in env})
                if not sp.logic.inference.satisfiable(sp.Xor(got, want)):
                    return MaskProof(mask, node, is_bool, tuple(by_name[x.name[2:]] for x in zero))
        return "the mask formula is not (kv <= q) [and pad[b, kv]]: a window, prefix or other term"
    except Unproven as why:
        return f"mask construction not modelled: {why}"
    except (TypeError, ValueError, AttributeError) as why:  # a sympy surprise is a reason, not a crash
        return f"mask construction not modelled: {type(why).__name__}: {why}"


# ---------------------------------------------------------------------------------------------------
# the ops a proven mask is replaced by


def plan_rows(pad: torch.Tensor) -> torch.Tensor:
    """[B+1] int64 on the CPU: each row's left-pad offset, then the kind: 0 = no padding anywhere,
    1 = every row is zeros then ones (left padding), 2 = anything else (holes, right padding)."""
    pad = pad.bool()
    n = pad.shape[-1]
    cnt = pad.sum(-1)
    off = n - cnt
    cols = torch.arange(n, device=pad.device)
    left = (pad == (cols[None, :] >= off[:, None])).all(-1)
    kind = torch.where((cnt == n).all(), 0, torch.where(left.all(), 1, 2))
    return torch.cat([off, kind.reshape(1)]).cpu()  # the one host sync of a forward


@torch.library.custom_op("adakv::mask_plan", mutates_args=())
def mask_plan(pad: Optional[torch.Tensor], zero: list[torch.Tensor]) -> torch.Tensor:
    """Per-row left-pad offsets (O(n) from the 2-D padding mask; ``[0, 0]`` without one), computed once per
    forward; ``zero``: the scalar inputs the mask's proof assumed 0 (a cache's count of tokens seen, at a
    prefill) — checked here, in the same host sync."""
    plan = plan_rows(pad) if pad is not None else torch.zeros(2, dtype=torch.int64)
    if zero:
        bad = torch.stack([z.reshape(()).to(torch.int64) for z in zero]).ne(0).any()
        if bool(bad):
            raise RuntimeError("adakv: the prefill's mask was proven causal for a cache that has seen no tokens, "
                               "but the cache's count is not 0; reset the cache before a prefill")
    return plan


@mask_plan.register_fake
def _(pad, zero):
    return torch.empty((pad.shape[0] if pad is not None else 1) + 1, dtype=torch.int64, device="cpu")


_BLOCK_ELEMENTS = 1 << 26  # mask entries per query block in the general (holes) case


def proven_attention(q, k, v, pad, plan, scale: float, softcap: float):
    """Attention under the mask ``(kv <= q) ∧ pad[b, kv]`` without building it (q, k, v: [B, H, n, D]).

    No padding: one causal SDPA (flash). Left padding: per run of rows with one offset ``o``, causal SDPA
    on the rows' last ``n - o`` positions (views, no copy); the padded query rows have no allowed key and
    get zeros, as SDPA gives for an all-False mask row. Other padding: query blocks with their own mask
    block (``B × block × n`` entries, never n × n)."""
    B, Hq, n, _ = q.shape
    plan = plan.tolist()
    kind, offs = plan[-1], plan[:-1]
    if len(offs) == 1 and B > 1:
        offs = offs * B
    if kind == 0:
        return exact_attention(q, k, v, None, scale, True, softcap)
    if kind == 1:
        parts, b = [], 0
        while b < B:
            e = b + 1
            while e < B and offs[e] == offs[b]:
                e += 1
            o = offs[b]
            out = q.new_zeros(e - b, Hq, n, v.shape[-1])
            if o < n:
                out[:, :, o:] = exact_attention(q[b:e, :, o:], k[b:e, :, o:], v[b:e, :, o:], None, scale,
                                                True, softcap)
            parts.append(out)
            b = e
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    padb = pad.bool().expand(B, n)
    step = max(1, _BLOCK_ELEMENTS // max(1, B * n))
    cols = torch.arange(n, device=q.device)
    outs = []
    for i0 in range(0, n, step):
        rows = torch.arange(i0, min(n, i0 + step), device=q.device)
        blk = (cols[None, :] <= rows[:, None])[None, None] & padb[:, None, None, :]
        outs.append(exact_attention(q[:, :, i0:i0 + step], k, v, blk, scale, False, softcap))
    return torch.cat(outs, dim=2)


@torch.library.custom_op("adakv::attention_proven", mutates_args=())
def attention_proven(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: Optional[torch.Tensor],
                     plan: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Prompt attention under a mask proven causal(+padding) by this stage; no n × n tensor."""
    return attention_out(proven_attention(q, k, v, pad, plan, scale, softcap))


@attention_proven.register_fake
def _(q, k, v, pad, plan, scale, softcap):
    return empty_attention_out(q, v)


def _proven_setup(ctx, inputs, output):
    q, k, v, pad, plan, scale, softcap = inputs
    ctx.save_for_backward(q, k, v, pad, plan)
    ctx.args = (scale, softcap)


def _proven_backward(ctx, grad):
    q, k, v, pad, plan = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        out = proven_attention(*leaves, pad, plan, *ctx.args)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 4


attention_proven.register_autograd(_proven_backward, setup_context=_proven_setup)


def proven_args(graph: fx.Graph, site) -> tuple | str:
    """For a prompt attention whose mask is proven: graph nodes ``(pad, plan, pad4)`` — the bool padding
    mask [B|1, n], its ``adakv::mask_plan`` node, and ``pad[:, None, None, :]`` for the ops that read a
    mask's last row (compress) — all None when the mask is causal without a padding term. Else the reason
    (str). Inserted right after the padding mask's node."""
    if site.is_causal:
        return "SDPA is_causal with a mask"
    proof = prove(site.mask, site.mask_is_bool_inverted)
    if isinstance(proof, str):
        log.info("adakv: mask %s of %s not proven causal, kept as a tensor: %s", site.mask.name,
                 site.anchor.name, proof)
        STATS["unproven"][proof] = STATS["unproven"].get(proof, 0) + 1
        return proof
    sizes = {str(_size(x)) for x in (val(site.q).shape[2], val(site.k).shape[2], *val(site.mask).shape[-2:])}
    if len(sizes) != 1:
        return "the mask's size is not the attention's"
    STATS["proven"] += 1
    if proof.pad is None and not proof.zero:  # purely causal: is_causal=True, no mask at all
        return None, None, None
    order = {x: i for i, x in enumerate(graph.nodes)}
    deps = [x for x in (proof.pad,) + proof.zero if x is not None]
    at = max(deps, key=order.get)
    if at.op == "placeholder":
        at = [x for x in graph.nodes if x.op == "placeholder"][-1]
    pad = pad4 = None
    if proof.pad is not None:
        with graph.inserting_after(at):
            pad = proof.pad if proof.pad_is_bool else graph.call_function(torch.ne, (proof.pad, 0))
        at = pad if pad is not proof.pad else at
    with graph.inserting_after(at):
        plan = graph.call_function(torch.ops.adakv.mask_plan.default, (pad, list(proof.zero)))
    if pad is not None:
        with graph.inserting_after(plan):
            pad4 = graph.call_function(operator.getitem, (pad, (slice(None), None, None, slice(None))))
    return pad, plan, pad4


def decode_unproven(site) -> str:
    """'' when the mask of an attention over a cache plus a chunk (decode / extend) is proven
    ``(kv <= q + past) ∧ pad[b, kv]``: what the compacted store already applies (causal within the chunk,
    the prompt's padding dropped at compression), so the mask is not read. Else the reason: the rewrite
    then passes the mask to the store's attention, gathered at the kept tokens' positions."""
    proof = prove(site.mask, site.mask_is_bool_inverted, decode=True)
    if isinstance(proof, str):
        log.info("adakv: decode mask %s of %s not proven causal, gathered at the kept positions: %s",
                 site.mask.name, site.anchor.name, proof)
        return proof
    return ""
