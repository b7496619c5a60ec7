"""Stage 'chunk': run the position-wise regions of a prefill graph over chunks of the sequence.

Between two attentions, everything a transformer does is position-wise along the sequence: norms,
projections, RoPE, residuals, the MLP. Run over the whole prompt at once, its intermediates are O(n)
(the MLP's ``[n, 14336]`` activations are 28.7 GB each at 1M tokens in bf16); run over chunks of ``c``
rows they are O(c), and the result is the same up to float reassociation.

Found by dataflow, not by module names: a node is *position-wise* when it is a known row-local op
(elementwise, linear, embedding, reductions over other dims, views that keep the sequence dim) whose
output has exactly one dim of size n (the sequence) and whose sequence inputs line up with it; a region is
a connected set of such nodes at one *level* (the number of non-position-wise nodes, e.g. attentions,
crossed on the way from the inputs; only those downstream of a position-wise node count, so a weight's
``.to()`` or RoPE's ``inv_freq`` does not split a layer), which makes every region convex. Each region is
cut out of the graph as its own GraphModule, compiled once by the backend's inner compiler for ``c`` rows
(and once for the remainder), and called through ``adakv::chunked``, which loops over the chunks and writes
its outputs' rows in place. Only static-shape prefill graphs are chunked (the chunk's shape arguments are
rewritten from n to c); anything else is left as it was, with the reason logged.

Memory order: the call sits right before the first reader of its outputs (not right after its last input),
so what runs in between — the previous layer's compress, the last reader of that layer's q/k/v — frees
them before the region allocates the next layer's; views of a region's outputs read only outside it are
taken outside (the base is returned once). ``passes/liveness.py`` models the resulting peak.
"""
from __future__ import annotations

import hashlib
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import networkx as nx
import torch
import torch.fx as fx

from .dataflow import to_digraph
from .detect import val

log = logging.getLogger("adakv_compile")

_ELEMENTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.floordiv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.exp,
    torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.abs, torch.where, torch.clamp, torch.erf,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu, torch.relu,
    torch.nn.functional.dropout, torch.nn.functional.tanh, torch.nn.functional.sigmoid,
    torch.nn.functional.softplus, torch.nn.functional.mish, torch.nn.functional.hardswish,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "sin", "cos", "abs",
    "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "__add__", "__mul__", "__sub__",
    "__truediv__", "__neg__", "__rsub__", "__radd__", "__rmul__", "clamp", "masked_fill", "relu", "silu",
    "gelu", "square", "reciprocal", "erf", "log", "type",
}
_LAYOUT_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten"}
_LAYOUT = {torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten,
           operator.getitem}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "norm", "softmax", "log_softmax"}
_REDUCE_FN = {torch.mean, torch.sum, torch.amax, torch.softmax, torch.nn.functional.softmax,
              torch.nn.functional.log_softmax, torch.nn.functional.normalize}
_CHUNK_BYTES = 4 << 30  # default working set of one chunk: rows × per-row intermediate bytes


def _is_int_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _seq_dim(node, n: int) -> Optional[int]:
    """The one dim of size ``n`` of a node's tensor value; None for none or an ambiguous value."""
    v = val(node)
    if v is None:
        return None
    dims = [i for i, s in enumerate(v.shape) if _is_int_size(s) and s == n]
    return dims[0] if len(dims) == 1 else None


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        elif isinstance(a, dict):
            out += _flat(list(a.values()))
        else:
            out.append(a)
    return out


def _norm_dims(dims, rank: int) -> list[int]:
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [d + rank if d < 0 else d for d in dims]


