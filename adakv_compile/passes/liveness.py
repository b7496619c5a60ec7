"""A model of a graph's peak memory: live tensor bytes in execution order (a tool, not a pass).

Why: at 1M tokens every O(n) tensor of a Llama-8B-shaped prefill is GBs, and which of them are alive at
the same moment decides whether the prefill fits. This walks an FX graph (the backend's final prefill
graph, with the fake-tensor values Dynamo recorded) in node order and keeps, per *storage*, the span from
the node that allocates it to the last node reading it or any view of it:

- placeholders (weights, cache pools, inputs) are held by the caller for the whole call: ``resident``;
- a view (view/reshape of a contiguous tensor, transpose, slicing, ...) aliases its input's storage; any
  other op allocates its result; the items of a multi-output op (``adakv::chunked``) are fresh storages
  born when that op runs;
- at each node, its inputs and its outputs are live together, plus the op's own *workspace* (what it
  allocates and frees inside): an ``adakv::chunked`` region's working set for one chunk (its sub-graph's
  transient peak, scaled from n to the chunk's rows), and estimates for the attention/compress ops.

The order is the FX order the inner compiler receives; Inductor may still reorder (its
``reorder_for_peak_memory``) and frees a buffer after its last use as modelled here.
``bench/prefill_liveness.py`` runs it on Llama-3.1-8B shapes at 1M tokens (meta tensors).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from .chunk import REGIONS, adakv_op
from .detect import val

_VIEWS = {"view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "t", "detach",
          "as_strided", "view_as", "expand_as", "unflatten", "__getitem__", "select", "diagonal", "unfold"}
_MAYBE_VIEWS = {"reshape", "contiguous", "flatten", "to", "type_as", "float", "bfloat16", "half", "type"}
_VIEW_FNS = {torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.narrow, torch.as_strided,
             torch.select, torch.t, torch.detach, torch.unflatten}
_MAYBE_VIEW_FNS = {torch.reshape, torch.flatten}
# ops whose q/k/v (args 0..2) are one attention's; their transient workspace is estimated per (row, head, token)
ATTENTION_OPS = ("attention", "attention_proven", "static_compress", "compress", "sink_attention")


@dataclass
class Live:
    """One storage live at a point: the node that made it, its shape (of that node's value) and bytes."""
    name: str
    shape: tuple
    dtype: str
    nbytes: int


@dataclass
class Liveness:
    """``peak``: the largest live total (resident + transient + workspace) and where (``at``);
    ``live``: what is live there, largest first; ``timeline``: (node, live bytes) per executed node."""
    resident: int
    peak: int
    at: str
    live: list[Live]
    workspace: int
    timeline: list[tuple[str, int]] = field(default_factory=list)
    live_sets: list[set] = field(default_factory=list)  # per executed node: the names of its live storages

    def table(self, top: int = 12) -> str:
        gb = 1e9
        lines = [f"peak {self.peak / gb:.2f} GB at {self.at}: resident (weights, cache, inputs) "
                 f"{self.resident / gb:.2f} GB + op workspace {self.workspace / gb:.2f} GB + live tensors:"]
        for x in self.live[:top]:
            lines.append(f"  {x.nbytes / gb:8.2f} GB  {x.name:<34} {list(x.shape)} {x.dtype}")
        if len(self.live) > top:
            rest = sum(x.nbytes for x in self.live[top:])
            lines.append(f"  {rest / gb:8.2f} GB  ({len(self.live) - top} more)")
        return "\n".join(lines)


def _nbytes(v) -> int:
    if not isinstance(v, torch.Tensor):
        return 0
    return int(v.numel()) * v.element_size()


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    t = node.target
    name = getattr(t, "__name__", "") or str(t)
    return name.split(".")[0] if isinstance(t, torch._ops.OpOverload) else name


def _aliases_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node whose storage ``node``'s value shares, or None when the op allocates."""
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    vs, vo = val(src), val(node)
    if vs is None or vo is None:
        return None
    name = _target_name(node)
    if node.op == "call_function" and node.target is operator.getitem:
        return src
    if (node.op == "call_method" and name in _VIEWS) or node.target in _VIEW_FNS:
        return src
    if isinstance(node.target, torch._ops.OpOverload):  # an aten graph (make_fx, AOTAutograd)
        return src if node.target.is_view else None
    if (node.op == "call_method" and name in _MAYBE_VIEWS) or node.target in _MAYBE_VIEW_FNS:
        if vo.dtype != vs.dtype or vo.device != vs.device:
            return None
        if name in ("to", "type_as", "float", "bfloat16", "half", "type") or name == "contiguous":
            return src if (name != "contiguous" or vs.is_contiguous()) else None
        return src if vs.is_contiguous() else None
    return None


def _splits(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a torch.split/chunk/unbind node cuts into views, else None."""
    name = _target_name(node)
    if name in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes") and node.args and \
            isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def default_workspace(node: fx.Node, plain_scorer: bool = False) -> int:
    """Bytes an op allocates and frees inside itself (not its inputs or outputs). ``plain_scorer``: compress
    scores with the plain-PyTorch scorer (CPU), whose window logits ``[B, Hq, window, n]`` fp32 are in
    memory (the fused Triton scorer on CUDA keeps none)."""
    op = adakv_op(node)
    if op in ("chunked", "chunked_into"):
        region = REGIONS.get(node.args[0])
        if region is None or region.template is None:
            return 0
        inner = liveness(fx.GraphModule(torch.nn.Module(), region.template), resident_inputs=False,
                         workspace=lambda n: 0)
        return int(inner.peak * region.chunk / region.n)
    if op in ATTENTION_OPS:
        k = val(node.args[1]) if len(node.args) > 1 else None
        if k is None or k.dim() != 4:
            return 0
        B, H, n, _ = (int(s) for s in k.shape)
        q = val(node.args[0])
        hq = int(q.shape[1]) if q is not None and q.dim() == 4 else H
        if op in ("static_compress", "compress"):  # scores fp32, keep, cumsum/slot/dest int64 per (b, h, token)
            logits = B * hq * _window(node) * n * 4 if plain_scorer else 0
            return B * H * n * (4 + 1 + 8 * 3) + logits
        return B * hq * n * 4  # the softmax statistics (log-sum-exp, fp32) of a flash attention
    return 0


def _window(node: fx.Node) -> int:
    from ..kernels.ops import config_for
    for a in node.args:
        if isinstance(a, str) and a.startswith("adakv-"):
            try:
                return config_for(a).window
            except RuntimeError:
                break
    return 32


def liveness(gm: fx.GraphModule, resident_inputs: bool = True,
             workspace: Callable[[fx.Node], int] = default_workspace) -> Liveness:
    """Peak of live tensor bytes of ``gm`` run in node order (see the module docstring)."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    root: dict[fx.Node, fx.Node] = {}   # node -> the node whose allocation its value lives in
    born: dict[fx.Node, int] = {}
    size: dict[fx.Node, int] = {}
    resident = 0
    for node in nodes:
        if node.op == "placeholder":
            root[node] = node
            resident += _nbytes(val(node)) if resident_inputs else 0
            continue
        if node.op != "call_function" and node.op != "call_method":
            continue
        src = _aliases_input(node)
        parent = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
        if isinstance(parent, fx.Node) and val(parent) is None and _splits(parent) in root:
            root[node] = root[_splits(parent)]  # a piece of torch.split/chunk/unbind: a view
        elif isinstance(parent, fx.Node) and val(parent) is None:  # an item of a multi-output op: allocated by it
            root[node] = node
            born[node] = index[node.args[0]]
            size[node] = _nbytes(val(node))
        elif src is not None and src in root:
            root[node] = root[src]
        else:
            root[node] = node
            born[node] = index[node]
            size[node] = _nbytes(val(node))
    last: dict[fx.Node, int] = {}
    end = len(nodes)
    for node in nodes:
        r = root.get(node)
        if r is None or r.op == "placeholder":
            continue
        uses = [index[u] for u in node.users]
        if any(u.op == "output" for u in node.users):
            uses.append(end)
        last[r] = max(last.get(r, born.get(r, index[node])), *uses, index[node])
    spans = [(born[r], last.get(r, born[r]), r) for r in born if size[r]]
    best = Liveness(resident, resident, "", [], 0)
    for i, node in enumerate(nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        alive = [r for b, e, r in spans if b <= i <= e]
        ws = workspace(node)
        total = resident + ws + sum(size[r] for r in alive)
        best.timeline.append((node.name, total))
        best.live_sets.append({r.name for r in alive})
        if total > best.peak or not best.at:
            best.peak, best.at, best.workspace = total, node.name, ws
            best.live = sorted((Live(r.name, tuple(int(s) for s in val(r).shape), str(val(r).dtype).replace(
                "torch.", ""), size[r]) for r in alive), key=lambda x: -x.nbytes)
    return best


def attention_qkv(gm: fx.GraphModule) -> list[set[str]]:
    """Per attention (in graph order, one entry per distinct q/k/v), the names of the storages its q, k and
    v live in (for checks that no two layers' q/k/v are live together)."""
    roots: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        src = _aliases_input(node)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and val(node.args[0]) is None:
            src = None
        roots[node] = roots.get(src, node) if src is not None else node
    out = []
    for node in gm.graph.nodes:
        if adakv_op(node) in ATTENTION_OPS:
            qkv = {roots[a].name for a in node.args[:3] if isinstance(a, fx.Node)}
            if qkv not in out:  # a layer's attention and its compress read the same q/k/v
                out.append(qkv)
    return out


def stale_qkv_at_regions(gm: fx.GraphModule, res: Liveness) -> dict[str, set[str]]:
    """Per ``adakv::chunked``/``chunked_into`` call, the q/k/v storages of attentions live while it runs that
    it neither allocates nor writes into (a donor): an earlier layer's q/k/v kept alive by a late reader."""
    every = set().union(*attention_qkv(gm)) if attention_qkv(gm) else set()
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for (name, _), live in zip(res.timeline, res.live_sets):
        node = nodes[name]
        if adakv_op(node) in ("chunked", "chunked_into"):
            mine = {u.name for u in node.users}
            if adakv_op(node) == "chunked_into":
                mine |= {d.name for d in node.args[2]}
            stale = (live & every) - mine
            if stale:
                out[name] = stale
    return out