def _row_local(node: fx.Node, n: int) -> str:
    """'' when ``node`` is position-wise along the sequence dim, else why not."""
    if node.op not in ("call_function", "call_method"):
        return "not a call"
    t = node.target
    sd = _seq_dim(node, n)
    if sd is None:
        return "no unique sequence dim"
    ins = [a for a in node.all_input_nodes]
    seq_ins = [(a, _seq_dim(a, n)) for a in ins if val(a) is not None and _seq_dim(a, n) is not None]
    if not seq_ins:
        return "no sequence input"
    if any(val(a) is None for a in ins):
        return "reads a non-tensor node"
    for a in ins:
        va = val(a)
        if any(_is_int_size(s) and s == n for s in va.shape) and _seq_dim(a, n) is None:
            return "an input with an ambiguous sequence dim"
    rank = val(node).dim()
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    # n as a literal argument is only understood as a size of a layout op at the sequence position
    lits = [a for a in _flat(list(node.args) + list(node.kwargs.values())) if _is_int_size(a) and a == n]
    if t in _ELEMENTWISE or (node.op == "call_method" and t in _ELEMENTWISE_METHODS):
        if lits:
            return "the sequence length as an argument"
        for a, asd in seq_ins:
            if val(a).dim() - asd != rank - sd:
                return "sequence dims do not line up"
        return ""
    if t is torch._C._nn.linear or t is torch.nn.functional.linear:
        x = node.args[0]
        if len(seq_ins) != 1 or seq_ins[0][0] is not x or seq_ins[0][1] == val(x).dim() - 1 or lits:
            return "linear over the sequence"
        return ""
    if t is torch.nn.functional.embedding:
        if len(seq_ins) != 1 or seq_ins[0][0] is not node.args[0] or lits:
            return "embedding of a sequence table"
        return ""
    if t in (torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.layer_norm):
        x = node.args[0]
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if len(seq_ins) != 1 or seq_ins[0][0] is not x or lits or \
                seq_ins[0][1] >= val(x).dim() - len(tuple(shape)):
            return "a norm over the sequence"
        return ""
    if t in _REDUCE_FN or (node.op == "call_method" and t in _REDUCE):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or len(seq_ins) != 1 or lits:
            return "a reduction over every dim"
        a, asd = seq_ins[0]
        if asd in _norm_dims(dims, val(a).dim()):
            return "a reduction over the sequence"
        return ""
    if t is torch.cat or t is torch.concat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if any(asd != _norm_dims(dim, val(a).dim())[0] and val(a).dim() - asd == rank - sd for a, asd in seq_ins) \
                and all(_norm_dims(dim, val(a).dim())[0] != asd for a, asd in seq_ins) and not lits and \
                len(seq_ins) == len(ins):
            return ""
        return "cat along the sequence (or of non-sequence parts)"
    if t is torch.matmul or t is operator.matmul:
        a, b = node.args[:2]
        sa, sb = _seq_dim(a, n), _seq_dim(b, n)
        if sa is not None and sb is None and sa < val(a).dim() - 1 and not lits:
            return ""
        if sb is not None and sa is None and sb == val(b).dim() - 1 and not lits:
            return ""
        return "matmul mixing positions"
    if t in _LAYOUT or (node.op == "call_method" and t in _LAYOUT_METHODS):
        if len(seq_ins) != 1 or node.args[0] is not seq_ins[0][0]:
            return "layout op of several sequence tensors"
        a, asd = seq_ins[0]
        va, vo = val(a), val(node)
        if name in ("view", "reshape", "flatten"):
            before_in = math.prod(int(s) for s in va.shape[:asd])
            before_out = math.prod(int(s) for s in vo.shape[:sd])
            if before_in != before_out:
                return "a reshape that moves the sequence dim"
        if t is operator.getitem:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
                return "advanced indexing"
            if any(isinstance(i, slice) and i != slice(None) and (i.start not in (None, 0) or
                   i.stop is not None or i.step not in (None, 1)) for i in idx) and vo.shape[sd] != n:
                return "slices the sequence"
        if lits and name not in ("view", "reshape", "expand"):  # only their sizes are rewritten per chunk
            return "the sequence length as an argument"
        return ""
    return f"{name} is not a known row-local op"


@dataclass
class Region:
    """One chunked region: its sub-GraphModule (built per chunk size) and how to slice its I/O."""
    key: str
    n: int
    chunk: int
    members: list
    inputs: list
    in_dims: list  # the sequence dim of each input, None for inputs read whole
    out_nodes: list
    out_dims: list
    out_meta: list  # (shape, dtype) of each output
    compile_fn: Callable
    template: Optional[fx.Graph] = None  # the region cut out for n rows (the outer graph's nodes go)
    compiled: dict = field(default_factory=dict)
    donated: dict = field(default_factory=dict)  # output index -> input index whose storage it is written into
    shared: Optional[dict] = None  # structure key -> compiled fn, over the regions of one backend (see _compile)

    def cut(self) -> None:
        g = fx.Graph()
        env = {}
        for i, x in enumerate(self.inputs):
            env[x] = g.placeholder(f"in_{i}")
            env[x].meta.update({k: x.meta[k] for k in ("example_value", "val") if k in x.meta})
        for node in self.members:
            env[node] = g.node_copy(node, lambda a: env[a])
        g.output(tuple(env[o] for o in self.out_nodes))
        self.template = g

    def build(self, rows: int) -> fx.GraphModule:
        """The region as a GraphModule for ``rows`` sequence rows (shape literals n → rows)."""
        g = fx.Graph()
        out = g.graph_copy(self.template, {})
        g.output(out)
        for node in g.nodes:
            if node.op == "call_method" and node.target in ("view", "reshape", "expand") or \
                    node.target is torch.reshape:
                node.args = tuple(_resize(a, self.n, rows) for a in node.args)
        return fx.GraphModule(torch.nn.Module(), g)

    def _compile(self, rows: int, args: list) -> Callable:
        """The region compiled for ``rows``. The regions of a decoder's layers are the same graph on other
        weights: with ``shared`` (one dict per backend) a region whose structure and input layouts equal one
        compiled before reuses its compiled function, so L layers cost one Inductor compile, not L."""
        gm = self.build(rows)
        if self.shared is None:
            return self.compile_fn(gm, args)
        key = structure_key(gm.graph, args)
        fn = self.shared.get(key)
        if fn is None:
            fn = self.shared[key] = self.compile_fn(gm, args)
        else:
            log.debug("adakv: chunk: region %s reuses a compiled region of the same structure", self.key)
        return fn

    def run(self, inputs: list, outs: Optional[list] = None) -> list:
        """Outputs rows [s, s+c) from input rows [s, s+c), chunk by chunk, into ``outs`` (new tensors when
        None). A donated output's buffer is also an input (``donated``: output -> input index; it is not in
        ``inputs`` then): its rows are overwritten once their chunk is computed, and no later chunk reads them."""
        if self.donated and outs is not None:
            it, src = iter(inputs), {i: j for j, i in self.donated.items()}
            inputs = [outs[src[i]] if i in src else next(it) for i in range(len(self.in_dims))]
        if outs is None:
            outs = [torch.empty(shape, dtype=dtype, device=inputs[0].device) for shape, dtype in self.out_meta]
        ptrs = {outs[j].untyped_storage().data_ptr() for j in self.donated} if self.donated else set()
        for s in range(0, self.n, self.chunk):
            rows = min(self.chunk, self.n - s)
            args = [x.narrow(d, s, rows) if d is not None else x for x, d in zip(inputs, self.in_dims)]
            fn = self.compiled.get(rows)
            if fn is None:
                fn = self.compiled[rows] = self._compile(rows, args)
            res = list(fn(*args))
            if ptrs:  # a result that is a view of a donor's rows must be read before those rows are written
                res = [r.clone() if r.untyped_storage().data_ptr() in ptrs else r for r in res]
            for o, r, d in zip(outs, res, self.out_dims):
                o.narrow(d, s, rows).copy_(r)
        return outs


def structure_key(graph: fx.Graph, args: list) -> tuple:
    """What a compiled graph depends on, node names aside: every node's op, target and arguments (as node
    positions and literals), and each input's shape, stride, dtype, device and grad flag. Two graphs with
    equal keys compile to the same code (in-process only: targets are keyed by identity)."""
    index = {node: i for i, node in enumerate(graph.nodes)}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return ("dict",) + tuple((k, arg(v)) for k, v in a.items())
        if isinstance(a, (slice, torch.Size)):
            return repr(a)
        return (type(a).__name__, repr(a))

    nodes = tuple((n.op, n.target if isinstance(n.target, str) else id(n.target), arg(n.args), arg(n.kwargs))
                  for n in graph.nodes if n.op != "placeholder") + (len(graph.find_nodes(op="placeholder")),)
    return nodes, input_layouts(args)


def input_layouts(args) -> tuple:
    """What compiled code assumes of its inputs: each tensor's shape, stride, dtype, device and grad flag;
    any other argument by type and value."""
    return tuple((tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.requires_grad)
                 if isinstance(x, torch.Tensor) else (type(x).__name__, repr(x)) for x in args)


def _resize(a, n: int, rows: int):
    if _is_int_size(a) and a == n:
        return rows
    if isinstance(a, (list, tuple)):
        return type(a)(_resize(x, n, rows) for x in a)
    return a


REGIONS: dict[str, Region] = {}


@torch.library.custom_op("adakv::chunked", mutates_args=())
def chunked(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run region ``key`` over sequence chunks (see Region.run); outputs are new contiguous tensors."""
    return REGIONS[key].run(list(inputs))


@chunked.register_fake
def _(key, inputs):
    r = REGIONS[key]
    return [inputs[0].new_empty(shape, dtype=dtype) for shape, dtype in r.out_meta]


@torch.library.custom_op("adakv::chunked_into", mutates_args=("outs",))
def chunked_into(key: str, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """``chunked`` writing into ``outs``: a donated output's buffer is the input it replaces (read here for
    the last time, not repeated in ``inputs``), the others are empty tensors made for it. Declared writes, so
    Inductor hands the buffers over instead of copying them (a custom op may not return an input's alias)."""
    REGIONS[key].run(list(inputs), list(outs))


@torch.library.custom_op("adakv::chunk_buffers", mutates_args=())
def chunk_buffers(key: str, after: torch.Tensor) -> list[torch.Tensor]:
    """Empty buffers for the outputs of region ``key`` that no input is donated to; ``after`` orders the
    allocation after the tensor computed last among the region's inputs."""
    r = REGIONS[key]
    return [torch.empty(shape, dtype=dtype, device=after.device) for j, (shape, dtype) in enumerate(r.out_meta)
            if j not in r.donated]


@chunk_buffers.register_fake
def _(key, after):
    r = REGIONS[key]
    return [after.new_empty(shape, dtype=dtype) for j, (shape, dtype) in enumerate(r.out_meta)
            if j not in r.donated]


def default_chunk(per_row_bytes: int, device: torch.device | None) -> int:
    """Rows per chunk: a working set of ``min(4 GiB, free memory / 16)``, at least 1024 rows, a power of two
    (the chunk's matmuls stay large enough to run at full speed, and power-of-two prompts need no second
    compile for a remainder)."""
    budget = _CHUNK_BYTES
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 16)
    rows = max(1024, budget // max(1, per_row_bytes))
    return 1 << (int(rows).bit_length() - 1)


_key_counts: dict[str, int] = {}


def _region_key(region: "Region") -> str:
    """``region-<sha256 of the cut graph, n, rows>-<k>``, k counting earlier regions of that digest in this
    process: a constant of the prefill graph that is the same in a restarted process (Inductor's FX-graph and
    AOTAutograd caches hit), whatever unrelated graphs were chunked before (a process counter was not)."""
    digest = hashlib.sha256(f"{region.template}|{region.n}|{region.chunk}".encode()).hexdigest()[:16]
    k = _key_counts.get(digest, 0)
    _key_counts[digest] = k + 1
    return f"region-{digest}-{k}"


def chunk_regions(gm: fx.GraphModule, n: Optional[int], chunk: Optional[int],
                  compile_fn: Callable, shared: Optional[dict] = None, whole: bool = False) -> list[Region]:
    """Replace every position-wise region of ``gm`` (sequence length ``n``) by an ``adakv::chunked`` call.

    ``chunk``: rows per chunk (None: from the shapes and free memory; 0: off); ``shared``: a dict in which
    regions of equal structure share one compiled function (Region._compile); ``whole``: cut the regions also
    where one chunk would hold all ``n`` rows (run as one chunk: compiled once for all layers instead of
    inside the whole graph). Returns the regions made."""
    if chunk == 0 or n is None or n <= 1:
        return []
    graph = gm.graph
    if any(isinstance(s, torch.SymInt) for node in graph.nodes if val(node) is not None for s in val(node).shape):
        log.info("adakv: chunk: dynamic shapes, the prefill graph is not chunked")
        return []
    members = set()
    for node in graph.nodes:
        if not _impure_like(node) and _row_local(node, n) == "":
            members.add(node)
    g = to_digraph(graph)
    level: dict = {}
    below: dict = {}  # downstream of a member: only such non-members can lie on a path between members
    for node in nx.topological_sort(g):
        preds = list(g.predecessors(node))
        below[node] = any(p in members or below[p] for p in preds)
        level[node] = max((level[p] + (p not in members and below[p]) for p in preds), default=0)
    sub = nx.Graph()
    sub.add_nodes_from(members)
    sub.add_edges_from((a, b) for a, b in g.edges if a in members and b in members and level[a] == level[b])
    order = {node: i for i, node in enumerate(graph.nodes)}
    regions = []
    # in graph order: region keys are numbered in creation order (set order is process-specific)
    for comp in sorted(nx.connected_components(sub), key=lambda c: min(order[x] for x in c)):
        comp = _without_layout_outputs(comp)
        if len(comp) < 3:
            continue
        r = _make_region(gm, sorted(comp, key=order.get), n, chunk, compile_fn, order, whole)
        if r is not None:
            r.shared = shared
            regions.append(r)
    if regions:
        graph.eliminate_dead_code()
        _donate(graph)
        graph.lint()
        gm.recompile()
    return regions


def adakv_op(node: fx.Node) -> str:
    """The adakv op name of a node (``attention_proven``, ``chunked``, ...) or ''."""
    if node.op != "call_function":
        return ""
    t = node.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and t.namespace == "adakv":
        return (t._schema.name if isinstance(t, torch._ops.OpOverload) else t._qualified_op_name).split("::")[-1]
    return ""


def _fresh(x: fx.Node) -> bool:
    """``x`` is a tensor our own ops made (a region's output or buffer, an attention's output): its storage is
    its own."""
    if x.op != "call_function":
        return False
    if x.target is operator.getitem and isinstance(x.args[0], fx.Node):
        return adakv_op(x.args[0]) in ("chunked", "chunk_buffers")
    return adakv_op(x) in ("attention", "attention_proven", "sink_attention")


def _donate(graph: fx.Graph) -> None:
    """Write a region's outputs into inputs it reads last (same shape, dtype, sequence dim; contiguous; made
    by our ops and read by nothing else): at 1M tokens the next residual goes into the old one and the
    next q into the attention output, 17 GB less at the peak. The call becomes ``adakv::chunked_into``,
    which declares the write, so Inductor reuses the buffers instead of copying them."""
    outputs = set()
    for node in graph.nodes:
        if node.op == "output":
            outputs |= set(node.all_input_nodes)
    for call in [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.adakv.chunked.default]:
        order = {node: i for i, node in enumerate(graph.nodes)}
        key, ins = call.args
        region = REGIONS[key]
        gets = {u.args[1]: u for u in call.users if u.target is operator.getitem}
        if len(gets) != len(call.users):
            continue
        donated: dict[int, int] = {}
        for pos, x in enumerate(ins):
            v = val(x)
            if not (isinstance(x, fx.Node) and _fresh(x) and ins.count(x) == 1  # read last here:
                    and all(order[u] < order[call] for u in x.users if u is not call)
                    and x not in outputs and v is not None and v.is_contiguous() and v.storage_offset() == 0):
                continue
            for j, (shape, dtype) in enumerate(region.out_meta):
                if j in gets and j not in donated and tuple(v.shape) == shape and v.dtype == dtype and \
                        region.in_dims[pos] is not None and region.in_dims[pos] == region.out_dims[j]:
                    donated[j] = pos
                    break
        if not donated:
            continue
        region.donated = donated
        taken = set(donated.values())
        after = max((x for x in ins if isinstance(x, fx.Node)), key=order.get)
        with graph.inserting_before(call):
            # the new buffers are made by an op that reads the region's last input, so that Inductor
            # cannot allocate them early (it placed plain empty() calls before the previous attention)
            bufs = graph.call_function(torch.ops.adakv.chunk_buffers.default, (key, after))
            outs, k = [], 0
            for j in range(len(region.out_meta)):
                if j in donated:
                    outs.append(ins[donated[j]])
                    continue
                buf = graph.call_function(operator.getitem, (bufs, k))
                k += 1
                if j in gets:
                    buf.meta["example_value"] = val(gets[j])
                outs.append(buf)
            graph.call_function(torch.ops.adakv.chunked_into.default, (
                key, [x for i, x in enumerate(ins) if i not in taken], outs))
        for j, get in gets.items():  # readers of output j read the buffer the call wrote it into
            get.replace_all_uses_with(outs[j])
            graph.erase_node(get)
        graph.erase_node(call)
        log.info("adakv: chunk: %s writes %d of its outputs into inputs it reads last", key, len(donated))


def _is_layout(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        node.target in _LAYOUT or (node.op == "call_method" and node.target in _LAYOUT_METHODS))


def _without_layout_outputs(comp: set) -> set:
    """Leave out of a region the views (unsqueeze, transpose, ...) of its members that only nodes outside
    read: the region then returns their base once, and the views are taken outside on it. Otherwise every
    view would be its own materialised output (RoPE's cos/sin were returned once per later layer, v as a
    transposed copy). Convexity is kept: such a node has no user inside the region."""
    comp = set(comp)
    changed = True
    while changed:
        changed = False
        for node in list(comp):
            if _is_layout(node) and node.args and node.args[0] in comp and node.users and \
                    all(u not in comp for u in node.users):
                comp.discard(node)
                changed = True
    return comp


def _impure_like(node: fx.Node) -> bool:
    if node.is_impure():
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _make_region(gm, members: list, n: int, chunk: Optional[int], compile_fn, order,
                 whole: bool = False) -> Optional[Region]:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}  # earlier regions added nodes
    mset = set(members)
    inputs = []
    for node in members:
        for a in node.all_input_nodes:
            if a not in mset and a not in inputs:
                inputs.append(a)
    outs = [node for node in members if any(u not in mset for u in node.users)]
    if not outs or not inputs:
        return None
    per_row = sum(val(m).numel() // n * val(m).element_size() for m in members)
    device = val(outs[0]).device
    rows = chunk if chunk is not None else default_chunk(per_row, device)
    if rows >= n:
        if not whole:
            return None
        rows = n
    first_user = min((u for o in outs for u in o.users if u not in mset), key=order.get)
    for x in sorted(inputs, key=order.get):  # a view taken late (RoPE's cos.unsqueeze for this layer) moves up
        if order[x] >= order[first_user] and _is_layout(x) and \
                all(order[a] < order[first_user] for a in x.all_input_nodes):
            first_user.prepend(x)
            order = {node: i for i, node in enumerate(graph.nodes)}
    last_input = max(inputs, key=order.get)
    if order[last_input] >= order[first_user]:
        log.info("adakv: chunk: region at %s not chunked: an input is computed after an output is read",
                 members[0].name)
        return None
    # tensors only: every input is a tensor (checked by _row_local), the region's first input leads
    seq_first = sorted(inputs, key=lambda x: _seq_dim(x, n) is None)
    region = Region("", n, rows, members, seq_first, [_seq_dim(x, n) for x in seq_first], outs,
                    [_seq_dim(o, n) for o in outs],
                    [(tuple(int(s) for s in val(o).shape), val(o).dtype) for o in outs], compile_fn)
    region.cut()
    key = region.key = _region_key(region)
    REGIONS[key] = region
    # as late as possible: right before the first reader of an output, so that its O(n) outputs are born
    # after whatever runs between (e.g. the previous layer's compress, which frees that layer's q/k/v)
    with graph.inserting_before(first_user):
        call = graph.call_function(torch.ops.adakv.chunked.default, (key, list(seq_first)))
    for i, o in enumerate(outs):
        with graph.inserting_after(call):
            get = graph.call_function(operator.getitem, (call, i))
        value = val(o)
        get.meta["example_value"] = value.new_empty(value.shape)  # as the op makes it: contiguous
        for u in list(o.users):
            if u not in mset:
                u.replace_input_with(o, get)
    log.info("adakv: chunk: region of %d nodes (%s … %s) runs over chunks of %d rows", len(members),
             members[0].name, members[-1].name, rows)
    return region
